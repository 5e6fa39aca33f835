"""Correctness of the Triton Monarch paths (the TMA kernels with cuBLAS for the plain products, and
the experimental fused kernel) under the Triton interpreter (CPU), and the backend policy: the
``"auto"`` rule, the environment override, the options' role as cache keys, the module layering.

The kernels run in a subprocess with ``TRITON_INTERPRET=1``: Triton decides between compiled and
interpreted kernels when a kernel module is imported, and other tests in the same pytest process
may already have imported it without the interpreter. The subprocess draws fresh random inputs,
runs forward and backward through ``monarch_multiply(..., MonarchOptions(backend="triton"))`` and
through an independent float64 reference written here (explicit loops over blocks, not the
library's torch path), and reports the relative errors ``||got - ref|| / ||ref||`` of the output
and of every gradient.

Tolerances: fp32 inputs use IEEE fp32 dots (errors ~1e-7; bound 1e-5); bf16 inputs and a bf16
intermediate give errors of a few 1e-3 (bound 2e-2).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (w1 shape (k, q, p), w2 shape (l, s, r)); l*r == k*q.
SHAPES = {
    "tp_local_rect": ((4, 8, 16), (4, 32, 8)),  # TP-local shard of a 4x-wide layer, q/l = 2
    "square_batched_kernel": ((4, 16, 16), (4, 16, 16)),  # paper order uses the batched-dot kernel
    "wide_out": ((2, 16, 16), (2, 48, 16)),  # l = 2, s not a power of two
    "narrow_out": ((4, 16, 32), (4, 16, 16)),  # 4x narrower output (w1 q < p)
    "l_not_dividing_q": ((2, 6, 5), (4, 7, 3)),  # q % l != 0: natural layout, stride-l gather
}
# Shapes of the TMA path (chunks q/l of >= 16 channels, rows of >= 16 elements).
TMA_SHAPES = {
    "tma_4x_wide": ((4, 64, 16), (4, 32, 64)),  # q/l = 16, dw1 tile of every chunk
    "tma_l2_wide_out": ((2, 32, 32), (2, 48, 32)),  # l = 2, s not a power of two
    "tma_narrow_out": ((4, 128, 32), (4, 16, 128)),  # q/l = 32, two dw1 channel tiles
    "tma_k2_l4": ((2, 64, 16), (4, 16, 32)),  # k != l
    # Chunks of 48 (not a power of two), as GPT-2 small's 768 -> 3072 layers have; l = 4 takes the
    # paper-order stage-two kernel when perm is True.
    "tma_chunks_48": ((4, 192, 16), (4, 16, 192)),
}
BOUND = {"float32": 1e-5, "bfloat16": 2e-2}
CASES = ([("fused", name, perm, dtype) for name in SHAPES for perm in (True, False) for dtype in BOUND]
         + [("tma", name, perm, dtype) for name in TMA_SHAPES for perm in (True, False) for dtype in BOUND])


def reference_monarch(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, perm: bool) -> torch.Tensor:
    """Float64 Monarch multiply straight from the definition (../shared/DESIGN.md), row by block.

    x: (n, k*p), w1: (k, q, p), w2: (l, s, r) -> (n, l*s).
    """
    k, q, p = w1.shape
    l, s, r = w2.shape
    n = x.shape[0]
    u = torch.cat([x[:, i * p:(i + 1) * p] @ w1[i].T for i in range(k)], dim=1)  # (n, k*q)
    v = u.reshape(n, r, l)  # v[:, t, j] = u[:, t*l + j]
    y = torch.stack([v[:, :, j] @ w2[j].T for j in range(l)], dim=1)  # (n, l, s)
    return y.transpose(1, 2).reshape(n, s * l) if perm else y.reshape(n, l * s)


def _worker() -> None:
    """Run every case (interpreted kernels) and print one JSON line of relative errors."""
    sys.path.insert(0, REPO)
    from monarch_megatron.monarch import KernelOptions, MonarchOptions, monarch_multiply, resolve_backend

    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))  # fresh inputs each run
    results = {}
    for idx, (path, name, perm, dtype) in enumerate(CASES):
        (k, q, p), (l, s, r) = (SHAPES if path == "fused" else TMA_SHAPES)[name]
        # Every other case (the fp32 ones) splits the weight-gradient reductions over two token
        # ranges, so that the in-kernel sum of the split partials (last program per tile) is tested.
        options = MonarchOptions(backend="triton", kernel=KernelOptions(weight_grad_splits=2 if idx % 2 == 0 else 0))
        n = 20  # two token tiles of 16, the second partial
        x = torch.randn(2, n // 2, k * p, dtype=torch.float64)  # leading batch dims
        w1 = torch.randn(k, q, p, dtype=torch.float64) / p ** 0.5
        w2 = torch.randn(l, s, r, dtype=torch.float64) / r ** 0.5
        dy = torch.randn(2, n // 2, l * s, dtype=torch.float64)
        ref_in = [t.clone().requires_grad_() for t in (x, w1, w2)]
        ref = reference_monarch(ref_in[0].reshape(n, k * p), ref_in[1], ref_in[2], perm)
        ref.backward(dy.reshape(n, l * s))
        dt = getattr(torch, dtype)
        ins = [t.to(dt).detach().requires_grad_() for t in (x, w1, w2)]
        # The dispatcher (backend="triton") must pick the path named by the case.
        assert resolve_backend(options, *ins, perm) == path, (path, name)
        out = monarch_multiply(*ins, perm, options)
        out.backward(dy.to(dt))
        pairs = [(out.reshape(n, l * s), ref)] + [(a.grad, b.grad) for a, b in zip(ins, ref_in)]
        errs = [((a.double() - b).norm() / b.norm()).item() for a, b in pairs]
        results[f"{path}|{name}|{perm}|{dtype}"] = {"shape": list(out.shape), "dtype": str(out.dtype),
                                             "errs": errs}
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def interpreted_results() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")][-1]
    return json.loads(line[len("RESULTS "):])


@pytest.mark.parametrize("path,name,perm,dtype", CASES)
def test_triton_forward_and_all_gradients_match_float64_reference(interpreted_results, path, name, perm, dtype):
    res = interpreted_results[f"{path}|{name}|{perm}|{dtype}"]
    (k, q, p), (l, s, r) = (SHAPES if path == "fused" else TMA_SHAPES)[name]
    assert res["shape"] == [2, 10, l * s]
    assert res["dtype"] == f"torch.{dtype}"
    for what, err in zip(("out", "dx", "dw1", "dw2"), res["errs"]):
        assert err == err and err < BOUND[dtype], f"{what}: relative error {err:.2e} (bound {BOUND[dtype]})"


def test_triton_path_under_autocast_casts_like_a_matmul():
    """Under CPU autocast (bf16) the fp32 operands are cast to bf16, as ``torch.matmul`` would."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO)
    code = (
        "import torch\n"
        "from monarch_megatron.monarch import MonarchOptions, monarch_multiply\n"
        "x = torch.randn(20, 64, requires_grad=True); w1 = torch.randn(4, 16, 16, requires_grad=True)\n"
        "w2 = torch.randn(4, 16, 16, requires_grad=True)\n"
        "with torch.autocast('cpu', dtype=torch.bfloat16):\n"
        "    y = monarch_multiply(x, w1, w2, True, MonarchOptions(backend='triton'))\n"
        "y.float().sum().backward()\n"
        "print('DT', y.dtype, x.grad.dtype, w1.grad.dtype, w2.grad.dtype)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DT torch.bfloat16 torch.float32 torch.float32 torch.float32" in proc.stdout


# -- backend policy (CPU, no interpreter) ------------------------------------------------------


@pytest.mark.parametrize("graphed", [False, True])
def test_auto_takes_the_torch_path_on_cpu(graphed):
    from monarch_megatron.monarch import MonarchOptions, resolve_backend

    x = torch.randn(8, 64, dtype=torch.bfloat16)
    w1, w2 = torch.randn(4, 16, 16, dtype=torch.bfloat16), torch.randn(4, 16, 16, dtype=torch.bfloat16)
    assert resolve_backend(MonarchOptions(graphed=graphed), x, w1, w2) == "torch"


@pytest.mark.parametrize("n_in,n_out,nblocks,tokens,eager,graphed", [
    (4096, 16384, 4, 16384, True, True),  # GPU-bound: 2.1 TFLOP per fwd+bwd, measured 2.8x dense eager
    (4096, 16384, 4, 4096, False, True),  # same layer, too little work per call to run eagerly
    (1024, 4096, 4, 16384, False, True),  # 0.13 TFLOP: host-bound eagerly; 1.91x dense in GPU time
    (1024, 1024, 4, 16384, False, True),  # GPU time 0.198 vs torch 0.272 ms (RESULTS, v5)
    (768, 3072, 4, 1 << 20, False, False),  # chunks of 48: the TMA tiles lose to the torch path
    (128, 512, 4, 1 << 20, False, False),  # blocks p = 32, not a multiple of 64
])
def test_auto_rule_for_the_tma_path_eager_by_work_graphed_by_shape(n_in, n_out, nblocks, tokens, eager, graphed):
    """A pure function of shapes: eagerly the TMA path only where the call is GPU-bound; under CUDA
    graphs (host cost free) wherever its tiles are full, since in GPU time it beat or tied the
    torch path at every such shape."""
    from monarch_megatron.monarch.backends import tma_pays_off
    from monarch_megatron.monarch.shapes import monarch_factor_shapes

    sh = monarch_factor_shapes(n_in, n_out, nblocks)
    assert tma_pays_off(tokens, sh.w1_shape, sh.w2_shape) is eager
    assert tma_pays_off(tokens, sh.w1_shape, sh.w2_shape, graphed=False) is eager
    assert tma_pays_off(tokens, sh.w1_shape, sh.w2_shape, graphed=True) is graphed


def test_tma_path_is_refused_off_hopper_and_for_unsupported_shapes():
    from monarch_megatron.monarch import MonarchOptions, resolve_backend
    from monarch_megatron.monarch.triton_monarch_tma import supports

    w1, w2 = torch.randn(4, 64, 16), torch.randn(4, 32, 64)
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    assert not supports(x, w1, w2)  # CPU tensor, not interpreted
    assert not supports(torch.randn(8, 64), w1, w2, torch.float32)
    with pytest.raises(ValueError, match="backend='tma' cannot run"):
        resolve_backend(MonarchOptions(backend="tma"), x, w1.bfloat16(), w2.bfloat16())


def test_environment_override_is_read_by_from_env_only(monkeypatch):
    from monarch_megatron.monarch import BACKEND_ENV, MonarchOptions, monarch_multiply
    from monarch_megatron.monarch.options import default_options

    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert MonarchOptions.from_env() == MonarchOptions()
    for name in ("torch", "triton", "tma", "fused", "auto"):
        monkeypatch.setenv(BACKEND_ENV, name)
        assert MonarchOptions.from_env().backend == name
        graphed = MonarchOptions.from_env(MonarchOptions(graphed=True))
        assert graphed == MonarchOptions(backend=name, graphed=True)  # the rest of base is kept
    assert MonarchOptions.from_env(MonarchOptions(backend="torch")).backend == "torch"  # explicit wins
    default_options.cache_clear()
    try:
        assert default_options().backend == "auto"  # read once: later changes of the variable ...
        monkeypatch.setenv(BACKEND_ENV, "torch")
        assert default_options().backend == "auto"  # ... do not reach a running process
    finally:
        default_options.cache_clear()
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        MonarchOptions.from_env()
    # A call with explicit options never reads the variable (here it would raise).
    x, w1, w2 = torch.randn(8, 64), torch.randn(4, 16, 16), torch.randn(4, 16, 16)
    monarch_multiply(x, w1, w2, True, MonarchOptions(backend="torch"))


def test_options_are_frozen_hashable_and_validated():
    from monarch_megatron.monarch import KernelOptions, MonarchOptions

    a = MonarchOptions(kernel=KernelOptions(tma_tile_overrides={"dx": [128, 128, 64, 4, 4],
                                                                "s1": (128, 2, 64, 64, 8, 3)}))
    b = MonarchOptions(kernel=KernelOptions(tma_tile_overrides=(("s1", (128, 2, 64, 64, 8, 3)),
                                                                ("dx", (128, 128, 64, 4, 4)))))
    assert a == b and hash(a) == hash(b)  # overrides stored as sorted tuples: one cache entry
    assert a.kernel.tma_tile_overrides == (("dx", (128, 128, 64, 4, 4)), ("s1", (128, 2, 64, 64, 8, 3)))
    assert len({MonarchOptions(), MonarchOptions(graphed=True), a}) == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.backend = "torch"
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.kernel.tma_paper_kernel = False
    with pytest.raises(ValueError, match="backend"):
        MonarchOptions(backend="cuda")
    with pytest.raises(ValueError, match="unknown kernel"):
        KernelOptions(tma_tile_overrides={"s2": (1,)})
    with pytest.raises(ValueError, match="weight_grad_splits"):
        KernelOptions(weight_grad_splits=-1)


def test_kernel_options_key_every_cached_plan():
    """Two option sets never share a cached launch plan (fused) or tile choice (TMA)."""
    from monarch_megatron.monarch import KernelOptions
    from monarch_megatron.monarch import triton_monarch_tma as tma
    from monarch_megatron.monarch.experimental import fused

    w1, w2 = torch.randn(4, 64, 64), torch.randn(4, 64, 64)
    need = (True, True, True)
    base, split, unmerged = KernelOptions(), KernelOptions(weight_grad_splits=2), KernelOptions(
        fused_merged_launches=False)
    plan = fused._get_plan(w1, w2, 4096, torch.bfloat16, False, need, base)
    assert fused._get_plan(w1, w2, 4096, torch.bfloat16, False, need, KernelOptions()) is plan
    assert fused._get_plan(w1, w2, 4096, torch.bfloat16, False, need, split) is not plan
    assert isinstance(plan.b1.parts, fused._Fallback)  # merged launch, split only if it fails to compile
    assert type(fused._get_plan(w1, w2, 4096, torch.bfloat16, False, need, unmerged).b1.parts) is list

    tile = (64, 128, 64, 4, 4)
    swept = KernelOptions(tma_tile_overrides={"dx": tile})
    assert tma._tiles(4, 256, 256, 4, swept)["dx"] == tile
    assert tma._tiles(4, 256, 256, 4, base)["dx"] != tile
    assert tma._tiles(4, 256, 256, 4, base)["s1"] == tma._tiles(4, 256, 256, 4, swept)["s1"]


def _monarch_imports(path: str, package: str, modules: set[str]) -> set[str]:
    """Modules of the package (dotted, relative to it) that the file at ``path`` imports anywhere,
    lazy imports inside functions included."""
    tree = ast.parse(open(path).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([p for p in parts if p] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # ``from . import a, b``: the submodules a and b where they are modules, else the package.
            named = {f"{base}.{alias.name}" for alias in node.names} & modules
            found |= named or ({base} & modules)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names} & modules
    return found


def test_monarch_module_imports_are_acyclic():
    """No module of monarch_megatron.monarch imports (directly or through others) one that imports
    it: the paths know nothing of the dispatcher, the dispatcher imports the paths."""
    root = os.path.join(REPO, "monarch_megatron", "monarch")
    files = {}
    for folder, _, names in os.walk(root):
        for fn in names:
            if fn.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, fn), REPO)[:-3].replace(os.sep, ".")
                files[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, fn)
    modules = set(files)
    graph = {}
    for mod, path in files.items():
        package = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
        graph[mod] = _monarch_imports(path, package, modules) - {mod}
    assert "monarch_megatron.monarch.triton_monarch_tma" in graph["monarch_megatron.monarch.backends"]
    assert "monarch_megatron.monarch.stages" in graph["monarch_megatron.monarch.triton_monarch_tma"]

    state = {}

    def visit(mod, trail):
        state[mod] = "open"
        for dep in sorted(graph[mod]):
            if state.get(dep) == "open":
                raise AssertionError("import cycle: " + " -> ".join(trail + [mod, dep]))
            if dep not in state:
                visit(dep, trail + [mod])
        state[mod] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [])


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()

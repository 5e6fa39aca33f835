"""The profile summary's device numbers: kernels count as device work, ``record_function`` ranges
drawn on the device timeline do not (they span idle gaps)."""

from types import SimpleNamespace

from torch.autograd import DeviceType

from monarch_megatron.training.profiling import summarize


def _event(name, start_us, end_us, device=DeviceType.CUDA, annotation=False):
    return SimpleNamespace(name=name, device_type=device, is_user_annotation=annotation,
                           time_range=SimpleNamespace(start=start_us, end=end_us), self_cpu_time_total=0.0)


def test_device_busy_counts_kernels_not_annotated_ranges():
    # One step of 10 ms wall: two kernels (2 ms, overlapping by 0.5 ms, and 1 ms) inside a
    # "micro-steps" range that spans 9 ms of the device timeline.
    events = [
        _event("micro-steps", 0, 9000, annotation=True),
        _event("gemm", 1000, 2500),
        _event("gemm", 2000, 3000),
        _event("add", 8000, 9000),
        _event("aten::mm", 0, 10, device=DeviceType.CPU),
    ]
    summary = summarize(events, num_steps=1, wall_seconds=0.010, on_device=True)
    assert abs(summary["device_busy_ms_per_step"] - 3.0) < 1e-9  # union: 1.0-3.0 ms and 8.0-9.0 ms
    assert abs(summary["device_busy_fraction"] - 0.3) < 1e-9
    assert abs(summary["device_kernel_ms_per_step"] - 3.5) < 1e-9  # sum: overlap counted twice
    assert [r["name"] for r in summary["top"]] == ["gemm", "add"]
    assert summary["ranges"] == [{"name": "micro-steps", "span_ms_per_step": 9.0, "calls_per_step": 1.0}]
    assert summary["aten_ops_per_step"] == 1.0

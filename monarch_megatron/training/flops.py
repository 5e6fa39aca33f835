"""Analytic parameter counts and training FLOPs of the BERT / GPT models of a config.

No model is built (``--dry-run`` must work on a CPU without process groups, for BERT-large too).
The counts follow megatron-core's ``BertModel`` / ``GPTModel`` with the local layer spec; a test
checks them against real models. FLOPs count structured layers honestly: a Monarch linear costs
``2 * (numel(w1) + numel(w2))`` per token (its two batched GEMMs on the padded widths), a
block-diagonal one ``2 * numel(w)`` (one batched GEMM), not the dense layer's ``2 * in * out``.
"""

from __future__ import annotations

from ..models.config import MonarchConfig, ffn_width, padded_vocab_size
from ..models.family import model_family
from ..parallel.kinds import layer_kind
from .config import ModelSection, monarch_layer_widths


def linear_weights(m: ModelSection, monarch: MonarchConfig | None) -> dict[str, tuple[int, int]]:
    """Per transformer layer: name -> (weight elements as built, dense-equivalent elements)."""
    out = {}
    for name, (n_in, n_out, _) in monarch_layer_widths(m).items():
        dense = n_in * n_out
        if monarch is not None and name in monarch.layers:
            out[name] = (layer_kind(monarch.kind).num_params(n_in, n_out, monarch.nblocks), dense)
        else:
            out[name] = (dense, dense)
    return out


def count_parameters(m: ModelSection, vocab: int, monarch: MonarchConfig | None) -> dict[str, int]:
    """Global parameter counts: ``total``, ``monarch`` (factor elements, either kind), ``dense_equivalent``."""
    h, f = m.hidden_size, ffn_width(m.hidden_size, m.ffn_hidden_size)
    v = padded_vocab_size(vocab, m.make_vocab_size_divisible_by)
    weights = linear_weights(m, monarch)
    biases = 3 * h + h + f + h
    layer = sum(w for w, _ in weights.values()) + biases + 4 * h  # two layer norms
    layer_dense = sum(d for _, d in weights.values()) + biases + 4 * h
    mon = sum(w for name, (w, _) in weights.items() if monarch is not None and name in monarch.layers)
    shared = v * h + m.max_position_embeddings * h + 2 * h  # embeddings + final layer norm
    family = model_family(m.kind)
    if family.token_types:
        shared += 2 * h
    if family.lm_head_transform:
        shared += h * h + h + 2 * h + v  # LM head dense + layer norm, output bias
    if family.sentence_order and m.sentence_order:
        shared += h * h + h + 2 * h + 2  # pooler + binary head
    total = shared + m.num_layers * layer
    return {"total": total, "monarch": m.num_layers * mon, "dense_equivalent": shared + m.num_layers * layer_dense}


def train_flops_per_sequence(m: ModelSection, vocab: int, monarch: MonarchConfig | None, seq: int,
                             head_positions: int | None = None) -> float:
    """FLOPs of forward + backward (3 x forward) for one sequence of ``seq`` tokens.

    ``head_positions``: the positions the LM head runs on (BERT with ``mlm_head_masked_only``: the
    masking budget); ``None`` = all ``seq``. Only the work done is counted, so MFU stays honest."""
    h = m.hidden_size
    v = padded_vocab_size(vocab, m.make_vocab_size_divisible_by)
    linear = sum(w for w, _ in linear_weights(m, monarch).values())
    per_layer = 2 * seq * linear + 4 * seq * seq * h  # linears + (QK^T, AV)
    head_seq = seq if head_positions is None else head_positions
    head = 2 * head_seq * h * v + (2 * head_seq * h * h if model_family(m.kind).lm_head_transform else 0)
    return 3.0 * (m.num_layers * per_layer + head)

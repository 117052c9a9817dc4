"""Longer inputs for encoders with a learned absolute position table (BERT, RoBERTa, XLM-R, ...).

An encoder trained with n positions p_0 .. p_{n-1} (n = 512 for BERT) is extended to any length
N <= n^2 by hierarchical decomposition: every trained row is rewritten as a base vector

    u_i = (p_i - alpha * p_0) / (1 - alpha)

and position k reads block k // n and offset k mod n from the same bases:

    q_k = alpha * u_{k // n} + (1 - alpha) * u_{k mod n}.

For k < n, q_k = alpha * p_0 + (p_k - alpha * p_0) = p_k, so inputs up to n tokens embed exactly as
before; beyond n the model sees familiar rows at two scales and adapts in a short fine-tune, with
the extended table trainable. alpha != 0.5 keeps (block i, offset j) and (block j, offset i) apart;
0.4 is the default. ``method="tile"`` (q_k = p_{k mod n}, alpha = 0 in the formula) is what
Piccolo2's released code does; it makes positions k and k + n identical and is kept for ablations.

RoBERTa-family tables (XLM-R, CamemBERT, MPNet, ...) number positions from padding_idx + 1 = 2:
rows 0 and 1 are kept as they are and the n rows after them are decomposed.

References:
    Piccolo2: General Text Embedding with Multi-task Hybrid Loss Training (arXiv 2405.06932), which
    lists "position embedding hierarchical decomposition" among its tricks.
    Su Jianlin, 层次分解位置编码，让BERT可以处理超长文本 (hierarchically decomposed position
    encoding), https://kexue.fm/archives/7947, where the decomposition comes from.
"""

import torch
from torch import nn

from .cli import UsageError
from .flags import PE_METHODS


def hierarchical_positions(trained: torch.Tensor, length: int, alpha: float = 0.4) -> torch.Tensor:
    """Rows q_0 .. q_{length-1} from the trained rows [n, H]; the first n are the trained rows."""
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    n = trained.size(0)
    _check_length(n, length)
    table = trained.float()
    bases = (table - alpha * table[:1]) / (1 - alpha)
    k = torch.arange(length, device=trained.device)
    extended = alpha * bases[k // n] + (1 - alpha) * bases[k % n]
    extended[:n] = table  # equal in exact arithmetic; copied so short inputs stay bit-identical
    return extended.to(trained.dtype)


def tiled_positions(trained: torch.Tensor, length: int) -> torch.Tensor:
    """Rows p_{k mod n} for k < length (Piccolo2's released code)."""
    n = trained.size(0)
    _check_length(n, length)
    return trained[torch.arange(length, device=trained.device) % n].clone()


def find_position_table(backbone) -> tuple[str, nn.Embedding, int]:
    """(module name, table, index of position 0) of ``embeddings.position_embeddings``.

    Position 0 sits at row padding_idx + 1 when the table has a padding row (the fairseq numbering
    of RoBERTa, XLM-R, MPNet, ...), at row 0 otherwise (BERT, ELECTRA, DistilBERT, ALBERT, ...).
    """
    for name, module in backbone.named_modules():
        if (name == "embeddings.position_embeddings" or name.endswith(".embeddings.position_embeddings")) and (
            isinstance(module, nn.Embedding)
        ):
            offset = module.padding_idx + 1 if module.padding_idx is not None else 0
            return name, module, offset
    model_type = getattr(backbone.config, "model_type", type(backbone).__name__)
    raise ValueError(
        f"{model_type}: no learned absolute position table (embeddings.position_embeddings) to extend; "
        "models with rotary or relative positions take longer inputs through their own config (e.g. rope_scaling)"
    )


def learned_positions(backbone):
    """How many tokens ``backbone``'s learned position table holds; None without one (rotary, relative)."""
    try:
        _, table, offset = find_position_table(backbone)
    except ValueError:
        return None
    return table.num_embeddings - offset


def check_lengths_fit(backbone, lengths: dict, remedy="") -> None:
    """Refuse max-length flags (``{"--passage_max_len": 512}``) beyond a learned position table, at start: the
    first long batch would otherwise crash the run with a tensor-size error and nothing saved. Backbones
    without such a table (rotary, relative) are not checked."""
    positions = learned_positions(backbone)
    if positions is None:
        return
    beyond = [f"{flag} {length}" for flag, length in lengths.items() if length > positions]
    if beyond:
        raise UsageError(f"{', '.join(beyond)}: the model has {positions} positions; lower it to <= {positions}"
                         + remedy)


def extend_position_embeddings(backbone, max_length: int, method: str = "hierarchical", alpha: float = 0.4,
                               tokenizer=None) -> int:
    """Extend ``backbone``'s position table in place to ``max_length`` positions; returns n.

    Updates ``config.max_position_embeddings``, the ``position_ids`` / ``token_type_ids`` buffers
    of the embeddings module and ``tokenizer.model_max_length``. The new table is trainable.
    """
    if method not in PE_METHODS:
        raise ValueError(f"unknown position extension {method!r}; choose one of {PE_METHODS}")
    name, table, offset = find_position_table(backbone)
    n = table.num_embeddings - offset
    model_type = getattr(backbone.config, "model_type", type(backbone).__name__)
    if not n < max_length <= n * n:
        raise ValueError(
            f"{model_type} has {n} trained positions: extend to a length in ({n}, {n * n}], got {max_length}")
    weight = table.weight.detach()
    trained = weight[offset:]
    rows = hierarchical_positions(trained, max_length, alpha) if method == "hierarchical" else tiled_positions(
        trained, max_length)
    total = offset + max_length
    extended = nn.Embedding(total, table.embedding_dim, padding_idx=table.padding_idx, max_norm=table.max_norm,
                            norm_type=table.norm_type, scale_grad_by_freq=table.scale_grad_by_freq,
                            sparse=table.sparse, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        extended.weight.copy_(torch.cat([weight[:offset], rows]))
    embeddings = backbone.get_submodule(name.rpartition(".")[0])
    embeddings.position_embeddings = extended
    _resize_position_buffers(embeddings, total)
    backbone.config.max_position_embeddings = total
    if tokenizer is not None:
        tokenizer.model_max_length = max_length
    return n


def extend_model_positions(model, max_length: int, method: str = "hierarchical", alpha: float = 0.4) -> int:
    """:func:`extend_position_embeddings` on an ``EmbeddingModel``, which then reads ``max_length`` tokens."""
    n = extend_position_embeddings(model.backbone, max_length, method, alpha, model.tokenizer)
    model.max_seq_length = max_length
    return n


def freeze_position_embeddings(backbone) -> None:
    find_position_table(backbone)[1].weight.requires_grad_(False)


def _check_length(n, length):
    if not n <= length <= n * n:
        raise ValueError(f"{n} trained positions extend to at most {n * n}; got {length}")


def _resize_position_buffers(embeddings: nn.Module, total: int) -> None:
    """Rebuild the [1, positions] index buffers the embeddings module slices when no ids are passed."""
    for buffer_name, make in (("position_ids", torch.arange), ("token_type_ids", torch.zeros)):
        old = embeddings._buffers.get(buffer_name)
        if old is None:
            continue
        new = make(total, dtype=old.dtype, device=old.device).view(*old.shape[:-1], total)
        persistent = buffer_name not in embeddings._non_persistent_buffers_set
        embeddings.register_buffer(buffer_name, new, persistent=persistent)

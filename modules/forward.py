"""The forward pass of a training step: batches to the device, length-bucketed embedding, per-task loss."""

import numpy as np
import torch

from .distillation import teacher_inputs


def to_device(batch, device):
    """Move every tensor of a (nested) batch dict to ``device``."""
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


# A forward has a fixed cost besides its tokens (kernel launches, small matmuls, Python), counted as this many
# padded tokens: a cut must save more padding than that, so short uniform batches run as one forward (--split_tokens).
SPLIT_TOKENS = 128


def plan_sub_batches(lengths, max_rows=None, max_tokens=None, split_tokens=SPLIT_TOKENS):
    """Groups of row indices cutting rows sorted by length into sub-batches, each padded to its own longest row:
    the cut that minimises padded tokens + ``split_tokens`` per sub-batch, under at most ``max_rows`` rows and
    ``max_tokens`` padded tokens each (a row longer than ``max_tokens`` alone). An exact dynamic programme over the
    sorted lengths; unconstrained, cuts fall only between different lengths."""
    lengths = torch.as_tensor(lengths)
    order = torch.argsort(lengths, stable=True)
    widths = lengths[order].numpy().astype(np.int64)
    n = len(widths)
    if n == 0:
        return []
    overhead = split_tokens
    if max_rows or max_tokens:
        bounds = np.arange(n + 1)
    else:  # equal lengths never gain from a cut between them
        bounds = np.flatnonzero(np.r_[True, widths[1:] != widths[:-1], True])
    best = np.full(n + 1, np.inf)
    best[0], cut = 0.0, np.zeros(n + 1, dtype=np.int64)
    for k, end in enumerate(bounds[1:], start=1):  # the last sub-batch of rows order[:end] is order[start:end]
        width, first = int(widths[end - 1]), 0
        if max_rows:
            first = max(first, end - max_rows)
        if max_tokens:
            first = max(first, end - max(1, max_tokens // max(width, 1)))
        starts = bounds[:k][bounds[:k] >= first]
        costs = best[starts] + (end - starts) * width + overhead
        pick = int(np.argmin(costs))
        best[end], cut[end] = costs[pick], starts[pick]
    groups, end = [], n
    while end > 0:
        groups.append(order[int(cut[end]):end])
        end = int(cut[end])
    return groups[::-1]


def length_sorted_sub_batches(tokens, count=None, size=None, max_tokens=None, split_tokens=SPLIT_TOKENS,
                              same_count_everywhere=False):
    """[(row indices, tokens of those rows)]: rows sorted by length, cut into ``count`` equal sub-batches, or as
    plan_sub_batches cuts them (at most ``size`` rows and ``max_tokens`` padded tokens each), each trimmed to its own
    longest row. Right or left padding. ``same_count_everywhere`` (every process of a run calls it together, as a
    training step does): as many sub-batches on every process, see ``as_many_as_any_process``."""
    mask = tokens["attention_mask"]
    lengths = mask.sum(1)
    right_padded = bool(mask[:, 0].all())
    if count:
        groups = torch.argsort(lengths, stable=True).tensor_split(count)
    else:
        groups = [rows.to(mask.device) for rows in plan_sub_batches(lengths.cpu(), size, max_tokens, split_tokens)]
    if same_count_everywhere and not count:  # ``count`` equal cuts are as many everywhere already
        groups = as_many_as_any_process(groups, mask.device)
    sub_batches = []
    for rows in groups:
        width = int(lengths[rows].max())
        columns = slice(0, width) if right_padded else slice(mask.size(1) - width, None)
        sub_batches.append((rows, {key: value[rows, columns] for key, value in tokens.items()}))
    return sub_batches


def as_many_as_any_process(groups, device):
    """``groups`` (row indices) cut further, the largest first, until there are as many as the process with the most
    has. DDP (its buffers), FSDP and ZeRO-3 (their weights) run collectives in every forward: processes whose plans
    differ in length would pair them wrongly and hang. A cut only shrinks a sub-batch, so limits still hold."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return groups
    most = torch.tensor([len(groups)], device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    groups = list(groups)
    while len(groups) < int(most):  # the processes' row counts are equal, so there are rows enough to cut
        largest = max(range(len(groups)), key=lambda i: len(groups[i]))
        groups[largest:largest + 1] = groups[largest].tensor_split(2)
    return groups


def embed(model, tokens, length_buckets="auto", split_tokens=SPLIT_TOKENS):
    """``model(**tokens)``, run as forwards over rows of similar length: ``auto`` as plan_sub_batches cuts them
    (one forward where no cut saves more than ``split_tokens`` padded tokens), N as N equal sub-batches, 1 as one
    forward.

    Each sub-batch is trimmed to its own longest row, so little compute goes to padding; the
    embeddings are the same as one padded forward (padding is masked), only cheaper when lengths vary.
    """
    rows = tokens["attention_mask"].size(0)
    if length_buckets == 1 or (length_buckets != "auto" and rows < 2 * length_buckets):
        return model(**tokens)
    sub_batches = length_sorted_sub_batches(tokens, count=None if length_buckets == "auto" else length_buckets,
                                            split_tokens=split_tokens, same_count_everywhere=True)
    if len(sub_batches) == 1:  # no cut pays (the collator already padded to the longest row)
        return model(**tokens)
    outputs = torch.cat([model(**sub_tokens) for _, sub_tokens in sub_batches])
    return outputs[torch.argsort(torch.cat([rows for rows, _ in sub_batches]))]


def task_loss(model, batch, losses, length_buckets=1, teacher=None, split_tokens=SPLIT_TOKENS):
    """Embed one task-homogeneous batch and return its (unweighted) loss.

    Contrastive batches embed queries and passages separately (their max lengths differ);
    ``passage`` holds [positives | negatives of row 0 | negatives of row 1 | ...]; see embed for the buckets.
    The teacher's part (``teacher``, a modules.distillation.Teacher, or scores in the batch) goes to the loss
    when there is one.
    """
    kind = batch["kind"]
    teacher_part = teacher_inputs(teacher, batch)
    if kind in ("cosent", "parallel"):
        first, second = embed(model, batch["pair"], length_buckets, split_tokens).chunk(2)
        return losses[kind](first, second, batch["labels"] if kind == "cosent" else teacher_part)
    queries = embed(model, batch["query"], length_buckets, split_tokens)
    passages = embed(model, batch["passage"], length_buckets, split_tokens)
    rows, num_negatives = queries.size(0), batch["num_negatives"]
    negatives = passages[rows:].view(rows, num_negatives, -1) if num_negatives else None
    extra = (teacher_part,) if teacher_part is not None else ()
    return losses[kind](queries, passages[:rows], negatives, batch.get("text_ids"), *extra)


"""The forward pass of a training step: batches to the device, length-bucketed embedding, per-task loss."""

import torch

from .distillation import teacher_inputs


def to_device(batch, device):
    """Move every tensor of a (nested) batch dict to ``device``."""
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch.to(device) if isinstance(batch, torch.Tensor) else batch


def length_sorted_sub_batches(tokens, count=None, size=None):
    """[(row indices, tokens of those rows)]: rows sorted by length, cut into ``count`` sub-batches
    (or sub-batches of ``size`` rows), each trimmed to its own longest row. Right or left padding."""
    mask = tokens["attention_mask"]
    lengths = mask.sum(1)
    order = torch.argsort(lengths, stable=True)
    right_padded = bool(mask[:, 0].all())
    sub_batches = []
    for rows in (order.tensor_split(count) if count else order.split(size)):
        width = int(lengths[rows].max())
        columns = slice(0, width) if right_padded else slice(mask.size(1) - width, None)
        sub_batches.append((rows, {key: value[rows, columns] for key, value in tokens.items()}))
    return sub_batches


def embed(model, tokens, length_buckets=1):
    """``model(**tokens)``, run as up to ``length_buckets`` forwards over rows of similar length.

    Each bucket is trimmed to its own longest row, so little compute goes to padding; the
    embeddings are the same as one padded forward (padding is masked), only cheaper when lengths vary.
    """
    if length_buckets <= 1 or tokens["attention_mask"].size(0) < 2 * length_buckets:
        return model(**tokens)
    sub_batches = length_sorted_sub_batches(tokens, count=length_buckets)
    outputs = torch.cat([model(**sub_tokens) for _, sub_tokens in sub_batches])
    return outputs[torch.argsort(torch.cat([rows for rows, _ in sub_batches]))]


def task_loss(model, batch, losses, length_buckets=1, teacher=None):
    """Embed one task-homogeneous batch and return its (unweighted) loss.

    Contrastive batches embed queries and passages separately (their max lengths differ);
    ``passage`` holds [positives | negatives of row 0 | negatives of row 1 | ...]. The teacher's part
    (``teacher``, a modules.distillation.Teacher, or scores in the batch) goes to the loss when there is one.
    """
    kind = batch["kind"]
    teacher_part = teacher_inputs(teacher, batch)
    if kind in ("cosent", "parallel"):
        first, second = embed(model, batch["pair"], length_buckets).chunk(2)
        return losses[kind](first, second, batch["labels"] if kind == "cosent" else teacher_part)
    queries = embed(model, batch["query"], length_buckets)
    passages = embed(model, batch["passage"], length_buckets)
    rows, num_negatives = queries.size(0), batch["num_negatives"]
    negatives = passages[rows:].view(rows, num_negatives, -1) if num_negatives else None
    extra = (teacher_part,) if teacher_part is not None else ()
    return losses[kind](queries, passages[:rows], negatives, batch.get("text_ids"), *extra)


def batch_size_and_tokens(batch):
    """(records, non-padding tokens) in one batch, for throughput logging."""
    if "pair" in batch:  # cosent, parallel: [texts | their pairs]
        return batch["pair"]["input_ids"].size(0) // 2, int(batch["pair"]["attention_mask"].sum())
    return batch["query"]["input_ids"].size(0), int(
        batch["query"]["attention_mask"].sum() + batch["passage"]["attention_mask"].sum()
    )

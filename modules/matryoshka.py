"""Matryoshka Representation Learning: any embedding loss trained at nested dimensions, and the dims from the flags."""

import torch
from torch import nn

from .cli import UsageError


class Matryoshka(nn.Module):
    """Matryoshka Representation Learning: the wrapped loss at each nested dimension.

        L = sum_d w_d * loss(e[..., :d]) / sum_d w_d

    Every embedding argument (a float tensor of 2+ dims) is truncated to its first d
    coordinates; the wrapped loss re-normalises. Dimensions above the embedding size are an error,
    not silently dropped. Reference: Kusupati et al. 2022 (arXiv 2205.13147).
    """

    def __init__(self, loss: nn.Module, dims, weights=None):
        super().__init__()
        if not dims:
            raise ValueError("Matryoshka needs at least one dimension")
        if weights is not None and len(weights) != len(dims):
            raise ValueError(f"Matryoshka: {len(dims)} dims but {len(weights)} weights")
        self.loss = loss
        self.dims = list(dims)
        self.weights = list(weights) if weights is not None else [1.0] * len(dims)

    def forward(self, *args):
        embedding_size = next(a.size(-1) for a in args if _is_embedding(a))
        if max(self.dims) > embedding_size:
            raise ValueError(f"Matryoshka dims {self.dims} exceed the embedding size {embedding_size}")
        total = 0.0
        for dim, weight in zip(self.dims, self.weights):
            truncated = [a[..., :dim] if _is_embedding(a) else a for a in args]
            total = total + weight * self.loss(*truncated)
        return total / sum(self.weights)


def _is_embedding(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2


def unwrapped(loss):
    """The loss a Matryoshka wraps, or ``loss`` itself: where the counters a loss keeps for the log are."""
    return loss.loss if isinstance(loss, Matryoshka) else loss


PICCOLO_MRL_DIMS = (256, 512, 768, 1024, 1280, 1536, 1792)


def matryoshka_dims(requested, output_dim):
    """The requested nested dims that fit the output size, plus the output size itself (Piccolo2's list
    is 256..1792; the saved model returns the full embedding, so it is always trained)."""
    return sorted({d for d in requested if d <= output_dim} | {output_dim})


def matryoshka_from_flags(loss, dims_flag, weights_flag, output_dim):
    """``loss`` wrapped in Matryoshka per ``--mrl_dims`` ('' off, 'piccolo', or '64,128,384') / ``--mrl_weights``.

    An explicit list must hold the output size: coordinates above the largest dim would get no
    gradient, yet the saved model uses them.
    """
    if not dims_flag:
        return loss
    if dims_flag == "piccolo":
        dims = matryoshka_dims(PICCOLO_MRL_DIMS, output_dim)
    else:
        try:
            dims = sorted({int(d) for d in dims_flag.split(",")})
        except ValueError:
            raise UsageError(f"--mrl_dims {dims_flag}: expected 'piccolo' or a comma list of integers") from None
        if dims[0] < 1 or dims[-1] != output_dim:
            raise UsageError(f"--mrl_dims {dims_flag}: the list must include the output size {output_dim} as its "
                             "largest dim, and every dim must be >= 1")
    weights = None
    if weights_flag:
        try:
            weights = [float(w) for w in weights_flag.split(",")]
        except ValueError:
            raise UsageError(f"--mrl_weights {weights_flag}: expected a comma list of numbers") from None
        if len(weights) != len(dims):
            raise UsageError(f"--mrl_weights: {len(weights)} weights for the Matryoshka dims {dims}")
    return Matryoshka(loss, dims, weights)

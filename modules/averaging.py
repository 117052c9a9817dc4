"""Weight-space ensembling with the start model (WiSE-FT) for the exported model.

    final = alpha * trained + (1 - alpha) * start

Wortsman et al. 2022, "Robust fine-tuning of zero-shot models" (arXiv 2109.01903): interpolating the
fine-tuned weights with the pre-trained ones keeps much of the fine-tuning gain on the target task
and most of the start model's strength elsewhere (here: an STS fine-tune that would lose retrieval
quality). Weights the start model does not have, or has in another shape (a new ScalingLayer, an
extended position table), are exported as trained.
"""

import torch

from .cli import UsageError


def interpolate_with_start(state_dict, start_state_dict, alpha):
    """``alpha * trained + (1 - alpha) * start`` for every floating tensor the two share (same key and shape).

    Returns the new state dict and the keys exported as trained (absent from the start, or reshaped).
    """
    averaged, kept = {}, []
    for key, value in state_dict.items():
        start = start_state_dict.get(key)
        if value.is_floating_point() and start is not None and start.shape == value.shape:
            averaged[key] = (alpha * value.float() + (1 - alpha) * start.float()).to(value.dtype)
        else:
            averaged[key] = value
            kept.append(key)
    if len(kept) == len(state_dict):
        raise UsageError("--wise_ft_alpha: the start model shares no weight with the trained one (a LoRA adapter? "
                         "scale the adapter instead)")
    return averaged, kept


@torch.no_grad()
def start_state_dict(path):
    """The start model's full state dict on CPU, keys as the training script's EmbeddingModel names them."""
    from .model import EmbeddingModel, _without_zero3_loading

    with _without_zero3_loading():
        return EmbeddingModel.from_pretrained(path).state_dict()

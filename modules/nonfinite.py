"""Non-finite losses and weights stop a run: a NaN model is never saved as a success.

A too-high learning rate without clipping, or a loss that divides by zero, turns the weights into NaN within
a few steps, after which every loss is NaN and training goes on to save an all-NaN model with exit 0. The loss
is checked every forward, before the optimizer applies it (one small all-reduce, so every process stops at the
same step), and the weights before every checkpoint and before final/.
"""

import math

import torch

from .cli import UsageError


class NonFiniteError(UsageError):
    """A loss or a weight is NaN or infinite; the message names the step and what."""


def stop_on_non_finite_loss(accelerator, step, losses, labels):
    """Raise NonFiniteError when a loss of this forward is not finite on any process; ``labels`` name each loss
    ("cosent loss of sts (meta.txt:1)")."""
    values = torch.stack([loss.detach().float().reshape(()) for loss in losses])
    if accelerator.num_processes > 1:  # NaN or inf on one process makes the sum non-finite everywhere
        values = accelerator.reduce(values, "sum")
    for label, value in zip(labels, values.tolist()):
        if not math.isfinite(value):
            raise NonFiniteError(f"step {step}: the {label} is {value}; stopped before the optimizer applied it, "
                                 "nothing of this step is saved (lower --lr, keep --max_grad_norm > 0, or check "
                                 "the data and the loss flags)")


def check_finite_parameters(accelerator, model, what):
    """Refuse to save ``what`` (a checkpoint) when a parameter of any process is not finite. Under ZeRO-3 each
    process checks its own partition."""
    local_bad = next((name for name, p in accelerator.unwrap_model(model).named_parameters()
                      if not torch.isfinite(getattr(p, "ds_tensor", p).detach()).all()), None)
    count = torch.tensor([float(local_bad is not None)], device=accelerator.device)
    if accelerator.num_processes > 1:
        count = accelerator.reduce(count, "sum")
    if count.item():
        raise NonFiniteError(f"{what}: not saved, the weights are not finite"
                             + (f" ({local_bad})" if local_bad else "") + "; lower --lr or keep --max_grad_norm > 0")


def check_finite_weights(state_dict, what):
    """Refuse to write ``what`` (final/, an export) from a state dict holding NaN or infinite values."""
    for name, value in state_dict.items():
        if value.is_floating_point():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise NonFiniteError(f"{what}: {bad} non-finite value{'s' if bad > 1 else ''} in {name}; not "
                                     "written")

"""Exponential moving average of the trained weights (``--ema_decay``), kept in float32 beside the model.

    ema_0 = start weights,   ema_{t+1} = d_t * ema_t + (1 - d_t) * w_{t+1},   d_t = min(decay, (1 + t) / (10 + t))

after every optimizer step t = 0, 1, ... Averaging the weights along the trajectory (Polyak & Juditsky 1992; "model
soups" and the weight averaging of recent embedding recipes) smooths out the last steps' noise; ``final/`` is
written from the average, and dev sets score the average (what would ship), not the trained weights. The warm-up
d_t (TensorFlow's ExponentialMovingAverage with num_updates; timm's ModelEmaV2 warm-up) lets the average forget the
start weights: without it, at decay 0.999 the start model is still 73% of the average after 316 steps; with it,
1e-17 (until step ~9,000 the window is about the last 10% of the steps). Only trainable parameters are averaged (frozen ones never change). The average is saved with every checkpoint
as ``ema.safetensors`` and restored on resume; d_t depends on the step alone, so a resumed run ends with the same
average.
"""

import contextlib
import math

import torch
from accelerate.utils import DistributedType

from .cli import UsageError
from .training import weights_sharded

EMA_STATE = "ema.safetensors"


def decay_at(decay, step):
    """d_t of the update after optimizer step ``step`` (0 for the first)."""
    return min(decay, (1 + step) / (10 + step))


def start_share(decay, steps):
    """The start weights' share of the average after ``steps`` updates: the product of every d_t."""
    return math.prod(decay_at(decay, t) for t in range(steps))


class WeightEMA:
    def __init__(self, accelerator, model, decay):
        if weights_sharded(accelerator):
            raise UsageError("--ema_decay: the weights are sharded (FSDP / ZeRO-3); average them with DDP or ZeRO-1/2, "
                             "or merge saved checkpoints with tools/merge_checkpoints.py")
        if accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.mixed_precision != "no":
            # the engine's module holds bf16/fp16 copies of the fp32 masters in the optimizer: an average of those
            # would start from a rounded start model and drift from the weights final/ exports
            raise UsageError(f"--ema_decay under DeepSpeed with mixed precision {accelerator.mixed_precision}: the "
                             "module's weights are rounded copies of the fp32 masters; average under DDP, or under "
                             "DeepSpeed without mixed precision")
        self.decay = decay
        self.parameters = {name: p for name, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
        self.average = {name: p.detach().float().clone() for name, p in self.parameters.items()}

    @torch.no_grad()
    def update(self, step):
        """Fold in the weights after optimizer step ``step`` (0 for the first)."""
        decay = decay_at(self.decay, step)
        for name, parameter in self.parameters.items():
            self.average[name].mul_(decay).add_(parameter.detach().float(), alpha=1 - decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self):
        """The average in the model's parameters for the block (to score what final/ would hold), the trained
        weights back after it."""
        trained = {name: parameter.detach().clone() for name, parameter in self.parameters.items()}
        try:
            for name, parameter in self.parameters.items():
                parameter.copy_(self.average[name])
            yield
        finally:
            for name, parameter in self.parameters.items():
                parameter.copy_(trained[name])

    def apply_to(self, state_dict):
        """``state_dict`` (the model's, for export) with the averaged weights in place of the trained ones."""
        return {key: self.average[key].to(device=value.device, dtype=value.dtype) if key in self.average else value
                for key, value in state_dict.items()}

    def checkpoint_files(self):
        return {EMA_STATE: {name: tensor.detach().cpu().contiguous() for name, tensor in self.average.items()}}

    def load_checkpoint_files(self, checkpoint):
        from pathlib import Path

        from safetensors.torch import load_file

        file = Path(checkpoint) / EMA_STATE
        if not file.is_file():
            raise UsageError(f"{checkpoint}: no {EMA_STATE}; it was saved without --ema_decay")
        saved = load_file(str(file))
        if saved.keys() != self.average.keys():
            raise UsageError(f"{file}: its weights are not those this run trains")
        for name, tensor in saved.items():
            self.average[name].copy_(tensor)


def scoring_weights(ema):
    """A context in which the model holds what final/ would hold: the average under --ema_decay, else as trained."""
    return ema.swapped_in() if ema is not None else contextlib.nullcontext()

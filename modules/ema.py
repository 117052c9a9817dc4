"""Exponential moving average of the trained weights (``--ema_decay``), kept in float32 beside the model.

    ema_0 = start weights,   ema_t = d * ema_{t-1} + (1 - d) * w_t      (after every optimizer step t)

Averaging the weights along the trajectory (Polyak & Juditsky 1992; "model soups" and the weight averaging of
recent embedding recipes) smooths out the last steps' noise; ``final/`` is written from the average. Only trainable
parameters are averaged (frozen ones never change). The average is saved with every checkpoint as
``ema.safetensors`` and restored on resume, so a resumed run ends with the same average.
"""

import torch
from accelerate.utils import DistributedType

from .cli import UsageError

EMA_STATE = "ema.safetensors"


class WeightEMA:
    def __init__(self, accelerator, model, decay):
        sharded = accelerator.distributed_type == DistributedType.FSDP or (
            accelerator.distributed_type == DistributedType.DEEPSPEED
            and accelerator.state.deepspeed_plugin.zero_stage == 3)
        if sharded:
            raise UsageError("--ema_decay: the weights are sharded (FSDP / ZeRO-3); average them with DDP or ZeRO-1/2, "
                             "or merge saved checkpoints with tools/merge_checkpoints.py")
        self.decay = decay
        self.parameters = {name: p for name, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
        self.average = {name: p.detach().float().clone() for name, p in self.parameters.items()}

    @torch.no_grad()
    def update(self):
        for name, parameter in self.parameters.items():
            self.average[name].mul_(self.decay).add_(parameter.detach().float(), alpha=1 - self.decay)

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

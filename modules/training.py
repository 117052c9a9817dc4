"""Pieces every training script shares: the Accelerator with its trackers, the optimizer."""

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, InitProcessGroupKwargs

from .cli import UsageError
from .model import name_the_device_for_deepspeed
from .progress import no_library_bars


def make_accelerator(output_dir, gradient_accumulation_steps=1, max_grad_norm=1.0, report_to=("tensorboard",),
                     timeout_minutes=30):
    """The run's Accelerator: trackers (``--report_to``) writing under output_dir; gloo for multi-process runs
    on CPU; collectives that wait ``timeout_minutes`` for a paused or dead process before the run fails.

    Under DeepSpeed, gradients are clipped inside the engine's step (``accelerator.clip_grad_norm_``
    does nothing there) at the config's ``gradient_clipping``, which accelerate turns from "auto"
    into 1.0: the config is given ``max_grad_norm`` here, before ``prepare`` builds the engine (0: no
    clipping, as everywhere else).
    """
    name_the_device_for_deepspeed()
    if not sys.stderr.isatty():
        no_library_bars()
    on_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    launched = "WORLD_SIZE" in os.environ  # by accelerate launch / torchrun: a process group is set up
    accelerator = Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        step_scheduler_with_optimizer=False,  # the scripts step the scheduler once per optimizer step
        log_with=trackers(report_to, output_dir),
        project_dir=output_dir,
        kwargs_handlers=[process_group_kwargs(on_cpu, timeout_minutes)] if launched else [],
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        configured = plugin.deepspeed_config.get("gradient_clipping", "auto")
        if configured != "auto" and float(configured) != max_grad_norm:
            raise UsageError(f"--max_grad_norm {max_grad_norm} but the DeepSpeed config sets gradient_clipping "
                             f"{configured}: set it to \"auto\" (the flag decides) or pass the same value")
        plugin.deepspeed_config["gradient_clipping"] = float(max_grad_norm)
    return accelerator


def weights_sharded(accelerator):
    """Whether no process holds the whole model (FSDP, DeepSpeed ZeRO-3)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP or (
        accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3)


def process_group_kwargs(on_cpu, timeout_minutes):
    """gloo on CPU (the device's own backend otherwise) and --timeout_minutes for every collective."""
    timeout = timedelta(minutes=timeout_minutes)
    return InitProcessGroupKwargs(backend="gloo", timeout=timeout) if on_cpu else InitProcessGroupKwargs(timeout=timeout)


def trackers(report_to, output_dir):
    """accelerate's ``log_with`` for ``--report_to``; a requested tracker that is not installed is refused (accelerate
    would drop it with a warning). mlflow and wandb keep their files in output_dir unless told otherwise."""
    from accelerate.tracking import get_available_trackers

    if list(report_to) == ["none"]:
        return None
    if list(report_to) == ["all"]:
        return "all"
    available = {str(tracker.value) for tracker in get_available_trackers()}
    missing = [name for name in report_to if name not in available]
    if missing:
        raise UsageError(f"--report_to {','.join(report_to)}: {', '.join(missing)} not installed "
                         f"(pip install {' '.join(missing)})")
    os.environ.setdefault("MLFLOW_TRACKING_URI", (Path(output_dir).resolve() / "mlruns").as_uri())
    os.environ.setdefault("WANDB_DIR", str(output_dir))
    return list(report_to)


def build_optimizer(model, lr, weight_decay, scaling_lr=None):
    """AdamW with no weight decay on biases and norm weights (the usual BERT recipe); the ScalingLayer's
    parameters train at ``scaling_lr`` when given (a new layer may want more than the backbone's lr).

    The fused kernel is several times faster per step than the default on CPU and GPU.
    """
    groups = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        scaling = scaling_lr is not None and name.startswith("scaling_layer.")
        key = (scaling, parameter.dim() < 2)
        groups.setdefault(key, {"params": [], "weight_decay": 0.0 if key[1] else weight_decay,
                                "lr": scaling_lr if scaling else lr})["params"].append(parameter)
    return torch.optim.AdamW(list(groups.values()), lr=lr, fused=True)


def make_scheduler(name, optimizer, warmup_steps, total_steps):
    """transformers' learning-rate schedule ``name`` (--lr_scheduler), stepped once per optimizer step."""
    from transformers import SchedulerType, get_scheduler

    names = [kind.value for kind in SchedulerType if kind.value != "reduce_lr_on_plateau"]  # that one needs metrics
    if name not in names:
        raise UsageError(f"--lr_scheduler {name!r}: choose one of {', '.join(names)}")
    return get_scheduler(name, optimizer, warmup_steps, total_steps)

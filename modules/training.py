"""Pieces every training script shares: the Accelerator, the output flags, the optimizer."""

import os

import torch
from accelerate import Accelerator, InitProcessGroupKwargs

from .cli import UsageError


def make_accelerator(output_dir, gradient_accumulation_steps=1, max_grad_norm=1.0):
    """The run's Accelerator: tensorboard logs in output_dir; gloo for multi-process runs on CPU.

    Under DeepSpeed, gradients are clipped inside the engine's step (``accelerator.clip_grad_norm_``
    does nothing there) at the config's ``gradient_clipping``, which accelerate turns from "auto"
    into 1.0: the config is given ``max_grad_norm`` here, before ``prepare`` builds the engine (0: no
    clipping, as everywhere else).
    """
    on_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    launched = "WORLD_SIZE" in os.environ  # by accelerate launch / torchrun: a process group is set up
    accelerator = Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        step_scheduler_with_optimizer=False,  # the scripts step the scheduler once per optimizer step
        log_with="tensorboard",
        project_dir=output_dir,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if on_cpu and launched else [],
    )
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        configured = plugin.deepspeed_config.get("gradient_clipping", "auto")
        if configured != "auto" and float(configured) != max_grad_norm:
            raise UsageError(f"--max_grad_norm {max_grad_norm} but the DeepSpeed config sets gradient_clipping "
                             f"{configured}: set it to \"auto\" (the flag decides) or pass the same value")
        plugin.deepspeed_config["gradient_clipping"] = float(max_grad_norm)
    return accelerator


def add_output_arguments(parser):
    """Output, logging, evaluation and checkpoint flags every training script has."""
    g = parser.add_argument_group("output")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--save_dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the final model's weights (training keeps float32 masters)")
    g.add_argument("--wise_ft_alpha", type=float, default=1.0,
                   help="final/ = alpha x trained + (1 - alpha) x start weights (WiSE-FT; 1: the trained weights)")
    g.add_argument("--log_every", type=int, default=10)
    g.add_argument("--save_every", type=int, default=0, help="checkpoint every N optimizer steps (0: only the final model)")
    g.add_argument("--save_total_limit", type=int, default=None)
    g.add_argument("--eval_sts_file", default=None, help="JSONL of text, text_pair, label: Spearman before/during/after")
    g.add_argument("--eval_every", type=int, default=0)
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint directory")


def check_output_arguments(parser, args):
    """Refuse output flags that make no sense (exit 2 with the flag named)."""
    if not 0 < args.wise_ft_alpha <= 1:
        parser.error(f"--wise_ft_alpha must be in (0, 1] (1: the trained weights alone), got {args.wise_ft_alpha}")


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

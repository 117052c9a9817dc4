"""What a run says before it trains (printed) and records of its setup (train_summary.json, the model card)."""

from accelerate.utils import DistributedType

from .run_options import shown_path
from .samplers import dataset_shares


def finetune_setup(args, accelerator, datasets, batch_sizes, sampler, total_steps, warmup_steps, loss_weights):
    """A fine-tuning run's setup as JSON: datasets with their shares, steps, batches per kind, false-negative masks and
    weights, teacher, precision, weight averaging, checkpoints, outputs."""
    processes = accelerator.num_processes
    shares = dataset_shares(datasets, sampler, batch_sizes)
    for share in shares:
        share["global_batch_size"] = share["batch_size"] * (1 if args.cbb and share["kind"] == "retri_contrast"
                                                            else processes)
    batches_per_epoch = len(sampler) // args.grad_accum
    return {"datasets": shares, "total_steps": total_steps, "warmup_steps": warmup_steps,
            "epochs": total_steps / batches_per_epoch if batches_per_epoch else None,
            "steps_per_epoch": batches_per_epoch, "grad_accum": args.grad_accum, "processes": processes,
            "loss_weights": loss_weights, "false_negatives": _false_negatives(args), **_teacher(args),
            **_common(args, accelerator)}


def pretrain_setup(args, accelerator, sources):
    """A pretraining run's setup as JSON: sources with their weights and expected shares, steps, batch, precision,
    weight averaging, checkpoints, outputs."""
    total_weight = sum(source.weight for source in sources)
    return {"sources": [{"name": s.name, "path": str(s.path), "source": s.source, "weight": s.weight,
                         "share": s.weight / total_weight, "files": len(s.files)} for s in sources],
            "total_steps": args.max_steps, "warmup_steps": args.warmup_steps,
            "batch_size": args.batch_size, "global_batch_size": args.batch_size * accelerator.num_processes,
            "processes": accelerator.num_processes, **_common(args, accelerator)}


def _common(args, accelerator):
    return {"distributed": _distributed(accelerator), "mixed_precision": accelerator.mixed_precision,
            "master_weights": args.torch_dtype, "max_grad_norm": args.max_grad_norm,
            "ema_decay": args.ema_decay or None, "wise_ft_alpha": args.wise_ft_alpha, "save_dtype": args.save_dtype,
            "checkpoints": {"every": args.save_every or None, "best": args.metric_for_best if args.keep_best else None,
                            "total_limit": args.save_total_limit},
            "output_dir": str(args.output_dir), "trackers": args.report_to}


def _false_negatives(args):
    """The masks and hardness weights of the contrastive kinds, by flag (off: False / None / 0)."""
    return {"mask_duplicates": args.mask_duplicates, "mask_margin": args.mask_margin,
            "mask_relative": args.mask_relative, "hard_negative_alpha": args.hard_negative_alpha,
            "in_batch_alpha": args.in_batch_alpha}


def _teacher(args):
    """The teacher as the model card names it (an absolute path by its last part), and the distillation weight."""
    temperature = args.teacher_temperature or args.retri_temperature
    return {"teacher_model": shown_path(args.teacher_model, args.output_dir) if args.teacher_model else None,
            "distill_weight": args.distill_weight, "teacher_temperature": temperature if args.distill_weight else None}


def _distributed(accelerator):
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    return accelerator.distributed_type.value.replace("MULTI_", "DDP on ").replace("NO", "single process")


def startup_lines(setup):
    """The start-up summary: datasets or sources, steps, batches, clipping, weight averaging, false-negative masks
    and teacher (fine-tuning), processes, precision, checkpoints and where outputs go."""
    lines = []
    for d in setup.get("datasets", []):
        lines.append(f"  {d['name']} ({d['kind']}, {d['source']}): {d['records']} records, batch {d['batch_size']} "
                     f"per process / {d['global_batch_size']} global, {d['batches_per_epoch']} batches an epoch, "
                     f"{100 * d['share']:.1f}% {d['share_of']}")
    for s in setup.get("sources", []):
        lines.append(f"  {s['name']} ({s['source']}): weight {s['weight']:g} -> {100 * s['share']:.1f}% of the steps "
                     f"expected, {s['files']} file(s)")
    steps = f"steps: {setup['total_steps']}, warmup {setup['warmup_steps']}"
    if "steps_per_epoch" in setup:
        steps += (f", {setup['steps_per_epoch']} steps an epoch ({setup['epochs']:.2f} epochs), gradient "
                  f"accumulation {setup['grad_accum']}")
    else:
        steps += f", batch {setup['batch_size']} pairs per process / {setup['global_batch_size']} global"
    header = "datasets:" if "datasets" in setup else "sources (a step's batch comes from one, drawn by weight):"
    return [header, *lines, steps, *_training_lines(setup),
            f"processes: {setup['processes']} ({setup['distributed']}); master weights {setup['master_weights']}, "
            f"mixed precision {setup['mixed_precision']}, final/ saved as {setup['save_dtype']}",
            f"outputs: {setup['output_dir']}/final, {_checkpoints(setup['checkpoints'])}, "
            f"trackers: {', '.join(setup['trackers'])}"]


def _training_lines(setup):
    """Clipping and weight averaging; fine-tuning's false-negative masks and weights, and its teacher."""
    clipping = f"at norm {setup['max_grad_norm']:g}" if setup["max_grad_norm"] > 0 else "off"
    ema = f"EMA decay {setup['ema_decay']:g} (final/ from the average)" if setup["ema_decay"] else "EMA off"
    alpha = setup["wise_ft_alpha"]
    wise = (f"WiSE-FT alpha {alpha:g} (final/ = {alpha:g} x trained + {1 - alpha:g} x start)" if alpha < 1
            else "WiSE-FT off (alpha 1)")
    lines = [f"gradient clipping {clipping}; {ema}; {wise}"]
    if "false_negatives" in setup:
        flags = setup["false_negatives"]
        masks = ["duplicates"] if flags["mask_duplicates"] else []
        masks += [f"{name} {flags[f'mask_{name}']:g}" for name in ("margin", "relative")
                  if flags[f"mask_{name}"] is not None]
        weights = [f"{name} alpha {flags[flag]:g}" for name, flag in (("hard negatives", "hard_negative_alpha"),
                                                                     ("in-batch", "in_batch_alpha")) if flags[flag]]
        lines.append(f"false negatives: masks {', '.join(masks) or 'off'}; hardness weights "
                     f"{', '.join(weights) or 'off'}")
        teacher = setup["teacher_model"] or ("the records' pos_scores / neg_scores" if setup["distill_weight"]
                                             else "none")
        if setup["distill_weight"]:
            teacher += (f", distillation weight {setup['distill_weight']:g} (teacher temperature "
                        f"{setup['teacher_temperature']:g})")
        elif setup["teacher_model"]:
            teacher += ", no score distillation (--distill_weight 0)"
        lines.append(f"teacher: {teacher}")
    return lines


def _checkpoints(checkpoints):
    """Which checkpoints the run writes, and which it keeps."""
    every, best, limit = checkpoints["every"], checkpoints["best"], checkpoints["total_limit"]
    written = ([f"every {every} steps"] if every else []) + ([f"at each new best {best} (--keep_best)"] if best else [])
    if not written:
        return "no checkpoints (--save_every 0)"
    kept = f", the newest {limit} kept" + (" and the best" if best else "") if limit else ""
    return f"a checkpoint {' and '.join(written)}{kept}"

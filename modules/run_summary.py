"""What a run says before it trains (printed) and records of its setup (train_summary.json, the model card)."""

from accelerate.utils import DistributedType

from .data import dataset_shares


def finetune_setup(args, accelerator, datasets, batch_sizes, sampler, total_steps, warmup_steps, loss_weights):
    """A fine-tuning run's setup as JSON: datasets with their shares, steps, batches per kind, precision, outputs."""
    processes = accelerator.num_processes
    shares = dataset_shares(datasets, sampler, batch_sizes)
    for share in shares:
        share["global_batch_size"] = share["batch_size"] * (1 if args.cbb and share["kind"] == "retri_contrast"
                                                            else processes)
    batches_per_epoch = len(sampler) // args.grad_accum
    return {"datasets": shares, "total_steps": total_steps, "warmup_steps": warmup_steps,
            "epochs": total_steps / batches_per_epoch if batches_per_epoch else None,
            "steps_per_epoch": batches_per_epoch, "grad_accum": args.grad_accum, "processes": processes,
            "loss_weights": loss_weights, **_common(args, accelerator)}


def pretrain_setup(args, accelerator, sources):
    """A pretraining run's setup as JSON: sources with their weights and expected shares, steps, batch, precision."""
    total_weight = sum(source.weight for source in sources)
    return {"sources": [{"name": s.name, "path": str(s.path), "source": s.source, "weight": s.weight,
                         "share": s.weight / total_weight, "files": len(s.files)} for s in sources],
            "total_steps": args.max_steps, "warmup_steps": args.warmup_steps,
            "batch_size": args.batch_size, "global_batch_size": args.batch_size * accelerator.num_processes,
            "processes": accelerator.num_processes, **_common(args, accelerator)}


def _common(args, accelerator):
    return {"distributed": _distributed(accelerator), "mixed_precision": accelerator.mixed_precision,
            "master_weights": args.torch_dtype, "save_dtype": args.save_dtype, "output_dir": str(args.output_dir),
            "trackers": args.report_to}


def _distributed(accelerator):
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    return accelerator.distributed_type.value.replace("MULTI_", "DDP on ").replace("NO", "single process")


def startup_lines(setup, args):
    """The start-up summary: datasets or sources, steps, batches, processes, precision and where outputs go."""
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
    saves = f"a checkpoint every {args.save_every} steps" if args.save_every else "no checkpoints (--save_every 0)"
    header = "datasets:" if "datasets" in setup else "sources (a step's batch comes from one, drawn by weight):"
    return [header, *lines, steps,
            f"processes: {setup['processes']} ({setup['distributed']}); master weights {setup['master_weights']}, "
            f"mixed precision {setup['mixed_precision']}, final/ saved as {setup['save_dtype']}",
            f"outputs: {setup['output_dir']}/final, {saves}, trackers: {', '.join(setup['trackers'])}"]

"""What a run leaves behind: its config, the final model, the training summary and the dev scores."""

import json
import shutil
import sys
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from .averaging import interpolate_with_start, start_state_dict
from .checkpoints import written_whole
from .card_weights import weights_entry, weights_text
from .json_files import write_json
from .model_card import write_model_card
from .nonfinite import check_finite_weights
from .run_lock import run_contents
from .training import weights_sharded

SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_state_dict(accelerator, model):
    """The model's full state dict for export (the main process's; None elsewhere); every process calls it.

    Under FSDP / ZeRO-3 the shards are gathered; under DeepSpeed the trained weights come from the
    optimizer's fp32 master copy, not from the engine's bf16/fp16 working copy.
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return _deepspeed_fp32_state_dict(accelerator, model)
    return accelerator.get_state_dict(model)


def _deepspeed_fp32_state_dict(accelerator, model):
    """Full state dict (CPU) with every trainable parameter from DeepSpeed's fp32 master weights.

    Collective: ZeRO-1/2 all-reduce each parameter's fragments, ZeRO-3 all-gathers its partitions, so
    every process walks the parameters in the same order; the main process keeps the result. Frozen
    parameters have no master copy and come from the module (gathered under ZeRO-3); buffers are never
    cast or partitioned by DeepSpeed.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = accelerator.unwrap_model(model)
    keep = accelerator.is_main_process
    state_dict, seen = {}, {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:  # tied weights
            state_dict[name] = state_dict.get(seen[id(parameter)])
            continue
        seen[id(parameter)] = name
        full = safe_get_full_fp32_param(parameter) if parameter.requires_grad else None
        if full is None and hasattr(parameter, "ds_id"):  # a frozen ZeRO-3 partition
            with deepspeed.zero.GatheredParameters([parameter]):
                full = parameter.detach().clone() if keep else None
        elif full is None:
            full = parameter.detach()
        if keep:
            state_dict[name] = full.to("cpu", copy=True)
    if not keep:
        return None
    keys = module.state_dict().keys()  # ZeRO-3: the right keys around empty partitions
    state_dict.update({name: buffer.detach().to("cpu", copy=True)
                       for name, buffer in module.named_buffers(remove_duplicate=False) if name in keys})
    return {key: state_dict[key] for key in keys}


def finish_run(accelerator, model, args, summary, eval_history=None, ema=None, final_step=None, score_final=None,
               score_variants=None):
    """Write output_dir/final (a sentence-transformers directory, weights in ``--save_dtype``, from the weight average
    ``ema`` when given, averaged with the start model when ``--wise_ft_alpha`` < 1) with its model card,
    train_summary.json (with pairs/s and ``final_weights``: what final/ holds) and, when there was a dev set,
    eval_results.json (with the summary's ``best`` evaluation); then end the trackers.

    ``final_step``: the step whose weights the model holds now (the last, or the best checkpoint's). With dev sets
    and WiSE-FT, final/'s weights differ from every scored step's: ``score_final(module)`` scores them on the main
    process (``final_scores``; not under sharded weights, which no single process holds). ``score_variants(module)``
    scores final/ at every --eval_dims size and --eval_quantize precision the same way (``final_variants``).
    """
    state_dict = export_state_dict(accelerator, model)
    if accelerator.is_main_process:
        if ema is not None:
            state_dict = ema.apply_to(state_dict)
        state_dict, kept = final_weights(state_dict, args)
        summary["final_weights"] = shipped_weights(args, summary, final_step, ema)
        print(f"final/ holds {weights_text(summary['final_weights'])}"
              + (f"; as trained: {', '.join(kept)}" if kept else ""))
        check_finite_weights(state_dict, "final/")
        if score_final is not None and args.wise_ft_alpha < 1 and not weights_sharded(accelerator):
            summary["final_scores"] = _score(accelerator.unwrap_model(model), state_dict, score_final)
        if score_variants is not None:
            summary["final_variants"] = _score_variants(accelerator, model, state_dict, score_variants)
        final_dir = Path(args.output_dir) / "final"
        with written_whole(final_dir) as partial:  # a kill mid-save leaves final.tmp, never a half final/
            accelerator.unwrap_model(model).save_pretrained(partial, state_dict=state_dict)
            write_model_card(partial, args, summary, eval_history)  # over sentence-transformers' blank card
        write_json(Path(args.output_dir) / "train_summary.json", summary)  # a NaN dev score as null, named
        print(f"saved {final_dir}")
        if eval_history:
            _write_eval_results(args, eval_history, {key: summary[key] for key in ("best", "final_scores")
                                                     if key in summary})
    accelerator.end_training()


def shipped_weights(args, summary, step, ema=None):
    """train_summary.json's ``final_weights`` for final/ holding the weights of ``step``."""
    best = summary.get("best") or {}
    chosen = (f"best {args.metric_for_best} (--final_is_best)" if args.final_is_best and best.get("step") == step
              else "last step")
    return weights_entry(step, chosen, ema.decay if ema is not None else 0, args.wise_ft_alpha)


def _score(module, state_dict, score):
    """``score(module)`` with final/'s weights loaded into ``module`` (whose own weights are no longer needed)."""
    module.load_state_dict(state_dict)
    metrics = score(module)
    print("final/ (as saved): dev " + ", ".join(f"{name} {value:.2f}" for name, value in metrics.items()), flush=True)
    return metrics


def _score_variants(accelerator, model, state_dict, score):
    """final/ scored at each size and precision (``score``), a line each; [] under sharded weights, said once."""
    if weights_sharded(accelerator):
        print("--eval_dims / --eval_quantize: final/ not scored here (sharded weights); score it with "
              "eval/dev_scores.py --dims ... --quantize ...", flush=True)
        return []
    module = accelerator.unwrap_model(model)
    module.load_state_dict(state_dict)
    rows = score(module)
    for row in rows:
        print(f"final/ at dim {row['dim']} {row['quantization']}: dev "
              + ", ".join(f"{name} {value:.2f}" for name, value in row["scores"].items()), flush=True)
    return rows


def final_weights(state_dict, args, wise_ft=True):
    """The weights final/ holds for the trained ``state_dict``: averaged with the start model when ``--wise_ft_alpha``
    < 1 (unless ``wise_ft`` is False), in ``--save_dtype``. Returns them and the keys kept as trained (those the
    start model lacks, e.g. a new ScalingLayer)."""
    kept = []
    if wise_ft and args.wise_ft_alpha < 1:
        state_dict, kept = interpolate_with_start(state_dict, start_state_dict(args.model_name_or_path),
                                                  args.wise_ft_alpha)
    dtype = SAVE_DTYPES[args.save_dtype]
    return {key: value.to(dtype) if value.is_floating_point() else value for key, value in state_dict.items()}, kept


def write_run_config(output_dir, args, copy_files=()):
    """Record the command line, every argument and the data lists of a run in its output dir; the first thing
    a run writes there, after emptying it under ``--overwrite_output_dir`` (all but the run's lock file, which
    the run holds: modules/run_lock.py)."""
    output_dir = Path(output_dir)
    # read before emptying: a meta list may lie in output_dir itself (a resume with the run's saved copy)
    copies = {Path(path).name: Path(path).read_bytes() for path in copy_files if path}
    if args.overwrite_output_dir and output_dir.is_dir():
        for path in run_contents(output_dir):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    config = {"command": sys.argv, "args": {k: v for k, v in vars(args).items()}}
    (output_dir / "run_config.json").write_text(json.dumps(config, indent=2, default=str))
    for name, content in copies.items():
        (output_dir / name).write_bytes(content)


def _write_eval_results(args, history, best):
    """eval_results.json with every dev metric at each evaluated step (and the best step), and a line a metric."""
    results = {"eval_file": args.eval_sts_file, "eval_dirs": args.eval_dir, "metrics_by_step": history, **best}
    if args.eval_sts_file:  # the layout of earlier runs
        results["sts_spearman_by_step"] = {step: metrics["sts_spearman"] for step, metrics in history.items()}
    write_json(Path(args.output_dir) / "eval_results.json", results)  # a NaN metric as null, named
    first, last = min(history), max(history)
    for name in history[last]:
        label = "dev Spearman" if name == "sts_spearman" else f"dev {name}"
        print(f"{label}: step {first} {history[first].get(name, float('nan')):.2f} -> step {last} "
              f"{history[last][name]:.2f}")

"""Flags and choices the training scripts share, and the ranges that keep their math defined. Imports nothing heavy, so ``--help`` and flag errors answer
at once; the modules that use a choice (model.py, position.py, llm.py) take its names from here."""

import os
from itertools import chain
from pathlib import Path

from .cli import DataError, UsageError
from .meta_list import META_LINE, iter_meta_lines
from .records import iter_raw_records
from .run_lock import lock_output_dir, main_process, run_contents

DTYPE_NAMES = ("float32", "bfloat16", "float16", "auto")  # --torch_dtype; "auto": the checkpoint's own dtype
SAVE_DTYPE_NAMES = ("float32", "bfloat16", "float16")
TORCH_DTYPE_HELP = ("dtype of the trained (master) weights, whatever the checkpoint stores; bf16/fp16 compute comes from "
                    "accelerate's --mixed_precision. bfloat16 halves the memory of a frozen LoRA base; 'auto': the "
                    "checkpoint's own dtype")
PE_METHODS = ("hierarchical", "tile")
MERGE_METHODS = ("mean", "slerp")  # tools/merge_checkpoints.py
ROPE_SCALINGS = ("linear", "dynamic", "yarn")
DEFAULT_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")
# --sts_loss: the objectives of the cosent kind (modules/sts_losses.py) and how a model card names them
STS_LOSSES = {"cosent": "CoSENT", "pearson": "Pearson (1 - r, no temperature)",
              "rank_kl": "rank KL (tie-aware rank targets)", "pro": "PRO (listwise)",
              "angle": "AnglE (CoSENT on angle similarity)"}
STS_LOSS_HELP = ("objective of cosent-kind batches: cosent | pearson (1 - Pearson r, no temperature) | rank_kl "
                 "(KL to tie-aware rank targets, CoDiEmb) | pro (listwise Preference Ranking Optimization, CoDiEmb) | "
                 "angle (AnglE: CoSENT on the angle similarity); a comma list of NAME[:WEIGHT] trains their weighted "
                 "sum (CoDiEmb: pearson:2,pro:0.5,rank_kl:5). Each ranks or correlates the global batch's pairs; "
                 "--cosent_temperature is the temperature of each (modules/sts_losses.py)")


def add_output_arguments(parser):
    """Output, logging, evaluation and checkpoint flags every training script has."""
    g = parser.add_argument_group("output")
    g.add_argument("--output_dir", required=True, help="must be empty or new, unless resuming or overwriting")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="delete what a non-empty --output_dir holds (an earlier run) before this run writes to it")
    g.add_argument("--save_dtype", choices=SAVE_DTYPE_NAMES, default="float32",
                   help="dtype of the final model's weights (training keeps float32 masters)")
    g.add_argument("--wise_ft_alpha", type=float, default=1.0,
                   help="final/ = alpha x trained + (1 - alpha) x start weights (WiSE-FT; 1: the trained weights)")
    g.add_argument("--ema_decay", type=float, default=0,
                   help="keep an exponential moving average of the weights (e.g. 0.999) and write final/ from it; "
                        "saved with every checkpoint (0: off)")
    g.add_argument("--log_every", type=int, default=10,
                   help="optimizer steps between logged metrics (a plain log line when stderr is not a terminal)")
    g.add_argument("--peak_tflops", type=float, default=None,
                   help="peak TFLOP/s of one device, for the logged MFU (default: the bf16 datasheet peak of a known "
                        "GPU, modules/throughput.py; none on a CPU)")
    g.add_argument("--report_to", default="tensorboard",
                   help=f"comma list of trackers ({', '.join(TRACKERS)}), 'all' (those installed) or 'none'; they "
                        "write under --output_dir (wandb offline: WANDB_MODE=offline)")
    g.add_argument("--save_every", type=int, default=0, help="checkpoint every N optimizer steps (0: only the final model)")
    g.add_argument("--save_total_limit", type=int, default=None, help="checkpoints kept (default: all)")
    g.add_argument("--eval_sts_file", default=None, help="JSONL of text, text_pair, label: Spearman before/during/after")
    g.add_argument("--eval_dir", action="append", default=None,
                   help="a local task folder (task.json: STS, PairClassification or Retrieval; see eval/README.md) "
                        "scored with the STS file; repeatable")
    g.add_argument("--eval_every", type=int, default=0, help="optimizer steps between evaluations (0: start and end)")
    g.add_argument("--eval_dims", default=None,
                   help="comma list of Matryoshka dims at which final/ is also scored on the dev sets, its full size "
                        "added (default: --mrl_dims where the script has it; '' for none); in train_summary.json and "
                        "the card's dims x precision table")
    g.add_argument("--eval_quantize", default="",
                   help="comma list of embedding quantizations final/ is also scored in on the dev sets, at every "
                        "--eval_dims size: binary (sign bits, Hamming), int8 (needs --eval_calibration)")
    g.add_argument("--eval_calibration", default=None,
                   help="data file (JSONL, e.g. a training file) whose texts set int8's per-dimension ranges for "
                        "--eval_quantize int8; never a dev set")
    g.add_argument("--metric_for_best", default=None,
                   help="a logged dev metric, e.g. CranfieldLocal/ndcg_at_10 or sts_spearman (higher is better)")
    g.add_argument("--keep_best", action="store_true",
                   help="save a checkpoint at every new best --metric_for_best and keep it (save_total_limit spares it)")
    g.add_argument("--final_is_best", action="store_true",
                   help="final/ from the best checkpoint instead of the last step (implies --keep_best)")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest' (the newest checkpoint in --output_dir; none: start) or a checkpoint directory")
    g.add_argument("--timeout_minutes", type=float, default=30,
                   help="how long processes wait for each other in a collective before the run fails (a paused or "
                        "dead process)")


# The ranges of numeric flags (any script that has the flag): outside them the loss, the schedule or the
# checkpoints are undefined or empty, and a run would train NaN or nothing and still end "successfully".
AT_LEAST_ONE = ("retri_batch_size", "cls_batch_size", "cosent_batch_size", "batch_size", "grad_accum", "epochs",
                "save_total_limit", "query_max_len", "passage_max_len", "pair_max_len", "max_length", "scaling_dim",
                "dhnm_interval", "shuffle_chunk", "block_mb", "loss_chunk_size", "lora_r",
                "log_every", "parallel_batch_size")
AT_LEAST_ZERO = ("lr", "scaling_lr", "weight_decay", "max_grad_norm", "retri_weight", "cls_weight", "cosent_weight",
                 "cbb_beta", "save_every", "eval_every", "num_workers", "retri_negatives", "dhnm_skip", "lora_dropout",
                 "mini_batch_size", "mini_batch_tokens", "split_tokens", "warmup_steps", "peak_tflops", "spread_out_weight",
                 "distill_weight", "parallel_weight")
ABOVE_ZERO = ("retri_temperature", "cls_temperature", "cosent_temperature", "temperature", "timeout_minutes",
              "dhnm_ratio", "dhnm_max_abs", "lora_alpha", "rope_factor", "mask_relative",
              "teacher_temperature")
FRACTIONS = ("warmup_ratio",)


def sts_loss_terms(value):
    """[(name, weight)] of an --sts_loss value, a comma list of NAME or NAME:WEIGHT (weight 1; finite, > 0; each
    name once); ValueError naming what is wrong."""
    import math

    terms = {}
    for part in value.split(","):
        name, colon, weight = part.strip().partition(":")
        if name not in STS_LOSSES:
            raise ValueError(f"unknown STS loss {name!r}: give one of {', '.join(STS_LOSSES)}, or a comma list of "
                             "NAME[:WEIGHT] to sum")
        if name in terms:
            raise ValueError(f"{value}: {name} is named twice")
        try:
            terms[name] = float(weight) if colon else 1.0
        except ValueError:
            raise ValueError(f"{part.strip()}: the weight must be a number") from None
        if not (math.isfinite(terms[name]) and terms[name] > 0):
            raise ValueError(f"{part.strip()}: the weight must be > 0 (leave the loss out instead)")
    return list(terms.items())


def sts_loss_flag(value):
    """argparse type of --sts_loss: the value as given, once ``sts_loss_terms`` accepts it (one-line error, exit 2)."""
    import argparse

    try:
        sts_loss_terms(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def sts_loss_description(value):
    """How a model card names an --sts_loss value: 'CoSENT', or '2 x Pearson (1 - r) + 0.5 x PRO (listwise)'."""
    return " + ".join(STS_LOSSES[name] if weight == 1 else f"{weight:g} x {STS_LOSSES[name]}"
                      for name, weight in sts_loss_terms(value))


def check_ranges(parser, args):
    """Refuse a numeric flag outside its range (NaN and infinity included), and flag lists that give the loss
    no weight: one line naming the flag, exit 2, before anything is loaded."""
    import math

    def given(name):
        value = getattr(args, name, None)
        return value is not None and not isinstance(value, bool)

    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            parser.error(f"--{name} must be a finite number, got {value}")
    for names, holds, wanted in ((AT_LEAST_ONE, lambda v: v >= 1, ">= 1"), (AT_LEAST_ZERO, lambda v: v >= 0, ">= 0"),
                                 (ABOVE_ZERO, lambda v: v > 0, "> 0"), (FRACTIONS, lambda v: 0 <= v <= 1, "in [0, 1]")):
        for name in filter(given, names):
            value = getattr(args, name)
            if not (math.isfinite(value) and holds(value)):
                parser.error(f"--{name} must be {wanted}, got {value}")
    if not 0 <= args.ema_decay < 1:
        parser.error(f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    task_weights = [getattr(args, f"{kind}_weight", None) for kind in ("retri", "cls", "cosent")]
    if None not in task_weights and not any(task_weights):
        parser.error("the loss weights are all 0 (--retri_weight, --cls_weight, --cosent_weight): nothing would train")
    if getattr(args, "mrl_dims", None) is not None:
        check_matryoshka_flags(parser, args.mrl_dims, args.mrl_weights)


def check_matryoshka_flags(parser, dims, weights):
    """--mrl_dims ('piccolo' or positive integers) and --mrl_weights (one per dim, >= 0, not all 0); that the dims
    fit the model's output is checked once it is loaded (modules.matryoshka.matryoshka_from_flags)."""
    import math

    if dims and dims != "piccolo":
        try:
            values = [int(d) for d in dims.split(",")]
        except ValueError:
            parser.error(f"--mrl_dims {dims}: expected 'piccolo' or a comma list of integers")
        if min(values) < 1:
            parser.error(f"--mrl_dims {dims}: every dim must be >= 1")
    if weights and not dims:
        parser.error("--mrl_weights needs --mrl_dims")
    if weights:
        try:
            values = [float(w) for w in weights.split(",")]
        except ValueError:
            parser.error(f"--mrl_weights {weights}: expected a comma list of numbers")
        if not all(math.isfinite(w) and w >= 0 for w in values) or not any(values):
            parser.error(f"--mrl_weights {weights}: weights must be >= 0 and not all 0")


def check_output_arguments(parser, args):
    """Refuse output flags that make no sense, an --output_dir holding another run, and an --overwrite_output_dir
    that would delete an input of the run (exit 2, flag named); settle what one flag implies for another
    (--padding_free: no length buckets, every forward is its real tokens). The run's lock on the dir is taken
    after parsing, by ``claim_output_dir``."""
    if getattr(args, "padding_free", False):
        args.length_buckets = 1
    check_compile_flags(parser, args)
    if not 0 < args.wise_ft_alpha <= 1:
        parser.error(f"--wise_ft_alpha must be in (0, 1] (1: the trained weights alone), got {args.wise_ft_alpha}")
    if (args.keep_best or args.final_is_best) and not args.metric_for_best:
        parser.error("--keep_best / --final_is_best need --metric_for_best")
    if args.metric_for_best and not (args.eval_every > 0 and (args.eval_sts_file or args.eval_dir)):
        parser.error("--metric_for_best needs dev data (--eval_dir / --eval_sts_file) and --eval_every N")
    args.keep_best = args.keep_best or args.final_is_best
    check_variant_flags(parser, args)
    check_ranges(parser, args)
    trackers = [t.strip() for t in args.report_to.split(",") if t.strip()]
    unknown = [t for t in trackers if t not in (*TRACKERS, "all", "none")]
    if unknown or not trackers or (len(trackers) > 1 and {"all", "none"} & set(trackers)):
        parser.error(f"--report_to {args.report_to!r}: give a comma list of {', '.join(TRACKERS)}, or all, or none")
    args.report_to = trackers
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        parser.error(f"--output_dir {output_dir} is a file")
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        parser.error("--overwrite_output_dir would delete what --resume_from_checkpoint resumes: give one of them")
    refusal = used_output_dir(args) or deleted_input(args)
    if refusal:
        parser.error(refusal)


def claim_output_dir(args):
    """Take the run's lock on --output_dir (modules/run_lock.py) before anything there is deleted or written, and
    check again under it that the dir is free: a run that ended after this one's flags were checked has left its
    files there. Only a run's main process locks (None elsewhere); the run holds the lock while the returned
    object is referenced (the local of its ``main``) and until its process ends."""
    if not main_process():
        return None
    lock = lock_output_dir(args.output_dir)
    refusal = used_output_dir(args)
    if refusal:
        raise UsageError(refusal)
    return lock


def used_output_dir(args):
    """The refusal of an --output_dir that holds another run's files when this run neither resumes nor
    overwrites (None otherwise). It suggests --overwrite_output_dir unless a flag names an input of this run
    inside the dir (the datasets are read only when that flag is given: deleted_input)."""
    output_dir = Path(args.output_dir)
    held = [path.name for path in run_contents(output_dir)] if output_dir.is_dir() else []
    if not held or args.resume_from_checkpoint or args.overwrite_output_dir:
        return None
    shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
    found = input_inside(output_dir, flag_inputs(args))
    resumable = any(name.startswith("checkpoint-") for name in held)
    resume = "continue its run with --resume_from_checkpoint latest, " if resumable else ""
    replace = "" if found else "replace it with --overwrite_output_dir, "
    what = ("" if resumable else ": a finished run (final/, no checkpoint to resume)" if "final" in held else
            ": no checkpoint or final model (a run that stopped before saving one, or other files), nothing to resume")
    inside = f" and holds {found}, an input of this run" if found else ""
    return f"--output_dir {output_dir} is not empty ({shown}){what}{inside}: {resume}{replace}or choose another directory"


def deleted_input(args):
    """The refusal of an --overwrite_output_dir that would delete an input of this run with the dir's content: a
    file or folder a flag names, a dataset of the meta list, a corpus its mined records point into (None if none)."""
    output_dir = Path(args.output_dir)
    if not (args.overwrite_output_dir and output_dir.is_dir() and run_contents(output_dir)):
        return None
    found = input_inside(output_dir, chain(flag_inputs(args), data_inputs(args)))
    return found and (f"--overwrite_output_dir would delete {found}, an input of this run, with the rest of "
                      f"--output_dir {output_dir}: move it out of that directory or choose another --output_dir")


def check_variant_flags(parser, args):
    """--eval_dims (default: --mrl_dims unless 'piccolo'), --eval_quantize and --eval_calibration, checked; the dims
    are checked against the model's size when it loads (``modules.model_selection.DevRun``)."""
    from .quantization import comma_list, parse_quantizations

    given = args.eval_dims is not None
    try:
        dims = [int(dim) for dim in comma_list(args.eval_dims)] if given else []
    except ValueError:
        parser.error(f"--eval_dims must be a comma list of integers, got {args.eval_dims!r}")
    if not given:  # --mrl_dims, checked on its own (check_matryoshka_flags)
        mrl = getattr(args, "mrl_dims", "") or ""
        args.eval_dims = "" if mrl == "piccolo" else mrl
    try:
        parse_quantizations(args.eval_quantize, args.eval_calibration, "--eval_quantize")
    except UsageError as error:
        parser.error(str(error).replace("--calibration", "--eval_calibration"))
    if any(dim < 1 for dim in dims):
        parser.error(f"--eval_dims {args.eval_dims}: every dim must be >= 1")
    if args.eval_calibration and "int8" not in comma_list(args.eval_quantize):
        parser.error("--eval_calibration calibrates --eval_quantize int8 only")
    if args.eval_calibration and not Path(args.eval_calibration).is_file():
        parser.error(f"--eval_calibration {args.eval_calibration}: no such file")
    if ((given and dims) or args.eval_quantize) and not (args.eval_sts_file or args.eval_dir):
        parser.error("--eval_dims / --eval_quantize score final/ on the dev sets: give --eval_dir or --eval_sts_file")


# The files and folders a run reads, as the scripts that have the flag name them.
INPUT_FLAGS = ("meta_list", "model_name_or_path", "teacher_model", "eval_sts_file", "eval_dir", "query_prefix_file",
               "task_instructions", "eval_calibration")


def flag_inputs(args):
    """(description, path) of each file or folder a flag names for the run to read; one not on disk cannot be
    deleted (a model name that is not a path is a hub id)."""
    for name in INPUT_FLAGS:
        value = getattr(args, name, None)
        for path in value if isinstance(value, list) else [value]:
            if path and os.path.lexists(path):
                yield f"--{name} {path}", path


def data_inputs(args):
    """(description, path) of each dataset of --meta_list and, where the script reads mined candidates (the
    fine-tuning scripts, which have --dhnm), of each corpus its records point into; every record is read, as a
    merged file may point into several. A meta list or dataset that cannot be read ends the list: the run stops
    on it when it loads its data, before anything is deleted."""
    try:
        for where, root, fields in iter_meta_lines(args.meta_list, args.root_dir, META_LINE):
            dataset = root / fields[0]  # an absolute path stays itself
            yield f"dataset {dataset} ({where}) of --meta_list", dataset
            if hasattr(args, "dhnm"):
                for corpus in referenced_corpora(dataset):
                    yield f"corpus {corpus} (of the mined records of {dataset}, --meta_list)", corpus
    except DataError:
        return


def referenced_corpora(dataset):
    """The corpus files the mined records of ``dataset`` point into (relative to its folder, as the loader reads
    them), sorted; invalid JSON lines are skipped here (the loader reports them)."""
    corpora = {dataset.parent / record["corpus"] for _, record in iter_raw_records(dataset, lambda error: None)
               if isinstance(record, dict) and isinstance(record.get("corpus"), str)}
    return sorted(corpora)


def input_inside(directory, inputs):
    """The description of the first of ``inputs`` that lies in ``directory``, by its path as given or its real
    path: emptying the directory deletes it, or the way to it."""
    from .output_paths import overlap

    return next((what for what, path in inputs if overlap(directory, path) in ("is", "contains")), None)


def add_bucket_arguments(group, gradcache=False):
    """--length_buckets and --split_tokens (modules/forward.embed); with ``gradcache`` also GradCache's
    --mini_batch_size and --mini_batch_tokens (modules/gradcache.py)."""
    group.add_argument("--length_buckets", type=bucket_count, default="auto",
                       help="split each forward into length-sorted sub-batches, each padded to its own longest row: "
                            "auto (where a cut saves more than --split_tokens padded tokens), N equal ones, 1 (off)"
                            + ("; without GradCache" if gradcache else ""))
    group.add_argument("--split_tokens", type=int, default=128,
                       help="auto buckets: a forward's fixed cost in padded tokens (raise it on a GPU, where small "
                            "forwards waste more)")
    if gradcache:
        group.add_argument("--mini_batch_size", type=int, default=0, help="GradCache mini-batch rows (0: no limit)")
        group.add_argument("--mini_batch_tokens", type=int, default=0,
                           help="GradCache mini-batch padded tokens (0: no limit); GradCache is on when either is set")


def bucket_count(value):
    """``auto`` or an integer >= 1."""
    import argparse

    if value == "auto":
        return value
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected auto or an integer >= 1, got {value!r}")
    return count


def add_attention_arguments(group, implementation=True):
    """--padding_free (modules/padding_free.py) and, unless the script has its own, --attn_implementation."""
    if implementation:
        group.add_argument("--attn_implementation", default=None,
                           help="the backbone's attention: sdpa (default) | eager | flash_attention_2 | sdpa_varlen "
                                "(per-sequence SDPA: --padding_free anywhere, as a reference)")
    group.add_argument("--padding_free", action="store_true",
                       help="feed each forward's real tokens as one flattened row with per-sequence positions and "
                            "lengths (needs a variable-length attention: flash_attention_2 or sdpa_varlen); length "
                            "buckets are then off")


COMPILE_HELP = ("compile the embedding model's forward with torch.compile (inductor, dynamic shapes: length buckets and "
                "batch sizes share one graph; the first steps pay the compile, train_summary.json counts the graphs "
                "and seconds). Single process or DDP (launch/single.yaml, launch/ddp.yaml), any encoder or decoder "
                "backbone (LoRA, GradCache, EMA included); refused with --padding_free, --gradient_checkpointing and "
                "under DeepSpeed (launch/deepspeed_*.yaml), FSDP (launch/fsdp*.yaml) or an accelerate config's own "
                "dynamo_backend. Dropout masks differ from eager's (inductor's random stream); weights are saved as "
                "eager ones")
# accelerate launch tells a script its launcher through these variables; --torch_compile is refused under them
COMPILE_REFUSED_LAUNCHERS = {
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed (launch/deepspeed_*.yaml): its engine wraps the model with its own hooks "
                                "(ZeRO-3 gathers each layer's weights) and compiles only through its own config",
    "ACCELERATE_USE_FSDP": "FSDP (launch/fsdp*.yaml): FSDP2 shards each layer and would need each layer compiled "
                           "after sharding, which this flag does not do",
}


def add_compile_arguments(group):
    """--torch_compile (modules/compilation.py)."""
    group.add_argument("--torch_compile", action="store_true", help=COMPILE_HELP)


def check_compile_flags(parser, args):
    """Refuse --torch_compile where it cannot run as asked (exit 2, one line): with --padding_free, whose per-sequence
    lengths are data that would compile a graph per batch; with --gradient_checkpointing, whose transformers wrapper
    breaks the graph in every layer (a logging call), leaving the layers eager; under DeepSpeed or FSDP; beside
    accelerate's dynamo_backend, which would compile the model a second time, wrapped."""
    if not getattr(args, "torch_compile", False):
        return
    if args.padding_free:
        parser.error("--torch_compile with --padding_free: the flattened forward's sequence lengths are data, and "
                     "every batch's lengths would compile a new graph; give one of them")
    if args.gradient_checkpointing:
        parser.error("--torch_compile with --gradient_checkpointing: transformers' checkpointed layers break the "
                     "graph (a logging call in each), so the layers would run eagerly; give one of them")
    for variable, launcher in COMPILE_REFUSED_LAUNCHERS.items():
        if os.environ.get(variable, "false").lower() == "true":
            parser.error(f"--torch_compile does not run under {launcher}; launch with launch/single.yaml or "
                         "launch/ddp.yaml, or train eagerly")
    if os.environ.get("ACCELERATE_DYNAMO_BACKEND", "no").lower() != "no":
        parser.error(f"--torch_compile: the accelerate config compiles the model too (dynamo_backend "
                     f"{os.environ['ACCELERATE_DYNAMO_BACKEND']}, state dict keys prefixed _orig_mod.); set "
                     "dynamo_backend: 'NO' there")

"""final/README.md: a model card written from what the run knows (its arguments, train_summary.json, dev scores),
fit to publish: no path of the machine that ran it, the terms of its training data, the options that shaped its
weights, which weights final/ holds, its local dev scores apart from C-MTEB.

eval/run_cmteb.py rewrites the card's C-MTEB section (between the CMTEB_BEGIN / CMTEB_END markers) when it
scores the directory; with --quantize the section holds every task by dimension and precision (``precision_table``).
"""

import json
import math
import re
import shlex
import sys
from pathlib import Path

import yaml

from .card_weights import dev_section, size_precision_table, weights_record, weights_text
from .data_licences import data_terms, non_commercial
from .flags import sts_loss_description
from .run_options import shown_command, shown_path, weight_options

CARD_NOTE = "<!-- Written by modules/model_card.py; eval/run_cmteb.py rewrites the C-MTEB section. -->"
CMTEB_BEGIN, CMTEB_END = "<!-- C-MTEB section: begin -->", "<!-- C-MTEB section: end -->"
CMTEB_BENCHMARK = "MTEB(cmn, v1)"
CMTEB_TASKS = (
    "T2Retrieval", "MMarcoRetrieval", "DuRetrieval", "CovidRetrieval", "CmedqaRetrieval", "EcomRetrieval",
    "MedicalRetrieval", "VideoRetrieval", "T2Reranking", "MMarcoReranking", "CMedQAv1-reranking", "CMedQAv2-reranking",
    "Ocnli", "Cmnli", "CLSClusteringS2S", "CLSClusteringP2P", "ThuNewsClusteringS2S", "ThuNewsClusteringP2P", "LCQMC",
    "PAWSX", "AFQMC", "QBQTC", "TNews", "IFlyTek", "Waimai", "OnlineShopping", "JDReview", "MultilingualSentiment",
    "ATEC", "BQ", "STSB",
)
# Data this repo knows (../shared/data folders, data/demo files) -> (language, mteb tasks built from the same
# source): trained on, those tasks are not zero-shot on the MTEB leaderboard. A folder named like a C-MTEB
# task also counts as that task's data.
KNOWN_DATA = {
    "en-stsb": ("en", ["STSBenchmark"]), "stsb_train": ("en", ["STSBenchmark"]),
    "en-sick": ("en", ["SICK-R"]), "sick_train": ("en", ["SICK-R"]), "sick_retrieval": ("en", ["SICK-R"]),
    "en-msrp": ("en", []), "en-cranfield-retrieval": ("en", []), "cranfield_train": ("en", []),
    "zh-afqmc": ("zh", ["AFQMC"]), "zh-atec": ("zh", ["ATEC"]), "zh-bq": ("zh", ["BQ"]), "zh-lcqmc": ("zh", ["LCQMC"]),
    "zh-ocnli": ("zh", ["Ocnli"]), "zh-pawsx": ("zh", ["PAWSX", "PawsXPairClassification"]),
    "zh-qbqtc": ("zh", ["QBQTC"]), "zh-stsb": ("zh", ["STSB"]), "zh-cmrc2018-trial-retrieval": ("zh", []),
    "zh-snli": ("zh", []), "zh-oppo-xiaobu": ("zh", []), "zh-simclue-rank": ("zh", []),
}
_CMTEB_BY_LOWER_NAME = {name.lower(): name for name in CMTEB_TASKS}
# a hub id: "org/name" (a path like /abs/dir or ./dir is not one)
_ST_USAGE = re.compile(r"SentenceTransformer\(\s*['\"]([\w.-]+/[\w.-]+)['\"]")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# train_summary.json's dataset (fine-tuning) or source (pretraining) keys shown in the data table, in order
_DATA_COLUMNS = (("kind", "Kind"), ("records", "Records"), ("weight", "Weight"), ("share", "Share of steps"),
                 ("batch_size", "Batch per process"), ("global_batch_size", "Global batch"),
                 ("batches_per_epoch", "Batches an epoch"), ("batches", "Batches"), ("files", "Files"))
_KIND_FLAG_PREFIX = {"retri_contrast": "retri", "cls_contrast": "cls", "cosent": "cosent", "parallel": "parallel"}
_PICCOLO_KINDS = ("retri_contrast", "cls_contrast", "cosent")  # a card's kinds where the run did not list them


def write_model_card(final_dir, args, summary, eval_history=None, cmteb=None):
    """Write ``final_dir/README.md`` (over sentence-transformers' blank card); returns its path.

    ``summary`` is train_summary.json's dict (every key optional), ``eval_history`` {step: score or
    {metric: score}}, ``cmteb`` an eval/run_cmteb.py summary.
    """
    final_dir, run_dir = Path(final_dir), Path(args.output_dir)
    rows = summary.get("datasets") or summary.get("sources") or []
    layout, base = _saved_layout(final_dir), base_model_name(args.model_name_or_path)
    command, weights = _command(args), weights_record(args, summary)
    sections = [_front_matter(base, rows), _title(args, base, command, weights),
                _model_section(args, base, summary, layout, weights), _data_section(rows, run_dir),
                _licence_section(rows, run_dir), _loss_section(args, summary, rows),
                _training_section(args, summary, rows, command), _options_section(args, command),
                dev_section(args, summary, eval_history, weights),
                "\n".join(["## C-MTEB", "", CMTEB_BEGIN, _cmteb_text(cmteb), CMTEB_END]), _usage_section(args, layout)]
    card = final_dir / "README.md"
    card.write_text("\n\n".join(section for section in sections if section) + "\n", encoding="utf-8")
    return card


def update_cmteb_section(model_dir, cmteb):
    """Rewrite the C-MTEB section of ``model_dir/README.md`` with a run_cmteb.py summary, when the card is one of
    ours; returns whether it did."""
    card = Path(model_dir) / "README.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    if CMTEB_BEGIN not in text or CMTEB_END not in text:
        return False
    head, rest = text.split(CMTEB_BEGIN, 1)
    tail = rest.split(CMTEB_END, 1)[1]
    card.write_text(f"{head}{CMTEB_BEGIN}\n{_cmteb_text(cmteb)}\n{CMTEB_END}{tail}", encoding="utf-8")
    return True


def base_model_name(model_name_or_path):
    """The start model for the hub's ``base_model``: a hub id as given; for a local sentence-transformers directory
    the hub id its own card loads it by (its config.json names the backbone it was trained from), for a transformers
    directory the hub id in its config.json's ``_name_or_path``; else the directory's name."""
    path = Path(model_name_or_path)
    if not path.exists():
        return str(model_name_or_path)
    if (path / "modules.json").is_file():
        readme = path / "README.md"
        found = _ST_USAGE.search(readme.read_text(encoding="utf-8")) if readme.is_file() else None
        return found.group(1) if found else path.resolve().name
    config = path / "config.json"
    name = json.loads(config.read_text()).get("_name_or_path", "") if config.is_file() else ""
    return name if _HUB_ID.match(name) and not Path(name).exists() else path.resolve().name


def known_data(path):
    """(language, mteb task names) of a dataset this repo knows, by the folder and file names in its path; None
    for others."""
    parts = Path(path).parts
    names = [*parts[:-1], parts[-1].split(".")[0]] if parts else []
    for name in reversed(names):
        if name in KNOWN_DATA:
            return KNOWN_DATA[name]
        if name.lower() in _CMTEB_BY_LOWER_NAME:
            return "zh", [_CMTEB_BY_LOWER_NAME[name.lower()]]
    return None


def _row_tasks(row):
    known = known_data(row.get("path") or row.get("name") or "")
    return known[1] if known else []


def _num(value):
    return f"{value:g}" if isinstance(value, float) else str(value)


def _saved_layout(final_dir):
    """Output dimension, pooling, ScalingLayer, max length and prompts as saved (absent files leave them None)."""
    def read(relative):
        file = final_dir / relative
        return json.loads(file.read_text()) if file.is_file() else {}

    prompts = read("config_sentence_transformers.json").get("prompts") or {}
    layout = {"dim": None, "pooling": None, "dense": None, "prompts": {k: v for k, v in prompts.items() if v},
              "max_seq_length": read("sentence_bert_config.json").get("max_seq_length")}
    for module in read("modules.json") or []:
        kind, config = module["type"].rsplit(".", 1)[-1], read(Path(module["path"]) / "config.json")
        if kind == "Pooling":
            layout.update(dim=config.get("embedding_dimension"), pooling=config.get("pooling_mode"))
        elif kind == "Dense":
            layout.update(dim=config.get("out_features"), dense=(config.get("in_features"), config.get("out_features")))
    return layout


def _front_matter(base, rows):
    known = [known_data(row.get("path") or row.get("name") or "") for row in rows]
    meta = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity",
            "tags": ["sentence-transformers", "sentence-similarity", "feature-extraction", "dense"],
            "base_model": base,
            # no single licence: the start model's and the data's terms (the Licence section); none without data
            "license": "other" if rows else None,
            "language": sorted({k[0] for k in known if k}),
            # mteb's ModelMeta.training_datasets: the mteb task names (a set in mteb 2)
            "mteb_training_datasets": sorted({task for k in known if k for task in k[1]})}
    return "---\n" + yaml.safe_dump({k: v for k, v in meta.items() if v}, sort_keys=False, allow_unicode=True) + "---"


def _title(args, base, command, weights):
    script = Path(command[0]).name
    how = "fine-tuned" if hasattr(args, "retri_temperature") else "pretrained on (query, positive) pairs"
    title = (f"# {Path(args.output_dir).name}\n\n{CARD_NOTE}\n\nA sentence embedding model {how} from {base} by "
             f"`{script}`.")
    if weights.get("step") == 0 and weights["chosen_by"].startswith("best"):
        title += (f"\n\n**Training did not beat the start model on {args.metric_for_best}: these are the start "
                  "model's weights.**")
    return title


def _model_section(args, base, summary, layout, weights):
    lines = [f"- Base model: [{base}](https://huggingface.co/{base})" if _HUB_ID.match(base) else
             f"- Base model: {base}"]
    start = shown_path(args.model_name_or_path, args.output_dir)
    if start != base:
        lines[0] += f" (started from `{start}`)"
    lines.append(f"- Weights: {weights_text(weights)}")
    lines += [f"- {label}: {layout[key]}" for key, label in (("dim", "Output dimension"), ("pooling", "Pooling"),
                                                             ("max_seq_length", "Max sequence length (tokens)"))
              if layout[key] is not None]
    lines.append("- Similarity: cosine")
    if layout["dense"]:
        lr = getattr(args, "scaling_lr", None)
        lines.append(f"- ScalingLayer: linear {layout['dense'][0]} -> {layout['dense'][1]}"
                     + (f", learning rate {_num(lr)}" if lr else ""))
    if args.mrl_dims:
        from .matryoshka import PICCOLO_MRL_DIMS, matryoshka_dims

        piccolo = args.mrl_dims == "piccolo" and layout["dim"]
        dims = matryoshka_dims(PICCOLO_MRL_DIMS, layout["dim"]) if piccolo else args.mrl_dims
        lines.append(f"- Matryoshka (MRL) dims: {dims}, weights: {args.mrl_weights or 'equal'}")
    mixed = f", mixed precision {summary['mixed_precision']}" if summary.get("mixed_precision") else ""
    lines.append(f"- Precision: {args.torch_dtype} master weights{mixed}; saved as {args.save_dtype}")
    if getattr(args, "extend_pe", False):
        lines.append(f"- Position table extended to {args.max_length} ({args.pe_extension})")
    if hasattr(args, "lora_r"):
        lines.append("- Every weight trained (no LoRA)" if args.full_finetune else
                     f"- LoRA: r {args.lora_r}, alpha {_num(args.lora_alpha)}, dropout {_num(args.lora_dropout)}, "
                     f"modules {args.lora_target_modules}; merged into the saved weights (adapter in adapter/)")
    if getattr(args, "rope_scaling", None):
        lines.append(f"- RoPE scaling: {args.rope_scaling} x {_num(args.rope_factor)}")
    return "## Model\n\n" + "\n".join(lines)


def _data_section(rows, run_dir):
    if not rows:
        return ""
    columns = [(key, title) for key, title in _DATA_COLUMNS if any(key in row for row in rows)]
    lines = ["## Training data", "", "Local files, not hub datasets (paths as in the command under Training).", "",
             "| Dataset | File | " + " | ".join(title for _, title in columns) + " | mteb tasks |",
             "|---|---|" + "".join("---|" if key == "kind" else "---:|" for key, _ in columns) + "---|"]
    for row in rows:
        cells = [f"{100 * row[key]:.1f}%" if key == "share" and key in row else _num(row.get(key, ""))
                 for key, _ in columns]
        lines.append(f"| {row.get('name', '?')} | {_row_file(row, run_dir)} | " + " | ".join(cells)
                     + f" | {', '.join(_row_tasks(row))} |")
    if any(row.get("share_of", "of the steps") != "of the steps" for row in rows):
        lines += ["", "Under --cbb every step holds one batch of every kind: shares are within each kind's batches."]
    tasks = sorted({task for row in rows for task in _row_tasks(row)})
    others = [row.get("name", "?") for row in rows if not _row_tasks(row)]
    lines += ["", f"Trained on these mteb tasks' data (not zero-shot for them): {', '.join(tasks) or 'none'}."]
    if others:
        lines.append(f"No mteb task known for: {', '.join(others)}.")
    return "\n".join(lines)


def _row_file(row, run_dir):
    return shown_path(row["path"], run_dir) if "path" in row else ""


def _licence_section(rows, run_dir):
    """Each dataset's terms as the README beside it states them, and what they mean for the model."""
    if not rows:
        return ""
    terms = {row.get("name", "?"): (_row_file(row, run_dir), data_terms(row["path"]) if "path" in row else None)
             for row in rows}
    lines = ["## Licence", "", "No single licence: the start model's licence applies, and so do the terms of each "
             "training dataset, as the README beside its file states them:", ""]
    lines += [f"- {name}" + (f" (`{file}`)" if file else "")
              + f": {stated or 'unknown (no terms in a README beside it)'}" for name, (file, stated) in terms.items()]
    restricted = [name for name, (_, stated) in terms.items() if non_commercial(stated)]
    unknown = [name for name, (_, stated) in terms.items() if not stated]
    if restricted:
        lines += ["", f"**Research and non-commercial use only:** the terms of {', '.join(restricted)} rule out "
                      "commercial use, and a model trained on that data carries them."]
    if unknown:
        lines += ["", f"Terms unknown for {', '.join(unknown)}: check them before publishing this model."]
    return "\n".join(lines)


def _loss_section(args, summary, rows):
    if not hasattr(args, "retri_temperature"):  # pretraining
        text = ("- InfoNCE over in-batch negatives (every other pair of the global batch), temperature "
                f"{_num(args.temperature)}")
        text += ", symmetric (query -> passage and passage -> query)" if args.symmetric else ""
        tokens = getattr(args, "mini_batch_tokens", 0)  # run configs written before the flag have none
        text += (f"; GradCache mini batches of {args.mini_batch_size or 'any'} rows, {tokens or 'any'} padded tokens"
                 if args.mini_batch_size or tokens else "")
        return "## Loss\n\n" + text
    weights = summary.get("loss_weights")
    kinds = list(weights or dict.fromkeys(row["kind"] for row in rows if "kind" in row) or _PICCOLO_KINDS)
    described = {"cosent": sts_loss_description(getattr(args, "sts_loss", "cosent")),  # --sts_loss
                 "cls_contrast": f"InfoNCE, its {args.cls_negatives} negative(s) only (no in-batch)",
                 "retri_contrast": (f"InfoNCE, its {args.retri_negatives} hard negative(s) only (no in-batch)"
                                    if args.retri_hard_negatives_only else
                                    f"InfoNCE, in-batch + {args.retri_negatives} hard negative(s) per query"
                                    if args.retri_negatives else "InfoNCE, in-batch negatives"),
                 "parallel": f"MSE of S(source) and S(translation) to the teacher's T(source) ({_teacher(args)})"}
    lines = ["## Losses", "", "Each batch comes from one dataset and gets its kind's loss.", "",
             f"| Task kind | Loss | Temperature | Weight{' (relative to the largest)' if weights else ''} |",
             "|---|---|---:|---:|"]
    for kind in kinds:
        prefix = _KIND_FLAG_PREFIX[kind]
        weight = (weights[kind] if weights else args.cbb_beta if args.cbb and kind == "cosent"
                  else getattr(args, f"{prefix}_weight"))
        temperature = getattr(args, f"{prefix}_temperature", None)
        lines.append(f"| {kind} | {described[kind]} | {_num(temperature) if temperature else '-'} | {_num(weight)} |")
    lines += ["", *_contrastive_lines(args)]
    if getattr(args, "distill_weight", 0):
        lines.append(f"- Distillation: retrieval loss + {_num(args.distill_weight)} x KL(teacher || student) over "
                     + (f"the batch's candidates, scored by {_teacher(args)}" if args.teacher_model else
                        "each query's positive and negatives, scored in the data (pos_scores, neg_scores)")
                     + f"; teacher temperature {_num(args.teacher_temperature or args.retri_temperature)}")
    if args.cbb:
        lines.append(f"- CBB: every step one batch of every kind, retrieval queries shared by all processes (each "
                     f"with its own negatives); loss = retrieval + {_num(args.cbb_beta)} x CoSENT")
    if args.dhnm:
        dhnm = summary.get("dhnm") or {}
        lines.append(f"- DHNM: every {args.dhnm_interval} steps, easy negatives of the last retrieval batch re-mined "
                     f"(ratio {_num(args.dhnm_ratio)}, |S| < {_num(args.dhnm_max_abs)}, skip {args.dhnm_skip})"
                     + (f"; {dhnm['replaced']} of {dhnm['checked']} replaced" if "replaced" in dhnm else ""))
    return "\n".join(lines).rstrip()


def _teacher(args):
    return shown_path(args.teacher_model, args.output_dir) if getattr(args, "teacher_model", None) else "none"


def _contrastive_lines(args):
    """What changes InfoNCE's candidates and their weights: false-negative masks, hardness weights, extra terms."""
    # run configs written before these flags have none of them
    duplicates, margin, relative, hard, other, improved, spread = (getattr(args, name, None) for name in (
        "mask_duplicates", "mask_margin", "mask_relative", "hard_negative_alpha", "in_batch_alpha",
        "improved_contrastive", "spread_out_weight"))
    masks = [text for given, text in (
        (duplicates, "candidates whose text equals the query or one of its positives (--mask_duplicates)"),
        (margin is not None, f"candidates above the positive's cosine + {_num(margin)} (--mask_margin)"),
        (relative is not None, f"candidates above {_num(relative)} x the positive's cosine (--mask_relative)"))
        if given]
    weights = [text for given, text in (
        (hard, f"own hard negatives weighted by exp({_num(hard)} x cosine) (--hard_negative_alpha)"),
        (other, f"other negatives by exp({_num(other)} x cosine) (--in_batch_alpha)")) if given]
    lines = ["- False negatives dropped from each query's softmax: " + "; ".join(masks)] if masks else []
    lines += ["- Hardness weights: " + "; ".join(weights)] if weights else []
    if improved:
        lines.append("- Improved contrastive loss: query-query and positive-positive similarities in the denominator "
                     "(--improved_contrastive)")
    if spread:
        lines.append(f"- Spread-out regulariser: + {_num(spread)} x the global orthogonal regulariser of the queries "
                     "and of the positives (--spread_out_weight)")
    return lines


def _training_section(args, summary, rows, command):
    steps = summary.get("total_steps") or (args.max_steps if args.max_steps > 0 else summary.get("steps"))
    lines = [f"- Steps: {steps}"] if steps else []
    fixed = getattr(args, "warmup_steps", None)  # pretraining's --warmup_steps, over --warmup_ratio
    warmup = summary.get("warmup_steps", fixed if fixed is not None else
                         math.ceil(args.warmup_ratio * steps) if steps else None)
    ratio = "" if fixed is not None else f" ({_num(args.warmup_ratio)} of the steps)"
    lines.append(f"- Warmup steps: {warmup}{ratio}" if warmup is not None else f"- Warmup:{ratio}")
    if hasattr(args, "retri_batch_size"):
        kinds = dict.fromkeys(row["kind"] for row in rows if "kind" in row) or _PICCOLO_KINDS
        lines.append("- Batch per process: " + ", ".join(
            f"{kind} {getattr(args, _KIND_FLAG_PREFIX[kind] + '_batch_size')}" for kind in kinds)
            + (" (a meta list's batch_size=N overrides; see the data table)" if rows else ""))
        lines.append(f"- Gradient accumulation: {args.grad_accum}")
    else:
        lines.append(f"- Batch: {args.batch_size} pairs per process"
                     + (f", {summary['global_batch_size']} global" if "global_batch_size" in summary else ""))
    if summary.get("epochs") is not None:
        lines.append(f"- Epochs: {summary['epochs']:.2f}")
    elif getattr(args, "max_steps", 0) <= 0 and hasattr(args, "epochs"):
        lines.append(f"- Epochs: {args.epochs}")
    if "processes" in summary:
        lines.append(f"- Processes: {summary['processes']}"
                     + (f" ({summary['distributed']})" if summary.get("distributed") else ""))
    lines += [f"- Learning rate: {_num(args.lr)}, {args.lr_scheduler} schedule, weight decay {_num(args.weight_decay)}",
              f"- Max gradient norm: {_num(args.max_grad_norm) if args.max_grad_norm > 0 else 'no clipping'}",
              f"- Seed: {args.seed}", "", "Command (paths inside the run's output directory relative to it, others "
              "as given when relative, else by name):", "", "```bash", shown_command(command, args.output_dir), "```"]
    return "## Training\n\n" + "\n".join(lines)


def _options_section(args, command):
    """Every option the command line set that can change the weights (modules/run_options.py)."""
    options = weight_options(command, vars(args))
    lines = ["## Options that can change the weights", "", "Set on the command line, as parsed (every other option "
             "at the script's default; those that only change outputs, logging, dev scoring, speed or memory left "
             "out):", ""]
    return "\n".join(lines + [f"- `{_option(dest, value, args.output_dir)}`" for dest, value in options])


def _option(dest, value, run_dir):
    if value is True:
        return f"--{dest}"
    values = [shown_path(v, run_dir) if isinstance(v, str) and Path(v).is_absolute() else _num(v)
              for v in (value if isinstance(value, list) else [value])]
    return shlex.join([f"--{dest}", *values])


def _command(args):
    """The command line run_config.json recorded at the start of the run (this process's otherwise)."""
    run_config = Path(args.output_dir) / "run_config.json"
    command = json.loads(run_config.read_text()).get("command") if run_config.is_file() else None
    return [str(part) for part in (command or sys.argv)]


def _cmteb_text(cmteb):
    """The C-MTEB section's content: run_cmteb.py's averages per type and overall, every task's score, and with
    --quantize every task at every dimension and precision."""
    if not cmteb:
        return "Not evaluated yet: `python eval/run_cmteb.py --model <this directory>` writes its scores here."
    tasks, benchmark = cmteb["tasks"], cmteb.get("settings", {}).get("benchmark", CMTEB_BENCHMARK)
    in_cmteb = [task for task in tasks if task in CMTEB_TASKS]
    others = [task for task in tasks if task not in CMTEB_TASKS]
    if benchmark != CMTEB_BENCHMARK:
        coverage = f"{len(tasks)} tasks of {benchmark}"
    elif len(in_cmteb) == len(CMTEB_TASKS):
        coverage = f"All {len(CMTEB_TASKS)} {CMTEB_BENCHMARK} tasks"
    else:
        coverage = (f"Partial: {len(in_cmteb)} of the {len(CMTEB_TASKS)} {CMTEB_BENCHMARK} tasks (averages over "
                    "those run, not comparable with the leaderboard's)")
    if others and benchmark == CMTEB_BENCHMARK:
        coverage += f"; also in the averages: {', '.join(others)}"
    types = list(cmteb["types"])
    rows = cmteb.get("dims") or [{"dim": cmteb["model"]["embedding_dim"], **cmteb}]
    lines = [f"{coverage}. Main score x 100.", "", "| Dim | Average | " + " | ".join(types) + " | Average of types |",
             "|---:|" + "---:|" * (len(types) + 2)]
    for row in rows:
        lines.append(f"| {row['dim']} | {row['average']:.2f} | "
                     + " | ".join(f"{row['types'][t]:.2f}" for t in types) + f" | {row['average_by_type']:.2f} |")
    lines += ["", "| Type | Task | Score |", "|---|---|---:|"]
    lines += [f"| {cmteb['task_types'][task]} | {task} | {score:.2f} |" for task, score in tasks.items()]
    settings, versions = cmteb.get("settings", {}), cmteb.get("versions", {})
    if cmteb.get("quantized"):
        calibration = settings.get("calibration")
        int8 = (f"; int8: cosine of the codes, ranges from {calibration['texts']} texts of "
                f"`{shown_path(calibration['file'])}`" if calibration else "")
        lines += ["", f"Each task at every size and precision (main score x 100; binary: Hamming similarity{int8}):",
                  "", precision_table(cmteb)]
    data = str(settings.get("data", "?"))
    lines += ["", (f"mteb {versions.get('mteb', '?')}, {cmteb.get('date', '')}; data: "
                   f"{shown_path(data) if Path(data).is_absolute() else data}; "
                   f"query instruction: {settings.get('query_instruction')!r}.")]
    return "\n".join(lines)


def precision_table(cmteb):
    """A run_cmteb.py summary's scores at every dimension and precision: a row per task (the average first) and
    dimension, a column per precision (float32, then its ``quantized`` rows' int8 / binary)."""
    rows = [*(cmteb.get("dims") or [{"dim": cmteb["model"]["embedding_dim"], **cmteb}]), *cmteb.get("quantized", [])]
    by_variant = {(row["dim"], row.get("quantization", "float32")): {"Average": row["average"], **row["tasks"]}
                  for row in rows}
    return size_precision_table(by_variant, ["Average", *cmteb["tasks"]], "Task")


def _usage_section(args, layout):
    prompts = layout["prompts"]
    lines = ["## Usage", "", "```python", "from sentence_transformers import SentenceTransformer", "",
             'model = SentenceTransformer("path/to/this/directory")']
    if "query" in prompts:
        lines += _query_usage(prompts)
    else:
        lines += ['embeddings = model.encode(["first sentence", "second sentence"])', "```"]
        if getattr(args, "query_prefix", None):  # runs that did not save their query prefix as a prompt
            lines += ["", f"Training prefixed queries with {args.query_prefix!r}: give it as `prompt=` to queries."]
    others = [name for name in prompts if name != "query"]
    if others:
        lines += ["", f"Other prompts saved with the model (`prompt_name=`; mteb gives a task the prompt of its name): "
                      f"{', '.join(others)}."]
    return "\n".join(lines)


def _query_usage(prompts):
    """encode_query / encode_document, which give queries the saved "query" prompt (as mteb does) and documents
    sentence-transformers' document prompt, if one is saved."""
    document = next((prompts[name] for name in ("document", "passage", "corpus") if name in prompts), None)
    return ['query_embeddings = model.encode_query(["how does a wing lift a plane?"])',
            'document_embeddings = model.encode_document(["Lift comes from the pressure difference ..."])', "```", "",
            f"The query prefix it was trained with is saved as the prompt named \"query\" ({prompts['query']!r}): "
            "`encode_query` puts it before every query, and mteb before the queries of every task without a prompt "
            "of its own; `encode_document` puts " + (f"{document!r}" if document else "nothing") + " before documents."]

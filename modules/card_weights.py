"""The model card's account of its weights: which step and which averages the model holds (train_summary.json's
``final_weights``; what an older run's arguments imply; an exported checkpoint), and the local dev scores of those
weights.
"""

import json
from pathlib import Path

from .run_options import shown_path

_RUN_RESULTS = ("steps", "best", "final_weights", "final_scores", "final_variants")  # train_summary.json keys of a run's end, not setup


def export_summary(run_dir, step, ema_decay=0, wise_ft_alpha=1):
    """The summary an exported checkpoint's card is written from: its run's setup (data, losses, batches) from
    train_summary.json when the run got that far, and the weights the export holds."""
    file = Path(run_dir) / "train_summary.json"
    setup = json.loads(file.read_text()) if file.is_file() else {}
    return {**{key: value for key, value in setup.items() if key not in _RUN_RESULTS}, "steps": step,
            "final_weights": weights_entry(step, "exported checkpoint", ema_decay, wise_ft_alpha)}


def weights_entry(step, chosen_by, ema_decay=0, wise_ft_alpha=1):
    """train_summary.json's ``final_weights``: the step the weights come from, how it was chosen, and the averages
    applied (the moving average with the start weights' share left in it, WiSE-FT)."""
    from .ema import start_share

    weights = {"step": step, "chosen_by": chosen_by}
    if ema_decay:
        weights.update(ema_decay=ema_decay, ema_start_share=start_share(ema_decay, step))
    if wise_ft_alpha < 1:
        weights["wise_ft_alpha"] = wise_ft_alpha
    return weights


def weights_record(args, summary):
    """train_summary.json's ``final_weights``; for runs that predate it, what their arguments imply."""
    if "final_weights" in summary:
        return summary["final_weights"]
    best = summary.get("best")
    if getattr(args, "final_is_best", False) and best:
        weights = {"step": best["step"], "chosen_by": f"best {best['metric']} (--final_is_best)"}
    else:
        weights = {"step": summary.get("steps"), "chosen_by": "last step"}
    if getattr(args, "ema_decay", 0):
        weights["ema_decay"] = args.ema_decay
    if args.wise_ft_alpha < 1:
        weights["wise_ft_alpha"] = args.wise_ft_alpha
    return weights


def weights_text(weights):
    """Which weights the model holds, in words."""
    if weights.get("step") == 0:  # every average of the start model with itself is the start model
        return f"the start model's, unchanged (step 0, the {weights['chosen_by']})"
    at = f" at step {weights['step']}" if weights.get("step") is not None else ""
    text = f"as trained{at}"
    if "ema_decay" in weights:
        share = (f"; the start model's share {weights['ema_start_share']:.3g}" if "ema_start_share" in weights
                 else "")
        text = f"the exponential moving average (decay {weights['ema_decay']:g}{share}) of the weights{at}"
    text += f", the {weights['chosen_by']}"
    if "wise_ft_alpha" in weights:
        alpha = weights["wise_ft_alpha"]
        text += f", then averaged {alpha:g} / {1 - alpha:.3g} with the start model (WiSE-FT)"
    return text


def dev_section(args, summary, eval_history, weights):
    """Local dev scores of the start model, of the step final/ comes from and of final/ as saved (when scored)."""
    if not eval_history:
        return ""
    history = {int(step): scores if isinstance(scores, dict) else {"sts_spearman": scores}
               for step, scores in eval_history.items()}
    shipped = weights.get("step") if weights.get("step") in history else max(history)
    steps, final = list(dict.fromkeys(step for step in (0, shipped) if step in history)), summary.get("final_scores")
    headers = [f"step {step}" + (" (start model)" if step == 0 else "") for step in steps]
    headers += ["final/"] if final else []
    lines = ["## Dev scores (local dev sets, not C-MTEB)", "",
             "| Dev set | Split | Metric | " + " | ".join(headers) + " |", "|---|---|---|" + "---:|" * len(headers)]
    splits = _task_splits(args)
    for name in history[shipped]:
        values = [history[step].get(name) for step in steps] + ([final.get(name)] if final else [])
        cells = [*_dev_set(name, args, splits), *("" if v is None else f"{v:.2f}" for v in values)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", _dev_note(weights, final)]
    if summary.get("final_variants"):
        rows = {(row["dim"], row["quantization"]): row["scores"] for row in summary["final_variants"]}
        lines += ["", "final/ at each embedding size (the first dims, re-normalised) and precision (binary: sign bits "
                  "scored by Hamming similarity; int8: the cosine of the codes, ranges from --eval_calibration):", "",
                  size_precision_table(rows, list(next(iter(rows.values()))), "Dev metric")]
    best = summary.get("best")
    if best:
        kept = (f" (`{shown_path(best['checkpoint'], args.output_dir)}` in the run's output directory)"
                if best.get("checkpoint") else "")
        lines += ["", f"Best {best['metric']}: {best['value']:.2f} at step {best['step']}{kept}."]
    return "\n".join(lines)


def size_precision_table(by_variant, names, label):
    """A markdown table of {(dim, precision): {name: score}}: a row per name and dim, a column per precision."""
    dims = list(dict.fromkeys(dim for dim, _ in by_variant))
    precisions = list(dict.fromkeys(precision for _, precision in by_variant))
    lines = [f"| {label} | Dim | " + " | ".join(precisions) + " |", "|---|---:|" + "---:|" * len(precisions)]
    for name in names:
        for dim in dims:
            cells = [by_variant.get((dim, precision), {}).get(name) for precision in precisions]
            lines.append(f"| {name} | {dim} | " + " | ".join("n/a" if c is None else f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines)


def _dev_note(weights, final):
    """What the dev table's columns score."""
    note = ("Scores x 100 on local dev sets, not the C-MTEB benchmark. Step 0 is the start model; a step's column "
            "scores the weights final/ would hold had the run stopped there")
    note += ", their moving average (--ema_decay)" if "ema_decay" in weights else ""
    note += ", before the WiSE-FT average with the start model." if "wise_ft_alpha" in weights else "."
    if final:
        note += " final/: the model as saved."
    elif "wise_ft_alpha" in weights:
        note += " final/ itself (after the WiSE-FT average) was not scored."
    return note


def _dev_set(metric, args, splits):
    """(dev set, split, metric) of a dev metric: "sts_spearman" (--eval_sts_file), "<task>/<metric>" or
    "<task>/<split>/<metric>" (--eval_dir task folders)."""
    if metric == "sts_spearman":
        return shown_path(args.eval_sts_file or "dev", args.output_dir), "whole file", "Spearman x 100"
    parts = metric.split("/")
    if len(parts) == 3:
        return parts[0], parts[1], f"{parts[2]} x 100"
    if len(parts) == 2:
        return parts[0], splits.get(parts[0], "not recorded"), f"{parts[1]} x 100"
    return metric, "", metric


def _task_splits(args):
    """{task name: split} of the --eval_dir folders of one split (their metrics do not name it)."""
    from .cli import DataError
    from .task_folders import read_task_folder

    splits = {}
    for folder in getattr(args, "eval_dir", None) or ():
        try:
            task = read_task_folder(folder)
        except DataError:  # moved or changed since the run: its metrics keep no split
            continue
        splits[task.name] = ", ".join(task.splits)
    return splits

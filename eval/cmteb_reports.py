"""The reports of a C-MTEB run: summary.json, summary.md and matryoshka.png (with --dims), and mteb's own result
files made strict JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cmteb_summary import not_finite_scores
from modules.json_files import finite_json, write_json
from modules.model_card import precision_table


def summary_markdown(summary: dict[str, Any]) -> str:
    settings = summary["settings"]
    model = summary["model"]
    rows = summary.get("dims") or [{"dim": model["embedding_dim"], **summary}]
    types = list(summary["types"])
    coverage = summary.get("coverage")
    lines = [
        f"# C-MTEB evaluation: {model['name']}",
        "",
        f"- model: `{model['path']}` ({model['dtype']}, max_seq_length "
        f"{model['max_seq_length']}, similarity {model['similarity_fn']}); revision "
        f"{model.get('revision') or 'none'} (hash of the weight files)",
    ]
    if model.get("read_as"):
        lines.append(f"- read as: {model['read_as']}")
    checkpoint = model.get("checkpoint")
    if checkpoint:
        wise_ft = f", WiSE-FT alpha {checkpoint['wise_ft_alpha']}" if checkpoint["wise_ft_alpha"] else ""
        lines.append(
            f"- checkpoint: `{checkpoint['path']}` (step {checkpoint['step']}, {checkpoint['kind']} of "
            f"{checkpoint['script']}{wise_ft}), exported with tools/export_checkpoint.py for this evaluation"
        )
    lines += [
        "- versions: " + ", ".join(f"{package} {number}" for package, number in summary["versions"].items()),
        f"- benchmark: {settings['benchmark']}; data: {settings['data']}; "
        f"batch size {settings['batch_size']}",
    ]
    if settings.get("local_tasks"):
        lines.append("- local tasks (task.json folders): " + ", ".join(f"`{f}`" for f in settings["local_tasks"]))
    lines += [
        f"- query instruction (Retrieval, Reranking): {settings['query_instruction']!r}",
        f"- instruction template: {settings['instruction_template']!r}; "
        f"prompts: {settings['prompts'] or None}",
        "",
        "## Averages (main score x 100)",
        "",
    ]
    if coverage:
        note = "" if coverage["full"] else ": averages over the tasks run, not comparable with the leaderboard's"
        lines += [f"Coverage of {coverage['benchmark']}: **{coverage['label']}**{note}.", ""]
    lines += [
        "| Dim | Average | " + " | ".join(types) + " | Average of types |",
        "|---:|---:|" + "---:|" * len(types) + "---:|",
    ]
    for row in rows:
        type_cells = " | ".join(score_cell(row["types"][task_type]) for task_type in types)
        lines.append(f"| {row['dim']} | {score_cell(row['average'])} | {type_cells} | "
                     f"{score_cell(row['average_by_type'])} |")
    not_finite = not_finite_scores(summary)
    if not_finite:
        lines += ["", f"**Not finite** (n/a below, left out of the averages): {'; '.join(not_finite)}."]
    sources = summary.get("sources") or {}
    local = {name for name, source in sources.items() if source.get("source", "").startswith("local folder")}
    lines += [
        "",
        "## Tasks",
        "",
        "| Type | Task | Split | " + " | ".join(f"dim {row['dim']}" for row in rows) + " |",
    ]
    lines.append("|---|---|---|" + "---:|" * len(rows))
    for name, task_type in summary["task_types"].items():
        cells = " | ".join(score_cell(row["tasks"][name]) for row in rows)
        shown = f"{name} (local)" if name in local else name
        lines.append(f"| {task_type} | {shown} | {', '.join(summary['splits'][name])} | {cells} |")
    if summary.get("pair_ap"):
        lines += [
            "",
            "## PairClassification: max AP x 100 (the main score above is max accuracy)",
            "",
            "| Task | " + " | ".join(f"dim {row['dim']}" for row in rows) + " |",
            "|---|" + "---:|" * len(rows),
        ]
        for name in summary["pair_ap"]:
            lines.append(f"| {name} | " + " | ".join(score_cell(row["pair_ap"][name]) for row in rows) + " |")
    if summary.get("quantized"):
        lines += ["", "## Quantized embeddings (main score x 100)", "", precision_table(summary)]
    if local:
        lines += ["", "## Local tasks", ""]
        lines += [f"- {name}: {sources[name]['source']} (data hash {sources[name]['data_hash']})" for name in local]
    return "\n".join(lines) + "\n"


def score_cell(score: float | None) -> str:
    return "n/a" if score is None else f"{score:.2f}"


def plot_dims(rows: list[dict[str, Any]], path: Path) -> None:
    """Score against embedding dimension, one line per task type and one for the average."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.2))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    dims = [row["dim"] for row in rows]

    def scores(key: str, task_type: str | None = None) -> list[float]:  # a gap where a score is None
        values = [row[key][task_type] if task_type else row[key] for row in rows]
        return [np.nan if value is None else value for value in values]

    for task_type in rows[0]["types"]:
        axes.plot(dims, scores("types", task_type), marker="o", label=task_type)
    axes.plot(dims, scores("average"), marker="s", color="black", linestyle="--", label="Average")
    axes.set_xscale("log", base=2)
    axes.set_xticks(dims, [str(dim) for dim in dims])
    axes.set_xlabel("embedding dimension (truncated, re-normalised)")
    axes.set_ylabel("main score x 100")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=150)


def strict_result_files(results_dir: Path) -> None:
    """Rewrite mteb's result files under `results_dir` that hold NaN or Infinity (mteb's json.dump writes them bare,
    which is not JSON) with null in their place; the run names those scores itself (NonFiniteScoreError)."""
    for path in sorted(results_dir.rglob("*.json")):
        content = json.loads(path.read_text(encoding="utf-8"))
        if finite_json(content)[1]:
            write_json(path, content, warn=False)


def write_reports(summary: dict[str, Any], output_dir: Path) -> str:
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / "summary.json", summary, ensure_ascii=False)  # scores not finite are None already
    markdown = summary_markdown(summary)
    (output_dir / "summary.md").write_text(markdown, encoding="utf-8")
    if "dims" in summary:
        plot_dims(summary["dims"], output_dir / "matryoshka.png")
    return markdown

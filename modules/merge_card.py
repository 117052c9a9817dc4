"""README.md of a merged model (tools/merge_checkpoints.py): hub front matter, the merged models with their weights,
and the lineage of each, so a soup says what went into it.

What each input is, read from what sits beside it:

- a checkpoint-<step> of a run (a trainer_state.json inside): its run and step, and the run's start model;
- a merged model (its card's front matter lists ``merged_models``): its own inputs and their weights;
- a run's final/ (a run_config.json beside it): its run and the start model, from the card's front matter
  ``base_model`` or else run_config.json's ``args.model_name_or_path``;
- any other model directory: its base model, from its card's front matter or modules.model_card.base_model_name.

The front matter's ``base_model`` is the base the inputs share (a fine-tune and its start model share the start
model), with ``base_model_relation: merge``; inputs without one common base leave both out. Paths are written as
the user gave them when relative, else as their directory name: a card must not carry one machine's paths.
"""

import json
import shlex
from pathlib import Path

import yaml

from .checkpoints import TRAINER_STATE
from .model_card import base_model_name

TAGS = ["sentence-transformers", "sentence-similarity", "feature-extraction", "merge"]
METHODS = {"mean": "weighted mean of every weight", "slerp": "spherical interpolation of each tensor (slerp)"}


def shown(path):
    """``path`` as a card may show it: as given when relative (a hub id too), else its directory's name (also for
    ``.`` and ``..``, which name nothing on another machine)."""
    path = Path(path)
    return path.resolve().name if path.is_absolute() or path.name in ("", "..") else str(path)


def _weight(value):
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def front_matter(model_dir):
    """The YAML front matter of a model directory's README.md as a dict ({} without one)."""
    card = Path(model_dir) / "README.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    if not text.startswith("---"):
        return {}
    try:
        meta = yaml.safe_load(text[3:].split("\n---", 1)[0])
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _one_base(meta):
    """The front matter's base_model when it names one model (the hub also allows a list)."""
    base = meta.get("base_model")
    base = base[0] if isinstance(base, list) and len(base) == 1 else base
    return shown(base) if isinstance(base, str) and base else None


def run_start(run_dir):
    """The base of a run's start model, from its run_config.json (None when it cannot be read)."""
    try:
        start = json.loads((Path(run_dir) / "run_config.json").read_text())["args"]["model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return shown(base_model_name(start))


def lineage(model):
    """{"kind", "base_model", "lineage" (one line), and "run", "step" where known} of one input model."""
    model = Path(model)
    meta = front_matter(model)
    if (model / TRAINER_STATE).is_file():
        step = json.loads((model / TRAINER_STATE).read_text()).get("global_step")
        base = run_start(model.parent)
        return {"kind": "checkpoint", "run": shown(model.parent), "step": step, "base_model": base,
                "lineage": f"checkpoint of run {shown(model.parent)} at step {step}, started from {base or '?'}"}
    merged = [entry for entry in meta.get("merged_models") or [] if isinstance(entry, dict)]
    if merged:
        parts = ", ".join(f"{entry.get('model')} x {_weight(entry.get('weight'))}" for entry in merged)
        return {"kind": "merge", "base_model": _one_base(meta),
                "lineage": f"merge ({meta.get('merge_method', '?')}) of {parts}"}
    if (model.parent / "run_config.json").is_file():
        base = _one_base(meta) or run_start(model.parent)
        return {"kind": "run", "run": shown(model.parent), "base_model": base,
                "lineage": f"{model.name}/ of run {shown(model.parent)}, started from {base or '?'}"}
    base = _one_base(meta) or shown(base_model_name(model))
    return {"kind": "model", "base_model": base,
            "lineage": f"model based on {base}" if _one_base(meta) else f"model {base}"}


def merge_card(models, weights, method, output):
    """The merged model's README.md: front matter, the inputs with weight, share and lineage, and the command."""
    inputs = [{"model": shown(model), "weight": weight, **lineage(model)} for model, weight in zip(models, weights)]
    inputs = [{key: value for key, value in entry.items() if value is not None} for entry in inputs]
    bases = {entry.get("base_model") for entry in inputs}
    base = bases.pop() if len(bases) == 1 and None not in bases else None
    meta = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity", "tags": TAGS,
            **({"base_model": base, "base_model_relation": "merge"} if base else {}),
            "merge_method": method, "merged_models": inputs}
    total = sum(weights)
    rows = [f"| {entry['model']} | {_weight(entry['weight'])} | {100 * entry['weight'] / total:.1f}% | "
            f"{entry['lineage']} |" for entry in inputs]
    command = ["python", "tools/merge_checkpoints.py", *map(shown, models), "--output", shown(output),
               "--weights", ",".join(map(_weight, weights)), "--method", method]
    sections = [
        "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---",
        f"# {Path(output).name}",
        f"Merged in weight space by tools/merge_checkpoints.py: {METHODS[method]}. "
        + (f"Base model: {base}, shared by every merged model." if base else "The merged models share no base model.")
        + " Buffers (position ids) and BERT's unused pooler are the first model's, as are its configuration, "
          "tokenizer, pooling and prompts.",
        "| Model | Weight | Share | What it is |\n|---|---:|---:|---|\n" + "\n".join(rows),
        "Command:\n\n```bash\n" + shlex.join(command) + "\n```",
        "## Usage\n\n```python\nfrom sentence_transformers import SentenceTransformer\n\n"
        'model = SentenceTransformer("path/to/this/directory")\n'
        'embeddings = model.encode(["first sentence", "second sentence"])\n```',
    ]
    return "\n\n".join(sections) + "\n"

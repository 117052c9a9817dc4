"""The model of a C-MTEB run: loading it (checks of the folder and its weight files, dtype), how
sentence-transformers reads it, its name and revision (a hash of its weight files) in mteb's model meta, and the
export of a training checkpoint given as --model."""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from mteb.models import ModelMeta
from safetensors import SafetensorError, safe_open
from sentence_transformers import SentenceTransformer

from cmteb_errors import ModelError
from modules.digests import files_digest, folder_files
from modules.model import load_tokenizer

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_model(
    path: str, device: str | None, precision: str, max_seq_length: int | None
) -> SentenceTransformer:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_model_folder(Path(path))
    with weight_file_errors(Path(path)):
        model = SentenceTransformer(str(path), device=device)
    dtype = resolve_dtype(precision, device)
    if dtype != torch.float32:
        model.to(dtype)
    if max_seq_length:
        model.max_seq_length = max_seq_length
    model.eval()
    return model


# sentence-transformers' module folders: 1_Pooling, 2_Dense, 2_Normalize, ...
MODULE_FOLDER = re.compile(r"^\d+_[A-Za-z]\w*$")


def check_model_folder(model_dir: Path) -> None:
    """Refuse a local model folder that sentence-transformers would read wrongly without a word (a hub name is not
    checked): module folders (1_Pooling/, 2_Dense/) without the modules.json that lists them, which it reads as a
    plain transformers model with mean pooling, leaving them out; a transformer without vocabulary files, for which
    transformers builds a tokenizer of 5 special tokens (every word [UNK]): refused as training refuses such a
    start model (modules/model.py load_tokenizer)."""
    if not model_dir.is_dir():
        return
    if not (model_dir / "modules.json").is_file():
        folders = sorted(f"{path.name}/" for path in model_dir.iterdir()
                         if path.is_dir() and MODULE_FOLDER.match(path.name))
        if folders:
            raise ModelError(f"model {model_dir}: {', '.join(folders)} (sentence-transformers modules) but no "
                             "modules.json, which lists them: a damaged save? sentence-transformers would read the "
                             "folder as a plain transformers model with mean pooling and leave them out")
    transformer_dir = transformer_folder(model_dir)
    if transformer_dir is not None:
        load_tokenizer(transformer_dir)


def transformer_folder(model_dir: Path) -> Path | None:
    """The folder of the model's Transformer module: the one modules.json names (None when it names none, e.g. a
    static embedding), the model folder itself without modules.json."""
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return model_dir
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ModelError(f"{modules_file}:{error.lineno}: invalid JSON ({error.msg})") from None
    transformers = [module for module in modules if str(module.get("type", "")).endswith(".Transformer")]
    return model_dir / transformers[0].get("path", "") if transformers else None


def model_reading(model: SentenceTransformer, model_dir: Path) -> str:
    """How sentence-transformers reads the model: its modules (pooling, Dense, Normalize), output dimension,
    normalisation, similarity and saved prompts. Said for every model: a folder without modules.json is read as a
    plain transformers model (mean pooling, not normalised), whatever it was trained with."""
    modules = " -> ".join(module_text(module, model) for module in model)
    how = f"read by sentence-transformers as {modules}"
    if model_dir.is_dir() and not (model_dir / "modules.json").is_file():
        how = f"no modules.json: read by sentence-transformers as a plain transformers model: {modules}"
    normalised = any(type(module).__name__ == "Normalize" for module in model)
    prompts = ", ".join(f"{name}={text!r}" for name, text in model.prompts.items() if text) or "none"
    if model.default_prompt_name:
        prompts += f" (default: {model.default_prompt_name})"
    return (f"{how}: {embedding_dimension(model)} dims, {'' if normalised else 'not '}normalised, similarity "
            f"{model.similarity_fn_name}, prompts: {prompts}")


def module_text(module: torch.nn.Module, model: SentenceTransformer) -> str:
    """One module of the model as `model_reading` names it: 'BertModel (max_seq_length 512)', 'mean pooling', ..."""
    kind = type(module).__name__
    if kind == "Transformer" and hasattr(module, "auto_model"):
        return f"{type(module.auto_model).__name__} (max_seq_length {model.max_seq_length})"
    if kind == "Pooling":
        modes = module.pooling_mode
        return f"{modes if isinstance(modes, str) else '+'.join(modes)} pooling"
    if kind == "Dense":
        return f"Dense {module.in_features}->{module.out_features}"
    return kind


@contextlib.contextmanager
def weight_file_errors(model_dir: Path) -> Iterator[None]:
    """Turn a SafetensorError raised while reading `model_dir` into a ModelError naming the unreadable file."""
    try:
        yield
    except SafetensorError as error:
        raise ModelError(f"{unreadable_weight_file(model_dir)}: cannot be read ({error}); is the file truncated?") from None


def unreadable_weight_file(model_dir: Path) -> Path:
    """The first *.safetensors file under `model_dir` that safetensors cannot open (`model_dir` if none): a
    SafetensorError does not say which file it is about."""
    for path in sorted(model_dir.rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError):
            return path
    return model_dir


def embedding_dimension(model: SentenceTransformer) -> int:
    """The model's output dimension (the method was renamed in sentence-transformers 6)."""
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return getter()


def resolve_dtype(precision: str, device: str) -> torch.dtype:
    if precision != "auto":
        return PRECISIONS[precision]
    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def default_model_name(model: str) -> str:
    path = Path(model)
    return f"{path.resolve().parent.name}/{path.resolve().name}" if path.exists() else model


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weights_revision(model_dir: Path | str) -> str | None:
    """A short hash of a model directory's weights: sha256 over every weight file (*.safetensors, *.bin, *.pt,
    *.pth, sub-folders included) in path order, each as its relative path and its bytes; the first 12 hex
    digits. None when the directory holds no weight file (or is no directory, e.g. a hub name)."""
    root = Path(model_dir)
    if not root.is_dir():
        return None
    files = folder_files(root, lambda path: path.suffix in WEIGHT_SUFFIXES)
    return files_digest(root, files).hexdigest()[:12] if files else None


def model_revision(model_dir: str, model: SentenceTransformer) -> str | None:
    """The revision mteb files the results under: the weights hash of a local directory; for a hub model the
    commit it was loaded from, when transformers recorded it."""
    revision = weights_revision(model_dir)
    if revision is None and not Path(model_dir).exists():
        first = model[0] if len(model) else None
        config = getattr(getattr(first, "auto_model", None), "config", None)
        revision = getattr(config, "_commit_hash", None)
    return revision


def build_model_meta(model: SentenceTransformer, name: str, revision: str | None = None) -> ModelMeta:
    overwrites = {
        "name": name,
        "embed_dim": embedding_dimension(model),
        "max_tokens": model.max_seq_length,
        "framework": ["Sentence Transformers"],
    }
    if revision:
        overwrites["revision"] = revision
    return ModelMeta.create_empty(overwrites=overwrites)


def is_checkpoint(model: str) -> bool:
    """A training checkpoint folder (checkpoint-<step> with trainer_state.json), not a model directory."""
    path = Path(model)
    return (path / "trainer_state.json").is_file() and not (path / "modules.json").is_file()


def export_checkpoint_model(checkpoint: Path, out: Path, no_wise_ft: bool) -> dict[str, Any]:
    """Export a checkpoint to the sentence-transformers directory `out` as tools/export_checkpoint.py does (what
    final/ would be at that step); returns what the summary records about it."""
    from modules.export import checked_step, export_checkpoint

    step = checked_step(checkpoint, out, overwrite=False)
    with contextlib.redirect_stdout(sys.stderr), weight_file_errors(checkpoint):  # stdout: the libraries' prints
        kind, script, run_args, wise_ft = export_checkpoint(checkpoint, out, no_wise_ft, step)
    print(f"Exported the {kind} checkpoint {checkpoint} of {script} at step {step} for evaluation", file=sys.stderr)
    return {
        "path": str(checkpoint),
        "step": step,
        "kind": kind,
        "script": script,
        "wise_ft_alpha": run_args.wise_ft_alpha if wise_ft else None,
        "save_dtype": run_args.save_dtype,
    }

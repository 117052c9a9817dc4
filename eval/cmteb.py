"""The work behind eval/run_cmteb.py: tasks, model, mteb evaluation, summary and reports.

eval/run_cmteb.py parses the command line and imports this module afterwards (mteb, torch and
sentence-transformers take seconds to import), then calls `evaluate(args)`. Everything here can be used
on its own, e.g. `select_tasks`, `SentenceEncoder`, `weights_revision`, `build_summary`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import re
import string
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import datasets
import mteb
import numpy as np
import torch
from mteb.abstasks import AbsTask
from mteb.models import ModelMeta
from mteb.models.abs_encoder import AbsEncoder, get_prompt_name
from mteb.models.model_meta import ScoringFunction
from mteb.results import TaskResult
from mteb.types import PromptType
from safetensors import SafetensorError, safe_open
from sentence_transformers import SentenceTransformer
from tqdm.auto import tqdm

from local_tasks import as_local_tasks, folder_task
from modules.cli import UsageError
from modules.data import cut_texts
from modules.digests import files_digest, folder_files
from modules.json_files import finite_json, write_json
from modules.model import load_tokenizer
from modules.model_card import precision_table, update_cmteb_section
from modules.progress import clock
from modules.quantization import (  # comma_list: the parsing of --tasks, --types, --dims and --quantize
    FLOAT32,
    INT8,
    calibrated_ranges,
    comma_list,
    mteb_vectors,
    parse_dims,
    parse_quantizations,
    read_calibration_texts,
    truncate_embeddings,
)

BENCHMARK = "MTEB(cmn, v1)"
# C-MTEB's task types, in the order the summary lists them; other types follow alphabetically.
TYPE_ORDER = ("Retrieval", "Reranking", "PairClassification", "Clustering", "STS", "Classification")
# Task types whose queries get --query-instruction (the BGE / Piccolo convention).
QUERY_INSTRUCTION_TYPES = ("Retrieval", "Reranking")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class SetupError(UsageError):
    """A problem with the command line (tasks, types, dimensions, prompts), reported without a traceback."""


class ModelError(UsageError):
    """The model of --model cannot be used: unreadable weight files, non-finite embeddings."""


class NonFiniteScoreError(UsageError):
    """A score came out NaN or infinite; the reports record it as null and leave it out of the averages."""


# ---------------------------------------------------------------------------------------------------------
# Tasks


def select_tasks(benchmark_name: str, task_names: list[str], task_types: list[str]) -> list[AbsTask]:
    """Tasks by name (benchmark tasks keep the benchmark's splits), by type, or the whole benchmark."""
    try:
        benchmark = mteb.get_benchmark(benchmark_name)
    except (KeyError, ValueError) as error:
        raise SetupError(f"Unknown benchmark {benchmark_name!r}: {error}") from None
    benchmark_tasks = {task.metadata.name: task for task in benchmark.tasks}
    if task_names:
        tasks = [benchmark_tasks.get(name) or registry_task(name, benchmark_name) for name in task_names]
    elif task_types:
        tasks = tasks_of_types(list(benchmark_tasks.values()), task_types, benchmark_name)
    else:
        tasks = list(benchmark_tasks.values())
    return sorted(tasks, key=lambda task: type_rank(task.metadata.type))


def registry_task(name: str, benchmark_name: str) -> AbsTask:
    try:
        return mteb.get_task(name)
    except KeyError as error:
        raise SetupError(
            f"Unknown task {name!r}: not in {benchmark_name} nor in mteb's task registry ({error})."
        ) from None


def tasks_of_types(tasks: list[AbsTask], task_types: list[str], benchmark_name: str) -> list[AbsTask]:
    available = {task.metadata.type.lower(): task.metadata.type for task in tasks}
    unknown = [task_type for task_type in task_types if task_type.lower() not in available]
    if unknown:
        raise SetupError(
            f"Unknown task type(s) {unknown} for {benchmark_name}; available: {sorted(available.values())}."
        )
    wanted = {available[task_type.lower()] for task_type in task_types}
    return [task for task in tasks if task.metadata.type in wanted]


def type_rank(task_type: str) -> tuple[int, str]:
    return (TYPE_ORDER.index(task_type), "") if task_type in TYPE_ORDER else (len(TYPE_ORDER), task_type)


def benchmark_task_names(benchmark_name: str) -> list[str]:
    return [task.metadata.name for task in mteb.get_benchmark(benchmark_name).tasks]


def gather_tasks(args: argparse.Namespace) -> tuple[list[AbsTask], dict[str, dict[str, str]]]:
    """The tasks the command line asks for, and where each one's data come from.

    mteb tasks come from --tasks / --types (the whole benchmark when neither is given and there is no
    --local-task), read from --data-dir when given; --local-task folders add tasks of their own. Every local
    file is checked here, before any model is loaded.
    """
    task_names, task_types = comma_list(args.tasks), comma_list(args.types)
    local_folders = [Path(folder) for folder in args.local_task or []]
    tasks: list[AbsTask] = []
    if task_names or task_types or not local_folders:
        tasks = select_tasks(args.benchmark, task_names, task_types)
    if args.data_dir:
        if not args.data_dir.is_dir():
            raise SetupError(f"--data-dir {args.data_dir} is not a directory.")
        tasks = as_local_tasks(tasks, args.data_dir)
    sources = {task.metadata.name: mteb_task_source(task, args.data_dir) for task in tasks}
    for folder in local_folders:
        task = folder_task(folder)
        name = task.metadata.name
        if name in sources:
            raise SetupError(f"{folder / 'task.json'}: task name {name!r} is already taken by another task "
                             "of this run; give the local task a name of its own.")
        if is_mteb_task(name):
            raise SetupError(f"{folder / 'task.json'}: {name!r} is the name of an mteb task; give the local "
                             f"task a name of its own (--data-dir runs mteb's {name} on local files).")
        tasks.append(task)
        sources[name] = {"source": f"local folder {folder.resolve()}", "data_hash": task.local_task.revision}
    return sorted(tasks, key=lambda task: type_rank(task.metadata.type)), sources


def is_mteb_task(name: str) -> bool:
    try:
        mteb.get_task(name)
    except KeyError:
        return False
    return True


def mteb_task_source(task: AbsTask, data_dir: Path | None) -> dict[str, str]:
    if data_dir:
        return {"source": f"local files {Path(data_dir).resolve() / task.metadata.name}"}
    dataset = task.metadata.dataset
    return {"source": "huggingface hub", "dataset": dataset["path"], "revision": dataset.get("revision")}


# ---------------------------------------------------------------------------------------------------------
# Model and prompts


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


def read_prompts(path: Path | None) -> dict[str, str]:
    """Read a --prompts file, checking its keys against mteb's task names, task types and prompt types."""
    if path is None:
        return {}
    if not path.is_file():
        raise SetupError(f"--prompts file {path} not found.")
    try:
        prompts = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise SetupError(f"{path}:{error.lineno}: --prompts: invalid JSON ({error.msg}, column {error.colno}).") from None
    except UnicodeDecodeError as error:
        raise SetupError(f"{path}: --prompts: not UTF-8 text ({error.reason} at byte {error.start}).") from None
    if not isinstance(prompts, dict):
        raise SetupError(f"{path}: --prompts must hold a JSON object mapping prompt keys to prompt strings, "
                         f"not a {type(prompts).__name__}.")
    not_text = [key for key, value in prompts.items() if not isinstance(value, str)]
    if not_text:
        raise SetupError(f"{path}: --prompts: the prompt of {not_text[0]!r} must be a string, got {prompts[not_text[0]]!r}.")
    try:
        AbsEncoder.validate_task_to_prompt_name(prompts, raise_for_invalid_keys=True)
    except KeyError as error:
        raise SetupError(f"Invalid prompt keys in {path}: {error}") from None
    return prompts


def read_instruction_template(template: str | None) -> str | None:
    """The template with \\n read as a newline, checked to hold `{instruction}` and no other field (mteb fills
    it with `template.format(instruction=...)`; any other field would fail only once the model is loaded)."""
    if template is None:
        return None
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as error:
        raise SetupError(f"--instruction-template {template!r}: {error} (write a literal brace as {{{{ or }}}}).") from None
    unknown = [field for field in fields if field != "instruction"]
    if unknown:
        raise SetupError(f"--instruction-template {template!r}: unknown field {{{unknown[0]}}}; the only field "
                         "allowed is {instruction} (write a literal brace as {{ or }}).")
    if not fields:
        raise SetupError("--instruction-template must contain '{instruction}'.")
    return template.replace("\\n", "\n")


def merge_prompts(
    model_prompts: dict[str, str | None], file_prompts: dict[str, str], query_instruction: str | None
) -> dict[str, str]:
    """Prompts by mteb key: the model's own (non-empty) ones, then --prompts, then --query-instruction."""
    prompts = {key: value for key, value in model_prompts.items() if value}
    prompts.update(file_prompts)
    if query_instruction:
        prompts.update(
            {
                f"{task_type}-{PromptType.query.value}": query_instruction
                for task_type in QUERY_INSTRUCTION_TYPES
            }
        )
    return prompts


class SentenceEncoder(AbsEncoder):
    """mteb encoder around a SentenceTransformer, with explicit prompts, Matryoshka truncation and quantization.

    Each `encode` call passes all of its texts to `SentenceTransformer.encode`, which batches them sorted by
    length. With `reuse_embeddings`, full-size embeddings are kept (until `forget_embeddings`) so that each
    Matryoshka dimension and quantization of a task reuses one forward pass. The prompt given to every task and
    input kind is recorded in `prompts_used`.

    Quantized (`set_variant(dim, "int8" | "binary")`), `encode` returns `modules.quantization.mteb_vectors` of the
    truncated embeddings: int8 codes (ranges from the calibration embeddings cut to `dim`) or +-1 signs, for queries and
    documents alike, and mteb's similarity is cosine whatever the model's own: mteb's evaluators then score the cosine
    of the int8 codes, or a monotone map of the Hamming similarity (see that module).
    """

    def __init__(
        self,
        model: SentenceTransformer,
        meta: ModelMeta,
        prompts: dict[str, str],
        instruction_template: str | None = None,
        reuse_embeddings: bool = False,
        calibration: np.ndarray | None = None,
    ) -> None:
        self.model = model
        self.full_meta = meta
        self.mteb_model_meta = meta
        self.prompts = prompts
        self.instruction_template = instruction_template
        self.reuse_embeddings = reuse_embeddings
        self.calibration = calibration
        self.dim: int | None = None
        self.quantization = FLOAT32
        self.ranges: np.ndarray | None = None
        self.prompts_used: dict[str, dict[str, str | None]] = {}
        self._embeddings: dict[str, np.ndarray] = {}
        self.plain_progress = False  # a line per encoding (a log, not a terminal): evaluate_tasks sets it

    def set_variant(self, dim: int, quantization: str = FLOAT32) -> None:
        """Truncate embeddings to `dim` and quantize them from now on; each variant's results get their own mteb folder
        (experiments/embed_dim_<dim>__output_dtypes_<quantization>, mteb's names for both)."""
        self.dim = dim if dim < embedding_dimension(self.model) else None
        self.quantization = quantization
        self.ranges = calibrated_ranges(self.calibration, self.dim, quantization)
        experiment = {"embed_dim": self.dim} if self.dim else {}
        if quantization != FLOAT32:
            experiment["output_dtypes"] = quantization
        update: dict[str, Any] = {"experiment_kwargs": experiment} if experiment else {}
        if self.dim:
            update["embed_dim"] = self.dim
        if quantization != FLOAT32:
            update["similarity_fn_name"] = ScoringFunction.COSINE
        self.mteb_model_meta = self.full_meta.model_copy(update=update) if update else self.full_meta

    def forget_embeddings(self) -> None:
        self._embeddings.clear()

    def prompt_for(self, task_metadata: Any, prompt_type: PromptType | None) -> str | None:
        """The text prepended to inputs of this task and kind (query, document, or None for symmetric tasks).

        Order: a matching key in `prompts` (mteb's precedence: '<Task>-query', '<Task>', '<Type>-query',
        '<Type>', 'query'); else the instruction template filled with mteb's task instruction, except for
        documents; else the model's default prompt for symmetric inputs (sentence-transformers' rule).
        """
        key = get_prompt_name(self.prompts, task_metadata, prompt_type)
        if key is not None:
            return self.prompts[key]
        if self.instruction_template and prompt_type != PromptType.document:
            return self.get_task_instruction(task_metadata, prompt_type)
        default_name = self.model.default_prompt_name
        if prompt_type is None and default_name:
            return self.model.prompts.get(default_name) or None
        return None

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        if self.model.max_seq_length:  # a fast tokenizer reads a whole text before truncating: cut as training does
            texts = cut_texts(texts, self.model.max_seq_length)
        prompt = self.prompt_for(task_metadata, prompt_type)
        input_kind = prompt_type.value if prompt_type else "symmetric"
        self.prompts_used.setdefault(task_metadata.name, {})[input_kind] = prompt
        if self.plain_progress:
            print(f"C-MTEB: {task_metadata.name}: embedding {len(texts):,} {input_kind} texts", file=sys.stderr,
                  flush=True)
        embeddings = self._full_embeddings(
            texts,
            prompt,
            prompt_type,
            batch_size=kwargs.get("batch_size", 32),
            show_progress_bar=kwargs.get("show_progress_bar", True),
        )
        check_finite_embeddings(embeddings, texts, task_metadata.name, self.full_meta.name)
        return mteb_vectors(truncate_embeddings(embeddings, self.dim), self.quantization, self.ranges)

    def _full_embeddings(
        self, texts: list[str], prompt: str | None, prompt_type: PromptType | None, **encode_kwargs
    ) -> np.ndarray:
        key = content_key(texts, prompt, prompt_type)
        if key in self._embeddings:
            return self._embeddings[key]
        encode = {
            PromptType.query: self.model.encode_query,
            PromptType.document: self.model.encode_document,
        }.get(prompt_type, self.model.encode)
        # An explicit "" stops sentence-transformers from adding a prompt we did not choose and record.
        embeddings = np.asarray(
            encode(texts, prompt=prompt or "", convert_to_numpy=True, **encode_kwargs), dtype=np.float32
        )
        if self.reuse_embeddings:
            self._embeddings[key] = embeddings
        return embeddings


def check_finite_embeddings(embeddings: np.ndarray, texts: list[str], task_name: str, model_name: str) -> None:
    """Refuse NaN or infinite embeddings (e.g. fp16 overflow): mteb would fail on them or rank by noise."""
    bad = ~np.isfinite(embeddings).all(axis=1)
    if bad.any():
        first = texts[int(np.argmax(bad))]
        raise ModelError(
            f"model {model_name}: non-finite (NaN or infinite) embeddings for {int(bad.sum())} of {len(texts)} "
            f"texts of task {task_name}, e.g. {first[:60]!r} (half-precision overflow? try --precision fp32)."
        )


def content_key(texts: list[str], prompt: str | None, prompt_type: PromptType | None) -> str:
    digest = hashlib.sha1(f"{prompt_type}\x1e{prompt}".encode())
    for text in texts:
        digest.update(b"\x1f" + text.encode())
    return digest.hexdigest()


def resolve_dims(dims: str | None, full_dim: int) -> list[int]:
    """Sorted Matryoshka dimensions to evaluate, always including the model's full dimension."""
    try:
        return parse_dims(dims, full_dim)
    except UsageError as error:
        raise SetupError(str(error)) from None


def resolve_quantizations(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(--quantize's quantizations, float32 first; --calibration's texts, [] without int8), checked before the model
    loads. The calibration file may not be data this run scores (inside --data-dir or a --local-task folder)."""
    try:
        quantizations = parse_quantizations(args.quantize, args.calibration)
    except UsageError as error:
        raise SetupError(str(error)) from None
    if INT8 not in quantizations:
        return quantizations, []
    calibration = Path(args.calibration).resolve()
    for folder in [*([args.data_dir] if args.data_dir else []), *(args.local_task or [])]:
        if Path(folder).resolve() in calibration.parents:
            raise SetupError(f"--calibration {args.calibration} lies in {folder}, data this run scores: calibrate "
                             "int8 on other texts, e.g. the training file.")
    return quantizations, read_calibration_texts(args.calibration)


def calibration_record(path: Path | None, texts: list[str]) -> dict[str, Any] | None:
    """What the summary records of int8's calibration set: the file, how many texts, a hash of those texts."""
    if not texts:
        return None
    digest = hashlib.sha256("\x1f".join(texts).encode()).hexdigest()[:12]
    return {"file": str(path), "texts": len(texts), "texts_hash": digest}


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


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


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


# ---------------------------------------------------------------------------------------------------------
# Evaluation


def evaluate_tasks(
    encoder: SentenceEncoder,
    tasks: list[AbsTask],
    variants: list[tuple[int, str]],
    output_dir: Path,
    batch_size: int,
    progress: bool,
) -> dict[tuple[int, str], dict[str, TaskResult]]:
    """Run every task at every (dimension, quantization) with mteb; returns {(dim, quantization): {task name: mteb
    TaskResult}}."""
    cache = mteb.ResultCache(output_dir)
    interactive = progress and sys.stderr.isatty()  # bars on a terminal; plain lines in a log (slurm, nohup)
    if not interactive:
        datasets.disable_progress_bars()  # mteb's data loading: carriage-return bars garble a log
    encoder.plain_progress = progress and not interactive
    encode_kwargs = {"batch_size": batch_size, "show_progress_bar": interactive}
    results: dict[tuple[int, str], dict[str, TaskResult]] = {variant: {} for variant in variants}
    task_bar = tqdm(tasks, desc="C-MTEB", unit="task", disable=not interactive)
    started = time.perf_counter()
    for done, task in enumerate(task_bar):
        task_bar.set_postfix_str(task.metadata.name)
        if encoder.plain_progress:
            elapsed = time.perf_counter() - started
            left = f", about {clock(elapsed / done * (len(tasks) - done))} left" if done else ""
            print(f"C-MTEB: task {done + 1}/{len(tasks)} {task.metadata.name} ({task.metadata.type}), "
                  f"{clock(elapsed)} elapsed{left}", file=sys.stderr, flush=True)
        task.load_data()
        for variant in variants:
            encoder.set_variant(*variant)
            model_result = mteb.evaluate(
                encoder,
                task,
                cache=cache,
                overwrite_strategy="always",
                encode_kwargs=dict(encode_kwargs),
                co2_tracker=False,
                show_progress_bar=False,
            )
            results[variant][task.metadata.name] = model_result.task_results[0]
        encoder.forget_embeddings()
        task.unload_data()
    return results


def calibration_embeddings(
    model: SentenceTransformer, texts: list[str], batch_size: int, progress: bool
) -> np.ndarray | None:
    """Full-size embeddings of --calibration's texts (no prompt, cut as `SentenceEncoder.encode` cuts texts); None
    without texts."""
    if not texts:
        return None
    if model.max_seq_length:
        texts = cut_texts(texts, model.max_seq_length)
    embeddings = model.encode(texts, prompt="", convert_to_numpy=True, batch_size=batch_size,
                              show_progress_bar=progress)
    return np.asarray(embeddings, dtype=np.float32)


def leaderboard_scores(task_scores: dict[str, float], task_types: dict[str, str]) -> dict[str, Any]:
    """C-MTEB leaderboard numbers: task scores, per-type means, the mean over tasks and over types.

    A NaN or infinite task score becomes None and stays out of the means (a mean with a NaN is NaN, and JSON
    has no NaN); `score_row` lists it under `not_finite`."""
    scores = {name: finite_or_none(score) for name, score in task_scores.items()}
    types = {}
    for task_type in sorted(set(task_types[name] for name in scores), key=type_rank):
        types[task_type] = mean_or_none(score for name, score in scores.items() if task_types[name] == task_type)
    return {
        "tasks": scores,
        "types": types,
        "average": mean_or_none(scores.values()),
        "average_by_type": mean_or_none(types.values()),
    }


def finite_or_none(score: float) -> float | None:
    return score if math.isfinite(score) else None


def mean_or_none(scores: Any) -> float | None:
    """The mean of the scores that are not None; None when there are none."""
    present = [score for score in scores if score is not None]
    return float(np.mean(present)) if present else None


def main_scores(task_results: dict[str, TaskResult]) -> dict[str, float]:
    """Each task's main score x 100, averaged over its evaluated splits and subsets (mteb's get_score)."""
    return {name: 100 * float(result.get_score()) for name, result in task_results.items()}


def pair_ap_scores(task_results: dict[str, TaskResult], task_types: dict[str, str]) -> dict[str, float]:
    """max_ap x 100 of each PairClassification task (its main score is max_accuracy), averaged like it."""
    return {
        name: 100 * float(result.get_score(getter=lambda scores: scores["max_ap"]))
        for name, result in task_results.items()
        if task_types[name] == "PairClassification"
    }


def score_row(
    task_results: dict[str, TaskResult], task_types: dict[str, str], metrics: dict[str, str]
) -> dict[str, Any]:
    """One row of scores (see `leaderboard_scores`); `not_finite` lists the scores recorded as None, as
    'Task: metric = value', where `metrics` gives each task's main score."""
    main = main_scores(task_results)
    row = leaderboard_scores(main, task_types)
    pair_ap = pair_ap_scores(task_results, task_types)
    if pair_ap:
        row["pair_ap"] = {name: finite_or_none(score) for name, score in pair_ap.items()}
    not_finite = [f"{name}: {metrics[name]} = {score}" for name, score in main.items() if not math.isfinite(score)]
    not_finite += [f"{name}: max_ap = {score}" for name, score in pair_ap.items() if not math.isfinite(score)]
    if not_finite:
        row["not_finite"] = not_finite
    return row


def not_finite_scores(summary: dict[str, Any]) -> list[str]:
    """Every score of the summary's rows that was NaN or infinite (recorded as null), with its dimension (and
    quantization)."""
    rows = summary.get("dims") or [{"dim": summary["model"]["embedding_dim"], **summary}]
    rows = [*rows, *summary.get("quantized", [])]
    return [f"{entry} (dim {row['dim']}{', ' + row['quantization'] if 'quantization' in row else ''})"
            for row in rows for entry in row.get("not_finite", [])]


def benchmark_coverage(
    benchmark_name: str, benchmark_tasks: list[str], evaluated: list[str], not_finite: Sequence[str] = ()
) -> dict[str, Any]:
    """How much of the benchmark the averages cover: 'full (31 of 31 tasks)' only when they are exactly the
    benchmark's tasks; else 'partial (k of 31 tasks)', naming the tasks outside the benchmark (local ones
    included) that the averages also hold, and the tasks run but left out of them (`not_finite`: a NaN score)."""
    evaluated = [name for name in evaluated if name not in not_finite]
    in_benchmark = [name for name in evaluated if name in benchmark_tasks]
    others = [name for name in evaluated if name not in benchmark_tasks]
    total = len(benchmark_tasks)
    full = len(in_benchmark) == total and not others
    label = f"{'full' if full else 'partial'} ({len(in_benchmark)} of {total} tasks)"
    if others:
        label += f" + {len(others)} task{'s' if len(others) > 1 else ''} outside {benchmark_name}: {', '.join(others)}"
    if not_finite:
        label += f"; left out (score not finite): {', '.join(not_finite)}"
    return {
        "benchmark": benchmark_name,
        "benchmark_tasks": total,
        "evaluated_benchmark_tasks": len(in_benchmark),
        "other_tasks": others,
        "not_finite": list(not_finite),
        "full": full,
        "label": label,
    }


def mteb_data_source(args: argparse.Namespace, tasks: list[AbsTask]) -> str:
    """Where the mteb tasks' data come from (local --local-task folders are listed apart)."""
    if not any(not hasattr(task, "local_task") for task in tasks):
        return "local task folders only"
    return str(args.data_dir) if args.data_dir else "huggingface hub"


def build_summary(
    args: argparse.Namespace,
    model: SentenceTransformer,
    encoder: SentenceEncoder,
    tasks: list[AbsTask],
    dims: list[int],
    results: dict[tuple[int, str], dict[str, TaskResult]],
    sources: dict[str, dict[str, str]] | None = None,
    checkpoint: dict[str, Any] | None = None,
    results_dir: Path | None = None,
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary of a run; `results` by (dim, quantization) as `evaluate_tasks` returns them."""
    task_types = {task.metadata.name: task.metadata.type for task in tasks}
    metrics = {task.metadata.name: task.metadata.main_score for task in tasks}
    full_dim = max(dims)
    full_row = score_row(results[(full_dim, FLOAT32)], task_types, metrics)
    quantizations = list(dict.fromkeys(quantization for _, quantization in results))
    summary = {
        "model": {
            "path": str(args.model),
            "name": encoder.full_meta.name,
            "revision": encoder.full_meta.revision,
            "checkpoint": checkpoint,
            "embedding_dim": full_dim,
            "max_seq_length": model.max_seq_length,
            "similarity_fn": model.similarity_fn_name,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "device": str(model.device),
            "model_prompts": dict(model.prompts),
        },
        "versions": {
            package: version(package)
            for package in ("mteb", "sentence-transformers", "transformers", "torch")
        },
        "settings": {
            "benchmark": args.benchmark,
            "data": mteb_data_source(args, tasks),
            "local_tasks": [str(folder) for folder in getattr(args, "local_task", None) or []],
            "batch_size": args.batch_size,
            "dims": dims if args.dims else None,
            "quantize": quantizations[1:] or None,
            "calibration": calibration,
            "query_instruction": args.query_instruction,
            "instruction_template": encoder.instruction_template,
            "prompts": encoder.prompts,
        },
        "results_dir": str(results_dir) if results_dir else None,
        "coverage": benchmark_coverage(
            args.benchmark,
            benchmark_task_names(args.benchmark),
            [task.metadata.name for task in tasks],
            [name for name, score in full_row["tasks"].items() if score is None],
        ),
        "splits": {task.metadata.name: list(task.eval_splits) for task in tasks},
        "task_types": task_types,
        "sources": sources or {},
        **full_row,
        "prompts_used": encoder.prompts_used,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if args.dims:
        summary["dims"] = [{"dim": dim, **score_row(results[(dim, FLOAT32)], task_types, metrics)} for dim in dims]
    if len(quantizations) > 1:
        summary["quantized"] = [
            {"dim": dim, "quantization": quantization, **score_row(results[(dim, quantization)], task_types, metrics)}
            for dim in dims for quantization in quantizations[1:]
        ]
    return summary


# ---------------------------------------------------------------------------------------------------------
# Reports


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


# ---------------------------------------------------------------------------------------------------------
# The whole evaluation


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate as the parsed command line asks and write the reports; returns the summary."""
    tasks, sources = gather_tasks(args)
    prompts = read_prompts(args.prompts)
    template = read_instruction_template(args.instruction_template)
    quantizations, calibration_texts = resolve_quantizations(args)

    with contextlib.ExitStack() as stack:
        model_dir, checkpoint = str(args.model), None
        if is_checkpoint(args.model):
            export_root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cmteb_checkpoint_")))
            checkpoint = export_checkpoint_model(Path(args.model), export_root / "model", args.no_wise_ft)
            model_dir = str(export_root / "model")
        model = load_model(model_dir, args.device, args.precision, args.max_seq_length)
        reading = model_reading(model, Path(model_dir))
        print(f"model {args.model}: {reading}", file=sys.stderr, flush=True)
        revision = model_revision(model_dir, model)
        dims = resolve_dims(args.dims, embedding_dimension(model))
        variants = [(dim, quantization) for dim in dims for quantization in quantizations]
        name = args.model_name or default_model_name(args.model)
        encoder = SentenceEncoder(
            model,
            build_model_meta(model, name, revision),
            merge_prompts(model.prompts, prompts, args.query_instruction),
            instruction_template=template,
            reuse_embeddings=len(variants) > 1,
            calibration=calibration_embeddings(model, calibration_texts, args.batch_size, not args.no_progress),
        )
        output_dir = args.output_dir or Path("runs/cmteb") / name.replace("/", "__")
        results = evaluate_tasks(
            encoder, tasks, variants, output_dir, args.batch_size, progress=not args.no_progress
        )
    meta = encoder.full_meta
    results_dir = output_dir / "results" / meta.model_name_as_path() / meta.revision
    strict_result_files(results_dir)
    calibration = calibration_record(args.calibration, calibration_texts)
    summary = build_summary(args, model, encoder, tasks, dims, results, sources, checkpoint, results_dir, calibration)
    summary["model"]["read_as"] = reading
    print(write_reports(summary, output_dir))
    print(f"Results in {output_dir}")
    not_finite = not_finite_scores(summary)
    if not_finite:  # reported, not averaged; the model card keeps its last complete scores
        raise NonFiniteScoreError(f"{output_dir / 'summary.json'}: score not finite, recorded as null and left "
                                  f"out of the averages: {'; '.join(not_finite)}")
    if update_cmteb_section(args.model, summary):  # the model directory's card is one a training run wrote
        print(f"C-MTEB section of {Path(args.model) / 'README.md'} updated")
    return summary

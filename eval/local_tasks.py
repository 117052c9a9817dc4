"""Run mteb tasks on local files instead of data sets from the Hugging Face hub.

Each task keeps its real mteb class (metadata, evaluator, metrics, main score); only the loading step is
replaced. `as_local_task` builds a subclass of the task's own class whose `load_data` reads
`DATA_DIR/<TaskName>/` in the layout described in eval/README.md:

- STS: `<split>.jsonl` with `sentence1`, `sentence2`, `score`.
- PairClassification: `<split>.jsonl` with `sentence1`, `sentence2`, `label` (0/1).
- Classification: `<train split>.jsonl` and `<split>.jsonl` with `text`, `label`.
- Clustering: `<split>.jsonl` with `sentences`, `labels` (for C-MTEB's legacy clustering tasks one line is
  one clustering set, holding a list of sentences and a list of labels).
- Retrieval and Reranking: the BEIR layout read by modules/beir.py: `corpus.jsonl` (`_id`, `title`, `text`),
  `queries.jsonl` (`_id`, `text`), `qrels/<split>.tsv` (`query-id corpus-id score`), and for reranking
  `top_ranked/<split>.jsonl` (`query-id`, `corpus-ids`: the candidates to rerank).

Multilingual tasks have one such folder per hf subset: `DATA_DIR/<TaskName>/<subset>/`.

The files are taken as the evaluation data as they are: a task's hub-specific `dataset_transform` (column
renames, subsampling) is not applied, and local columns are mapped onto the columns the task class reads.
Anything that would make mteb fail or silently score something else (a text where a number belongs, a
duplicate id, a judgement of a document or query the files do not hold, STS scores that never vary) is a
LocalDataError naming `file:line`.

`folder_task` builds a task of one's own from a folder with a `task.json` (read by modules/task_folders.py):
a subclass of mteb's abstract task class of its type (AbsTaskSTS, AbsTaskPairClassification,
AbsTaskRetrieval) with metadata from task.json, evaluated by mteb's evaluator of that type.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict
from mteb.abstasks import (
    AbsTask,
    AbsTaskClassification,
    AbsTaskClustering,
    AbsTaskPairClassification,
    AbsTaskRetrieval,
    AbsTaskSTS,
)
from mteb.abstasks.clustering_legacy import AbsTaskClusteringLegacy
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.languages.check_language_code import check_language_code

from modules.beir import read_retrieval_split
from modules.cli import DataError
from modules.task_folders import read_task_folder

TOP_RANKED_COLUMNS = ("query-id", "corpus-ids")
README_HINT = "see eval/README.md, 'Offline evaluation from local files'"


class LocalDataError(DataError):
    """A local task folder is missing, incomplete or malformed."""


def as_local_task(task: AbsTask, data_dir: Path | str) -> AbsTask:
    """Return a copy of `task` (same class, metadata, splits and subsets) that loads its data from `data_dir`.

    The files are checked here (every record of a retrieval folder, the presence and columns of the first record
    of the others), so that a broken folder fails before any model is loaded; every record is checked when the data
    are loaded.
    """
    task_class = type(task)
    local_class = type(
        task_class.__name__,
        (LocalDataTask, task_class),
        {"__doc__": f"{task_class.__name__} read from local files.", "__module__": __name__,
         "read_local_data": load_local_dataset},
    )
    local_task = local_class(seed=task.seed)
    local_task.task_dir = Path(data_dir) / task.metadata.name
    local_task.hf_subsets = list(task.hf_subsets)
    local_task._eval_splits = task._eval_splits
    check_local_files(local_task)
    return local_task


def as_local_tasks(tasks: Sequence[AbsTask], data_dir: Path | str) -> list[AbsTask]:
    """`as_local_task` for each task; the problems of all tasks are reported together."""
    local_tasks, problems = [], []
    for task in tasks:
        try:
            local_tasks.append(as_local_task(task, data_dir))
        except LocalDataError as error:
            problems.append(str(error))
    if problems:
        raise LocalDataError("\n".join(problems))
    return local_tasks


class LocalDataTask:
    """Mixin placed before an mteb task class: replaces its hub download by `read_local_data(task)`, set by the
    subclass (local files under `task_dir`: `load_local_dataset`; a task.json folder: `folder_dataset`)."""

    read_local_data: Callable[[AbsTask], Any]

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        self.dataset = self.read_local_data()
        self.data_loaded = True


def check_local_files(task: AbsTask) -> None:
    """Check that every file the task needs exists and that its first record has the expected columns."""
    if not task.task_dir.is_dir():
        raise LocalDataError(
            f"No local data for task {task.metadata.name}: {task.task_dir} is not a directory "
            f"({README_HINT})."
        )
    _read_task_data(task, max_rows=1)


def load_local_dataset(task: AbsTask) -> dict[str, Any] | DatasetDict:
    """Read all of the task's local files into the structure its mteb class evaluates."""
    return _read_task_data(task, max_rows=None)


def _read_task_data(task: AbsTask, max_rows: int | None) -> dict[str, Any] | DatasetDict:
    read_subset = _read_retrieval_subset if isinstance(task, AbsTaskRetrieval) else _read_flat_subset
    subsets = {subset: read_subset(task, folder, max_rows) for subset, folder in _subset_folders(task)}
    if isinstance(task, AbsTaskRetrieval) or task.metadata.is_multilingual:
        return subsets
    return subsets["default"]


def _subset_folders(task: AbsTask) -> Iterator[tuple[str, Path]]:
    if not task.metadata.is_multilingual:
        yield "default", task.task_dir
        return
    for subset in task.hf_subsets:
        yield subset, task.task_dir / subset


# ---------------------------------------------------------------------------------------------------------
# STS, pair classification, classification and clustering: one jsonl file per split


def local_columns(task: AbsTask) -> dict[str, str]:
    """Map the local file's columns to the columns the task's mteb class reads."""
    if isinstance(task, AbsTaskSTS):
        first, second = task.column_names
        return {
            "sentence1": _text_column(task, first),
            "sentence2": _text_column(task, second),
            "score": "score",
        }
    if isinstance(task, AbsTaskPairClassification):
        return {
            "sentence1": _text_column(task, task.input1_column_name),
            "sentence2": _text_column(task, task.input2_column_name),
            "label": task.label_column_name,
        }
    if isinstance(task, AbsTaskClassification):
        return {"text": _text_column(task, task.input_column_name), "label": task.label_column_name}
    if isinstance(task, (AbsTaskClustering, AbsTaskClusteringLegacy)):
        return {"sentences": _text_column(task, task.input_column_name), "labels": task.label_column_name}
    raise LocalDataError(
        f"Task {task.metadata.name} ({_task_family(task)}) cannot be read from local files: "
        "supported are Retrieval, Reranking, STS, PairClassification, Classification and Clustering tasks."
    )


def _task_family(task: AbsTask) -> str:
    """The name of the abstract mteb class the task derives from, e.g. `AbsTaskBitextMining`."""
    return next(cls.__name__ for cls in type(task).__mro__ if cls.__name__.startswith("AbsTask"))


def _text_column(task: AbsTask, column: Any) -> str:
    if not isinstance(column, str):
        raise LocalDataError(f"Task {task.metadata.name} is not a text task; local files hold text only.")
    return column


def _read_flat_subset(task: AbsTask, folder: Path, max_rows: int | None) -> DatasetDict:
    columns = local_columns(task)
    splits = list(task.eval_splits)
    if isinstance(task, AbsTaskClassification) and task.train_split not in splits:
        splits.append(task.train_split)
    gold = GOLD_COLUMNS.get(task.metadata.type)
    datasets = {}
    for split in splits:
        path = folder / f"{split}.jsonl"
        rows = [checked_row(task, f"{path}:{line}", row, columns) for line, row in read_jsonl(path, columns, max_rows)]
        if gold and max_rows is None:
            check_gold_varies(task.metadata.type, path, [row[gold] for row in rows])
        datasets[split] = [{columns[local]: value for local, value in row.items()} for row in rows]
    if isinstance(task, AbsTaskClassification):
        _label_names_to_ids(datasets, task.label_column_name)
    return DatasetDict({split: Dataset.from_list(rows) for split, rows in datasets.items()})


# The gold column of a record (local files and task.json folders alike), by task type.
GOLD_COLUMNS = {"STS": "score", "PairClassification": "label"}


def checked_row(task: AbsTask, where: str, row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """The record's values of `columns` (local names), each checked to be of the kind mteb reads there, so that
    a bad value is reported at `where` (file:line) rather than as an error of pyarrow or of mteb."""
    values = {local: row[local] for local in columns}
    for local in ("sentence1", "sentence2", "text"):
        if local in values and not isinstance(values[local], str):
            raise LocalDataError(f"{where}: column {local!r} must be a string, got {values[local]!r}.")
    label = values.get("label")
    if isinstance(task, AbsTaskSTS):
        finite_number(where, "score", values["score"])
    elif isinstance(task, AbsTaskPairClassification) and (isinstance(label, bool) or label not in (0, 1)):
        raise LocalDataError(f"{where}: column 'label' must be 0 or 1, got {label!r}.")
    elif isinstance(task, AbsTaskClassification) and (isinstance(label, bool) or not isinstance(label, (int, str))):
        raise LocalDataError(f"{where}: column 'label' must be an integer or a class name, got {label!r}.")
    return values


def finite_number(where: str, column: str, value: Any) -> float:
    """`value` when it is a finite number (not a bool, not a string); a LocalDataError naming `where` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LocalDataError(f"{where}: column {column!r} must be a finite number, got {value!r}.")
    return value


def check_gold_varies(task_type: str, path: Path, gold: Sequence[Any]) -> None:
    """Refuse an STS split whose scores all agree (Pearson and Spearman are then undefined: mteb reports NaN)
    and a pair classification split with one label only (its average precision is undefined or trivially 1)."""
    if len(set(gold)) > 1:
        return
    if task_type == "STS":
        raise LocalDataError(f"{path}: every score is {gold[0]!r}; an STS task's correlations (Spearman, Pearson) "
                             "are undefined unless the gold scores vary.")
    raise LocalDataError(f"{path}: every label is {gold[0]!r}; pair classification needs labels 0 and 1.")


def _label_names_to_ids(splits: dict[str, list[dict[str, Any]]], column: str) -> None:
    """Replace string class labels by ids (sorted names, same in every split), as mteb expects."""
    names = sorted({row[column] for rows in splits.values() for row in rows if isinstance(row[column], str)})
    label_ids = {name: index for index, name in enumerate(names)}
    for rows in splits.values():
        for row in rows:
            row[column] = label_ids.get(row[column], row[column])


# ---------------------------------------------------------------------------------------------------------
# Retrieval and reranking: BEIR layout


def _read_retrieval_subset(
    task: AbsTaskRetrieval, folder: Path, max_rows: int | None
) -> dict[str, RetrievalSplitData]:
    """Every split of the folder, read whole (modules/beir.py) whatever `max_rows`: the checks across files need
    whole files. With `max_rows` (the check before the model loads) the files are only checked: no datasets are
    built, and the splits are left out."""
    splits = {}
    for split in task.eval_splits:
        try:
            data = read_retrieval_split(folder, split, len(task.eval_splits))
        except DataError as error:
            raise LocalDataError(f"{error} ({README_HINT})") from None
        top_ranked_path = folder / "top_ranked" / f"{split}.jsonl"
        if top_ranked_path.exists():
            top_ranked = read_top_ranked(top_ranked_path, set(data.corpus), set(data.queries))
        elif task.metadata.type == "Reranking":
            raise LocalDataError(
                f"Reranking task {task.metadata.name} needs its candidates in {top_ranked_path} "
                f"({README_HINT})."
            )
        else:
            top_ranked = None
        if max_rows is None:
            splits[split] = retrieval_split_data(data.queries, data.corpus, data.qrels, top_ranked)
    return splits


def retrieval_split_data(
    queries: dict[str, str], corpus: dict[str, dict[str, str]], qrels: dict[str, dict[str, int]],
    top_ranked: dict[str, list[str]] | None = None,
) -> RetrievalSplitData:
    """A split as modules/beir.py reads it, in the datasets mteb's retrieval evaluator takes (it joins title and
    text itself)."""
    return RetrievalSplitData(
        corpus=Dataset.from_list([{"id": doc_id, **document} for doc_id, document in corpus.items()]),
        queries=Dataset.from_list([{"id": query_id, "text": text} for query_id, text in queries.items()]),
        relevant_docs=qrels,
        top_ranked=top_ranked,
    )


def check_known(where: str, kind: str, item_id: str, known: set[str], file_name: str) -> None:
    """Refuse an id that is not among `known`."""
    if item_id not in known:
        raise LocalDataError(f"{where}: {kind} {item_id!r} is not in {file_name}.")


def read_top_ranked(path: Path, corpus_ids: set[str], query_ids: set[str]) -> dict[str, list[str]]:
    """Read the candidate documents of each query of a reranking task, each a document of corpus.jsonl for a judged
    query."""
    top_ranked = {}
    for line, row in read_jsonl(path, TOP_RANKED_COLUMNS):
        where = f"{path}:{line}"
        if not isinstance(row["corpus-ids"], list):
            raise LocalDataError(f"{where}: column 'corpus-ids' must be a list of document ids.")
        query_id, doc_ids = str(row["query-id"]), [str(doc_id) for doc_id in row["corpus-ids"]]
        check_known(where, "query", query_id, query_ids, "the judged queries of queries.jsonl")
        for doc_id in doc_ids:
            check_known(where, "document", doc_id, corpus_ids, "corpus.jsonl")
        top_ranked[query_id] = doc_ids
    return top_ranked


def read_jsonl(
    path: Path, required_columns: Sequence[str], max_rows: int | None = None
) -> list[tuple[int, dict[str, Any]]]:
    """Read up to `max_rows` records from a JSON-lines file, checking that each is an object with
    `required_columns`; returns (line number, record) pairs, so that later checks can name the line."""
    if not path.is_file():
        raise LocalDataError(f"Missing file {path} ({README_HINT}).")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise LocalDataError(f"{path}:{line_number}: not valid JSON ({error}).") from None
            if not isinstance(row, dict):
                raise LocalDataError(f"{path}:{line_number}: a record must be a JSON object, got {line.strip()[:40]}.")
            missing = [column for column in required_columns if column not in row]
            if missing:
                raise LocalDataError(
                    f"{path}:{line_number}: missing column(s) {missing}; the record has {sorted(row)}."
                )
            rows.append((line_number, row))
            if max_rows is not None and len(rows) >= max_rows:
                break
    if not rows:
        raise LocalDataError(f"{path} holds no records.")
    return rows


# ---------------------------------------------------------------------------------------------------------
# Tasks of one's own: a folder with task.json (modules/task_folders.py)

FOLDER_TASK_CLASSES = {
    "STS": AbsTaskSTS,
    "PairClassification": AbsTaskPairClassification,
    "Retrieval": AbsTaskRetrieval,
}
_SIMILARITIES = ("similarity", "cosine", "manhattan", "euclidean", "dot")
# The scores mteb's evaluator of each type reports, i.e. the possible main scores.
STS_SCORES = ("pearson", "spearman") + tuple(
    f"{similarity}_{kind}" for similarity in ("cosine", "manhattan", "euclidean") for kind in ("pearson", "spearman")
)
PAIR_CLASSIFICATION_SCORES = tuple(
    f"{prefix}_{metric}"
    for prefix in (*_SIMILARITIES, "max")
    for metric in ("accuracy", "f1", "precision", "recall", "ap")
)
RETRIEVAL_SCORES = tuple(
    f"{metric}_at_{k}"
    for metric in ("ndcg", "map", "recall", "precision", "mrr")
    for k in (1, 3, 5, 10, 20, 100, 1000)
)
MAIN_SCORES = {"STS": STS_SCORES, "PairClassification": PAIR_CLASSIFICATION_SCORES, "Retrieval": RETRIEVAL_SCORES}


def folder_task(folder: Path | str) -> AbsTask:
    """An mteb task for a folder with a task.json (checked here, with its data files; DataError otherwise).

    Its metadata: the name, type, languages, splits and main score of task.json, and the dataset
    `{"path": "local/<name>", "revision": <hash of task.json and the data files>}`.
    """
    folder = Path(folder)
    spec = read_task_folder(folder)
    spec_file = folder / "task.json"
    for code in spec.language:
        try:
            check_language_code(code)
        except (ValueError, TypeError) as error:
            raise LocalDataError(f"{spec_file}: language {code!r} is not an ISO 639-3 code mteb knows ({error})") from None
    allowed = MAIN_SCORES[spec.type]
    if spec.main_score not in allowed:
        raise LocalDataError(
            f"{spec_file}: main_score {spec.main_score!r} is not a score mteb computes for {spec.type} tasks; "
            f"one of {', '.join(allowed)}"
        )
    metadata = TaskMetadata(
        name=spec.name,
        description=spec.description or f"Local {spec.type} task of the folder {folder.resolve()} (task.json).",
        reference=None,
        dataset={"path": f"local/{spec.name}", "revision": spec.revision},
        type=spec.type,
        category="t2t",
        modalities=["text"],
        eval_splits=list(spec.splits),
        eval_langs=list(spec.language),
        main_score=spec.main_score,
        date=None,
        domains=None,
        task_subtypes=None,
        license="not specified",
        annotations_creators=None,
        dialect=[],
        sample_creation=None,
        bibtex_citation="",
    )
    for split in spec.splits:  # every record checked (and kept) before any model is loaded
        data = spec.split_data(split)
        if spec.type in GOLD_COLUMNS:
            check_gold_varies(spec.type, folder / f"{split}.jsonl", data[GOLD_COLUMNS[spec.type]])
    base = FOLDER_TASK_CLASSES[spec.type]
    task_class = type(
        _class_name(spec.name),
        (LocalDataTask, base),
        {"metadata": metadata, "__doc__": f"{spec.name}: a local {spec.type} task.", "__module__": __name__,
         "read_local_data": folder_dataset},
    )
    task = task_class()
    task.local_task = spec
    return task


def _class_name(name: str) -> str:
    cleaned = "".join(char if char.isalnum() else "_" for char in name)
    return cleaned if cleaned[:1].isalpha() else f"Task_{cleaned}"


def folder_dataset(task: AbsTask) -> DatasetDict | dict[str, dict[str, RetrievalSplitData]]:
    """The folder's data (LocalTask.split_data) in the structure mteb's class of its type evaluates."""
    spec = task.local_task
    if isinstance(task, AbsTaskRetrieval):
        splits = {}
        for split in task.eval_splits:
            data = spec.split_data(split)
            splits[split] = retrieval_split_data(data["queries"], data["corpus"], data["qrels"])
        return {"default": splits}
    datasets = {}
    for split in task.eval_splits:
        data = spec.split_data(split)
        if isinstance(task, AbsTaskSTS):
            first, second = task.column_names
            columns = {first: data["sentence1"], second: data["sentence2"], "score": data["score"]}
        else:
            columns = {
                task.input1_column_name: data["sentence1"],
                task.input2_column_name: data["sentence2"],
                task.label_column_name: data["label"],
            }
        datasets[split] = Dataset.from_dict(columns)
    return DatasetDict(datasets)

"""Run mteb tasks on local files instead of data sets from the Hugging Face hub.

Each task keeps its real mteb class (metadata, evaluator, metrics, main score); only the loading step is
replaced. `as_local_task` builds a subclass of the task's own class whose `load_data` reads
`DATA_DIR/<TaskName>/` in the layout described in eval/README.md:

- STS: `<split>.jsonl` with `sentence1`, `sentence2`, `score`.
- PairClassification: `<split>.jsonl` with `sentence1`, `sentence2`, `label` (0/1).
- Classification: `<train split>.jsonl` and `<split>.jsonl` with `text`, `label`.
- Clustering: `<split>.jsonl` with `sentences`, `labels` (for C-MTEB's legacy clustering tasks one line is
  one clustering set, holding a list of sentences and a list of labels).
- Retrieval and Reranking: `corpus.jsonl` (`_id`, `title`, `text`), `queries.jsonl` (`_id`, `text`),
  `qrels/<split>.tsv` (`query-id corpus-id score`), and for reranking `top_ranked/<split>.jsonl`
  (`query-id`, `corpus-ids`: the candidates to rerank).

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

import csv
import json
import math
from collections.abc import Iterator, Sequence
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

from modules.cli import DataError
from modules.task_folders import LocalTask, read_task_folder

QRELS_COLUMNS = ("query-id", "corpus-id", "score")
TOP_RANKED_COLUMNS = ("query-id", "corpus-ids")
README_HINT = "see eval/README.md, 'Offline evaluation from local files'"


class LocalDataError(DataError):
    """A local task folder is missing, incomplete or malformed."""


def as_local_task(task: AbsTask, data_dir: Path | str) -> AbsTask:
    """Return a copy of `task` (same class, metadata, splits and subsets) that loads its data from `data_dir`.

    The files are checked here (presence and columns of the first record), so that a broken folder fails
    before any model is loaded; every record is checked when the data are loaded.
    """
    task_class = type(task)
    local_class = type(
        task_class.__name__,
        (LocalFilesTask, task_class),
        {"__doc__": f"{task_class.__name__} read from local files.", "__module__": __name__},
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


class LocalFilesTask:
    """Mixin placed before a real mteb task class: replaces its hub download by reading `task_dir`."""

    task_dir: Path

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        self.dataset = load_local_dataset(self)
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
    corpus = _read_documents(folder / "corpus.jsonl", max_rows, with_title=True)
    queries = _read_documents(folder / "queries.jsonl", max_rows)
    # Cross-file checks need whole files: with max_rows (the check before the model loads) they wait.
    known = {} if max_rows else {"corpus_ids": set(corpus["id"]), "query_ids": set(queries["id"])}
    splits = {}
    for split in task.eval_splits:
        relevant_docs = read_qrels(folder / "qrels" / f"{split}.tsv", max_rows, **known)
        top_ranked_path = folder / "top_ranked" / f"{split}.jsonl"
        if top_ranked_path.exists():
            top_ranked = read_top_ranked(top_ranked_path, max_rows, **known)
        elif task.metadata.type == "Reranking":
            raise LocalDataError(
                f"Reranking task {task.metadata.name} needs its candidates in {top_ranked_path} "
                f"({README_HINT})."
            )
        else:
            top_ranked = None
        splits[split] = RetrievalSplitData(
            corpus=corpus,
            queries=_queries_with_qrels(queries, relevant_docs),
            relevant_docs=relevant_docs,
            top_ranked=top_ranked,
        )
    return splits


def _read_documents(path: Path, max_rows: int | None, with_title: bool = False) -> Dataset:
    """Read a corpus or queries file; ids may be called `_id` (BEIR, mteb) or `id`, and each occurs once (a
    second document of an id would replace the first one in mteb's scoring)."""
    records, first_line = [], {}
    for line, row in read_jsonl(path, ("text",), max_rows):
        where = f"{path}:{line}"
        row_id = row.get("_id", row.get("id"))
        if row_id is None:
            raise LocalDataError(f"{where}: no `_id` (or `id`) column; the record has {sorted(row)}.")
        row_id = str(row_id)
        if row_id in first_line:
            raise LocalDataError(f"{where}: id {row_id!r} occurs twice (first at line {first_line[row_id]}).")
        first_line[row_id] = line
        record = {"id": row_id, "text": row["text"]}
        if with_title:  # every document gets one: a column missing from some records reads as None in mteb
            record["title"] = row.get("title") or ""
        for column, value in record.items():
            if not isinstance(value, str):
                raise LocalDataError(f"{where}: column {column!r} must be a string, got {value!r}.")
        records.append(record)
    return Dataset.from_list(records)


def _queries_with_qrels(queries: Dataset, relevant_docs: dict[str, dict[str, int]]) -> Dataset:
    """Keep the queries that have judgements, as mteb's hub loader does."""
    keep = [index for index, query_id in enumerate(queries["id"]) if query_id in relevant_docs]
    return queries.select(keep)


def read_qrels(
    path: Path,
    max_rows: int | None = None,
    corpus_ids: set[str] | None = None,
    query_ids: set[str] | None = None,
) -> dict[str, dict[str, int]]:
    """Read a TREC-style qrels TSV with the header `query-id corpus-id score`.

    With `corpus_ids` / `query_ids` every row must judge a document of corpus.jsonl and a query of
    queries.jsonl: a judgement of a missing document scores 0 unseen, one of a missing query is dropped. The
    first row that does not is reported, as `file:line`.
    """
    if not path.is_file():
        raise LocalDataError(f"Missing file {path} ({README_HINT}).")
    relevant_docs: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        missing = [column for column in QRELS_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise LocalDataError(
                f"{path}: missing column(s) {missing} in the header; found {reader.fieldnames}. "
                "The first line must be `query-id<TAB>corpus-id<TAB>score`."
            )
        for row_number, row in enumerate(reader, start=1):
            where = f"{path}:{reader.line_num}"
            query_id, doc_id, score = (row[column] for column in QRELS_COLUMNS)
            if not (query_id and doc_id and score):
                raise LocalDataError(f"{where}: expected query-id, corpus-id and score, tab-separated; got {row}.")
            try:
                number = float(score)
            except ValueError:
                raise LocalDataError(f"{where}: column 'score' must be a number, got {score!r}.") from None
            score = int(finite_number(where, "score", number))  # float() reads "nan" and "inf"; int() refuses them
            check_known(where, "query", query_id, query_ids, "queries.jsonl")
            check_known(where, "document", doc_id, corpus_ids, "corpus.jsonl")
            relevant_docs.setdefault(query_id, {})[doc_id] = score
            if max_rows is not None and row_number >= max_rows:
                break
    if not relevant_docs:
        raise LocalDataError(f"{path} holds no judgements (only its header).")
    return relevant_docs


def check_known(where: str, kind: str, item_id: str, known: set[str] | None, file_name: str) -> None:
    """Refuse an id that is not among `known` (no check when `known` is None)."""
    if known is not None and item_id not in known:
        raise LocalDataError(f"{where}: {kind} {item_id!r} is not in {file_name}.")


def read_top_ranked(
    path: Path,
    max_rows: int | None = None,
    corpus_ids: set[str] | None = None,
    query_ids: set[str] | None = None,
) -> dict[str, list[str]]:
    """Read the candidate documents of each query of a reranking task (checked like `read_qrels`' rows)."""
    top_ranked = {}
    for line, row in read_jsonl(path, TOP_RANKED_COLUMNS, max_rows):
        where = f"{path}:{line}"
        if not isinstance(row["corpus-ids"], list):
            raise LocalDataError(f"{where}: column 'corpus-ids' must be a list of document ids.")
        query_id, doc_ids = str(row["query-id"]), [str(doc_id) for doc_id in row["corpus-ids"]]
        check_known(where, "query", query_id, query_ids, "queries.jsonl")
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


class FolderTask:
    """Mixin placed before mteb's abstract task class of the folder's type: data from `local_task`."""

    local_task: LocalTask

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        if self.data_loaded:
            return
        self.dataset = folder_dataset(self)
        self.data_loaded = True


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
    description = json.loads(spec_file.read_text(encoding="utf-8")).get("description")
    metadata = TaskMetadata(
        name=spec.name,
        description=description or f"Local {spec.type} task of the folder {folder.resolve()} (task.json).",
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
        (FolderTask, base),
        {"metadata": metadata, "__doc__": f"{spec.name}: a local {spec.type} task.", "__module__": __name__},
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
            splits[split] = RetrievalSplitData(
                corpus=Dataset.from_list(
                    [{"id": doc_id, "title": doc["title"], "text": doc["text"]} for doc_id, doc in data["corpus"].items()]
                ),
                queries=Dataset.from_list([{"id": query_id, "text": text} for query_id, text in data["queries"].items()]),
                relevant_docs=data["qrels"],
                top_ranked=None,
            )
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

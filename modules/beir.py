"""Retrieval sets in the BEIR layout, read by one set of rules for every scorer and tool.

    corpus.jsonl     {"_id": "d1", "title": "...", "text": "..."}     ("id" for "_id"; title optional)
    queries.jsonl    {"_id": "q1", "text": "..."}
    qrels/<split>.tsv    query-id<TAB>corpus-id<TAB>score, a header line first, then one judgement a line

The rules are mteb's (mteb.abstasks.retrieval_dataset_loaders and its evaluator), so that a folder scored during
training (modules/evaluation.py), by eval/dev_scores.py and by mteb itself (eval/local_tasks.py) is the same data:

- Ids are strings (an int id reads as its string); each occurs once in its file.
- A document is its title and its text; the model reads them as mteb joins them (``document_text``): "title text",
  stripped, or the text alone when there is no title. A missing or null title is "".
- Every judgement is kept, its score an integer grade (mteb reads qrels as int32), zero and negative grades
  included; a grade above 0 makes the document relevant (pytrec_eval's rule, which mteb's metrics follow: a grade of
  0 or below counts as unjudged). The queries kept are those judged in the split's qrels, in queries.jsonl order.
- The qrels of a split: qrels/<split>.tsv; a folder of a single split may instead hold qrels.tsv and no qrels/.

Anything that would make a score silently differ or mteb fail is a DataError naming file and line: a record that
is not a JSON object, a missing, repeated or non-string id, a text or title that is not a string, a document with
neither title nor text, a judged query whose text is empty, a qrels header other than query-id, corpus-id, score, a
line that is not three tab-separated fields, a score that is not an integer (NaN, inf and 1.5 included; 1.0 reads as 1), a
judgement of a document or query the files do not hold, and qrels without a judgement. The tools that turn a BEIR
download into training data read it with ``strict=False``: empty documents, and judgements of documents or queries
the download lacks, are kept for them to skip. ``relevant_only`` adds the rule of the scorers of this repository, which rank the
relevant documents only: each judged query needs one (mteb would count such a query 0 in its mean).
"""

import math
from dataclasses import dataclass, replace
from pathlib import Path

from .cli import DataError
from .records import decode_line, iter_file_lines, parse_json_line

QRELS_COLUMNS = ("query-id", "corpus-id", "score")


@dataclass
class RetrievalSplit:
    queries: dict  # query id -> text: the judged queries, in queries.jsonl order
    corpus: dict  # document id -> {"title": str, "text": str}, in corpus.jsonl order
    qrels: dict  # query id -> {document id: grade}, every judgement
    qrels_file: Path
    judged_at: dict  # query id -> line of the qrels file that first judges it


def qrels_file(folder, split=None, split_count=1):
    """The qrels file of ``split``: qrels/<split>.tsv, or qrels.tsv for a folder of a single split that has no
    qrels/ directory (or when no split is named)."""
    folder = Path(folder)
    if split is None or (split_count == 1 and not (folder / "qrels").is_dir()):
        return folder / "qrels.tsv"
    return folder / "qrels" / f"{split}.tsv"


def read_retrieval_split(folder, split=None, split_count=1, strict=True):
    """The ``RetrievalSplit`` of a BEIR-layout folder (``split``, ``split_count``: see ``qrels_file``), checked by the
    rules of the module docstring (``strict``: see there)."""
    folder = Path(folder)
    judgements = qrels_file(folder, split, split_count)
    for path in (folder / "corpus.jsonl", folder / "queries.jsonl", judgements):
        if not path.is_file():
            raise DataError(f"{folder}: no {path.relative_to(folder)} (expected the BEIR layout: corpus.jsonl, "
                            "queries.jsonl, qrels/<split>.tsv or qrels.tsv)")
    corpus = {}
    for where, document_id, record in _records_with_ids(folder / "corpus.jsonl"):
        title = "" if record.get("title") is None else record["title"]
        document = {"title": _string(title, "title", where), "text": _string(record.get("text"), "text", where)}
        if strict and not (document["title"] + document["text"]).strip():
            raise DataError(f"{where}: a document needs a non-empty 'text' or 'title'")
        corpus[document_id] = document
    all_queries = {query_id: (where, _string(record.get("text"), "text", where))
                   for where, query_id, record in _records_with_ids(folder / "queries.jsonl")}
    qrels, judged_at = _read_qrels(judgements, corpus, all_queries, strict)
    queries = {}
    for query_id, (where, text) in all_queries.items():
        if query_id in qrels:
            if not text.strip():
                raise DataError(f"{where}: the text of judged query {query_id!r} is empty")
            queries[query_id] = text
    return RetrievalSplit(queries, corpus, qrels, judgements, judged_at)


def relevant_only(split):
    """``split`` with the relevant judgements only (grade > 0): what the scorers of this repository rank against. A
    judged query with no relevant document is a DataError: mteb averages a 0 for it, these scorers could not."""
    qrels = {query_id: {doc: grade for doc, grade in judged.items() if grade > 0} for query_id, judged in
             split.qrels.items()}
    unjudged = [query_id for query_id, relevant in qrels.items() if not relevant]
    if unjudged:
        raise DataError(f"{split.qrels_file}:{split.judged_at[unjudged[0]]}: query {unjudged[0]!r} has no relevant "
                        f"document (no grade above 0)" + _more(unjudged, "such queries"))
    return replace(split, qrels=qrels)


def document_text(document):
    """The text a model reads for a document ({"title", "text"}), joined as mteb joins them."""
    return f"{document['title']} {document['text']}".strip() if document["title"] else document["text"].strip()


def _records_with_ids(path):
    """(where, id, record) of each record of a JSON-lines file; a repeated id names both lines."""
    first_line = {}
    for line_no, line in iter_file_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        record = parse_json_line(line, where)
        if not isinstance(record, dict):
            raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
        record_id = record.get("_id", record.get("id"))
        if record_id is None or isinstance(record_id, (bool, float, list, dict)):
            raise DataError(f"{where}: a record needs an '_id' (or 'id'), a string or an integer; got {record_id!r}")
        record_id = str(record_id)
        if record_id in first_line:
            raise DataError(f"{where}: id {record_id!r} occurs twice (first at line {first_line[record_id]})")
        first_line[record_id] = line_no
        yield where, record_id, record


def _string(value, column, where):
    if not isinstance(value, str):
        raise DataError(f"{where}: column {column!r} must be a string, got {value!r}")
    return value


def _read_qrels(path, corpus, queries, strict=True):
    """({query id: {document id: grade}}, {query id: line of its first judgement}) of a qrels file; with ``strict``
    a judgement of an unknown document or query is reported at its line (and the count of the other unknown
    queries)."""
    lines = [decode_line(line, f"{path}:{line_no}").rstrip("\r\n") for line_no, line in iter_file_lines(path)]
    header = lines[0].split("\t") if lines else []
    if header != list(QRELS_COLUMNS):
        missing = [column for column in QRELS_COLUMNS if column not in header]
        raise DataError(f"{path}:1: missing column(s) {missing} in the header; found {header}. The first line must "
                        "be `query-id<TAB>corpus-id<TAB>score`, in that order.")
    rows = []
    for line_no, line in enumerate(lines[1:], start=2):
        if line.strip():
            rows.append((line_no, *_judgement(line, f"{path}:{line_no}")))
    if not rows:
        raise DataError(f"{path} holds no judgements (only its header).")
    unknown_queries = list(dict.fromkeys(query_id for _, query_id, _, _ in rows if query_id not in queries))
    qrels, judged_at = {}, {}
    for line_no, query_id, document_id, grade in rows:
        if strict and query_id not in queries:
            raise DataError(f"{path}:{line_no}: query {query_id!r} is not in queries.jsonl"
                            + _more(unknown_queries, "judged queries are not"))
        if strict and document_id not in corpus:
            raise DataError(f"{path}:{line_no}: document {document_id!r} is not in corpus.jsonl")
        qrels.setdefault(query_id, {})[document_id] = grade
        judged_at.setdefault(query_id, line_no)
    return qrels, judged_at


def _judgement(line, where):
    """(query id, document id, integer grade) of a qrels line."""
    fields = line.split("\t")
    if len(fields) != 3 or not (fields[0] and fields[1]):
        raise DataError(f"{where}: expected query-id, corpus-id and score, tab-separated; got {fields}")
    score = fields[2].strip()
    try:
        number = float(score)
    except ValueError:
        raise DataError(f"{where}: column 'score' must be a number, got {score!r}") from None
    if not math.isfinite(number):  # float() reads "nan" and "inf"
        raise DataError(f"{where}: column 'score' must be a finite number, got {number}")
    if not number.is_integer():
        raise DataError(f"{where}: column 'score' must be an integer grade, got {score!r}")
    return fields[0], fields[1], int(number)


def _more(items, what):
    return f" ({len(items) - 1} more {what})" if len(items) > 1 else ""

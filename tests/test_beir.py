"""One reader of the BEIR layout (modules/beir.py) behind every scorer: the dev scores, a training run's task
folders and mteb on local files read a folder into the same queries, documents and judgements; and one reader of
JSON-object files (modules/json_object.py)."""

import json
import os
import sys
from pathlib import Path

import pytest

from modules.beir import qrels_file, read_retrieval_split, relevant_only
from modules.cli import DataError
from modules.evaluation import read_retrieval_folder
from modules.json_object import read_json_object
from modules.task_folders import read_task_folder
from tests.conftest import write_jsonl

REPO = Path(__file__).resolve().parents[1]
CORPUS = [{"_id": "d1", "title": "Wings", "text": "Wings in a slipstream."},  # a text that starts with its title
          {"_id": 2, "title": "Flutter", "text": "  panels at mach 2 "},  # an int id; blanks mteb strips
          {"id": "d3", "text": "no title at all"},
          {"_id": "d4", "title": None, "text": "a null title"}]
QUERIES = [{"_id": "q1", "text": "what about wings?"}, {"_id": "q2", "text": "panel flutter"},
           {"_id": "q3", "text": "a query nobody judged"}]
QRELS = "query-id\tcorpus-id\tscore\nq2\t2\t3\nq1\td1\t2\nq1\td4\t0\nq2\td3\t-1\n"


def beir_folder(folder, qrels=QRELS, corpus=CORPUS, queries=QUERIES, split=None):
    write_jsonl(folder / "corpus.jsonl", corpus)
    write_jsonl(folder / "queries.jsonl", queries)
    path = folder / "qrels" / f"{split}.tsv" if split else folder / "qrels.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(qrels)
    return folder


def test_the_rules_of_the_one_reader(tmp_path):
    data = read_retrieval_split(beir_folder(tmp_path))
    assert list(data.queries) == ["q1", "q2"]  # the judged ones, in queries.jsonl order
    assert data.corpus["2"] == {"title": "Flutter", "text": "  panels at mach 2 "}
    assert data.corpus["d3"] == {"title": "", "text": "no title at all"} and data.corpus["d4"]["title"] == ""
    assert data.qrels == {"q2": {"2": 3, "d3": -1}, "q1": {"d1": 2, "d4": 0}}  # every judgement, int grades
    assert relevant_only(data).qrels == {"q2": {"2": 3}, "q1": {"d1": 2}}


def test_dev_scores_task_folders_and_mteb_read_a_folder_alike(tmp_path):
    """The dev-score reader, a task folder (training's dev scores, run_cmteb --local-task) and mteb on local files
    (run_cmteb --data-dir) see the same queries, document texts and relevant judgements."""
    sys.path.insert(0, str(REPO / "eval"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    import local_tasks
    import mteb
    from mteb._create_dataloaders import _corpus_to_dict

    folder = beir_folder(tmp_path / "DuRetrieval", split="dev")
    (folder / "task.json").write_text(json.dumps({"name": "Tiny", "type": "Retrieval", "splits": ["dev"]}))
    queries, corpus, qrels = read_retrieval_folder(folder, "dev")
    in_training = read_task_folder(folder).split_data("dev")
    on_files = local_tasks.as_local_task(mteb.get_task("DuRetrieval"), tmp_path)
    on_folder = local_tasks.folder_task(folder)
    for task in (on_files, on_folder):
        assert isinstance(task, local_tasks.LocalDataTask)
        task.load_data()
        split = task.dataset["default"]["dev"]
        assert dict(zip(split["queries"]["id"], split["queries"]["text"])) == queries == in_training["queries"]
        assert {row["id"]: _corpus_to_dict(row)["text"] for row in split["corpus"]} == corpus  # mteb's own join
        relevant = {query: {doc: grade for doc, grade in judged.items() if grade > 0}
                    for query, judged in split["relevant_docs"].items()}
        assert relevant == qrels == in_training["qrels"]
    assert corpus == {"d1": "Wings Wings in a slipstream.", "2": "Flutter   panels at mach 2",
                      "d3": "no title at all", "d4": "a null title"}


@pytest.mark.parametrize("qrels, message", [
    ("query-id\tcorpus-id\tscore\nq1\td1\t1.5\n", r"qrels.tsv:2: column 'score' must be an integer grade, got '1.5'"),
    ("query-id\tcorpus-id\tscore\nq1\td1\tNaN\n", r"qrels.tsv:2: column 'score' must be a finite number, got nan"),
    ("query-id\tcorpus-id\tscore\nq1\td1\n", r"qrels.tsv:2: expected query-id, corpus-id and score, tab-separated"),
    ("corpus-id\tquery-id\tscore\nd1\tq1\t1\n", r"qrels.tsv:1: missing column\(s\) \[\] in the header; found "
                                                r"\['corpus-id', 'query-id', 'score'\]. The first line must be"),
    ("q1\td1\t1\n", r"qrels.tsv:1: missing column\(s\) \['query-id', 'corpus-id', 'score'\] in the header"),
    ("query-id\tcorpus-id\tscore\n\n", r"qrels.tsv holds no judgements"),
    ("query-id\tcorpus-id\tscore\nq9\td1\t1\nq1\td9\t1\n", r"qrels.tsv:2: query 'q9' is not in queries.jsonl"),
    ("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td9\t1\n", r"qrels.tsv:3: document 'd9' is not in corpus.jsonl"),
])
def test_bad_judgements_name_the_line(tmp_path, qrels, message):
    with pytest.raises(DataError, match=message):
        read_retrieval_split(beir_folder(tmp_path, qrels))


@pytest.mark.parametrize("corpus, queries, message", [
    ([{"_id": "d1", "title": "t"}], QUERIES, r"corpus.jsonl:1: column 'text' must be a string, got None"),
    ([{"_id": "d1", "title": 3, "text": "x"}], QUERIES, r"corpus.jsonl:1: column 'title' must be a string, got 3"),
    ([{"title": "t", "text": "x"}], QUERIES, r"corpus.jsonl:1: a record needs an '_id' \(or 'id'\)"),
    ([{"_id": "d1", "text": "x"}, {"id": "d1", "text": "y"}], QUERIES,
     r"corpus.jsonl:2: id 'd1' occurs twice \(first at line 1\)"),
    ([{"_id": "d1", "title": "", "text": " "}], QUERIES, r"corpus.jsonl:1: a document needs a non-empty 'text' or 'title'"),
    ([{"_id": "d1", "text": "x"}], [{"_id": "q1", "text": " "}], r"queries.jsonl:1: the text of judged query 'q1' is empty"),
    ([{"_id": "d1", "text": "x"}], [{"_id": "q1", "text": "q"}, {"_id": "q2", "text": None}],
     r"queries.jsonl:2: column 'text' must be a string, got None"),
])
def test_bad_records_name_the_line(tmp_path, corpus, queries, message):
    with pytest.raises(DataError, match=message):
        read_retrieval_split(beir_folder(tmp_path, "query-id\tcorpus-id\tscore\nq1\td1\t1\n", corpus, queries))


def test_tools_read_downloads_leniently_and_scorers_need_a_relevant_document(tmp_path):
    corpus = [{"_id": "d1", "text": "x"}, {"_id": "d2", "title": "", "text": ""}]
    folder = beir_folder(tmp_path, "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t0\nq1\tgone\t1\n"
                                   "q9\td1\t1\n", corpus)
    data = read_retrieval_split(folder, strict=False)
    assert data.corpus["d2"] == {"title": "", "text": ""} and data.qrels["q2"] == {"d2": 0}
    assert data.qrels["q1"] == {"d1": 1, "gone": 1} and list(data.queries) == ["q1", "q2"]
    with pytest.raises(DataError, match=r"qrels.tsv:3: query 'q2' has no relevant document \(no grade above 0\)"):
        relevant_only(data)


def test_a_whole_number_written_as_a_float_is_its_grade(tmp_path):
    split = read_retrieval_split(beir_folder(tmp_path, "query-id\tcorpus-id\tscore\nq1\td1\t2.0\n"))
    assert split.qrels == {"q1": {"d1": 2}} and type(split.qrels["q1"]["d1"]) is int


def test_which_qrels_file_holds_a_split(tmp_path):
    assert qrels_file(tmp_path, "dev") == tmp_path / "qrels.tsv"  # one split, no qrels/
    assert qrels_file(tmp_path, "dev", split_count=2) == tmp_path / "qrels" / "dev.tsv"
    (tmp_path / "qrels").mkdir()
    assert qrels_file(tmp_path, "dev") == tmp_path / "qrels" / "dev.tsv"
    assert qrels_file(tmp_path) == tmp_path / "qrels.tsv"


def test_read_json_object_names_file_and_line(tmp_path):
    path = tmp_path / "task.json"
    path.write_text('{"name": "T",\n "type": }\n')
    with pytest.raises(DataError, match=r"task.json:2: invalid JSON \(Expecting value, column 10\)"):
        read_json_object(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"task.json: --prompts: expected a JSON object, got list"):
        read_json_object(path, "--prompts", ValueError)
    path.write_bytes(b'{"name": "\xe9"}')
    with pytest.raises(DataError, match=r"task.json: not UTF-8 text"):
        read_json_object(path)
    path.write_text('{"name": "T"}')
    assert read_json_object(path) == {"name": "T"}

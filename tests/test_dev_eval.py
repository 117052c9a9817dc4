"""Dev scores during training: local task folders (--eval_dir), --metric_for_best, --keep_best, --final_is_best."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from modules.cli import DataError
from modules.evaluation import score_local_task
from modules.model import EmbeddingModel
from modules.task_folders import read_task_folder
from tests.conftest import shared_data, write_jsonl
from tests.test_train_finetune import common_args


@pytest.fixture(scope="module")
def cranfield_local(tmp_path_factory):
    """A made-up task, CranfieldLocal (BEIR layout, type Retrieval): 30 Cranfield queries, the documents they judge
    and 200 others."""
    source = shared_data("en-cranfield-retrieval")
    folder = tmp_path_factory.mktemp("CranfieldLocal")
    qrels = [line.split("\t") for line in (source / "qrels.tsv").read_text().splitlines()[1:]]
    query_ids = list(dict.fromkeys(query for query, _, grade in qrels if int(grade) > 0))[:30]
    kept = [(q, d, g) for q, d, g in qrels if q in query_ids]
    documents = [json.loads(line) for line in (source / "corpus.jsonl").read_text().splitlines()]
    judged = {d for _, d, _ in kept}
    others = [doc for doc in documents if doc["id"] not in judged][:200]
    write_jsonl(folder / "corpus.jsonl", [doc for doc in documents if doc["id"] in judged] + others)
    write_jsonl(folder / "queries.jsonl", [json.loads(line) for line in (source / "queries.jsonl").read_text()
                                          .splitlines() if json.loads(line)["id"] in query_ids])
    (folder / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in kept))
    (folder / "task.json").write_text(json.dumps({"name": "CranfieldLocal", "type": "Retrieval", "language": ["eng"],
                                                  "splits": ["test"]}))
    return folder


def test_in_training_ndcg_equals_trec_eval(tiny_bert, cranfield_local):
    """nDCG@10 of a local retrieval task as scored during training == pytrec_eval's (mteb's) on the same cosines."""
    import pytrec_eval

    model = EmbeddingModel.from_pretrained(tiny_bert)
    task = read_task_folder(cranfield_local)
    metrics = score_local_task(model, model.tokenizer, task, {"query": 32, "passage": 64, "pair": 32})
    data = task.split_data("test")
    corpus_ids = list(data["corpus"])
    documents = model.encode([f"{d['title']} {d['text']}".strip() for d in data["corpus"].values()], max_length=64)
    queries = model.encode(list(data["queries"].values()), max_length=32)
    run = {query_id: {doc: float(score) for doc, score in zip(corpus_ids, row)}
           for query_id, row in zip(data["queries"], (queries @ documents.T).tolist())}
    evaluator = pytrec_eval.RelevanceEvaluator(data["qrels"], {"ndcg_cut.10"})
    expected = 100 * np.mean([scores["ndcg_cut_10"] for scores in evaluator.evaluate(run).values()])
    assert metrics["CranfieldLocal/ndcg_at_10"] == pytest.approx(expected, abs=1e-3)
    assert 0 < metrics["CranfieldLocal/recall_at_100"] <= 100


def test_training_format_pairs_and_bad_folders(tmp_path):
    folder = tmp_path / "pairs"
    write_jsonl(folder / "dev.jsonl", [{"text": "a", "text_pair": "b", "label": 1}, {"text": "c", "text_pair": "d",
                                                                                   "label": 0}])
    (folder / "task.json").write_text(json.dumps({"name": "Pairs", "type": "PairClassification", "splits": ["dev"]}))
    assert read_task_folder(folder).split_data("dev") == {"sentence1": ["a", "c"], "sentence2": ["b", "d"],
                                                          "label": [1, 0]}
    write_jsonl(folder / "dev.jsonl", [{"text": "a", "text_pair": "b", "label": 1}, {"text": "c", "label": 0}])
    with pytest.raises(DataError, match=r"dev.jsonl:2: expected sentence1 and sentence2"):
        read_task_folder(folder).split_data("dev")
    (folder / "task.json").write_text(json.dumps({"name": "Pairs", "type": "Clusters", "splits": ["dev"]}))
    with pytest.raises(DataError, match=r"task.json: 'type' must be one of STS, PairClassification, Retrieval"):
        read_task_folder(folder)


@pytest.mark.parametrize("corpus, queries, qrels, message", [
    (["d1", "d2", "d1"], ["q1"], ["q1\td1\t1"], r"corpus.jsonl:3: id 'd1' occurs twice \(first at line 1\)"),
    (["d1"], ["q1", "q1"], ["q1\td1\t1"], r"queries.jsonl:2: id 'q1' occurs twice"),
    (["d1", "d2"], ["q1"], ["q1\td1\t1", "q7\td2\t1", "q8\td2\t1"],
     r"qrels.tsv:3: query 'q7' is not in queries.jsonl \(1 more judged queries are not\)"),
    (["d1"], ["q1"], ["q1\td5\t1"], r"qrels.tsv:2: document 'd5' is not in corpus.jsonl"),
])
def test_retrieval_folders_with_repeated_ids_or_unknown_judgements_name_the_line(tmp_path, corpus, queries, qrels,
                                                                                 message):
    """A repeated id or a judgement of a missing query would change the score silently."""
    write_jsonl(tmp_path / "corpus.jsonl", [{"_id": d, "text": f"document {d}"} for d in corpus])
    write_jsonl(tmp_path / "queries.jsonl", [{"_id": q, "text": f"query {q}"} for q in queries])
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{row}\n" for row in qrels))
    (tmp_path / "task.json").write_text(json.dumps({"name": "Tiny", "type": "Retrieval", "splits": ["test"]}))
    with pytest.raises(DataError, match=message):
        read_task_folder(tmp_path).split_data("test")


def test_a_run_scores_its_task_folders_and_keeps_the_best_checkpoint(tiny_bert, tiny_data, cranfield_local, tmp_path,
                                                                     monkeypatch):
    """--eval_dir logs nDCG@10 at each evaluation; --keep_best saves and spares the best checkpoint (named in
    train_summary.json) past --save_total_limit; --final_is_best exports it as final/."""
    import modules.evaluation
    import train_finetune
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # a made-up score sequence, so the best step is known: 0 (start), 2, 4 (best), 6
    planned = iter([10.0, 20.0, 40.0, 30.0])
    real = modules.evaluation.score_local_task
    monkeypatch.setattr(modules.evaluation, "score_local_task", lambda *a, **k: {
        **real(*a, **k), "CranfieldLocal/ndcg_at_10": next(planned)})
    train_finetune.main(common_args(tiny_bert, tiny_data, tmp_path, "--max_steps", "6", "--eval_every", "2",
                                    "--eval_dir", str(cranfield_local), "--metric_for_best",
                                    "CranfieldLocal/ndcg_at_10", "--final_is_best", "--save_every", "1",
                                    "--save_total_limit", "1")[1:])
    events = EventAccumulator(str(tmp_path / "finetune"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval/CranfieldLocal/ndcg_at_10")] == [
        (0, 10.0), (2, 20.0), (4, 40.0), (6, 30.0)]
    assert [e.step for e in events.Scalars("eval/CranfieldLocal/recall_at_100")] == [0, 2, 4, 6]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["best"] == {"metric": "CranfieldLocal/ndcg_at_10", "step": 4, "value": 40.0,
                               "checkpoint": "checkpoint-4"}
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    results = json.loads((tmp_path / "eval_results.json").read_text())
    assert results["metrics_by_step"]["4"]["CranfieldLocal/ndcg_at_10"] == 40.0 and results["best"]["step"] == 4
    final = load_file(tmp_path / "final" / "model.safetensors")
    best = load_file(tmp_path / "checkpoint-4" / "model.safetensors")
    last = load_file(tmp_path / "checkpoint-6" / "model.safetensors")
    name = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(final[name], best[f"backbone.{name}"]) and not torch.equal(final[name], last[f"backbone.{name}"])


def test_an_unknown_metric_for_best_is_refused_naming_the_metrics(tiny_bert, tiny_data, cranfield_local, tmp_path):
    import train_finetune

    with pytest.raises(ValueError, match=r"--metric_for_best CranfieldLocal/map: the dev metrics are "
                                         r"CranfieldLocal/ndcg_at_10, CranfieldLocal/recall_at_100"):
        train_finetune.main(common_args(tiny_bert, tiny_data, tmp_path, "--max_steps", "2", "--eval_every", "1",
                                        "--eval_dir", str(cranfield_local), "--metric_for_best",
                                        "CranfieldLocal/map")[1:])


@pytest.mark.parametrize("task_type, records, message", [
    ("STS", [{"text": "a", "text_pair": "b", "label": 1.0}, {"text": "c", "text_pair": "d", "label": float("nan")}],
     r"dev.jsonl:2: column 'label' must be a number, got nan"),
    ("STS", [{"sentence1": "a", "sentence2": "b", "score": float("-inf")}, {"sentence1": "c", "sentence2": "d",
                                                                           "score": 1.0}],
     r"dev.jsonl:1: column 'score' must be a number, got -inf"),
])
def test_a_non_finite_label_or_score_of_a_task_folder_names_the_line(tmp_path, task_type, records, message):
    """json.loads reads NaN and Infinity (json.dumps writes them): a NaN gold score made the dev Spearman NaN."""
    write_jsonl(tmp_path / "dev.jsonl", records)
    (tmp_path / "task.json").write_text(json.dumps({"name": "Dev", "type": task_type, "splits": ["dev"]}))
    with pytest.raises(DataError, match=message):
        read_task_folder(tmp_path).split_data("dev")


@pytest.mark.parametrize("grade", ["nan", "inf"])
def test_a_non_finite_judgement_of_a_retrieval_folder_names_the_line(tmp_path, grade):
    """eval/dev_scores.py's reader: an infinite grade made nDCG inf / inf = NaN, a NaN one dropped the judgement."""
    from modules.evaluation import read_retrieval_folder

    write_jsonl(tmp_path / "corpus.jsonl", [{"_id": "d1", "text": "document one"}, {"_id": "d2", "text": "two"}])
    write_jsonl(tmp_path / "queries.jsonl", [{"_id": "q1", "text": "query one"}])
    (tmp_path / "qrels.tsv").write_text(f"query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t{grade}\n")
    with pytest.raises(DataError, match=rf"qrels.tsv:3: column 'score' must be a finite number, got {grade}"):
        read_retrieval_folder(tmp_path)

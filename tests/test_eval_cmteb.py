"""Tests of eval/run_cmteb.py: C-MTEB through mteb, run offline on local task folders.

The local tasks are small subsets of the shared developer data (../shared/data) named like C-MTEB tasks, and
the model is the packaged all-MiniLM-L6-v2. mteb's scores are checked against direct computations from
sentence-transformers embeddings: Spearman of cosine similarities (STS), nDCG@10 (retrieval), MAP over the
candidates (reranking) and best-threshold accuracy (pair classification). Also: tasks of one's own
(--local-task folders with task.json), results filed under a hash of the weights, evaluation of a training
checkpoint, the partial-benchmark label, max AP of pair classification, and a fast --help.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import subprocess
import time
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ["HF_HUB_OFFLINE"] = "1"  # before mteb / huggingface_hub are imported: nothing may be downloaded

import numpy as np
import pytest
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "eval"))

import _eval_fixtures as fixtures  # noqa: E402
import cmteb_encoder  # noqa: E402  (cmteb_*: the heavy part of run_cmteb.py)
import cmteb_errors  # noqa: E402
import cmteb_model  # noqa: E402
import cmteb_prompts  # noqa: E402
import cmteb_tasks  # noqa: E402
import cmteb_variants  # noqa: E402
import local_tasks  # noqa: E402
import mteb  # noqa: E402
import run_cmteb  # noqa: E402
from mteb.models import ModelMeta  # noqa: E402
from mteb.types import PromptType  # noqa: E402
from modules.quantization import comma_list, truncate_embeddings  # noqa: E402
from tests.conftest import minilm_path, shared_data  # noqa: E402  (both fail the test when what they need is missing)

pytestmark = pytest.mark.filterwarnings("ignore:The task .* is superseded by:UserWarning")

STS_SOURCES = {  # local task name -> shared data file (dev splits, stand-ins for the C-MTEB test splits)
    "STSB": "zh-stsb/dev.jsonl",
    "ATEC": "zh-atec/dev.jsonl",
    "LCQMC": "zh-lcqmc/dev.jsonl",
    "STSBenchmark": "en-stsb/dev.jsonl",  # an English mteb task: any task can be run by name
}
ALL_TASKS = [*STS_SOURCES, "DuRetrieval", "T2Reranking", "Ocnli", "TNews", "CLSClusteringS2S"]
MAX_SEQ_LENGTH = 128
BATCH_SIZE = 32
DIMS = (64, 128)
FULL_DIM = 384
QUERY_INSTRUCTION = "为这个句子生成表示以用于检索相关文章："
MTEB_ROUNDING = 1e-5  # mteb rounds every score to 5 decimals (TaskResult._round_scores)


# ---------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def model_path() -> str:
    return str(minilm_path())


@pytest.fixture(scope="module")
def direct_model(model_path):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path, device="cpu")
    model.max_seq_length = MAX_SEQ_LENGTH
    return model


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> dict:
    """Local task folders (layout of eval/README.md) and what was written to them."""
    data_dir = tmp_path_factory.mktemp("cmteb_local")
    written = {"dir": data_dir}
    for name, source in STS_SOURCES.items():
        written[name] = fixtures.build_sts_task(shared_data(source), data_dir / name, "test", n_pairs=100)
    cmrc = fixtures.retrieval_subset(shared_data("zh-cmrc2018-trial-retrieval"), n_docs=40)
    written["DuRetrieval"] = fixtures.write_retrieval_task(cmrc, data_dir / "DuRetrieval", "dev")
    written["T2Reranking"] = fixtures.build_reranking_task(
        cmrc, data_dir / "T2Reranking", "dev", n_queries=60, n_candidates=8
    )
    written["Ocnli"] = fixtures.build_pair_classification_task(
        shared_data("en-msrp/dev.jsonl"), data_dir / "Ocnli", "validation", 100
    )
    fixtures.build_classification_task(
        shared_data("en-stsb/dev.jsonl"), data_dir / "TNews", "validation", "genre", 40, 60
    )
    fixtures.build_clustering_task(
        shared_data("en-stsb/dev.jsonl"), data_dir / "CLSClusteringS2S", "test", "source", 2, 50
    )
    return written


@pytest.fixture(scope="module")
def evaluation(local_data, model_path, tmp_path_factory) -> SimpleNamespace:
    """One in-process run of the script on every local task, at the full dimension and at DIMS."""
    output_dir = tmp_path_factory.mktemp("cmteb_out")
    summary = run_cmteb.run(
        [
            "--model",
            model_path,
            "--model-name",
            "test/minilm",
            "--data-dir",
            str(local_data["dir"]),
            "--tasks",
            *ALL_TASKS,
            "--dims",
            ",".join(map(str, DIMS)),
            "--max-seq-length",
            str(MAX_SEQ_LENGTH),
            "--batch-size",
            str(BATCH_SIZE),
            "--output-dir",
            str(output_dir),
            "--no-progress",
        ]
    )
    results_dir = Path(summary["results_dir"])  # results/<model name>/<revision: hash of the weights>/
    return SimpleNamespace(summary=summary, output_dir=output_dir, results_dir=results_dir)


def mteb_scores(results_dir: Path, task: str, dim: int | None = None) -> dict:
    """The scores of the task's single split from mteb's own result file."""
    folder = results_dir if dim is None else results_dir / "experiments" / f"embed_dim_{dim}"
    result = json.loads((folder / f"{task}.json").read_text())
    (split_scores,) = result["scores"].values()
    return split_scores[0]


# ---------------------------------------------------------------------------------------------------------
# Direct computations


@functools.cache
def encode_once(model, texts: tuple[str, ...]) -> np.ndarray:
    return model.encode(list(texts), batch_size=BATCH_SIZE, normalize_embeddings=True, convert_to_numpy=True)


def embed(model, texts: list[str], dim: int | None = None) -> np.ndarray:
    """Unit-length embeddings, optionally of the first `dim` coordinates (re-normalised)."""
    embeddings = encode_once(model, tuple(texts))
    if dim is not None:
        embeddings = embeddings[:, :dim] / np.linalg.norm(embeddings[:, :dim], axis=1, keepdims=True)
    return embeddings


def pair_cosines(model, pairs: list[dict], dim: int | None = None) -> np.ndarray:
    """Cosine similarity of each pair, rounded to float32 resolution.

    MiniLM maps many Chinese characters to [UNK], so some pairs are token-identical and their cosine is 1 up
    to float noise (1 +- 1e-7) that depends on batching. Rounding makes those pairs tie, as they do in exact
    arithmetic, instead of being ordered by noise.
    """
    first = embed(model, [pair["sentence1"] for pair in pairs], dim)
    second = embed(model, [pair["sentence2"] for pair in pairs], dim)
    return np.round((first.astype(np.float64) * second).sum(axis=1), 6)


def cosine_spearman(model, pairs: list[dict], dim: int | None = None) -> float:
    return spearmanr(pair_cosines(model, pairs, dim), [pair["score"] for pair in pairs]).statistic


def document_text(doc: dict) -> str:
    """mteb reads a document as its title and text joined by a space."""
    return f"{doc['title']} {doc['text']}".strip()


def ndcg_at_10(model, written: dict, query_prefix: str = "") -> float:
    similarities = (
        embed(model, [query_prefix + q["text"] for q in written["queries"]])
        @ embed(model, [document_text(doc) for doc in written["corpus"]]).T
    )
    return ranked_ndcg_at_10(similarities, written)


def ranked_ndcg_at_10(similarities: np.ndarray, written: dict) -> float:
    """Mean nDCG@10 (linear gains) of each query's documents ranked by similarity, tied ones by document id
    descending (pytrec_eval's order, which mteb's retrieval scores follow)."""
    doc_ids = [doc["id"] for doc in written["corpus"]]
    values = []
    for query, row in zip(written["queries"], similarities, strict=True):
        relevance = written["qrels"][query["id"]]
        scores = dict(zip(doc_ids, row.tolist()))
        ranking = sorted(doc_ids, key=lambda doc_id: (scores[doc_id], doc_id), reverse=True)[:10]
        dcg = sum(relevance.get(doc_id, 0) / math.log2(rank + 2) for rank, doc_id in enumerate(ranking))
        ideal = sum(
            rel / math.log2(rank + 2)
            for rank, rel in enumerate(sorted(relevance.values(), reverse=True)[:10])
        )
        values.append(dcg / ideal)
    return float(np.mean(values))


def mean_average_precision(model, written: dict) -> float:
    """MAP of each query's candidates ranked by cosine similarity."""
    doc_embeddings = dict(
        zip(
            [doc["id"] for doc in written["corpus"]],
            embed(model, [document_text(doc) for doc in written["corpus"]]),
            strict=True,
        )
    )
    query_embeddings = embed(model, [q["text"] for q in written["queries"]])
    values = []
    for query, query_embedding in zip(written["queries"], query_embeddings, strict=True):
        candidates = written["candidates"][query["id"]]
        scores = np.array([doc_embeddings[doc_id] for doc_id in candidates]) @ query_embedding
        ranking = [candidates[index] for index in np.argsort(-scores)]
        relevant = {doc_id for doc_id, rel in written["qrels"][query["id"]].items() if rel > 0}
        hit_ranks = [rank for rank, doc_id in enumerate(ranking, start=1) if doc_id in relevant]
        values.append(np.mean([hits / rank for hits, rank in enumerate(hit_ranks, start=1)]))
    return float(np.mean(values))


def best_threshold_accuracy(model, pairs: list[dict]) -> float:
    """Accuracy of 'similar if cosine > t' at the best threshold t between two observed scores."""
    order = np.argsort(-pair_cosines(model, pairs), kind="stable")
    labels = np.array([pair["label"] for pair in pairs])[order]
    positives_above = np.cumsum(labels)[:-1]
    negatives_below = (labels == 0).sum() - np.cumsum(labels == 0)[:-1]
    return float(((positives_above + negatives_below) / len(labels)).max())


# ---------------------------------------------------------------------------------------------------------
# Scores against direct computations


@pytest.mark.parametrize("task", list(STS_SOURCES))
def test_sts_score_is_spearman_of_cosine_similarity(evaluation, local_data, direct_model, task):
    expected = cosine_spearman(direct_model, local_data[task])
    assert mteb_scores(evaluation.results_dir, task)["cosine_spearman"] == pytest.approx(expected, abs=1e-4)
    assert evaluation.summary["tasks"][task] == pytest.approx(100 * expected, abs=1e-2)


def test_truncated_sts_score_uses_renormalised_prefix(evaluation, local_data, direct_model):
    expected = cosine_spearman(direct_model, local_data["STSBenchmark"], dim=64)
    assert mteb_scores(evaluation.results_dir, "STSBenchmark", dim=64)["cosine_spearman"] == pytest.approx(
        expected, abs=1e-4
    )
    (row,) = [row for row in evaluation.summary["dims"] if row["dim"] == 64]
    assert row["tasks"]["STSBenchmark"] == pytest.approx(100 * expected, abs=1e-2)


def test_retrieval_ndcg_at_10_matches_direct_computation(evaluation, local_data, direct_model):
    expected = ndcg_at_10(direct_model, local_data["DuRetrieval"])
    scores = mteb_scores(evaluation.results_dir, "DuRetrieval")
    assert scores["main_score"] == scores["ndcg_at_10"] == pytest.approx(expected, abs=1e-4)
    assert evaluation.summary["tasks"]["DuRetrieval"] == pytest.approx(100 * expected, abs=1e-2)


def test_reranking_map_matches_direct_computation(evaluation, local_data, direct_model):
    expected = mean_average_precision(direct_model, local_data["T2Reranking"])
    assert mteb_scores(evaluation.results_dir, "T2Reranking")["map_at_1000"] == pytest.approx(
        expected, abs=1e-4
    )


def test_pair_classification_accuracy_matches_direct_computation(evaluation, local_data, direct_model):
    scores = mteb_scores(evaluation.results_dir, "Ocnli")
    assert scores["cosine_accuracy"] == pytest.approx(
        best_threshold_accuracy(direct_model, local_data["Ocnli"]), abs=1e-6
    )
    assert scores["main_score"] == scores["max_accuracy"] >= scores["cosine_accuracy"]


def test_classification_and_clustering_run_from_local_files(evaluation):
    # three genres (string labels, mapped to ids by the loader): MiniLM separates them far above chance
    assert 100 / 3 + 10 < evaluation.summary["tasks"]["TNews"] <= 100
    clustering = mteb_scores(evaluation.results_dir, "CLSClusteringS2S")
    assert len(clustering["v_measures"]) == 2 and 0 < clustering["v_measure"] <= 1


# ---------------------------------------------------------------------------------------------------------
# Summary, Matryoshka rows and files


def test_summary_averages_are_means_of_task_scores(evaluation):
    summary = evaluation.summary
    for row in [summary, *summary["dims"]]:
        assert set(row["tasks"]) == set(ALL_TASKS)
        for task_type, average in row["types"].items():
            members = [
                row["tasks"][task] for task, kind in summary["task_types"].items() if kind == task_type
            ]
            assert average == pytest.approx(np.mean(members))
        assert row["average"] == pytest.approx(np.mean(list(row["tasks"].values())))
        assert row["average_by_type"] == pytest.approx(np.mean(list(row["types"].values())))
    assert summary["types"]["STS"] == pytest.approx(np.mean([summary["tasks"][task] for task in STS_SOURCES]))


def test_summary_files_record_model_versions_and_settings(evaluation):
    on_disk = json.loads((evaluation.output_dir / "summary.json").read_text())
    assert on_disk["tasks"] == pytest.approx(evaluation.summary["tasks"])
    assert on_disk["versions"]["mteb"] == mteb.__version__
    assert (
        on_disk["model"]["embedding_dim"] == FULL_DIM and on_disk["model"]["max_seq_length"] == MAX_SEQ_LENGTH
    )
    assert (
        on_disk["settings"]["query_instruction"] is None and on_disk["settings"]["batch_size"] == BATCH_SIZE
    )
    assert on_disk["splits"]["DuRetrieval"] == ["dev"] and on_disk["splits"]["STSB"] == ["test"]
    assert on_disk["prompts_used"]["DuRetrieval"] == {"query": None, "document": None}
    markdown = (evaluation.output_dir / "summary.md").read_text()
    assert "mteb " + mteb.__version__ in markdown and "| STS | LCQMC | test |" in markdown


def test_dims_give_one_row_per_dimension_and_a_plot(evaluation):
    rows = evaluation.summary["dims"]
    assert [row["dim"] for row in rows] == [*DIMS, FULL_DIM]
    assert rows[-1]["tasks"] == evaluation.summary["tasks"]  # the full dimension is the untruncated model
    markdown_rows = [
        line
        for line in (evaluation.output_dir / "summary.md").read_text().splitlines()
        if line.split("|")[1:2] and line.split("|")[1].strip().isdigit()
    ]
    assert [int(line.split("|")[1]) for line in markdown_rows] == [*DIMS, FULL_DIM]
    assert (evaluation.output_dir / "matryoshka.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for dim in DIMS:
        assert (evaluation.results_dir / "experiments" / f"embed_dim_{dim}" / "STSB.json").is_file()


# ---------------------------------------------------------------------------------------------------------
# Quantized embeddings (--quantize int8,binary --calibration FILE): mteb's scores of the quantized similarity


QUANTIZED_TASKS = ["STSBenchmark", "DuRetrieval", "Ocnli"]


@pytest.fixture(scope="module")
def quantized(local_data, model_path, direct_model, tmp_path_factory) -> SimpleNamespace:
    """One run on an STS, a retrieval and a pair-classification task at DIMS[0] and the full dimension, in float32,
    int8 (calibrated on 100 SICK training pairs) and binary; and the calibration embeddings, computed directly."""
    root = tmp_path_factory.mktemp("cmteb_quantized")
    calibration = root / "calibration.jsonl"
    calibration.write_text("".join((REPO / "data/demo/sick_train.jsonl").read_text().splitlines(keepends=True)[:100]))
    summary = run_cmteb.run(
        ["--model", model_path, "--model-name", "test/minilm", "--data-dir", str(local_data["dir"]),
         "--tasks", *QUANTIZED_TASKS, "--dims", str(DIMS[0]), "--quantize", "binary,int8", "--calibration",
         str(calibration), "--max-seq-length", str(MAX_SEQ_LENGTH), "--batch-size", str(BATCH_SIZE),
         "--output-dir", str(root / "out"), "--no-progress"]
    )
    records = [json.loads(line) for line in calibration.read_text().splitlines()]
    texts = list(dict.fromkeys(text for record in records for text in (record["text"], record["text_pair"])))
    return SimpleNamespace(summary=summary, output_dir=root / "out", results_dir=Path(summary["results_dir"]),
                           calibration_texts=texts, calibration_file=calibration)


def quantized_row(summary: dict, dim: int, precision: str) -> dict:
    (row,) = [row for row in summary["quantized"] if (row["dim"], row["quantization"]) == (dim, precision)]
    return row


def quantized_result(results_dir: Path, task: str, dim: int, precision: str) -> dict:
    """The scores of mteb's result file of a task at a dimension and precision (mteb's experiment folder names)."""
    folder = f"embed_dim_{dim}__output_dtypes_{precision}" if dim != FULL_DIM else f"output_dtypes_{precision}"
    result = json.loads((results_dir / "experiments" / folder / f"{task}.json").read_text())
    (split_scores,) = result["scores"].values()
    return split_scores[0]


def quantized_similarities(model, first: list[str], second: list[str], dim: int, precision: str,
                           calibration_texts: list[str], matrix: bool = False) -> np.ndarray:
    """Direct similarities of texts at a dimension and precision: dims - Hamming distance of the sign bits, or the
    cosine of the int8 codes of sentence-transformers' quantize_embeddings calibrated on `calibration_texts`;
    pairwise, or every first text with every second one."""
    from tests.test_quantization import hamming_similarity, st_quantize, unit

    first, second = embed(model, first, dim), embed(model, second, dim)
    if matrix:
        first, second = first[:, None, :], second[None, :, :]
    if precision == "binary":
        return hamming_similarity(first, second)
    calibration = embed(model, calibration_texts, dim)
    first, second = (unit(st_quantize(side, "int8", calibration)) for side in (first, second))
    return (first * second).sum(axis=-1)


def tie_aware_best_accuracy(scores: np.ndarray, labels: list[int]) -> float:
    """Accuracy of 'similar if score >= t' at the best t, t one of the scores but the lowest (no tie split)."""
    scores, similar = np.asarray(scores, dtype=np.float64), np.asarray(labels) == 1
    return max(float(((scores >= threshold) == similar).mean()) for threshold in np.unique(scores)[1:])


@pytest.mark.parametrize("precision", ["binary", "int8"])
@pytest.mark.parametrize("dim", [DIMS[0], FULL_DIM])
def test_quantized_sts_score_is_spearman_of_the_quantized_similarity(quantized, local_data, direct_model, dim,
                                                                     precision):
    pairs = local_data["STSBenchmark"]
    similarities = quantized_similarities(direct_model, [p["sentence1"] for p in pairs],
                                          [p["sentence2"] for p in pairs], dim, precision, quantized.calibration_texts)
    expected = spearmanr(similarities, [p["score"] for p in pairs]).statistic
    scores = quantized_result(quantized.results_dir, "STSBenchmark", dim, precision)
    assert scores["cosine_spearman"] == pytest.approx(expected, abs=MTEB_ROUNDING)
    assert scores["cosine_pearson"] != pytest.approx(scores["cosine_spearman"], abs=1e-3)  # a real correlation
    row = quantized_row(quantized.summary, dim, precision)
    assert row["tasks"]["STSBenchmark"] == pytest.approx(100 * expected, abs=100 * MTEB_ROUNDING)


@pytest.mark.parametrize("precision", ["binary", "int8"])
@pytest.mark.parametrize("dim", [DIMS[0], FULL_DIM])
def test_quantized_retrieval_ranks_by_the_quantized_similarity(quantized, local_data, direct_model, dim, precision):
    written = local_data["DuRetrieval"]
    similarities = quantized_similarities(direct_model, [q["text"] for q in written["queries"]],
                                          [document_text(doc) for doc in written["corpus"]], dim, precision,
                                          quantized.calibration_texts, matrix=True)
    expected = ranked_ndcg_at_10(similarities, written)
    assert quantized_result(quantized.results_dir, "DuRetrieval", dim, precision)["ndcg_at_10"] == pytest.approx(
        expected, abs=MTEB_ROUNDING)
    if precision == "binary":  # integer similarities: many ties, broken as pytrec_eval breaks them
        assert any(len(set(row.tolist())) < len(row) for row in similarities)


@pytest.mark.parametrize("precision", ["binary", "int8"])
def test_quantized_pair_classification_thresholds_the_quantized_similarity(quantized, local_data, direct_model,
                                                                           precision):
    pairs = local_data["Ocnli"]
    similarities = quantized_similarities(direct_model, [p["sentence1"] for p in pairs],
                                          [p["sentence2"] for p in pairs], DIMS[0], precision,
                                          quantized.calibration_texts)
    expected = tie_aware_best_accuracy(similarities, [p["label"] for p in pairs])
    scores = quantized_result(quantized.results_dir, "Ocnli", DIMS[0], precision)
    assert scores["cosine_accuracy"] == pytest.approx(expected, abs=1e-9)
    if precision == "binary":  # every similarity mteb computes is a monotone map of the Hamming similarity
        assert scores["dot_accuracy"] == scores["manhattan_accuracy"] == scores["euclidean_accuracy"] == \
            scores["max_accuracy"] == scores["cosine_accuracy"]


def test_quantized_rows_are_summarised_beside_the_float32_ones(quantized, local_data, direct_model):
    summary = quantized.summary
    assert [(row["dim"], row["quantization"]) for row in summary["quantized"]] == [
        (DIMS[0], "int8"), (DIMS[0], "binary"), (FULL_DIM, "int8"), (FULL_DIM, "binary")]
    assert summary["settings"]["quantize"] == ["int8", "binary"]
    calibration = summary["settings"]["calibration"]
    assert calibration["file"] == str(quantized.calibration_file) and len(calibration["texts_hash"]) == 12
    assert calibration["texts"] == len(quantized.calibration_texts) == 196  # 200 texts, 4 of them twice
    assert summary["tasks"]["STSBenchmark"] == pytest.approx(  # float32 rows as without --quantize
        100 * cosine_spearman(direct_model, local_data["STSBenchmark"]), abs=1e-2)
    markdown = (quantized.output_dir / "summary.md").read_text()
    assert "## Quantized embeddings (main score x 100)" in markdown
    assert "| Task | Dim | float32 | int8 | binary |" in markdown
    cells = [f"{row['tasks']['Ocnli']:.2f}" for row in (summary["dims"][0], quantized_row(summary, DIMS[0], "int8"),
                                                           quantized_row(summary, DIMS[0], "binary"))]
    assert f"| Ocnli | {DIMS[0]} | {' | '.join(cells)} |" in markdown


def test_int8_without_calibration_or_calibrated_on_scored_data_is_refused_before_the_model_loads(local_data, capsys):
    assert run_cmteb.main(["--model", "unused", "--tasks", "STSB", "--quantize", "int8"]) == 2
    assert "--quantize int8 needs --calibration FILE" in capsys.readouterr().err
    scored = local_data["dir"] / "STSB" / "test.jsonl"
    assert run_cmteb.main(["--model", "unused", "--data-dir", str(local_data["dir"]), "--tasks", "STSB",
                           "--quantize", "int8,binary", "--calibration", str(scored)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"run_cmteb.py: error: --calibration {scored} lies in {local_data['dir']}, data this run")


# ---------------------------------------------------------------------------------------------------------
# Command line (subprocess): query instruction on retrieval queries only


def test_cli_query_instruction_reaches_retrieval_queries_only(local_data, model_path, direct_model, tmp_path):
    command = [
        sys.executable,
        str(REPO / "eval" / "run_cmteb.py"),
        "--model",
        model_path,
        "--data-dir",
        str(local_data["dir"]),
        "--tasks",
        "DuRetrieval,STSB",
        "--query-instruction",
        QUERY_INSTRUCTION,
        "--max-seq-length",
        str(MAX_SEQ_LENGTH),
        "--batch-size",
        str(BATCH_SIZE),
        "--output-dir",
        str(tmp_path),
        "--no-progress",
    ]
    completed = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["settings"]["query_instruction"] == QUERY_INSTRUCTION
    assert summary["prompts_used"]["DuRetrieval"] == {"query": QUERY_INSTRUCTION, "document": None}
    assert summary["prompts_used"]["STSB"] == {"symmetric": None}
    expected = ndcg_at_10(direct_model, local_data["DuRetrieval"], query_prefix=QUERY_INSTRUCTION)
    assert summary["tasks"]["DuRetrieval"] == pytest.approx(100 * expected, abs=1e-2)
    assert summary["tasks"]["STSB"] == pytest.approx(
        100 * cosine_spearman(direct_model, local_data["STSB"]), abs=1e-2
    )


# ---------------------------------------------------------------------------------------------------------
# Prompt resolution (no model needed)


def prompt_encoder(
    model_prompts=None, file_prompts=None, query_instruction=None, template=None, default_prompt_name=None
):
    model = SimpleNamespace(prompts=model_prompts or {}, default_prompt_name=default_prompt_name)
    prompts = cmteb_prompts.merge_prompts(model.prompts, file_prompts or {}, query_instruction)
    return cmteb_encoder.SentenceEncoder(model, ModelMeta.create_empty(), prompts, instruction_template=template)


def metadata(task_name: str):
    return mteb.get_task(task_name).metadata


def test_query_instruction_applies_to_retrieval_and_reranking_queries_only():
    encoder = prompt_encoder(model_prompts={"query": "", "document": ""}, query_instruction="Q: ")
    assert encoder.prompt_for(metadata("T2Retrieval"), PromptType.query) == "Q: "
    assert encoder.prompt_for(metadata("T2Reranking"), PromptType.query) == "Q: "
    assert encoder.prompt_for(metadata("T2Retrieval"), PromptType.document) is None
    assert encoder.prompt_for(metadata("LCQMC"), None) is None
    assert encoder.prompt_for(metadata("TNews"), None) is None


def test_model_and_file_prompts_follow_mteb_precedence():
    encoder = prompt_encoder(
        model_prompts={"query": "query: ", "document": "passage: "},
        file_prompts={"LCQMC": "similar: ", "T2Retrieval-query": "t2 query: "},
    )
    assert encoder.prompt_for(metadata("T2Retrieval"), PromptType.query) == "t2 query: "
    assert encoder.prompt_for(metadata("DuRetrieval"), PromptType.query) == "query: "
    assert encoder.prompt_for(metadata("DuRetrieval"), PromptType.document) == "passage: "
    assert encoder.prompt_for(metadata("LCQMC"), None) == "similar: "
    assert encoder.prompt_for(metadata("ATEC"), None) is None


def test_instruction_template_uses_mteb_task_instructions_but_not_for_documents():
    encoder = prompt_encoder(
        template=cmteb_prompts.read_instruction_template("Instruct: {instruction}\\nQuery: ")
    )
    retrieval = metadata("DuRetrieval")
    assert (
        encoder.prompt_for(retrieval, PromptType.query) == f"Instruct: {retrieval.prompt['query']}\nQuery: "
    )
    assert encoder.prompt_for(retrieval, PromptType.document) is None
    assert encoder.prompt_for(metadata("TNews"), None) == f"Instruct: {metadata('TNews').prompt}\nQuery: "


def test_default_prompt_name_applies_to_symmetric_inputs():
    encoder = prompt_encoder(
        model_prompts={"classification": "classify: "}, default_prompt_name="classification"
    )
    assert encoder.prompt_for(metadata("TNews"), None) == "classify: "
    assert encoder.prompt_for(metadata("DuRetrieval"), PromptType.query) is None


def test_truncation_renormalises_and_keeps_full_embeddings():
    embeddings = np.array([[3.0, 4.0, 12.0], [1.0, 0.0, 0.0]])
    truncated = truncate_embeddings(embeddings, 2)
    np.testing.assert_allclose(truncated, [[0.6, 0.8], [1.0, 0.0]])
    assert truncate_embeddings(embeddings, None) is embeddings


# ---------------------------------------------------------------------------------------------------------
# Task selection and clear errors (raised before any model is loaded)


def test_task_selection_by_type_and_name():
    sts = cmteb_tasks.select_tasks(cmteb_tasks.BENCHMARK, [], ["sts"])
    assert {task.metadata.name for task in sts} == {"LCQMC", "PAWSX", "AFQMC", "QBQTC", "ATEC", "BQ", "STSB"}
    assert len(cmteb_tasks.select_tasks(cmteb_tasks.BENCHMARK, [], [])) == 31
    (stsb,) = cmteb_tasks.select_tasks(cmteb_tasks.BENCHMARK, ["STSB"], [])
    assert list(stsb.eval_splits) == ["test"]  # the benchmark's split, not mteb's default (validation, test)
    assert comma_list(["a,b", "c", "a"]) == ["a", "b", "c"]


def test_unknown_task_name_is_a_clear_error(capsys):
    with pytest.raises(cmteb_errors.SetupError, match="Unknown task 'NoSuchTask'"):
        cmteb_tasks.select_tasks(cmteb_tasks.BENCHMARK, ["STSB", "NoSuchTask"], [])
    assert run_cmteb.main(["--model", "unused", "--tasks", "NoSuchTask"]) == 2
    assert "Unknown task 'NoSuchTask'" in capsys.readouterr().err


def test_unknown_task_type_and_bad_dims_are_clear_errors():
    with pytest.raises(cmteb_errors.SetupError, match="Unknown task type"):
        cmteb_tasks.select_tasks(cmteb_tasks.BENCHMARK, [], ["Bitext"])
    with pytest.raises(cmteb_errors.SetupError, match="outside 1..384"):
        cmteb_variants.resolve_dims("64,1024", 384)
    assert cmteb_variants.resolve_dims("256,64", 384) == [64, 256, 384]


def test_local_task_keeps_the_real_mteb_class(tmp_path):
    fixtures.write_jsonl(
        tmp_path / "STSB" / "test.jsonl",
        [{"sentence1": "a", "sentence2": "b", "score": 1.0}, {"sentence1": "c", "sentence2": "d", "score": 2.0}],
    )
    (task,) = cmteb_tasks.select_tasks(cmteb_tasks.BENCHMARK, ["STSB"], [])
    local = local_tasks.as_local_task(task, tmp_path)
    assert isinstance(local, type(task)) and local.metadata == task.metadata
    assert list(local.eval_splits) == ["test"]
    local.load_data()
    assert local.dataset["test"][0] == {"sentence1": "a", "sentence2": "b", "score": 1.0}


def local_task(name: str, data_dir: Path):
    (task,) = cmteb_tasks.select_tasks(cmteb_tasks.BENCHMARK, [name], [])
    return local_tasks.as_local_task(task, data_dir)


def test_missing_task_directory_is_a_clear_error(tmp_path):
    with pytest.raises(
        local_tasks.LocalDataError, match=r"No local data for task LCQMC: .*LCQMC is not a directory"
    ):
        local_task("LCQMC", tmp_path)
    with pytest.raises(local_tasks.LocalDataError, match=r"Missing file .*LCQMC/test\.jsonl"):
        (tmp_path / "LCQMC").mkdir()
        local_task("LCQMC", tmp_path)


def test_all_missing_task_directories_are_reported_together(tmp_path, capsys):
    argv = ["--model", "unused", "--data-dir", str(tmp_path), "--types", "PairClassification"]
    assert run_cmteb.main(argv) == 2
    message = capsys.readouterr().err
    assert "No local data for task Ocnli" in message and "No local data for task Cmnli" in message


def test_missing_column_is_a_clear_error(tmp_path):
    fixtures.write_jsonl(
        tmp_path / "LCQMC" / "test.jsonl", [{"sentence1": "a", "sentence2": "b", "label": 1}]
    )
    with pytest.raises(
        local_tasks.LocalDataError, match=r"test\.jsonl:1: missing column\(s\) \['score'\]"
    ):
        local_task("LCQMC", tmp_path)
    fixtures.write_jsonl(
        tmp_path / "Ocnli" / "validation.jsonl",
        [{"sentence1": "a", "sentence2": "b", "label": 1}, {"sentence1": "c"}],
    )
    task = local_task("Ocnli", tmp_path)  # the first record is checked up front, every record at loading
    with pytest.raises(
        local_tasks.LocalDataError, match=r"validation\.jsonl:2: missing column\(s\) \['sentence2', 'label'\]"
    ):
        task.load_data()


def test_retrieval_files_are_checked(tmp_path):
    folder = tmp_path / "T2Reranking"
    fixtures.write_jsonl(folder / "corpus.jsonl", [{"_id": "d1", "title": "", "text": "doc"}])
    fixtures.write_jsonl(folder / "queries.jsonl", [{"_id": "q1", "text": "query"}])
    (folder / "qrels").mkdir()
    (folder / "qrels" / "dev.tsv").write_text("qid\tdocid\trel\nq1\td1\t1\n")
    with pytest.raises(
        local_tasks.LocalDataError,
        match=r"missing column\(s\) \['query-id', 'corpus-id', 'score'\] in the header",
    ):
        local_task("T2Reranking", tmp_path)
    (folder / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    with pytest.raises(
        local_tasks.LocalDataError,
        match=r"Reranking task T2Reranking needs its candidates in .*top_ranked/dev\.jsonl",
    ):
        local_task("T2Reranking", tmp_path)
    fixtures.write_jsonl(folder / "top_ranked" / "dev.jsonl", [{"query-id": "q1", "corpus-ids": ["d1"]}])
    task = local_task("T2Reranking", tmp_path)
    task.load_data()
    split = task.dataset["default"]["dev"]
    assert split["relevant_docs"] == {"q1": {"d1": 1}} and split["top_ranked"] == {"q1": ["d1"]}
    assert split["corpus"][0] == {"id": "d1", "text": "doc", "title": ""}


# ---------------------------------------------------------------------------------------------------------
# Revisions, coverage, max AP, the mteb pin


def test_results_are_filed_under_a_hash_of_the_weights(evaluation, model_path):
    revision = evaluation.summary["model"]["revision"]
    assert revision == cmteb_model.weights_revision(model_path) and len(revision) == 12
    assert evaluation.results_dir == evaluation.output_dir / "results" / "test__minilm" / revision
    assert (evaluation.results_dir / "STSB.json").is_file()
    assert f"revision {revision}" in (evaluation.output_dir / "summary.md").read_text()


def test_pair_classification_records_max_ap(evaluation, local_data, direct_model):
    from sklearn.metrics import average_precision_score

    scores = mteb_scores(evaluation.results_dir, "Ocnli")
    labels = [pair["label"] for pair in local_data["Ocnli"]]
    assert scores["cosine_ap"] == pytest.approx(
        average_precision_score(labels, pair_cosines(direct_model, local_data["Ocnli"])), abs=1e-4
    )
    assert evaluation.summary["pair_ap"] == {"Ocnli": pytest.approx(100 * scores["max_ap"])}
    assert evaluation.summary["tasks"]["Ocnli"] == pytest.approx(100 * scores["max_accuracy"])
    assert all(set(row["pair_ap"]) == {"Ocnli"} for row in evaluation.summary["dims"])
    markdown = (evaluation.output_dir / "summary.md").read_text()
    (ap_line,) = [line for line in markdown.splitlines() if line.startswith("| Ocnli |")]
    assert "max AP" in markdown and ap_line.endswith(f"| {evaluation.summary['pair_ap']['Ocnli']:.2f} |")


def test_partial_benchmark_is_labelled(evaluation):
    coverage = evaluation.summary["coverage"]
    assert coverage["label"] == "partial (8 of 31 tasks) + 1 task outside MTEB(cmn, v1): STSBenchmark"
    assert not coverage["full"] and coverage["other_tasks"] == ["STSBenchmark"]
    assert "**partial (8 of 31 tasks)" in (evaluation.output_dir / "summary.md").read_text()
    names = cmteb_tasks.benchmark_task_names(cmteb_tasks.BENCHMARK)
    assert cmteb_tasks.benchmark_coverage(cmteb_tasks.BENCHMARK, names, names)["label"] == "full (31 of 31 tasks)"
    assert run_cmteb.BENCHMARK == cmteb_tasks.BENCHMARK


def test_mteb_version_is_pinned_and_recorded(evaluation):
    major, minor = mteb.__version__.split(".")[:2]
    assert f'"mteb=={major}.{minor}.*"' in (REPO / "pyproject.toml").read_text()
    assert evaluation.summary["versions"]["mteb"] == mteb.__version__


def test_retrained_model_at_the_same_path_is_scored_afresh(local_data, model_path, tmp_path):
    """Two different models saved in turn at one path, evaluated into one output folder: the second is
    scored as a fresh evaluation scores it, under its own revision."""
    model_dir = tmp_path / "runs" / "tiny" / "final"
    argv = ["--model", str(model_dir), "--data-dir", str(local_data["dir"]), "--tasks", "STSBenchmark",
            "--batch-size", str(BATCH_SIZE), "--no-progress"]
    fixtures.save_tiny_sentence_transformer(model_dir, seed=1, tokenizer_dir=model_path)
    first = run_cmteb.run([*argv, "--output-dir", str(tmp_path / "out")])
    fixtures.save_tiny_sentence_transformer(model_dir, seed=2, tokenizer_dir=model_path)
    second = run_cmteb.run([*argv, "--output-dir", str(tmp_path / "out")])
    fresh = run_cmteb.run([*argv, "--output-dir", str(tmp_path / "fresh")])

    assert second["tasks"]["STSBenchmark"] == pytest.approx(fresh["tasks"]["STSBenchmark"], abs=1e-9)
    assert abs(second["tasks"]["STSBenchmark"] - first["tasks"]["STSBenchmark"]) > 0.1
    assert first["model"]["revision"] != second["model"]["revision"] == fresh["model"]["revision"]
    assert first["results_dir"] != second["results_dir"]
    for summary in (first, second):  # each result file holds its own model's score
        result = json.loads((Path(summary["results_dir"]) / "STSBenchmark.json").read_text())
        assert 100 * result["scores"]["test"][0]["main_score"] == pytest.approx(summary["tasks"]["STSBenchmark"])

    from sentence_transformers import SentenceTransformer

    direct = SentenceTransformer(str(model_dir), device="cpu")
    assert second["tasks"]["STSBenchmark"] == pytest.approx(
        100 * cosine_spearman_fresh(direct, local_data["STSBenchmark"]), abs=1e-2
    )


def cosine_spearman_fresh(model, pairs: list[dict]) -> float:
    """cosine_spearman without encode_once's cache (the model at a path changes between calls)."""
    first, second = (
        model.encode([pair[key] for pair in pairs], batch_size=BATCH_SIZE, normalize_embeddings=True)
        for key in ("sentence1", "sentence2")
    )
    cosines = np.round((first.astype(np.float64) * second).sum(axis=1), 6)
    return spearmanr(cosines, [pair["score"] for pair in pairs]).statistic


# ---------------------------------------------------------------------------------------------------------
# A training checkpoint as --model


def test_checkpoint_is_exported_and_evaluated(tiny_bert, tiny_data, tmp_path, monkeypatch):
    import tempfile

    import train_finetune
    from sentence_transformers import SentenceTransformer

    from tests.test_train_finetune import common_args

    run_dir = tmp_path / "ft"
    train_finetune.main(common_args(tiny_bert, tiny_data, run_dir, "--max_steps", "2", "--save_every", "2")[1:])
    checkpoint = run_dir / "checkpoint-2"
    task_dir = fixtures.write_task_json(tmp_path / "sts", name="StsLocal", type="STS", language=["eng"])
    pairs = fixtures.build_training_format_pairs(shared_data("en-stsb/dev.jsonl"), task_dir, "test", 60)

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the export goes
    summary = run_cmteb.run(["--model", str(checkpoint), "--local-task", str(task_dir), "--output-dir",
                             str(tmp_path / "out"), "--batch-size", str(BATCH_SIZE), "--no-progress"])
    model = summary["model"]
    assert model["path"] == str(checkpoint) and model["name"] == "ft/checkpoint-2"
    assert model["checkpoint"]["path"] == str(checkpoint) and model["checkpoint"]["step"] == 2
    assert model["checkpoint"]["script"] == "train_finetune.py"
    assert f"checkpoint: `{checkpoint}` (step 2" in (tmp_path / "out" / "summary.md").read_text()
    # checkpoint-2 of a 2-step run holds final/'s weights (tests/test_export_checkpoint.py)
    final = SentenceTransformer(str(run_dir / "final"), device="cpu")
    expected = cosine_spearman_fresh(final, [{"sentence1": p["text"], "sentence2": p["text_pair"], "score": p["label"]}
                                             for p in pairs])
    assert summary["tasks"]["StsLocal"] == pytest.approx(100 * expected, abs=1e-2)
    assert not list((tmp_path / "tmp").iterdir())  # the temporary export is gone


# ---------------------------------------------------------------------------------------------------------
# Tasks of one's own: --local-task folders with task.json


@pytest.fixture(scope="module")
def own_tasks(local_data, model_path, tmp_path_factory) -> SimpleNamespace:
    """A BEIR-layout retrieval folder (CranfieldLocal), STS and pair classification folders in the training
    format, run together with a C-MTEB task read by --data-dir."""
    root = tmp_path_factory.mktemp("own_tasks")
    folders = {"CranfieldLocal": root / "cranfield", "StsbTraining": root / "stsb", "MsrpLocal": root / "msrp"}
    written = {
        "CranfieldLocal": fixtures.build_beir_subset(
            shared_data("en-cranfield-retrieval"), folders["CranfieldLocal"], "test", n_queries=30, n_other_docs=200
        ),
        "StsbTraining": fixtures.build_training_format_pairs(
            shared_data("en-stsb/dev.jsonl"), folders["StsbTraining"], "test", 100
        ),
        "MsrpLocal": fixtures.build_training_format_pairs(
            shared_data("en-msrp/dev.jsonl"), folders["MsrpLocal"], "dev", 100
        ),
    }
    fixtures.write_task_json(folders["CranfieldLocal"], name="CranfieldLocal", type="Retrieval", language=["eng"],
                             splits=["test"])
    fixtures.write_task_json(folders["StsbTraining"], name="StsbTraining", type="STS", language=["eng"])
    fixtures.write_task_json(folders["MsrpLocal"], name="MsrpLocal", type="PairClassification",
                             language=["eng"], splits=["dev"])
    output_dir = tmp_path_factory.mktemp("own_out")
    argv = ["--model", model_path, "--model-name", "test/minilm", "--data-dir", str(local_data["dir"]),
            "--tasks", "STSB", "--max-seq-length", str(MAX_SEQ_LENGTH), "--batch-size", str(BATCH_SIZE),
            "--output-dir", str(output_dir), "--no-progress"]
    for folder in folders.values():
        argv += ["--local-task", str(folder)]
    summary = run_cmteb.run(argv)
    return SimpleNamespace(summary=summary, written=written, folders=folders, output_dir=output_dir,
                           results_dir=Path(summary["results_dir"]))


def as_mteb_pairs(pairs: list[dict], label: str) -> list[dict]:
    return [{"sentence1": p["text"], "sentence2": p["text_pair"], label: p["label"]} for p in pairs]


def test_local_retrieval_task_ndcg_matches_direct_computation(own_tasks, direct_model):
    written = own_tasks.written["CranfieldLocal"]
    assert len(written["queries"]) == 30 and len(written["corpus"]) > 200
    expected = ndcg_at_10(direct_model, written)  # whole corpus ranked by cosine, linear gains, title + text
    scores = mteb_scores(own_tasks.results_dir, "CranfieldLocal")
    assert scores["main_score"] == scores["ndcg_at_10"] == pytest.approx(expected, abs=MTEB_ROUNDING)
    assert own_tasks.summary["tasks"]["CranfieldLocal"] == pytest.approx(100 * expected, abs=100 * MTEB_ROUNDING)


def test_local_sts_and_pair_tasks_in_training_format_match_direct_computations(own_tasks, direct_model):
    from sklearn.metrics import average_precision_score

    sts = as_mteb_pairs(own_tasks.written["StsbTraining"], "score")
    assert own_tasks.summary["tasks"]["StsbTraining"] == pytest.approx(
        100 * cosine_spearman(direct_model, sts), abs=100 * MTEB_ROUNDING
    )
    pairs = as_mteb_pairs(own_tasks.written["MsrpLocal"], "label")
    scores = mteb_scores(own_tasks.results_dir, "MsrpLocal")
    assert own_tasks.summary["tasks"]["MsrpLocal"] == pytest.approx(100 * scores["max_accuracy"])
    assert scores["cosine_accuracy"] == pytest.approx(best_threshold_accuracy(direct_model, pairs), abs=1e-6)
    ap = average_precision_score([p["label"] for p in pairs], pair_cosines(direct_model, pairs))
    assert scores["cosine_ap"] == pytest.approx(ap, abs=MTEB_ROUNDING)
    # max_ap: the best AP over mteb's similarity functions (cosine, dot, euclidean, manhattan)
    assert own_tasks.summary["pair_ap"]["MsrpLocal"] == pytest.approx(100 * scores["max_ap"])
    assert scores["max_ap"] >= scores["cosine_ap"]


def test_local_tasks_are_marked_local_and_never_counted_as_benchmark_tasks(own_tasks):
    summary = own_tasks.summary
    assert summary["task_types"] == {"CranfieldLocal": "Retrieval", "MsrpLocal": "PairClassification",
                                     "StsbTraining": "STS", "STSB": "STS"}
    for name, folder in own_tasks.folders.items():
        source = summary["sources"][name]
        assert source["source"] == f"local folder {folder.resolve()}" and "revision" not in source
        result = json.loads((own_tasks.results_dir / f"{name}.json").read_text())
        assert result["dataset_revision"] == source["data_hash"]
    assert summary["sources"]["STSB"]["source"].startswith("local files ")
    assert summary["coverage"]["label"] == (
        "partial (1 of 31 tasks) + 3 tasks outside MTEB(cmn, v1): CranfieldLocal, MsrpLocal, StsbTraining"
    )
    assert summary["types"]["STS"] == pytest.approx(np.mean([summary["tasks"]["STSB"], summary["tasks"]["StsbTraining"]]))
    assert summary["average"] == pytest.approx(np.mean(list(summary["tasks"].values())))
    markdown = (own_tasks.output_dir / "summary.md").read_text()
    assert "| Retrieval | CranfieldLocal (local) | test |" in markdown and "partial (1 of 31 tasks)" in markdown


def test_local_task_is_an_mteb_task_of_its_type(tmp_path):
    folder = fixtures.write_task_json(tmp_path / "t", name="TinyPairs", type="PairClassification",
                                      language=["eng"], main_score="max_ap")
    fixtures.write_jsonl(folder / "test.jsonl", [{"text": "a", "text_pair": "b", "label": 1},
                                                 {"sentence1": "c", "sentence2": "d", "label": 0}])
    task = local_tasks.folder_task(folder)
    assert isinstance(task, mteb.abstasks.AbsTaskPairClassification)
    assert task.metadata.main_score == "max_ap" and task.metadata.dataset["path"] == "local/TinyPairs"
    assert task.metadata.dataset["revision"] == task.local_task.revision
    task.load_data()
    assert task.dataset["test"][1] == {"sentence1": "c", "sentence2": "d", "labels": 0}


@pytest.mark.parametrize(
    "spec, data, message",
    [
        ({"name": "X", "type": "Bitext"}, None, r"task\.json: 'type' must be one of"),
        ({"name": "LCQMC", "type": "STS"}, None, r"'LCQMC' is the name of an mteb task"),
        ({"name": "X", "type": "STS", "main_score": "ndcg_at_10"}, None, r"main_score 'ndcg_at_10' is not a score"),
        ({"name": "X", "type": "STS"}, [{"text": "a", "text_pair": "b", "label": 1.0}, {"text": "c", "label": 2.0}],
         r"test\.jsonl:2: expected sentence1 and sentence2"),
        ({"name": "X", "type": "STS"}, [{"text": "a", "text_pair": "b", "label": 3.0}, {"text": "c", "text_pair": "d",
         "label": 3.0}], r"test\.jsonl: every score is 3\.0; an STS task's correlations .* are undefined"),
        # NaN and Infinity (json.dumps writes them bare, json.loads reads them): a NaN Spearman after scoring
        ({"name": "X", "type": "STS"}, [{"text": "a", "text_pair": "b", "label": float("nan")},
         {"text": "c", "text_pair": "d", "label": 2.0}], r"test\.jsonl:1: column 'label' must be a number, got nan"),
        ({"name": "X", "type": "STS"}, [{"sentence1": "a", "sentence2": "b", "score": 1.0},
         {"sentence1": "c", "sentence2": "d", "score": float("inf")}],
         r"test\.jsonl:2: column 'score' must be a number, got inf"),
    ],
)
def test_local_task_errors_are_one_line_naming_the_file(tmp_path, capsys, spec, data, message):
    folder = fixtures.write_task_json(tmp_path / "task", language=["eng"], **spec)
    fixtures.write_jsonl(folder / "test.jsonl", data or [{"text": "a", "text_pair": "b", "label": 1.0},
                                                         {"text": "c", "text_pair": "d", "label": 2.0}])
    assert run_cmteb.main(["--model", "unused", "--local-task", str(folder)]) == 2  # before any model is loaded
    error = capsys.readouterr().err
    assert error.startswith("run_cmteb.py: error: ") and error.count("\n") == 1 and str(folder) in error
    assert __import__("re").search(message, error), error


# ---------------------------------------------------------------------------------------------------------
# A light command line


def test_help_is_fast_and_shows_defaults():
    script = str(REPO / "eval" / "run_cmteb.py")
    start = time.perf_counter()
    completed = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert completed.returncode == 0 and elapsed < 1.0, (elapsed, completed.stderr)
    help_text = completed.stdout
    flat = " ".join(help_text.split())  # argparse wraps the help lines
    assert "encoding batch size (default: 64)" in flat and "(default: 'MTEB(cmn, v1)')" in flat
    assert "--local-task DIR" in help_text and "Examples:\n    python eval/run_cmteb.py" in help_text

    start = time.perf_counter()
    completed = subprocess.run([sys.executable, script, "--model", "m", "--batch-size", "many"],
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2 and time.perf_counter() - start < 1.0
    assert completed.stderr.startswith("run_cmteb.py: error: argument --batch-size") and completed.stderr.count("\n") == 1

    check = ("import sys; sys.path.insert(0, 'eval'); import run_cmteb; run_cmteb.parse_args(['--model', 'm']); "
             "heavy = [m for m in ('mteb', 'torch', 'sentence_transformers') if m in sys.modules]; "
             "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", check], cwd=REPO, check=True, timeout=60)


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line naming the file and line (or the option), exit status 2, and never a wrong number.
# Most cases call run_cmteb.main in-process (the code path of the command line but for sys.exit; importing
# mteb in a fresh process alone takes ~10 s); the subprocess tests check the command line itself.

QRELS_HEADER = "query-id\tcorpus-id\tscore\n"
SMALL_CORPUS = [{"_id": f"d{i}", "title": "", "text": text} for i, text in enumerate(("alpha", "beta", "gamma"), 1)]
SMALL_STS = [
    {"sentence1": "a cat sleeps", "sentence2": "a cat naps", "score": 4.0},
    {"sentence1": "a car drives", "sentence2": "a bus stops", "score": 2.0},
    {"sentence1": "red", "sentence2": "blue sky", "score": 0.5},
]


def jsonl_text(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def write_small_tasks(data_dir: Path) -> Path:
    """DuRetrieval (split dev) and STSB (split test) in the --data-dir layout, a few records each, all valid."""
    fixtures.write_jsonl(data_dir / "DuRetrieval" / "corpus.jsonl", SMALL_CORPUS)
    fixtures.write_jsonl(data_dir / "DuRetrieval" / "queries.jsonl",
                         [{"_id": "q1", "text": "alpha?"}, {"_id": "q2", "text": "beta?"}])
    (data_dir / "DuRetrieval" / "qrels").mkdir()
    (data_dir / "DuRetrieval" / "qrels" / "dev.tsv").write_text(QRELS_HEADER + "q1\td1\t1\nq2\td2\t1\n")
    fixtures.write_jsonl(data_dir / "STSB" / "test.jsonl", SMALL_STS)
    return data_dir


def write_sts_folder(folder: Path) -> Path:
    """A valid task.json STS folder (--local-task) of three pairs."""
    fixtures.write_task_json(folder, name="TinySts", type="STS", language=["eng"])
    fixtures.write_jsonl(folder / "test.jsonl", SMALL_STS)
    return folder


@pytest.fixture(scope="module")
def tiny_model(model_path, tmp_path_factory) -> Path:
    return fixtures.save_tiny_sentence_transformer(tmp_path_factory.mktemp("tiny") / "model", 3, model_path)


def error_line(code: int, stderr: str, pattern: str) -> str:
    """The error line of a run that must have failed with exit status 2 and one line matching `pattern`."""
    assert "Traceback" not in stderr, stderr
    line = stderr.rstrip("\n").splitlines()[-1] if stderr.strip() else ""
    assert code == 2 and line.startswith("run_cmteb.py: error: "), (code, stderr[-2000:])
    assert re.search(pattern, line), line
    return line


def run_small(tiny_model, data_dir: Path, output_dir: Path, *extra: str) -> int:
    return run_cmteb.main(["--model", str(tiny_model), "--data-dir", str(data_dir), "--tasks", "DuRetrieval,STSB",
                           "--output-dir", str(output_dir), "--no-progress", *extra])


BAD_DATA = {  # case: (file under the data dir, its content, what the error line must say)
    "qrels_document_not_in_corpus": (
        "DuRetrieval/qrels/dev.tsv", QRELS_HEADER + "q1\td1\t1\nq2\td9\t1\n",
        r"DuRetrieval/qrels/dev\.tsv:3: document 'd9' is not in corpus\.jsonl"),
    "duplicate_corpus_id": (
        "DuRetrieval/corpus.jsonl", jsonl_text([*SMALL_CORPUS, {"_id": "d1", "title": "", "text": "other"}]),
        r"DuRetrieval/corpus\.jsonl:4: id 'd1' occurs twice \(first at line 1\)"),
    "text_score": (
        "STSB/test.jsonl", jsonl_text([*SMALL_STS[:2], {**SMALL_STS[2], "score": "high"}]),
        r"STSB/test\.jsonl:3: column 'score' must be a finite number, got 'high'"),
    "qrels_text_score": (
        "DuRetrieval/qrels/dev.tsv", QRELS_HEADER + "q1\td1\thigh\n",
        r"DuRetrieval/qrels/dev\.tsv:2: column 'score' must be a number, got 'high'"),
    "qrels_match_no_query": (
        "DuRetrieval/qrels/dev.tsv", QRELS_HEADER + "qx\td1\t1\nqy\td2\t1\n",
        r"DuRetrieval/qrels/dev\.tsv:2: query 'qx' is not in queries\.jsonl"),
    "qrels_some_rows_name_unknown_queries": (
        "DuRetrieval/qrels/dev.tsv", QRELS_HEADER + "q1\td1\t1\nqy\td2\t1\nqz\td3\t1\n",
        r"DuRetrieval/qrels/dev\.tsv:3: query 'qy' is not in queries\.jsonl"),
    "qrels_header_only": (
        "DuRetrieval/qrels/dev.tsv", QRELS_HEADER, r"DuRetrieval/qrels/dev\.tsv holds no judgements"),
    "qrels_infinite_score": (  # int(float("inf")) raised OverflowError: a traceback
        "DuRetrieval/qrels/dev.tsv", QRELS_HEADER + "q1\td1\t1\nq2\td2\tinf\n",
        r"DuRetrieval/qrels/dev\.tsv:3: column 'score' must be a finite number, got inf"),
    "constant_sts_scores": (  # mteb's Spearman and Pearson would be NaN
        "STSB/test.jsonl", jsonl_text([{**pair, "score": 2.0} for pair in SMALL_STS]),
        r"STSB/test\.jsonl: every score is 2\.0; an STS task's correlations .* are undefined"),
}


@pytest.mark.parametrize("file, content, message", BAD_DATA.values(), ids=BAD_DATA)
def test_bad_local_data_is_one_line_naming_file_and_line(tiny_model, tmp_path, capsys, file, content, message):
    data_dir = write_small_tasks(tmp_path / "data")
    (data_dir / file).write_text(content)
    code = run_small(tiny_model, data_dir, tmp_path / "out")
    line = error_line(code, capsys.readouterr().err, message)
    assert str(data_dir / file) in line
    assert not (tmp_path / "out" / "summary.json").exists()  # no summary of a run that did not finish


def test_cli_bad_data_exits_2_with_one_line(tiny_model, tmp_path):
    file, content, message = BAD_DATA["duplicate_corpus_id"]
    data_dir = write_small_tasks(tmp_path / "data")
    (data_dir / file).write_text(content)
    command = [sys.executable, str(REPO / "eval" / "run_cmteb.py"), "--model", str(tiny_model), "--data-dir",
               str(data_dir), "--tasks", "DuRetrieval,STSB", "--output-dir", str(tmp_path / "out"), "--no-progress"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    error_line(completed.returncode, completed.stderr, message)


def test_documents_without_a_title_get_an_empty_one(tmp_path):
    """A corpus where only some records have a title: mteb would read the others' title as None and fail."""
    data_dir = write_small_tasks(tmp_path)
    corpus = [SMALL_CORPUS[0], {"_id": "d2", "text": "beta"}, {**SMALL_CORPUS[2], "title": None}]
    fixtures.write_jsonl(data_dir / "DuRetrieval" / "corpus.jsonl", corpus)
    task = local_task("DuRetrieval", data_dir)
    task.load_data()
    assert task.dataset["default"]["dev"]["corpus"]["title"] == ["", "", ""]


@pytest.mark.filterwarnings("ignore:An input array is constant")  # the NaN this test is about
def test_non_finite_score_is_null_flagged_and_left_out_of_the_averages(tiny_model, tmp_path, capsys, monkeypatch):
    """A NaN main score (mteb's Spearman of constant gold scores, with the data check that refuses them switched
    off) must reach neither summary.json (NaN is not JSON) nor an average, and the run must not exit 0."""
    monkeypatch.setattr(local_tasks, "check_gold_varies", lambda *args: None, raising=False)
    data_dir = write_small_tasks(tmp_path / "data")
    (data_dir / "STSB" / "test.jsonl").write_text(BAD_DATA["constant_sts_scores"][1])
    out = tmp_path / "out"
    code = run_small(tiny_model, data_dir, out, "--dims", "16")
    error_line(code, capsys.readouterr().err, re.escape(str(out / "summary.json")) + r": score not finite, recorded "
               r"as null and left out of the averages: STSB: cosine_spearman = nan \(dim 16\); STSB: cosine_spearman "
               r"= nan \(dim 32\)$")

    def reject(constant):
        raise AssertionError(f"summary.json holds {constant}, which is not JSON")

    summary = json.loads((out / "summary.json").read_text(), parse_constant=reject)
    for row in [summary, *summary["dims"]]:
        assert row["tasks"]["STSB"] is None and row["types"]["STS"] is None
        assert row["average"] == row["average_by_type"] == row["tasks"]["DuRetrieval"] is not None
        assert row["not_finite"] == ["STSB: cosine_spearman = nan"]
    assert summary["coverage"]["label"] == "partial (1 of 31 tasks); left out (score not finite): STSB"
    markdown = (out / "summary.md").read_text()
    assert "| STS | STSB | test | n/a | n/a |" in markdown and "**Not finite**" in markdown


def test_nan_embeddings_are_a_clear_error(tiny_model, tmp_path, capsys):
    """A model whose embeddings are NaN (as fp16 overflow gives): mteb would fail in sklearn, or rank by noise."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    model_dir = Path(shutil.copytree(tiny_model, tmp_path / "nan_model"))
    weights = load_file(model_dir / "model.safetensors")
    (key,) = [key for key in weights if key.endswith("word_embeddings.weight")]
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    data_dir = write_small_tasks(tmp_path / "data")
    code = run_cmteb.main(["--model", str(model_dir), "--data-dir", str(data_dir), "--tasks", "STSB",
                           "--output-dir", str(tmp_path / "out"), "--no-progress"])
    error_line(code, capsys.readouterr().err, r"non-finite \(NaN or infinite\) embeddings for 3 of 3 texts of task STSB")


def test_truncated_weight_file_is_named(tiny_model, tmp_path, capsys):
    import shutil

    model_dir = Path(shutil.copytree(tiny_model, tmp_path / "truncated"))
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    folder = write_sts_folder(tmp_path / "sts")
    code = run_cmteb.main(["--model", str(model_dir), "--local-task", str(folder), "--output-dir",
                           str(tmp_path / "out"), "--no-progress"])
    error_line(code, capsys.readouterr().err, re.escape(str(weights)) + r": cannot be read \(.+\); is the file truncated\?")


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"query": "q: ",}', r"prompts\.json:1: --prompts: invalid JSON \(Expecting property name enclosed in "
                              r"double quotes, column 17\)"),
        ('{\n  "query": "q: "\n  "document": "d: "\n}', r"prompts\.json:3: --prompts: invalid JSON \(Expecting ','"),
        ('["query: "]', r"prompts\.json: --prompts: expected a JSON object, got list"),
        ('{"query": 3}', r"prompts\.json: --prompts: the prompt of 'query' must be a string, got 3"),
    ],
    ids=["trailing_comma", "missing_comma_line_3", "list", "number"],
)
def test_bad_prompts_file_is_one_line(tmp_path, capsys, content, message):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(content)
    folder = write_sts_folder(tmp_path / "sts")
    code = run_cmteb.main(["--model", "unused", "--local-task", str(folder), "--prompts", str(prompts)])
    assert str(prompts) in error_line(code, capsys.readouterr().err, message)


@pytest.mark.parametrize(
    "template, message",
    [
        ("Instruct: {instruction}\\nQuery: {query}", r"unknown field \{query\}; the only field allowed is \{instruction\}"),
        ("{}: {instruction}", r"unknown field \{\}"),
        ("Instruct: {instruction", r"expected '\}' before end of string"),
    ],
)
def test_bad_instruction_template_is_refused_before_the_model_loads(tmp_path, capsys, template, message):
    folder = write_sts_folder(tmp_path / "sts")  # --model unused: loading it would fail differently
    code = run_cmteb.main(["--model", "unused", "--local-task", str(folder), "--instruction-template", template])
    error_line(code, capsys.readouterr().err, r"--instruction-template '.*': " + message)


@pytest.mark.parametrize(
    "model, message",
    [
        ("runs/no_such_run/final", "no such directory"),  # more parts than a hub id ('org/name')
        ("./no_such_model", "no such directory"),
        ("~/no_such_model", "no such directory"),
        ("{tmp}/no_such_model", "no such directory"),
        ("runs/final", "no such directory"),  # shaped like a hub id, but runs/ is a folder here
        ("weights.bin", "not a directory"),
    ],
)
def test_missing_model_path_is_refused_before_anything_heavy(tmp_path, model, message):
    (tmp_path / "runs").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"")
    model = model.format(tmp=tmp_path)
    start = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, str(REPO / "eval" / "run_cmteb.py"), "--model", model, "--tasks", "STSB"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)},
    )
    assert completed.returncode == 2 and completed.stderr == f"run_cmteb.py: error: --model {model}: {message}\n"
    assert time.perf_counter() - start < 5  # answered before mteb, torch and the model are imported


# ---------------------------------------------------------------------------------------------------------
# Every JSON file of a run is JSON: mteb's result files too (Python's json writes a NaN score as bare NaN)


def strict_json(path: Path):
    """The content of `path`, refusing NaN and Infinity (which Python's json reads, and no strict reader does)."""
    def reject(constant):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)


@pytest.mark.filterwarnings("ignore:An input array is constant")  # the NaN this test is about
def test_mteb_result_files_of_a_nan_score_hold_null(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(local_tasks, "check_gold_varies", lambda *args: None, raising=False)
    data_dir = write_small_tasks(tmp_path / "data")
    (data_dir / "STSB" / "test.jsonl").write_text(BAD_DATA["constant_sts_scores"][1])
    out = tmp_path / "out"
    assert run_small(tiny_model, data_dir, out, "--dims", "16") == 2  # a score not finite ends the run
    capsys.readouterr()
    result_files = sorted((out / "results").rglob("STSB.json"))
    assert len(result_files) == 2  # dims 16 and 32
    for path in result_files:
        content = strict_json(path)
        (scores,) = content["scores"]["test"]
        assert scores["main_score"] is None and scores["cosine_spearman"] is None
        assert scores["manhattan_spearman"] is None and scores["hf_subset"] == "default"  # the rest as mteb wrote it
        assert content["task_name"] == "STSB" and content["evaluation_time"] > 0
    for path in (out / "results").rglob("*.json"):
        strict_json(path)


# ---------------------------------------------------------------------------------------------------------
# The model as sentence-transformers reads it: refused when it would be read wrongly, said in one line otherwise


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def damaged_copy(source: Path | str, target: Path, *remove: str) -> Path:
    import shutil

    shutil.copytree(source, target)
    for name in remove:
        (target / name).unlink(missing_ok=True)
    return target


def reading_line(stderr: str, model: Path | str) -> str:
    """The one line that says how the model was read."""
    lines = [line for line in stderr.splitlines() if line.startswith(f"model {model}: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.fixture(params=["minilm", "tiny"])
def saved_model(request, model_path, tiny_model) -> Path:
    """The packaged MiniLM (1_Pooling/, Normalize) and the tiny random model (1_Pooling/, 2_Normalize/)."""
    return Path(model_path if request.param == "minilm" else tiny_model)


def test_a_model_without_tokenizer_files_is_refused(saved_model, tmp_path, capsys):
    """Without them transformers builds a 5-token vocabulary: every word is [UNK], and the run used to exit 0 with
    a score of that; refused as training refuses such a start model (modules/model.py load_tokenizer)."""
    model_dir = damaged_copy(saved_model, tmp_path / "no_tokenizer", *TOKENIZER_FILES)
    code = run_cmteb.main(["--model", str(model_dir), "--local-task", str(write_sts_folder(tmp_path / "sts")),
                           "--output-dir", str(tmp_path / "out"), "--no-progress"])
    error_line(code, capsys.readouterr().err, re.escape(f"model {model_dir}: no tokenizer files (none of "
                                                        "tokenizer.json, vocab.txt"))
    assert not (tmp_path / "out" / "summary.json").exists()


def test_module_folders_without_modules_json_are_refused(saved_model, tmp_path, capsys):
    """A save that lost modules.json: sentence-transformers would read the folder as a plain transformers model
    (mean pooling, no Dense, no Normalize) and say nothing."""
    model_dir = damaged_copy(saved_model, tmp_path / "no_modules_json", "modules.json")
    code = run_cmteb.main(["--model", str(model_dir), "--local-task", str(write_sts_folder(tmp_path / "sts")),
                           "--output-dir", str(tmp_path / "out"), "--no-progress"])
    line = error_line(code, capsys.readouterr().err, re.escape(f"model {model_dir}: ") + r".*1_Pooling/.* but no "
                      r"modules\.json")
    assert ("2_Normalize/" in line) == (saved_model / "2_Normalize").is_dir()  # the tiny model's (MiniLM has none)
    assert not (tmp_path / "out" / "summary.json").exists()


def test_an_invalid_modules_json_is_named(tiny_model, tmp_path, capsys):
    model_dir = damaged_copy(tiny_model, tmp_path / "bad_modules_json")
    (model_dir / "modules.json").write_text('[\n  {"idx": 0, "path": ""},\n  {"idx": 1 "path": "1_Pooling"}\n]\n')
    code = run_cmteb.main(["--model", str(model_dir), "--local-task", str(write_sts_folder(tmp_path / "sts")),
                           "--output-dir", str(tmp_path / "out"), "--no-progress"])
    error_line(code, capsys.readouterr().err, re.escape(f"{model_dir / 'modules.json'}:3: invalid JSON (Expecting ','"))


def test_how_the_model_is_read_is_said_for_every_model(model_path, tiny_model, tiny_bert, tmp_path, capsys):
    """One line: the modules, pooling, normalisation, output dimension and saved prompts; summary.json keeps it."""
    folder = write_sts_folder(tmp_path / "sts")
    with_prompts = damaged_copy(tiny_model, tmp_path / "with_prompts")
    config_file = with_prompts / "config_sentence_transformers.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "prompts": {"query": "query: ", "document": ""}}))
    expected = {
        model_path: ["read by sentence-transformers as BertModel (max_seq_length 256) -> mean pooling -> "
                     "Normalize: 384 dims, normalised", "prompts: none"],
        with_prompts: ["as BertModel (max_seq_length 64) -> mean pooling -> Normalize: 32 dims, normalised",
                       "prompts: query='query: '"],
        # a plain transformers folder: sentence-transformers' default, said so
        tiny_bert: ["no modules.json: read by sentence-transformers as a plain transformers model: BertModel "
                    "(max_seq_length 128) -> mean pooling: 32 dims, not normalised", "prompts: none"],
    }
    for index, (model, parts) in enumerate(expected.items()):
        out = tmp_path / f"out{index}"
        summary = run_cmteb.run(["--model", str(model), "--local-task", str(folder), "--output-dir", str(out),
                                 "--no-progress"])
        line = reading_line(capsys.readouterr().err, model)
        assert all(part in line for part in parts), (line, parts)
        assert summary["model"]["read_as"] == line.removeprefix(f"model {model}: ")


# ---------------------------------------------------------------------------------------------------------
# Long texts: cut to a character budget before the tokenizer sees them, as in training


def write_task_with_a_huge_text(folder: Path, task_type: str, huge: str) -> Path:
    if task_type == "STS":
        fixtures.write_task_json(folder, name="HugeSts", type="STS", language=["eng"])
        fixtures.write_jsonl(folder / "test.jsonl", [{**SMALL_STS[0], "sentence1": huge}, *SMALL_STS[1:]])
    else:
        fixtures.write_task_json(folder, name="HugeRetrieval", type="Retrieval", language=["eng"])
        fixtures.write_jsonl(folder / "corpus.jsonl", [{**SMALL_CORPUS[0], "text": huge}, *SMALL_CORPUS[1:]])
        fixtures.write_jsonl(folder / "queries.jsonl", [{"_id": "q1", "text": "alpha?"}, {"_id": "q2", "text": "beta?"}])
        (folder / "qrels").mkdir()
        (folder / "qrels" / "test.tsv").write_text(QRELS_HEADER + "q1\td1\t1\nq2\td2\t1\n")
    return folder


@pytest.mark.parametrize("task_type", ["STS", "Retrieval"])
def test_a_huge_text_is_cut_before_the_tokenizer_reads_it(tiny_model, tmp_path, monkeypatch, task_type):
    """A fast tokenizer reads a whole text (and allocates its offsets) before truncating: a 2M-word text cost 2.2 GB.
    Every text reaches it cut to max_seq_length x modules.collator.MAX_CHARS_PER_TOKEN characters (64 x 128 here)."""
    from sentence_transformers.base.modules.transformer import Transformer

    from modules.collator import MAX_CHARS_PER_TOKEN

    budget = 64 * MAX_CHARS_PER_TOKEN  # the tiny model's max_seq_length
    huge = " ".join(f"word{i % 997}" for i in range(1_000_000))
    folder = write_task_with_a_huge_text(tmp_path / "huge", task_type, huge)
    longest = []
    real_preprocess = Transformer.preprocess

    def spy(self, inputs, *args, **kwargs):  # where sentence-transformers hands the texts to the tokenizer
        longest.append(max(len(text) for text in inputs))
        assert longest[-1] <= budget, f"a text of {longest[-1]} characters reached the tokenizer"
        return real_preprocess(self, inputs, *args, **kwargs)

    monkeypatch.setattr(Transformer, "preprocess", spy)
    assert run_cmteb.main(["--model", str(tiny_model), "--local-task", str(folder), "--output-dir",
                           str(tmp_path / "out"), "--no-progress"]) == 0
    assert max(longest) == budget  # the huge text was scored, cut (the others are far shorter)


def test_several_models_are_scored_alike_and_compared_in_one_table(local_data, model_path, tiny_bert, tmp_path,
                                                                   capsys):
    """--model given twice: each model scored as a single --model run scores it, in its own folder, then one table."""
    from modules.model import EmbeddingModel

    tiny = tmp_path / "tiny"
    EmbeddingModel.from_pretrained(tiny_bert, max_seq_length=32).save_pretrained(tiny)
    common = ["--data-dir", str(local_data["dir"]), "--tasks", "STSB", "--max-seq-length", "32", "--no-progress"]
    both = run_cmteb.run(["--model", model_path, "--model", str(tiny), *common, "--output-dir", str(tmp_path / "both")])
    alone = run_cmteb.run(["--model", str(tiny), *common, "--output-dir", str(tmp_path / "alone")])
    assert list(both) == [model_path, str(tiny)]
    assert both[str(tiny)]["tasks"] == alone["tasks"] and both[model_path]["tasks"]["STSB"] != alone["tasks"]["STSB"]
    table = capsys.readouterr().out.split(f"| Task | {model_path} | {tiny} |\n")[1].splitlines()
    assert table[1] == f"| Average | {both[model_path]['average']:.2f} | {both[str(tiny)]['average']:.2f} |"
    assert table[2] == f"| STSB | {both[model_path]['tasks']['STSB']:.2f} | {both[str(tiny)]['tasks']['STSB']:.2f} |"
    assert len(list((tmp_path / "both").glob("*/summary.json"))) == 2
    assert run_cmteb.main(["--model", model_path, "--model", str(tiny), "--model-name", "x", *common]) == 2

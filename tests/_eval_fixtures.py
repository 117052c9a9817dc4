"""Small local C-MTEB-style task folders built from the shared developer data, for tests of eval/run_cmteb.py.

Each builder writes one task folder in the layout of eval/README.md and returns what a direct computation
needs to check mteb's score. Subsets are drawn with a fixed seed and kept small so the tests run on a CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def sample(rows: list[dict[str, Any]], n: int, seed: int = 0) -> list[dict[str, Any]]:
    return random.Random(seed).sample(rows, min(n, len(rows)))


def build_sts_task(source: Path, task_dir: Path, split: str, n_pairs: int) -> list[dict[str, Any]]:
    """Scored pairs {"text", "text_pair", "label"} as an STS task; returns the pairs written."""
    pairs = [
        {"sentence1": row["text"], "sentence2": row["text_pair"], "score": float(row["label"])}
        for row in sample(read_jsonl(source), n_pairs)
    ]
    write_jsonl(task_dir / f"{split}.jsonl", pairs)
    return pairs


def build_pair_classification_task(
    source: Path, task_dir: Path, split: str, n_pairs: int
) -> list[dict[str, Any]]:
    """0/1-labelled pairs as a pair classification task; returns the pairs written."""
    pairs = [
        {"sentence1": row["text"], "sentence2": row["text_pair"], "label": int(row["label"])}
        for row in sample(read_jsonl(source), n_pairs)
    ]
    write_jsonl(task_dir / f"{split}.jsonl", pairs)
    return pairs


def judgements(source_dir: Path, keep) -> dict[str, dict[str, int]]:
    """{query id: {doc id: score}} of a BEIR folder's qrels.tsv, the lines where ``keep(doc_id, score)``."""
    qrels: dict[str, dict[str, int]] = {}
    with (source_dir / "qrels.tsv").open(encoding="utf-8") as handle:
        next(handle)
        for line in handle:
            query_id, doc_id, score = line.rstrip("\n").split("\t")
            if keep(doc_id, int(score)):
                qrels.setdefault(query_id, {})[doc_id] = int(score)
    return qrels


def retrieval_subset(source_dir: Path, n_docs: int) -> dict[str, Any]:
    """`n_docs` documents of a retrieval set with the queries judged only against them."""
    corpus = sample(read_jsonl(source_dir / "corpus.jsonl"), n_docs)
    doc_ids = {doc["id"] for doc in corpus}
    qrels = judgements(source_dir, lambda doc_id, score: doc_id in doc_ids)
    queries = [query for query in read_jsonl(source_dir / "queries.jsonl") if query["id"] in qrels]
    return {"corpus": corpus, "queries": queries, "qrels": qrels}


def write_retrieval_task(
    subset: dict[str, Any], task_dir: Path, split: str, n_queries: int | None = None
) -> dict[str, Any]:
    """Write corpus/queries/qrels in the BEIR layout (`_id` columns); returns the subset written."""
    queries = subset["queries"][:n_queries] if n_queries else subset["queries"]
    qrels = {query["id"]: subset["qrels"][query["id"]] for query in queries}
    write_jsonl(
        task_dir / "corpus.jsonl",
        [{"_id": d["id"], "title": d["title"], "text": d["text"]} for d in subset["corpus"]],
    )
    write_jsonl(task_dir / "queries.jsonl", [{"_id": q["id"], "text": q["text"]} for q in queries])
    lines = ["query-id\tcorpus-id\tscore"]
    lines += [
        f"{query_id}\t{doc_id}\t{score}" for query_id, docs in qrels.items() for doc_id, score in docs.items()
    ]
    (task_dir / "qrels").mkdir(parents=True, exist_ok=True)
    (task_dir / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"corpus": subset["corpus"], "queries": queries, "qrels": qrels}


def build_reranking_task(
    subset: dict[str, Any], task_dir: Path, split: str, n_queries: int, n_candidates: int
) -> dict[str, Any]:
    """Retrieval files plus, per query, its relevant documents and random others as candidates to rerank."""
    written = write_retrieval_task(subset, task_dir, split, n_queries)
    rng = random.Random(1)
    doc_ids = [doc["id"] for doc in subset["corpus"]]
    candidates = {}
    for query in written["queries"]:
        relevant = list(written["qrels"][query["id"]])
        others = rng.sample(
            [doc_id for doc_id in doc_ids if doc_id not in relevant], n_candidates - len(relevant)
        )
        candidates[query["id"]] = rng.sample(relevant + others, n_candidates)
    write_jsonl(
        task_dir / "top_ranked" / f"{split}.jsonl",
        [{"query-id": q, "corpus-ids": c} for q, c in candidates.items()],
    )
    return {**written, "candidates": candidates}


def build_classification_task(
    source: Path, task_dir: Path, split: str, label_key: str, n_train_per_label: int, n_eval: int
) -> None:
    """Sentences labelled by `label_key` (e.g. STS-B's genre): a train file and an evaluation file."""
    rows = sample(read_jsonl(source), 10**9)
    evaluation = [{"text": row["text"], "label": row[label_key]} for row in rows[:n_eval]]
    train, per_label = [], {}
    for row in rows[n_eval:]:
        label = row[label_key]
        if per_label.get(label, 0) < n_train_per_label:
            per_label[label] = per_label.get(label, 0) + 1
            train.append({"text": row["text"], "label": label})
    write_jsonl(task_dir / "train.jsonl", train)
    write_jsonl(task_dir / f"{split}.jsonl", evaluation)


def build_clustering_task(
    source: Path, task_dir: Path, split: str, label_key: str, n_sets: int, set_size: int
) -> None:
    """Legacy (C-MTEB) clustering: each line is one set of sentences with their labels."""
    rows = sample(read_jsonl(source), n_sets * set_size)
    sets = [rows[start : start + set_size] for start in range(0, len(rows), set_size)]
    write_jsonl(
        task_dir / f"{split}.jsonl",
        [
            {"sentences": [row["text"] for row in rows], "labels": [row[label_key] for row in rows]}
            for rows in sets
        ],
    )


# ---------------------------------------------------------------------------------------------------------
# Tasks of one's own (a folder with task.json, eval/run_cmteb.py --local-task) and tiny models


def write_task_json(task_dir: Path, **spec: Any) -> Path:
    task_dir.mkdir(parents=True, exist_ok=True)
    (task_dir / "task.json").write_text(json.dumps(spec), encoding="utf-8")
    return task_dir


def build_training_format_pairs(source: Path, task_dir: Path, split: str, n_pairs: int) -> list[dict[str, Any]]:
    """Pairs in the training format {"text", "text_pair", "label"} (STS score or 0/1), as read from `source`."""
    pairs = [
        {"text": row["text"], "text_pair": row["text_pair"], "label": row["label"]}
        for row in sample(read_jsonl(source), n_pairs)
    ]
    write_jsonl(task_dir / f"{split}.jsonl", pairs)
    return pairs


def build_beir_subset(
    source_dir: Path, task_dir: Path, split: str, n_queries: int, n_other_docs: int
) -> dict[str, Any]:
    """`n_queries` queries, the documents they judge and `n_other_docs` others, in the BEIR layout.

    Documents with an empty text are left out with their judgements (a local task's documents need a text).
    Returns the subset as written: corpus [{"id", "title", "text"}], queries [{"id", "text"}], qrels.
    """
    corpus = [doc for doc in read_jsonl(source_dir / "corpus.jsonl") if doc["text"].strip()]
    doc_ids = {doc["id"] for doc in corpus}
    qrels = judgements(source_dir, lambda doc_id, score: doc_id in doc_ids and score > 0)
    queries = sample([query for query in read_jsonl(source_dir / "queries.jsonl") if query["id"] in qrels], n_queries)
    judged = {doc_id for query in queries for doc_id in qrels[query["id"]]}
    others = sample([doc for doc in corpus if doc["id"] not in judged], n_other_docs, seed=1)
    subset = {
        "corpus": [doc for doc in corpus if doc["id"] in judged] + others,
        "queries": [{"id": query["id"], "text": query["text"]} for query in queries],
        "qrels": {query["id"]: qrels[query["id"]] for query in queries},
    }
    return write_retrieval_task(subset, task_dir, split)


def save_tiny_sentence_transformer(path: Path, seed: int, tokenizer_dir: str) -> Path:
    """A random 2-layer, 32-d BERT (weights drawn with `seed`) with mean pooling, saved as a
    sentence-transformers directory at `path` (replacing what is there)."""
    import shutil

    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    backbone = path.parent / f"{path.name}.backbone"
    BertModel(config).save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    transformer = models.Transformer(str(backbone), max_seq_length=64)
    model = SentenceTransformer(modules=[transformer, models.Pooling(32, "mean"), models.Normalize()], device="cpu")
    if path.exists():
        shutil.rmtree(path)
    model.save(str(path))
    shutil.rmtree(backbone)
    return path

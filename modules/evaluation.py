"""Quick evaluation: embed texts, score STS-style pairs (Spearman of cosine) and retrieval (nDCG@10)."""

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr


def load_sts_pairs(path):
    """The records of an STS file (text, text_pair, label), checked like training data (``--eval_sts_file``)."""
    from .data import DataError, MetaEntry, load_task_dataset

    if not Path(path).is_file():
        raise DataError(f"--eval_sts_file {path}: no such file")
    return load_task_dataset(MetaEntry(Path(path), 1, kind="cosent", source="--eval_sts_file"), {}).records


@torch.no_grad()
def embed_texts(model, tokenizer, texts, max_length, batch_size=64, normalize=True):
    """Embed ``texts`` with ``model(**tokens)`` in eval mode, in length-sorted batches.

    ``model`` may be the accelerate-wrapped module (DDP, FSDP, DeepSpeed), so every process of a
    sharded run must call this together.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    chunks = []
    for start in range(0, len(order), batch_size):
        batch_texts = [texts[i] for i in order[start : start + batch_size]]
        tokens = tokenizer(batch_texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        chunks.append(model(**tokens.to(device)).float().cpu())
    model.train(was_training)
    embeddings = torch.cat(chunks)[torch.argsort(torch.tensor(order))]
    return F.normalize(embeddings, dim=-1) if normalize else embeddings


def sts_spearman(model, tokenizer, pairs, max_length, batch_size=64):
    """Spearman correlation (x100) between cos(text, text_pair) and the gold label."""
    embeddings = embed_texts(model, tokenizer, [p["text"] for p in pairs] + [p["text_pair"] for p in pairs],
                             max_length, batch_size)
    first, second = embeddings[: len(pairs)], embeddings[len(pairs) :]
    scores = (first * second).sum(-1).numpy()
    return 100 * spearmanr(scores, [p["label"] for p in pairs]).statistic


def read_retrieval_folder(folder, split=None):
    """(queries {id: text}, corpus {id: text}, qrels {query id: {doc id: grade}}) from a BEIR-layout folder:
    corpus.jsonl (read by modules.corpus.read_corpus), queries.jsonl ({"_id" or "id", "text"}) and
    qrels/<split>.tsv, or qrels.tsv when no split is asked for or the folder has no qrels/ (query-id,
    corpus-id, score; with a header). Only judgements with score > 0, and the queries they judge, are kept."""
    from .corpus import read_corpus
    from .data import DataError, iter_raw_records

    folder = Path(folder)
    qrels_file = folder / "qrels" / f"{split}.tsv" if split and (folder / "qrels").is_dir() else folder / "qrels.tsv"
    for path in (folder / "corpus.jsonl", folder / "queries.jsonl", qrels_file):
        if not path.exists():
            raise DataError(f"{folder}: no {path.relative_to(folder)} (expected the BEIR layout)")
    corpus = read_corpus(folder / "corpus.jsonl")
    qrels = {}
    for line_no, line in enumerate(qrels_file.read_text(encoding="utf-8").splitlines()[1:], start=2):
        try:
            query_id, doc_id, grade = line.split("\t")
            grade = float(grade)
        except ValueError:
            raise DataError(f"{qrels_file}:{line_no}: expected query-id, corpus-id and score separated by tabs") from None
        if grade > 0:
            qrels.setdefault(query_id, {})[doc_id] = grade
    queries = {}
    for _, query in iter_raw_records(folder / "queries.jsonl"):
        query_id = str(query.get("_id", query.get("id")))
        if query_id in qrels:
            queries[query_id] = query["text"]
    return queries, dict(zip(corpus.ids, corpus.texts)), qrels


def ndcg_at_k(scores, relevant, k=10):
    """Mean nDCG@k (x100), graded gains: ``scores`` [queries, docs]; ``relevant[i]`` = {doc index: grade}."""
    top = scores.topk(min(k, scores.size(1)), dim=1).indices.tolist()
    total = 0.0
    for ranked, grades in zip(top, relevant):
        dcg = sum(grades.get(doc, 0.0) / math.log2(rank + 2) for rank, doc in enumerate(ranked))
        ideal = sum(g / math.log2(rank + 2) for rank, g in enumerate(sorted(grades.values(), reverse=True)[:k]))
        total += dcg / ideal
    return 100 * total / len(relevant)


def retrieval_ndcg(model, tokenizer, queries, corpus, qrels, query_max_len=64, passage_max_len=256, k=10,
                   query_prefix=""):
    """nDCG@k (x100) of ranking the whole corpus by cosine for each judged query."""
    doc_ids = list(corpus)
    documents = embed_texts(model, tokenizer, [corpus[d] for d in doc_ids], passage_max_len)
    query_ids = list(queries)
    query_embeddings = embed_texts(model, tokenizer, [query_prefix + queries[q] for q in query_ids], query_max_len)
    position = {d: i for i, d in enumerate(doc_ids)}
    relevant = [{position[d]: g for d, g in qrels[q].items() if d in position} for q in query_ids]
    return ndcg_at_k(query_embeddings @ documents.T, relevant, k)

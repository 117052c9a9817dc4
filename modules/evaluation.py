"""Quick evaluation: embed texts, score STS-style pairs (Spearman of cosine), pair classification and retrieval
(nDCG@10), and the dev sets a training run is scored on (--eval_sts_file, --eval_dir)."""

import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from .beir import document_text, read_retrieval_split, relevant_only
from .cli import UsageError
from .collator import tokenize
from .prompts import prompt_for
from .top_k import chunked_top_k


def load_sts_pairs(path):
    """The records of an STS file (text, text_pair, label), checked like training data (``--eval_sts_file``)."""
    from .cli import DataError
    from .meta_list import MetaEntry
    from .task_datasets import load_task_dataset

    if not Path(path).is_file():
        raise DataError(f"--eval_sts_file {path}: no such file")
    return load_task_dataset(MetaEntry(Path(path), 1, kind="cosent", source="--eval_sts_file"), {}).records


@torch.no_grad()
def embed_texts(model, tokenizer, texts, max_length, batch_size=64, normalize=True):
    """Embed ``texts`` with ``model(**tokens)`` in eval mode, in length-sorted batches.

    ``model`` may be the accelerate-wrapped module (DDP, FSDP, DeepSpeed), so every process of a
    sharded run must call this together.
    """
    batches = length_batches(texts, batch_size)
    embeddings = torch.cat(embed_batches(model, tokenizer, texts, batches, max_length))
    embeddings = embeddings[torch.argsort(torch.tensor([i for batch in batches for i in batch]))]
    return F.normalize(embeddings, dim=-1) if normalize else embeddings


def length_batches(texts, batch_size=64):
    """[[text index]]: the batches ``embed_texts`` runs, shortest texts first (each pads to its longest)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


@torch.no_grad()
def embed_batches(model, tokenizer, texts, batches, max_length, extra_forwards=0):
    """[embeddings of each batch] (float32, on the CPU, not normalised), ``model`` in eval mode, followed by those of
    ``extra_forwards`` forwards of the first text, for the caller to drop: a process with fewer batches than the
    others joins every forward of a sharded model (modules/process_shares.py)."""
    from .progress import text_progress

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    embedded, progress = [], text_progress([texts[i] for batch in batches for i in batch])  # shown inside
    for batch in batches:  # modules.progress.embedding_progress only
        batch_texts = [texts[i] for i in batch]
        embedded.append(_forward(model, tokenizer, batch_texts, max_length, device))
        progress.update(batch_texts)
    embedded += [_forward(model, tokenizer, texts[:1], max_length, device) for _ in range(extra_forwards)]
    progress.finish_call()
    model.train(was_training)
    return embedded


def _forward(model, tokenizer, texts, max_length, device):
    tokens = tokenize(tokenizer, texts, max_length)  # each text cut to a character budget first
    return model(**{name: tensor.to(device) for name, tensor in tokens.items()}).float().cpu()


def variant_embedder(dim, quantization, ranges=None, cache=None):
    """An ``embed_texts`` for scoring a Matryoshka size and an embedding quantization (modules/quantization.py): the
    embeddings cut to ``dim`` (re-normalised) and quantized, as unit vectors whose dot product is a monotone (affine)
    map of the quantized similarity (cosine of int8 codes; for binary, equal bits), so every scorer here ranks and
    correlates as the quantized index would. Each (texts, max_length) is embedded once per ``cache`` (a dict shared by
    the variants of one model)."""
    from .quantization import FLOAT32, mteb_vectors, truncate_embeddings

    cache = {} if cache is None else cache

    def embed(model, tokenizer, texts, max_length, batch_size=64):
        key = (tuple(texts), max_length)
        if key not in cache:
            cache[key] = embed_texts(model, tokenizer, list(texts), max_length, batch_size)
        full = cache[key]
        if quantization == FLOAT32 and (dim is None or dim >= full.shape[1]):
            return full
        vectors = mteb_vectors(truncate_embeddings(full.numpy(), dim), quantization, ranges)
        if quantization == FLOAT32:
            return torch.from_numpy(vectors)
        # float64: equal codes (a text paired with itself) get exactly equal cosines, tied as the quantized index ties
        return F.normalize(torch.from_numpy(vectors.astype(np.float64)), dim=-1)

    return embed


def pair_cosines(model, tokenizer, first, second, max_length, batch_size=64, embed=None):
    """cos(first[i], second[i]) for every pair, both sides embedded in one pass (numpy)."""
    embed = embed or embed_texts  # looked up at call time (tests replace it)
    embeddings = embed(model, tokenizer, list(first) + list(second), max_length, batch_size)
    return (embeddings[: len(first)] * embeddings[len(first) :]).sum(-1).numpy()


def sts_spearman(model, tokenizer, pairs, max_length, batch_size=64, embed=None):
    """Spearman correlation (x100) between cos(text, text_pair) and the gold label."""
    embed = embed or embed_texts
    scores = pair_cosines(model, tokenizer, [p["text"] for p in pairs], [p["text_pair"] for p in pairs], max_length,
                          batch_size, embed)
    return 100 * spearmanr(scores, [p["label"] for p in pairs]).statistic


def read_retrieval_folder(folder, split=None):
    """(queries {id: text}, corpus {id: text}, qrels {query id: {doc id: grade}}) of a BEIR-layout folder, read by
    modules/beir.py's rules, as this module's scorers rank it: each document's text as mteb joins title and text,
    the relevant judgements only (grade > 0; every judged query needs one)."""
    data = relevant_only(read_retrieval_split(folder, split))
    return data.queries, {doc_id: document_text(doc) for doc_id, doc in data.corpus.items()}, data.qrels


def ndcg_at_k(ranked, relevant, k=10):
    """Mean nDCG@k (x100), graded gains: ``ranked[i]`` query i's documents, best first; ``relevant[i]`` = {doc index:
    grade}."""
    total = 0.0
    for documents, grades in zip(ranked, relevant):
        dcg = sum(grades.get(doc, 0.0) / math.log2(rank + 2) for rank, doc in enumerate(documents[:k]))
        ideal = sum(g / math.log2(rank + 2) for rank, g in enumerate(sorted(grades.values(), reverse=True)[:k]))
        total += dcg / ideal
    return 100 * total / len(relevant)


def retrieval_ndcg(model, tokenizer, queries, corpus, qrels, query_max_len=64, passage_max_len=256, k=10,
                   query_prefix="", embed=None):
    """nDCG@k (x100) of ranking the whole corpus by cosine for each judged query."""
    embed = embed or embed_texts
    doc_ids = list(corpus)
    documents = embed(model, tokenizer, [corpus[d] for d in doc_ids], passage_max_len)
    query_ids = list(queries)
    query_embeddings = embed(model, tokenizer, [query_prefix + queries[q] for q in query_ids], query_max_len)
    position = {d: i for i, d in enumerate(doc_ids)}
    relevant = [{position[d]: g for d, g in qrels[q].items() if d in position} for q in query_ids]
    return retrieval_scores(query_embeddings, documents, relevant, [f"ndcg_at_{k}"])[f"ndcg_at_{k}"]


def pair_classification_scores(first, second, labels):
    """mteb's PairClassification scores (x100) of embedding pairs against 0/1 ``labels``: accuracy at the best
    threshold, F1, precision, recall and average precision of each similarity (cosine, dot, and the euclidean and
    manhattan distances), and the best of each over them (``max_accuracy``, ``max_ap``, ...), named as mteb names them.
    ``first`` and ``second``: [pairs, dim] tensors, normalised as the model's Normalize module leaves them."""
    from sklearn.metrics import average_precision_score

    labels = np.asarray(labels, dtype=np.int64)
    first, second = first.double(), second.double()
    similarities = {"cosine": (F.cosine_similarity(first, second).numpy(), True),
                    "manhattan": ((first - second).abs().sum(-1).numpy(), False),
                    "euclidean": ((first - second).norm(dim=-1).numpy(), False),
                    "dot": ((first * second).sum(-1).numpy(), True)}
    scores = {}
    for name, (values, higher_is_similar) in similarities.items():
        ranked = values if higher_is_similar else -values
        scores.update({f"{name}_{metric}": value for metric, value in _threshold_scores(ranked, labels).items()})
        scores[f"{name}_ap"] = average_precision_score(labels, ranked)
    for metric in ("accuracy", "f1", "precision", "recall", "ap"):
        scores[f"max_{metric}"] = max(scores[f"{name}_{metric}"] for name in similarities)
    return {name: 100 * float(value) for name, value in scores.items()}


def _threshold_scores(scores, labels):
    """Accuracy, and F1 with its precision and recall, of calling the pairs above a threshold similar, each at its
    best threshold. mteb's rules: a threshold lies between two distinct scores (never splitting a tie, never above
    or below all pairs); the first best F1 in score order gives the precision and recall."""
    order = np.argsort(-scores, kind="stable")
    ranked, ranked_labels = scores[order], labels[order]
    cuts = np.flatnonzero(ranked[:-1] != ranked[1:])  # the top i + 1 pairs called similar
    if not len(cuts):
        return {"accuracy": 0.0, "f1": 0.0, "precision": 0.0, "recall": 0.0}
    true_positives = np.cumsum(ranked_labels == 1)[cuts]
    right = true_positives + (labels == 0).sum() - np.cumsum(ranked_labels == 0)[cuts]
    precision, recall = true_positives / (cuts + 1), true_positives / max((labels == 1).sum(), 1)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(len(cuts)), where=true_positives > 0)
    best = np.argmax(f1)
    return {"accuracy": right.max() / len(labels), "f1": f1[best], "precision": precision[best] if f1[best] else 0.0,
            "recall": recall[best] if f1[best] else 0.0}


def retrieval_scores(query_embeddings, document_embeddings, relevant, names=("ndcg_at_10", "recall_at_100"),
                     top_k=None):
    """``names`` (ndcg_at_k, recall_at_k) x100 of ranking every document by dot product (cosine) for each query,
    tied scores in corpus order; ``top_k`` (``modules.top_k.chunked_top_k``'s signature) ranks the best k by blocks,
    never holding every query's scores."""
    top_k = top_k or chunked_top_k
    cuts = {name: _retrieval_metric(name) for name in names}
    ranked = top_k(query_embeddings, document_embeddings, max(k for _, k in cuts.values())).tolist()
    results = {}
    for name, (metric, k) in cuts.items():
        if metric == "ndcg":
            results[name] = ndcg_at_k(ranked, relevant, k)
        else:
            recall = sum(len(set(top[:k]) & set(grades)) / len(grades) for top, grades in zip(ranked, relevant))
            results[name] = 100 * recall / len(relevant)
    return results


def _retrieval_metric(name):
    """("ndcg" | "recall", k) of a retrieval metric name; None for others."""
    match = re.fullmatch(r"(ndcg|recall)_at_(\d+)", name)
    return (match.group(1), int(match.group(2))) if match else None


def sts_scores(first, second, gold):
    """mteb's STS scores (x100): Pearson and Spearman correlation of the gold scores with the cosine and with minus
    the manhattan and euclidean distances (pearson / spearman: the model's similarity, cosine)."""
    from scipy.stats import pearsonr

    first, second = first.double(), second.double()
    similarities = {"cosine": F.cosine_similarity(first, second), "manhattan": -(first - second).abs().sum(-1),
                    "euclidean": -(first - second).norm(dim=-1)}
    scores = {}
    for name, values in similarities.items():
        scores[f"{name}_pearson"] = pearsonr(values.numpy(), gold).statistic
        scores[f"{name}_spearman"] = spearmanr(values.numpy(), gold).statistic
    scores.update(pearson=scores["cosine_pearson"], spearman=scores["cosine_spearman"])
    return {name: 100 * float(value) for name, value in scores.items()}


# what a task folder logs during training beside its main score (task.json's, by mteb's name)
TRAINING_METRICS = {"STS": ("cosine_spearman",), "PairClassification": ("max_accuracy", "max_ap"),
                    "Retrieval": ("ndcg_at_10", "recall_at_100")}


def task_metric_names(task):
    """The metrics a task folder is scored by during training: its main score first, then its type's usual ones."""
    return list(dict.fromkeys([task.main_score, *TRAINING_METRICS[task.type]]))


def score_local_task(model, tokenizer, task, max_lengths, prompts=None, embed=None, top_k=None):
    """{"<task>/<metric>": value x100} of a local task folder (modules/task_folders.py), every text embedded once,
    with the prompts mteb would give the model (``prompts``: the model's); with several splits the names are
    "<task>/<split>/<metric>". ``embed`` and ``top_k``: as ``embed_texts`` and ``retrieval_scores`` take them."""
    embed = embed or embed_texts
    prompts, names, metrics = prompts or {}, task_metric_names(task), {}
    for split in task.splits:
        data = task.split_data(split)
        if task.type == "Retrieval":
            query_prompt, document_prompt = (prompt_for(prompts, task.name, task.type, kind) for kind in ("query", "document"))
            doc_ids, query_ids = list(data["corpus"]), list(data["queries"])
            documents = embed(model, tokenizer, [document_prompt + f"{d['title']} {d['text']}".strip()
                                                       for d in data["corpus"].values()], max_lengths["passage"])
            queries = embed(model, tokenizer, [query_prompt + data["queries"][q] for q in query_ids],
                                  max_lengths["query"])
            position = {d: i for i, d in enumerate(doc_ids)}
            relevant = [{position[d]: g for d, g in data["qrels"][q].items()} for q in query_ids]
            scores = retrieval_scores(queries, documents, relevant, names, top_k)
        else:
            prompt = prompt_for(prompts, task.name, task.type)
            first, second = _pair_embeddings(model, tokenizer, [prompt + text for text in data["sentence1"]],
                                             [prompt + text for text in data["sentence2"]], max_lengths["pair"], embed)
            scores = (sts_scores(first, second, data["score"]) if task.type == "STS"
                      else pair_classification_scores(first, second, data["label"]))
        prefix = f"{task.name}/{split}/" if len(task.splits) > 1 else f"{task.name}/"
        metrics.update({prefix + name: float(scores[name]) for name in names})
    return metrics


def _pair_embeddings(model, tokenizer, first, second, max_length, embed=None):
    embed = embed or embed_texts
    embeddings = embed(model, tokenizer, list(first) + list(second), max_length)
    return embeddings[: len(first)], embeddings[len(first) :]


class DevSets:
    """What a training run is scored on: ``--eval_sts_file`` ("sts_spearman") and every ``--eval_dir`` task folder
    ("<task>/<metric>"); called, it returns {metric: value}. Every process calls it together (sharded models)."""

    def __init__(self, sts_file=None, task_dirs=()):
        from .task_folders import read_task_folder

        self.sts_pairs = load_sts_pairs(sts_file) if sts_file else None
        self.tasks = [read_task_folder(folder) for folder in task_dirs or ()]
        names = [task.name for task in self.tasks]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise UsageError(f"--eval_dir: two task folders are named {repeated}; give each task.json its own name")
        for task in self.tasks:
            if task.type == "Retrieval" and _retrieval_metric(task.main_score) is None:
                raise UsageError(f"--eval_dir {task.folder}: main_score {task.main_score} is not scored during "
                                 "training (ndcg_at_k and recall_at_k are); eval/run_cmteb.py --local-task scores it")

    def __bool__(self):
        return self.sts_pairs is not None or bool(self.tasks)

    def length_roles(self):
        """The max lengths scoring uses: "pair" for STS and pair classification, "query" and "passage" for retrieval."""
        roles = {"pair"} if self.sts_pairs is not None else set()
        for task in self.tasks:
            roles |= {"query", "passage"} if task.type == "Retrieval" else {"pair"}
        return roles

    def metric_names(self):
        names = ["sts_spearman"] if self.sts_pairs is not None else []
        for task in self.tasks:
            splits = [f"{split}/" for split in task.splits] if len(task.splits) > 1 else [""]
            names += [f"{task.name}/{split}{metric}" for split in splits for metric in task_metric_names(task)]
        return names

    def evaluate(self, accelerator, model, tokenizer, max_lengths, prompts, step, shares=None):
        """Score, log to the trackers as eval/<metric> and print one line; returns {metric: value}. ``shares``
        (modules.process_shares.ProcessShares): each process embeds and ranks its share."""
        from .progress import embedding_progress

        embed, top_k = (shares.embed, shares.top_k) if shares else (None, None)
        with embedding_progress(f"step {step}: dev evaluation", accelerator.is_local_main_process):
            metrics = self(model, tokenizer, max_lengths, prompts, embed, top_k)
        accelerator.log({f"eval/{name}": value for name, value in metrics.items()}, step=step)
        accelerator.print(f"step {step}: dev " + ", ".join(f"{name} {value:.2f}" for name, value in metrics.items()))
        return metrics

    def __call__(self, model, tokenizer, max_lengths, prompts=None, embed=None, top_k=None):
        """Every dev metric of ``model``, texts given the prompts mteb would give them (``prompts``: the model's);
        ``embed`` and ``top_k`` as ``score_local_task`` takes them."""
        metrics = {}
        if self.sts_pairs is not None:
            prompt = prompt_for(prompts or {}, None, "STS")
            metrics["sts_spearman"] = float(sts_spearman(model, tokenizer, [
                {**pair, "text": prompt + pair["text"], "text_pair": prompt + pair["text_pair"]}
                for pair in self.sts_pairs], max_lengths["pair"], embed=embed))
        for task in self.tasks:
            metrics.update(score_local_task(model, tokenizer, task, max_lengths, prompts, embed, top_k))
        return metrics

    def at_variants(self, model, tokenizer, max_lengths, prompts, variants, calibration_texts=None):
        """[{"dim", "quantization", "scores": {metric: value}}] at each (dim, quantization) of ``variants``, every text
        embedded once; int8 ranges from ``calibration_texts`` (embedded at the pair length, no prompt)."""
        return variant_scores(lambda embed: self(model, tokenizer, max_lengths, prompts, embed), model, tokenizer,
                              variants, calibration_texts, max_lengths.get("pair") or max(max_lengths.values()))


def variant_scores(score, model, tokenizer, variants, calibration_texts=None, calibration_length=128):
    """``score(embed)`` ({metric: value}) at each (dim, quantization) of ``variants`` through ``variant_embedder``s
    sharing one cache: [{"dim", "quantization", "scores"}]."""
    from .quantization import INT8, calibrated_ranges

    calibration = None
    if any(quantization == INT8 for _, quantization in variants):
        calibration = embed_texts(model, tokenizer, calibration_texts, calibration_length).numpy()
    cache, rows = {}, []
    for dim, quantization in variants:
        embed = variant_embedder(dim, quantization, calibrated_ranges(calibration, dim, quantization), cache)
        rows.append({"dim": dim, "quantization": quantization, "scores": score(embed)})
    return rows

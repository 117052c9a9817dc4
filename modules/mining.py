"""Hard negatives: offline mining with faiss, and Conan's dynamic hard-negative mining (DHNM) state.

Offline (tools/mine_hard_negatives.py): embed a corpus, search it with each query, and keep a ranked
candidate list per query with its own positives (and the query itself) removed. Negatives are
sampled from ranks [range_start, range_end) (default 10-210): the top ranks are skipped because
they hold many unlabelled positives (false negatives). The stages print plain progress lines, so a
long run shows in a nohup / slurm log how far it is.

DHNM (Conan-Embedding, arXiv 2408.15710, Sec. 3.2): each example keeps its ranked candidates, the
ranks of its current negatives, their mean score S0 when they were chosen and a replacement count
i. Every ``interval`` steps the examples being checked are re-scored with the current model; when

    ratio * S < S0  and  |S| < max_abs        (Conan: ratio 1.15, max_abs 0.8)

(for S0 <= 0 the first condition is read as the same relative fall, see ``needs_replacement``)

the negatives have become easy, and the i-th replacement takes the candidates ranked
[(i-1)*n + skip, i*n + skip) (n negatives a sample, skip 10) and records their score as the new S0.
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch

from modules.cli import DataError
from modules.progress import StageProgress, embedding_progress

DHNM_STATE = "dhnm_state.safetensors"

# --------------------------------------------------------------------------- offline mining


def embed_with_progress(model, tokenizer, texts, max_length, batch_size, stage, batches_per_chunk=10):
    """``embed_texts`` as float32 numpy, in chunks of ``batches_per_chunk`` batches with progress between them.

    The texts are sorted by length once for all chunks, so batches pad as little as in one call.
    """
    from modules.evaluation import embed_texts

    order = np.argsort([len(text) for text in texts], kind="stable")
    chunk_size = batch_size * batches_per_chunk
    embeddings = None
    print(f"{stage}: {len(texts):,} texts", flush=True)
    with embedding_progress(stage, texts=texts, stream=sys.stdout):  # the whole stage, by characters
        for start in range(0, len(texts), chunk_size):
            rows = order[start : start + chunk_size]
            chunk = embed_texts(model, tokenizer, [texts[i] for i in rows], max_length, batch_size).numpy()
            if embeddings is None:
                embeddings = np.empty((len(texts), chunk.shape[1]), dtype=np.float32)
            embeddings[rows] = chunk
    return embeddings


def build_index(embeddings: np.ndarray, kind="flat", nlist=None, nprobe=16, hnsw_m=32, chunk_size=100_000):
    """A faiss inner-product index over L2-normalised float32 embeddings (so scores are cosines).

    ``flat`` is exact (fine up to ~1M vectors); ``ivf`` (IVF-Flat, nlist default 4*sqrt(N)) and
    ``hnsw`` are approximate and scale to many millions. Vectors are added in chunks, with progress.
    """
    import faiss

    dim = embeddings.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        nlist = nlist or max(1, int(4 * np.sqrt(len(embeddings))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        print(f"indexing: training {nlist:,} IVF lists", flush=True)
        index.train(embeddings)
        index.nprobe = nprobe
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"unknown index {kind!r}; choose flat, ivf or hnsw")
    progress = StageProgress(f"indexing ({kind})", len(embeddings), "vectors")
    for start in range(0, len(embeddings), chunk_size):
        index.add(embeddings[start : start + chunk_size])
        progress.update(min(start + chunk_size, len(embeddings)))
    return index


def ranked_candidates(scores, positions, texts, excluded, keep):
    """Corpus positions in score order, with their scores, at most ``keep``: a text is taken once, and not
    at all when it is excluded (the query's positives, the query), which drops the positives and their copies."""
    ranked, ranked_scores, seen = [], [], set(excluded)
    for score, position in zip(scores, positions):
        if position < 0:  # faiss pads with -1 when it finds fewer than asked
            break
        if texts[position] in seen:
            continue
        seen.add(texts[position])
        ranked.append(int(position))
        ranked_scores.append(float(score))
        if len(ranked) == keep:
            break
    return ranked, ranked_scores


def sample_negative_ranks(num_candidates, num_negatives, range_start, range_end, rng):
    """``num_negatives`` distinct ranks drawn from [range_start, min(range_end, num_candidates)), sorted."""
    available = range(range_start, min(range_end, num_candidates))
    if len(available) < num_negatives:
        return None
    return sorted(rng.choice(available, num_negatives, replace=False).tolist())


# --------------------------------------------------------------------------- DHNM


def replacement_window(replacement, num_negatives, skip=10):
    """Ranks of the candidates the ``replacement``-th replacement (1, 2, ...) takes: [(i-1)*n+skip, i*n+skip)."""
    start = (replacement - 1) * num_negatives + skip
    return list(range(start, start + num_negatives))


def needs_replacement(score, initial_score, ratio=1.15, max_abs=0.8):
    """Conan's rule, elementwise: the negatives became easy when ratio*S < S0 and |S| < max_abs.

    ratio*S < S0 means "S fell below S0 / ratio", i.e. by the fraction (1 - 1/ratio) of S0. Taken
    literally for S0 <= 0 it would flag negatives whose score rose (got harder) as easy, so the fall
    is measured on |S0|: S < S0 - (1 - 1/ratio) * |S0|, which is the published rule for S0 > 0.
    """
    fell = score < initial_score - (1 - 1 / ratio) * initial_score.abs()
    return fell & (score.abs() < max_abs)


class MiningState:
    """DHNM state of every retrieval dataset whose records carry mined candidates (texts, or
    modules.corpus.CorpusCandidates reading them from the corpus by id).

    Per dataset: the ranks of each record's current negatives [records, n], their score S0 when
    chosen, and the replacement count i. The records' ``text_neg`` always mirror the ranks, so the
    collator needs nothing new. ``state_dict`` / ``load_state_dict`` let
    ``checkpoint_files`` / ``load_checkpoint_files`` keep it in every checkpoint as safetensors.
    """

    def __init__(self, datasets):
        self.datasets = {}
        for index, dataset in enumerate(datasets):
            if dataset.kind == "retri_contrast" and "candidates" in dataset.records[0]:
                self.datasets[index] = dataset
        self.ranks = {i: torch.tensor([r["neg_ranks"] for r in d.records]) for i, d in self.datasets.items()}
        self.initial_scores = {i: torch.tensor([float(np.mean(r["neg_scores"])) for r in d.records])
                               for i, d in self.datasets.items()}
        self.replacements = {i: torch.zeros(len(d.records), dtype=torch.long) for i, d in self.datasets.items()}

    @classmethod
    def for_datasets(cls, datasets, negatives_per_record, meta_list):
        """The state of a --dhnm run: every mined dataset's records must hold exactly the negatives a step uses."""
        state = cls(datasets)
        if not state.datasets:
            raise DataError(f"--dhnm: no retri_contrast dataset in {meta_list} has mined candidates "
                            "(make them with tools/mine_hard_negatives.py)")
        for dataset in state.datasets.values():
            counts = {len(record["neg_ranks"]) for record in dataset.records}
            if counts != {negatives_per_record}:
                raise DataError(f"{dataset.source}: {dataset.path} has {sorted(counts)} mined negatives a record; "
                                f"--dhnm replaces all of them, so every record needs exactly {negatives_per_record} "
                                "(--retri_negatives, times the processes under --cbb)")
        return state

    def __contains__(self, dataset_index):
        return dataset_index in self.datasets

    def replace(self, dataset_index, record_index, ranks, score):
        """Give a record the candidates at ``ranks`` as its negatives, with their score as the new S0."""
        self.ranks[dataset_index][record_index] = torch.tensor(ranks)
        self.initial_scores[dataset_index][record_index] = score
        self.replacements[dataset_index][record_index] += 1
        record = self.datasets[dataset_index].records[record_index]
        record["text_neg"] = [record["candidates"][rank] for rank in ranks]

    def state_dict(self):
        return {"ranks": self.ranks, "initial_scores": self.initial_scores, "replacements": self.replacements}

    def checkpoint_files(self):
        """{file name: tensors} the checkpoint holds (safetensors: nothing is unpickled on resume)."""
        return {DHNM_STATE: {f"{key}.{index}": tensor.contiguous() for key, by_dataset in self.state_dict().items()
                             for index, tensor in by_dataset.items()}}

    def load_checkpoint_files(self, checkpoint):
        from safetensors.torch import load_file

        file = Path(checkpoint) / DHNM_STATE
        if not file.is_file():
            raise DataError(f"{checkpoint}: no {DHNM_STATE}; it was not saved by a --dhnm run of this version")
        tensors = load_file(str(file))
        state = {key: {index: tensors[f"{key}.{index}"] for index in self.datasets}
                 for key in ("ranks", "initial_scores", "replacements")}
        self.load_state_dict(state)

    def load_state_dict(self, state):
        self.ranks, self.initial_scores = state["ranks"], state["initial_scores"]
        self.replacements = state["replacements"]
        for dataset_index, dataset in self.datasets.items():
            for record, ranks in zip(dataset.records, self.ranks[dataset_index].tolist()):
                record["text_neg"] = [record["candidates"][rank] for rank in ranks]


@torch.no_grad()
def dhnm_check(model, tokenizer, state, dataset_index, record_indices, max_length, query_prefix="",
               ratio=1.15, max_abs=0.8, skip=10, embed=None):
    """Re-score the negatives of ``record_indices`` with the current model; return the replacements due.

    Returns [(record index, new ranks, new S0)]. Every process embeds the same number of texts
    (queries, current negatives, and the next window of every checked record, whether due or
    not), so sharded models (FSDP, ZeRO-3) can run it collectively; the cost is about one
    forward over a training batch with 2n negatives, below one training step. ``embed``:
    ``embed_texts`` or its signature (``ProcessShares.embed``, processes checking the same records).
    """
    from modules.evaluation import embed_texts

    embed = embed or embed_texts
    records = [state.datasets[dataset_index].records[i] for i in record_indices]
    num_negatives = state.ranks[dataset_index].size(1)
    replacements = state.replacements[dataset_index][record_indices]
    windows = []
    for record, count in zip(records, replacements.tolist()):
        window = replacement_window(count + 1, num_negatives, skip)
        windows.append(window if window[-1] < len(record["candidates"]) else None)  # None: list exhausted
    next_negatives = [record["candidates"][rank] if window else text
                      for record, window in zip(records, windows)
                      for rank, text in zip(window or [0] * num_negatives, record["text_neg"])]
    queries = embed(model, tokenizer, [query_prefix + r["text"] for r in records], max_length["query"])
    current = embed(model, tokenizer, [t for r in records for t in r["text_neg"]], max_length["passage"])
    following = embed(model, tokenizer, next_negatives, max_length["passage"])
    score_now = torch.einsum("bd,bnd->bn", queries, current.view(len(records), num_negatives, -1)).mean(1)
    score_next = torch.einsum("bd,bnd->bn", queries, following.view(len(records), num_negatives, -1)).mean(1)
    due = needs_replacement(score_now, state.initial_scores[dataset_index][record_indices], ratio, max_abs)
    return [(index, window, float(score)) for index, window, score, is_due
            in zip(record_indices, windows, score_next, due.tolist()) if is_due and window]


def dhnm_round(accelerator, model, tokenizer, state, last_batch, max_length, query_prefix, args, log):
    """One DHNM check in the training loop: re-score the records of ``last_batch`` (dataset index, record
    indices), apply the replacements due on every process, and add the counts to ``log`` (and the trackers).

    Under CBB every process checks the same records, each embedding its share of their texts; otherwise each
    checks its own part, and the replacements are gathered so every process's copy of the records stays the same.
    """
    from accelerate.utils import gather_object

    from modules.process_shares import ProcessShares

    started = time.perf_counter()
    embed = ProcessShares.of(accelerator).embed if args.cbb else None
    updates = dhnm_check(model, tokenizer, state, *last_batch, max_length, query_prefix, args.dhnm_ratio,
                         args.dhnm_max_abs, args.dhnm_skip, embed)
    if accelerator.num_processes > 1 and not args.cbb:
        updates = gather_object(updates)
    for record_index, ranks, score in updates:
        state.replace(last_batch[0], record_index, ranks, score)
    checked = len(last_batch[1]) * (1 if args.cbb else accelerator.num_processes)
    seconds = time.perf_counter() - started
    log.update(checks=log["checks"] + 1, checked=log["checked"] + checked, replaced=log["replaced"] + len(updates),
               seconds=log["seconds"] + seconds)
    return {"dhnm/checked": checked, "dhnm/replaced": len(updates), "dhnm/check_seconds": seconds}

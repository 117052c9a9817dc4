"""Evaluation at corpus size: retrieval ranked by blocks (never the queries x corpus matrix) exactly as the stable
sort of the whole matrix ranked it, and the work of the dev sets and of DHNM under CBB shared by the processes of a
run (each embeds about its share, every process gets what one process alone computes)."""

import functools
import json
import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from bench.eval_scale import old_retrieval_scores  # the code before blocks, the bench's peer
from modules.evaluation import DevSets, retrieval_scores
from modules.mining import MiningState, dhnm_check
from modules.model import EmbeddingModel
from modules.process_shares import ProcessShares, deal
from modules.quantization import BINARY, mteb_vectors
from modules.task_datasets import TaskDataset
from modules.top_k import chunked_top_k
from tests.conftest import SENTENCES, write_jsonl

WORLD = 2
CHUNKINGS = [{}, {"block_elements": 1000, "query_block": 7}, {"block_elements": 150, "query_block": 3},
             {"block_elements": 1 << 30, "query_block": 100_000}]


def full_matrix_top_k(queries, documents, k):
    """The ranking before this change: a stable sort of the whole score matrix."""
    return torch.sort(queries @ documents.T, dim=1, descending=True, stable=True).indices[:, :k]


def binary_vectors(count, dims, generator):
    """Binary-quantized unit vectors as the variant scorer builds them: few dims, so scores tie very often."""
    return F.normalize(torch.from_numpy(mteb_vectors(torch.randn(count, dims, generator=generator).numpy(),
                                                     BINARY)).double(), dim=-1)


@pytest.mark.parametrize("kind", ["binary", "coarse_floats", "small_integers"])
def test_chunked_top_k_ranks_exactly_as_the_stable_sort_of_the_whole_matrix_ties_included(kind):
    generator = torch.Generator().manual_seed({"binary": 0, "coarse_floats": 1, "small_integers": 2}[kind])
    for trial in range(6):
        queries, documents = int(torch.randint(1, 40, (), generator=generator)), 50 * (trial + 1)
        if kind == "binary":
            query_vectors, document_vectors = binary_vectors(queries, 12, generator), binary_vectors(documents, 12,
                                                                                                       generator)
        elif kind == "coarse_floats":  # normal floats on a grid of 1/8: every dot product exact, some tied
            query_vectors, document_vectors = ((torch.randn(n, 16, generator=generator) * 8).round() / 8
                                               for n in (queries, documents))
        else:
            query_vectors, document_vectors = (torch.randint(-2, 3, (n, 4), generator=generator).float()
                                               for n in (queries, documents))
        scores = query_vectors @ document_vectors.T
        assert kind == "coarse_floats" or (scores[0].unique().numel() <= 20)  # ties are the rule
        for k in (1, 10, 100, documents + 5):
            expected = full_matrix_top_k(query_vectors, document_vectors, k)
            for chunking in CHUNKINGS:
                assert torch.equal(chunked_top_k(query_vectors, document_vectors, k, **chunking), expected), \
                    (trial, k, chunking)


def test_chunked_top_k_puts_nan_scores_first_as_the_sort_did():
    queries, documents = torch.randn(5, 4, generator=torch.Generator().manual_seed(3)), torch.randn(60, 4)
    queries[2, 0] = float("nan")
    documents[7, 1] = float("nan")
    assert torch.equal(chunked_top_k(queries, documents, 10, block_elements=20, query_block=2),
                       full_matrix_top_k(queries, documents, 10))


def test_retrieval_scores_are_unchanged_on_real_valued_embeddings():
    generator = torch.Generator().manual_seed(4)
    queries, documents = (F.normalize(torch.randn(n, 32, generator=generator), dim=-1) for n in (300, 3000))
    rng = random.Random(0)
    relevant = [{rng.randrange(3000): rng.choice([1, 2]) for _ in range(rng.randint(1, 4))} for _ in range(300)]
    names = ("ndcg_at_10", "recall_at_100", "recall_at_5")
    expected = old_retrieval_scores(queries, documents, relevant, names)
    assert 0 < expected["recall_at_100"] < 100
    small_blocks = functools.partial(chunked_top_k, block_elements=4096, query_block=32)
    for top_k in (None, small_blocks):
        assert retrieval_scores(queries, documents, relevant, names, top_k) == pytest.approx(expected, abs=1e-9)


def largest_allocation(function):
    """The most bytes one torch operation allocated while ``function`` ran (the profiler's memory record)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        function()
    return max(event.cpu_memory_usage for event in profiler.events())


def test_chunked_scoring_never_allocates_the_queries_x_corpus_matrix():
    queries, documents = torch.randn(300, 16), torch.randn(4000, 16)
    relevant = [{i: 1} for i in range(300)]
    matrix_bytes = 300 * 4000 * 4
    # the detector sees the old way's matrix (and its sort)
    assert largest_allocation(lambda: old_retrieval_scores(queries, documents, relevant, ["ndcg_at_10"])) \
        >= matrix_bytes
    top_k = functools.partial(chunked_top_k, block_elements=1 << 14, query_block=64)
    largest = largest_allocation(lambda: retrieval_scores(queries, documents, relevant, ["ndcg_at_10"], top_k))
    assert largest <= 16 * (1 << 14) + 8 * 300 * 100  # a block of scores, its masks, the ranked lists


def test_batches_are_dealt_in_balanced_shares():
    assert deal(7, 2) == [[0, 3, 4], [1, 2, 5, 6]]
    shares = deal(1000, 3)
    assert sorted(i for share in shares for i in share) == list(range(1000))
    assert max(map(sum, shares)) / min(map(sum, shares)) < 1.01  # batches sorted by length: the work balances


# ----------------------------------------------------------------------------------------------- two processes


def write_dev_sets(root):
    """An STS file, a retrieval task folder (600 documents, 40 queries) and a pair classification folder."""
    rng = random.Random(0)
    words = " ".join(SENTENCES).split()
    documents = [" ".join(rng.choices(words, k=rng.randint(3, 25))) for _ in range(600)]
    retrieval = root / "Retrieval"
    write_jsonl(retrieval / "corpus.jsonl", [{"id": f"d{i}", "title": "", "text": t} for i, t in enumerate(documents)])
    write_jsonl(retrieval / "queries.jsonl", [{"id": f"q{i}", "text": " ".join(documents[i * 7].split()[:4])}
                                              for i in range(40)])
    (retrieval / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{i * 7}\t2\nq{i}\td{i * 7 + 1}\t1\n" for i in range(40)))
    (retrieval / "task.json").write_text(json.dumps({"name": "TinyRetrieval", "type": "Retrieval",
                                                     "language": ["eng"], "splits": ["test"]}))
    pairs = root / "Pairs"
    write_jsonl(pairs / "test.jsonl", [{"sentence1": documents[i], "sentence2": documents[i + 1], "label": i // 2 % 2}
                                       for i in range(0, 200, 2)])
    (pairs / "task.json").write_text(json.dumps({"name": "TinyPairs", "type": "PairClassification",
                                                 "language": ["eng"], "splits": ["test"]}))
    write_jsonl(root / "sts.jsonl", [{"text": documents[i], "text_pair": documents[i + 300], "label": float(i % 5)}
                                     for i in range(150)])
    return DevSets(root / "sts.jsonl", [retrieval, pairs])


def mining_state():
    """40 records with 30 ranked candidates each, 2 negatives, S0 spread so that some are due and some not."""
    rng = random.Random(1)
    records = []
    for i in range(40):
        candidates = [" ".join(rng.choices(SENTENCES, k=2)) + f" {i} {c}" for c in range(30)]
        records.append({"text": SENTENCES[i % 16] + f" {i}", "text_pos": ["p"], "candidates": candidates,
                        "neg_ranks": [0, 1], "neg_scores": [rng.uniform(-0.2, 1.0)] * 2, "text_neg": candidates[:2]})
    return MiningState([TaskDataset("mined", "retri_contrast", records)])


def score(model, dev_sets, embed=None, top_k=None):
    lengths = {"pair": 32, "query": 16, "passage": 32}
    metrics = dev_sets(model, model.tokenizer, lengths, None, embed, top_k)
    updates = dhnm_check(model, model.tokenizer, mining_state(), 0, list(range(40)), lengths, ratio=1.0,
                         max_abs=1.01, skip=2, embed=embed)
    return metrics, updates


def shared_worker(rank, init_file, model_dir, root, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    model = EmbeddingModel.from_pretrained(model_dir)
    forwards = []
    model.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(len(kwargs["input_ids"])),
                                    with_kwargs=True)
    shares = ProcessShares(rank, WORLD, "cpu")
    metrics, updates = score(model, DevSets(root / "sts.jsonl", [root / "Retrieval", root / "Pairs"]), shares.embed,
                             shares.top_k)
    torch.save({"metrics": metrics, "updates": updates, "forwards": forwards, "texts": sum(forwards)},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_processes_score_the_dev_sets_and_dhnm_as_one_each_embedding_half(tiny_bert, tmp_path):
    dev_sets = write_dev_sets(tmp_path)
    model = EmbeddingModel.from_pretrained(tiny_bert)
    alone_forwards = []
    model.register_forward_pre_hook(lambda module, args, kwargs: alone_forwards.append(len(kwargs["input_ids"])),
                                    with_kwargs=True)
    expected_metrics, expected_updates = score(model, dev_sets)
    assert 0 < len(expected_updates) < 40  # some records due, some not

    mp.spawn(shared_worker, args=(str(tmp_path / "init"), str(tiny_bert), tmp_path, str(tmp_path)), nprocs=WORLD,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
    for result in ranks:
        assert result["metrics"] == expected_metrics  # bit for bit: the same batches, the same blocks of scores
        assert result["updates"] == expected_updates
    assert len(ranks[0]["forwards"]) == len(ranks[1]["forwards"])  # every forward joined by both processes
    total = sum(alone_forwards)
    for result in ranks:
        assert 0.4 * total <= result["texts"] <= 0.6 * total

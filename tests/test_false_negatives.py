"""False-negative masks of InfoNCE against a loop-by-loop computation that drops the masked candidates by hand:
duplicates planted within a batch, across two gloo processes, and under CBB's shared queries."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from modules.collator import text_ids
from modules.losses import InfoNCE, contrastive_masks
from modules.matryoshka import Matryoshka

DIM, NEGATIVES, WORLD, ROWS = 8, 2, 2, 3

# six records (three a process); planted: row 4's positive is row 0's, row 1's second positive is row 3's positive,
# row 5's first negative is row 1's positive, row 0's second negative is row 0's query, row 2's first negative is
# row 3's query text
RECORDS = [
    {"text": "q0", "text_pos": ["shared doc"], "text_neg": ["n0a", "q0"]},
    {"text": "q1", "text_pos": ["p1", "p3"], "text_neg": ["n1a", "n1b"]},
    {"text": "q2", "text_pos": ["p2"], "text_neg": ["q3", "n2b"]},
    {"text": "q3", "text_pos": ["p3"], "text_neg": ["n3a", "n3b"]},
    {"text": "q4", "text_pos": ["shared doc"], "text_neg": ["n4a", "n4b"]},
    {"text": "q5", "text_pos": ["p5"], "text_neg": ["p1", "n5b"]},
]
POSITIVES = [r["text_pos"][0] for r in RECORDS]  # the positive each row uses


def embeddings(seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(len(RECORDS), DIM), (len(RECORDS), DIM), (len(RECORDS), NEGATIVES, DIM)]
    return [torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True) for shape in shapes]


def ids_of(rows):
    records = [RECORDS[i] for i in rows]
    return text_ids(records, [POSITIVES[i] for i in rows], [t for r in records for t in r["text_neg"]], NEGATIVES)


def reference(q, p, n, rows, candidate_rows, tau, duplicates=True, margin=None, relative=None, in_batch=True,
              hard_alpha=0.0, in_batch_alpha=0.0):
    """-1/B sum_i log softmax over query i's candidates, the masked ones left out by hand, each kept one weighted by
    exp(alpha * cos) (hard_alpha for query i's own negatives). ``candidate_rows``: whose positives and negatives are
    candidates (in-batch)."""
    total = 0.0
    for i in rows:
        if in_batch:
            candidates = [(POSITIVES[j], p[j], j == i, False) for j in candidate_rows]
            candidates += [(RECORDS[j]["text_neg"][k], n[j, k], False, j == i) for j in candidate_rows
                           for k in range(NEGATIVES)]
        else:
            candidates = [(POSITIVES[i], p[i], True, False)] + [(RECORDS[i]["text_neg"][k], n[i, k], False, True)
                                                                for k in range(NEGATIVES)]
        positive = F.cosine_similarity(q[i], p[i], dim=0)
        kept = []
        for text, vector, labelled, own_negative in candidates:
            score = F.cosine_similarity(q[i], vector, dim=0)
            log_weight = 0.0
            if not labelled:
                if duplicates and (text == RECORDS[i]["text"] or text in RECORDS[i]["text_pos"]):
                    continue
                if margin is not None and score > positive + margin:
                    continue
                if relative is not None and positive > 0 and score > relative * positive:
                    continue
                log_weight = (hard_alpha if own_negative else in_batch_alpha) * score.detach()
            kept.append(score / tau + log_weight)
        total = total - (positive / tau - torch.logsumexp(torch.stack(kept), 0))
    return total / len(rows)


def assert_same(ours, expected, tensors):
    ours_grads = torch.autograd.grad(ours, tensors, retain_graph=True, allow_unused=True)
    expected_grads = torch.autograd.grad(expected, tensors, allow_unused=True)
    assert torch.allclose(ours, expected, atol=1e-10), (ours, expected)
    for mine, theirs in zip(ours_grads, expected_grads):
        if theirs is not None:
            assert torch.allclose(mine, theirs, atol=1e-10)


@pytest.mark.parametrize("in_batch", [True, False])
def test_duplicate_texts_leave_the_softmax(in_batch):
    q, p, n = embeddings()
    rows = list(range(len(RECORDS)))
    loss_fn = InfoNCE(0.05, in_batch_negatives=in_batch, mask_duplicates=True)
    ours = loss_fn(q, p, n, ids_of(rows))
    assert_same(ours, reference(q, p, n, rows, rows, 0.05, in_batch=in_batch), [q, p, n])
    unmasked = InfoNCE(0.05, in_batch_negatives=in_batch)(q, p, n)
    assert abs(float((ours - unmasked).detach())) > 1e-9  # the plants matter (the reference check is to 1e-10)
    # in-batch: q0 drops p4 (same text) and the negative "q0", q1 drops p3 and the negative "p1", q3 the negative
    # "q3", q4 drops p0; own negatives only: q0's "q0"
    removed = contrastive_masks({"retri_contrast": loss_fn})
    # of 6 rows x 17 negatives (6 positives + 12 negatives, less the row's own positive); own: 6 x 2
    assert removed == {"mask/retri_contrast_removed": 6 if in_batch else 1,
                       "mask/retri_contrast_removed_fraction": 6 / 102 if in_batch else 1 / 12}
    assert contrastive_masks({"retri_contrast": loss_fn}) == {}  # read and reset


@pytest.mark.parametrize("margin, relative", [(0.1, None), (None, 0.95), (0.05, 0.9)])
def test_margin_masks_drop_candidates_scoring_above_the_positive(margin, relative):
    q, p, n = embeddings(seed=3)
    p.data[:] = q.data + 0.8 * p.data  # positives close enough that some candidates sit above and some below
    rows = list(range(len(RECORDS)))
    ours = InfoNCE(0.05, mask_margin=margin, mask_relative=relative)(q, p, n)
    assert_same(ours, reference(q, p, n, rows, rows, 0.05, duplicates=False, margin=margin, relative=relative),
                [q, p, n])


@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("hard_alpha, in_batch_alpha", [(5.0, 0.0), (2.0, 1.0)])
def test_hardness_weights_multiply_the_negatives_terms(in_batch, hard_alpha, in_batch_alpha):
    q, p, n = embeddings(seed=5)
    rows = list(range(len(RECORDS)))
    ours = InfoNCE(0.05, in_batch_negatives=in_batch, hard_alpha=hard_alpha, in_batch_alpha=in_batch_alpha,
                   mask_duplicates=True)(q, p, n, ids_of(rows))
    expected = reference(q, p, n, rows, rows, 0.05, in_batch=in_batch, hard_alpha=hard_alpha,
                         in_batch_alpha=in_batch_alpha)
    assert_same(ours, expected, [q, p, n])


def test_masks_pass_through_matryoshka():
    q, p, n = embeddings()
    rows = list(range(len(RECORDS)))
    wrapped = Matryoshka(InfoNCE(0.05, mask_duplicates=True), [4, 8])
    expected = (reference(q[:, :4], p[:, :4], n[..., :4], rows, rows, 0.05) + reference(q, p, n, rows, rows, 0.05)) / 2
    assert_same(wrapped(q, p, n, ids_of(rows)), expected, [q, p, n])


def worker(rank, init_file, shared_queries, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    q, p, n = embeddings()
    if shared_queries:  # CBB: the same queries and positives everywhere, each process its own negatives
        rows, negative_rows = list(range(ROWS)), list(range(rank * ROWS, (rank + 1) * ROWS))
        ids = ids_of(rows)
        ids["negative"] = ids_of(negative_rows)["negative"]
        loss = InfoNCE(0.05, shared_queries=True, mask_duplicates=True)(q[rows], p[rows], n[negative_rows], ids)
    else:
        rows = list(range(rank * ROWS, (rank + 1) * ROWS))
        loss = InfoNCE(0.05, mask_duplicates=True, hard_alpha=3.0)(q[rows], p[rows], n[rows], ids_of(rows))
    save_averaged(loss, (q, p, n), out_dir, rank)


def reference_shared_queries(q, p, n, duplicates=True):
    """CBB's InfoNCE written out: queries 0..ROWS-1, candidates their positives and the negatives of all six rows (every
    process's), duplicates of query i's texts left out by hand."""
    rows = range(ROWS)
    total = 0.0
    for i in rows:
        candidates = [(POSITIVES[j], p[j], j == i) for j in rows]
        candidates += [(RECORDS[j]["text_neg"][k], n[j, k], False) for j in range(WORLD * ROWS)
                       for k in range(NEGATIVES)]
        kept = [F.cosine_similarity(q[i], v, dim=0) / 0.05 for t, v, labelled in candidates
                if labelled or not (duplicates and (t == RECORDS[i]["text"] or t in RECORDS[i]["text_pos"]))]
        total = total - (F.cosine_similarity(q[i], p[i], dim=0) / 0.05 - torch.logsumexp(torch.stack(kept), 0))
    return total / ROWS


def save_averaged(loss, leaves, out_dir, rank):
    """What DDP does (gradients averaged over processes), the mean loss with them, saved for the test to compare."""
    grads = torch.autograd.grad(loss, list(leaves), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    for grad in grads:
        dist.all_reduce(grad)
        grad /= WORLD
    loss = loss.detach()
    dist.all_reduce(loss)
    torch.save({"loss": loss / WORLD, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def assert_every_rank_matches(out_dir, expected, leaves):
    expected_grads = torch.autograd.grad(expected, list(leaves))
    for rank in range(WORLD):
        result = torch.load(out_dir / f"rank{rank}.pt")
        assert torch.allclose(result["loss"], expected.detach(), atol=1e-10), (result["loss"], expected)
        for ours, theirs in zip(result["grads"], expected_grads):
            assert torch.allclose(ours, theirs, atol=1e-10), (ours - theirs).abs().max()


@pytest.mark.parametrize("shared_queries", [False, True])
def test_duplicates_across_two_processes_are_masked(tmp_path, shared_queries):
    """Row 4's positive (process 1) equals row 0's (process 0); row 5's negative equals row 1's positive: the gathered
    candidates carry their text hashes, and the loss equals the direct computation without them (and, without CBB,
    with each query's own hard negatives weighted, which must find them among the gathered ones)."""
    mp.spawn(worker, args=(str(tmp_path / "init"), shared_queries, str(tmp_path)), nprocs=WORLD, join=True)
    q, p, n = embeddings()
    if shared_queries:
        expected = reference_shared_queries(q, p, n)
    else:
        everything = list(range(WORLD * ROWS))
        expected = reference(q, p, n, everything, everything, 0.05, hard_alpha=3.0)
    assert_every_rank_matches(tmp_path, expected, (q, p, n))


def test_a_run_logs_what_the_masks_removed(tiny_bert, tiny_data, tmp_path):
    import json
    import subprocess
    import sys

    from tests.conftest import REPO
    from tests.test_train_finetune import common_args

    result = subprocess.run([sys.executable, *common_args(tiny_bert, tiny_data, tmp_path / "out", "--max_steps", "6",
                                                          "--mask_duplicates", "--mask_margin", "0.0")],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mask/retri_contrast_removed" in result.stderr + result.stdout
    config = json.loads((tmp_path / "out" / "run_config.json").read_text())["args"]
    assert config["mask_duplicates"] and config["mask_margin"] == 0.0


# --------------------------------------------------------------------------- the improved contrastive loss, spread-out


def reference_improved(q, p, n, rows, tau, duplicates=True, margin=None, hard_alpha=0.0):
    """Qwen3's denominator written out: every document, every other query (scored with q_i), every other positive
    (scored with p_i); masked and weighted as InfoNCE's candidates."""
    everything = range(len(RECORDS))
    total = 0.0
    for i in rows:
        terms = [(POSITIVES[j], F.cosine_similarity(q[i], p[j], dim=0), j == i, False) for j in everything]
        terms += [(RECORDS[j]["text_neg"][k], F.cosine_similarity(q[i], n[j, k], dim=0), False, j == i)
                  for j in everything for k in range(NEGATIVES)]
        terms += [(RECORDS[j]["text"], F.cosine_similarity(q[i], q[j], dim=0), False, False) for j in everything if j != i]
        terms += [(POSITIVES[j], F.cosine_similarity(p[i], p[j], dim=0), False, False) for j in everything if j != i]
        positive = F.cosine_similarity(q[i], p[i], dim=0)
        kept = []
        for text, score, labelled, own_negative in terms:
            if not labelled:
                if duplicates and (text == RECORDS[i]["text"] or text in RECORDS[i]["text_pos"]):
                    continue
                if margin is not None and score > positive + margin:
                    continue
            kept.append(score / tau + (hard_alpha * score.detach() if own_negative else 0.0))
        total = total - (positive / tau - torch.logsumexp(torch.stack(kept), 0))
    return total / len(rows)


def reference_spread(x):
    x = F.normalize(x, dim=-1)
    products = [x[i] @ x[j] for i in range(x.size(0)) for j in range(x.size(0)) if i != j]
    first = sum(products) / len(products)
    second = sum(v**2 for v in products) / len(products)
    return first**2 + torch.clamp(second - 1 / x.size(1), min=0)


@pytest.mark.parametrize("duplicates, margin, hard_alpha", [(False, None, 0.0), (True, None, 0.0), (True, 0.1, 2.0)])
def test_improved_contrastive_adds_query_and_document_terms(duplicates, margin, hard_alpha):
    from modules.losses import ImprovedInfoNCE

    q, p, n = embeddings(seed=7)
    rows = list(range(len(RECORDS)))
    ours = ImprovedInfoNCE(0.05, mask_duplicates=duplicates, mask_margin=margin, hard_alpha=hard_alpha)(
        q, p, n, ids_of(rows))
    assert_same(ours, reference_improved(q, p, n, rows, 0.05, duplicates, margin, hard_alpha), [q, p, n])


def test_spread_out_adds_the_orthogonal_regulariser():
    from modules.losses import SpreadOut

    q, p, n = embeddings(seed=9)
    rows = list(range(len(RECORDS)))
    ours = SpreadOut(InfoNCE(0.05), 0.3)(q, p, n)
    expected = reference(q, p, n, rows, rows, 0.05, duplicates=False) + 0.3 * (reference_spread(q) + reference_spread(p))
    assert_same(ours, expected, [q, p, n])


def improved_worker(rank, init_file, out_dir):
    from modules.losses import ImprovedInfoNCE, SpreadOut

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    q, p, n = embeddings(seed=7)
    rows = list(range(rank * ROWS, (rank + 1) * ROWS))
    loss = SpreadOut(ImprovedInfoNCE(0.05, mask_duplicates=True, hard_alpha=2.0), 0.3)(q[rows], p[rows], n[rows],
                                                                                      ids_of(rows))
    save_averaged(loss, (q, p, n), out_dir, rank)


def test_improved_contrastive_and_spread_out_on_two_processes(tmp_path):
    mp.spawn(improved_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    q, p, n = embeddings(seed=7)
    everything = list(range(WORLD * ROWS))
    expected = reference_improved(q, p, n, everything, 0.05, True, None, 2.0) + 0.3 * (
        reference_spread(q) + reference_spread(p))
    assert_every_rank_matches(tmp_path, expected, (q, p, n))


def reference_shared_spread_out(q, p, n):
    """SpreadOut(InfoNCE) under CBB: the regulariser of the shared queries and positives, each row once."""
    rows = list(range(ROWS))
    return reference_shared_queries(q, p, n, duplicates=False) + 0.3 * (reference_spread(q[rows]) +
                                                                         reference_spread(p[rows]))


def test_spread_out_of_shared_queries_on_one_process():
    """One process holding every process's negatives of the shared queries: the same loss as the two below."""
    from modules.losses import SpreadOut

    q, p, n = embeddings(seed=11)
    every_part = torch.cat([n[:ROWS], n[ROWS:]], dim=1)  # query i's negatives from both processes, [ROWS, 2K, D]
    ours = SpreadOut(InfoNCE(0.05, shared_queries=True), 0.3)(q[:ROWS], p[:ROWS], every_part)
    assert_same(ours, reference_shared_spread_out(q, p, n), [q, p, n])


def shared_spread_worker(rank, init_file, out_dir):
    from modules.losses import SpreadOut

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    q, p, n = embeddings(seed=11)
    negative_rows = list(range(rank * ROWS, (rank + 1) * ROWS))
    loss = SpreadOut(InfoNCE(0.05, shared_queries=True), 0.3)(q[:ROWS], p[:ROWS], n[negative_rows])
    save_averaged(loss, (q, p, n), out_dir, rank)


def test_spread_out_counts_shared_queries_once_on_two_processes(tmp_path):
    """CBB: both processes hold the same queries and positives; gathering them would pair every row with its own copy
    (cosine 1) as if unrelated. Loss and averaged gradients equal the regulariser of the rows counted once."""
    mp.spawn(shared_spread_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    q, p, n = embeddings(seed=11)
    assert_every_rank_matches(tmp_path, reference_shared_spread_out(q, p, n), (q, p, n))

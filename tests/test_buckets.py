"""Sub-batches by token budget: the planner's cuts (optimal, within budgets, none where none pays) and GradCache cut
by padded tokens giving the plain loss's gradient."""

import itertools

import pytest
import torch

from modules.forward import plan_sub_batches
from modules.gradcache import cached_loss_backward
from modules.model import EmbeddingModel
from tests.test_gradcache import assert_same_grads, grads_of, make_loss, tokenize


def cost(groups, lengths, split_tokens):
    return sum(len(g) * max(lengths[i] for i in g.tolist()) + split_tokens for g in groups)


def brute_force_best(lengths, split_tokens, max_rows=None, max_tokens=None):
    """The least cost over every cut of the sorted rows into consecutive runs."""
    widths = sorted(lengths)
    best = float("inf")
    for cuts in itertools.product([False, True], repeat=len(widths) - 1):
        runs, start = [], 0
        for i, cut in enumerate(cuts, start=1):
            if cut:
                runs.append(widths[start:i])
                start = i
        runs.append(widths[start:])
        if any((max_rows and len(r) > max_rows) or (max_tokens and len(r) > 1 and len(r) * r[-1] > max_tokens)
               for r in runs):
            continue
        best = min(best, sum(len(r) * r[-1] + split_tokens for r in runs))
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("limits", [{}, {"max_rows": 3}, {"max_tokens": 60}])
def test_the_plan_is_the_cheapest_cut_within_the_limits(seed, limits):
    lengths = torch.randint(1, 40, (9,), generator=torch.Generator().manual_seed(seed)).tolist()
    groups = plan_sub_batches(lengths, split_tokens=20, **limits)
    assert sorted(i for g in groups for i in g.tolist()) == list(range(len(lengths)))  # every row once
    for g in groups:
        assert len(g) <= limits.get("max_rows", 99)
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g.tolist()) <= limits.get("max_tokens", 10**9)
    assert cost(groups, lengths, 20) == brute_force_best(lengths, 20, **limits)


def test_uniform_short_rows_are_not_split_and_mixed_ones_are():
    assert len(plan_sub_batches([16] * 64)) == 1
    assert len(plan_sub_batches([14, 15, 16, 16] * 16)) == 1  # 64 rows: a cut saves at most 64 padded tokens
    mixed = plan_sub_batches([20] * 32 + [200] * 32)
    assert sorted(len(g) for g in mixed) == [32, 32]
    long_row = plan_sub_batches([500, 10, 10, 10], max_tokens=100)
    assert [g.tolist() for g in long_row] == [[1, 2, 3], [0]]  # longer than the budget: alone


def test_gradcache_cut_by_tokens_gives_the_plain_gradient(tiny_bert):
    model = EmbeddingModel.from_pretrained(tiny_bert).eval()
    queries, passages = tokenize(model, range(12))
    loss_fn = make_loss("mrl")
    plain = loss_fn(model(**queries), model(**passages))
    plain.backward()
    reference = grads_of(model)
    model.zero_grad()
    cached = cached_loss_backward(model, [queries, passages], loss_fn, mini_batch_tokens=40, split_tokens=0)
    assert torch.allclose(cached, plain.detach(), atol=1e-6)
    assert_same_grads(grads_of(model), reference)

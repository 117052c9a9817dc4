"""Each loss against a direct, loop-by-loop reference computation (values and gradients)."""

import math

import pytest
import torch
import torch.nn.functional as F

from modules.losses import InBatchInfoNCE, InfoNCE
from modules.matryoshka import Matryoshka
from modules.sts_losses import CoSENT


def cos(a, b):
    return float(F.cosine_similarity(a, b, dim=0))


def reference_retrieval(q, p, n, tau, in_batch):
    """-1/B sum_i log softmax over candidates, written out with Python loops."""
    total = 0.0
    for i in range(q.size(0)):
        if in_batch:
            candidates = [p[j] for j in range(p.size(0))] + [n[j, k] for j in range(n.size(0)) for k in range(n.size(1))]
            target = i
        else:
            candidates = [p[i]] + [n[i, k] for k in range(n.size(1))]
            target = 0
        logits = torch.stack([F.cosine_similarity(q[i], c, dim=0) / tau for c in candidates])
        total = total - torch.log_softmax(logits, 0)[target]
    return total / q.size(0)


def reference_cosent(a, b, labels, tau):
    scores = [F.cosine_similarity(a[i], b[i], dim=0) for i in range(a.size(0))]
    terms = [torch.exp((scores[i] - scores[j]) / tau)
             for i in range(len(scores)) for j in range(len(scores)) if labels[i] < labels[j]]
    return torch.log(1 + sum(terms)) if terms else torch.tensor(0.0)


def leaves(*shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=generator, dtype=torch.float64, requires_grad=True) for s in shapes]


def assert_same_value_and_grads(ours, reference, tensors):
    ours_grads = torch.autograd.grad(ours, tensors, retain_graph=True)
    reference_grads = torch.autograd.grad(reference, tensors)
    assert torch.allclose(ours, reference, atol=1e-10), (ours, reference)
    for g1, g2 in zip(ours_grads, reference_grads):
        assert torch.allclose(g1, g2, atol=1e-10)


@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("tau", [0.01, 0.05])
def test_infonce_matches_reference(in_batch, tau):
    q, p, n = leaves((5, 8), (5, 8), (5, 3, 8))
    ours = InfoNCE(tau, in_batch_negatives=in_batch)(q, p, n)
    assert_same_value_and_grads(ours, reference_retrieval(q, p, n, tau, in_batch), [q, p, n])


def test_infonce_without_hard_negatives_is_in_batch_only():
    q, p = leaves((6, 4), (6, 4), seed=1)
    empty = torch.zeros(6, 0, 4, dtype=torch.float64)
    ours = InfoNCE(0.05)(q, p)
    assert_same_value_and_grads(ours, reference_retrieval(q, p, empty, 0.05, True), [q, p])


def test_symmetric_in_batch_infonce():
    q, p = leaves((6, 4), (6, 4), seed=2)
    empty = torch.zeros(6, 0, 4, dtype=torch.float64)
    reference = (reference_retrieval(q, p, empty, 0.05, True) + reference_retrieval(p, q, empty, 0.05, True)) / 2
    assert_same_value_and_grads(InBatchInfoNCE(0.05, symmetric=True)(q, p), reference, [q, p])


def test_cosent_matches_reference():
    a, b = leaves((7, 8), (7, 8), seed=3)
    labels = torch.tensor([0.0, 1.5, 3.0, 1.5, 5.0, 2.0, 0.0])
    ours = CoSENT(0.05)(a, b, labels)
    assert_same_value_and_grads(ours, reference_cosent(a, b, labels, 0.05), [a, b])


def test_cosent_is_zero_loss_floor_when_all_labels_equal():
    a, b = leaves((4, 3), (4, 3), seed=4)
    assert CoSENT(0.05)(a, b, torch.ones(4)).item() == pytest.approx(math.log(1.0))


def test_matryoshka_averages_truncated_losses():
    q, p, n = leaves((4, 16), (4, 16), (4, 2, 16), seed=5)
    dims, weights = [4, 8, 16], [1.0, 2.0, 3.0]
    ours = Matryoshka(InfoNCE(0.05), dims, weights)(q, p, n)
    reference = sum(w * reference_retrieval(q[:, :d], p[:, :d], n[..., :d], 0.05, True) for d, w in zip(dims, weights))
    assert_same_value_and_grads(ours, reference / sum(weights), [q, p, n])


def test_matryoshka_on_cosent_leaves_labels_alone():
    a, b = leaves((5, 12), (5, 12), seed=6)
    labels = torch.tensor([1.0, 2.0, 0.0, 4.0, 3.0])
    ours = Matryoshka(CoSENT(0.05), [6, 12])(a, b, labels)
    reference = (reference_cosent(a[:, :6], b[:, :6], labels, 0.05) + reference_cosent(a, b, labels, 0.05)) / 2
    assert_same_value_and_grads(ours, reference, [a, b])


def test_matryoshka_rejects_dims_above_embedding_size():
    q, p = leaves((2, 8), (2, 8))
    with pytest.raises(ValueError, match="exceed the embedding size"):
        Matryoshka(InfoNCE(), [4, 16])(q, p)


LOW_PRECISION_LOSSES = {
    "retrieval": lambda: InfoNCE(0.01),
    "hard_negatives_only": lambda: InfoNCE(0.05, in_batch_negatives=False),
    "cosent": lambda: CoSENT(0.05),
    "cosent_mrl": lambda: Matryoshka(CoSENT(0.05), [8, 16]),
}


@pytest.mark.parametrize("name", list(LOW_PRECISION_LOSSES))
def test_bf16_embeddings_give_the_float32_loss_and_gradient(name):
    """Under DeepSpeed bf16 the embeddings arrive in bf16; the loss must still be computed in fp32 on them."""
    generator = torch.Generator().manual_seed(0)
    rows = 52
    bf16 = [torch.randn(*shape, generator=generator).bfloat16().requires_grad_()
            for shape in ((rows, 16), (rows, 16), (rows, 2, 16))]
    fp32 = [t.detach().float().requires_grad_() for t in bf16]
    loss_fn = LOW_PRECISION_LOSSES[name]()
    if name.startswith("cosent"):
        labels = torch.linspace(4.0, 5.0, rows)  # 52 distinct labels; bf16 keeps only 33 of them
        assert labels.bfloat16().unique().numel() < rows
        ours, reference = loss_fn(*bf16[:2], labels), loss_fn(*fp32[:2], labels)
        bf16, fp32 = bf16[:2], fp32[:2]
    else:
        ours, reference = loss_fn(*bf16), loss_fn(*fp32)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, reference, rtol=1e-6, atol=1e-6), (ours, reference)
    for g_ours, g_reference in zip(torch.autograd.grad(ours, bf16), torch.autograd.grad(reference, fp32)):
        assert torch.allclose(g_ours.float(), g_reference.bfloat16().float(), rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("flag, output_dim, expected", [
    ("piccolo", 384, [256, 384]),  # MiniLM: the full 384-d embedding is what the saved model returns
    ("piccolo", 1000, [256, 512, 768, 1000]),  # --scaling_dim 1000: rows 768-999 must get a gradient
    ("piccolo", 1792, [256, 512, 768, 1024, 1280, 1536, 1792]),
    ("8,16,32", 32, [8, 16, 32]),
])
def test_matryoshka_dims_always_train_the_output_size(flag, output_dim, expected):
    from modules.matryoshka import matryoshka_from_flags

    assert matryoshka_from_flags(InfoNCE(), flag, "", output_dim).dims == expected


def test_matryoshka_dims_without_the_output_size_are_refused():
    from modules.cli import UsageError
    from modules.matryoshka import matryoshka_from_flags

    with pytest.raises(UsageError, match=r"--mrl_dims 8,16: the list must include the output size 32"):
        matryoshka_from_flags(InfoNCE(), "8,16", "", 32)
    with pytest.raises(UsageError, match=r"--mrl_weights: 1 weights for the Matryoshka dims \[256, 384\]"):
        matryoshka_from_flags(InfoNCE(), "piccolo", "1", 384)


def test_task_weights_are_relative_to_the_largest_present():
    from modules.cli import UsageError
    from modules.objective import relative_task_weights

    weights = {"retri_contrast": 1.0, "cls_contrast": 0.2, "cosent": 0.04}
    assert relative_task_weights(weights, {"cosent"}) == {"cosent": 1.0}
    assert relative_task_weights(weights, {"cls_contrast", "cosent"}) == pytest.approx({"cls_contrast": 1.0, "cosent": 0.2})
    assert relative_task_weights(weights, set(weights)) == weights
    with pytest.raises(UsageError, match="cosent has 0.0"):
        relative_task_weights({**weights, "cosent": 0.0}, set(weights))

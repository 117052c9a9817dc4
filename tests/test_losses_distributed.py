"""Two gloo processes give the same loss and parameter gradients as one process on the
concatenated batch (negatives gathered with gradient, DDP-style gradient averaging); the STS menu's objectives also
the same as their loop references on the concatenated batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from modules.losses import InfoNCE
from modules.matryoshka import Matryoshka
from modules.sts_losses import CoSENT, sts_loss

WORLD = 2
ROWS = 3  # per process
DIM_IN, DIM_OUT, NEGATIVES = 6, 16, 2

LOSSES = {
    "retri_in_batch": lambda: InfoNCE(0.05),
    "retri_hard_only": lambda: InfoNCE(0.05, in_batch_negatives=False),
    "cls": lambda: InfoNCE(0.05, in_batch_negatives=False),
    "cosent": lambda: CoSENT(0.05),
    "retri_mrl": lambda: Matryoshka(InfoNCE(0.02), [4, 8, 16]),
    "cosent_mrl": lambda: Matryoshka(CoSENT(0.05), [8, 16]),
    # --sts_loss: labels tied within and across the two processes' rows
    "sts_pearson": lambda: sts_loss("pearson", 0.05),
    "sts_rank_kl": lambda: sts_loss("rank_kl", 0.05),
    "sts_pro": lambda: sts_loss("pro", 0.05),
    "sts_angle": lambda: sts_loss("angle", 0.05),
    "sts_codiemb_mrl": lambda: Matryoshka(sts_loss("pearson:2,pro:0.5,rank_kl:5", 0.05), [7, 16]),
    "sts_angle_mrl": lambda: Matryoshka(sts_loss("angle", 0.05), [7, 16]),
}
PAIR_LOSSES = ("cosent", "sts_")


def make_inputs():
    generator = torch.Generator().manual_seed(0)
    total = ROWS * WORLD
    return {
        "query": torch.randn(total, DIM_IN, generator=generator, dtype=torch.float64),
        "positive": torch.randn(total, DIM_IN, generator=generator, dtype=torch.float64),
        "negatives": torch.randn(total, NEGATIVES, DIM_IN, generator=generator, dtype=torch.float64),
        "labels": torch.tensor([0.0, 2.0, 1.0, 4.0, 3.0, 2.5], dtype=torch.float64),
        "tied_labels": torch.tensor([0.0, 2.0, 1.0, 2.0, 3.0, 0.0], dtype=torch.float64),
    }


def make_encoder():
    torch.manual_seed(1)
    return torch.nn.Linear(DIM_IN, DIM_OUT).double()


def loss_and_grads(name, inputs, rows):
    encoder = make_encoder()
    loss_fn = LOSSES[name]()
    if name.startswith(PAIR_LOSSES):
        labels = inputs["tied_labels" if name.startswith("sts_") else "labels"][rows]
        loss = loss_fn(encoder(inputs["query"][rows]), encoder(inputs["positive"][rows]), labels)
    else:
        loss = loss_fn(encoder(inputs["query"][rows]), encoder(inputs["positive"][rows]), encoder(inputs["negatives"][rows]))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in encoder.parameters()]


def worker(rank, init_file, name, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    loss, grads = loss_and_grads(name, make_inputs(), slice(rank * ROWS, (rank + 1) * ROWS))
    for grad in grads:  # what DDP does: average gradients over processes
        dist.all_reduce(grad)
        grad /= WORLD
    dist.all_reduce(loss)
    torch.save({"loss": loss / WORLD, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("name", [name for name in LOSSES if not name.startswith("sts_")])
def test_two_processes_match_one(name, tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), name, str(tmp_path)), nprocs=WORLD, join=True)
    reference_loss, reference_grads = loss_and_grads(name, make_inputs(), slice(0, ROWS * WORLD))
    for rank in range(WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(result["loss"], reference_loss, atol=1e-10), (result["loss"], reference_loss)
        for ours, reference in zip(result["grads"], reference_grads):
            assert torch.allclose(ours, reference, atol=1e-10), (ours - reference).abs().max()


def reference_loss_and_grads(name):
    """The loop reference of tests/test_sts_losses.py on the encoder's outputs for the whole batch."""
    from tests.test_sts_losses import REFERENCES

    encoder, inputs = make_encoder(), make_inputs()
    a, b, labels = encoder(inputs["query"]), encoder(inputs["positive"]), inputs["tied_labels"]
    terms = {"sts_codiemb_mrl": [("pearson", 2.0), ("pro", 0.5), ("rank_kl", 5.0)]}.get(
        name, [(name.removeprefix("sts_").removesuffix("_mrl"), 1.0)])
    dims = [7, 16] if name.endswith("_mrl") else [DIM_OUT]
    loss = sum(weight * REFERENCES[term](a[:, :dim], b[:, :dim], labels, 0.05) for dim in dims
               for term, weight in terms) / len(dims)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in encoder.parameters()]


@pytest.mark.parametrize("name", [name for name in LOSSES if name.startswith("sts_")])
def test_two_processes_match_one_and_the_loop_reference(name, tmp_path):
    """--sts_loss objectives: 2 processes == 1 process on the concatenated batch == the float64 loop."""
    mp.spawn(worker, args=(str(tmp_path / "init"), name, str(tmp_path)), nprocs=WORLD, join=True)
    one_process = loss_and_grads(name, make_inputs(), slice(0, ROWS * WORLD))
    for reference_loss, reference_grads in (one_process, reference_loss_and_grads(name)):
        for rank in range(WORLD):
            result = torch.load(tmp_path / f"rank{rank}.pt")
            assert torch.allclose(result["loss"], reference_loss, atol=1e-10), (result["loss"], reference_loss)
            for ours, reference in zip(result["grads"], reference_grads):
                assert torch.allclose(ours, reference, atol=1e-10), (ours - reference).abs().max()


def test_gather_changes_the_loss():
    """Guard against a vacuous pass: the single-process loss on one slice differs from the global one."""
    local, _ = loss_and_grads("retri_in_batch", make_inputs(), slice(0, ROWS))
    full, _ = loss_and_grads("retri_in_batch", make_inputs(), slice(0, ROWS * WORLD))
    assert not torch.allclose(local, full)


@pytest.mark.parametrize("name", [name for name in LOSSES if name.startswith("sts_")])
def test_gather_changes_the_sts_loss(name):
    local, _ = loss_and_grads(name, make_inputs(), slice(0, ROWS))
    full, _ = loss_and_grads(name, make_inputs(), slice(0, ROWS * WORLD))
    assert not torch.allclose(local, full)

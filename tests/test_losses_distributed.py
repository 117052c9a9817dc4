"""Two gloo processes give the same loss and parameter gradients as one process on the
concatenated batch (negatives gathered with gradient, DDP-style gradient averaging)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from modules.losses import CoSENT, InfoNCE, Matryoshka

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
}


def make_inputs():
    generator = torch.Generator().manual_seed(0)
    total = ROWS * WORLD
    return {
        "query": torch.randn(total, DIM_IN, generator=generator, dtype=torch.float64),
        "positive": torch.randn(total, DIM_IN, generator=generator, dtype=torch.float64),
        "negatives": torch.randn(total, NEGATIVES, DIM_IN, generator=generator, dtype=torch.float64),
        "labels": torch.tensor([0.0, 2.0, 1.0, 4.0, 3.0, 2.5], dtype=torch.float64),
    }


def make_encoder():
    torch.manual_seed(1)
    return torch.nn.Linear(DIM_IN, DIM_OUT).double()


def loss_and_grads(name, inputs, rows):
    encoder = make_encoder()
    loss_fn = LOSSES[name]()
    if name.startswith("cosent"):
        loss = loss_fn(encoder(inputs["query"][rows]), encoder(inputs["positive"][rows]), inputs["labels"][rows])
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


@pytest.mark.parametrize("name", list(LOSSES))
def test_two_processes_match_one(name, tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), name, str(tmp_path)), nprocs=WORLD, join=True)
    reference_loss, reference_grads = loss_and_grads(name, make_inputs(), slice(0, ROWS * WORLD))
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

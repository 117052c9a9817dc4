"""GradCache gives the plain loss's gradient: with and without MRL, with dropout replayed, in 2 DDP / FSDP2 processes."""

import contextlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from modules.gradcache import cached_loss_backward
from modules.forward import length_sorted_sub_batches
from modules.losses import InBatchInfoNCE
from modules.matryoshka import matryoshka_from_flags
from modules.model import EmbeddingModel
from tests.conftest import SENTENCES

QUERIES = [s if i % 3 else s + " while it keeps raining all afternoon in the old town" for i, s in enumerate(SENTENCES[:12])]
PASSAGES = [s.upper() + " " + " ".join(SENTENCES[(i + 1) % 16].split()[: i % 5]) for i, s in enumerate(SENTENCES[:12])]
CASES = {"plain": ("", False), "mrl": ("8,16,32", False), "symmetric_mrl": ("16,32", True)}


def make_loss(case):
    mrl_dims, symmetric = CASES[case]
    return matryoshka_from_flags(InBatchInfoNCE(0.05, symmetric, chunk_size=5), mrl_dims, "", 32)


def tokenize(model, rows):
    tokenize_texts = lambda texts: dict(model.tokenizer(texts, padding=True, truncation=True, max_length=24, return_tensors="pt"))
    return tokenize_texts([QUERIES[i] for i in rows]), tokenize_texts([PASSAGES[i] for i in rows])


def grads_of(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(ours, reference):
    assert ours.keys() == reference.keys()
    for name in reference:
        assert torch.allclose(ours[name], reference[name], atol=2e-6, rtol=1e-4), (name, (ours[name] - reference[name]).abs().max())


@pytest.mark.parametrize("case", list(CASES))
def test_cached_gradient_equals_plain_gradient(tiny_bert, case):
    model = EmbeddingModel.from_pretrained(tiny_bert).eval()  # no dropout: one forward == mini-batched forwards
    queries, passages = tokenize(model, range(12))
    loss_fn = make_loss(case)
    plain = loss_fn(model(**queries), model(**passages))
    plain.backward()
    reference = grads_of(model)
    model.zero_grad()
    cached = cached_loss_backward(model, [queries, passages], loss_fn, mini_batch_size=5)
    assert torch.allclose(cached, plain.detach(), atol=1e-6)
    assert_same_grads(grads_of(model), reference)


def test_dropout_masks_are_replayed(tiny_bert):
    """In train mode the re-forward must reuse each mini-batch's dropout masks from the first pass."""
    model = EmbeddingModel.from_pretrained(tiny_bert).train()
    queries, passages = tokenize(model, range(12))
    loss_fn = make_loss("mrl")

    def reference_grads(seed):  # one graph over the same mini-batches, drawn in the same order
        model.zero_grad()
        torch.manual_seed(seed)
        embeddings = []
        for tokens in (queries, passages):
            parts = length_sorted_sub_batches(tokens, size=5)
            stacked = torch.cat([model(**mini_batch) for _, mini_batch in parts])
            embeddings.append(stacked[torch.argsort(torch.cat([rows for rows, _ in parts]))])
        loss_fn(*embeddings).backward()
        return grads_of(model)

    reference = reference_grads(seed=3)
    model.zero_grad()
    torch.manual_seed(3)
    cached_loss_backward(model, [queries, passages], loss_fn, mini_batch_size=5)
    assert_same_grads(grads_of(model), reference)
    other_masks = reference_grads(seed=4)  # the check can fail: dropout does change the gradient
    assert not torch.allclose(other_masks["backbone.embeddings.word_embeddings.weight"],
                              reference["backbone.embeddings.word_embeddings.weight"], atol=1e-6)


def wrap(model, wrapper):
    """The model under DDP or FSDP2, and the context that stops its gradient synchronisation."""
    if wrapper == "ddp":
        ddp_model = DistributedDataParallel(model)
        return ddp_model, ddp_model.no_sync
    for layer in model.backbone.encoder.layer:
        fully_shard(layer)
    fully_shard(model)

    @contextlib.contextmanager
    def no_sync():
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    return model, no_sync


def rank_rows(rank):
    return range(rank * 6, rank * 6 + 6)


def distributed_worker(rank, init_file, model_path, case, wrappers, out_dir, train=False):
    """For each wrapper, a fresh model's GradCache gradient on this rank's 6 rows; in train mode the dropout
    masks come from seed 3 + rank, set just before ``cached_loss_backward``."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    for wrapper in wrappers:
        model = EmbeddingModel.from_pretrained(model_path).train(train)
        wrapped, no_sync = wrap(model, wrapper)
        queries, passages = tokenize(model, rank_rows(rank))
        torch.manual_seed(3 + rank)
        loss = cached_loss_backward(wrapped, [queries, passages], make_loss(case), mini_batch_size=4, no_sync=no_sync)
        dist.all_reduce(loss)
        grads = {name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()  # FSDP2: sharded
                 for name, p in model.named_parameters() if p.grad is not None}
        torch.save({"loss": loss / 2, "grads": grads}, os.path.join(out_dir, f"{wrapper}_rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("case,wrapper", [("plain", "ddp"), ("symmetric_mrl", "ddp"), ("symmetric_mrl", "fsdp2")])
def test_two_processes_equal_one_process_on_the_whole_batch(tiny_bert, tmp_path, case, wrapper):
    mp.spawn(distributed_worker, args=(str(tmp_path / "init"), str(tiny_bert), case, [wrapper], str(tmp_path)),
             nprocs=2, join=True)
    model = EmbeddingModel.from_pretrained(tiny_bert).eval()
    queries, passages = tokenize(model, range(12))
    plain = make_loss(case)(model(**queries), model(**passages))
    plain.backward()
    for rank in range(2):
        result = torch.load(tmp_path / f"{wrapper}_rank{rank}.pt")
        assert torch.allclose(result["loss"], plain.detach(), atol=1e-6)
        assert_same_grads(result["grads"], grads_of(model))


def test_two_processes_in_train_mode_replay_each_ranks_dropout(tiny_bert, tmp_path):
    """Train mode (dropout on) under DDP and FSDP2: one spawn runs both wrappers, rank r seeded with 3 + r.

    The single-process reference draws the same masks: for each rank in order, seed 3 + rank and run, with a
    graph, that rank's length-sorted mini-batches in ``cached_loss_backward``'s order (queries', then
    passages'); the ranks' embeddings, concatenated in rank order, give the whole batch's loss.
    """
    case = "symmetric_mrl"
    mp.spawn(distributed_worker, args=(str(tmp_path / "init"), str(tiny_bert), case, ["ddp", "fsdp2"], str(tmp_path),
                                       True), nprocs=2, join=True)
    model = EmbeddingModel.from_pretrained(tiny_bert).train()

    def reference(seeds):
        model.zero_grad()
        embeddings = ([], [])
        for rank, seed in enumerate(seeds):
            torch.manual_seed(seed)
            for group, tokens in enumerate(tokenize(model, rank_rows(rank))):
                parts = length_sorted_sub_batches(tokens, size=4)
                stacked = torch.cat([model(**mini_batch) for _, mini_batch in parts])
                embeddings[group].append(stacked[torch.argsort(torch.cat([rows for rows, _ in parts]))])
        loss = make_loss(case)(*(torch.cat(group) for group in embeddings))
        loss.backward()
        return loss.detach(), grads_of(model)

    loss, grads = reference(seeds=(3, 4))
    for wrapper in ("ddp", "fsdp2"):
        for rank in range(2):
            result = torch.load(tmp_path / f"{wrapper}_rank{rank}.pt")
            assert torch.allclose(result["loss"], loss, atol=1e-6), (wrapper, rank, result["loss"], loss)
            assert_same_grads(result["grads"], grads)
    # the check can fail: other masks (the ranks' seeds swapped, or one seed for both) change the gradient
    name = "backbone.embeddings.word_embeddings.weight"
    for seeds in ((4, 3), (3, 3)):
        other_loss, other_grads = reference(seeds)
        assert not torch.allclose(other_grads[name], grads[name], atol=1e-6), seeds
        assert not torch.allclose(other_loss, loss, atol=1e-6), seeds


def test_what_a_step_holds_is_flat_in_the_global_batch(tiny_bert):
    """Bytes in use (glibc's mallinfo2, read after every module's forward) over a GradCache step at global batch 32 and
    1024, mini-batches of 16: only the embeddings and the loss's B x B scores grow (4 MB at 1024). The plain step,
    which keeps every activation of the whole batch, is the control that the reading sees growth (~150 MB)."""
    from bench.gradcache_memory import glibc_mallinfo2  # the bench's reading of glibc's heap

    mallinfo2 = glibc_mallinfo2()
    if mallinfo2 is None:
        pytest.fail("this test reads glibc's mallinfo2 (glibc >= 2.33, Linux), which this C library lacks",
                    pytrace=False)

    def in_use():
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    model = EmbeddingModel.from_pretrained(tiny_bert).eval()
    peak = [0]
    for module in model.modules():
        module.register_forward_hook(lambda *_: peak.__setitem__(0, max(peak[0], in_use())))

    def grown_mb(rows, cached):
        generator = torch.Generator().manual_seed(rows)
        queries, passages = ({"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in
                             torch.randint(1000, 2000, (2, rows, 24), generator=generator))
        loss_fn = InBatchInfoNCE(0.05, False)
        start = peak[0] = in_use()
        if cached:
            cached_loss_backward(model, [queries, passages], loss_fn, mini_batch_size=16)
        else:
            loss_fn(model(**queries), model(**passages)).backward()
        model.zero_grad(set_to_none=True)
        return (peak[0] - start) / 2**20

    grown_mb(32, True)  # the first step allocates the gradients and warms the allocator
    cached = {rows: grown_mb(rows, True) for rows in (32, 1024)}
    plain = {rows: grown_mb(rows, False) for rows in (32, 1024)}
    assert plain[1024] - plain[32] > 100, plain
    assert cached[1024] - cached[32] < 16, cached

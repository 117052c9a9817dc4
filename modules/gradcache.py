"""GradCache: a contrastive loss over a batch far larger than its activations would allow.

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"
(arXiv 2101.06983). The loss of in-batch InfoNCE couples every pair, but its gradient w.r.t. the
parameters factors through the embeddings: dL/dtheta = sum_i (dL/de_i) . (de_i/dtheta). So:

1. embed the batch in mini-batches without a graph, remembering the random state of each;
2. compute the loss on the detached embeddings and its gradient g_i = dL/de_i (here the
   cross-process gathers and their backward collectives run, so the negatives of every process
   count, and Matryoshka dims are just part of the loss);
3. re-embed each mini-batch with a graph, replaying its random state so dropout masks match, and
   backpropagate sum_i e_i . g_i, which gives the mini-batch's share of dL/dtheta.

Peak activation memory is one mini-batch's (bounded in rows, ``--mini_batch_size``, or in padded
tokens, ``--mini_batch_tokens``, as sentence-transformers 6 does); the price is a second forward. Mini-batches are cut
from length-sorted rows and trimmed to their own longest row, so short texts are not padded to
the batch's longest (sentence-transformers' CachedMultipleNegativesRankingLoss pads every
mini-batch to the whole batch's length).

With DDP or FSDP only the last re-embedding synchronises gradients (``no_sync`` for the others).
DeepSpeed's engine reduces (ZeRO-2/3: partitions) gradients inside each backward call, which a
backward split over many calls does not fit: ``check_gradcache_supported`` refuses DeepSpeed.
"""

import contextlib

import torch

from modules.forward import SPLIT_TOKENS, length_sorted_sub_batches


class RandomState:
    """The CPU and current-accelerator RNG states at construction, replayable later."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    @contextlib.contextmanager
    def replay(self):
        devices = [torch.cuda.current_device()] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):  # the caller's RNG stream is left where it was
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda)
            yield


def cached_loss_backward(model, inputs, loss_fn, mini_batch_size=0, backward=None, no_sync=None, mini_batch_tokens=0,
                         split_tokens=SPLIT_TOKENS):
    """Accumulate into the parameters' ``.grad`` the gradient of ``loss_fn(*[model(x) for x in inputs])``.

    ``inputs``: tokenized batches (e.g. [queries, passages]), embedded in mini-batches of at most ``mini_batch_size``
    rows and ``mini_batch_tokens`` padded tokens (0: no limit), cut from length-sorted rows as
    modules.forward.plan_sub_batches cuts them; ``backward``: how to backpropagate a
    tensor (``accelerator.backward``, which applies loss scaling); ``no_sync``: a context factory
    that stops gradient synchronisation (``lambda: accelerator.no_sync(model)``). Returns the
    detached loss.
    """
    backward = backward or torch.Tensor.backward
    no_sync = no_sync or contextlib.nullcontext

    # 1. embeddings without a graph, and the random state each mini-batch started from
    plan, embeddings = [], []
    with torch.no_grad():
        for group, tokens in enumerate(inputs):
            rows_in_order, parts = [], []
            for rows, mini_batch in length_sorted_sub_batches(tokens, size=mini_batch_size, max_tokens=mini_batch_tokens,
                                                              split_tokens=split_tokens):
                plan.append((group, rows, mini_batch, RandomState()))
                parts.append(model(**mini_batch))
                rows_in_order.append(rows)
            stacked = torch.cat(parts)
            embeddings.append(stacked[torch.argsort(torch.cat(rows_in_order))].float())

    # 2. the loss and its gradient w.r.t. each embedding
    embeddings = [e.requires_grad_() for e in embeddings]
    with torch.enable_grad():
        loss = loss_fn(*embeddings)
    loss.backward()

    # 3. re-embed with a graph and push each embedding's cached gradient into the parameters
    for step, (group, rows, mini_batch, random_state) in enumerate(plan):
        last = step == len(plan) - 1
        with random_state.replay(), (contextlib.nullcontext() if last else no_sync()):
            recomputed = model(**mini_batch)
            backward((recomputed.float() * embeddings[group].grad[rows]).sum())
    return loss.detach()


def check_gradcache_supported(accelerator):
    """Refuse GradCache under DeepSpeed, with the reason and what to use instead."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        raise ValueError(
            f"--mini_batch_size (GradCache) does not work with DeepSpeed (this run: ZeRO-{plugin.zero_stage}): its "
            "engine reduces (ZeRO-2/3: and partitions) gradients inside each backward call and expects one backward "
            "per micro-batch, while GradCache splits one step's backward over many calls; no public trainer combines "
            "them. Launch with DDP (launch/ddp.yaml) or FSDP (launch/fsdp.yaml), or train without --mini_batch_size."
        )

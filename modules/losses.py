"""Contrastive losses on embeddings (the math only; embedding happens in the caller): InfoNCE with in-batch and hard
negatives, the improved contrastive loss, the spread-out regulariser.

Every loss takes raw embeddings, casts them to float32 (bf16 embeddings from DeepSpeed or autocast
included), L2-normalises them, and works in one process or many: with
``gather_across_processes`` the candidates of all processes join each query's denominator,
gathered WITH gradient (modules/loss_inputs.py). Each process returns a loss whose mean over processes equals the
loss of one process on the concatenated batch; since the all-gather backward sums gradients and DDP
averages them, the parameter gradients match that single-process computation too.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .candidates import CandidateRules, adjusted, gather_ids
from .loss_inputs import at_least_fp32, gather_with_grad, is_distributed
from .matryoshka import unwrapped


def info_nce(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of temperature-scaled similarities against the index of the positive."""
    return F.cross_entropy(scores, labels)


class _ChunkedInfoNCE(torch.autograd.Function):
    """mean_i CE(q_i . C^T / tau, label_i), ``chunk_size`` query rows at a time in forward and backward.

    Only the inputs and one logsumexp per row are kept for backward, which recomputes each chunk's
    scores, so memory is O(chunk_size x candidates) instead of O(queries x candidates): at a global
    batch of 16k the full score matrix, its softmax and their gradients would be gigabytes.
    """

    @staticmethod
    def forward(ctx, queries, candidates, labels, temperature, chunk_size, rules=None):
        logsumexp = queries.new_empty(queries.size(0))
        total = queries.new_zeros(())
        for rows in torch.arange(queries.size(0), device=queries.device).split(chunk_size):
            scores = adjusted(queries[rows] @ candidates.T / temperature, rules, rows, labels, temperature)
            logsumexp[rows] = torch.logsumexp(scores, dim=1)
            total += (logsumexp[rows] - scores.gather(1, labels[rows, None]).squeeze(1)).sum()
        ctx.save_for_backward(queries, candidates, labels, logsumexp)
        ctx.temperature, ctx.chunk_size, ctx.rules = temperature, chunk_size, rules
        return total / queries.size(0)

    @staticmethod
    def backward(ctx, grad_loss):
        queries, candidates, labels, logsumexp = ctx.saved_tensors
        grad_queries, grad_candidates = torch.zeros_like(queries), torch.zeros_like(candidates)
        scale = grad_loss / (queries.size(0) * ctx.temperature)
        for rows in torch.arange(queries.size(0), device=queries.device).split(ctx.chunk_size):
            # d loss / d scores = softmax - one_hot(label); a masked score is -inf, its weight 0
            scores = adjusted(queries[rows] @ candidates.T / ctx.temperature, ctx.rules, rows, labels, ctx.temperature,
                             count=False)
            weights = torch.exp(scores - logsumexp[rows, None])
            weights[torch.arange(rows.numel(), device=rows.device), labels[rows]] -= 1
            weights *= scale
            grad_queries[rows] = weights @ candidates
            grad_candidates += weights.T @ queries[rows]
        return grad_queries, grad_candidates, None, None, None, None


def chunked_info_nce(queries, candidates, labels, temperature, chunk_size=1024, rules=None):
    """``info_nce(queries @ candidates.T / temperature, labels)`` in >= float32 with O(chunk) score memory; ``rules``
    (modules.candidates.CandidateRules) remove and weight candidates of each row's softmax."""
    dtype = torch.promote_types(queries.dtype, torch.float32)
    return _ChunkedInfoNCE.apply(queries.to(dtype), candidates.to(dtype), labels, temperature, chunk_size, rules)


class InfoNCE(nn.Module):
    """Retrieval / classification InfoNCE with optional in-batch and hard negatives.

    With normalised query q_i, its positive p_i, its hard negatives n_{i,1..k} and temperature tau:

        L = -1/B sum_i log( exp(q_i.p_i / tau) / sum_{c in C_i} exp(q_i.c / tau) )

    - ``in_batch_negatives=True`` (Piccolo2's ``retri_contrast``, tau 0.01): C_i is every positive
      and every hard negative in the (global) batch.
    - ``in_batch_negatives=False`` (``cls_contrast``, tau 0.05; also "hard negatives only"):
      C_i is p_i and n_{i,.} only, because other rows may share the query's class.

    Gathering keeps the layout [all positives | all hard negatives], so query i of process r is
    labelled with its own positive at row r*B + i (a published trainer paired anchors with the
    wrong rows here).

    ``shared_queries=True`` is Conan's cross-GPU batch balance (CBB): every process holds the same
    B queries and positives but its own hard negatives, and only the negatives are gathered, so
    C_i is the B positives and all N x B x n negatives (hard negatives only: p_i and the N x n
    negatives of query i from every process); every process computes the same loss.
    References: van den Oord et al. 2018 (arXiv 1807.03748); Piccolo2 (arXiv 2405.06932), Sec. 3;
    Conan-Embedding (arXiv 2408.15710), Sec. 3.3.

    Likely false negatives can be removed from C_i and hard negatives weighted up (``mask_duplicates``,
    ``mask_margin``, ``mask_relative``, ``hard_alpha``, ``in_batch_alpha``; see modules/candidates.py). The
    candidates each forward removed are counted in ``self.masked``.
    """

    def __init__(self, temperature=0.01, in_batch_negatives=True, gather_across_processes=True, chunk_size=1024,
                 shared_queries=False, mask_duplicates=False, mask_margin=None, mask_relative=None, hard_alpha=0.0,
                 in_batch_alpha=0.0):
        super().__init__()
        self.temperature = temperature
        self.in_batch_negatives = in_batch_negatives
        self.gather_across_processes = gather_across_processes
        self.chunk_size = chunk_size  # query rows scored at once (memory only; the result is the same)
        self.shared_queries = shared_queries
        self.mask_duplicates, self.mask_margin, self.mask_relative = mask_duplicates, mask_margin, mask_relative
        self.hard_alpha, self.in_batch_alpha = hard_alpha, in_batch_alpha
        self.masked = {"removed": 0, "candidates": 0, "forwards": 0}  # since the caller last reset it

    def forward(self, query, positive, negatives=None, text_ids=None):
        """query, positive: [B, D]; negatives: [B, K, D] or None; ``text_ids`` (for the duplicate mask): hashes of the
        query texts [B], positives [B], negatives [B, K] and each record's positives [B, P]. Computed in >= float32."""
        query = F.normalize(at_least_fp32(query), dim=-1)
        positive = F.normalize(at_least_fp32(positive), dim=-1)
        negatives = F.normalize(at_least_fp32(negatives), dim=-1) if negatives is not None else None
        gather = self.gather_across_processes and is_distributed()
        if not self.in_batch_negatives:
            return self._own_candidates_loss(query, positive, negatives, text_ids, gather)

        if self.shared_queries:  # CBB: every process holds the same queries and positives, only negatives differ
            all_positives, offset = positive, 0
        else:
            all_positives, offset = gather_with_grad(positive) if gather else (positive, 0)
        candidates = [all_positives]
        if negatives is not None:
            flat_negatives = negatives.reshape(-1, negatives.size(-1))
            candidates.append(gather_with_grad(flat_negatives)[0] if gather else flat_negatives)
        labels = torch.arange(query.size(0), device=query.device) + offset
        rules = self._rules()
        if rules is not None and text_ids is not None and self.mask_duplicates:  # the same layout as the candidates
            positive_ids = text_ids["positive"] if self.shared_queries or not gather else gather_ids(text_ids["positive"])
            negative_ids = text_ids["negative"].reshape(-1)
            rules.query_ids, rules.positive_sets = text_ids["query"], text_ids["positive_sets"]
            rules.candidate_ids = torch.cat([positive_ids, gather_ids(negative_ids) if gather else negative_ids])
        if rules is not None and negatives is not None:
            rules.own_negatives = self._own_negative_columns(query.size(0), all_positives.size(0), negatives.size(1),
                                                             offset, gather, query.device)
        return chunked_info_nce(query, torch.cat(candidates), labels, self.temperature, self.chunk_size, rules)

    def _own_candidates_loss(self, query, positive, negatives, text_ids, gather):
        """C_i = p_i and query i's own negatives (under CBB from every process)."""
        candidates = positive.unsqueeze(1)
        if negatives is not None:
            if self.shared_queries and gather:  # CBB: query i's negatives from every process, [B, N*K, D]
                rows, per_row, dim = negatives.shape
                negatives = gather_with_grad(negatives)[0].view(-1, rows, per_row, dim).transpose(0, 1)
                negatives = negatives.reshape(rows, -1, dim)
            candidates = torch.cat([candidates, negatives], dim=1)
        scores = torch.einsum("bd,bkd->bk", query, candidates) / self.temperature
        labels = torch.zeros(query.size(0), dtype=torch.long, device=query.device)
        rules = self._rules()
        if rules is not None and text_ids is not None and self.mask_duplicates:
            own_negative_ids = text_ids["negative"]
            if self.shared_queries and gather:
                own_negative_ids = gather_ids(own_negative_ids).view(-1, *own_negative_ids.shape).transpose(0, 1)
                own_negative_ids = own_negative_ids.reshape(own_negative_ids.size(0), -1)
            rules.query_ids, rules.positive_sets = text_ids["query"], text_ids["positive_sets"]
            rules.candidate_ids = torch.cat([text_ids["positive"][:, None], own_negative_ids], dim=1)
        if rules is not None:
            rules.own_negatives = torch.ones_like(scores, dtype=torch.bool)  # all but column 0, the label
        rows = torch.arange(scores.size(0), device=scores.device)
        return info_nce(adjusted(scores, rules, rows, labels, self.temperature), labels)

    def _own_negative_columns(self, rows, positive_columns, per_row, offset, gather, device):
        """Bool [rows, C]: each local query's own hard negatives in the in-batch layout [positives | negatives of
        every process, row by row] (under CBB query i's negatives sit in every process's block)."""
        processes = dist.get_world_size() if gather else 1
        own = torch.zeros(rows, positive_columns + processes * rows * per_row, dtype=torch.bool, device=device)
        blocks = range(processes) if self.shared_queries else [offset // rows if rows else 0]
        for block in blocks:
            for i in range(rows):
                start = positive_columns + (block * rows + i) * per_row
                own[i, start : start + per_row] = True
        return own

    def _rules(self):
        """This forward's CandidateRules, or None when no mask or weight is on; counts go to ``self.masked``."""
        if not (self.mask_duplicates or self.mask_margin is not None or self.mask_relative is not None
                or self.hard_alpha or self.in_batch_alpha):
            return None
        return CandidateRules(self.mask_margin, self.mask_relative, self.hard_alpha, self.in_batch_alpha, self.masked)


class InBatchInfoNCE(InfoNCE):
    """In-batch-negative InfoNCE for pair pretraining (MultipleNegativesRankingLoss, scale 20).

    ``symmetric`` adds the passage->query direction: L = (L(q->p) + L(p->q)) / 2.
    Reference: Henderson et al. 2017 (arXiv 1705.00652); the 1B-pairs project.
    """

    def __init__(self, temperature=0.05, symmetric=False, gather_across_processes=True, chunk_size=1024):
        super().__init__(temperature, True, gather_across_processes, chunk_size)
        self.symmetric = symmetric

    def forward(self, query, positive, negatives=None):
        loss = super().forward(query, positive, negatives)
        if self.symmetric:
            loss = (loss + super().forward(positive, query)) / 2
        return loss


class ImprovedInfoNCE(InfoNCE):
    """The improved contrastive loss of GTE (Li et al. 2023, arXiv 2308.03281) in Qwen3-Embedding's form
    (arXiv 2506.05176, Sec. 3.2): the denominator also holds query-query and document-document similarities.

        Z_i = sum_d e^{s(q_i, d) / tau} + sum_{j != i} e^{s(q_i, q_j) / tau} + sum_{j != i} e^{s(p_i, p_j) / tau}
        L   = -1/B sum_i log( e^{s(q_i, p_i) / tau} / Z_i )

    d runs over every positive and hard negative of the global batch, q_j and p_j over its queries and
    positives. The masks and weights of InfoNCE apply to every term (a q_j or p_j whose text equals query i's
    or one of its positives is removed; the margin compares each term with s(q_i, p_i)). Not chunked: memory
    O(B x (2B + candidates)) per process; not with CBB's shared queries.
    """

    def forward(self, query, positive, negatives=None, text_ids=None):
        query = F.normalize(at_least_fp32(query), dim=-1)
        positive = F.normalize(at_least_fp32(positive), dim=-1)
        negatives = F.normalize(at_least_fp32(negatives), dim=-1) if negatives is not None else None
        gather = self.gather_across_processes and is_distributed()
        all_queries, offset = gather_with_grad(query) if gather else (query, 0)
        all_positives = gather_with_grad(positive)[0] if gather else positive
        documents = [all_positives]
        if negatives is not None:
            flat_negatives = negatives.reshape(-1, negatives.size(-1))
            documents.append(gather_with_grad(flat_negatives)[0] if gather else flat_negatives)
        documents = torch.cat(documents)
        scores = torch.cat([query @ documents.T, query @ all_queries.T, positive @ all_positives.T], dim=1)
        rows = torch.arange(query.size(0), device=query.device)
        labels = rows + offset
        itself = torch.zeros_like(scores, dtype=torch.bool)  # q_i . q_i and p_i . p_i
        itself[rows, documents.size(0) + labels] = True
        itself[rows, documents.size(0) + all_queries.size(0) + labels] = True
        scores = scores.masked_fill(itself, float("-inf")) / self.temperature
        rules = self._rules()
        if rules is not None and text_ids is not None and self.mask_duplicates:
            ids = {name: gather_ids(text_ids[name].reshape(-1)) if gather else text_ids[name].reshape(-1)
                   for name in ("query", "positive", "negative")}
            rules.query_ids, rules.positive_sets = text_ids["query"], text_ids["positive_sets"]
            rules.candidate_ids = torch.cat([ids["positive"], ids["negative"], ids["query"], ids["positive"]])
        if rules is not None and negatives is not None:
            own = self._own_negative_columns(query.size(0), all_positives.size(0), negatives.size(1), offset, gather,
                                             query.device)
            rules.own_negatives = F.pad(own, (0, scores.size(1) - own.size(1)))
        return info_nce(adjusted(scores, rules, rows, labels, self.temperature), labels)


class SpreadOut(nn.Module):
    """A contrastive loss plus the global orthogonal regulariser on unrelated embeddings (queries of different
    records, positives of different records), which spreads them over the sphere:

        L = loss + weight * (GOR(Q) + GOR(P)),   GOR(X) = M1(X)^2 + max(0, M2(X) - 1/d)

    M1 and M2 the mean and the mean square of x_i . x_j over pairs i != j of the global batch, d the dimension.
    Zhang et al. 2017, "Learning Spread-out Local Feature Descriptors" (arXiv 1708.06320); EmbeddingGemma
    (arXiv 2509.20354). Every process computes the regulariser of the whole batch: gathered with gradient, or, when
    the wrapped loss shares its queries (CBB: every process holds the same queries and positives), of this process's
    rows, which are the whole batch's (gathering them would pair each row with its copies, at cosine 1).
    """

    def __init__(self, loss, weight):
        super().__init__()
        self.loss, self.weight = loss, weight
        self.gather = not getattr(loss, "shared_queries", False)

    def forward(self, query, positive, negatives=None, text_ids=None):
        return self.loss(query, positive, negatives, text_ids) + self.weight * (
            orthogonality_penalty(query, self.gather) + orthogonality_penalty(positive, self.gather))

    @property
    def masked(self):
        return getattr(self.loss, "masked", None)


def orthogonality_penalty(embeddings, gather=True):
    """GOR of a batch of embeddings (with ``gather``, of every process's rows, gathered with gradient)."""
    x = F.normalize(at_least_fp32(embeddings), dim=-1)
    if gather and is_distributed():
        x = gather_with_grad(x)[0]
    pairs = x.size(0) * (x.size(0) - 1)
    if pairs == 0:
        return x.new_zeros(())
    products = x @ x.T
    off_diagonal = ~torch.eye(x.size(0), dtype=torch.bool, device=x.device)
    first, second = products[off_diagonal].sum() / pairs, (products[off_diagonal] ** 2).sum() / pairs
    return first**2 + torch.clamp(second - 1 / x.size(1), min=0)


def contrastive_masks(losses):
    """{"mask/<kind>_removed": candidates removed per forward, "mask/<kind>_removed_fraction": removed / the
    negatives the rows considered (the positive is never removed)} since the last call (then reset), for the log."""
    counts = {}
    for kind, loss in losses.items():
        masked = getattr(unwrapped(loss), "masked", None)
        if masked and masked["forwards"]:
            counts[f"mask/{kind}_removed"] = masked["removed"] / masked["forwards"]
            counts[f"mask/{kind}_removed_fraction"] = masked["removed"] / max(masked["candidates"], 1)
            masked.update(removed=0, candidates=0, forwards=0)
    return counts

"""What a query's InfoNCE softmax holds besides its positive: false negatives removed, hard ones weighted up.

    L_i = -log( e^{s_ii / tau} / (e^{s_ii / tau} + sum_{c kept} w_ic e^{s_ic / tau}) ),   w_ic = e^{alpha sg(s_ic)}

Removed (never the labelled positive), before the softmax:
- identity (texts compared as 64-bit hashes, taken before embedding, since dropout makes equal texts embed
  differently): a candidate whose text equals the query's, or any of the query record's positives;
- margin (Qwen3-Embedding, arXiv 2506.05176): a candidate scoring above s(q, p) + ``margin``;
- relative (NV-Retriever, arXiv 2407.15831, TopK-PercPos): above ``relative`` x s(q, p), for rows with s(q, p) > 0.
Weighted (EmbeddingGemma, arXiv 2509.20354, hardness weighting): the query's own hard negatives by
w = e^{hard_alpha sg(s)}, every other candidate by e^{in_batch_alpha sg(s)} (alpha 0: weight 1); sg stops the
gradient, so a weight is a constant added to the logit, log w. Scores s are cosines.
"""

import torch
import torch.distributed as dist


class CandidateRules:
    """The masks and weights of one forward. ``candidate_ids`` is [C] (every row sees the same candidates) or [B, C];
    ``own_negatives`` a bool [B, C] marking each row's own hard negatives (for the hardness weight)."""

    def __init__(self, margin=None, relative=None, hard_alpha=0.0, in_batch_alpha=0.0, counts=None):
        self.margin, self.relative = margin, relative
        self.hard_alpha, self.in_batch_alpha = hard_alpha, in_batch_alpha
        self.query_ids = self.positive_sets = self.candidate_ids = self.own_negatives = None
        self.counts = counts if counts is not None else {"removed": 0, "candidates": 0, "forwards": 0}

    def removed(self, rows, cosines, labels):
        """Bool [rows, C]: the candidates left out of these rows' softmax."""
        removed = torch.zeros_like(cosines, dtype=torch.bool)
        if self.query_ids is not None:
            candidates = self.candidate_ids[rows] if self.candidate_ids.dim() == 2 else self.candidate_ids[None, :]
            removed |= candidates == self.query_ids[rows, None]
            for column in range(self.positive_sets.size(1)):  # one [rows, C] comparison a positive (memory)
                removed |= candidates == self.positive_sets[rows, column, None]
        positive = cosines.gather(1, labels[:, None])
        if self.margin is not None:
            removed |= cosines > positive + self.margin
        if self.relative is not None:
            removed |= (cosines > self.relative * positive) & (positive > 0)
        removed[torch.arange(removed.size(0), device=removed.device), labels] = False
        return removed

    def log_weights(self, rows, cosines, labels):
        """[rows, C] added to the logits (log w), 0 at the labelled positive; None when every weight is 1."""
        if not (self.hard_alpha or self.in_batch_alpha):
            return None
        own = self.own_negatives[rows] if self.own_negatives is not None else torch.zeros_like(cosines, dtype=torch.bool)
        alpha = torch.where(own, self.hard_alpha, self.in_batch_alpha).to(cosines.dtype)
        log_weights = alpha * cosines.clamp(min=-1)  # a score already left out (-inf) stays out, not NaN
        log_weights[torch.arange(cosines.size(0), device=cosines.device), labels] = 0
        return log_weights

    def count(self, removed, candidates):
        """Add a forward's removed candidates to ``counts``, and the candidates it considered (bool [rows, C]: each
        row's negatives)."""
        removed, candidates = torch.stack([(removed & candidates).sum(), candidates.sum()]).tolist()  # one wait
        self.counts["removed"] += removed
        self.counts["candidates"] += candidates
        self.counts["forwards"] += 1


def adjusted(scores, rules, rows, labels, temperature, count=True):
    """``scores`` (temperature-scaled) of ``rows`` with the rules applied: log weights added, removed ones -inf."""
    if rules is None:
        return scores
    cosines = scores.detach() * temperature
    log_weights = rules.log_weights(rows, cosines, labels[rows])
    if log_weights is not None:
        scores = scores + log_weights
    removed = rules.removed(rows, cosines, labels[rows])
    if count:  # candidates: every score but the positive and those left out already (-inf: ImprovedInfoNCE's q_i.q_i)
        candidates = torch.isfinite(cosines)
        candidates[torch.arange(candidates.size(0), device=candidates.device), labels[rows]] = False
        rules.count(removed, candidates)
    return scores.masked_fill(removed, float("-inf"))


def gather_ids(ids):
    """Concatenate integer ``ids`` from every process (no gradient)."""
    gathered = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, ids.contiguous())
    return torch.cat(gathered)

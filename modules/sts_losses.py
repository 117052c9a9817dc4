"""The STS menu: objectives for scored pairs (the ``cosent`` kind), picked with ``--sts_loss`` (the math only).

Every objective takes the embeddings of the two sides of B pairs and their gold labels, scores each pair in
float32 or wider (cosine similarity; AnglE: its angle similarity), gathers scores and labels across processes with
gradient (modules/loss_inputs.py), and computes the same full loss over the global batch on every
process: since the all-gather backward sums the gradients of every process's copy and DDP averages them, the
parameter gradients equal one process's on the concatenated batch. Labels keep their own dtype wherever they are
compared (bf16 would merge close labels into ties); label-derived numbers enter the loss in the scores' dtype.
The objectives work under Matryoshka (the labels are not embeddings, so they are not truncated).

    cosent    CoSENT, the default                                       Su 2022 (kexue.fm/archives/8847), Piccolo2
    pearson   1 - Pearson r of scores and labels                       CoDiEmb (arXiv 2508.11442)
    rank_kl   KL(softmax of tie-aware rank targets || softmax(s/tau))   CoDiEmb
    pro       PRO's listwise Plackett-Luce ranking over the batch       Song et al. 2023 (arXiv 2306.17492), CoDiEmb
    angle     CoSENT on AnglE's angle similarity                        Li & Li 2023 (arXiv 2309.12871)

CoDiEmb's formulas follow the released training code (github.com/TencentCloudADP/youtu-embedding,
training/CoDiEmb/train/loss.py), which trains STS with 2 x pearson + 0.5 x pro + 5 x rank_kl at tau 0.05:
``--sts_loss pearson:2,pro:0.5,rank_kl:5``.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .flags import sts_loss_terms
from .loss_inputs import at_least_fp32, gather_with_grad, is_distributed


def cosine_scores(embeddings_a, embeddings_b):
    """cos(a_i, b_i) in >= float32, as CoSENT scores its pairs."""
    return F.cosine_similarity(at_least_fp32(embeddings_a), at_least_fp32(embeddings_b), dim=-1)


def angle_similarity(embeddings_a, embeddings_b):
    """AnglE's similarity of each pair: |Re z + Im z|, z = sum_k x_k conj(y_k) / (|x| |y|), where x_k = x'_k + i x''_k
    reads the first and second halves of x as the real and imaginary parts of a complex vector (an odd dimension gets
    a zero coordinate appended). Re z is cos(x, y), Im z = sum_k (x''_k y'_k - x'_k y''_k) / (|x| |y|); scale-invariant
    in x and y. The form of sentence-transformers' ``util.pairwise_angle_sim`` ("cosine + sine"), its rewrite of the
    authors' complex division code.
    """
    x, y = at_least_fp32(embeddings_a), at_least_fp32(embeddings_b)
    if x.size(-1) % 2:
        x, y = F.pad(x, (0, 1)), F.pad(y, (0, 1))
    x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    real_x, imaginary_x = x.chunk(2, dim=-1)
    real_y, imaginary_y = y.chunk(2, dim=-1)
    sines = (imaginary_x * real_y - real_x * imaginary_y).sum(-1)
    return torch.abs((x * y).sum(-1) + sines)


def cosent_loss(scores: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """log(1 + sum over (a, b) with label_a < label_b of exp((s_a - s_b) / tau))."""
    differences = (scores[:, None] - scores[None, :]) / temperature  # [a, b] = s_a - s_b
    ordered = labels[:, None] < labels[None, :]
    differences = differences.masked_fill(~ordered, float("-inf"))
    zero = torch.zeros(1, dtype=differences.dtype, device=differences.device)
    return torch.logsumexp(torch.cat([zero, differences.flatten()]), dim=0)


def pearson_loss(scores, labels):
    """1 - r, r = mean((s - mean s)(y - mean y)) / (std s * std y) with population moments; 0 (with a graph and a
    zero gradient) when every label is equal or there is one pair: nothing to correlate. Scores all equal while the
    labels are not divide by zero, as in CoDiEmb: the non-finite loss stops the run, naming the step."""
    if scores.numel() < 2 or bool(labels.min() == labels.max()):
        return scores.sum() * 0
    centred_scores = scores - scores.mean()
    centred_labels = labels.to(scores.dtype) - labels.to(scores.dtype).mean()
    covariance = (centred_scores * centred_labels).mean()
    return 1 - covariance / (centred_scores.square().mean().sqrt() * centred_labels.square().mean().sqrt())


def average_ranks(labels):
    """0-based ranks of the labels, lowest first, tied labels sharing the average of their ranks (float64):
    ``scipy.stats.rankdata(labels, method="average") - 1``, on the labels' device."""
    below = (labels[None, :] < labels[:, None]).sum(dim=1)
    tied = (labels[None, :] == labels[:, None]).sum(dim=1)
    return (2 * below + tied - 1).to(torch.float64) / 2


def rank_targets(labels, temperature, dtype=torch.float64):
    """Rank KL's target distribution: softmax_i(r_i / ((n - 1) tau)), r_i the average rank of label i (lowest 0), so
    normalised ranks lie in [0, 1] (an untied best pair 1, an untied worst 0) and tied pairs get the same
    probability."""
    n = labels.numel()
    normalised = average_ranks(labels) / (n - 1) if n > 1 else torch.zeros_like(labels, dtype=torch.float64)
    return torch.softmax(normalised.to(dtype) / temperature, dim=0)


def rank_kl_loss(scores, labels, temperature):
    """KL(t || softmax(s / tau)) / n, t = rank_targets(labels, tau)."""
    targets = rank_targets(labels, temperature, scores.dtype)
    log_predicted = F.log_softmax(scores / temperature, dim=0)
    return F.kl_div(log_predicted, targets, reduction="sum") / max(scores.numel(), 1)


def pro_loss(scores, labels, temperature):
    """-1/|K| sum_{k in K} log(e^{w_k s_k / tau} / (e^{w_k s_k / tau} + sum_{j: y_j < y_k} e^{(y_k - y_j) s_j / tau})),
    w_k = max_{j: y_j < y_k} (y_k - y_j), K the pairs with a lower-labelled pair in the batch. No sort is needed: the
    pairs after k in a descending sort with a strictly lower label are exactly those with y_j < y_k, whatever order
    the sort gives tied pairs."""
    lower = labels[None, :] < labels[:, None]  # [k, j]: pair j's label is below pair k's
    gaps = (labels[:, None] - labels[None, :]).to(scores.dtype).masked_fill(~lower, 0)
    scaled = scores / temperature
    own = scaled * gaps.max(dim=1).values
    others = (scaled[None, :] * gaps).masked_fill(~lower, float("-inf"))
    log_chosen = own - torch.logsumexp(torch.cat([own[:, None], others], dim=1), dim=1)  # 0 where k has none below
    return -log_chosen.sum() / lower.any(dim=1).sum().clamp(min=1)


class ScoredPairs(nn.Module):
    """An objective on the scores of B pairs and their labels, over the global batch (gathered like CoSENT):
    subclasses set ``similarity`` (cosine unless said) and ``objective(scores, labels)``."""

    similarity = staticmethod(cosine_scores)

    def __init__(self, gather_across_processes=True):
        super().__init__()
        self.gather_across_processes = gather_across_processes

    def forward(self, embeddings_a, embeddings_b, labels):
        scores = self.similarity(embeddings_a, embeddings_b)
        if self.gather_across_processes and is_distributed():
            scores = gather_with_grad(scores)[0]
            labels = gather_with_grad(labels)[0]
        return self.objective(scores, labels)

    def objective(self, scores, labels):
        raise NotImplementedError


class CoSENT(ScoredPairs):
    """CoSENT ranking loss for scored pairs (STS, pair classification).

    With s_i = cos(a_i, b_i) and gold label y_i:

        L = log(1 + sum_{(i, j): y_i < y_j} exp((s_i - s_j) / tau))

    Pairs are ranked against every pair of the global batch: scores and labels are gathered,
    and every process computes the same full loss. Reference: Su 2022, "CoSENT"
    (kexue.fm/archives/8847); Piccolo2 (arXiv 2405.06932), tau 0.05.
    """

    def __init__(self, temperature=0.05, gather_across_processes=True):
        super().__init__(gather_across_processes)
        self.temperature = temperature

    def objective(self, scores, labels):
        return cosent_loss(scores, labels, self.temperature)


class Pearson(ScoredPairs):
    """Pearson correlation loss: with s_i = cos(a_i, b_i) and gold label y_i over the global batch,

        L = 1 - r(s, y),   r = sum_i (s_i - s_mean)(y_i - y_mean) / sqrt(sum_i (s_i - s_mean)^2 sum_i (y_i - y_mean)^2)

    0 when every label is equal. No temperature (r is scale-invariant). It optimises the correlation STS is
    judged by, but linear, not rank correlation. CoDiEmb (Zhang et al. 2025, arXiv 2508.11442; released code's
    PearsonCorrelationLoss, weight 2 in its STS mix).
    """

    def objective(self, scores, labels):
        return pearson_loss(scores, labels)


class RankKL(ScoredPairs):
    """Rank-KL loss against tie-aware rank targets: with s_i = cos(a_i, b_i), r_i the average rank of y_i among
    the n labels of the global batch (0 lowest, tied labels share the mean of their ranks, scipy's 'average'),

        t = softmax(r / ((n - 1) tau)),   p = softmax(s / tau),   L = KL(t || p) / n = sum_i t_i log(t_i / p_i) / n

    The targets normalise the ranks to [0, 1] (an untied best pair 1, an untied worst 0) and share tau with the
    scores, as CoDiEmb's
    released code does (RankKLDivergenceLoss, tau 0.05, weight 5 in its STS mix); its ``kl_div(..., 'batchmean')``
    of a 1-D distribution divides by n, kept here. All labels tied: the uniform target (equal scores).
    Reference: CoDiEmb (arXiv 2508.11442).
    """

    def __init__(self, temperature=0.05, gather_across_processes=True):
        super().__init__(gather_across_processes)
        self.temperature = temperature

    def objective(self, scores, labels):
        return rank_kl_loss(scores, labels, self.temperature)


class PRO(ScoredPairs):
    """PRO (Preference Ranking Optimization; Song et al. 2023, arXiv 2306.17492) over the global batch sorted by gold
    label, as CoDiEmb adapts it to STS (arXiv 2508.11442; released code's PROLoss, tau 0.05, weight 0.5): a
    Plackett-Luce decomposition, pair k chosen first among itself and the pairs ranked below it, with PRO's
    label-gap temperatures. With s_i = cos(a_i, b_i), y_i the gold label, D_k = {j : y_j < y_k}:

        L = -1/|K| sum_{k in K} log(e^{w_k s_k / tau} / (e^{w_k s_k / tau} + sum_{j in D_k} e^{(y_k - y_j) s_j / tau}))

    w_k = max_{j in D_k} (y_k - y_j), K = {k : D_k non-empty}. Ties: pairs with equal labels are never in each
    other's D (neither is preferred; CoDiEmb skips a gap <= 1e-8, here exactly equal labels), so the loss does not
    depend on the order a sort gives them; a pair with nothing below it adds no term, and all labels equal gives 0.
    """

    def __init__(self, temperature=0.05, gather_across_processes=True):
        super().__init__(gather_across_processes)
        self.temperature = temperature

    def objective(self, scores, labels):
        return pro_loss(scores, labels, self.temperature)


class AnglE(ScoredPairs):
    """AnglE (Li & Li 2023, arXiv 2309.12871) as sentence-transformers' AnglELoss: CoSENT over the angle similarity
    (``angle_similarity``) instead of the cosine,

        L = log(1 + sum_{(i, j): y_i < y_j} exp((a_i - a_j) / tau)),   a_i = |cos(x_i, y_i) + sin(x_i, y_i)|

    tau 0.05 is sentence-transformers' scale 20. Odd dimensions (a Matryoshka dim) get a zero coordinate.
    """

    similarity = staticmethod(angle_similarity)

    def __init__(self, temperature=0.05, gather_across_processes=True):
        super().__init__(gather_across_processes)
        self.temperature = temperature

    def objective(self, scores, labels):
        return cosent_loss(scores, labels, self.temperature)


class WeightedSum(nn.Module):
    """sum_k w_k L_k of objectives on the same arguments (``--sts_loss pearson:2,pro:0.5,rank_kl:5``); not divided by
    the weights' sum, as CoDiEmb adds its terms."""

    def __init__(self, losses, weights):
        super().__init__()
        self.losses, self.weights = nn.ModuleList(losses), list(weights)

    def forward(self, *args):
        return sum(weight * loss(*args) for loss, weight in zip(self.losses, self.weights))


def sts_loss(spec, temperature, gather_across_processes=True):
    """The cosent kind's loss for an ``--sts_loss`` value: one objective (``cosent``: the CoSENT of before), or the
    weighted sum of a comma list of NAME[:WEIGHT]; ``temperature`` (--cosent_temperature) is every objective's but
    Pearson's."""
    build = {"cosent": lambda: CoSENT(temperature, gather_across_processes),
             "pearson": lambda: Pearson(gather_across_processes),
             "rank_kl": lambda: RankKL(temperature, gather_across_processes),
             "pro": lambda: PRO(temperature, gather_across_processes),
             "angle": lambda: AnglE(temperature, gather_across_processes)}
    terms = sts_loss_terms(spec)
    if len(terms) == 1 and terms[0][1] == 1:
        return build[terms[0][0]]()
    return WeightedSum([build[name]() for name, _ in terms], [weight for _, weight in terms])

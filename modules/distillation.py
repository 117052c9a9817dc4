"""Distillation from a teacher: its scores over a query's candidates, or its embeddings of a parallel corpus.

Scores (``--distill_weight``), added to the retrieval loss (RocketQAv2, Ren et al. 2021, arXiv 2110.07367; BGE-M3,
Chen et al. 2024, arXiv 2402.03216):

    L_KD = 1/B sum_i KL(q_i || p_i),   q_ic = softmax_c(t_ic / tau_T),   p_ic = softmax_c(s_ic / tau)

over one candidate set per query: read from the data (``pos_scores`` / ``neg_scores`` of the record, one per
``text_pos`` / ``text_neg``: a cross-encoder's logits, or any teacher's scores), it is the query's own positive and
hard negatives; computed on the fly by ``--teacher_model`` (cosines of its embeddings), it is every positive and
negative of the process's batch, as in the student's in-batch softmax. s are the student's cosines, tau its
temperature.

Parallel corpus (task kind ``parallel``: ``text`` a source sentence, ``text_pos`` its translation(s)), the
multilingual distillation of Reimers & Gurevych 2020 (arXiv 2004.09813), the 1B-pairs roadmap's step:

    L_MSE = MSE(S(source), T(source)) + MSE(S(translation), T(source))

so the student embeds a translation where the (monolingual) teacher embeds its source.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .cli import UsageError
from .loss_inputs import at_least_fp32
from .matryoshka import unwrapped


def score_kl(student_scores, teacher_scores, temperature, teacher_temperature):
    """KL(teacher softmax || student softmax) over the last dim, the mean over rows. Scores are logits before the
    temperature; computed in float32 at least."""
    student = F.log_softmax(at_least_fp32(student_scores) / temperature, dim=-1)
    teacher = F.log_softmax(at_least_fp32(teacher_scores) / teacher_temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True)


class ScoreDistillation(nn.Module):
    """A contrastive loss plus ``weight`` x L_KD (see the module docstring); ``teacher`` is
    {"scores": [B, C], "own": bool}: own, C = 1 + K candidates (positive, then the row's negatives); else
    C = B (1 + K): [positives | negatives of row 0 | negatives of row 1 | ...] of this process. L_KD without the
    weight is summed in ``self.distilled`` (detached, read by ``distillation_terms``)."""

    def __init__(self, loss, weight, temperature, teacher_temperature):
        super().__init__()
        self.loss, self.weight = loss, weight
        self.temperature, self.teacher_temperature = temperature, teacher_temperature
        self.distilled = {"kl": 0.0, "forwards": 0}  # since the caller last reset it

    def forward(self, query, positive, negatives=None, text_ids=None, teacher=None):
        loss = self.loss(query, positive, negatives, text_ids)
        if teacher is None:
            return loss
        query, positive = F.normalize(at_least_fp32(query), dim=-1), F.normalize(at_least_fp32(positive), dim=-1)
        negatives = (F.normalize(at_least_fp32(negatives), dim=-1) if negatives is not None
                     else positive.new_zeros(positive.size(0), 0, positive.size(1)))
        if teacher["own"]:
            student = torch.einsum("bd,bcd->bc", query, torch.cat([positive[:, None], negatives], dim=1))
        else:
            student = query @ torch.cat([positive, negatives.reshape(-1, positive.size(1))]).T
        kl = score_kl(student, teacher["scores"], self.temperature, self.teacher_temperature)
        self.distilled.update(kl=self.distilled["kl"] + kl.detach(), forwards=self.distilled["forwards"] + 1)
        return loss + self.weight * kl

    @property
    def masked(self):
        return getattr(self.loss, "masked", None)


def distillation_terms(losses, accelerator=None):
    """{"loss/<kind>_distill": the mean L_KD (without --distill_weight) of the kind's forwards} since the last call
    (then reset), for the log; under ``accelerator`` averaged over processes like the losses (every process calls
    it). Under Matryoshka each dim's forward counts once."""
    terms = {}
    for kind, loss in losses.items():
        distilled = getattr(unwrapped(loss), "distilled", None)
        if distilled is None:
            continue
        device = accelerator.device if accelerator is not None else "cpu"
        values = torch.stack([torch.as_tensor(distilled["kl"], dtype=torch.float32, device=device),
                              torch.tensor(float(distilled["forwards"]), device=device)])
        if accelerator is not None:
            values = accelerator.reduce(values, "sum")
        kl, forwards = values.tolist()
        if forwards:
            terms[f"loss/{kind}_distill"] = kl / forwards
        distilled.update(kl=0.0, forwards=0)
    return terms


class ParallelMSE(nn.Module):
    """L_MSE of the module docstring; ``teacher`` is {"source": T(source) [B, d]}."""

    def forward(self, source, translation, teacher):
        target = at_least_fp32(teacher["source"])
        return F.mse_loss(at_least_fp32(source), target) + F.mse_loss(at_least_fp32(translation), target)


class Teacher:
    """A frozen embedding model that scores or embeds the texts the collator tokenized for it (``batch["teacher"]``).
    Not wrapped by accelerate: each process holds a copy, in eval mode, without gradients."""

    def __init__(self, path, device, dtype=torch.float32):
        from .model import EmbeddingModel

        self.model = EmbeddingModel.from_pretrained(path, dtype=dtype).to(device).eval().requires_grad_(False)
        self.tokenizer = self.model.tokenizer
        self.query_prefix = self.model.prompts.get("query", "")

    @torch.no_grad()
    def inputs(self, batch):
        """What the batch's loss takes from the teacher: {"scores", "own"} for a contrastive batch, {"source"} for a
        parallel one."""
        tokens = batch["teacher"]
        queries = self.model(**tokens["query"])
        if batch["kind"] == "parallel":
            return {"source": queries}
        passages = F.normalize(self.model(**tokens["passage"]).float(), dim=-1)
        return {"scores": F.normalize(queries.float(), dim=-1) @ passages.T, "own": False}


def teacher_inputs(teacher, batch):
    """The teacher's part of a batch's loss: on the fly (``teacher``), read from the data (``teacher_scores``), or None."""
    if "teacher" in batch:
        return teacher.inputs(batch)
    if "teacher_scores" in batch:
        return {"scores": batch["teacher_scores"], "own": True}
    return None


def build_teacher(args, device, student_dim, datasets, lengths):
    """--teacher_model loaded (None without), checked before step one: it reads ``lengths`` ({flag: tokens}), and
    for a parallel corpus embeds in the student's dimension (MSE compares embeddings)."""
    if not args.teacher_model:
        return None
    from .model import DTYPES
    from .position import check_lengths_fit

    teacher = Teacher(args.teacher_model, device, DTYPES[args.torch_dtype])
    check_lengths_fit(teacher.model.backbone, lengths, " (the teacher reads the same texts)")
    if any(d.kind == "parallel" for d in datasets) and teacher.model.output_dim != student_dim:
        raise UsageError(f"--teacher_model embeds in {teacher.model.output_dim} dimensions, the student in "
                         f"{student_dim}: a parallel corpus needs the same (add --scaling_dim "
                         f"{teacher.model.output_dim})")
    return teacher

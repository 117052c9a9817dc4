"""The fine-tuning run's objective from its flags: each task kind's loss, and the kinds' weights relative to each
other. The losses themselves: modules/losses.py (contrastive), modules/sts_losses.py (scored pairs),
modules/distillation.py (a teacher's scores or embeddings), modules/matryoshka.py (nested dims)."""

from .cli import UsageError
from .distillation import ParallelMSE, ScoreDistillation
from .losses import ImprovedInfoNCE, InfoNCE, SpreadOut
from .matryoshka import matryoshka_from_flags
from .sts_losses import sts_loss


def task_losses(args, kinds, output_dim):
    """The fine-tuning losses of each task kind from the flags (temperatures, CBB, false-negative masks, hardness
    weights, the improved contrastive loss, the spread-out regulariser, distillation, the STS objective, Matryoshka),
    and each kind's weight relative to the largest among the run's ``kinds``."""
    candidates = {"mask_duplicates": args.mask_duplicates, "mask_margin": args.mask_margin,
                  "mask_relative": args.mask_relative, "hard_alpha": args.hard_negative_alpha,
                  "in_batch_alpha": args.in_batch_alpha}
    retrieval = ImprovedInfoNCE if args.improved_contrastive else InfoNCE
    losses = {
        "retri_contrast": retrieval(args.retri_temperature, in_batch_negatives=not args.retri_hard_negatives_only,
                                    shared_queries=args.cbb, **candidates),
        "cls_contrast": InfoNCE(args.cls_temperature, in_batch_negatives=False, **candidates),
        "cosent": sts_loss(getattr(args, "sts_loss", "cosent"), args.cosent_temperature),  # --sts_loss
    }
    if args.spread_out_weight:
        losses["retri_contrast"] = SpreadOut(losses["retri_contrast"], args.spread_out_weight)
    if args.distill_weight:
        losses["retri_contrast"] = ScoreDistillation(losses["retri_contrast"], args.distill_weight,
                                                     args.retri_temperature,
                                                     args.teacher_temperature or args.retri_temperature)
    weights = relative_task_weights({"retri_contrast": args.retri_weight, "cls_contrast": args.cls_weight,
                                     "cosent": args.cbb_beta if args.cbb else args.cosent_weight,
                                     "parallel": args.parallel_weight}, kinds)
    losses = {kind: matryoshka_from_flags(loss, args.mrl_dims, args.mrl_weights, output_dim)
              for kind, loss in losses.items()}
    losses["parallel"] = ParallelMSE()  # the teacher's embeddings are whole: no Matryoshka
    return losses, weights


def relative_task_weights(weights, kinds):
    """Each task kind's loss weight divided by the largest among the ``kinds`` the run trains.

    Piccolo2's weights (retrieval 1, classification 0.2, CoSENT 0.04) are relative between tasks. A
    batch holds one task, and Adam's update does not depend on the loss's scale, so the absolute scale
    only decides how often gradient clipping (norm 1.0) acts: a CoSENT-only run at weight 0.04 was
    almost never clipped where sentence-transformers' run at weight 1 always is, and ended about a
    point lower. Dividing by the largest makes a single-task run train at weight 1 and keeps the ratios
    of a mixed run.
    """
    used = {kind: weights[kind] for kind in kinds}
    bad = [kind for kind, weight in used.items() if not weight > 0]
    if bad:
        raise UsageError(f"loss weights must be > 0; {', '.join(f'{k} has {used[k]}' for k in bad)} "
                         "(leave a task out of the meta list instead)")
    largest = max(used.values())
    return {kind: weight / largest for kind, weight in used.items()}

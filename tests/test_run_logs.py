"""What a run logs and says before it trains: the gradient norm before clipping against the norm of the gradients the
optimizer got, the loss of each dataset of a kind, the distillation term alone, the share of candidates the masks
removed, and the start-up summary and train_summary.json's record of EMA, masks, teacher, WiSE-FT and checkpoints."""

import json
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from modules.distillation import ScoreDistillation, distillation_terms, score_kl
from modules.losses import ImprovedInfoNCE, InfoNCE, contrastive_masks
from modules.matryoshka import Matryoshka
from modules.run_logs import GradNorms, LossWindow
from tests.conftest import SENTENCES, write_jsonl
from tests.test_false_negatives import POSITIVES, RECORDS, embeddings, ids_of
from tests.test_train_finetune import common_args


@pytest.fixture
def logged(monkeypatch):
    """The metrics of every logged step of the runs the test makes in this process, [(step, metrics)]."""
    import modules.progress

    steps, log = [], modules.progress.Progress.log

    def recording(self, step, metrics):
        steps.append((step, dict(metrics)))
        log(self, step, metrics)

    monkeypatch.setattr(modules.progress.Progress, "log", recording)
    return steps


@pytest.fixture
def clip_calls(monkeypatch):
    """[(norm of the gradients before, after)] of every accelerate clip_grad_norm_ call."""
    calls, clip = [], Accelerator.clip_grad_norm_

    def norm(parameters):
        return float(torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None]))

    def recording(self, parameters, max_norm, norm_type=2):
        parameters = list(parameters)
        before = norm(parameters)
        result = clip(self, parameters, max_norm, norm_type)
        calls.append((before, norm(parameters)))
        return result

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", recording)
    return calls


def finetune(*argv):
    import train_finetune

    train_finetune.main([*argv[1:], "--num_workers", "0"])


# --------------------------------------------------------------------------- gradient norm before clipping

def test_grad_norm_is_the_norm_before_clipping_and_grad_clipped_the_share_of_clipped_steps(tiny_bert, tiny_data,
                                                                                            tmp_path, logged,
                                                                                            clip_calls):
    finetune(*common_args(tiny_bert, tiny_data, tmp_path, "--max_steps", "4", "--log_every", "2",
                          "--max_grad_norm", "1e-3"))
    assert len(clip_calls) == 4 and [step for step, _ in logged] == [2, 4]
    for window, (_, metrics) in enumerate(logged):
        norms = [before for before, _ in clip_calls[2 * window: 2 * window + 2]]
        assert metrics["grad_norm"] == pytest.approx(sum(norms) / 2, rel=1e-5)
        assert metrics["grad_norm"] > 1e-3 and metrics["grad_clipped"] == 1.0
    assert all(after == pytest.approx(1e-3, rel=1e-3) for _, after in clip_calls)  # and it clipped


def test_without_clipping_the_norm_is_logged_and_the_gradients_left_bit_identical(tiny_bert, tiny_data, tmp_path,
                                                                                  logged, clip_calls):
    finetune(*common_args(tiny_bert, tiny_data, tmp_path, "--max_steps", "2", "--max_grad_norm", "0"))
    assert [metrics["grad_norm"] for _, metrics in logged] == pytest.approx([before for before, _ in clip_calls],
                                                                            rel=1e-5)
    assert all("grad_clipped" not in metrics for _, metrics in logged)
    # measuring multiplies by exactly 1 (or not at all): the gradients the optimizer gets are the same bits
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    model(torch.randn(4, 5)).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norms = GradNorms(Accelerator(), 0.0)
    norms.clip(model.parameters())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert norms.metrics() == {"grad_norm": pytest.approx(float(torch.nn.utils.get_total_norm(grads)), rel=1e-6)}
    assert norms.metrics() == {}  # read and reset


def test_pretraining_logs_the_grad_norm_and_says_its_setup(tiny_bert, tmp_path, logged, clip_calls, capsys):
    import train_pretrain

    write_jsonl(tmp_path / "pairs.jsonl", [{"text": s, "text_pos": s + " today"} for s in SENTENCES])
    (tmp_path / "meta.txt").write_text("pairs.jsonl 1\n")
    train_pretrain.main(["--model_name_or_path", str(tiny_bert), "--meta_list", str(tmp_path / "meta.txt"),
                         "--output_dir", str(tmp_path / "out"), "--batch_size", "4", "--query_max_len", "16",
                         "--passage_max_len", "16", "--lr", "1e-3", "--max_steps", "2", "--log_every", "1",
                         "--num_workers", "0", "--max_grad_norm", "1e-3", "--ema_decay", "0.9"])
    assert [metrics["grad_norm"] for _, metrics in logged] == pytest.approx([before for before, _ in clip_calls],
                                                                            rel=1e-5)
    assert [metrics["grad_clipped"] for _, metrics in logged] == [1.0, 1.0]
    out = capsys.readouterr().out
    assert "gradient clipping at norm 0.001; EMA decay 0.9 (final/ from the average); WiSE-FT off (alpha 1)" in out
    assert "false negatives" not in out and "teacher" not in out
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert {key: summary[key] for key in ("max_grad_norm", "ema_decay", "wise_ft_alpha", "checkpoints")} == {
        "max_grad_norm": 1e-3, "ema_decay": 0.9, "wise_ft_alpha": 1.0,
        "checkpoints": {"every": None, "best": None, "total_limit": None}}


# --------------------------------------------------------------------------- loss per dataset

def test_loss_window_means_each_kind_and_each_dataset_of_a_kind_with_several():
    datasets = [SimpleNamespace(name=name, kind=kind) for name, kind in
                [("stsb", "cosent"), ("retri", "retri_contrast"), ("mrpc", "cosent")]]
    window = LossWindow(("retri_contrast", "cls_contrast", "cosent"), datasets)
    for index, loss in [(0, 1.0), (2, 3.0), (0, 2.0), (1, 0.5)]:
        window.add({"kind": datasets[index].kind, "dataset_index": index}, torch.tensor(loss))
    accelerator = Accelerator()
    assert window.metrics(accelerator) == {"loss/retri_contrast": 0.5, "loss/cosent": 2.0, "loss/cosent/stsb": 1.5,
                                           "loss/cosent/mrpc": 3.0}
    assert window.metrics(accelerator) == {}  # a new window


def test_a_run_logs_the_loss_of_each_cosent_dataset(tiny_bert, tiny_data, tmp_path, logged):
    (tmp_path / "meta.txt").write_text(f"{tiny_data / 'sts.jsonl'} 1 type=cosent name=stsb\n"
                                       f"{tiny_data / 'sts.jsonl'} 1 type=cosent name=mrpc\n"
                                       f"{tiny_data / 'retri.jsonl'} 1 type=retri_contrast\n")
    finetune(*common_args(tiny_bert, tiny_data, tmp_path / "out", "--meta_list", str(tmp_path / "meta.txt"),
                          "--max_steps", "8"))
    seen = set()
    for _, metrics in logged:  # a step is one batch: its dataset's loss is its kind's
        per_dataset = {name: value for name, value in metrics.items() if name.startswith("loss/cosent/")}
        if "loss/cosent" in metrics:
            assert list(per_dataset.values()) == [metrics["loss/cosent"]]
            seen |= set(per_dataset)
        else:
            assert not per_dataset
        assert not any(name.startswith("loss/retri_contrast/") for name in metrics)  # one retrieval dataset
    assert seen == {"loss/cosent/stsb", "loss/cosent/mrpc"}


# --------------------------------------------------------------------------- the distillation term alone

def test_distillation_terms_are_the_weight_free_kl_of_each_forward():
    generator = torch.Generator().manual_seed(0)
    q, p, n = (torch.randn(*shape, generator=generator) for shape in [(4, 8), (4, 8), (4, 2, 8)])
    scores = [torch.randn(4, 3, generator=generator) for _ in range(2)]
    loss_fn = ScoreDistillation(InfoNCE(0.05), 0.7, 0.05, 0.5)
    expected = []
    for teacher in scores:
        loss_fn(q, p, n, None, {"scores": teacher, "own": True})
        student = torch.einsum("bd,bcd->bc", torch.nn.functional.normalize(q, dim=-1),
                               torch.nn.functional.normalize(torch.cat([p[:, None], n], 1), dim=-1))
        expected.append(float(score_kl(student, teacher, 0.05, 0.5)))
    loss_fn(q, p, n)  # no teacher part: not a distilled forward
    terms = distillation_terms({"retri_contrast": Matryoshka(loss_fn, [8]), "cosent": torch.nn.Identity()})
    assert terms == {"loss/retri_contrast_distill": pytest.approx(sum(expected) / 2, rel=1e-6)}
    assert distillation_terms({"retri_contrast": loss_fn}) == {}  # read and reset


@pytest.mark.parametrize("teacher", ["model", "data"])
def test_a_run_logs_the_distillation_term(tiny_bert, tiny_data, tmp_path, logged, teacher):
    if teacher == "model":
        extra = ["--teacher_model", str(tiny_bert)]
    else:  # the records' own teacher scores
        write_jsonl(tmp_path / "scored.jsonl", [
            {"text": s, "text_pos": [s + " today"], "pos_scores": [9.0], "text_neg": [SENTENCES[(i + 5) % 16]],
             "neg_scores": [1.5]} for i, s in enumerate(SENTENCES)])
        (tmp_path / "meta.txt").write_text("scored.jsonl 1 type=retri_contrast\n")
        extra = ["--meta_list", str(tmp_path / "meta.txt"), "--teacher_temperature", "1"]
    finetune(*common_args(tiny_bert, tiny_data, tmp_path / "out", "--max_steps", "4", "--distill_weight", "0.5",
                          *extra))
    retrieval = [metrics for _, metrics in logged if "loss/retri_contrast" in metrics]
    assert retrieval and all("loss/retri_contrast_distill" in metrics for metrics in retrieval)
    for metrics in retrieval:  # loss = InfoNCE (>= 0) + 0.5 x L_KD (>= 0)
        assert 0 <= 0.5 * metrics["loss/retri_contrast_distill"] <= metrics["loss/retri_contrast"]
    assert not any("loss/retri_contrast_distill" in metrics for _, metrics in logged
                   if "loss/retri_contrast" not in metrics)


# --------------------------------------------------------------------------- the share of candidates removed

def duplicates_by_hand(improved):
    """(removed, candidates) of --mask_duplicates over RECORDS, text by text: every candidate but the labelled
    positive (and, improved, query i itself and its positive against itself)."""
    removed = candidates = 0
    for i, record in enumerate(RECORDS):
        others = [j for j in range(len(RECORDS)) if j != i]
        texts = [POSITIVES[j] for j in others] + [t for r in RECORDS for t in r["text_neg"]]
        if improved:
            texts += [RECORDS[j]["text"] for j in others] + [POSITIVES[j] for j in others]
        candidates += len(texts)
        removed += sum(t == record["text"] or t in record["text_pos"] for t in texts)
    return removed, candidates


@pytest.mark.parametrize("loss_class", [InfoNCE, ImprovedInfoNCE])
def test_the_removed_fraction_is_removed_over_the_negatives_considered(loss_class):
    q, p, n = embeddings()
    loss_fn = loss_class(0.05, mask_duplicates=True)
    loss_fn(q, p, n, ids_of(range(len(RECORDS))))
    removed, candidates = duplicates_by_hand(loss_class is ImprovedInfoNCE)
    assert (removed, candidates) == ((6, 102) if loss_class is InfoNCE else (9, 162))
    assert contrastive_masks({"retri_contrast": loss_fn}) == {
        "mask/retri_contrast_removed": removed, "mask/retri_contrast_removed_fraction": removed / candidates}


def test_a_run_logs_the_removed_fraction(tiny_bert, tiny_data, tmp_path, logged):
    finetune(*common_args(tiny_bert, tiny_data, tmp_path, "--max_steps", "6", "--mask_duplicates", "--mask_margin",
                          "0.0"))
    # a step is one forward of 4 queries: retrieval 4 positives + 4 negatives (7 negatives a row), cls 2 a row
    negatives = {"retri_contrast": 4 * 7, "cls_contrast": 4 * 2}
    seen = set()
    for _, metrics in logged:
        for kind, count in negatives.items():
            if f"loss/{kind}" in metrics:
                fraction = metrics[f"mask/{kind}_removed_fraction"]
                assert 0 <= fraction <= 1 and fraction == pytest.approx(metrics[f"mask/{kind}_removed"] / count)
                seen.add(kind)
    assert seen == set(negatives)


# --------------------------------------------------------------------------- start-up summary and train_summary.json

def test_the_start_up_summary_and_train_summary_record_ema_masks_teacher_wise_ft_and_checkpoints(
        tiny_bert, tiny_data, tmp_path, capsys):
    finetune(*common_args(tiny_bert, tiny_data, tmp_path, "--max_steps", "2", "--ema_decay", "0.99",
                          "--wise_ft_alpha", "0.5", "--mask_duplicates", "--mask_margin", "0.1",
                          "--hard_negative_alpha", "5", "--teacher_model", str(tiny_bert), "--distill_weight", "0.5",
                          "--save_every", "1", "--save_total_limit", "1", "--max_grad_norm", "2"))
    out = capsys.readouterr().out
    assert ("gradient clipping at norm 2; EMA decay 0.99 (final/ from the average); WiSE-FT alpha 0.5 (final/ = 0.5 x "
            "trained + 0.5 x start)") in out
    assert "false negatives: masks duplicates, margin 0.1; hardness weights hard negatives alpha 5" in out
    assert f"teacher: {tiny_bert.name}, distillation weight 0.5 (teacher temperature 0.01)" in out  # not its path
    assert f"outputs: {tmp_path}/final, a checkpoint every 1 steps, the newest 1 kept, trackers: tensorboard" in out
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert {key: summary[key] for key in ("max_grad_norm", "ema_decay", "wise_ft_alpha", "false_negatives",
                                          "teacher_model", "distill_weight", "teacher_temperature",
                                          "checkpoints")} == {
        "max_grad_norm": 2.0, "ema_decay": 0.99, "wise_ft_alpha": 0.5,
        "false_negatives": {"mask_duplicates": True, "mask_margin": 0.1, "mask_relative": None,
                            "hard_negative_alpha": 5.0, "in_batch_alpha": 0.0},
        "teacher_model": tiny_bert.name, "distill_weight": 0.5, "teacher_temperature": 0.01,
        "checkpoints": {"every": 1, "best": None, "total_limit": 1}}


def test_the_start_up_summary_of_defaults_and_of_keep_best():
    from modules.run_summary import startup_lines

    setup = {"datasets": [], "total_steps": 10, "warmup_steps": 1, "steps_per_epoch": 5, "epochs": 2.0,
             "grad_accum": 1, "processes": 1, "distributed": "single process", "master_weights": "float32",
             "mixed_precision": "no", "save_dtype": "float32", "output_dir": "runs/x", "trackers": ["tensorboard"],
             "max_grad_norm": 0.0, "ema_decay": None, "wise_ft_alpha": 1.0,
             "checkpoints": {"every": None, "best": "sts_spearman", "total_limit": 2},
             "false_negatives": {"mask_duplicates": False, "mask_margin": None, "mask_relative": None,
                                 "hard_negative_alpha": 0.0, "in_batch_alpha": 0.0},
             "teacher_model": None, "distill_weight": 0.5, "teacher_temperature": 1.0}
    lines = startup_lines(setup)
    assert "gradient clipping off; EMA off; WiSE-FT off (alpha 1)" in lines
    assert "false negatives: masks off; hardness weights off" in lines
    assert "teacher: the records' pos_scores / neg_scores, distillation weight 0.5 (teacher temperature 1)" in lines
    assert lines[-1] == ("outputs: runs/x/final, a checkpoint at each new best sts_spearman (--keep_best), the "
                         "newest 2 kept and the best, trackers: tensorboard")
    setup.update(checkpoints={"every": None, "best": None, "total_limit": None}, distill_weight=0.0,
                 teacher_model="bge-m3")
    lines = startup_lines(setup)
    assert "teacher: bge-m3, no score distillation (--distill_weight 0)" in lines
    assert lines[-1] == "outputs: runs/x/final, no checkpoints (--save_every 0), trackers: tensorboard"

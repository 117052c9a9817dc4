"""What a run ships is what it scored: EMA runs score the average, the start model is a candidate for the best,
pair classification is selected by mteb's main score, and WiSE-FT's final/ is scored as saved."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from modules.evaluation import DevSets, pair_classification_scores, sts_spearman
from modules.model import EmbeddingModel
from tests.conftest import REPO, write_jsonl
from tests.test_dev_eval import cranfield_local  # noqa: F401 (a fixture)
from tests.test_train_finetune import common_args, two_process_cmd


def dev_spearman(model_dir, sts_file):
    """sts_spearman of a saved model on the run's --eval_sts_file, as the run scores it (pair max length 16)."""
    model = EmbeddingModel.from_pretrained(model_dir)
    return float(sts_spearman(model, model.tokenizer, DevSets(sts_file).sts_pairs, 16))


def run(tiny_bert, tiny_data, output_dir, *extra):
    import train_finetune

    train_finetune.main(common_args(tiny_bert, tiny_data, output_dir, "--report_to", "none", "--num_workers", "0",
                                    "--eval_sts_file", str(tiny_data / "sts.jsonl"), *extra)[1:])
    return (json.loads((output_dir / name).read_text()) for name in ("train_summary.json", "eval_results.json"))


def test_an_ema_run_scores_and_selects_the_average_it_ships(tiny_bert, tiny_data, tmp_path):
    """Every dev score is of the moving average; final/ (the average at the best step) scores what was logged."""
    summary, results = run(tiny_bert, tiny_data, tmp_path, "--max_steps", "4", "--eval_every", "2", "--ema_decay",
                           "0.5", "--metric_for_best", "sts_spearman", "--final_is_best")
    best = summary["best"]["step"]
    scored = results["metrics_by_step"][str(best)]["sts_spearman"]
    assert scored == pytest.approx(dev_spearman(tmp_path / "final", tiny_data / "sts.jsonl"), abs=1e-6)
    assert summary["final_weights"]["step"] == best and summary["final_weights"]["ema_decay"] == 0.5


def test_ema_warms_up_and_reports_the_start_weights_share(tiny_bert, tiny_data, tmp_path, capsys):
    """d_t = min(decay, (1 + t) / (10 + t)): the start model's share after 4 steps is 1/10 x 2/11 x 3/12 x 4/13."""
    from modules.ema import WeightEMA

    layer = torch.nn.Linear(2, 1)
    ema = WeightEMA(type("Accelerator", (), {"distributed_type": "NO", "unwrap_model": staticmethod(lambda m: m)}),
                    layer, 0.999)
    expected = layer.weight.detach().clone()
    for step, value in enumerate((1.0, 2.0, 3.0, 4.0)):
        layer.weight.data.fill_(value)
        ema.update(step)
        decay = min(0.999, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * value
    assert torch.allclose(ema.average["weight"], expected)
    share = (1 / 10) * (2 / 11) * (3 / 12) * (4 / 13)  # 0.0014, where 0.999^4 would leave 0.996
    summary, _ = run(tiny_bert, tiny_data, tmp_path, "--max_steps", "4", "--ema_decay", "0.999")
    assert summary["final_weights"]["ema_start_share"] == pytest.approx(share)
    assert "final/ holds the exponential moving average (decay 0.999; the start model's share 0.0014)" in \
        capsys.readouterr().out


def test_ema_under_deepspeed_mixed_precision_is_refused(tiny_bert, tiny_data, tmp_path):
    """The engine's module holds bf16 copies of the fp32 masters: an average of those is not what final/ exports."""
    result = subprocess.run(two_process_cmd("deepspeed_zero1", "bf16") + common_args(
        tiny_bert, tiny_data, tmp_path, "--max_steps", "1", "--ema_decay", "0.9", "--report_to", "none"),
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "--ema_decay under DeepSpeed with mixed precision bf16" in result.stderr
    assert "Traceback" not in result.stderr.split("--ema_decay under DeepSpeed")[0][-2000:]


def test_a_start_model_that_scores_best_is_shipped_and_said(tiny_bert, tiny_data, tmp_path, monkeypatch, capsys):
    """--final_is_best when step 0 scores best: checkpoint-0 is kept, final/ holds the start weights, the run warns,
    and train_summary.json names step 0."""
    import modules.evaluation

    planned = iter([50.0, 20.0, 40.0, 30.0])
    monkeypatch.setattr(modules.evaluation, "sts_spearman", lambda *a, **k: next(planned))
    summary, _ = run(tiny_bert, tiny_data, tmp_path, "--max_steps", "6", "--eval_every", "2", "--metric_for_best",
                     "sts_spearman", "--final_is_best")
    assert "the start model (step 0) scored best on sts_spearman (50.00)" in capsys.readouterr().err
    assert summary["best"] == {"metric": "sts_spearman", "step": 0, "value": 50.0, "checkpoint": "checkpoint-0"}
    assert summary["final_weights"]["step"] == 0 and "best" in summary["final_weights"]["chosen_by"]
    assert (tmp_path / "checkpoint-0").is_dir()
    final = load_file(tmp_path / "final" / "model.safetensors")
    start = EmbeddingModel.from_pretrained(tiny_bert).state_dict()
    compared = [key for key in final if "pooler" not in key]
    assert compared and all(torch.equal(final[key], start[f"backbone.{key}"]) for key in compared)


def test_a_nan_metric_is_never_the_best(tiny_bert, tiny_data, tmp_path, monkeypatch):
    import modules.evaluation

    planned = iter([10.0, float("nan"), 20.0, float("nan")])
    monkeypatch.setattr(modules.evaluation, "sts_spearman", lambda *a, **k: next(planned))
    summary, _ = run(tiny_bert, tiny_data, tmp_path, "--max_steps", "6", "--eval_every", "2", "--metric_for_best",
                     "sts_spearman", "--keep_best")
    assert summary["best"]["step"] == 4
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-0", "checkpoint-4"]


def test_pair_classification_scores_are_mtebs(tmp_path):
    """Every score mteb computes for a PairClassification task (ties included), from the same embeddings."""
    from mteb.abstasks.pair_classification import AbsTaskPairClassification
    from sklearn.metrics.pairwise import paired_cosine_distances, paired_euclidean_distances, paired_manhattan_distances

    rng = np.random.default_rng(0)
    first = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(60, 8))), dim=-1)
    second = torch.nn.functional.normalize(first + torch.tensor(rng.normal(size=(60, 8))), dim=-1)
    second[10:20] = second[0]  # tied pairs
    first[10:20] = first[0]
    labels = [int(v) for v in rng.random(60) < 0.5]
    a, b = first.numpy(), second.numpy()
    distances = {"cosine_scores": (1 - paired_cosine_distances(a, b)).tolist(),
                 "manhattan_distances": paired_manhattan_distances(a, b).tolist(),
                 "euclidean_distances": paired_euclidean_distances(a, b).tolist(),
                 "dot_scores": (a * b).sum(-1).tolist(), "similarity_scores": (1 - paired_cosine_distances(a, b)).tolist()}
    expected = AbsTaskPairClassification._compute_metrics(object.__new__(AbsTaskPairClassification), distances, labels)
    ours = pair_classification_scores(first, second, labels)
    for name, value in expected.items():
        name = name.replace("similarity_", "cosine_")
        assert ours[name] == pytest.approx(100 * value, abs=1e-9), name


def test_pair_classification_dev_tasks_are_selected_by_mtebs_main_score(tmp_path):
    write_jsonl(tmp_path / "dev.jsonl", [{"text": "a", "text_pair": "b", "label": 1}])
    (tmp_path / "task.json").write_text(json.dumps({"name": "Pairs", "type": "PairClassification",
                                                    "splits": ["dev"]}))
    assert DevSets(task_dirs=[tmp_path]).metric_names() == ["Pairs/max_accuracy", "Pairs/max_ap"]


def test_wise_ft_final_is_scored_as_saved(tiny_bert, tiny_data, tmp_path):
    """With WiSE-FT no evaluated step holds final/'s weights: final/ itself is scored and reported."""
    summary, results = run(tiny_bert, tiny_data, tmp_path, "--max_steps", "3", "--wise_ft_alpha", "0.5")
    expected = dev_spearman(tmp_path / "final", tiny_data / "sts.jsonl")
    assert summary["final_scores"]["sts_spearman"] == pytest.approx(expected, abs=1e-6)
    assert results["final_scores"] == summary["final_scores"]
    assert results["metrics_by_step"]["3"]["sts_spearman"] != pytest.approx(expected, abs=1e-6)

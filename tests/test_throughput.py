"""Model FLOPs and MFU from real tokens: the parameter count and attention term written out for the tiny BERT, and
runs of both scripts logging them."""

import json
import sys

import pytest
import torch

from modules.model import EmbeddingModel
from modules.throughput import FlopCounter, SpeedMeter, peak_tflops, speed_metrics
from tests.conftest import run_script
from tests.test_train_pretrain import script_args


D, FF, LAYERS = 32, 64, 2  # conftest.save_tiny_bert
PER_LAYER = 4 * (D * D + D) + (D * FF + FF) + (FF * D + D) + 2 * (2 * D)  # Q K V O, FFN, two LayerNorms
BACKBONE = LAYERS * PER_LAYER + 2 * D  # + the embeddings' LayerNorm; no tables, no pooler


def test_flops_count_real_tokens_matmul_parameters_and_attention(tiny_bert):
    model = EmbeddingModel.from_pretrained(tiny_bert)
    counter = FlopCounter(model)
    assert counter.matmul_params == BACKBONE
    masks = [torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]), torch.tensor([[1, 1, 0]])]
    real, squares = 3 + 5 + 2, 9 + 25 + 4  # padding counts for nothing
    expected = 3 * (2 * counter.matmul_params * real + 4 * LAYERS * D * squares)
    assert counter.of_masks(masks) == pytest.approx(expected)
    assert FlopCounter(model, passes=4).of_masks(masks) == pytest.approx(expected * 4 / 3)


def test_the_scaling_layer_counts_once_a_sequence(tiny_bert):
    """Piccolo2's ScalingLayer maps each pooled embedding (32 -> 48 here): one multiply-add per weight a text."""
    model = EmbeddingModel.from_pretrained(tiny_bert, scaling_dim=48)
    masks = [torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]), torch.tensor([[1, 1, 0]])]
    real, squares, texts = 3 + 5 + 2, 9 + 25 + 4, 3
    scaling = D * 48 + 48
    expected = 3 * (2 * BACKBONE * real + 2 * scaling * texts + 4 * LAYERS * D * squares)
    assert FlopCounter(model).of_masks(masks) == pytest.approx(expected)
    model.scaling_layer.requires_grad_(False)  # frozen: its forward and input gradient only
    assert FlopCounter(model).of_masks(masks) == pytest.approx(expected - 2 * scaling * texts)


def test_frozen_weights_cost_no_weight_gradient(tiny_bert):
    """LoRA's frozen base: forward and the gradient to its inputs (2 of 3 passes), not a gradient of its own."""
    model = EmbeddingModel.from_pretrained(tiny_bert)
    masks = [torch.tensor([[1, 1, 1, 1]])]
    whole = FlopCounter(model)
    frozen = 0
    for name, parameter in model.named_parameters():
        if "encoder.layer.0." in name:
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    attention = 3 * 4 * 2 * 32 * 16
    saved = 2 * frozen * 4  # one pass of 2 x frozen parameters per real token
    assert FlopCounter(model).of_masks(masks) == pytest.approx(whole.of_masks(masks) - saved)
    assert whole.of_masks(masks) - attention == pytest.approx(3 * 2 * whole.matmul_params * 4)


def test_mfu_divides_by_the_peak_of_every_process():
    window = {"pairs": 64, "tokens": 2000, "flops": 4e12, "seconds": 2.0}
    metrics = speed_metrics(window, processes=2, peak=10.0)
    assert metrics["tflops"] == pytest.approx(2.0) and metrics["mfu"] == pytest.approx(0.1)
    assert "mfu" not in speed_metrics(window, processes=1, peak=None)
    assert peak_tflops(None, torch.device("cpu")) is None and peak_tflops(50.0, torch.device("cpu")) == 50.0


def test_speed_meter_leaves_the_first_step_out_of_the_run_and_counts_every_process(tiny_bert):
    counter = FlopCounter(EmbeddingModel.from_pretrained(tiny_bert))
    batch = {"query": {"input_ids": torch.ones(2, 3), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])},
             "passage": {"input_ids": torch.ones(2, 4), "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])}}
    meter = SpeedMeter(counter, processes=2, peak=None)
    meter.add_batches([batch, batch])  # step 1 (warm-up), two micro-batches
    meter.add_step(5.0)
    meter.add_batches([batch])
    meter.add_step(1.0)
    window = meter.window_metrics()
    assert window["pairs_per_s"] == 3 * 2 * 2 / 6.0 and window["tokens_per_s"] == 3 * 10 * 2 / 6.0
    run = meter.run_figures(torch.device("cpu"))
    assert (run["timed_steps"], run["pairs"], run["tokens"], run["seconds"]) == (1, 4, 20, 1.0)
    assert run["flops"] == pytest.approx(2 * counter.of_batch(batch)) and "mfu" not in run
    assert meter.window_metrics() == {"pairs_per_s": None}  # a new window


def test_a_shared_retrieval_batch_is_one_batch_of_pairs_but_work_on_every_process(tiny_bert):
    """CBB: the retrieval part holds the same queries on every process (its pairs count once), the other kinds are
    sliced (each process's count); tokens and FLOPs are computed on every process, so they count on every one."""
    counter = FlopCounter(EmbeddingModel.from_pretrained(tiny_bert))
    retrieval = {"kind": "retri_contrast",
                 "query": {"input_ids": torch.ones(2, 3), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])},
                 "passage": {"input_ids": torch.ones(4, 2), "attention_mask": torch.tensor([[1, 1], [1, 0], [1, 1],
                                                                                            [1, 1]])}}
    sts = {"kind": "cosent", "pair": {"input_ids": torch.ones(6, 2), "attention_mask": torch.ones(6, 2)}}
    meter = SpeedMeter(counter, processes=4, peak=None, shared_kinds=("retri_contrast",))
    meter.add_batches([retrieval, sts])
    meter.add_step(2.0)
    assert meter.window_metrics()["pairs_per_s"] == (2 + 3 * 4) / 2.0  # 2 shared queries once, 3 STS pairs a process
    meter.add_batches([retrieval, sts])
    meter.add_step(1.0)
    run = meter.run_figures(torch.device("cpu"))
    assert (run["pairs"], run["tokens"]) == (2 + 3 * 4, (5 + 7 + 12) * 4)
    assert run["flops"] == pytest.approx(4 * (counter.of_batch(retrieval) + counter.of_batch(sts)))


def test_both_scripts_log_model_tflops_and_mfu(tiny_bert, tiny_data, pair_data, tmp_path):
    """In the log every window; in train_summary.json over the timed steps, with the peak memory (bench/gpu_check
    reads it there)."""
    from tests.test_train_finetune import common_args

    for name, args in (("ft", common_args(tiny_bert, tiny_data, tmp_path / "ft", "--max_steps", "3")),
                       ("pt", script_args(tiny_bert, pair_data, tmp_path / "pt", "--max_steps", "3"))):
        log = run_script([sys.executable, *args, "--peak_tflops", "0.5"]).stderr
        step = [line for line in log.splitlines() if line.startswith("step 3/3")][0]
        assert " tflops " in step and " mfu " in step, step
        mfu = float(step.split(" mfu ")[1].split()[0])
        assert 0 < mfu < 1
        summary = json.loads((tmp_path / name / "train_summary.json").read_text())
        assert summary["timed_steps"] == 2 and summary["tokens"] > 0 and summary["flops"] > 0
        assert summary["tokens_per_s"] == summary["tokens"] / summary["seconds"]
        assert summary["mfu"] == summary["flops"] / summary["seconds"] / 1e12 / 0.5
        assert summary["peak_memory_of"] == "process resident set" and summary["peak_memory_mb"] > 50

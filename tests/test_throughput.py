"""Model FLOPs and MFU from real tokens: the parameter count and attention term written out for the tiny BERT, and
runs of both scripts logging them."""

import sys

import pytest
import torch

from modules.model import EmbeddingModel
from modules.throughput import FlopCounter, peak_tflops, speed_metrics
from tests.conftest import run_script
from tests.test_train_pretrain import script_args


def test_flops_count_real_tokens_matmul_parameters_and_attention(tiny_bert):
    model = EmbeddingModel.from_pretrained(tiny_bert)
    d, ff, layers = 32, 64, 2  # conftest.save_tiny_bert
    per_layer = 4 * (d * d + d) + (d * ff + ff) + (ff * d + d) + 2 * (2 * d)  # Q K V O, FFN, two LayerNorms
    counter = FlopCounter(model)
    assert counter.matmul_params == layers * per_layer + 2 * d  # + the embeddings' LayerNorm; no tables, no pooler
    masks = [torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]), torch.tensor([[1, 1, 0]])]
    real, squares = 3 + 5 + 2, 9 + 25 + 4  # padding counts for nothing
    expected = 3 * (2 * counter.matmul_params * real + 4 * layers * d * squares)
    assert counter.of_masks(masks) == pytest.approx(expected)
    assert FlopCounter(model, passes=4).of_masks(masks) == pytest.approx(expected * 4 / 3)


def test_mfu_divides_by_the_peak_of_every_process():
    window = {"pairs": 64, "tokens": 2000, "flops": 4e12, "seconds": 2.0}
    metrics = speed_metrics(window, processes=2, peak=10.0)
    assert metrics["tflops"] == pytest.approx(2.0) and metrics["mfu"] == pytest.approx(0.1)
    assert "mfu" not in speed_metrics(window, processes=1, peak=None)
    assert peak_tflops(None, torch.device("cpu")) is None and peak_tflops(50.0, torch.device("cpu")) == 50.0


def test_both_scripts_log_model_tflops_and_mfu(tiny_bert, tiny_data, pair_data, tmp_path):
    from tests.test_train_finetune import common_args

    for args in (common_args(tiny_bert, tiny_data, tmp_path / "ft", "--max_steps", "3"),
                 script_args(tiny_bert, pair_data, tmp_path / "pt", "--max_steps", "3")):
        log = run_script([sys.executable, *args, "--peak_tflops", "0.5"]).stderr
        step = [line for line in log.splitlines() if line.startswith("step 3/3")][0]
        assert " tflops " in step and " mfu " in step, step
        mfu = float(step.split(" mfu ")[1].split()[0])
        assert 0 < mfu < 1

"""tools/merge_checkpoints.py: mean, weighted mean and slerp of model directories and checkpoints, against direct
computations; models of another layout refused."""

import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from modules.merging import slerp
from tests.conftest import REPO, run_script, save_tiny_bert
from tests.test_train_finetune import common_args


@pytest.fixture(scope="module")
def two_runs(tiny_bert, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for seed in ("1", "2"):
        run_script([sys.executable, *common_args(tiny_bert, tiny_data, root / seed, "--max_steps", "2", "--save_every",
                                                 "2", "--scaling_dim", "24", "--seed", seed)])
    return root


def merge(*args):
    return subprocess.run([sys.executable, "tools/merge_checkpoints.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def weights(model_dir):
    return {f"{path.relative_to(model_dir)}:{key}": value for path in sorted(model_dir.rglob("*.safetensors"))
            for key, value in load_file(path).items()}


def test_weighted_mean_of_two_final_models_and_a_checkpoint(two_runs, tmp_path):
    a, b = two_runs / "1" / "final", two_runs / "2" / "final"
    result = merge(a, b, two_runs / "2" / "checkpoint-2", "--weights", "1,2,1", "--output", tmp_path / "soup")
    assert result.returncode == 0, result.stderr[-3000:]
    first, second, merged = weights(a), weights(b), weights(tmp_path / "soup")
    assert merged.keys() == first.keys() and any("2_Dense" in key for key in merged)  # the ScalingLayer too
    for key, value in merged.items():
        if value.is_floating_point():  # the checkpoint exports as run 2's final/
            expected = (first[key].double() + 3 * second[key].double()) / 4
            assert torch.allclose(value.double(), expected, atol=1e-6), key
    assert not torch.equal(first[next(iter(first))], second[next(iter(first))])
    from sentence_transformers import SentenceTransformer

    embedding = SentenceTransformer(str(tmp_path / "soup"), device="cpu").encode(["a merged model"])
    assert embedding.shape == (1, 24)
    assert "| 1 |" in (tmp_path / "soup" / "README.md").read_text()


def test_slerp_of_two_models_follows_the_arc(two_runs, tmp_path):
    a, b = two_runs / "1" / "final", two_runs / "2" / "final"
    result = merge(a, b, "--method", "slerp", "--weights", "3,1", "--output", tmp_path / "slerp")
    assert result.returncode == 0, result.stderr[-3000:]
    first, second, merged = weights(a), weights(b), weights(tmp_path / "slerp")
    key = next(k for k, v in first.items() if v.is_floating_point() and v.dim() == 2)
    x, y = first[key].double().flatten(), second[key].double().flatten()
    theta = math.acos(float(x @ y / (x.norm() * y.norm())))
    t = 0.25
    direction = (math.sin((1 - t) * theta) * x / x.norm() + math.sin(t * theta) * y / y.norm()) / math.sin(theta)
    expected = (0.75 * x.norm() + 0.25 * y.norm()) * direction / direction.norm()
    assert torch.allclose(merged[key].double().flatten(), expected, atol=1e-6)


def test_slerp_endpoints_and_parallel_tensors():
    a, b = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    assert torch.allclose(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b)
    assert torch.allclose(slerp(a, 2 * a, 0.5), 1.5 * a)


@pytest.mark.parametrize("args, message", [
    (["--method", "slerp", "--weights", "1,1,1"], "--method slerp merges exactly two models"),
    (["--weights", "1"], "--weights: one number >= 0 per model"),
    (["--weights", "0,0"], "--weights: one number >= 0 per model"),
])
def test_bad_merges_are_one_line(two_runs, tmp_path, args, message):
    models = [two_runs / "1" / "final", two_runs / "2" / "final"]
    if "1,1,1" in args:
        models.append(two_runs / "2" / "final")
    result = merge(*models, *args, "--output", tmp_path / "out")
    assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1], result.stderr


def test_models_of_another_shape_are_refused(two_runs, tmp_path):
    other = save_tiny_bert(tmp_path / "other", type_vocab_size=4)  # another token-type table
    result = merge(two_runs / "1" / "final", other, "--output", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "2_Dense/model.safetensors" in result.stderr or "differ" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()

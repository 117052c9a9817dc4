"""bench/gpu_check.sh --smoke: every part of the GPU check runs on CPU at tiny sizes, so it still works the day a GPU
is lent (its figures are not checked here, only that each run trained, saved, resumed and exported)."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    work = tmp_path_factory.mktemp("gpu_check")
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--smoke", "--work_dir", str(work)],
                            cwd=REPO, capture_output=True, text=True, timeout=1200,
                            env=dict(os.environ, PYTHON=sys.executable))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), work


def test_smoke_prints_every_part_and_no_failure(smoke):
    report, _ = smoke
    assert report["smoke"] is True and report["failed"] == []
    assert set(report) >= {"encoder", "gradcache", "lora", "distributed", "seconds"}


def test_encoder_runs_padded_bucketed_and_padding_free_with_mfu(smoke):
    encoder = smoke[0]["encoder"]
    assert encoder["padding_free_attention"] == "sdpa_varlen"  # no flash-attn on CPU
    for variant in ("padded", "length_buckets", "padding_free"):
        figures = encoder[variant]
        assert figures["tokens_per_s"] > 0 and 0 < figures["mfu"] < 1 and figures["peak_memory_mb"] > 0, variant


def test_gradcache_and_the_plain_batch_search(smoke, tmp_path):
    gradcache = smoke[0]["gradcache"]
    assert gradcache["gradcache"]["batch"] == 32 and gradcache["gradcache"]["pairs_per_s"] > 0
    assert gradcache["plain_largest"]["batch"] == 32  # no memory limit on CPU: doubled 8, 16, 32 up to the cached batch
    runs = sorted(p.name for p in (smoke[1] / "gradcache").iterdir())
    assert runs == ["cached", "plain16", "plain32", "plain8"]


def test_lora_plain_checkpointed_and_padding_free(smoke):
    lora = smoke[0]["lora"]
    for variant in ("plain", "gradient_checkpointing", "padding_free"):
        assert lora[variant]["tokens_per_s"] > 0, variant
    summary = json.loads((smoke[1] / "lora" / "padding_free" / "train_summary.json").read_text())
    assert summary["steps"] == 3


def test_zero_runs_resume_to_the_same_weights_and_fsdp_says_why_it_did_not_run(smoke):
    distributed = smoke[0]["distributed"]
    assert distributed["fsdp_encoder"] == {"skipped": "accelerate's FSDP needs a GPU"}
    assert distributed["fsdp_llm"] == {"skipped": "accelerate's FSDP needs a GPU"}
    for stage in ("zero2_llm", "zero3_llm"):
        run = distributed[stage]
        assert run["resume_max_abs_diff"] == 0.0, (stage, run)
        assert "final/model.safetensors" in run["final_files"] and run["embedding_dim"] == 32
        assert run["checkpoint_files"] > 2


def test_without_a_gpu_the_full_check_refuses_in_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the refusal is for machines without one")
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--parts", "encoder"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "bench/gpu_check.py: no GPU here; run it with --smoke for the CPU check"

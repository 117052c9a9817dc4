"""train_pretrain.py: loss falls, exact resume mid-stream, 2 DDP processes with GradCache, DeepSpeed refused."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from modules.gradcache import cached_loss_backward
from modules.losses import InBatchInfoNCE
from modules.model import EmbeddingModel
from modules.streaming import PairSource, PretrainBatches
from tests.conftest import REPO, accelerate_cmd, run_script


def test_a_few_cached_steps_lower_the_loss(tiny_bert, pair_data):
    model = EmbeddingModel.from_pretrained(tiny_bert)
    source = PairSource("a", [pair_data / "stsb_a.jsonl"], 1.0)
    stream = iter(PretrainBatches([source], 32, model.tokenizer, {"query": 32, "passage": 32}, seed=0))
    batches = [next(stream) for _ in range(4)]
    loss_fn = InBatchInfoNCE(0.05, symmetric=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def held_out_loss():
        model.eval()
        with torch.no_grad():
            return sum(loss_fn(model(**b["query"]), model(**b["passage"])).item() for b in batches[2:])

    before = held_out_loss()
    model.train()
    for _ in range(6):
        for batch in batches[:2]:
            cached_loss_backward(model, [batch["query"], batch["passage"]], loss_fn, mini_batch_size=8)
            optimizer.step()
            optimizer.zero_grad()
    assert held_out_loss() < 0.85 * before


def script_args(tiny_bert, pair_data, output_dir, *extra):
    return ["train_pretrain.py", "--model_name_or_path", str(tiny_bert), "--meta_list", str(pair_data / "meta.txt"),
            "--output_dir", str(output_dir), "--batch_size", "8", "--mini_batch_size", "3", "--query_max_len", "24",
            "--passage_max_len", "24", "--shuffle_chunk", "64", "--block_mb", "1", "--lr", "1e-3", "--warmup_steps", "1",
            "--log_every", "1", "--seed", "5", *extra]


def test_resume_mid_stream_reaches_the_same_weights(tiny_bert, pair_data, tmp_path):
    """Stopped at step 3 and resumed == never stopped (data position, dropout, optimizer, schedule)."""
    run_script([sys.executable, *script_args(tiny_bert, pair_data, tmp_path / "full", "--max_steps", "6",
                                             "--save_every", "3", "--symmetric", "--mrl_dims", "16,32")])
    state = json.loads((tmp_path / "full" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["process_states"][0]["step"] == 3
    resumed = run_script([sys.executable, *script_args(
        tiny_bert, pair_data, tmp_path / "resumed", "--max_steps", "6", "--symmetric", "--mrl_dims", "16,32",
        "--resume_from_checkpoint", str(tmp_path / "full" / "checkpoint-3"))])
    assert "resumed from" in resumed.stdout + resumed.stderr
    full = load_file(tmp_path / "full" / "final" / "model.safetensors")
    again = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert all(torch.equal(full[name], again[name]) for name in full)
    start = load_file(tiny_bert / "model.safetensors")
    assert not torch.equal(full["embeddings.word_embeddings.weight"], start["embeddings.word_embeddings.weight"])


def logged_scalars(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def test_two_processes_with_gradcache(tiny_bert_no_dropout, pair_data, tmp_path):
    """2 DDP processes with GradCache: each process saves its stream position, the logged loss is the mean
    of both processes' losses (the whole global batch's loss), and resuming with 1 process is refused."""
    from modules.matryoshka import matryoshka_from_flags
    from modules.streaming import read_pretrain_meta_list

    output = tmp_path / "ddp"
    run_script([*accelerate_cmd(2), *script_args(tiny_bert_no_dropout, pair_data, output, "--max_steps", "3",
                                                 "--save_every", "2", "--symmetric", "--mrl_dims", "16,32")],
               env_extra={"ACCELERATE_USE_CPU": "1"})
    state = json.loads((output / "checkpoint-2" / "trainer_state.json").read_text())
    positions = state["process_states"]
    assert len(positions) == 2 and positions[0]["step"] == positions[1]["step"] == 2
    assert (output / "final" / "model.safetensors").exists()

    model = EmbeddingModel.from_pretrained(tiny_bert_no_dropout)  # step 1's loss: the start weights, no dropout
    sources = read_pretrain_meta_list(pair_data / "meta.txt")
    first = [next(iter(PretrainBatches(sources, 8, model.tokenizer, {"query": 24, "passage": 24}, 5, rank, 2, 64,
                                       1 << 20))) for rank in (0, 1)]
    loss_fn = matryoshka_from_flags(InBatchInfoNCE(0.05, symmetric=True), "16,32", "", 32)
    with torch.no_grad():
        whole = loss_fn(*(torch.cat([model(**batch[side]) for batch in first]) for side in ("query", "passage")))
    assert logged_scalars(output / "pretrain", "loss")[1] == pytest.approx(whole.item(), abs=1e-5)

    result = subprocess.run([sys.executable, *script_args(tiny_bert_no_dropout, pair_data, output, "--max_steps", "4",
                                                          "--resume_from_checkpoint", "latest")],
                            cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 2 and "processes: 2 -> 1" in result.stderr, result.stderr[-2000:]


def test_gradcache_under_deepspeed_is_refused(tiny_bert, pair_data, tmp_path):
    command = [sys.executable.replace("python", "accelerate"), "launch", "--use_deepspeed", "--zero_stage", "2",
               "--num_processes", "1", *script_args(tiny_bert, pair_data, tmp_path / "ds", "--max_steps", "2")]
    with pytest.raises(AssertionError, match="does not work with DeepSpeed \\(this run: ZeRO-2\\)"):
        run_script(command)


def test_warmup_is_a_share_of_the_steps_and_sources_are_counted(tiny_bert, pair_data, tmp_path, capsys):
    """--warmup_ratio (10% by default) instead of a fixed 500 steps cut to --max_steps; the batches each source
    gave are printed and kept in train_summary.json."""
    import train_pretrain

    args = script_args(tiny_bert, pair_data, tmp_path, "--max_steps", "10", "--mini_batch_size", "0")[1:]
    del args[args.index("--warmup_steps"):args.index("--warmup_steps") + 2]
    train_pretrain.main(args)
    out = capsys.readouterr().out
    assert "steps: 10, warmup 1, batch 8 pairs per process / 8 global" in out
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["warmup_steps"] == 1 and sum(summary["source_batches"].values()) == 10
    counts = summary["source_batches"]
    assert set(counts) == {"stsb_a", "stsb_b"} and counts["stsb_a"] > counts["stsb_b"]  # weights 3 : 1
    assert f"batches per source: stsb_a {counts['stsb_a']} ({10 * counts['stsb_a']:.1f}%)" in out


def test_resuming_with_another_schedule_is_refused(tiny_bert, pair_data, tmp_path):
    """The restored scheduler keeps the saved step count and base lr: a new --max_steps would make the learning rate
    jump, not follow a new schedule."""
    import train_pretrain

    train_pretrain.main(script_args(tiny_bert, pair_data, tmp_path, "--max_steps", "2", "--save_every", "2")[1:])
    with pytest.raises(ValueError, match=r"another learning-rate schedule.*max_steps: 2 -> 4"):
        train_pretrain.main(script_args(tiny_bert, pair_data, tmp_path, "--max_steps", "4", "--resume_from_checkpoint",
                                        "latest")[1:])


def test_final_is_best_ships_the_best_steps_weights(tiny_bert, tiny_data, pair_data, tmp_path, monkeypatch):
    """--metric_for_best / --final_is_best in the pretraining loop: final/ holds the best step's checkpoint."""
    import modules.evaluation
    import train_pretrain

    planned = iter([10.0, 40.0, 20.0])  # steps 0 (start), 2 (best), 4
    monkeypatch.setattr(modules.evaluation, "sts_spearman", lambda *a, **k: next(planned))
    train_pretrain.main(script_args(tiny_bert, pair_data, tmp_path, "--max_steps", "4", "--eval_every", "2",
                                    "--eval_sts_file", str(tiny_data / "sts.jsonl"), "--metric_for_best",
                                    "sts_spearman", "--final_is_best", "--save_every", "2")[1:])
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["best"]["step"] == 2
    final = load_file(tmp_path / "final" / "model.safetensors")
    best = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    last = load_file(tmp_path / "checkpoint-4" / "model.safetensors")
    name = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(final[name], best[f"backbone.{name}"]) and not torch.equal(final[name], last[f"backbone.{name}"])

"""train_finetune.py end to end: loss falls, exact resume, DDP with 2 processes, DeepSpeed ZeRO-1."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from modules.collator import TaskCollator
from modules.data import load_meta_list
from modules.model import EmbeddingModel
from modules.samplers import TaskBatchSampler
from tests.conftest import REPO, accelerate_cmd, assert_same_final_weights, hybrid_loss_before_and_after, run_script

NEGATIVES = {"retri_contrast": 1, "cls_contrast": 2}


def common_args(tiny_bert, tiny_data, output_dir, *extra):
    return ["train_finetune.py", "--model_name_or_path", str(tiny_bert), "--meta_list", str(tiny_data / "meta.txt"),
            "--output_dir", str(output_dir), "--retri_batch_size", "4", "--cls_batch_size", "4",
            "--cosent_batch_size", "4", "--cls_negatives", "2", "--query_max_len", "16", "--passage_max_len", "16",
            "--pair_max_len", "16", "--lr", "1e-3", "--warmup_ratio", "0.2", "--log_every", "1", "--seed", "11", *extra]


def test_a_few_steps_lower_the_hybrid_loss(tiny_bert, tiny_data):
    torch.manual_seed(0)
    model = EmbeddingModel.from_pretrained(tiny_bert)
    datasets = load_meta_list(tiny_data / "meta.txt", negatives_per_kind=NEGATIVES)
    sampler = TaskBatchSampler([len(d) for d in datasets], [d.repeat for d in datasets], [8, 8, 8], seed=0)
    collator = TaskCollator(model.tokenizer, {"query": 16, "passage": 16, "pair": 16}, NEGATIVES)
    batches = [collator(datasets[d], indices, draw) for d, indices, draw in sampler.local_batches(0)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    before, after = hybrid_loss_before_and_after(model, batches, optimizer, passes=5)
    assert after < 0.7 * before


def test_hard_negatives_only_without_negatives_is_refused(tiny_bert, tiny_data, tmp_path, capsys):
    import train_finetune

    with pytest.raises(SystemExit) as stopped:
        train_finetune.parse_args(common_args(tiny_bert, tiny_data, tmp_path)[1:] + [
            "--retri_hard_negatives_only", "--retri_negatives", "0"])
    assert stopped.value.code == 2
    assert "--retri_hard_negatives_only needs --retri_negatives >= 1" in capsys.readouterr().err


def test_resume_reaches_the_same_weights(tiny_bert, tiny_data, tmp_path):
    """Stopped at step 3 (its checkpoint) and resumed == never stopped, at step 10, across an epoch's end."""
    eight = ["--retri_batch_size", "8", "--cls_batch_size", "8", "--cosent_batch_size", "8"]  # epochs of 8 batches
    run_script([sys.executable, *common_args(tiny_bert, tiny_data, tmp_path / "full", "--max_steps", "10",
                                             "--save_every", "3", *eight)])
    states = [json.loads((tmp_path / "full" / f"checkpoint-{n}" / "trainer_state.json").read_text()) for n in (3, 9)]
    assert [(s["global_step"], s["epoch"], s["batch_in_epoch"]) for s in states] == [(3, 0, 3), (9, 1, 1)]
    resumed = run_script([sys.executable, *common_args(tiny_bert, tiny_data, tmp_path / "resumed", "--max_steps", "10",
                                                       "--resume_from_checkpoint", str(tmp_path / "full" / "checkpoint-3"),
                                                       *eight)])
    assert "resumed from" in resumed.stdout + resumed.stderr
    full = assert_same_final_weights(tmp_path / "full", tmp_path / "resumed")
    start = EmbeddingModel.from_pretrained(tiny_bert).backbone.state_dict()
    assert any(not torch.equal(full[k], start[k]) for k in full if k in start)  # it trained


def test_resume_latest_ignores_an_unfinished_checkpoint(tiny_bert, tiny_data, tmp_path):
    out = tmp_path / "run"
    run_script([sys.executable, *common_args(tiny_bert, tiny_data, out, "--max_steps", "6", "--save_every", "2")])
    (out / "checkpoint-6" / "trainer_state.json").unlink()  # a save that crashed midway (named as a finished one)
    result = run_script([sys.executable, *common_args(tiny_bert, tiny_data, out, "--max_steps", "6", "--log_every", "3",
                                                "--resume_from_checkpoint", "latest")])
    assert "resumed from" in result.stdout + result.stderr and "checkpoint-4" in result.stdout + result.stderr
    config = json.loads((out / "run_config.json").read_text())
    assert config["args"]["log_every"] == 3 and (out / "meta.txt").exists()


def test_two_processes_reach_the_weights_of_one_process_on_the_same_global_batch(tiny_bert_no_dropout, tiny_data,
                                                                                 tmp_path):
    """DDP over 2 processes (4 rows each, negatives and CoSENT pairs gathered) == 1 process with batches of 8."""
    steps = ["--max_steps", "4", "--lr", "1e-3"]
    run_script([sys.executable, *common_args(tiny_bert_no_dropout, tiny_data, tmp_path / "one", *steps,
                                             "--retri_batch_size", "8", "--cls_batch_size", "8",
                                             "--cosent_batch_size", "8")])
    run_script([*two_process_cmd("ddp"), *common_args(tiny_bert_no_dropout, tiny_data, tmp_path / "two", *steps)],
               env_extra=CPU_ENV["ddp"])
    trained = assert_same_final_weights(tmp_path / "one", tmp_path / "two", exact=False)
    start = EmbeddingModel.from_pretrained(tiny_bert_no_dropout).backbone.state_dict()
    name = "encoder.layer.0.attention.self.query.weight"
    assert (trained[name] - start[name]).abs().max() > 1e-3  # it trained, well above the tolerance


def two_process_cmd(launcher, mixed_precision="no"):
    return accelerate_cmd(config_file=REPO / "launch" / f"{launcher}.yaml") + [
        "--num_processes", "2", "--mixed_precision", mixed_precision, "--main_process_port", "0"]


# DeepSpeed runs on CPU without ACCELERATE_USE_CPU (which would silently drop it); DDP needs it
CPU_ENV = {"ddp": {"ACCELERATE_USE_CPU": "1"}}


@pytest.mark.parametrize("launcher", ["ddp", "deepspeed_zero1", "deepspeed_zero3_llm"])
def test_two_process_run(tiny_bert, tiny_data, tmp_path, launcher):
    """2 CPU processes (gloo) under DDP, and DeepSpeed ZeRO-1 and ZeRO-3 in bf16: trains, logs, saves a
    loadable model; under DeepSpeed final/ holds the fp32 master weights, not the engine's bf16 copy."""
    from sentence_transformers import SentenceTransformer

    deepspeed = launcher.startswith("deepspeed")
    extra = ["--gradient_checkpointing", "--mrl_dims", "8,16,32"] if launcher == "ddp" else ["--scaling_dim", "24"]
    result = run_script(two_process_cmd(launcher, "bf16" if deepspeed else "no")
                        + common_args(tiny_bert, tiny_data, tmp_path, "--max_steps", "4", "--save_every", "2",
                                      "--eval_sts_file", str(tiny_data / "sts.jsonl"), *extra),
                        env_extra=CPU_ENV.get(launcher))
    assert "dev Spearman: step 0" in result.stdout
    assert ("Matryoshka dims: [8, 16, 32]" in result.stdout) == (launcher == "ddp")
    checkpoint_files = [p.name for p in (tmp_path / "checkpoint-4").rglob("*")]
    assert "trainer_state.json" in checkpoint_files and "random_states_1.pkl" in checkpoint_files
    if deepspeed:  # DeepSpeed's own engine wrote the optimizer shards
        assert any("zero_pp_rank_1" in name for name in checkpoint_files), checkpoint_files
    assert list((tmp_path / "finetune").glob("events.out.tfevents*"))  # tensorboard logs
    model = SentenceTransformer(str(tmp_path / "final"), device="cpu")
    assert model.encode(["hello world"]).shape == (1, 24 if deepspeed else 32)
    weights = load_file(tmp_path / "final" / "model.safetensors")
    start = EmbeddingModel.from_pretrained(tiny_bert).backbone.state_dict()
    for name in ("encoder.layer.0.attention.self.query.weight", "encoder.layer.1.output.dense.weight"):
        trained = weights[name]
        assert trained.dtype == torch.float32 and not torch.equal(trained, start[name])
        if deepspeed:  # master weights carry more than bf16's 8 bits: most differ from their bf16 rounding
            assert (trained != trained.bfloat16().float()).float().mean() > 0.9, name


def test_deepspeed_clips_at_max_grad_norm_like_ddp(tiny_bert, tiny_data, tmp_path):
    """--max_grad_norm reaches DeepSpeed's engine (its config said "auto", which became 1.0): at a norm of
    1e-9, DeepSpeed ZeRO-1 and DDP end at the same weights."""
    finals = {}
    for launcher in ("ddp", "deepspeed_zero1"):
        run_script(two_process_cmd(launcher) + common_args(tiny_bert, tiny_data, tmp_path / launcher, "--max_steps",
                                                            "3", "--max_grad_norm", "1e-9", "--warmup_ratio", "0"),
                   env_extra=CPU_ENV.get(launcher))
        finals[launcher] = load_file(tmp_path / launcher / "final" / "model.safetensors")
    start = EmbeddingModel.from_pretrained(tiny_bert).backbone.state_dict()
    name = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(finals["ddp"][name], start[name])
    for key, value in finals["ddp"].items():
        assert torch.allclose(value, finals["deepspeed_zero1"][key], atol=1e-7, rtol=1e-5), key


@pytest.mark.parametrize("buckets", [4, "auto"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_length_buckets_give_the_same_embeddings_and_gradients(tiny_bert, padding_side, buckets):
    from modules.forward import embed
    from tests.conftest import SENTENCES

    if padding_side == "right":
        model = EmbeddingModel.from_pretrained(tiny_bert)
    else:  # left padding is for decoders (RoPE is shift-invariant; BERT's absolute positions are not)
        from transformers import AutoTokenizer, LlamaConfig, LlamaModel

        torch.manual_seed(0)
        tokenizer = AutoTokenizer.from_pretrained(tiny_bert, padding_side="left")
        config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
        model = EmbeddingModel(LlamaModel(config), tokenizer, pooling="lasttoken")
    model.eval()
    texts = [s * (1 + i % 3) for i, s in enumerate(SENTENCES)]  # varied lengths
    tokens = dict(model.tokenizer(texts, padding=True, return_tensors="pt"))
    plain = embed(model, tokens, length_buckets=1)
    plain.square().sum().backward()
    plain_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    bucketed = embed(model, tokens, length_buckets=buckets, split_tokens=8)
    bucketed.square().sum().backward()
    assert torch.allclose(plain, bucketed, atol=1e-5)
    for g1, g2 in zip(plain_grads, [p.grad for p in model.parameters() if p.grad is not None]):
        assert torch.allclose(g1, g2, atol=1e-4)


def test_a_single_task_run_does_not_depend_on_its_absolute_loss_weight(tiny_bert, tiny_data, tmp_path):
    """CoSENT alone at weight 0.04 (Piccolo's relative weight) trains exactly as at weight 1: the scale would
    otherwise only change how often gradient clipping acts (the tiny model's gradient norms are ~25: clipped
    at 5 with weight 1, not with 0.04)."""
    (tmp_path / "meta.txt").write_text(f"{tiny_data / 'sts.jsonl'} 1 type=cosent\n")
    for weight in ("0.04", "1.0"):
        run_script([sys.executable, *common_args(tiny_bert, tiny_data, tmp_path / weight, "--meta_list",
                                                 str(tmp_path / "meta.txt"), "--max_steps", "3", "--cosent_weight",
                                                 weight, "--max_grad_norm", "5")])
    assert_same_final_weights(tmp_path / "0.04", tmp_path / "1.0")

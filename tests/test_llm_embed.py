"""train_llm_embed.py and modules/llm.py on tiny random Qwen2 and Llama decoders (no download)."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from modules.cli import DataError
from modules.collator import TaskCollator
from modules.data import load_meta_list
from modules.flags import DEFAULT_LORA_TARGETS
from modules.llm import LLMEmbeddingModel, LLMSetupError, append_eos
from modules.samplers import TaskBatchSampler
from tests.conftest import REPO, SENTENCES, accelerate_cmd, hybrid_loss_before_and_after, run_script
from tools.random_model import trained_bpe

NEGATIVES = {"retri_contrast": 1, "cls_contrast": 2}
TEXTS = [s * (1 + i % 3) for i, s in enumerate(SENTENCES[:7])] + ["a dog"]  # varied lengths


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: a second intra-op thread only waits (600x slower per Linear on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_decoders(tmp_path_factory):
    """{"qwen2": dir, "llama": dir}: 2-layer 32-d random decoders with their own tokenizer classes.

    Qwen2: byte-level BPE, EOS = pad = <|endoftext|>, no BOS. Llama: metaspace BPE, BOS added, no pad token.
    """
    from tokenizers import pre_tokenizers
    from transformers import LlamaConfig, LlamaModel, LlamaTokenizer, Qwen2Config, Qwen2Model, Qwen2Tokenizer

    torch.manual_seed(0)
    paths = {}
    corpus = SENTENCES * 3 + ["one today category 0 1 2 3 , ."]  # the test sentences and the words of tiny_data
    qwen_tokenizer = Qwen2Tokenizer(*trained_bpe(corpus, pre_tokenizers.ByteLevel(add_prefix_space=False),
                                                 ["<|endoftext|>"]))
    llama_tokenizer = LlamaTokenizer(*trained_bpe(corpus, pre_tokenizers.Metaspace(), ["<unk>", "<s>", "</s>"]),
                                     add_bos_token=True)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128)
    for name, tokenizer, config_class, model_class in [("qwen2", qwen_tokenizer, Qwen2Config, Qwen2Model),
                                                       ("llama", llama_tokenizer, LlamaConfig, LlamaModel)]:
        paths[name] = tmp_path_factory.mktemp(name)
        model_class(config_class(vocab_size=len(tokenizer), **shape)).save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


def lora_config(r=4):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=DEFAULT_LORA_TARGETS.split(","),
                      task_type="FEATURE_EXTRACTION")


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tokenizer_ends_every_row_with_eos_after_truncation_and_pads_left(tiny_decoders, arch, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = append_eos(AutoTokenizer.from_pretrained(tiny_decoders[arch]))
    tokens = tokenizer(TEXTS, padding=True, truncation=True, max_length=12, return_tensors="pt")
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    assert ids.size(1) == 12 and (mask.sum(1) < 12).any()  # some rows truncated, some padded
    assert (ids[:, -1] == tokenizer.eos_token_id).all() and mask[:, -1].all()  # EOS last, padding on the left
    first_real = mask.argmax(1)
    if arch == "llama":  # the BOS the tokenizer already added is kept
        assert (ids[torch.arange(len(TEXTS)), first_real] == tokenizer.bos_token_id).all()
    tokenizer.save_pretrained(tmp_path)  # what the saved model (and sentence-transformers) will use
    again = AutoTokenizer.from_pretrained(tmp_path)(TEXTS, padding=True, truncation=True, max_length=12,
                                                    return_tensors="pt")
    assert torch.equal(again["input_ids"], ids) and torch.equal(again["attention_mask"], mask)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_a_tokenizer_saved_before_any_call_still_pads_left(tiny_decoders, arch, tmp_path):
    """With DataLoader workers the main process never tokenizes before final/ is saved: the saved tokenizer must
    pad left all the same (Qwen2's reloaded as right-padding)."""
    from transformers import AutoTokenizer

    append_eos(AutoTokenizer.from_pretrained(tiny_decoders[arch])).save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).padding_side == "left"


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_last_token_pooling_reads_the_eos_state(tiny_decoders, arch):
    model = LLMEmbeddingModel.from_pretrained(tiny_decoders[arch]).eval()
    tokens = model.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        embeddings = model(**tokens)
        hidden = model.backbone(**tokens).last_hidden_state
        last = [max(i for i in range(tokens["attention_mask"].size(1)) if tokens["attention_mask"][row, i])
                for row in range(len(TEXTS))]  # each row's last real position, found by hand
        assert all(tokens["input_ids"][row, i] == model.tokenizer.eos_token_id for row, i in enumerate(last))
        assert torch.equal(embeddings, hidden[torch.arange(len(TEXTS)), last])
        alone = torch.cat([model(**model.tokenizer([text], return_tensors="pt")) for text in TEXTS])
        assert torch.allclose(embeddings, alone, atol=1e-5)  # left padding changes nothing (RoPE is relative)
        model.pooling = "mean"
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        assert torch.allclose(model(**tokens), (hidden * mask).sum(1) / mask.sum(1), atol=1e-6)


@pytest.fixture(scope="module")
def trained_lora(tiny_decoders, tiny_data):
    """A LoRA Qwen2 with a ScalingLayer after 10 passes over an epoch of batches, and its losses."""
    torch.manual_seed(0)
    model = LLMEmbeddingModel.from_pretrained(tiny_decoders["qwen2"], scaling_dim=48, lora=lora_config(),
                                              gradient_checkpointing=True)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    datasets = load_meta_list(tiny_data / "meta.txt", negatives_per_kind=NEGATIVES)
    sampler = TaskBatchSampler([len(d) for d in datasets], [d.repeat for d in datasets], [8, 8, 8], seed=0)
    collator = TaskCollator(model.tokenizer, {"query": 48, "passage": 16, "pair": 16}, NEGATIVES,
                            query_prefix={"retri": "Instruct: find a caption\nQuery: "})
    batches = [collator(datasets[d], indices, draw) for d, indices, draw in sampler.local_batches(0)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before, after = hybrid_loss_before_and_after(model, batches, optimizer, passes=10)
    return model.eval(), start, before, after


def test_lora_trains_only_the_adapter_and_the_scaling_layer(trained_lora):
    model, start, before, after = trained_lora
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n or n.startswith("scaling_layer.") for n in trainable)
    assert {n.split(".")[-4] for n in trainable if "lora_" in n} == set(DEFAULT_LORA_TARGETS.split(","))
    assert after < 0.8 * before
    for name, value in model.state_dict().items():
        assert torch.equal(value, start[name]) == (name not in trainable), name


def test_saving_leaves_the_trained_model_as_it_was(trained_lora, tmp_path):
    """The export merges the adapter into copies of the base weights: peft 0.22 merges into the tensors it is given,
    which were the live model's (anything run on the model after a save counted the adapter twice)."""
    model = trained_lora[0]
    before = {name: value.clone() for name, value in model.state_dict().items()}
    embeddings = model.encode(TEXTS)
    model.save_pretrained(tmp_path)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert [name for name in before if not torch.equal(before[name], after[name])] == []
    assert torch.equal(model.encode(TEXTS), embeddings)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft, loading the adapter
def test_merged_export_embeds_like_the_trained_model(trained_lora, tiny_decoders, tmp_path):
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    model = trained_lora[0]
    model.prompts = {"query": "Instruct: find\nQuery: ", "retri": "Instruct: find a caption\nQuery: "}
    model.save_pretrained(tmp_path)
    loaded = SentenceTransformer(str(tmp_path), device="cpu")
    assert json.loads((tmp_path / "1_Pooling" / "config.json").read_text())["pooling_mode"] == "lasttoken"
    assert loaded.encode(["x"]).shape == (1, 48)  # 2_Dense
    expected = model.encode(TEXTS)
    assert torch.allclose(torch.from_numpy(loaded.encode(TEXTS)), expected, atol=1e-5)
    for name, prompt in model.prompts.items():
        assert torch.allclose(torch.from_numpy(loaded.encode(TEXTS, prompt_name=name)),
                              model.encode([prompt + t for t in TEXTS]), atol=1e-5)
    # the adapter alone, on the untouched base model, gives the trained backbone
    adapted = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_decoders["qwen2"]), tmp_path / "adapter").eval()
    tokens = model.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(adapted(**tokens).last_hidden_state, model.backbone(**tokens).last_hidden_state,
                              atol=1e-5)


def script_args(tiny_decoders, tiny_data, output_dir, *extra):
    return ["--model_name_or_path", str(tiny_decoders["llama"]), "--meta_list", str(tiny_data / "meta.txt"),
            "--output_dir", str(output_dir), "--retri_batch_size", "4", "--cls_batch_size", "4",
            "--cosent_batch_size", "4", "--cls_negatives", "2", "--query_max_len", "16", "--passage_max_len", "24",
            "--pair_max_len", "16", "--lr", "5e-3", "--warmup_ratio", "0.2", "--log_every", "1", "--seed", "11",
            "--num_workers", "0", "--lora_r", "4", "--lora_alpha", "8", *extra]


def test_script_saves_rope_and_prompts_and_resumes_exactly(tiny_decoders, tiny_data, tmp_path, capsys, monkeypatch):
    """Stopped at step 3 and resumed == never stopped at step 7; the export carries RoPE scaling and prompts."""
    import modules.collator
    import train_llm_embed

    prefixes, collator_class = [], modules.collator.TaskCollator  # train_finetune.main imports it when it runs
    monkeypatch.setattr(modules.collator, "TaskCollator", lambda *a, **k: prefixes.append(a[4]) or collator_class(*a, **k))

    (tmp_path / "tasks.json").write_text(json.dumps({"retri": "Retrieve the caption"}))
    extra = ["--rope_scaling", "linear", "--rope_factor", "4", "--scaling_dim", "40", "--gradient_checkpointing",
             "--instruction_template", "Instruct: {task}\\nQuery: {text}", "--task_instructions",
             str(tmp_path / "tasks.json"), "--default_task", "Find a similar sentence", "--max_steps", "7"]
    train_llm_embed.main(script_args(tiny_decoders, tiny_data, tmp_path / "full", *extra, "--save_every", "3"))
    assert "trainable parameters: " in capsys.readouterr().out
    assert prefixes[0] == {"retri": "Instruct: Retrieve the caption\nQuery: ", "sts": "",
                           "cls": "Instruct: Find a similar sentence\nQuery: "}
    train_llm_embed.main(script_args(tiny_decoders, tiny_data, tmp_path / "resumed", *extra,
                                     "--resume_from_checkpoint", str(tmp_path / "full" / "checkpoint-3")))
    for name in ["model.safetensors", "adapter/adapter_model.safetensors", "2_Dense/model.safetensors"]:
        full, again = load_file(tmp_path / "full" / "final" / name), load_file(tmp_path / "resumed" / "final" / name)
        assert full.keys() == again.keys() and all(torch.equal(full[k], again[k]) for k in full), name
    start = load_file(tiny_decoders["llama"] / "model.safetensors")
    merged = load_file(tmp_path / "full" / "final" / "model.safetensors")
    assert not torch.equal(merged["layers.0.self_attn.q_proj.weight"], start["layers.0.self_attn.q_proj.weight"])
    config = json.loads((tmp_path / "full" / "final" / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 4
    assert config["max_position_embeddings"] == 4 * 128
    prompts = json.loads((tmp_path / "full" / "final" / "config_sentence_transformers.json").read_text())["prompts"]
    assert {name: prompt for name, prompt in prompts.items() if prompt} == {  # cosent pairs (sts) get none
        "query": "Instruct: Find a similar sentence\nQuery: ", "retri": "Instruct: Retrieve the caption\nQuery: ",
        "cls": "Instruct: Find a similar sentence\nQuery: "}


@pytest.mark.parametrize("flags, message", [
    (["--lora_target_modules", "q_proj,wqkv"], "--lora_target_modules wqkv"),
    (["--pooling", "cls"], "--pooling cls"),
    (["--rope_factor", "2"], "need --rope_scaling"),
    (["--rope_scaling", "yarn"], "--rope_factor > 1"),
    (["--instruction_template", "Query: ", "--default_task", "x"], "no {task}"),
    (["--instruction_template", "{task}: {text} end", "--default_task", "x"], "{text} must come last"),
    (["--default_task", "x"], "need --instruction_template"),
    (["--instruction_template", "{task}: ", "--task_instructions", "tasks.json"], "['msmarco'] are not datasets"),
    (["--instruction_template", "{task}: ", "--task_instructions", "sts_task.json"], "['sts'] are cosent datasets"),
    (["--instruction_template", "{task}: ", "--default_task", "x", "--query_prefix", "q: "], "not both"),
])
def test_bad_flags_fail_with_errors_that_name_them(tiny_decoders, tiny_data, tmp_path, flags, message):
    import train_llm_embed

    (tmp_path / "tasks.json").write_text(json.dumps({"retri": "a", "msmarco": "b"}))  # msmarco: not in the meta list
    (tmp_path / "sts_task.json").write_text(json.dumps({"sts": "a"}))
    flags = [str(tmp_path / flag) if flag.endswith(".json") else flag for flag in flags]
    with pytest.raises((LLMSetupError, DataError), match=re.escape(message)):
        train_llm_embed.main(script_args(tiny_decoders, tiny_data, tmp_path / "run", "--max_steps", "1", *flags))


def test_encoder_position_flags_are_not_flags_of_the_llm_script(tiny_decoders, tiny_data, tmp_path, capsys):
    import train_llm_embed

    with pytest.raises(SystemExit):
        train_llm_embed.main(script_args(tiny_decoders, tiny_data, tmp_path / "run", "--extend_pe", "--max_length",
                                         "128"))
    assert "unrecognized arguments: --extend_pe --max_length 128" in capsys.readouterr().err


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_run_saves_a_loadable_export_and_adapter(tiny_decoders, tiny_data, tmp_path, stage):
    """2 CPU processes under launch/deepspeed_zero{2,3}_llm.yaml: LoRA trains, checkpoints, exports (ZeRO-3 gathers)."""
    from sentence_transformers import SentenceTransformer

    cmd = accelerate_cmd(config_file=REPO / "launch" / f"deepspeed_zero{stage}_llm.yaml") + [
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0", "train_llm_embed.py"]
    result = run_script(cmd + script_args(tiny_decoders, tiny_data, tmp_path, "--max_steps", "2", "--save_every", "2",
                                          "--scaling_dim", "40", "--gradient_checkpointing"),
                        env_extra={"OMP_NUM_THREADS": "1"})
    assert "trainable parameters: 5,416 of 31,304" in result.stdout  # counted whole under ZeRO-3's partitioning
    assert any(p.name.startswith("zero_pp_rank_1") for p in (tmp_path / "checkpoint-2").rglob("*"))
    assert (tmp_path / "final" / "adapter" / "adapter_model.safetensors").exists()
    assert SentenceTransformer(str(tmp_path / "final"), device="cpu").encode(["hello world"]).shape == (1, 40)

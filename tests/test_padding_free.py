"""Padding-free forwards: the same embeddings and gradients as the padded forward for a BERT encoder, an XLM-R
encoder (positions from padding_idx + 1) and a left-padded decoder, every pooling; runs of the scripts; refusals."""

import sys

import pytest
import torch

from modules.cli import UsageError
from modules.model import EmbeddingModel
from modules.padding_free import check_padding_free, flatten
from tests.conftest import REPO, SENTENCES, minilm_path, run_script

TEXTS = [s * (1 + i % 3) for i, s in enumerate(SENTENCES[:7])]  # lengths vary


def tiny_backbone(kind):
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaModel, XLMRobertaConfig, XLMRobertaModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), padding_side="left" if kind == "llama" else "right")
    common = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, attn_implementation="sdpa_varlen")
    if kind == "bert":
        return BertModel(BertConfig(max_position_embeddings=128, hidden_dropout_prob=0, attention_probs_dropout_prob=0,
                                    **common)), tokenizer
    if kind == "xlmr":
        return XLMRobertaModel(XLMRobertaConfig(max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id,
                                                hidden_dropout_prob=0, attention_probs_dropout_prob=0, **common)), tokenizer
    return LlamaModel(LlamaConfig(num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id, **common)), tokenizer


def embeddings_and_grads(model, tokens, padding_free):
    model.zero_grad()
    model.padding_free = padding_free
    if not padding_free:
        model.backbone.config._attn_implementation = "sdpa"
    out = model(**tokens)
    model.backbone.config._attn_implementation = "sdpa_varlen"
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind, pooling", [("bert", "mean"), ("bert", "cls"), ("xlmr", "mean"), ("llama", "lasttoken"),
                                           ("llama", "mean")])
def test_flattened_forward_equals_the_padded_one(kind, pooling):
    backbone, tokenizer = tiny_backbone(kind)
    model = EmbeddingModel(backbone, tokenizer, pooling=pooling).train()
    tokens = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    assert not tokens["attention_mask"].all()  # there is padding to skip
    padded, padded_grads = embeddings_and_grads(model, tokens, padding_free=False)
    flat, flat_grads = embeddings_and_grads(model, tokens, padding_free=True)
    assert torch.allclose(flat, padded, atol=1e-5), (flat - padded).abs().max()
    assert padded_grads.keys() == flat_grads.keys()
    for name in padded_grads:
        assert torch.allclose(flat_grads[name], padded_grads[name], atol=1e-4), name


def test_position_ids_restart_with_each_sequence_on_either_padding_side():
    ids = torch.tensor([[5, 6, 7, 0], [0, 0, 8, 9]])
    mask = (ids != 0).long()
    inputs, cu = flatten(ids, mask, start=2)
    assert inputs["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert inputs["position_ids"].tolist() == [[2, 3, 4, 2, 3]]
    assert cu.tolist() == [0, 3, 5] and inputs["max_length_q"] == 3


def test_padding_free_is_refused_without_a_variable_length_attention(tiny_bert):
    model = EmbeddingModel.from_pretrained(tiny_bert)  # sdpa
    with pytest.raises(UsageError, match="--padding_free needs a variable-length attention"):
        check_padding_free(model, "cpu")
    varlen = EmbeddingModel.from_pretrained(tiny_bert, attn_implementation="sdpa_varlen")
    check_padding_free(varlen, "cpu")
    assert varlen.padding_free


def test_the_scripts_train_padding_free(tiny_bert, tiny_data, pair_data, tmp_path):
    from tests.test_train_finetune import common_args
    from tests.test_train_pretrain import script_args

    for args in (common_args(tiny_bert, tiny_data, tmp_path / "ft", "--max_steps", "2"),
                 script_args(tiny_bert, pair_data, tmp_path / "pt", "--max_steps", "2")):
        run_script([sys.executable, *args, "--padding_free", "--attn_implementation", "sdpa_varlen"])
    import subprocess

    refused = subprocess.run([sys.executable, *common_args(tiny_bert, tiny_data, tmp_path / "no"), "--padding_free"],
                             capture_output=True, text=True, cwd=REPO)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "--padding_free needs a variable-length attention" in refused.stderr.strip().splitlines()[-1]

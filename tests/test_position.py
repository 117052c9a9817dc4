"""Position-table extension: exact on short inputs, the formula row by row, long inputs train, save/reload."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer
from transformers import AutoConfig, AutoModel

from modules.losses import InfoNCE
from modules.model import EmbeddingModel
from modules.position import (
    extend_model_positions, extend_position_embeddings, find_position_table, freeze_position_embeddings,
    hierarchical_positions, tiled_positions,
)
from modules.training import build_optimizer
from tests.conftest import SENTENCES, run_script
from tests.test_train_finetune import common_args

TINY = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=100,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
# (model type, config overrides, row of position 0)
ENCODERS = [
    ("bert", {}, 0), ("roberta", {"pad_token_id": 1}, 2), ("xlm-roberta", {"pad_token_id": 1}, 2),
    ("electra", {"embedding_size": 8}, 0), ("albert", {"embedding_size": 8}, 0), ("mpnet", {"pad_token_id": 1}, 2),
    ("distilbert", {"dim": 16, "n_layers": 1, "n_heads": 2, "hidden_dim": 32, "dropout": 0.0,
                    "attention_dropout": 0.0}, 0),
]


def tiny_encoder(model_type, overrides, positions):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**TINY, **overrides}, max_position_embeddings=positions)
    return AutoModel.from_config(config).eval()


def token_ids(length, batch=2, pad_id=0, seed=0):
    """Random ids in [5, 100) with the second row right-padded to half length."""
    ids = torch.randint(5, 100, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1:, length // 2 :] = 0
    return ids.masked_fill(mask == 0, pad_id), mask


def long_text(min_words):
    words = " ".join(SENTENCES).split()
    return " ".join(words[i % len(words)] for i in range(min_words))


def passage_ids(tokenizer, sentence, length):
    """[CLS] shared filler, then ``sentence`` at the very end [SEP]: exactly ``length`` ids."""
    tail = tokenizer(sentence, add_special_tokens=False)["input_ids"]
    filler = tokenizer(long_text(length), add_special_tokens=False)["input_ids"][: length - 2 - len(tail)]
    return torch.tensor([tokenizer.cls_token_id, *filler, *tail, tokenizer.sep_token_id])


@pytest.mark.parametrize("model_type, overrides, offset", ENCODERS, ids=[e[0] for e in ENCODERS])
def test_short_inputs_embed_exactly_as_before(model_type, overrides, offset):
    n = 32
    backbone = tiny_encoder(model_type, overrides, n + offset)
    ids, mask = token_ids(n, pad_id=backbone.config.pad_token_id)
    with torch.no_grad():
        before = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    original = find_position_table(backbone)[1].weight.detach().clone()

    assert extend_position_embeddings(backbone, 300) == n
    _, table, found_offset = find_position_table(backbone)
    assert found_offset == offset and table.num_embeddings == offset + 300
    assert torch.equal(table.weight[: offset + n], original)
    assert backbone.config.max_position_embeddings == offset + 300
    assert backbone.embeddings.position_ids.shape[-1] == offset + 300
    with torch.no_grad():
        after = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.equal(after, before)
        long_ids, long_mask = token_ids(300, pad_id=backbone.config.pad_token_id)
        assert backbone(input_ids=long_ids, attention_mask=long_mask).last_hidden_state.shape[1] == 300


def test_xlmr_rows_follow_the_formula_after_the_two_padding_rows():
    n, alpha = 8, 0.4
    backbone = tiny_encoder("xlm-roberta", {"pad_token_id": 1}, n + 2)
    p = find_position_table(backbone)[1].weight.detach().clone()
    extend_position_embeddings(backbone, 40, alpha=alpha)
    q = find_position_table(backbone)[1].weight.detach()

    assert torch.equal(q[:2], p[:2])  # row 0 (unused) and row 1 (padding) stay

    def u(i):  # base vector of trained position i, which lives at row 2 + i
        return (p[2 + i] - alpha * p[2]) / (1 - alpha)

    for k in (0, 5, 8, 9, 17, 23, 39):
        assert torch.allclose(q[2 + k], alpha * u(k // n) + (1 - alpha) * u(k % n), atol=1e-6), k
    assert torch.equal(backbone.embeddings.position_embeddings.weight[1], p[1])

    # the model reads row 2 + k for token k (and the padding row for padding)
    seen = []
    backbone.embeddings.position_embeddings.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    ids, mask = token_ids(40, pad_id=1)
    with torch.no_grad():
        backbone(input_ids=ids, attention_mask=mask)
    assert torch.equal(seen[0][0], torch.arange(2, 42))
    assert torch.equal(seen[0][1], torch.cat([torch.arange(2, 22), torch.full((20,), 1)]))


def test_tile_repeats_trained_rows_and_is_alpha_zero():
    trained = torch.randn(6, 4)
    tiled = tiled_positions(trained, 20)
    assert all(torch.equal(tiled[k], trained[k % 6]) for k in range(20))
    assert torch.allclose(hierarchical_positions(trained, 20, alpha=0.0), tiled)

    backbone = tiny_encoder("bert", {}, 6)
    p = backbone.embeddings.position_embeddings.weight.detach().clone()
    extend_position_embeddings(backbone, 20, method="tile")
    assert torch.equal(backbone.embeddings.position_embeddings.weight.detach(), p[torch.arange(20) % 6])


def test_lengths_outside_n_to_n_squared_and_tables_that_are_not_absolute_are_refused():
    backbone = tiny_encoder("bert", {}, 16)
    with pytest.raises(ValueError, match=r"bert has 16 trained positions: extend to a length in \(16, 256\], got 257"):
        extend_position_embeddings(backbone, 257)
    with pytest.raises(ValueError, match="got 16"):
        extend_position_embeddings(backbone, 16)
    for model_type in ("roformer", "llama"):
        config = AutoConfig.for_model(model_type, **{k: v for k, v in TINY.items() if "dropout" not in k})
        with pytest.raises(ValueError, match=f"{model_type}: no learned absolute position table"):
            extend_position_embeddings(AutoModel.from_config(config), 1024)


def test_a_2048_token_input_trains(tiny_bert):
    torch.manual_seed(0)
    model = EmbeddingModel.from_pretrained(tiny_bert)  # 128 trained positions
    extend_model_positions(model, 2048)
    assert model.max_seq_length == 2048 and model.tokenizer.model_max_length == 2048
    queries = model.tokenizer(SENTENCES[:4], padding=True, return_tensors="pt")
    passages = {"input_ids": torch.stack([passage_ids(model.tokenizer, s, 2048) for s in SENTENCES[:4]])}
    passages["attention_mask"] = torch.ones_like(passages["input_ids"])
    loss_fn = InfoNCE(0.05)
    optimizer = build_optimizer(model, 3e-3, 0.0)
    table = model.backbone.embeddings.position_embeddings.weight
    losses = []
    for step in range(4):
        loss = loss_fn(model(**queries), model(**passages))
        loss.backward()
        if step == 0:
            assert table.grad[1900:2048].abs().sum() > 0  # past the trained rows
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_frozen_position_table_gets_no_optimizer_state(tiny_bert):
    model = EmbeddingModel.from_pretrained(tiny_bert)
    freeze_position_embeddings(model.backbone)
    optimizer = build_optimizer(model, 1e-3, 0.01)
    table = model.backbone.embeddings.position_embeddings.weight
    assert not table.requires_grad
    assert all(param is not table for group in optimizer.param_groups for param in group["params"])


def test_extended_model_saves_and_reloads_with_the_longer_length(tiny_bert, tmp_path):
    model = EmbeddingModel.from_pretrained(tiny_bert)
    extend_model_positions(model, 1024)
    texts = [long_text(1200), SENTENCES[0]]
    assert len(model.tokenizer(texts[0])["input_ids"]) > 1024
    ours = model.encode(texts)
    model.save_pretrained(tmp_path / "saved")

    assert json.loads((tmp_path / "saved" / "config.json").read_text())["max_position_embeddings"] == 1024
    assert json.loads((tmp_path / "saved" / "sentence_bert_config.json").read_text())["max_seq_length"] == 1024
    st = SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    assert st.max_seq_length == 1024
    theirs = torch.as_tensor(st.encode(texts, convert_to_numpy=True))
    assert torch.allclose(ours, theirs, atol=1e-5)

    reloaded = EmbeddingModel.from_pretrained(tmp_path / "saved")
    assert reloaded.max_seq_length == 1024
    assert torch.equal(reloaded.backbone.embeddings.position_embeddings.weight,
                       model.backbone.embeddings.position_embeddings.weight)
    assert torch.allclose(reloaded.encode(texts), ours, atol=1e-6)


@pytest.mark.parametrize("flags", [["--extend_pe", "--max_length", "256", "--pe_extension", "hierarchical"],
                                   ["--extend_pe", "--max_length", "200", "--pe_extension", "tile"],
                                   ["--freeze_position_embeddings"]], ids=["hierarchical", "tile", "frozen"])
def test_train_finetune_extends_or_freezes_the_table(tiny_bert, tiny_data, tmp_path, flags):
    run_script([sys.executable, *common_args(tiny_bert, tiny_data, tmp_path, "--max_steps", "3", *flags)])
    final = tmp_path / "final"
    start = EmbeddingModel.from_pretrained(tiny_bert).backbone.embeddings.position_embeddings.weight.detach()
    table = load_file(final / "model.safetensors")["embeddings.position_embeddings.weight"]
    if "--freeze_position_embeddings" in flags:
        assert torch.equal(table, start)
        return
    length = int(flags[2])
    assert table.shape == (length, 32) and not torch.equal(table[:128], start)  # extended and trained
    assert json.loads((final / "config.json").read_text())["max_position_embeddings"] == length
    assert json.loads((final / "sentence_bert_config.json").read_text())["max_seq_length"] == length
    assert json.loads((tmp_path / "run_config.json").read_text())["args"]["pe_extension"] == flags[4]


def test_train_finetune_flag_errors(capsys):
    from train_finetune import parse_args

    base = ["--model_name_or_path", "m", "--meta_list", "l", "--output_dir", "o"]
    for flags, message in [(["--extend_pe"], "--extend_pe and --max_length N go together"),
                           (["--max_length", "1024"], "--extend_pe and --max_length N go together"),
                           (["--extend_pe", "--max_length", "1024", "--freeze_position_embeddings"], "has to be trained"),
                           (["--extend_pe", "--max_length", "1024", "--passage_max_len", "2048"],
                            "--passage_max_len 2048 above --max_length 1024")]:
        with pytest.raises(SystemExit):
            parse_args(base + flags)
        assert message in capsys.readouterr().err

"""Padding-free forwards (``--padding_free``): a padded batch becomes one row of its real tokens.

    [B, L] tokens + mask  ->  input_ids [1, T], position_ids [1, T], cu_seq_lens [B + 1], max_length

T = sum of the real lengths. Every layer's matmuls then run on real tokens only, and attention runs per sequence
through transformers' attention interface with the cumulative lengths (flash-attention 2's varlen kernel on a GPU;
``sdpa_varlen``, registered here, runs each sequence through torch's SDPA anywhere, as a reference for the CPU tests
and for backbones without a kernel). Position ids restart with every sequence: at 0, or for the RoBERTa family (XLM-R
included) at padding_idx + 1, where its padded forward starts them. Pooling reads each sequence's segment. A
backbone whose layers do not pass the lengths to its attention would silently attend across sequences, so the first
use is checked against the padded forward (``check_padding_free``).
"""

import torch
import torch.nn.functional as F

from .cli import UsageError

VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "sdpa_varlen")


def sdpa_varlen(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None, **kwargs):
    """transformers attention function: SDPA over each sequence of a flattened row ([1, heads, T, d] inputs)."""
    if cu_seq_lens_q is None:
        raise ValueError("sdpa_varlen attends per sequence: call the model with cu_seq_lens_q (--padding_free)")
    bounds = cu_seq_lens_q.tolist()
    outputs = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout,
                                              scale=scaling, is_causal=bool(getattr(module, "is_causal", False)),
                                              enable_gqa=query.size(1) != key.size(1))
               for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def register_reference_attention():
    from transformers import AttentionInterface

    AttentionInterface.register("sdpa_varlen", sdpa_varlen)


register_reference_attention()


def first_position(backbone):
    """Where a sequence's position ids start: padding_idx + 1 for RoBERTa-style embeddings, else 0."""
    embeddings = getattr(backbone, "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    return padding_idx + 1 if padding_idx is not None else 0


def flatten(input_ids, attention_mask, start=0, token_type_ids=None):
    """The backbone's keyword arguments for the real tokens of a padded batch (left or right padding), and the
    cumulative lengths."""
    mask = attention_mask.bool()
    lengths = mask.sum(1)
    cu_seq_lens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    longest = int(lengths.max())
    position_ids = (mask.cumsum(1) - 1 + start)[mask]  # 0.. within each row, whatever side its padding is on
    inputs = {"input_ids": input_ids[mask][None], "position_ids": position_ids[None], "cu_seq_lens_q": cu_seq_lens,
              "cu_seq_lens_k": cu_seq_lens, "max_length_q": longest, "max_length_k": longest}
    if token_type_ids is not None:
        inputs["token_type_ids"] = token_type_ids[mask][None]
    return inputs, cu_seq_lens


def pool_flat(hidden, cu_seq_lens, mode):
    """Pool [T, H] token states of concatenated sequences into [B, H]."""
    starts, ends = cu_seq_lens[:-1].long(), cu_seq_lens[1:].long()
    if mode == "cls":
        return hidden[starts]
    if mode == "lasttoken":
        return hidden[ends - 1]
    lengths = ends - starts
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)
    sums = torch.zeros(len(lengths), hidden.size(-1), dtype=hidden.dtype, device=hidden.device).index_add_(0, segment,
                                                                                                            hidden)
    return sums / lengths[:, None].to(hidden.dtype)


def padding_free_states(backbone, input_ids, attention_mask, pooling, token_type_ids=None):
    """Pooled [B, H] embeddings of a padded batch, computed on its real tokens only."""
    inputs, cu_seq_lens = flatten(input_ids, attention_mask, first_position(backbone), token_type_ids)
    hidden = backbone(**inputs).last_hidden_state[0]
    return pool_flat(hidden, cu_seq_lens, pooling)


def check_padding_free(model, device, flag="--attn_implementation"):
    """Refuse --padding_free where the backbone's attention cannot take variable lengths, and check on two short
    texts, on ``device`` (where the model is moved; bf16 autocast on a GPU, as flash-attention needs), that the
    flattened forward embeds as the padded one does. Then the model runs padding-free."""
    config = model._base_backbone().config
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in VARLEN_ATTENTION:
        raise UsageError(f"--padding_free needs a variable-length attention ({flag} flash_attention_2 on a GPU, or "
                         f"sdpa_varlen anywhere), not {implementation}")
    tokens = dict(model.tokenizer(["a short one", "a somewhat longer second text to embed"], padding=True,
                                  return_tensors="pt"))
    device = torch.device(device)
    model.to(device)
    tokens = {key: value.to(device) for key, value in tokens.items()}
    was_training = model.training
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        model.padding_free = True
        flat = model(**tokens).float()
        if implementation == "sdpa_varlen":  # its padded twin
            config._attn_implementation = "sdpa"
        model.padding_free = False
        padded = model(**tokens).float()
        config._attn_implementation = implementation
    model.train(was_training)
    if not torch.allclose(flat, padded, atol=2e-2 * float(padded.abs().max()), rtol=0):
        raise UsageError(f"--padding_free: {type(model._base_backbone()).__name__} embeds differently from flattened "
                         "sequences (its layers do not pass the sequence lengths to the attention); train it padded")
    model.padding_free = True

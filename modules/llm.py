"""Decoder LLM backbones (Qwen2, Llama, Mistral, InternLM2-like) as embedding models.

The recipe of E5-mistral (Wang et al. 2024, "Improving Text Embeddings with Large Language Models",
arXiv 2401.00368) and RepLLaMA (Ma et al. 2023, arXiv 2310.08319, tevatron): an EOS token appended to
every text, the last layer's state at that token as the embedding (left padding puts it in the last
column), queries prefixed with ``Instruct: {task}\\nQuery: `` and documents left bare (E5-mistral),
LoRA (Hu et al. 2021, arXiv 2106.09685) on q, k, v, o, gate, up and down projections. Longer inputs
come from RoPE scaling as transformers implements it: ``linear`` (Position Interpolation, Chen et al.
2023, arXiv 2306.15595), ``dynamic`` (NTK-aware, bloc97 / emozilla 2023) and ``yarn`` (Peng et al.
2023, arXiv 2309.00071).

The trained model is saved twice: the LoRA adapter alone (``adapter/``, for peft) and the
adapter merged into the backbone as a sentence-transformers directory (last-token pooling, the
instructions as ``prompts``, ``2_Dense`` for a ScalingLayer) that ``SentenceTransformer(path)``
loads with the same tokenizer (EOS, left padding), so it embeds exactly as the trained model.
"""

import copy
import json
import re
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel

from .cli import UsageError
from .flags import ROPE_SCALINGS
from .model import (
    DTYPES, EmbeddingModel, _read_sentence_transformers_layout, _without_zero3_loading, load_tokenizer,
    model_load_errors, scaling_layer_for,
)

ADAPTER_DIR = "adapter"


class LLMSetupError(UsageError):
    """A bad flag or a model/flag mismatch; the message names the flag."""


# --------------------------------------------------------------------------- tokenizer


def append_eos(tokenizer):
    """Make ``tokenizer`` end every text with its EOS token and pad on the left (in place).

    The EOS goes into the fast tokenizer's post-processor, so truncation keeps room for it and
    the saved ``tokenizer.json`` carries it: sentence-transformers then tokenizes as training did.
    Special tokens the tokenizer already adds (Llama's BOS) are kept.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise LLMSetupError(f"{type(tokenizer).__name__} is not a fast tokenizer; EOS is appended through the fast "
                            "tokenizer's post-processor (is tokenizer.json missing? --trust_remote_code tokenizers "
                            "are often slow)")
    if tokenizer.eos_token is None:
        raise LLMSetupError("the tokenizer has no eos_token: last-token pooling needs one")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # the attention mask, not the id, tells padding apart
    tokenizer.padding_side = "left"  # the EOS of every row lands in the last column
    tokenizer.init_kwargs["padding_side"] = "left"  # saved in tokenizer_config.json (the attribute alone is not)
    prefix, suffix = _added_special_tokens(tokenizer)
    if suffix and suffix[-1] == tokenizer.eos_token_id:
        return tokenizer
    suffix = suffix + [tokenizer.eos_token_id]
    from tokenizers import processors

    def pieces(ids, type_id):
        return [f"{token}:{type_id}" for token in tokenizer.convert_ids_to_tokens(ids)]

    single = pieces(prefix, 0) + ["$A:0"] + pieces(suffix, 0)
    pair = single + pieces(prefix, 1) + ["$B:1"] + pieces(suffix, 1)
    special = {token: token_id for token, token_id in zip(tokenizer.convert_ids_to_tokens(prefix + suffix),
                                                          prefix + suffix)}
    template = processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(special.items()))
    current = tokenizer.backend_tokenizer.post_processor
    # a processor that adds no tokens (ByteLevel offsets) stays in front; one that does is replaced by ours
    adds_tokens = bool(prefix or suffix[:-1]) or isinstance(current, processors.TemplateProcessing)
    keep = current is not None and not adds_tokens
    tokenizer.backend_tokenizer.post_processor = processors.Sequence([current, template]) if keep else template
    if _added_special_tokens(tokenizer) != (prefix, suffix):
        raise LLMSetupError(f"could not make {type(tokenizer).__name__} append {tokenizer.eos_token!r}")
    return tokenizer


def _added_special_tokens(tokenizer):
    """(ids before, ids after) the text that the tokenizer adds to a single sequence."""
    text = "hello world"
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = tokenizer(text)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    raise LLMSetupError(f"{type(tokenizer).__name__} changes the text's tokens when adding special tokens")


# --------------------------------------------------------------------------- instructions


def instruction_prompts(template, tasks, default_task=None):
    """Query prompts from an instruction template: {"query": default, <dataset>: its task, ...}.

    ``template`` holds ``{task}`` and may end with ``{text}`` (where the query goes); ``\\n`` is
    read as a newline. Documents get no prompt (E5-mistral).
    """
    template = template.replace("\\n", "\n")
    unknown = sorted(set(re.findall(r"\{(\w*)\}", template)) - {"task", "text"})
    if unknown:
        raise LLMSetupError(f"--instruction_template {template!r}: unknown field {{{unknown[0]}}}; the fields are "
                            "{task} and {text}")
    if "{task}" not in template:
        raise LLMSetupError(f"--instruction_template {template!r} has no {{task}}")
    if "{text}" in template and not template.endswith("{text}"):
        raise LLMSetupError(f"--instruction_template {template!r}: {{text}} must come last (a prompt is a prefix)")
    prefix = template.removesuffix("{text}")
    prompts = {"query": prefix.replace("{task}", default_task)} if default_task else {}
    prompts.update({name: prefix.replace("{task}", task) for name, task in tasks.items()})
    return prompts


# --------------------------------------------------------------------------- config


def apply_rope_scaling(config, kind, factor, original_max_positions=None):
    """Set RoPE scaling on a transformers config (saved with it), e.g. ``linear`` x4.

    transformers 5 keeps RoPE settings in ``config.rope_parameters`` (with ``rope_theta``); remote
    code configs still use ``rope_scaling``. ``linear`` and ``yarn`` stretch the trained positions
    ``original_max_positions`` (default: ``max_position_embeddings``) by ``factor`` and raise
    ``max_position_embeddings`` to match; ``dynamic`` rescales only past ``max_position_embeddings``,
    which therefore stays the trained length.
    """
    if kind not in ROPE_SCALINGS:
        raise LLMSetupError(f"--rope_scaling {kind!r}: choose one of {ROPE_SCALINGS}")
    if factor is None or factor <= 1:
        raise LLMSetupError(f"--rope_scaling {kind} needs --rope_factor > 1, got {factor}")
    original = original_max_positions or config.max_position_embeddings
    if isinstance(getattr(config, "rope_parameters", None), dict) and "rope_theta" in config.rope_parameters:
        parameters = {"rope_type": kind, "rope_theta": config.rope_parameters["rope_theta"], "factor": float(factor)}
        if kind == "yarn":
            parameters["original_max_position_embeddings"] = original
        config.rope_parameters = parameters
        config.validate_rope()
    elif hasattr(config, "rope_scaling"):
        config.rope_scaling = {"type": kind, "rope_type": kind, "factor": float(factor)}
        if kind == "yarn":
            config.rope_scaling["original_max_position_embeddings"] = original
    else:
        raise LLMSetupError(f"--rope_scaling: {config.model_type} has no RoPE settings in its config")
    if kind != "dynamic":
        config.max_position_embeddings = int(original * factor)
    return config


def check_lora_targets(backbone, targets):
    """Every --lora_target_modules name must name Linear layers of the backbone."""
    linear_names = {name.rsplit(".", 1)[-1] for name, module in backbone.named_modules()
                    if isinstance(module, nn.Linear)}
    missing = [target for target in targets if target not in linear_names]
    if missing:
        raise LLMSetupError(f"--lora_target_modules {','.join(missing)}: no Linear layer of this "
                            f"{backbone.config.model_type} model has that name; its Linear layers are "
                            f"{','.join(sorted(linear_names))}")


def parameter_counts(model):
    """(trainable, total) parameter counts (whole sizes of ZeRO-3 partitioned parameters)."""
    sizes = [(getattr(p, "ds_numel", None) or p.numel(), p.requires_grad) for p in model.parameters()]
    return sum(n for n, trainable in sizes if trainable), sum(n for n, _ in sizes)


# --------------------------------------------------------------------------- model


class LLMEmbeddingModel(EmbeddingModel):
    """A decoder backbone (optionally with LoRA) -> last-token or mean pooling -> optional ScalingLayer.

    As for every EmbeddingModel, the ScalingLayer stays float32 whatever the backbone's dtype, and
    embeddings come out float32 for the losses (InfoNCE at tau 0.01 needs more than bf16's 8 bits).
    """

    def _base_backbone(self):
        return self.backbone.get_base_model() if _is_peft(self.backbone) else self.backbone

    @classmethod
    def from_pretrained(cls, path, pooling="lasttoken", scaling_dim=None, max_seq_length=None, lora=None,
                        rope=None, dtype="float32", attn_implementation=None, trust_remote_code=False,
                        gradient_checkpointing=False):
        """Load a decoder (transformers or sentence-transformers directory) for embedding training.

        ``lora``: a peft ``LoraConfig`` (None: every weight trains). ``rope``: (kind, factor,
        original_max_positions) or None. ``dtype``: the weights' dtype (float32 keeps full-precision
        masters; accelerate's mixed precision still computes in bf16).
        """
        if pooling not in ("lasttoken", "mean"):
            raise LLMSetupError(f"--pooling {pooling}: a decoder's first token sees nothing after it; "
                                "use lasttoken (default) or mean")
        with model_load_errors(path):
            st = _read_sentence_transformers_layout(Path(path))
            config = AutoConfig.from_pretrained(st["transformer_path"], trust_remote_code=trust_remote_code)
            if rope is not None:
                apply_rope_scaling(config, *rope)
            config.use_cache = False  # no KV cache when embedding
            kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
            backbone = AutoModel.from_pretrained(st["transformer_path"], config=config, dtype=DTYPES[dtype],
                                                 trust_remote_code=trust_remote_code, **kwargs)
            tokenizer = append_eos(load_tokenizer(st["transformer_path"], trust_remote_code=trust_remote_code))
        try:
            scaling_layer = scaling_layer_for(st, scaling_dim, config.hidden_size, path, backbone.dtype)
        except ValueError as error:  # the command line prints LLMSetupError without a traceback
            raise LLMSetupError(str(error)) from None
        if gradient_checkpointing:
            backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            backbone.enable_input_require_grads()  # checkpointed blocks see an input that needs grad
        if lora is not None:
            check_lora_targets(backbone, lora.target_modules)
            backbone = _with_lora(backbone, lora)  # freezes the backbone; adapters stay float32
        max_seq_length = max_seq_length or st["max_seq_length"] or 512
        tokenizer.model_max_length = max_seq_length
        model = cls(backbone, tokenizer, pooling=pooling, scaling_layer=scaling_layer,
                    max_seq_length=max_seq_length, prompts=st["prompts"])
        return model

    def save_pretrained(self, path, state_dict=None):
        """The merged sentence-transformers directory at ``path`` and the LoRA adapter in ``path/adapter``.

        ``state_dict``: this module's full state dict (``accelerator.get_state_dict(model)`` under
        FSDP / ZeRO-3), keys ``backbone.base_model.model.<...>`` for a peft backbone.
        """
        if not _is_peft(self.backbone):
            return super().save_pretrained(path, state_dict)
        path = Path(path)
        state_dict = state_dict if state_dict is not None else self.state_dict()
        backbone_state = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        with _without_zero3_loading():  # building the merged copy must not partition it either
            merged = self._merged_backbone(backbone_state)
            export = EmbeddingModel(merged, self.tokenizer, self.pooling, self.scaling_layer, self.max_seq_length,
                                    self.prompts)
            export_state = {f"backbone.{k}": v for k, v in merged.state_dict().items()}
            export_state.update({k: v for k, v in state_dict.items() if k.startswith("scaling_layer.")})
            EmbeddingModel.save_pretrained(export, path, state_dict=export_state)
        self.backbone.save_pretrained(str(path / ADAPTER_DIR), state_dict=backbone_state)
        (path / ADAPTER_DIR / "embedding_config.json").write_text(json.dumps(
            {"pooling": self.pooling, "prompts": self.prompts, "max_seq_length": self.max_seq_length,
             "note": "LoRA of the base model; the merged model, tokenizer (EOS appended, left padding), RoPE "
                     "settings and 2_Dense are in the parent directory"}, indent=2))

    def _merged_backbone(self, backbone_state):
        """The adapter merged into the base weights, built from ``backbone_state`` (not the live module,
        which may be sharded): an empty (meta) copy of the peft model is given these tensors and merged."""
        base = self._base_backbone()
        with torch.device("meta"):  # the class itself, not from_config: no ZeRO-3 partitioning, no remote-code lookup
            skeleton = type(base)(copy.deepcopy(base.config))
            skeleton = _with_lora(skeleton, copy.deepcopy(self.backbone.peft_config["default"]))
        # peft merges into the base layers' tensors in place (0.22 and later), and ``assign`` makes those the
        # state dict's, which alias the live weights: the wrapped layers get copies, the rest is shared
        skeleton.load_state_dict({name: value.clone() if ".base_layer." in name else value
                                  for name, value in backbone_state.items()}, strict=True, assign=True)
        return skeleton.merge_and_unload(safe_merge=True)  # safe: refuses non-finite merged weights


def _with_lora(backbone, lora):
    """peft's model around ``backbone``; peft reads transformers' deprecated ``is_gradient_checkpointing``, whose
    warning tells our users nothing they can change."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return get_peft_model(backbone, lora)


def _is_peft(module):
    return hasattr(module, "peft_config") and hasattr(module, "get_base_model")

"""The embedding model: a transformers backbone, pooling, and an optional ScalingLayer.

Saved and loaded as a sentence-transformers directory (transformer at the root, ``1_Pooling``,
``2_Dense`` when a ScalingLayer is used, then ``Normalize``), so ``SentenceTransformer(path)``
and mteb read what we write.
"""

import contextlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel, AutoTokenizer

from .cli import UsageError
from .flags import DTYPE_NAMES
from .padding_free import padding_free_states

POOLING_MODES = ("mean", "cls", "lasttoken")
# --torch_dtype / --save_dtype choices; "auto" (load only) keeps the checkpoint's stored dtype
DTYPES = {name: "auto" if name == "auto" else getattr(torch, name) for name in DTYPE_NAMES}


def name_the_device_for_deepspeed():
    """Without a GPU, tell DeepSpeed (imported by accelerate and transformers when installed) so; it would guess
    and print a warning that looks like a failure ("Setting accelerator to CPU")."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


name_the_device_for_deepspeed()

# How sentence-transformers' Pooling config names each of our modes (new and legacy keys).
_ST_LEGACY_POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "lasttoken",
}
_IDENTITY_ACTIVATIONS = ("torch.nn.modules.linear.Identity", "torch.nn.Identity")


def pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool token embeddings [B, T, H] into sentence embeddings [B, H].

    ``lasttoken`` takes the last non-padding token of each row, so it is right for both left and
    right padding.
    """
    if mode == "mean":
        mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
        return (token_embeddings * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if mode == "cls":
        return token_embeddings[:, 0]
    if mode == "lasttoken":
        seq_len = attention_mask.size(1)
        last = (seq_len - 1) - attention_mask.flip(1).argmax(1)
        return token_embeddings[torch.arange(token_embeddings.size(0), device=last.device), last]
    raise ValueError(f"unknown pooling {mode!r}; choose one of {POOLING_MODES}")


class EmbeddingModel(nn.Module):
    """backbone -> pooling -> optional ScalingLayer (Linear hidden -> scaling_dim, with bias).

    ``forward`` returns raw (not normalised) embeddings in at least float32; the losses normalise.
    Piccolo2's ScalingLayer is a plain linear map (identity activation) that lifts 1024-d to 1792-d;
    it is kept in float32 whatever the backbone's dtype (Piccolo's code hard-codes ``.half()``).
    """

    def __init__(self, backbone, tokenizer, pooling="mean", scaling_layer=None, max_seq_length=512, prompts=None):
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLING_MODES}")
        if getattr(backbone, "pooler", None) is not None:
            backbone.pooler = None  # BERT's pooler is unused by our pooling (and DDP rejects unused parameters)
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.scaling_layer = scaling_layer
        self.max_seq_length = max_seq_length
        self.prompts = dict(prompts or {})
        self.padding_free = False  # set by check_padding_free (--padding_free)

    @property
    def _no_split_modules(self):
        """The backbone's layer classes: what accelerate's FSDP TRANSFORMER_BASED_WRAP wraps (one unit a layer)."""
        return getattr(self._base_backbone(), "_no_split_modules", None)

    def _base_backbone(self):
        return self.backbone

    @property
    def hidden_size(self) -> int:
        return self.backbone.config.hidden_size

    @property
    def output_dim(self) -> int:
        return self.scaling_layer.out_features if self.scaling_layer is not None else self.hidden_size

    def forward(self, input_ids, attention_mask, **tokenizer_outputs):
        if self.padding_free:  # real tokens only (modules/padding_free.py)
            embeddings = padding_free_states(self.backbone, input_ids, attention_mask, self.pooling, **tokenizer_outputs)
        else:
            outputs = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **tokenizer_outputs)
            embeddings = pool(outputs.last_hidden_state, attention_mask, self.pooling)
        if self.scaling_layer is not None:
            embeddings = self.scaling_layer(embeddings.to(self.scaling_layer.weight.dtype))
        return embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))

    def enable_gradient_checkpointing(self):
        self.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def encode(self, texts, batch_size=64, max_length=None, normalize=True):
        """Embed a list of texts in eval mode; returns a float32 CPU tensor."""
        from .evaluation import embed_texts

        return embed_texts(self, self.tokenizer, list(texts), max_length or self.max_seq_length, batch_size, normalize)

    @classmethod
    def from_pretrained(cls, path, pooling=None, scaling_dim=None, max_seq_length=None, dtype=torch.float32,
                        **model_kwargs):
        """Load a transformers checkpoint or a sentence-transformers directory (with its 2_Dense).

        ``pooling`` overrides the directory's pooling; ``scaling_dim`` adds a fresh ScalingLayer when
        the directory has no Dense, and must match the Dense it has otherwise. ``dtype`` is the
        backbone's weights' dtype, float32 by default whatever the checkpoint stores: these are the
        master weights the optimizer updates (a bf16 master rounds most small updates away);
        bf16/fp16 compute comes from accelerate's mixed precision.
        """
        with model_load_errors(path):
            st = _read_sentence_transformers_layout(Path(path))
            tokenizer = load_tokenizer(st["transformer_path"])
            backbone = AutoModel.from_pretrained(st["transformer_path"], dtype=dtype, **model_kwargs)
        scaling_layer = scaling_layer_for(st, scaling_dim, backbone.config.hidden_size, path, backbone.dtype)
        return cls(
            backbone,
            tokenizer,
            pooling=pooling or st["pooling"] or "mean",
            scaling_layer=scaling_layer,
            max_seq_length=within_positions(backbone, max_seq_length or st["max_seq_length"] or 512),
            prompts=st["prompts"],
        )

    def save_pretrained(self, path, state_dict=None):
        """Write a sentence-transformers directory (safetensors).

        ``state_dict`` is this module's full state dict when it lives sharded elsewhere (FSDP,
        ZeRO-3): pass ``accelerator.get_state_dict(model)``.
        """
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import (
            Dense,
            Normalize,
            Pooling,
            Transformer,
        )

        path = Path(path)
        state_dict = state_dict if state_dict is not None else self.state_dict()
        backbone_state = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        # the saved dtype is the state dict's (--save_dtype); sentence-transformers reloads the backbone to write
        # its directory, so it is told that dtype too
        dtype = next(v.dtype for v in backbone_state.values() if v.is_floating_point())
        backbone_state.update(_dropped_pooler_state(self.backbone, dtype))
        self.backbone.save_pretrained(path, state_dict=backbone_state, safe_serialization=True)  # empties the dict
        self.tokenizer.save_pretrained(path)

        with _without_zero3_loading():  # sentence-transformers loads the saved model on this process alone
            modules = [
                Transformer(str(path), max_seq_length=self.max_seq_length, model_kwargs={"dtype": dtype}),
                Pooling(self.hidden_size, pooling_mode=self.pooling),
            ]
            if self.scaling_layer is not None:
                modules.append(
                    Dense(
                        self.hidden_size,
                        self.output_dim,
                        bias=True,
                        activation_function=nn.Identity(),
                        init_weight=state_dict["scaling_layer.weight"].detach().cpu(),
                        init_bias=state_dict["scaling_layer.bias"].detach().cpu(),
                    )
                )
            modules.append(Normalize())
            SentenceTransformer(modules=modules, prompts=self.prompts or None, device="cpu").save(str(path))
        # sentence-transformers 6 keeps the length only as the tokenizer's model_max_length; written here
        # too so that our loader and older sentence-transformers read it (e.g. after --extend_pe)
        transformer_config = path / "sentence_bert_config.json"
        config = json.loads(transformer_config.read_text())
        transformer_config.write_text(json.dumps({**config, "max_seq_length": self.max_seq_length}, indent=4))


def _dropped_pooler_state(backbone, dtype):
    """Zero weights for the pooler that EmbeddingModel dropped (BERT's), to be saved with the backbone.

    Every loader of the saved directory (sentence-transformers while we write it, then ours, mteb's, plain
    transformers) builds the class's pooler; without its weights in the checkpoint it would initialise one at
    random and print a MISSING report on every load. Nothing here uses the pooler: zeros say so.
    """
    if getattr(backbone, "pooler", False) is not None:  # no pooler in this class, or one that was kept
        return {}
    with torch.device("meta"):  # the class itself, shapes only: nothing allocated, no ZeRO-3 partitioning
        pooler = type(backbone)(backbone.config).pooler
    if pooler is None:
        return {}
    return {f"pooler.{name}": torch.zeros(value.shape, dtype=dtype) for name, value in pooler.state_dict().items()}


@contextlib.contextmanager
def model_load_errors(path):
    """A start model that cannot be loaded is bad input: one line naming it (exit 2), not a traceback."""
    if not Path(path).exists() and (str(path).startswith((".", "/", "~")) or str(path).count("/") > 1):
        raise UsageError(f"model {path}: no such directory")
    try:
        yield
    except UsageError:
        raise
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(f"model {path}: cannot be loaded: {str(error).strip().splitlines()[0]}") from None


VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                    "sentencepiece.bpe.model", "vocab.model")


def load_tokenizer(folder, **kwargs):
    """The tokenizer of a model folder, refused when the folder has no vocabulary: transformers would build a
    tokenizer of special tokens alone, every word would become [UNK], and the run would still succeed."""
    folder = Path(folder)
    if folder.is_dir() and not any((folder / name).is_file() for name in VOCABULARY_FILES):
        raise UsageError(f"model {folder}: no tokenizer files (none of {', '.join(VOCABULARY_FILES)}); copy the "
                         "tokenizer of the model it was trained from into the folder")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)) + 1:
        raise UsageError(f"model {folder}: its tokenizer knows {len(tokenizer)} tokens, only special ones")
    return tokenizer


def scaling_layer_for(layout, scaling_dim, hidden_size, path, backbone_dtype=torch.float32):
    """The directory's 2_Dense, or a fresh Linear(hidden -> scaling_dim) when it has none (semi-orthogonal,
    zero bias: cosines preserved when scaling_dim >= hidden); a mismatch is an error.

    float32, except under DeepSpeed ZeRO-3: there the backbone is built partitioned in the engine's
    dtype and ZeRO-3 flattens one dtype, so the layer follows the backbone (its fp32 master copy lives
    in the optimizer, as for every other weight).
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    scaling_layer = layout["dense"]
    if scaling_layer is not None and scaling_dim not in (None, scaling_layer.out_features):
        raise ValueError(
            f"{path}: its 2_Dense maps to {scaling_layer.out_features} dims but --scaling_dim is {scaling_dim}"
        )
    if scaling_layer is None and scaling_dim:
        scaling_layer = nn.Linear(hidden_size, scaling_dim, bias=True)
        # semi-orthogonal (W^T W = I when lifting, as Piccolo2's 1024 -> 1792) with zero bias: every cosine
        # similarity is the backbone's at step 0, so a new layer does not undo the start model
        nn.init.orthogonal_(scaling_layer.weight)
        nn.init.zeros_(scaling_layer.bias)
    if scaling_layer is not None and is_deepspeed_zero3_enabled():
        scaling_layer.to(backbone_dtype)
    return scaling_layer


@contextlib.contextmanager
def _without_zero3_loading():
    """Plain model loading for a while under DeepSpeed ZeRO-3.

    The export is written by the main process alone, and sentence-transformers reloads the saved model
    while writing it; transformers would build that model inside ``deepspeed.zero.Init``, whose
    collective calls the other processes never join.
    """
    from transformers.integrations import (
        is_deepspeed_zero3_enabled,
        unset_hf_deepspeed_config,
    )

    if not is_deepspeed_zero3_enabled():
        yield
        return
    from accelerate.state import AcceleratorState

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        AcceleratorState().deepspeed_plugin.set_deepspeed_weakref()  # back to what accelerate set up


def within_positions(backbone, length):
    """``length`` capped at the backbone's learned position table (a tokenizer's 512 on a 128-position model would
    crash on the first long text, and be saved as the model's max_seq_length); rotary / relative: as given."""
    from .position import learned_positions

    positions = learned_positions(backbone)
    return length if positions is None else min(length, positions)


def _read_sentence_transformers_layout(path: Path) -> dict:
    """Where the transformer, pooling and Dense of a sentence-transformers directory live.

    A plain transformers directory (no modules.json) yields the directory itself and no pooling.
    """
    layout = {"transformer_path": str(path), "pooling": None, "dense": None, "max_seq_length": None, "prompts": {}}
    modules_file = path / "modules.json"
    if not modules_file.exists():
        return layout
    for module in json.loads(modules_file.read_text()):
        kind = module["type"].rsplit(".", 1)[-1]
        module_dir = path / module["path"]
        if kind == "Transformer":
            layout["transformer_path"] = str(module_dir)
            for config_name in ("sentence_bert_config.json", "config_sentence_transformers.json"):
                config_file = module_dir / config_name
                if config_file.exists():
                    layout["max_seq_length"] = json.loads(config_file.read_text()).get("max_seq_length") or layout["max_seq_length"]
        elif kind == "Pooling":
            layout["pooling"] = _read_pooling_mode(module_dir / "config.json")
        elif kind == "Dense":
            if layout["dense"] is not None:
                raise ValueError(f"{path}: more than one Dense module; only a single ScalingLayer is supported")
            layout["dense"] = _read_dense(module_dir)
    st_config = path / "config_sentence_transformers.json"
    if st_config.exists():
        layout["prompts"] = json.loads(st_config.read_text()).get("prompts") or {}
        layout["prompts"] = {k: v for k, v in layout["prompts"].items() if v}
    return layout


def _read_pooling_mode(config_file: Path) -> str:
    config = json.loads(config_file.read_text())
    mode = config.get("pooling_mode")
    if mode is None:
        modes = [name for key, name in _ST_LEGACY_POOLING_KEYS.items() if config.get(key)]
        mode = modes[0] if len(modes) == 1 else None
    if mode not in POOLING_MODES:
        raise ValueError(f"{config_file}: pooling {config} is not one of {POOLING_MODES}")
    return mode


def _read_dense(module_dir: Path) -> nn.Linear:
    config = json.loads((module_dir / "config.json").read_text())
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")
    if activation not in _IDENTITY_ACTIVATIONS:
        raise ValueError(f"{module_dir}: Dense activation {activation} is not identity; a ScalingLayer is linear")
    weights_file = module_dir / "model.safetensors"
    if weights_file.exists():
        weights = load_file(str(weights_file))
    else:
        weights = torch.load(module_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    layer = nn.Linear(config["in_features"], config["out_features"], bias=config.get("bias", True))
    layer.load_state_dict({k.removeprefix("linear."): v for k, v in weights.items()})
    return layer


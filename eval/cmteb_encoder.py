"""`SentenceEncoder`: the mteb encoder around a SentenceTransformer (explicit prompts, Matryoshka truncation,
quantization, embeddings reused across a task's variants), and its refusal of non-finite embeddings."""

from __future__ import annotations

import hashlib
import sys
from typing import Any

import numpy as np
from mteb.models import ModelMeta
from mteb.models.abs_encoder import AbsEncoder, get_prompt_name
from mteb.models.model_meta import ScoringFunction
from mteb.types import PromptType
from sentence_transformers import SentenceTransformer

from cmteb_errors import ModelError
from cmteb_model import embedding_dimension
from modules.collator import cut_texts
from modules.quantization import FLOAT32, calibrated_ranges, mteb_vectors, truncate_embeddings


class SentenceEncoder(AbsEncoder):
    """mteb encoder around a SentenceTransformer, with explicit prompts, Matryoshka truncation and quantization.

    Each `encode` call passes all of its texts to `SentenceTransformer.encode`, which batches them sorted by
    length. With `reuse_embeddings`, full-size embeddings are kept (until `forget_embeddings`) so that each
    Matryoshka dimension and quantization of a task reuses one forward pass. The prompt given to every task and
    input kind is recorded in `prompts_used`.

    Quantized (`set_variant(dim, "int8" | "binary")`), `encode` returns `modules.quantization.mteb_vectors` of the
    truncated embeddings: int8 codes (ranges from the calibration embeddings cut to `dim`) or +-1 signs, for queries and
    documents alike, and mteb's similarity is cosine whatever the model's own: mteb's evaluators then score the cosine
    of the int8 codes, or a monotone map of the Hamming similarity (see that module).
    """

    def __init__(
        self,
        model: SentenceTransformer,
        meta: ModelMeta,
        prompts: dict[str, str],
        instruction_template: str | None = None,
        reuse_embeddings: bool = False,
        calibration: np.ndarray | None = None,
    ) -> None:
        self.model = model
        self.full_meta = meta
        self.mteb_model_meta = meta
        self.prompts = prompts
        self.instruction_template = instruction_template
        self.reuse_embeddings = reuse_embeddings
        self.calibration = calibration
        self.dim: int | None = None
        self.quantization = FLOAT32
        self.ranges: np.ndarray | None = None
        self.prompts_used: dict[str, dict[str, str | None]] = {}
        self._embeddings: dict[str, np.ndarray] = {}
        self.plain_progress = False  # a line per encoding (a log, not a terminal): evaluate_tasks sets it

    def set_variant(self, dim: int, quantization: str = FLOAT32) -> None:
        """Truncate embeddings to `dim` and quantize them from now on; each variant's results get their own mteb folder
        (experiments/embed_dim_<dim>__output_dtypes_<quantization>, mteb's names for both)."""
        self.dim = dim if dim < embedding_dimension(self.model) else None
        self.quantization = quantization
        self.ranges = calibrated_ranges(self.calibration, self.dim, quantization)
        experiment = {"embed_dim": self.dim} if self.dim else {}
        if quantization != FLOAT32:
            experiment["output_dtypes"] = quantization
        update: dict[str, Any] = {"experiment_kwargs": experiment} if experiment else {}
        if self.dim:
            update["embed_dim"] = self.dim
        if quantization != FLOAT32:
            update["similarity_fn_name"] = ScoringFunction.COSINE
        self.mteb_model_meta = self.full_meta.model_copy(update=update) if update else self.full_meta

    def forget_embeddings(self) -> None:
        self._embeddings.clear()

    def prompt_for(self, task_metadata: Any, prompt_type: PromptType | None) -> str | None:
        """The text prepended to inputs of this task and kind (query, document, or None for symmetric tasks).

        Order: a matching key in `prompts` (mteb's precedence: '<Task>-query', '<Task>', '<Type>-query',
        '<Type>', 'query'); else the instruction template filled with mteb's task instruction, except for
        documents; else the model's default prompt for symmetric inputs (sentence-transformers' rule).
        """
        key = get_prompt_name(self.prompts, task_metadata, prompt_type)
        if key is not None:
            return self.prompts[key]
        if self.instruction_template and prompt_type != PromptType.document:
            return self.get_task_instruction(task_metadata, prompt_type)
        default_name = self.model.default_prompt_name
        if prompt_type is None and default_name:
            return self.model.prompts.get(default_name) or None
        return None

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs) -> np.ndarray:
        texts = [text for batch in inputs for text in batch["text"]]
        if self.model.max_seq_length:  # a fast tokenizer reads a whole text before truncating: cut as training does
            texts = cut_texts(texts, self.model.max_seq_length)
        prompt = self.prompt_for(task_metadata, prompt_type)
        input_kind = prompt_type.value if prompt_type else "symmetric"
        self.prompts_used.setdefault(task_metadata.name, {})[input_kind] = prompt
        if self.plain_progress:
            print(f"C-MTEB: {task_metadata.name}: embedding {len(texts):,} {input_kind} texts", file=sys.stderr,
                  flush=True)
        embeddings = self._full_embeddings(
            texts,
            prompt,
            prompt_type,
            batch_size=kwargs.get("batch_size", 32),
            show_progress_bar=kwargs.get("show_progress_bar", True),
        )
        check_finite_embeddings(embeddings, texts, task_metadata.name, self.full_meta.name)
        return mteb_vectors(truncate_embeddings(embeddings, self.dim), self.quantization, self.ranges)

    def _full_embeddings(
        self, texts: list[str], prompt: str | None, prompt_type: PromptType | None, **encode_kwargs
    ) -> np.ndarray:
        key = content_key(texts, prompt, prompt_type)
        if key in self._embeddings:
            return self._embeddings[key]
        encode = {
            PromptType.query: self.model.encode_query,
            PromptType.document: self.model.encode_document,
        }.get(prompt_type, self.model.encode)
        # An explicit "" stops sentence-transformers from adding a prompt we did not choose and record.
        embeddings = np.asarray(
            encode(texts, prompt=prompt or "", convert_to_numpy=True, **encode_kwargs), dtype=np.float32
        )
        if self.reuse_embeddings:
            self._embeddings[key] = embeddings
        return embeddings


def check_finite_embeddings(embeddings: np.ndarray, texts: list[str], task_name: str, model_name: str) -> None:
    """Refuse NaN or infinite embeddings (e.g. fp16 overflow): mteb would fail on them or rank by noise."""
    bad = ~np.isfinite(embeddings).all(axis=1)
    if bad.any():
        first = texts[int(np.argmax(bad))]
        raise ModelError(
            f"model {model_name}: non-finite (NaN or infinite) embeddings for {int(bad.sum())} of {len(texts)} "
            f"texts of task {task_name}, e.g. {first[:60]!r} (half-precision overflow? try --precision fp32)."
        )


def content_key(texts: list[str], prompt: str | None, prompt_type: PromptType | None) -> str:
    digest = hashlib.sha1(f"{prompt_type}\x1e{prompt}".encode())
    for text in texts:
        digest.update(b"\x1f" + text.encode())
    return digest.hexdigest()

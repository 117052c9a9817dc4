"""The variants a C-MTEB run scores: Matryoshka dimensions (--dims) and embedding quantizations (--quantize), with
int8's calibration texts (--calibration), their embeddings and what the summary records of them."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from sentence_transformers import SentenceTransformer

from cmteb_errors import SetupError
from modules.cli import UsageError
from modules.collator import cut_texts
from modules.quantization import INT8, parse_dims, parse_quantizations, read_calibration_texts


def resolve_dims(dims: str | None, full_dim: int) -> list[int]:
    """Sorted Matryoshka dimensions to evaluate, always including the model's full dimension."""
    try:
        return parse_dims(dims, full_dim)
    except UsageError as error:
        raise SetupError(str(error)) from None


def resolve_quantizations(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(--quantize's quantizations, float32 first; --calibration's texts, [] without int8), checked before the model
    loads. The calibration file may not be data this run scores (inside --data-dir or a --local-task folder)."""
    try:
        quantizations = parse_quantizations(args.quantize, args.calibration)
    except UsageError as error:
        raise SetupError(str(error)) from None
    if INT8 not in quantizations:
        return quantizations, []
    calibration = Path(args.calibration).resolve()
    for folder in [*([args.data_dir] if args.data_dir else []), *(args.local_task or [])]:
        if Path(folder).resolve() in calibration.parents:
            raise SetupError(f"--calibration {args.calibration} lies in {folder}, data this run scores: calibrate "
                             "int8 on other texts, e.g. the training file.")
    return quantizations, read_calibration_texts(args.calibration)


def calibration_record(path: Path | None, texts: list[str]) -> dict[str, Any] | None:
    """What the summary records of int8's calibration set: the file, how many texts, a hash of those texts."""
    if not texts:
        return None
    digest = hashlib.sha256("\x1f".join(texts).encode()).hexdigest()[:12]
    return {"file": str(path), "texts": len(texts), "texts_hash": digest}


def calibration_embeddings(
    model: SentenceTransformer, texts: list[str], batch_size: int, progress: bool
) -> np.ndarray | None:
    """Full-size embeddings of --calibration's texts (no prompt, cut as `SentenceEncoder.encode` cuts texts); None
    without texts."""
    if not texts:
        return None
    if model.max_seq_length:
        texts = cut_texts(texts, model.max_seq_length)
    embeddings = model.encode(texts, prompt="", convert_to_numpy=True, batch_size=batch_size,
                              show_progress_bar=progress)
    return np.asarray(embeddings, dtype=np.float32)

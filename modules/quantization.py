"""Embeddings at a chosen size and precision, and the similarity each is scored by.

Size: Matryoshka truncation, the first ``dim`` coordinates re-normalised to unit length (Kusupati et al. 2022).
Precision (embedding quantization, not the dtype the model computes in), after sentence-transformers'
``quantize_embeddings`` (https://sbert.net/examples/applications/embedding-quantization; Shakir, Aarsen & Lee 2024,
"Binary and Scalar Embedding Quantization for Significantly Faster & Cheaper Retrieval",
https://huggingface.co/blog/embedding-quantization):

- ``float32``: the embedding as the model gives it; similarity: cosine (= dot of unit vectors).
- ``int8``: scalar quantization. Each dimension j gets 256 buckets between its minimum m_j and maximum M_j over a
  *calibration set* (never the data scored): code_j = clip(floor((x_j - m_j) / s_j), 0, 255) - 128 with
  s_j = (M_j - m_j) / 255 (s_j = 1 where M_j = m_j), in float32 as sentence-transformers computes it. Similarity:
  the cosine of the int8 code vectors, cos(q, d) = q.d / (|q| |d|), what an int8 index with the cosine metric
  computes (e.g. usearch ``Index(dtype="i8", metric="cos")``).
- ``binary``: one sign bit per dimension, b_j = [x_j > 0] (sentence-transformers' "binary" / "ubinary" pack these
  bits 8 to a byte). Similarity: the number of equal bits, dims - hamming(a, b), the Hamming distance a binary
  vector index ranks by (e.g. faiss ``IndexBinaryFlat``).

Queries and documents are quantized alike (symmetric quantization), with the same int8 ranges.

``mteb_vectors`` gives float vectors whose cosine, dot product and distances mteb's evaluators compute, so that
they score the quantized similarity: int8 codes as floats (mteb's cosine is the cosine of the codes), and bits as
+-1 signs, for which s_a.s_b = dims - 2 hamming(a, b) and cos = 1 - 2 hamming / dims, both increasing affine maps
of dims - hamming, so rank metrics (Spearman, nDCG, MAP, best-threshold accuracy) equal those of the Hamming
similarity and Pearson does too; a few constant coordinates appended to the signs make those values exact in
floating point (see ``mteb_vectors``).
"""

from math import isqrt
from pathlib import Path

import numpy as np

from .cli import DataError, UsageError
from .records import BadRecord, iter_raw_records, nonempty_text

FLOAT32, INT8, BINARY = "float32", "int8", "binary"
QUANTIZATIONS = (FLOAT32, INT8, BINARY)
# Distinct calibration texts used at most (file order); mteb's CompressionWrapper asks for 10,000 embeddings too.
CALIBRATION_TEXTS = 10_000
# Columns of the training and evaluation formats whose texts calibrate int8 (strings or lists of strings).
TEXT_COLUMNS = ("text", "text_pair", "text_pos", "text_neg", "sentence1", "sentence2")


# ---------------------------------------------------------------------------------------------------------
# Choices


def comma_list(values):
    """'a,b' or nargs' ['a,b', 'c'] (or [64, 128]) -> ['a', 'b', 'c'] (order kept, duplicates and empty items
    dropped); None -> []."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    items = [item.strip() for value in values for item in str(value).split(",")]
    return list(dict.fromkeys(item for item in items if item))


def parse_dims(dims, full_dim, flag="--dims"):
    """Sorted Matryoshka dimensions to score ('64,128' or [64, 128]), the model's full dimension always added."""
    try:
        requested = {int(dim) for dim in comma_list(dims)}
    except ValueError:
        raise UsageError(f"{flag} must be comma-separated integers, got {dims!r}.") from None
    invalid = sorted(dim for dim in requested if not 0 < dim <= full_dim)
    if invalid:
        raise UsageError(f"{flag} {invalid} outside 1..{full_dim} (the model's embedding dimension).")
    return sorted(requested | {full_dim})


def parse_quantizations(names, calibration=None, flag="--quantize"):
    """The quantizations to score ('int8,binary' or a list), float32 always first. int8 needs a calibration set: without
    one it is refused, never calibrated on the data it scores."""
    requested = comma_list(names)
    unknown = [name for name in requested if name not in QUANTIZATIONS]
    if unknown:
        raise UsageError(f"{flag}: unknown {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(QUANTIZATIONS[1:])}.")
    if INT8 in requested and calibration is None:
        raise UsageError(f"{flag} int8 needs --calibration FILE: texts (e.g. the training file) whose embeddings set "
                         "each dimension's range; the data scored never calibrates itself.")
    return [FLOAT32, *(name for name in QUANTIZATIONS[1:] if name in requested)]


def read_calibration_texts(path, limit=CALIBRATION_TEXTS):
    """The first ``limit`` distinct texts of a data file (JSONL, parquet, saved ``datasets``), from its ``TEXT_COLUMNS``
    (a string or a list of strings each); an empty or broken text is refused naming the line, as in training data."""
    texts = {}
    for where, record in iter_raw_records(Path(path)):
        for column in TEXT_COLUMNS:
            value = record.get(column) if isinstance(record, dict) else None
            for text in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
                if not isinstance(text, str):
                    raise BadRecord(where, f"column {column!r} must be a string or a list of strings")
                texts.setdefault(nonempty_text(text, repr(column), where))
                if len(texts) == limit:
                    return list(texts)
    if not texts:
        raise DataError(f"{path}: no texts to calibrate int8 with (columns {', '.join(TEXT_COLUMNS)})")
    return list(texts)


# ---------------------------------------------------------------------------------------------------------
# Size and precision


def truncate_embeddings(embeddings, dim):
    """The first ``dim`` coordinates re-normalised to unit length: x[:dim] / |x[:dim]|; the array itself for dim=None
    or a dim at least the full one."""
    if dim is None or dim >= embeddings.shape[1]:
        return embeddings
    truncated = embeddings[:, :dim]
    return truncated / np.clip(np.linalg.norm(truncated, axis=1, keepdims=True), 1e-12, None)


def int8_ranges(calibration_embeddings):
    """[2, dims] float32: each dimension's minimum and maximum over the calibration embeddings."""
    calibration = np.asarray(calibration_embeddings, dtype=np.float32)
    return np.stack([calibration.min(axis=0), calibration.max(axis=0)])


def calibrated_ranges(calibration_embeddings, dim, quantization):
    """int8's ranges at a Matryoshka dimension: those of the calibration embeddings cut to ``dim`` (and
    re-normalised, as the embeddings scored are); None for the other quantizations."""
    return int8_ranges(truncate_embeddings(calibration_embeddings, dim)) if quantization == INT8 else None


def quantize(embeddings, quantization, ranges=None):
    """float32: the embeddings; int8: int8 codes with the calibrated ``ranges`` (see the module docstring); binary:
    bool sign bits x > 0."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if quantization == FLOAT32:
        return embeddings
    if quantization == BINARY:
        return embeddings > 0
    if quantization != INT8:
        raise ValueError(f"unknown quantization {quantization!r}")
    if ranges is None:
        raise UsageError("int8 quantization needs the ranges of a calibration set")
    starts = ranges[0]
    steps = (ranges[1] - starts) / np.float32(255)
    steps = np.where(steps == 0, np.float32(1), steps)
    return (np.clip(np.floor((embeddings - starts) / steps), 0, 255) - 128).astype(np.int8)


def pairwise_similarity(first, second, quantization):
    """The similarity of each pair (row i of ``first`` and of ``second``, both from ``quantize``): cosine for float32
    (unit vectors) and for int8 codes, the number of equal bits for binary."""
    if quantization == BINARY:
        return (first == second).sum(axis=1)
    first, second = _unit_rows(first, quantization), _unit_rows(second, quantization)
    return np.einsum("ij,ij->i", first, second)


def similarity_matrix(queries, documents, quantization):
    """[queries, documents] similarities, as ``pairwise_similarity`` defines them; binary: (dims + s_q.s_d) / 2 with
    +-1 signs, an exact count of equal bits."""
    if quantization == BINARY:
        return (queries.shape[1] + _signs(queries) @ _signs(documents).T) / 2
    return _unit_rows(queries, quantization) @ _unit_rows(documents, quantization).T


def _unit_rows(vectors, quantization):
    """float32 embeddings as they are (unit length already); int8 codes in float64 divided by their length."""
    if quantization == FLOAT32:
        return vectors
    codes = vectors.astype(np.float64)
    return codes / np.clip(np.linalg.norm(codes, axis=1, keepdims=True), 1e-12, None)


def _signs(bits):
    return np.where(bits, np.float32(1), np.float32(-1))


# ---------------------------------------------------------------------------------------------------------
# For mteb's evaluators


def mteb_vectors(embeddings, quantization, ranges=None):
    """Float32 vectors on which mteb's similarities (cosine, dot, euclidean, manhattan) score the quantized ones.

    float32: the embeddings. int8: the codes as floats, so mteb's cosine is the cosine of the codes. binary: the +-1
    signs followed by at most four constant coordinates (the same in every vector) that make every vector's length a
    power of two. Those add the same constant to every dot product and leave differences alone: dot = 4^k - 2 hamming,
    cos = 1 - 2 hamming / 4^k, euclidean = 2 sqrt(hamming), manhattan = 2 hamming, every one a monotone map of the
    Hamming similarity. With a power-of-two length each value is computed exactly in floating point (1 / sqrt(dims)
    is not: pairs at one Hamming distance would get cosines a rounding apart, ordered by noise instead of tied).
    """
    codes = quantize(embeddings, quantization, ranges)
    if quantization == FLOAT32:
        return codes
    if quantization == INT8:
        return codes.astype(np.float32)
    padding = np.asarray(power_of_two_padding(codes.shape[1]), dtype=np.float32)
    return np.hstack([_signs(codes), np.broadcast_to(padding, (len(codes), len(padding)))])


def power_of_two_padding(dims):
    """At most four positive integers whose squares add up to 4^k - dims, 4^k the least power of four >= dims: a +-1
    vector of ``dims`` coordinates followed by them has length 2^k. Four always suffice (Lagrange's four-square
    theorem); the search tries the largest first."""
    power = 1
    while power < dims:
        power *= 4
    return _four_squares(power - dims)


def _four_squares(target, parts=4, largest=None):
    """Non-increasing positive integers (at most ``parts``, none above ``largest``) whose squares sum to ``target``;
    None when there are none."""
    if target == 0:
        return []
    top = isqrt(target) if largest is None else min(isqrt(target), largest)
    for first in range(top, 0, -1) if parts else ():
        rest = _four_squares(target - first * first, parts - 1, first)
        if rest is not None:
            return [first, *rest]
    return None

"""Score models on development sets: STS / pair files (Spearman x100) and BEIR-layout retrieval folders (nDCG@10),
at the full embedding or at chosen Matryoshka dimensions and embedding quantizations.

    python eval/dev_scores.py --model runs/demo/final --model BASE_MODEL_DIR
    python eval/dev_scores.py --model M --sts stsb=data/demo/stsb_dev.jsonl \
        --retrieval cranfield=data/demo/cranfield_dev
    python eval/dev_scores.py --model M --dims 64,128 --quantize int8,binary --calibration data/demo/stsb_train.jsonl

Without --sts / --retrieval the demo's bundled dev sets are scored: STS-B dev, SICK trial and the
Cranfield dev split (data/demo/). Prints a table, one row per model (per model, dimension and precision with
--dims / --quantize); the last line is one JSON object {model: {key: score}}: the key of the full embedding in
float32 is the set's name, as without those flags; "<set>@<dim>" scores the embedding cut to <dim> (re-normalised)
and "<set>@<dim>/<int8|binary>" that embedding quantized (<dim> the full one included), e.g. "stsb_dev@128",
"stsb_dev@384/binary". int8 and binary scores rank by the quantized similarity (modules/quantization.py): cosine of
the int8 codes, with ranges calibrated on --calibration's texts, and equal bits (dims - Hamming distance); retrieval
ties are broken in corpus order. For model selection during research, never for test sets.
"""

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEMO = REPO / "data" / "demo"
DEFAULT_STS = {"stsb_dev": DEMO / "stsb_dev.jsonl", "sick_trial": DEMO / "sick_trial.jsonl"}
DEFAULT_RETRIEVAL = {"cranfield_dev": DEMO / "cranfield_dev"}
CACHE_DIR = REPO / "runs" / "dev_scores_cache"
QUERY_MAX_LENGTH, PASSAGE_MAX_LENGTH, NDCG_AT = 64, 256, 10


def named_paths(values, flag):
    named = {}
    for value in values or []:
        name, separator, path = value.partition("=")
        if not separator or not name or not path:
            raise SystemExit(f"dev_scores.py: error: {flag} {value!r}: expected NAME=PATH")
        named[name] = Path(path)
    return named


def score_key(name, dim, quantization, full_dim):
    """The set's name for the full float32 embedding; "<name>@<dim>" and "<name>@<dim>/<quantization>" otherwise."""
    if quantization == "float32":
        return name if dim == full_dim else f"{name}@{dim}"
    return f"{name}@{dim}/{quantization}"


def score_model(path, sts_sets, retrieval_sets, max_length=128, dims=None, quantizations=None, calibration=None):
    """{key: score} of one saved model (any directory EmbeddingModel loads), keys as ``score_key`` names them.

    ``dims``: Matryoshka dimensions (ints or '64,128'; the full one is always scored); ``quantizations``: 'int8',
    'binary' (float32 is always scored); ``calibration``: a data file whose texts calibrate int8 (required for it,
    and never one of the scored sets). Without them: {set: score}, the full embedding in float32.
    """
    return flat_scores(*variant_scores(path, sts_sets, retrieval_sets, max_length, dims, quantizations, calibration))


def flat_scores(full_dim, by_variant):
    """{(dim, quantization): {set: score}} as {key: score}, set by set."""
    names = next(iter(by_variant.values()))
    return {score_key(name, dim, quantization, full_dim): scores[name]
            for name in names for (dim, quantization), scores in by_variant.items()}


def variant_scores(path, sts_sets, retrieval_sets, max_length=128, dims=None, quantizations=None, calibration=None):
    """(full dimension, {(dim, quantization): {set: score}}): every set scored at every dimension and precision, each
    text embedded once (modules.evaluation.variant_scores)."""
    from modules.evaluation import read_retrieval_folder, retrieval_ndcg, sts_spearman, variant_scores
    from modules.meta_list import MetaEntry
    from modules.model import EmbeddingModel
    from modules.quantization import INT8, parse_dims, parse_quantizations, read_calibration_texts
    from modules.task_datasets import load_task_dataset

    quantizations = parse_quantizations(quantizations, calibration)
    check_calibration_apart(calibration, sts_sets, retrieval_sets)
    model = EmbeddingModel.from_pretrained(path)
    tokenizer, query_prefix = model.tokenizer, model.prompts.get("query", "")
    variants = [(dim, quantization) for dim in parse_dims(dims, model.output_dim) for quantization in quantizations]
    texts = read_calibration_texts(calibration) if INT8 in quantizations else None
    if texts:
        print(f"int8 ranges of {path}: calibrated on {len(texts)} texts of {calibration}", file=sys.stderr)
    sts = {name: load_task_dataset(MetaEntry(Path(file), 1, kind="cosent"), {}).records
           for name, file in sts_sets.items()}
    retrieval = {name: read_retrieval_folder(folder) for name, folder in retrieval_sets.items()}

    def score(embed):
        scores = {name: sts_spearman(model, tokenizer, pairs, max_length, embed=embed) for name, pairs in sts.items()}
        scores.update({name: retrieval_ndcg(model, tokenizer, *data, QUERY_MAX_LENGTH, PASSAGE_MAX_LENGTH, NDCG_AT,
                                            query_prefix, embed) for name, data in retrieval.items()})
        return {name: round(float(value), 2) for name, value in scores.items()}

    rows = variant_scores(score, model, tokenizer, variants, texts, max_length)
    return model.output_dim, {(row["dim"], row["quantization"]): row["scores"] for row in rows}


def check_calibration_apart(calibration, sts_sets, retrieval_sets):
    """Refuse a calibration file that is one of the scored sets (or inside a scored retrieval folder)."""
    if calibration is None:
        return
    from modules.cli import UsageError

    file = Path(calibration).resolve()
    scored = {name: Path(path).resolve() for name, path in {**sts_sets, **retrieval_sets}.items()}
    for name, path in scored.items():
        if file == path or path in file.parents:
            raise UsageError(f"--calibration {calibration} is the scored set {name}: calibrate int8 on other texts, "
                             "e.g. the training file")


def cache_key(model, sts_sets, retrieval_sets, max_length, dims, quantizations, calibration):
    """A hash of everything a model's scores depend on: the model folder's files (its card, README.md, aside), the
    scored sets and the calibration file (names and contents), the settings, the scoring code (this script and
    modules/) and the torch / transformers versions. None for a model that is not a local folder."""
    import torch
    import transformers

    from modules.digests import files_digest, folder_files

    if not Path(model).is_dir():
        return None
    digest = files_digest(model, folder_files(model, lambda path: path.name != "README.md"))
    settings = {"sts": list(sts_sets), "retrieval": list(retrieval_sets), "max_length": max_length, "dims": dims,
                "quantize": quantizations, "versions": [torch.__version__, transformers.__version__]}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in [*sts_sets.values(), *retrieval_sets.values(), *([calibration] if calibration else [])]:
        path = Path(path)
        files = folder_files(path) if path.is_dir() else [path]
        files_digest(path if path.is_dir() else path.parent, files, digest)
    files_digest(REPO, [Path(__file__).resolve(), *folder_files(REPO / "modules", lambda p: p.suffix == ".py")],
                 digest)
    return digest.hexdigest()[:16]


def kept_scores(model, sts_sets, retrieval_sets, max_length, dims, quantizations, calibration, cache_dir):
    """``variant_scores`` of a model, kept in ``cache_dir``/<cache_key>.json and read from there while nothing they
    depend on changed (the start model's scores are computed once); ``cache_dir`` None: always computed."""
    key = cache_dir and cache_key(model, sts_sets, retrieval_sets, max_length, dims, quantizations, calibration)
    file = Path(cache_dir) / f"{key}.json" if key else None
    if file is not None and file.is_file():
        kept = json.loads(file.read_text())
        print(f"{model}: scores kept from an earlier run ({file}; same files, sets and code)", file=sys.stderr)
        return kept["full_dim"], {(row["dim"], row["quantization"]): row["scores"] for row in kept["variants"]}
    from modules.progress import embedding_progress

    print(f"{model}: scoring {', '.join([*sts_sets, *retrieval_sets])}", file=sys.stderr, flush=True)
    with embedding_progress(f"scoring {model}"):
        full_dim, by_variant = variant_scores(model, sts_sets, retrieval_sets, max_length, dims, quantizations,
                                              calibration)
    if file is not None:
        from modules.json_files import write_json

        file.parent.mkdir(parents=True, exist_ok=True)
        write_json(file, {"model": str(model), "full_dim": full_dim, "variants": [
            {"dim": dim, "quantization": quantization, "scores": scores}
            for (dim, quantization), scores in by_variant.items()]})
    return full_dim, by_variant


def table(results, names):
    """The printed table: a row per model, or per (model, dimension, precision) when more than the full float32
    embedding was scored."""
    rows = [(model, variant, scores) for model, by_variant in results.items() for variant, scores in by_variant.items()]
    width = max(len(model) for model, _, _ in rows)
    variants_shown = any(len(by_variant) > 1 for by_variant in results.values())
    head = f"{'model':{width}s}  " + (f"{'dim':>5s}  {'precision':9s}  " if variants_shown else "")
    lines = [head + "  ".join(f"{n:>14s}" for n in names)]
    for model, (dim, quantization), scores in rows:
        label = f"{model:{width}s}  " + (f"{dim:5d}  {quantization:9s}  " if variants_shown else "")
        lines.append(label + "  ".join(f"{scores[n]:14.2f}" for n in names))
    return lines


def main(argv=None):
    from modules.cli import ArgumentParser
    from modules.quantization import parse_quantizations

    parser = ArgumentParser(description=__doc__)  # defaults shown in --help
    parser.add_argument("--model", action="append", required=True, help="a saved model directory (repeatable)")
    parser.add_argument("--sts", action="append", help="NAME=FILE of text, text_pair, label (repeatable)")
    parser.add_argument("--retrieval", action="append", help="NAME=DIR in the BEIR layout (repeatable)")
    parser.add_argument("--dims", help="comma-separated Matryoshka dimensions, e.g. 64,128: also score the embedding "
                        "cut to each (re-normalised); the full dimension is always scored")
    parser.add_argument("--quantize", help="comma-separated embedding quantizations scored beside float32: int8 "
                        "(needs --calibration), binary. Not the dtype the model computes in")
    parser.add_argument("--calibration", type=Path, help="data file (JSONL, e.g. the training file) whose texts "
                        "calibrate int8's per-dimension ranges; never a scored set")
    parser.add_argument("--cache_dir", type=Path, default=CACHE_DIR, help="where scores are kept by a hash of the "
                        "model's files, the sets, the settings and the scoring code, and read back while none changed")
    parser.add_argument("--no_cache", action="store_true", help="score every model again (and keep nothing)")
    args = parser.parse_args(argv)
    parse_quantizations(args.quantize, args.calibration)  # refused before any model loads
    sts_sets, retrieval_sets = named_paths(args.sts, "--sts"), named_paths(args.retrieval, "--retrieval")
    if not sts_sets and not retrieval_sets:
        sts_sets, retrieval_sets = DEFAULT_STS, DEFAULT_RETRIEVAL
    results, flat = {}, {}
    for model in args.model:
        full_dim, results[model] = kept_scores(model, sts_sets, retrieval_sets, 128, args.dims, args.quantize,
                                               args.calibration, None if args.no_cache else args.cache_dir)
        flat[model] = flat_scores(full_dim, results[model])
    print("\n".join(table(results, [*sts_sets, *retrieval_sets])))
    print(json.dumps(flat))
    return flat


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from modules.cli import run_cli

    run_cli(main)

"""Embeddings at every size and precision (modules/quantization.py) and eval/dev_scores.py's scores of them.

int8 codes are checked against sentence-transformers' quantize_embeddings, binary similarities against the Hamming
distance of packed bits, and dev_scores.py's Spearman / nDCG@10 at the full dimension and at a Matryoshka one against
a direct computation from the same embeddings (sentence-transformers' quantization, numpy Hamming, a hand-written
Spearman and nDCG).
"""

import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import rankdata
from sklearn.metrics.pairwise import paired_cosine_distances, paired_euclidean_distances, paired_manhattan_distances

from modules.cli import DataError, UsageError
from modules.quantization import (
    int8_ranges,
    mteb_vectors,
    pairwise_similarity,
    parse_dims,
    parse_quantizations,
    power_of_two_padding,
    quantize,
    read_calibration_texts,
    similarity_matrix,
)
from tests.conftest import REPO, SENTENCES, minilm_path, write_jsonl

sys.path.insert(0, str(REPO / "eval"))
import dev_scores  # noqa: E402

DEMO = REPO / "data" / "demo"
DIM = 64  # the Matryoshka dimension checked beside the full one
SCORE_ROUNDING = 0.0051  # dev_scores.py rounds to 2 decimals


def st_quantize(embeddings, precision, calibration=None):
    """sentence-transformers' quantize_embeddings (its module moved in 5.x; the old path warns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from sentence_transformers.quantization import quantize_embeddings
    return quantize_embeddings(embeddings, precision=precision, calibration_embeddings=calibration)


def hamming_similarity(first, second):
    """dims - Hamming distance, from sentence-transformers' packed bits ("ubinary"): popcount of the XOR."""
    dims = first.shape[-1]
    packed_first, packed_second = st_quantize(first, "ubinary"), st_quantize(second, "ubinary")
    return dims - np.unpackbits(np.bitwise_xor(packed_first, packed_second), axis=-1).sum(axis=-1, dtype=np.int64)


def unit(vectors):
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def random_embeddings(rows, dims, seed):
    return unit(np.random.default_rng(seed).standard_normal((rows, dims))).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Quantization and similarity (no model)


def test_int8_codes_are_sentence_transformers_codes_with_the_calibration_ranges():
    calibration, embeddings = random_embeddings(300, 48, 0), random_embeddings(80, 48, 1)
    calibration[:, 5] = 0.25  # a constant dimension: one bucket of width 1, as sentence-transformers sets it
    embeddings[:3] *= 3  # outside the calibrated range: clipped to -128 / 127
    codes = quantize(embeddings, "int8", int8_ranges(calibration))
    assert codes.dtype == np.int8
    np.testing.assert_array_equal(codes, st_quantize(embeddings, "int8", calibration))
    assert {-128, 127} <= set(codes[:3].ravel().tolist())


def test_int8_similarity_is_the_cosine_of_the_codes():
    calibration, queries, documents = (random_embeddings(rows, 32, seed) for rows, seed in ((200, 0), (7, 1), (30, 2)))
    ranges = int8_ranges(calibration)
    query_codes, document_codes = (st_quantize(x, "int8", calibration).astype(np.float64) for x in (queries, documents))
    expected = unit(query_codes) @ unit(document_codes).T
    got = similarity_matrix(quantize(queries, "int8", ranges), quantize(documents, "int8", ranges), "int8")
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    pairs = pairwise_similarity(quantize(queries, "int8", ranges), quantize(documents[:7], "int8", ranges), "int8")
    np.testing.assert_allclose(pairs, np.diag(expected[:, :7]), rtol=0, atol=1e-12)


def test_binary_similarity_counts_equal_bits():
    first, second = random_embeddings(40, 100, 3), random_embeddings(40, 100, 4)  # 100 bits: not whole bytes
    bits_first, bits_second = quantize(first, "binary"), quantize(second, "binary")
    np.testing.assert_array_equal(pairwise_similarity(bits_first, bits_second, "binary"),
                                  hamming_similarity(first, second))
    matrix = similarity_matrix(bits_first, bits_second, "binary")
    np.testing.assert_array_equal(matrix, hamming_similarity(first[:, None, :], second[None, :, :]))


@pytest.mark.parametrize("dims", [64, 100, 128, 384])
def test_mteb_similarities_of_binary_vectors_are_exact_maps_of_hamming(dims):
    """Each similarity mteb's STS / pair classification / retrieval evaluators compute on mteb_vectors is an exact
    monotone map of the Hamming similarity: pairs at one distance tie (at 384 dims, +-1 / sqrt(384) does not)."""
    first, second = random_embeddings(2000, dims, 5), random_embeddings(2000, dims, 6)
    vectors_first, vectors_second = mteb_vectors(first, "binary"), mteb_vectors(second, "binary")
    length_squared = dims + sum(pad * pad for pad in power_of_two_padding(dims))
    hamming = dims - hamming_similarity(first, second)
    np.testing.assert_array_equal(1 - paired_cosine_distances(vectors_first, vectors_second),
                                  1 - 2 * hamming / length_squared)
    np.testing.assert_array_equal(paired_manhattan_distances(vectors_first, vectors_second), 2 * hamming)
    np.testing.assert_array_equal(paired_euclidean_distances(vectors_first, vectors_second),
                                  np.sqrt((4 * hamming).astype(np.float32)))
    np.testing.assert_array_equal((vectors_first * vectors_second).sum(axis=1), length_squared - 2 * hamming)
    cosines = torch.nn.functional.normalize(torch.from_numpy(vectors_first[:50]), dim=1) @ \
        torch.nn.functional.normalize(torch.from_numpy(vectors_second), dim=1).T  # mteb's cos_sim (retrieval)
    all_hamming = dims - hamming_similarity(first[:50, None, :], second[None, :, :])
    np.testing.assert_array_equal(cosines.numpy().astype(np.float64), 1 - 2 * all_hamming / length_squared)


def test_int8_mteb_vectors_are_the_codes():
    calibration, embeddings = random_embeddings(100, 16, 7), random_embeddings(10, 16, 8)
    vectors = mteb_vectors(embeddings, "int8", int8_ranges(calibration))
    assert vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors, st_quantize(embeddings, "int8", calibration))


def test_padding_makes_every_length_a_power_of_two():
    for dims in range(1, 4100):
        padding = power_of_two_padding(dims)
        length_squared = dims + sum(pad * pad for pad in padding)
        assert len(padding) <= 4 and all(pad > 0 for pad in padding)
        assert math.isqrt(length_squared) ** 2 == length_squared and length_squared & (length_squared - 1) == 0
        assert length_squared < 4 * dims or dims == 1
    assert power_of_two_padding(256) == [] and power_of_two_padding(384) == [24, 8]


def test_quantization_choices_and_int8_without_calibration_are_refused():
    assert parse_quantizations(None) == ["float32"]
    assert parse_quantizations("binary,int8", calibration="train.jsonl") == ["float32", "int8", "binary"]
    assert parse_quantizations(["binary"]) == ["float32", "binary"]
    with pytest.raises(UsageError, match="int8 needs --calibration FILE"):
        parse_quantizations("int8,binary")
    with pytest.raises(UsageError, match="unknown 'int4'"):
        parse_quantizations("int4")
    assert parse_dims("128,64", 384) == [64, 128, 384] and parse_dims([64], 384) == [64, 384]
    with pytest.raises(UsageError, match=r"--dims \[512\] outside 1..384"):
        parse_dims("64,512", 384)


def test_calibration_texts_come_from_the_text_columns_of_each_record(tmp_path):
    file = write_jsonl(tmp_path / "train.jsonl", [
        {"text": "a", "text_pair": "b", "label": 1.0},
        {"text": "q", "text_pos": ["b", "c"], "text_neg": ["d"], "type": "retri_contrast"},
        {"sentence1": "e", "sentence2": "a", "score": 3},
    ])
    assert read_calibration_texts(file) == ["a", "b", "q", "c", "d", "e"]
    assert read_calibration_texts(file, limit=3) == ["a", "b", "q"]
    write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"text": "b", "text_pair": "\u200b"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*empty 'text_pair'"):
        read_calibration_texts(tmp_path / "bad.jsonl")
    write_jsonl(tmp_path / "none.jsonl", [{"query": "a"}])
    with pytest.raises(DataError, match="no texts to calibrate int8 with"):
        read_calibration_texts(tmp_path / "none.jsonl")


# ---------------------------------------------------------------------------------------------------------
# eval/dev_scores.py against a direct computation (the packaged MiniLM, small bundled sets)


@pytest.fixture(scope="module")
def dev_sets(tmp_path_factory):
    """A 120-pair STS-B dev file, a Cranfield dev folder of 20 queries (their judged documents and 100 others) and
    a calibration file of 150 STS-B training pairs."""
    root = tmp_path_factory.mktemp("dev_sets")
    sts = root / "sts.jsonl"
    sts.write_text("".join((DEMO / "stsb_dev.jsonl").read_text().splitlines(keepends=True)[:120]))
    calibration = root / "calibration.jsonl"
    calibration.write_text("".join((DEMO / "stsb_train.jsonl").read_text().splitlines(keepends=True)[:150]))
    source, folder = DEMO / "cranfield_dev", root / "cranfield"
    qrels = [line.split("\t") for line in (source / "qrels.tsv").read_text().splitlines()[1:]]
    query_ids = list(dict.fromkeys(query for query, _, _ in qrels))[:20]
    kept = [(q, d, g) for q, d, g in qrels if q in query_ids]
    judged = {d for _, d, _ in kept}
    documents = [json.loads(line) for line in (source / "corpus.jsonl").read_text().splitlines()]
    others = [doc for doc in documents if doc["id"] not in judged][:100]
    write_jsonl(folder / "corpus.jsonl", [doc for doc in documents if doc["id"] in judged] + others)
    write_jsonl(folder / "queries.jsonl", [query for query in map(json.loads, (source / "queries.jsonl").read_text()
                                                                  .splitlines()) if query["id"] in query_ids])
    (folder / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in kept))
    return {"sts": sts, "retrieval": folder, "calibration": calibration}


@pytest.fixture(scope="module")
def quantized_scores(dev_sets):
    return dev_scores.score_model(minilm_path(), {"sts": dev_sets["sts"]}, {"cranfield": dev_sets["retrieval"]},
                                  dims=[DIM], quantizations=["int8", "binary"], calibration=dev_sets["calibration"])


@pytest.fixture(scope="module")
def embedded(dev_sets):
    """The embeddings dev_scores.py scores, computed here as it computes them (same texts, lengths and batches)."""
    from modules.evaluation import embed_texts, read_retrieval_folder
    from modules.meta_list import MetaEntry
    from modules.model import EmbeddingModel
    from modules.task_datasets import load_task_dataset

    model = EmbeddingModel.from_pretrained(minilm_path())

    def embed(texts, max_length):
        return embed_texts(model, model.tokenizer, texts, max_length).numpy()

    pairs = load_task_dataset(MetaEntry(dev_sets["sts"], 1, kind="cosent"), {}).records
    both = embed([p["text"] for p in pairs] + [p["text_pair"] for p in pairs], 128)
    queries, corpus, qrels = read_retrieval_folder(dev_sets["retrieval"])
    calibration_texts = [text for line in dev_sets["calibration"].read_text().splitlines()
                         for text in (json.loads(line)["text"], json.loads(line)["text_pair"])]
    return {"first": both[: len(pairs)], "second": both[len(pairs):], "gold": [p["label"] for p in pairs],
            "documents": embed(list(corpus.values()), 256), "queries": embed(list(queries.values()), 64),
            "doc_ids": list(corpus), "qrels": [qrels[q] for q in queries],
            "calibration": embed(list(dict.fromkeys(calibration_texts)), 128)}


def cut(embeddings, dim):
    return unit(embeddings[:, :dim]).astype(np.float32)


def spearman(scores, gold):
    """Pearson correlation of the ranks (ties: their mean rank), x100."""
    first, second = rankdata(scores), rankdata(gold)
    first, second = first - first.mean(), second - second.mean()
    return 100 * float((first * second).sum() / math.sqrt((first * first).sum() * (second * second).sum()))


def ndcg_at_10(similarities, doc_ids, qrels):
    """Mean nDCG@10 x100, graded gains, documents ranked by similarity, ties in corpus order."""
    values = []
    for row, relevant in zip(similarities, qrels, strict=True):
        ranking = sorted(range(len(doc_ids)), key=lambda index: (-row[index], index))[:10]
        dcg = sum(relevant.get(doc_ids[index], 0) / math.log2(rank + 2) for rank, index in enumerate(ranking))
        grades = sorted(relevant.values(), reverse=True)[:10]
        ideal = sum(grade / math.log2(rank + 2) for rank, grade in enumerate(grades))
        values.append(dcg / ideal)
    return 100 * float(np.mean(values))


def direct_similarities(embedded, dim, precision):
    """(STS pair similarities, query x document similarities) at this size and precision, computed here."""
    first, second, queries, documents = (cut(embedded[key], dim) for key in ("first", "second", "queries", "documents"))
    if precision == "binary":
        return (hamming_similarity(first, second),
                hamming_similarity(queries[:, None, :], documents[None, :, :]))
    calibration = cut(embedded["calibration"], dim)
    codes = [unit(st_quantize(x, "int8", calibration)) for x in (first, second, queries, documents)]
    return (codes[0] * codes[1]).sum(axis=1), codes[2] @ codes[3].T


@pytest.mark.parametrize("precision", ["int8", "binary"])
@pytest.mark.parametrize("dim", [DIM, 384])
def test_dev_scores_of_quantized_embeddings_match_a_direct_computation(quantized_scores, embedded, dim, precision):
    pair_similarities, matrix = direct_similarities(embedded, dim, precision)
    assert quantized_scores[f"sts@{dim}/{precision}"] == pytest.approx(spearman(pair_similarities, embedded["gold"]),
                                                                         abs=SCORE_ROUNDING)
    assert quantized_scores[f"cranfield@{dim}/{precision}"] == pytest.approx(
        ndcg_at_10(matrix, embedded["doc_ids"], embedded["qrels"]), abs=SCORE_ROUNDING)


def test_dev_scores_of_a_matryoshka_dimension_use_the_renormalised_prefix(quantized_scores, embedded):
    first, second = cut(embedded["first"], DIM), cut(embedded["second"], DIM)
    assert quantized_scores[f"sts@{DIM}"] == pytest.approx(spearman((first * second).sum(axis=1), embedded["gold"]),
                                                            abs=SCORE_ROUNDING)
    queries, documents = cut(embedded["queries"], DIM), cut(embedded["documents"], DIM)
    assert quantized_scores[f"cranfield@{DIM}"] == pytest.approx(
        ndcg_at_10(queries @ documents.T, embedded["doc_ids"], embedded["qrels"]), abs=SCORE_ROUNDING)


def test_score_model_keys_name_set_dimension_and_precision(quantized_scores):
    variants = [f"@{DIM}", f"@{DIM}/int8", f"@{DIM}/binary", "", "@384/int8", "@384/binary"]
    assert list(quantized_scores) == [f"{name}{variant}" for name in ("sts", "cranfield") for variant in variants]
    assert quantized_scores[f"sts@{DIM}/binary"] < quantized_scores["sts"]  # 64 bits lose some of 384 floats


def test_dev_scores_cli_prints_a_row_per_dimension_and_precision(dev_sets, quantized_scores, capsys):
    model = str(minilm_path())
    flat = dev_scores.main(["--no_cache", "--model", model, "--sts", f"sts={dev_sets['sts']}", "--dims", str(DIM),
                            "--quantize", "binary,int8", "--calibration", str(dev_sets["calibration"])])
    lines = capsys.readouterr().out.splitlines()
    assert json.loads(lines[-1]) == flat == {model: {key: score for key, score in quantized_scores.items()
                                                     if key.startswith("sts")}}
    assert lines[0].split() == ["model", "dim", "precision", "sts"]
    rows = [line.split() for line in lines[1:-1]]
    assert [row[1:3] for row in rows] == [[str(DIM), "float32"], [str(DIM), "int8"], [str(DIM), "binary"],
                                          ["384", "float32"], ["384", "int8"], ["384", "binary"]]
    assert float(rows[4][3]) == quantized_scores["sts@384/int8"]


def test_dev_scores_cli_default_layout_is_one_row_and_set_names(dev_sets, quantized_scores, capsys):
    model = str(minilm_path())
    flat = dev_scores.main(["--no_cache", "--model", model, "--sts", f"sts={dev_sets['sts']}"])
    lines = capsys.readouterr().out.splitlines()
    assert json.loads(lines[-1]) == flat == {model: {"sts": quantized_scores["sts"]}}
    assert lines[0].split() == ["model", "sts"] and lines[1].split() == [model, f"{quantized_scores['sts']:.2f}"]


def test_int8_without_calibration_or_calibrated_on_the_scored_set_is_refused(dev_sets, tmp_path):
    command = [sys.executable, str(REPO / "eval" / "dev_scores.py"), "--model", str(tmp_path / "nowhere"),
               "--quantize", "int8"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2  # refused before any model loads: the model path does not exist
    (line,) = completed.stderr.splitlines()
    assert line.startswith("dev_scores.py: error: --quantize int8 needs --calibration FILE")
    with pytest.raises(UsageError, match="is the scored set sts"):
        dev_scores.score_model(tmp_path / "nowhere", {"sts": dev_sets["sts"]}, {}, quantizations=["int8"],
                               calibration=dev_sets["sts"])
    with pytest.raises(UsageError, match="is the scored set cranfield"):
        dev_scores.score_model(tmp_path / "nowhere", {}, {"cranfield": dev_sets["retrieval"]},
                               quantizations=["int8"], calibration=dev_sets["retrieval"] / "corpus.jsonl")


# ---------------------------------------------------------------------------------------------------------
# A training run's final/ at --eval_dims x --eval_quantize on its dev sets


def test_a_run_scores_final_at_each_size_and_precision_on_its_dev_sets(tiny_bert, tiny_data, tmp_path):
    import train_finetune
    from modules.evaluation import embed_texts
    from modules.model import EmbeddingModel
    from tests.test_train_finetune import common_args

    calibration, dev = tiny_data / "retri.jsonl", tmp_path / "dev.jsonl"
    write_jsonl(dev, [{"text": s, "text_pair": SENTENCES[(3 * i + 1) % len(SENTENCES)], "label": float((i * 7) % 6)}
                      for i, s in enumerate(SENTENCES)])  # no text paired with itself: no cosine ties
    train_finetune.main(common_args(tiny_bert, tiny_data, tmp_path / "run", "--report_to", "none", "--num_workers",
                                    "0", "--max_steps", "2", "--eval_sts_file", str(dev),
                                    "--mrl_dims", "16,32", "--eval_quantize", "binary,int8",
                                    "--eval_calibration", str(calibration))[1:])
    rows = json.loads((tmp_path / "run" / "train_summary.json").read_text())["final_variants"]
    assert [(row["dim"], row["quantization"]) for row in rows] == [
        (dim, precision) for dim in (16, 32) for precision in ("float32", "int8", "binary")]  # --mrl_dims by default

    model = EmbeddingModel.from_pretrained(tmp_path / "run" / "final")
    pairs = [json.loads(line) for line in dev.read_text().splitlines()]
    both = embed_texts(model, model.tokenizer, [p["text"] for p in pairs] + [p["text_pair"] for p in pairs], 16)
    texts = list(dict.fromkeys(text for line in calibration.read_text().splitlines()
                               for record in [json.loads(line)] for text in [record["text"], *record["text_pos"],
                                                                            *record["text_neg"]]))
    calibration_embeddings = embed_texts(model, model.tokenizer, texts, 16).numpy()
    gold = [p["label"] for p in pairs]
    for row in rows:
        first, second = cut(both[: len(pairs)].numpy(), row["dim"]), cut(both[len(pairs):].numpy(), row["dim"])
        if row["quantization"] == "binary":
            similarities = hamming_similarity(first, second)
        elif row["quantization"] == "int8":
            codes = [unit(st_quantize(x, "int8", cut(calibration_embeddings, row["dim"]))) for x in (first, second)]
            similarities = (codes[0] * codes[1]).sum(axis=1)
        else:
            similarities = (first * second).sum(axis=1)
        assert row["scores"]["sts_spearman"] == pytest.approx(spearman(similarities, gold), abs=1e-6), row

    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "| Dev metric | Dim | float32 | int8 | binary |" in card
    binary_16 = next(row["scores"]["sts_spearman"] for row in rows if row["dim"] == 16 and row["quantization"] == "binary")
    assert f"| sts_spearman | 16 | " in card and f"{binary_16:.2f} |" in card


@pytest.mark.parametrize("flags, message", [
    (["--eval_quantize", "binary"], "--eval_dims / --eval_quantize score final/ on the dev sets"),
    (["--eval_sts_file", "STS", "--eval_quantize", "int8"], "--eval_quantize int8 needs --eval_calibration FILE"),
    (["--eval_sts_file", "STS", "--eval_quantize", "float16"], "--eval_quantize: unknown 'float16'"),
    (["--eval_sts_file", "STS", "--eval_dims", "16,x"], "--eval_dims must be a comma list of integers"),
    (["--eval_sts_file", "STS", "--eval_quantize", "int8", "--eval_calibration", "nowhere.jsonl"],
     "--eval_calibration nowhere.jsonl: no such file"),
])
def test_size_and_precision_flags_are_checked_before_the_run(tiny_bert, tiny_data, tmp_path, capsys, flags, message):
    import train_finetune
    from tests.test_train_finetune import common_args

    flags = [str(tiny_data / "sts.jsonl") if flag == "STS" else flag for flag in flags]
    with pytest.raises(SystemExit) as exit_info:
        train_finetune.main(common_args(tiny_bert, tiny_data, tmp_path / "run", *flags)[1:])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_dim_above_the_models_size_is_refused_before_training(tiny_bert, tiny_data, tmp_path, capsys):
    import train_finetune
    from tests.test_train_finetune import common_args

    with pytest.raises(UsageError, match=r"--eval_dims \[64\] outside 1..32 \(the model's embedding dimension\)"):
        train_finetune.main(common_args(tiny_bert, tiny_data, tmp_path, "--report_to", "none", "--eval_sts_file",
                                        str(tiny_data / "sts.jsonl"), "--eval_dims", "16,64")[1:])
    assert "step 1/" not in capsys.readouterr().err and not (tmp_path / "final").exists()


def test_dev_scores_keeps_a_models_scores_until_its_files_or_the_sets_change(dev_sets, tmp_path, monkeypatch, capsys):
    """make demo scores the start model every time, though its scores never change: they are kept by a hash of the
    model's files, the sets, the settings and the code, and computed again when any of those changes."""
    import shutil

    from modules.model import EmbeddingModel

    model = tmp_path / "model"
    shutil.copytree(minilm_path(), model)
    argv = ["--model", str(model), "--sts", f"sts={dev_sets['sts']}", "--cache_dir", str(tmp_path / "cache")]
    first = dev_scores.main(argv)
    capsys.readouterr()

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded again")

    monkeypatch.setattr(EmbeddingModel, "from_pretrained", no_loading)
    (model / "README.md").write_text("a rewritten card")  # eval/run_cmteb.py rewrites it: not what is scored
    assert dev_scores.main(argv) == first
    assert "scores kept from an earlier run" in capsys.readouterr().err
    monkeypatch.undo()

    shorter = tmp_path / "sts.jsonl"
    shorter.write_text("".join(dev_sets["sts"].read_text().splitlines(keepends=True)[:60]))
    changed = {"set": [*argv[:2], "--sts", f"sts={shorter}", *argv[4:]], "settings": [*argv, "--dims", "64"]}
    weights = model / "model.safetensors"
    for what, changed_argv in changed.items():
        assert dev_scores.main(changed_argv)[str(model)] != first[str(model)], what
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    name = next(key for key in tensors if key.endswith("word_embeddings.weight"))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, weights, metadata={"format": "pt"})
    capsys.readouterr()
    assert dev_scores.main(argv)[str(model)] != first[str(model)]
    assert "scores kept" not in capsys.readouterr().err
    assert len(list((tmp_path / "cache").glob("*.json"))) == 4

"""The query prefix a run trains with is the prompt final/ saves, and dev sets are embedded as final/ will be."""

import itertools
import json

import numpy as np
import pytest

from modules.evaluation import retrieval_scores
from modules.prompts import prompt_for, training_prompts
from modules.task_folders import read_task_folder
from tests.conftest import minilm_path, write_jsonl
from tests.test_dev_eval import cranfield_local  # noqa: F401 (a fixture)
from tests.test_llm_embed import one_thread, script_args, tiny_decoders  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def small_cranfield(cranfield_local, tmp_path_factory):  # noqa: F811
    """CranfieldLocal cut to 8 queries, the documents they judge and 20 others: a MiniLM scores it in seconds."""
    data = read_task_folder(cranfield_local).split_data("test")
    queries = dict(list(data["queries"].items())[:8])
    judged = {doc for query in queries for doc in data["qrels"][query]}
    kept = [doc for doc in data["corpus"] if doc in judged] + [doc for doc in data["corpus"] if doc not in judged][:20]
    folder = tmp_path_factory.mktemp("SmallCranfield")
    write_jsonl(folder / "corpus.jsonl", [{"_id": doc, **data["corpus"][doc]} for doc in kept])
    write_jsonl(folder / "queries.jsonl", [{"_id": query, "text": text} for query, text in queries.items()])
    (folder / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{query}\t{doc}\t{grade}\n" for query in queries for doc, grade in data["qrels"][query].items()))
    (folder / "task.json").write_text(json.dumps({"name": "SmallCranfield", "type": "Retrieval", "splits": ["test"]}))
    return folder


def saved_model_ndcg(model_dir, task_folder):
    """nDCG@10 of a task folder as sentence-transformers embeds it with the saved prompts: queries by encode_query,
    documents by encode_document."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    data = read_task_folder(task_folder).split_data("test")
    documents = model.encode_document([f"{d['title']} {d['text']}".strip() for d in data["corpus"].values()],
                                      convert_to_tensor=True, normalize_embeddings=True)
    queries = model.encode_query(list(data["queries"].values()), convert_to_tensor=True, normalize_embeddings=True)
    position = {doc: i for i, doc in enumerate(data["corpus"])}
    relevant = [{position[d]: g for d, g in data["qrels"][q].items()} for q in data["queries"]]
    return retrieval_scores(queries.float(), documents.float(), relevant, ["ndcg_at_10"])["ndcg_at_10"]


def test_prompt_for_picks_the_prompt_mteb_picks():
    """Every mix of the keys mteb looks up: the same prompt as mteb's get_prompt_name."""
    from mteb.models.abs_encoder import get_prompt_name
    from mteb.types import PromptType

    class Metadata:
        name, type = "CranfieldLocal", "Retrieval"

    keys = ["CranfieldLocal-query", "CranfieldLocal", "Retrieval-query", "Retrieval", "query", "document", "STS"]
    for held in itertools.chain.from_iterable(itertools.combinations(keys, n) for n in range(len(keys) + 1)):
        prompts = {key: f"<{key}> " for key in held}
        for input_type in (None, PromptType.query, PromptType.document):
            name = get_prompt_name(prompts, Metadata, input_type)
            ours = prompt_for(prompts, Metadata.name, Metadata.type, input_type and input_type.value)
            assert ours == (prompts[name] if name else ""), (held, input_type)


@pytest.mark.parametrize("query_prefix, file_prefixes, start_prompts, expected_query", [
    ("query: ", {}, {}, "query: "),  # --query_prefix
    (None, {"retri": "Represent: ", "cls": "Represent: "}, {}, "Represent: "),  # every contrastive dataset's prefix
    (None, {"retri": "Represent: "}, {}, None),  # cls trains without a prefix
    (None, {"retri": "a: ", "cls": "b: "}, {}, None),  # two prefixes: each under its dataset's name only
    (None, {}, {"query": "query: "}, "query: "),  # the start model's own, trained with
    ("", {}, {"query": "query: "}, ""),  # trained without: the start model's prompt must not ship
])
def test_the_saved_query_prompt_is_the_trained_prefix(query_prefix, file_prefixes, start_prompts, expected_query):
    datasets = [("retri", "retri_contrast"), ("cls", "cls_contrast"), ("sts", "cosent")]
    prefixes, prompts = training_prompts(start_prompts, query_prefix, file_prefixes, datasets)
    assert prompts.get("query") == expected_query
    default = query_prefix if query_prefix is not None else start_prompts.get("query", "")
    assert prefixes == {"retri": file_prefixes.get("retri", default), "cls": file_prefixes.get("cls", default),
                        "sts": ""}
    assert all(prompts[name] == prefix for name, prefix in file_prefixes.items())


def test_minilm_run_saves_its_query_prefix_and_scores_dev_retrieval_as_the_saved_model(small_cranfield, tmp_path):
    """The packaged MiniLM trained 2 steps with --query_prefix: final/'s "query" prompt is the prefix, and the step-2
    dev nDCG@10 is what sentence-transformers' encode_query / encode_document give on final/."""
    import train_finetune

    root = tmp_path / "data"
    write_jsonl(root / "pairs.jsonl", [{"text": f"what is topic {i}", "text_pos": f"a passage about topic {i}"}
                                       for i in range(8)])
    (root / "meta.txt").write_text("pairs.jsonl 1 type=retri_contrast\n")
    train_finetune.main([
        "--model_name_or_path", str(minilm_path()), "--meta_list", str(root / "meta.txt"), "--output_dir",
        str(tmp_path / "run"), "--retri_batch_size", "4", "--retri_negatives", "0", "--max_steps", "2",
        "--lr", "1e-4", "--query_prefix", "query: ", "--query_max_len", "64", "--passage_max_len", "256",
        "--eval_dir", str(small_cranfield), "--report_to", "none", "--num_workers", "0"])
    final = tmp_path / "run" / "final"
    prompts = json.loads((final / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts["query"] == "query: "
    scored = json.loads((tmp_path / "run" / "eval_results.json").read_text())["metrics_by_step"]["2"]
    assert scored["SmallCranfield/ndcg_at_10"] == pytest.approx(saved_model_ndcg(final, small_cranfield), abs=1e-3)


def test_llm_instruction_run_scores_dev_retrieval_with_the_instruction_final_carries(tiny_decoders, tiny_data,  # noqa: F811
                                                                                    cranfield_local, tmp_path,  # noqa: F811
                                                                                    monkeypatch):
    """train_llm_embed.py --instruction_template: the dev queries are embedded with the saved "query" prompt (the
    default task's instruction), as sentence-transformers and mteb embed them with final/."""
    import modules.evaluation
    import train_llm_embed

    embedded, real = [], modules.evaluation.embed_texts
    monkeypatch.setattr(modules.evaluation, "embed_texts", lambda m, t, texts, *a, **k: embedded.append(texts) or
                        real(m, t, texts, *a, **k))
    train_llm_embed.main(script_args(tiny_decoders, tiny_data, tmp_path, "--max_steps", "1", "--instruction_template",
                                     "Instruct: {task}\\nQuery: ", "--default_task", "Find the passage",
                                     "--eval_dir", str(cranfield_local), "--report_to", "none"))
    prompts = json.loads((tmp_path / "final" / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts["query"] == "Instruct: Find the passage\nQuery: "
    queries = list(read_task_folder(cranfield_local).split_data("test")["queries"].values())
    query_batches = [texts for texts in embedded if len(texts) == len(queries)]
    assert query_batches and all(texts == [prompts["query"] + q for q in queries] for texts in query_batches)
    assert np.isfinite(json.loads((tmp_path / "eval_results.json").read_text())["metrics_by_step"]["1"][
        "CranfieldLocal/ndcg_at_10"])

"""final/README.md: the model card a run writes, its C-MTEB section filled by eval/run_cmteb.py, and a quiet save."""

import json
import logging
import shlex
import shutil
import sys

import pytest
import yaml

from modules.model import EmbeddingModel
from tests.conftest import REPO, SENTENCES, shared_data
from tests.test_train_finetune import common_args


def front_matter_and_body(card_path):
    _, front, body = card_path.read_text(encoding="utf-8").split("---\n", 2)
    return yaml.safe_load(front), body


def table_row(body, first_cell):
    rows = [line for line in body.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, (first_cell, rows)
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


@pytest.fixture(scope="module")
def finetune_run(tiny_bert, tiny_data, tmp_path_factory):
    """A 3-step fine-tune (in-process) on the tiny data, its STS pairs under a folder named like the shared en-stsb."""
    import train_finetune

    root = tmp_path_factory.mktemp("card_run")
    (root / "en-stsb").mkdir()
    shutil.copy(tiny_data / "sts.jsonl", root / "en-stsb" / "train.jsonl")
    (root / "meta.txt").write_text(f"{tiny_data / 'retri.jsonl'} 2 type=retri_contrast\n{tiny_data / 'cls.jsonl'} 1\n"
                                   "en-stsb/train.jsonl 1 type=cosent\n")
    argv = common_args(tiny_bert, tiny_data, root / "out", "--max_steps", "3", "--cosent_weight", "0.5",
                       "--eval_sts_file", str(tiny_data / "sts.jsonl"))
    argv[argv.index("--meta_list") + 1] = str(root / "meta.txt")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", argv)  # what a launched script sees; run_config.json records it
        train_finetune.main(argv[1:])
    return root / "out", argv


def test_finetune_card_front_matter(finetune_run, tiny_bert):
    output_dir, _ = finetune_run
    front, _ = front_matter_and_body(output_dir / "final" / "README.md")
    assert front["library_name"] == "sentence-transformers" and front["pipeline_tag"] == "sentence-similarity"
    assert front["base_model"] == tiny_bert.name  # a local start model without a hub id in its config.json
    assert "sentence-transformers" in front["tags"]
    assert front["mteb_training_datasets"] == ["STSBenchmark"]  # from the en-stsb folder
    assert front["language"] == ["en"]
    assert set(front["datasets"]) == {"retri", "cls", "train"}


def test_finetune_card_describes_data_losses_training_and_dev_scores(finetune_run, tiny_bert):
    output_dir, argv = finetune_run
    _, body = front_matter_and_body(output_dir / "final" / "README.md")
    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert f"Base model: {tiny_bert.name}" in body and str(tiny_bert) in body
    assert "Output dimension: 32" in body and "Pooling: mean" in body

    assert {d["name"] for d in summary["datasets"]} == {"retri", "cls", "train"}, "summary['datasets'] is missing"
    for dataset in summary["datasets"]:
        row = table_row(body, dataset["name"])
        assert row[1:4] == [dataset["kind"], str(dataset["records"]), f"{100 * dataset['share']:.1f}%"], row
    assert "STSBenchmark" in table_row(body, "train")

    # losses: temperature and relative weight (cosent 0.5 of retrieval's 1.0)
    assert table_row(body, "retri_contrast")[1:] == ["InfoNCE, in-batch + 1 hard negative(s) per query", "0.01", "1"]
    assert table_row(body, "cls_contrast")[1:] == ["InfoNCE, its 2 negative(s) only (no in-batch)", "0.05", "0.2"]
    assert table_row(body, "cosent")[1:] == ["CoSENT", "0.05", "0.5"]

    assert "Steps: 3" in body and "Learning rate: 0.001" in body and "Warmup steps: 1 (0.2 of the steps)" in body
    assert shlex.join(argv) in body

    eval_results = json.loads((output_dir / "eval_results.json").read_text())["sts_spearman_by_step"]
    last = eval_results[str(max(map(int, eval_results)))]
    assert "| Spearman x 100 (sts.jsonl) |" in body and f"{last:.2f}" in table_row(body, "Spearman x 100 (sts.jsonl)")
    assert "Not evaluated yet" in body  # the C-MTEB section waits for eval/run_cmteb.py


def test_pretraining_card_names_its_sources_and_in_batch_loss(tmp_path):
    import train_pretrain
    from modules.model_card import write_model_card

    args = train_pretrain.parse_args(["--model_name_or_path", "org/start-model", "--meta_list", "m.txt",
                                      "--output_dir", str(tmp_path), "--max_steps", "10", "--symmetric",
                                      "--mini_batch_size", "64", "--temperature", "0.02"])
    summary = {"steps": 9, "processes": 2,
               "sources": [{"name": "zh-lcqmc", "path": "/data/zh-lcqmc/dev.jsonl", "weight": 3.0, "share": 0.75,
                            "batches": 7}, {"name": "web", "path": "/data/web", "weight": 1.0, "share": 0.25}]}
    card = write_model_card(tmp_path, args, summary, {})
    front, body = front_matter_and_body(card)
    assert front["base_model"] == "org/start-model" and front["mteb_training_datasets"] == ["LCQMC"]
    assert front["language"] == ["zh"]
    assert table_row(body, "zh-lcqmc")[1:4] == ["3", "75.0%", "7"] and table_row(body, "web")[1:4] == ["1", "25.0%", ""]
    assert "temperature 0.02" in body and "symmetric" in body and "GradCache mini batches of 64 rows" in body
    assert "Steps: 10" in body and "Processes: 2" in body


def test_base_model_is_the_hub_id_a_local_start_model_came_from(tmp_path):
    from modules.model_card import base_model_name

    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "config.json").write_text(json.dumps({"_name_or_path": "nreimers/MiniLM-L6-H384-uncased"}))
    assert base_model_name(tmp_path / "local") == "nreimers/MiniLM-L6-H384-uncased"
    (tmp_path / "local" / "config.json").write_text(json.dumps({"_name_or_path": "/old/machine/checkpoint"}))
    assert base_model_name(tmp_path / "local") == "local"
    assert base_model_name("BAAI/bge-base-zh-v1.5") == "BAAI/bge-base-zh-v1.5"


def test_base_model_of_a_sentence_transformers_directory_is_the_model_not_its_backbones_origin():
    """The packaged all-MiniLM-L6-v2's config.json names the MiniLM it was trained from; its card names the model."""
    from modules.model_card import base_model_name
    from tests.conftest import minilm_path

    assert base_model_name(minilm_path()) == "sentence-transformers/all-MiniLM-L6-v2"


def test_the_cmteb_task_names_are_mteb_benchmarks(tmp_path):
    import mteb

    from modules.model_card import CMTEB_BENCHMARK, CMTEB_TASKS, KNOWN_DATA

    assert set(CMTEB_TASKS) == {task.metadata.name for task in mteb.get_benchmark(CMTEB_BENCHMARK).tasks}
    for _, tasks in KNOWN_DATA.values():
        for name in tasks:
            assert mteb.get_task(name).metadata.name == name


# ---------------------------------------------------------------------------------------------------------
# C-MTEB section from eval/run_cmteb.py


def test_run_cmteb_fills_the_cards_cmteb_section(tiny_bert, tmp_path):
    sys.path.insert(0, str(REPO / "eval"))
    import _eval_fixtures as fixtures
    import run_cmteb

    import train_finetune
    from modules.model_card import write_model_card

    model_dir = tmp_path / "final"
    EmbeddingModel.from_pretrained(tiny_bert, max_seq_length=32).save_pretrained(model_dir)
    args = train_finetune.parse_args(["--model_name_or_path", str(tiny_bert), "--meta_list", "m.txt",
                                      "--output_dir", str(tmp_path / "run")])
    write_model_card(model_dir, args, {}, {})
    for task in ("STSB", "LCQMC"):
        fixtures.build_sts_task(shared_data(f"zh-{task.lower()}/dev.jsonl"), tmp_path / "tasks" / task, "test", 40)

    def evaluate(*tasks):
        return run_cmteb.run(["--model", str(model_dir), "--data-dir", str(tmp_path / "tasks"), "--tasks", *tasks,
                              "--output-dir", str(tmp_path / f"cmteb-{len(tasks)}"), "--no-progress"])

    evaluate("STSB")
    summary = evaluate("STSB", "LCQMC")  # a second run replaces the section
    card = (model_dir / "README.md").read_text(encoding="utf-8")
    assert card.count("## C-MTEB") == 1 and "Not evaluated yet" not in card
    assert "Partial: 2 of the 31 MTEB(cmn, v1) tasks" in card
    row = table_row(card, str(summary["model"]["embedding_dim"]))
    assert row[1:3] == [f"{summary['average']:.2f}", f"{summary['types']['STS']:.2f}"]
    assert f"| STS | LCQMC | {summary['tasks']['LCQMC']:.2f} |" in card
    yaml.safe_load(card.split("---\n", 2)[1])  # the front matter is untouched


def test_a_card_that_is_not_ours_is_left_alone(tmp_path):
    from modules.model_card import update_cmteb_section

    (tmp_path / "README.md").write_text("---\nlibrary_name: sentence-transformers\n---\n# SentenceTransformer\n")
    before = (tmp_path / "README.md").read_text()
    assert not update_cmteb_section(tmp_path, {"tasks": {"STSB": 50.0}})
    assert (tmp_path / "README.md").read_text() == before
    assert not update_cmteb_section(tmp_path / "missing", {"tasks": {}})


# ---------------------------------------------------------------------------------------------------------
# Saving


def test_saving_reports_no_missing_pooler(tiny_bert, tmp_path, capfd, caplog):
    """EmbeddingModel drops BERT's pooler; sentence-transformers reloads what we save and, without one, printed
    a 'pooler.dense MISSING ... newly initialized' table on every save."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = EmbeddingModel.from_pretrained(tiny_bert)
    ours = model.encode(SENTENCES)
    capfd.readouterr()
    with caplog.at_level(logging.INFO):
        model.save_pretrained(tmp_path / "saved")
        theirs = SentenceTransformer(str(tmp_path / "saved"), device="cpu").encode(SENTENCES, convert_to_tensor=True)
        reloaded = EmbeddingModel.from_pretrained(tmp_path / "saved").encode(SENTENCES)
    captured = capfd.readouterr()
    for text in (captured.out, captured.err, caplog.text):
        assert "MISSING" not in text and "newly initialized" not in text and "UNEXPECTED" not in text, text
    assert torch.allclose(ours, theirs, atol=1e-5) and torch.allclose(ours, reloaded, atol=1e-6)

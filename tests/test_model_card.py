"""final/README.md: the model card a run writes, its C-MTEB section filled by eval/run_cmteb.py, and a quiet save."""

import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from modules.model import EmbeddingModel
from tests.conftest import REPO, SENTENCES, minilm_path, shared_data
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
    """A 3-step fine-tune (in-process) on the tiny data, its STS pairs under a folder named like the shared en-stsb;
    a checkpoint at step 2."""
    import train_finetune

    root = tmp_path_factory.mktemp("card_run")
    (root / "en-stsb").mkdir()
    shutil.copy(tiny_data / "sts.jsonl", root / "en-stsb" / "train.jsonl")
    (root / "meta.txt").write_text(f"{tiny_data / 'retri.jsonl'} 2 type=retri_contrast\n{tiny_data / 'cls.jsonl'} 1\n"
                                   "en-stsb/train.jsonl 1 type=cosent\n")
    argv = common_args(tiny_bert, tiny_data, root / "out", "--max_steps", "3", "--cosent_weight", "0.5",
                       "--eval_sts_file", str(tiny_data / "sts.jsonl"), "--save_every", "2")
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
    assert "datasets" not in front  # the hub's key for hub ids: these are local files (listed in the card's body)
    assert front["license"] == "other"  # the data's terms, in the body


def test_finetune_card_describes_data_losses_training_and_dev_scores(finetune_run, tiny_bert):
    output_dir, argv = finetune_run
    _, body = front_matter_and_body(output_dir / "final" / "README.md")
    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert f"Base model: {tiny_bert.name}" in body and str(tiny_bert) not in body
    assert "Output dimension: 32" in body and "Pooling: mean" in body

    assert {d["name"] for d in summary["datasets"]} == {"retri", "cls", "train"}, "summary['datasets'] is missing"
    for dataset in summary["datasets"]:
        row = table_row(body, dataset["name"])
        assert row[1:5] == [Path(dataset["path"]).name, dataset["kind"], str(dataset["records"]),
                            f"{100 * dataset['share']:.1f}%"], row
    assert "STSBenchmark" in table_row(body, "train")

    # losses: temperature and relative weight (cosent 0.5 of retrieval's 1.0)
    assert table_row(body, "retri_contrast")[1:] == ["InfoNCE, in-batch + 1 hard negative(s) per query", "0.01", "1"]
    assert table_row(body, "cls_contrast")[1:] == ["InfoNCE, its 2 negative(s) only (no in-batch)", "0.05", "0.2"]
    assert table_row(body, "cosent")[1:] == ["CoSENT", "0.05", "0.5"]

    assert "Steps: 3" in body and "Learning rate: 0.001" in body and "Warmup steps: 1 (0.2 of the steps)" in body
    assert "train_finetune.py --model_name_or_path tiny_bert0 --meta_list meta.txt --output_dir out" in body

    eval_results = json.loads((output_dir / "eval_results.json").read_text())["sts_spearman_by_step"]
    first, last = (eval_results[str(step)] for step in (0, max(map(int, eval_results))))
    assert table_row(body, "sts.jsonl")[1:] == ["whole file", "Spearman x 100", f"{first:.2f}", f"{last:.2f}"]
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
    assert table_row(body, "zh-lcqmc")[1:5] == ["dev.jsonl", "3", "75.0%", "7"]
    assert table_row(body, "web")[1:5] == ["web", "1", "25.0%", ""]
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


def carded_model(tiny_bert, tmp_path):
    """tmp_path/final: the tiny BERT saved with a training card (no C-MTEB section yet); returns it and the fixtures
    module that builds task folders."""
    sys.path.insert(0, str(REPO / "eval"))
    import _eval_fixtures as fixtures

    import train_finetune
    from modules.model_card import write_model_card

    model_dir = tmp_path / "final"
    EmbeddingModel.from_pretrained(tiny_bert, max_seq_length=32).save_pretrained(model_dir)
    args = train_finetune.parse_args(["--model_name_or_path", str(tiny_bert), "--meta_list", "m.txt",
                                      "--output_dir", str(tmp_path / "run")])
    write_model_card(model_dir, args, {}, {})
    return model_dir, fixtures


def test_run_cmteb_fills_the_cards_cmteb_section(tiny_bert, tmp_path):
    model_dir, fixtures = carded_model(tiny_bert, tmp_path)
    import run_cmteb  # eval/, on the path now
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
    assert str(tmp_path) not in card and "data: tasks;" in card  # the --data-dir, by name
    yaml.safe_load(card.split("---\n", 2)[1])  # the front matter is untouched


def test_run_cmteb_writes_each_task_at_every_size_and_precision_into_the_card(tiny_bert, tmp_path):
    model_dir, fixtures = carded_model(tiny_bert, tmp_path)
    import run_cmteb  # eval/, on the path now
    fixtures.build_sts_task(shared_data("zh-stsb/dev.jsonl"), tmp_path / "tasks" / "STSB", "test", 40)
    calibration = tmp_path / "train.jsonl"
    calibration.write_text("".join((REPO / "data/demo/stsb_train.jsonl").read_text().splitlines(keepends=True)[:30]))
    summary = run_cmteb.run(["--model", str(model_dir), "--data-dir", str(tmp_path / "tasks"), "--tasks", "STSB",
                             "--dims", "16", "--quantize", "int8,binary", "--calibration", str(calibration),
                             "--output-dir", str(tmp_path / "cmteb"), "--no-progress"])
    card = (model_dir / "README.md").read_text(encoding="utf-8")
    cmteb = card.split("<!-- C-MTEB section: begin -->")[1].split("<!-- C-MTEB section: end -->")[0]
    assert "| Task | Dim | float32 | int8 | binary |" in cmteb
    assert f"int8: cosine of the codes, ranges from {summary['settings']['calibration']['texts']} texts of " \
           f"`{calibration.name}`" in cmteb and str(tmp_path) not in cmteb
    quantized = {(row["dim"], row["quantization"]): row for row in summary["quantized"]}
    for dim, float_row in zip((16, 32), summary["dims"], strict=True):
        scores = [float_row, quantized[(dim, "int8")], quantized[(dim, "binary")]]
        assert table_row(cmteb, f"STSB | {dim}")[2:] == [f"{row['tasks']['STSB']:.2f}" for row in scores]
        assert table_row(cmteb, f"Average | {dim}")[2:] == [f"{row['average']:.2f}" for row in scores]
    assert table_row(cmteb, "32")[1] == f"{summary['average']:.2f}"  # the float32 table as before


def test_the_precision_table_without_dims_has_a_row_per_task_at_the_full_dimension():
    from modules.model_card import precision_table

    summary = {"model": {"embedding_dim": 384}, "tasks": {"STSB": 80.0, "LCQMC": 70.0}, "average": 75.0,
               "quantized": [{"dim": 384, "quantization": "binary", "tasks": {"STSB": 77.0, "LCQMC": None},
                              "average": 77.0}]}
    assert precision_table(summary).splitlines() == [
        "| Task | Dim | float32 | binary |", "|---|---:|---:|---:|", "| Average | 384 | 75.00 | 77.00 |",
        "| STSB | 384 | 80.00 | 77.00 |", "| LCQMC | 384 | 70.00 | n/a |"]


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


# ---------------------------------------------------------------------------------------------------------
# A card one can publish: no machine paths, the data's terms, local dev scores apart, every option that
# changes the weights, which weights final/ holds, how to encode queries


def script_parser(script):
    """The ArgumentParser a training script's parse_args builds, caught as it starts parsing."""
    import train_finetune
    import train_llm_embed
    import train_pretrain
    from modules.cli import ArgumentParser

    parse = {"train_finetune.py": train_finetune.parse_args, "train_pretrain.py": train_pretrain.parse_args,
             "train_llm_embed.py": lambda argv: train_finetune.parse_args(argv, train_llm_embed.add_llm_arguments,
                                                                          decoder=True)}[script]

    class Caught(Exception):
        pass

    def catch(parser, *_, **__):
        raise Caught(parser)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ArgumentParser, "parse_args", catch)
        with pytest.raises(Caught) as caught:
            parse([])
    return caught.value.args[0]


def flags_of(parser):
    """{dest: option string} of every flag (not --help)."""
    return {action.dest: action.option_strings[0] for action in parser._actions
            if action.option_strings and action.dest != "help"}


def section(body, heading):
    """The text of the card's section that starts with ``heading`` (up to the next section)."""
    assert body.count(f"\n{heading}\n") == 1, heading
    return body.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]


def write_run(run_dir, command, args, summary, eval_history=None):
    """A run's output dir as a card sees it: run_config.json with its command line, and final/ with the card."""
    from modules.model_card import write_model_card

    (run_dir / "final").mkdir(parents=True, exist_ok=True)
    (run_dir / "run_config.json").write_text(json.dumps({"command": command, "args": vars(args)}, default=str))
    return front_matter_and_body(write_model_card(run_dir / "final", args, summary, eval_history))


def test_the_card_of_a_run_given_absolute_paths_shows_no_machine_path(tiny_bert, tmp_path, monkeypatch):
    """Inside the run: relative to its output dir; outside given relative: as given; outside absolute: the name."""
    import train_finetune

    monkeypatch.chdir(REPO)
    run_dir, demo = tmp_path / "runs" / "en-run", REPO / "data" / "demo"
    argv = ["--model_name_or_path", str(minilm_path()), "--meta_list", str(tmp_path / "meta.txt"),
            f"--output_dir={run_dir}", "--eval_sts_file", str(demo / "stsb_dev.jsonl"),
            "--eval_dir", str(demo / "cranfield_dev"), "--eval_every", "2", "--teacher_model", str(tiny_bert),
            "--distill_weight", "0.5", "--query_prefix_file", str(tmp_path / "prefixes.json"),
            "--metric_for_best", "CranfieldDev/ndcg_at_10", "--final_is_best"]
    args = train_finetune.parse_args(argv)
    summary = {"steps": 4, "datasets": [
        {"name": "en-sick/train", "path": str(shared_data("en-sick/train.jsonl")), "kind": "cosent", "records": 9},
        {"name": "stsb_train", "path": str(demo / "stsb_train.jsonl"), "kind": "cosent", "records": 9},
        {"name": "sick_retrieval", "path": "meta_lists/../data/demo/sick_retrieval.jsonl", "kind": "retri_contrast",
         "records": 9}],
        # as runs before the final_weights contract wrote it: an absolute path
        "best": {"metric": "CranfieldDev/ndcg_at_10", "step": 2, "value": 50.0,
                 "checkpoint": str(run_dir / "checkpoint-2")}}
    history = {0: {"sts_spearman": 80.0, "CranfieldDev/ndcg_at_10": 40.0},
               2: {"sts_spearman": 81.0, "CranfieldDev/ndcg_at_10": 50.0}}
    _, body = write_run(run_dir, [str(REPO / "train_finetune.py"), *argv], args, summary, history)
    card = (run_dir / "final" / "README.md").read_text(encoding="utf-8")

    for machine in (str(tmp_path), os.getcwd(), str(Path.home()), str(REPO), str(shared_data()), sys.prefix,
                    "site-packages"):
        assert machine not in card, machine
    assert not re.findall(r"(?:^|[\s`'\"(=\[])/[\w.~-]", card, re.MULTILINE)  # no absolute path of any kind
    command = ("train_finetune.py --model_name_or_path model --meta_list meta.txt --output_dir=en-run "
               "--eval_sts_file stsb_dev.jsonl --eval_dir cranfield_dev")
    assert command in body
    assert table_row(body, "en-sick/train")[1] == "train.jsonl"  # outside the run, absolute: the name
    assert table_row(body, "sick_retrieval")[1] == "data/demo/sick_retrieval.jsonl"  # relative: as given
    assert "`checkpoint-2`" in body  # in the run: relative to its output dir
    assert "scored by tiny_bert0" in body


def test_data_terms_come_from_the_readme_beside_each_file(tmp_path):
    """Shared data folders state 'Licence / terms as stated: ...'; data/demo's README a table ('as above': the row
    before) and a sentence for all its files; a file without a README has no stated terms."""
    from modules.data_licences import data_terms, non_commercial

    assert data_terms(shared_data("en-sick/train.jsonl")) == "CC BY-NC-SA 3.0 (as released by the SICK authors)."
    assert data_terms(shared_data("en-cranfield-retrieval")).startswith("Freely distributed for research")
    demo = REPO / "data" / "demo"
    everything = "its README: Research and non-commercial use."
    assert data_terms(demo / "sick_train.jsonl") == f"CC BY-NC-SA 3.0; shared under the same licence ({everything})"
    assert data_terms(demo / "cranfield_train.jsonl") == f"free for research (Glasgow IR) ({everything})"
    assert data_terms(demo / "cranfield_dev") == f"free for research (Glasgow IR) ({everything})"
    (tmp_path / "own.jsonl").write_text("{}\n")
    assert data_terms(tmp_path / "own.jsonl") is None and data_terms(tmp_path / "missing.jsonl") is None

    assert non_commercial(data_terms(shared_data("en-msrp/train.jsonl")))  # "(non-commercial research)"
    assert non_commercial(data_terms(shared_data("zh-ocnli/train.jsonl")))  # "CC BY-NC 2.0"
    assert not non_commercial(data_terms(shared_data("en-stsb/train.jsonl")))
    assert not non_commercial(data_terms(shared_data("zh-pawsx/dev.jsonl")))


def test_the_card_gives_each_datasets_terms_and_says_when_they_rule_out_commercial_use(tmp_path):
    import train_finetune

    args = train_finetune.parse_args(["--model_name_or_path", "org/start", "--meta_list", "m.txt",
                                      "--output_dir", str(tmp_path / "run")])
    rows = [{"name": "en-sick/train", "path": str(shared_data("en-sick/train.jsonl")), "kind": "cosent"},
            {"name": "en-msrp/train", "path": str(shared_data("en-msrp/train.jsonl")), "kind": "cosent"},
            {"name": "en-stsb/train", "path": str(shared_data("en-stsb/train.jsonl")), "kind": "cosent"},
            {"name": "own", "path": str(tmp_path / "own.jsonl"), "kind": "cosent"}]
    front, body = write_run(tmp_path / "run", ["train_finetune.py"], args, {"datasets": rows})
    assert "datasets" not in front and front["license"] == "other"
    terms = section(body, "## Licence")
    assert "- en-sick/train (`train.jsonl`): CC BY-NC-SA 3.0 (as released by the SICK authors)." in terms
    assert "- own (`own.jsonl`): unknown (no terms in a README beside it)" in terms
    assert "Research and non-commercial use only" in terms and "en-sick/train, en-msrp/train" in terms

    front, body = write_run(tmp_path / "run", ["train_finetune.py"], args, {"datasets": rows[2:3]})
    assert front["license"] == "other" and "non-commercial" not in section(body, "## Licence")
    front, body = write_run(tmp_path / "run", ["train_finetune.py"], args, {})  # no data recorded: no terms to state
    assert "license" not in front


def test_dev_scores_are_apart_from_cmteb_and_name_each_set_split_and_metric(tmp_path):
    import train_finetune

    demo = REPO / "data" / "demo"
    tasks = tmp_path / "two_splits"
    tasks.mkdir()
    (tasks / "task.json").write_text(json.dumps({"name": "TwoSplits", "type": "STS", "language": ["eng"],
                                                 "splits": ["dev", "test"]}))
    args = train_finetune.parse_args(["--model_name_or_path", "org/start", "--meta_list", "m.txt",
                                      "--output_dir", str(tmp_path / "run"), "--eval_sts_file",
                                      str(demo / "sick_trial.jsonl"), "--eval_dir", str(demo / "cranfield_dev"),
                                      "--eval_dir", str(tasks)])
    history = {0: {"sts_spearman": 70.0, "CranfieldDev/ndcg_at_10": 30.0, "TwoSplits/test/cosine_spearman": 60.0},
               "5": {"sts_spearman": 75.0, "CranfieldDev/ndcg_at_10": 35.0, "TwoSplits/test/cosine_spearman": 65.0}}
    _, body = write_run(tmp_path / "run", ["train_finetune.py"], args, {"steps": 5}, history)
    dev = section(body, "## Dev scores (local dev sets, not C-MTEB)")
    assert body.index("## Dev scores") < body.index("## C-MTEB")
    assert "| Dev set | Split | Metric | step 0 (start model) | step 5 |" in dev
    assert table_row(dev, "sick_trial.jsonl")[1:] == ["whole file", "Spearman x 100", "70.00", "75.00"]
    assert table_row(dev, "CranfieldDev")[1:] == ["dev", "ndcg_at_10 x 100", "30.00", "35.00"]  # split from task.json
    assert table_row(dev, "TwoSplits")[1:] == ["test", "cosine_spearman x 100", "60.00", "65.00"]
    cmteb = section(body, "## C-MTEB")
    assert "CranfieldDev" not in cmteb and "Spearman" not in cmteb


def test_every_option_of_every_script_is_listed_when_given_unless_it_cannot_change_the_weights(tmp_path):
    """A flag added later is listed when a run gives it, unless it joins WEIGHTLESS_FLAGS."""
    from modules.run_options import WEIGHTLESS_FLAGS

    every = set()
    for script, required in (("train_finetune.py", []), ("train_llm_embed.py", []),
                             ("train_pretrain.py", ["--max_steps", "10"])):
        parser = script_parser(script)
        flags = flags_of(parser)
        every |= set(flags)
        args = parser.parse_args(["--model_name_or_path", "org/start", "--meta_list", "m.txt",
                                  "--output_dir", str(tmp_path / script), *required])
        _, body = write_run(tmp_path / script, [script, *flags.values()], args, {})
        listed = section(body, "## Options that can change the weights")
        for dest, option in flags.items():
            assert (f"`{option}" in listed) == (dest not in WEIGHTLESS_FLAGS), (script, option)
    assert WEIGHTLESS_FLAGS <= every, WEIGHTLESS_FLAGS - every  # no stale names


def test_the_card_describes_ema_false_negative_masks_and_the_teacher(tmp_path):
    import train_finetune

    argv = ["--model_name_or_path", "org/start", "--meta_list", "m.txt", "--output_dir", str(tmp_path / "run"),
            "--ema", "0.999", "--mask_duplicates", "--mask_margin=0.1", "--mask_relative", "0.95",
            "--hard_negative_alpha", "5", "--improved_contrastive", "--teacher_model", "org/teacher",
            "--distill_weight", "0.5", "--teacher_temperature", "0.02", "--save_every", "100", "--log_every", "5",
            "--report_to", "none", "--num_workers", "4"]
    args = train_finetune.parse_args(argv)
    _, body = write_run(tmp_path / "run", ["train_finetune.py", *argv], args, {"steps": 100})
    listed = section(body, "## Options that can change the weights")
    for shown in ("`--ema_decay 0.999`", "`--mask_duplicates`", "`--mask_margin 0.1`", "`--mask_relative 0.95`",
                  "`--hard_negative_alpha 5`", "`--improved_contrastive`", "`--teacher_model org/teacher`",
                  "`--distill_weight 0.5`", "`--teacher_temperature 0.02`", "`--model_name_or_path org/start`"):
        assert shown in listed, shown
    for weightless in ("--save_every", "--log_every", "--report_to", "--num_workers", "--output_dir"):
        assert weightless not in listed
    losses = section(body, "## Losses")
    assert ("False negatives dropped from each query's softmax: candidates whose text equals the query or one of its "
            "positives (--mask_duplicates); candidates above the positive's cosine + 0.1 (--mask_margin); candidates "
            "above 0.95 x the positive's cosine (--mask_relative)") in losses
    assert "own hard negatives weighted by exp(5 x cosine)" in losses and "--improved_contrastive" in losses
    assert "scored by org/teacher; teacher temperature 0.02" in losses
    # without train_summary.json's final_weights (runs before it) the start model's share is not known
    assert ("Weights: the exponential moving average (decay 0.999) of the weights at step 100, the last step"
            in section(body, "## Model"))


def test_the_card_says_which_weights_final_holds_and_scores_them(tmp_path):
    """EMA, --final_is_best and WiSE-FT together: the step columns score the weights before WiSE-FT, final/ after."""
    import train_finetune

    args = train_finetune.parse_args(["--model_name_or_path", "org/start", "--meta_list", "m.txt", "--output_dir",
                                      str(tmp_path / "run"), "--wise_ft_alpha", "0.7", "--ema_decay", "0.999",
                                      "--eval_dir", str(REPO / "data" / "demo" / "cranfield_dev"), "--eval_every", "60",
                                      "--metric_for_best", "CranfieldDev/ndcg_at_10", "--final_is_best"])
    metric = "CranfieldDev/ndcg_at_10"
    summary = {"steps": 180, "final_weights": {"step": 120, "chosen_by": f"best {metric} (--final_is_best)",
                                               "ema_decay": 0.999, "ema_start_share": 0.0123, "wise_ft_alpha": 0.7},
               "final_scores": {metric: 44.5}, "best": {"metric": metric, "step": 120, "value": 46.0,
                                                        "checkpoint": "checkpoint-120"}}
    history = {step: {metric: value} for step, value in ((0, 40.0), (60, 42.0), (120, 46.0), (180, 45.0))}
    _, body = write_run(tmp_path / "run", ["train_finetune.py"], args, summary, history)
    holds = ("Weights: the exponential moving average (decay 0.999; the start model's share 0.0123) of the "
             f"weights at step 120, the best {metric} (--final_is_best), then averaged 0.7 / 0.3 with the start model "
             "(WiSE-FT)")
    assert holds in section(body, "## Model")
    dev = section(body, "## Dev scores (local dev sets, not C-MTEB)")
    assert "| Dev set | Split | Metric | step 0 (start model) | step 120 | final/ |" in dev
    assert table_row(dev, "CranfieldDev")[3:] == ["40.00", "46.00", "44.50"]
    assert "before the WiSE-FT average" in dev and "Scores of the trained weights" not in dev
    assert f"Best {metric}: 46.00 at step 120 (`checkpoint-120`" in dev

    summary["final_weights"] = {"step": 0, "chosen_by": f"best {metric} (--final_is_best)"}
    _, body = write_run(tmp_path / "run", ["train_finetune.py"], args, summary, history)
    assert f"**Training did not beat the start model on {metric}: these are the start model's weights.**" in body
    assert f"Weights: the start model's, unchanged (step 0, the best {metric} (--final_is_best))" in body
    assert "| step 0 (start model) | final/ |" in section(body, "## Dev scores (local dev sets, not C-MTEB)")


def test_a_card_without_the_final_weights_record_says_what_its_arguments_imply(tmp_path):
    """Runs written before train_summary.json held final_weights: the last step, WiSE-FT from the arguments."""
    import train_finetune

    args = train_finetune.parse_args(["--model_name_or_path", "org/start", "--meta_list", "m.txt", "--output_dir",
                                      str(tmp_path / "run"), "--wise_ft_alpha", "0.5", "--eval_sts_file", "dev.jsonl"])
    history = {"0": {"sts_spearman": 70.0}, "3": {"sts_spearman": 72.0}, "6": {"sts_spearman": 74.0}}
    _, body = write_run(tmp_path / "run", ["train_finetune.py"], args, {"steps": 6}, history)
    assert ("Weights: as trained at step 6, the last step, then averaged 0.5 / 0.5 with the start model "
            "(WiSE-FT)") in body
    dev = section(body, "## Dev scores (local dev sets, not C-MTEB)")
    assert table_row(dev, "dev.jsonl")[3:] == ["70.00", "74.00"]
    assert "final/ itself (after the WiSE-FT average) was not scored" in dev


def test_usage_encodes_queries_with_the_saved_query_prompt(tiny_bert, tmp_path):
    """final/ saves the query prefix as the prompt named 'query': the card shows encode_query / encode_document,
    which apply it (and no prompt to documents)."""
    import torch
    from sentence_transformers import SentenceTransformer

    import train_finetune

    args = train_finetune.parse_args(["--model_name_or_path", str(tiny_bert), "--meta_list", "m.txt",
                                      "--output_dir", str(tmp_path / "run"), "--query_prefix", "query: "])
    model = EmbeddingModel.from_pretrained(tiny_bert, max_seq_length=32)
    model.prompts["query"] = "query: "
    model.save_pretrained(tmp_path / "run" / "final")
    _, body = write_run(tmp_path / "run", ["train_finetune.py"], args, {})
    usage = section(body, "## Usage")
    assert 'model.encode_query(["' in usage and 'model.encode_document(["' in usage
    assert "the prompt named \"query\" ('query: ')" in usage and "mteb" in usage

    loaded = SentenceTransformer(str(tmp_path / "run" / "final"), device="cpu")
    assert torch.allclose(loaded.encode_query(SENTENCES[:2], convert_to_tensor=True),
                          loaded.encode(["query: " + s for s in SENTENCES[:2]], convert_to_tensor=True))
    assert torch.allclose(loaded.encode_document(SENTENCES[:2], convert_to_tensor=True),
                          loaded.encode(SENTENCES[:2], convert_to_tensor=True))


def test_an_exported_checkpoints_card_says_so_and_keeps_the_runs_data_terms(finetune_run, tmp_path):
    from modules.export import export_checkpoint

    output_dir, _ = finetune_run
    export_checkpoint(output_dir / "checkpoint-2", tmp_path / "exported", no_wise_ft=False, step=2)
    front, body = front_matter_and_body(tmp_path / "exported" / "README.md")
    assert "Weights: as trained at step 2, the exported checkpoint" in body
    assert front["license"] == "other" and "- train (`train.jsonl`): unknown" in section(body, "## Licence")

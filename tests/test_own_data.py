"""README's "Your own data, start to finish" runs as written: its command block, at tiny size (the tiny random BERT,
4 steps, short texts), from a BEIR folder to a dev task folder, mined negatives, a run scored on the dev task with
its best checkpoint kept, that checkpoint exported and scored by eval/run_cmteb.py. The lines are read from the
README, so the walkthrough cannot drift from the tools."""

import json
import os
import re
import subprocess

from tests.conftest import REPO, shared_data

SECTION = "## Your own data, start to finish"


def walkthrough_commands():
    """The section's bash block as one command per line (continuations joined, comments and blank lines dropped)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text[text.index(SECTION):], re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [" ".join(line.split()) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def tiny(command, work):
    """A README line at tiny size: the run's folder in ``work``, 4 steps scored every 2, 16-token texts."""
    command = command.replace("runs/own", str(work))
    command = command.replace("--max_steps 60", "--max_steps 4").replace("--eval_every 20", "--eval_every 2")
    if "mine_hard_negatives.py" in command or "train_finetune.py" in command:
        command += " --query_max_len 16 --passage_max_len 16"
    if "run_cmteb.py" in command:
        command += f" --output-dir {work / 'cmteb'} --no-progress"
    return command


def test_the_own_data_walkthrough_runs_as_written(tiny_bert, tmp_path):
    shared_data("en-cranfield-retrieval")  # fails clearly without ../shared/data
    commands = walkthrough_commands()
    assert commands[0].startswith("MINILM=$(") and len(commands) == 7, commands
    env = dict(os.environ, MINILM=str(tiny_bert), PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    work = tmp_path / "own"
    for command in commands[1:]:
        result = subprocess.run(["bash", "-c", tiny(command, work)], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-3000:])

    task = json.loads((work / "train_dev" / "task.json").read_text())
    dev_queries = {json.loads(line)["text"] for line in (work / "train_dev" / "queries.jsonl").read_text().splitlines()}
    trained = [json.loads(line) for line in (work / "mined.jsonl").read_text().splitlines()]
    assert task["name"] == "EnCranfieldRetrievalDev" and len(dev_queries) == 40
    assert trained and not dev_queries & {record["text"] for record in trained}  # no dev query is trained on
    assert all(len(record["text_neg"]) == 3 for record in trained)
    history = json.loads((work / "run" / "eval_results.json").read_text())["metrics_by_step"]
    assert sorted(history, key=int) == ["0", "2", "4"]
    best = json.loads((work / "run" / "train_summary.json").read_text())["best"]
    assert [path.name for path in (work / "run").glob("checkpoint-*")] == [best["checkpoint"]]
    assert (work / "best" / "model.safetensors").is_file()
    summary = json.loads((work / "cmteb" / "summary.json").read_text())
    assert 0 <= summary["tasks"]["EnCranfieldRetrievalDev"] <= 100  # scored with the model's own lengths

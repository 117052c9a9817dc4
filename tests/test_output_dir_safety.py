"""An --output_dir holds one run at a time and never loses a run's inputs (issue 26): a run's main process locks the
dir for the life of the run, a second run is refused naming the holder (also with --overwrite_output_dir or
--resume_from_checkpoint), a killed run leaves nothing held; --overwrite_output_dir refuses to empty a dir that
holds an input of the run, and the refusal of a used dir does not suggest it then."""

import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO, write_jsonl
from tests.test_train_finetune import common_args


def run(args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def assert_refused(result, *expected):
    """Exit 2, no traceback, the last line naming what is wrong."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    for text in expected:
        assert text in last, (text, last)


def hold_in_child(output_dir):
    """A process that takes ``output_dir``'s lock as a run does and keeps it until it is killed."""
    code = ("import sys, time; from modules.run_lock import lock_output_dir; lock = lock_output_dir(sys.argv[1]); "
            "print('held', flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code, str(output_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert child.stdout.readline().strip() == "held"
    return child


def kill(child):
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    child.stdout.close()


def holder_named(pid):
    return f"is in use by another run (pid {pid} on host {socket.gethostname()}, started "


# --------------------------------------------------------------------------- the lock


@pytest.mark.parametrize("script, flags", [
    ("train_finetune.py", []),
    ("train_finetune.py", ["--overwrite_output_dir"]),
    ("train_finetune.py", ["--resume_from_checkpoint", "latest"]),
    ("train_pretrain.py", ["--overwrite_output_dir", "--max_steps", "1"]),
])
def test_a_second_run_is_refused_while_the_first_holds_the_dir(tiny_bert, tiny_data, tmp_path, script, flags):
    """The test process holds the lock as a running run does; the second run touches nothing in the dir."""
    from modules.run_lock import lock_output_dir

    out = tmp_path / "run"
    first = lock_output_dir(out)
    if flags:  # what the first run has written so far
        (out / "run_config.json").write_text("{}")
    argv = [script, *common_args(tiny_bert, tiny_data, out)[1:7], *flags]
    assert_refused(run(argv), f"error: --output_dir {out} {holder_named(os.getpid())}", "choose another directory")
    assert sorted(p.name for p in out.iterdir()) == [".run.lock"] + (["run_config.json"] if flags else [])
    first.release()


def test_only_the_main_process_of_a_run_locks_and_a_killed_holder_frees_the_dir(tmp_path, monkeypatch):
    """The other processes of a run (RANK / LOCAL_RANK > 0) parse the same flags: they must not be refused by their
    own run's lock, held by rank 0."""
    from argparse import Namespace

    from modules.cli import UsageError
    from modules.flags import claim_output_dir

    out = tmp_path / "run"
    args = Namespace(output_dir=str(out), resume_from_checkpoint=None, overwrite_output_dir=False)
    holder = hold_in_child(out)
    for rank in ("RANK", "LOCAL_RANK"):
        with monkeypatch.context() as env:
            env.delenv("RANK", raising=False)
            env.setenv(rank, "1")
            assert claim_output_dir(args) is None
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UsageError, match=re.escape(holder_named(holder.pid))):
        claim_output_dir(args)
    kill(holder)
    assert claim_output_dir(args).held


def test_a_killed_run_leaves_the_dir_usable_and_its_lock_file_confuses_nothing(tiny_bert, tiny_data, tmp_path):
    """After a SIGKILLed holder a real run takes the dir; its lock file left behind is no run content, and a resume
    of that run (latest, with the run's own copy of the meta list) finds its newest checkpoint."""
    out = tmp_path / "run"
    holder = hold_in_child(out)
    assert_refused(run(common_args(tiny_bert, tiny_data, out, "--max_steps", "2")), holder_named(holder.pid))
    kill(holder)
    first = run(common_args(tiny_bert, tiny_data, out, "--max_steps", "2", "--save_every", "1"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / ".run.lock").exists() and (out / "meta.txt").exists() and (out / "final").is_dir()
    resumed = run(common_args(tiny_bert, tiny_data, out, "--max_steps", "2", "--resume_from_checkpoint", "latest",
                              "--meta_list", str(out / "meta.txt"), "--root_dir", str(tiny_data)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint-2'}" in resumed.stdout + resumed.stderr


def test_the_lock_file_is_not_run_content_and_survives_overwrite(tiny_bert, tiny_data, tmp_path):
    """A dir holding only a lock file is empty to the next run; --overwrite_output_dir empties all but the lock,
    which stays held (the file a third run would lock is the same one)."""
    from argparse import Namespace

    import train_finetune
    from modules.checkpoints import resolve_checkpoint
    from modules.outputs import write_run_config
    from modules.run_lock import lock_output_dir

    out = tmp_path / "run"
    lock_output_dir(out).release()
    train_finetune.parse_args(common_args(tiny_bert, tiny_data, out)[1:])  # not refused as a used dir
    assert resolve_checkpoint("latest", out) is None
    lock = lock_output_dir(out)
    (out / "checkpoint-1").mkdir()
    inode = (out / ".run.lock").stat().st_ino
    write_run_config(out, Namespace(overwrite_output_dir=True), [])
    assert sorted(p.name for p in out.iterdir()) == [".run.lock", "run_config.json"]
    assert (out / ".run.lock").stat().st_ino == inode
    code = "import fcntl, sys; fcntl.flock(open(sys.argv[1]), fcntl.LOCK_EX | fcntl.LOCK_NB)"
    assert subprocess.run([sys.executable, "-c", code, str(out / ".run.lock")], capture_output=True).returncode == 1
    lock.release()


def test_a_filesystem_without_locks_warns_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """NFS without a lock daemon answers ENOLCK: refusing would make training there impossible."""
    import modules.run_lock

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(modules.run_lock.fcntl, "flock", no_locks)
    lock = modules.run_lock.lock_output_dir(tmp_path / "run")
    assert not lock.held
    assert capsys.readouterr().err == (
        f"warning: --output_dir {tmp_path / 'run'}: the filesystem cannot lock .run.lock (No locks available); a "
        "second run started on this directory will not be refused\n")


# --------------------------------------------------------------------------- inputs inside the dir


def meta_list_inside(tiny_bert, tiny_data, out, tmp_path):
    shutil.copy(tiny_data / "meta.txt", out / "meta.txt")
    return ["--meta_list", str(out / "meta.txt"), "--root_dir", str(tiny_data)], f"--meta_list {out / 'meta.txt'}"


def dataset_inside(tiny_bert, tiny_data, out, tmp_path):
    shutil.copytree(tiny_data, out / "data")
    (tmp_path / "meta.txt").write_text(f"{tiny_data / 'retri.jsonl'} 1\n{out / 'data' / 'sts.jsonl'} 1 type=cosent\n")
    return ["--meta_list", str(tmp_path / "meta.txt")], f"dataset {out / 'data' / 'sts.jsonl'} ({tmp_path / 'meta.txt'}:2)"


def start_model_inside(tiny_bert, tiny_data, out, tmp_path):
    shutil.copytree(tiny_bert, out / "model")
    return ["--model_name_or_path", str(out / "model")], f"--model_name_or_path {out / 'model'}"


def teacher_inside(tiny_bert, tiny_data, out, tmp_path):
    shutil.copytree(tiny_bert, out / "teacher")
    return ["--teacher_model", str(out / "teacher"), "--distill_weight", "1"], f"--teacher_model {out / 'teacher'}"


def eval_file_inside(tiny_bert, tiny_data, out, tmp_path):
    shutil.copy(tiny_data / "sts.jsonl", out / "dev.jsonl")
    return ["--eval_sts_file", str(out / "dev.jsonl")], f"--eval_sts_file {out / 'dev.jsonl'}"


def eval_dir_inside(tiny_bert, tiny_data, out, tmp_path):
    (out / "task").mkdir()
    (out / "task" / "task.json").write_text('{"type": "STS"}')
    return ["--eval_dir", str(out / "task")], f"--eval_dir {out / 'task'}"


def prefix_file_inside(tiny_bert, tiny_data, out, tmp_path):
    (out / "prefixes.json").write_text('{"retri": "query: "}')
    return ["--query_prefix_file", str(out / "prefixes.json")], f"--query_prefix_file {out / 'prefixes.json'}"


def mined_corpus_inside(tiny_bert, tiny_data, out, tmp_path):
    """A mined dataset outside the dir whose records point into a corpus inside it."""
    write_jsonl(out / "corpus.jsonl", [{"_id": str(i), "text": f"passage {i}"} for i in range(4)])
    write_jsonl(tmp_path / "mined" / "mined.jsonl", [
        {"text": f"query {i}", "text_pos": [f"passage {i}"], "candidate_ids": ["0", "1", "2", "3"],
         "corpus": "../run/corpus.jsonl", "neg_ranks": [(i + 1) % 4], "neg_scores": [0.5]} for i in range(4)])
    (tmp_path / "meta.txt").write_text(f"{tmp_path / 'mined' / 'mined.jsonl'} 1 type=retri_contrast\n")
    return ["--meta_list", str(tmp_path / "meta.txt")], f"corpus {tmp_path / 'mined' / '../run/corpus.jsonl'}"


def task_instructions_inside(tiny_bert, tiny_data, out, tmp_path):
    (out / "tasks.json").write_text('{"retri": "find the passage"}')
    return ["--instruction_template", "Instruct: {task}\\nQuery: ", "--task_instructions", str(out / "tasks.json")], \
        f"--task_instructions {out / 'tasks.json'}"


@pytest.mark.parametrize("place", [meta_list_inside, dataset_inside, start_model_inside, teacher_inside,
                                   eval_file_inside, eval_dir_inside, prefix_file_inside, mined_corpus_inside,
                                   task_instructions_inside], ids=lambda place: place.__name__)
def test_overwrite_refuses_to_delete_an_input_of_the_run(tiny_bert, tiny_data, tmp_path, capsys, place):
    import train_finetune
    import train_llm_embed

    out = tmp_path / "run"
    (out / "checkpoint-1").mkdir(parents=True)  # an earlier run's
    flags, named = place(tiny_bert, tiny_data, out, tmp_path)
    held = sorted(out.rglob("*"))
    argv = common_args(tiny_bert, tiny_data, out, "--overwrite_output_dir", *flags)[1:]
    extra = (train_llm_embed.add_llm_arguments, train_finetune.__doc__, True) if "--task_instructions" in flags else ()
    with pytest.raises(SystemExit) as refused:
        train_finetune.parse_args(argv, *extra)
    assert refused.value.code == 2
    assert f"--overwrite_output_dir would delete {named}" in capsys.readouterr().err
    assert sorted(out.rglob("*")) == held


def test_the_meta_list_and_its_data_in_the_run_dir_are_neither_deleted_nor_offered_for_deletion(tiny_bert, tiny_data,
                                                                                                 tmp_path):
    """The reported case: the meta list and its data inside the output dir of an earlier run. --overwrite_output_dir
    is refused, naming the meta list and the flag, and deletes nothing; the refusal of the used dir does not
    suggest it."""
    out = tmp_path / "run"
    shutil.copytree(tiny_data, out / "data")
    (out / "train_summary.json").write_text("{}")
    held = sorted(out.rglob("*"))
    argv = common_args(tiny_bert, tiny_data, out, "--max_steps", "1", "--meta_list", str(out / "data" / "meta.txt"))
    assert_refused(run([*argv, "--overwrite_output_dir"]),
                   f"--overwrite_output_dir would delete --meta_list {out / 'data' / 'meta.txt'}, an input of this run")
    assert sorted(out.rglob("*")) == held
    used = run(argv)
    assert_refused(used, f"holds --meta_list {out / 'data' / 'meta.txt'}, an input of this run")
    assert "--overwrite_output_dir" not in used.stderr


def test_a_pretraining_run_stopped_by_bad_data_is_not_offered_a_resume(tiny_bert, tmp_path):
    """The reported case: pretraining streams its data, so a bad record stops the run after run_config.json is
    written; the retry's refusal says there is nothing to resume (no checkpoint) and offers --overwrite_output_dir,
    which then runs."""
    write_jsonl(tmp_path / "pairs.jsonl", [{"query": "a cat", "positive": "a small cat"}, {"query": "", "positive": "b"}])
    (tmp_path / "meta.txt").write_text("pairs.jsonl 1\n")
    argv = ["train_pretrain.py", "--model_name_or_path", str(tiny_bert), "--meta_list", str(tmp_path / "meta.txt"),
            "--output_dir", str(tmp_path / "run"), "--batch_size", "2", "--max_steps", "1", "--report_to", "none",
            "--query_max_len", "16", "--passage_max_len", "16"]
    assert_refused(run(argv), "pairs.jsonl:2")
    assert (tmp_path / "run" / "run_config.json").is_file()
    retry = run(argv)
    assert_refused(retry, "no checkpoint or final model (a run that stopped before saving one, or other files), "
                          "nothing to resume: replace it with --overwrite_output_dir, or choose another directory")
    assert "--resume_from_checkpoint" not in retry.stderr


@pytest.mark.parametrize("held, expected", [
    ("checkpoint-2", "continue its run with --resume_from_checkpoint latest, replace it with --overwrite_output_dir, "
                     "or choose another directory"),
    ("final", "a finished run (final/, no checkpoint to resume): replace it with --overwrite_output_dir, or choose "
              "another directory"),
])
def test_the_refusal_of_a_used_dir_offers_what_its_contents_allow(tiny_bert, tiny_data, tmp_path, capsys, held,
                                                                   expected):
    import train_finetune

    (tmp_path / "run" / held).mkdir(parents=True)
    (tmp_path / "run" / "run_config.json").write_text("{}")
    with pytest.raises(SystemExit) as refused:
        train_finetune.parse_args(common_args(tiny_bert, tiny_data, tmp_path / "run")[1:])
    assert refused.value.code == 2 and expected in capsys.readouterr().err

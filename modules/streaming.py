"""Streaming pair sources for pretraining: many files, a weight each, a part per rank, exact resume.

A meta list names the sources, one a line: ``<path> <weight> [columns=QUERY,POSITIVE]``; a path is a
``.jsonl``, ``.jsonl.gz`` or ``.parquet`` file, a directory of them, or a glob. Nothing is read
ahead of training: the only start-up work is listing files, their sizes and parquet row groups.

How a source is read (and why resume is exact without a home-made format):
- Its files are cut into blocks: byte ranges of a JSONL file (a line belongs to the block its first
  byte lies in), a parquet row group, or a whole ``.gz`` file (gzip cannot seek; shard big
  corpora into many files, as the 1B-pairs project did).
- Each source epoch shuffles the block order from (seed, source, epoch); rank r reads blocks
  r, r + W, ... (with fewer blocks than ranks, every rank reads every block and keeps records
  r, r + W, ...). Blocks are read in chunks of ``chunk_size`` records, each shuffled from
  (seed, source, epoch, block, chunk start).
- A rank's position in a source is (epoch, block, chunk start, records taken); resuming seeks to
  the chunk start and re-reads one chunk. (``datasets``' streaming ``state_dict`` refills its
  shuffle buffer on resume, so the examples after a resume would differ; this does not.)

Which source a step draws from is a pure function of (seed, step) and the weights, so every rank
draws from the same source at every step with no communication, and a resumed run continues the
same sequence. A record whose query or positive text is already in the batch is held back for the
next batch of that source (duplicates are false negatives in in-batch InfoNCE); held-back records
are part of the saved position, so nothing is lost.

A record is checked when it is taken (JSON lines are parsed then, not when read): a bad one stops the
run naming its file and line, or under --skip_bad_records is skipped and counted. A skipped record
is a record taken, so a resumed run skips exactly the same ones.
"""

import glob as globbing
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from modules.cli import DataError
from modules.collator import tokenize
from modules.meta_list import (
    PRETRAIN_META_LINE, assign_dataset_names, check_weight_sum, iter_meta_lines, positive_number,
)
from modules.records import BadRecord, SkippedRecords, iter_file_lines, nonempty_text, parse_json_line

PAIR_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
MAX_HELD_BACK = 100_000


@dataclass
class PairSource:
    name: str | None  # name=NAME, else derived from the path (modules.meta_list.assign_dataset_names)
    files: list
    weight: float
    columns: tuple = ("text", "text_pos")
    source: str = ""  # "meta.txt:3", for error messages
    path: Path | None = None  # as the meta list gives it (a file, folder or glob)


def read_pretrain_meta_list(meta_file, root_dir=None) -> list:
    """Parse ``<path> <weight> [columns=QUERY,POSITIVE] [name=NAME]`` lines into sources with unique names."""
    sources = []
    for where, root, fields in iter_meta_lines(meta_file, root_dir, PRETRAIN_META_LINE):
        files = _expand(fields[0], root, where)
        weight = positive_number(fields[1], where, "weight")
        path = Path(fields[0]) if Path(fields[0]).is_absolute() else root / fields[0]
        source = PairSource(None, files, weight, source=where, path=path)
        for option in fields[2:]:
            key, _, value = option.partition("=")
            if key == "columns" and len(value.split(",")) == 2:
                source.columns = tuple(value.split(","))
            elif key == "name" and value:
                source.name = value
            else:
                raise DataError(f"{where}: unknown option {option!r}; expected columns=QUERY,POSITIVE or name=NAME")
        sources.append(source)
    check_weight_sum(sources)
    return assign_dataset_names(sources)


def describe_sources(sources):
    """What fixes the stream of each source (JSON): its files and their sizes, weight and columns."""
    return [{"files": [str(f) for f in source.files], "bytes": [Path(f).stat().st_size for f in source.files],
             "weight": source.weight, "columns": list(source.columns)} for source in sources]


def _expand(pattern, root, where):
    path = Path(pattern) if Path(pattern).is_absolute() else root / pattern
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.name.endswith(PAIR_SUFFIXES))
    elif any(ch in pattern for ch in "*?["):
        files = sorted(Path(p) for p in globbing.glob(str(path), recursive=True))
    else:
        files = [path] if path.exists() else []
    if not files:
        raise DataError(f"{where}: no {'/'.join(PAIR_SUFFIXES)} files at {path}")
    for file in files:
        if not file.name.endswith(PAIR_SUFFIXES):
            raise DataError(f"{where}: {file}: unsupported format; use {', '.join(PAIR_SUFFIXES)}")
        if file.stat().st_size == 0:
            raise DataError(f"{where}: {file} is empty")
    return files


# --------------------------------------------------------------------------- blocks and chunks


def list_blocks(files, block_bytes):
    """[(file, start, end)]: JSONL byte ranges, parquet row groups (start = group), whole gz files."""
    blocks = []
    for file in files:
        if file.name.endswith(".parquet"):
            import pyarrow.parquet as pq

            blocks += [(str(file), group, group + 1) for group in range(pq.ParquetFile(file).num_row_groups)]
        elif file.name.endswith(".gz"):
            blocks.append((str(file), 0, -1))
        else:
            size = file.stat().st_size
            blocks += [(str(file), start, min(start + block_bytes, size)) for start in range(0, size, block_bytes)]
    return blocks


@dataclass(frozen=True)
class LineAt:
    """Where a JSONL record of a block starts; shown as ``file:line``, the line counted only when a message is
    shown (a block knows its byte offset, not its first line number)."""

    path: str
    offset: int

    def __str__(self):
        newlines, left = 0, self.offset
        with open(self.path, "rb") as handle:
            while left > 0 and (part := handle.read(min(left, 1 << 24))):
                newlines, left = newlines + part.count(b"\n"), left - len(part)
        return f"{self.path}:{newlines + 1}"


def read_chunks(block, position, chunk_size):
    """Yield (chunk position, [(where, raw record)]) from ``position`` on, ``chunk_size`` records a chunk; a raw
    record is a parquet row (dict) or a JSON line (bytes, parsed when taken).

    A position is a byte offset (JSONL), a row in the row group (parquet) or a line (gz); a chunk's
    position is where reading must start to get that chunk again.
    """
    path, start, end = block
    if path.endswith(".parquet"):
        yield from _parquet_chunks(path, start, position, chunk_size)
    elif path.endswith(".gz"):
        yield from _gzip_chunks(path, position, chunk_size)
    else:
        yield from _jsonl_chunks(path, max(start, position), end, position > start, chunk_size)


def _jsonl_chunks(path, offset, end, at_line_start, chunk_size):
    with open(path, "rb") as handle:
        if offset > 0 and not at_line_start:
            handle.seek(offset - 1)
            handle.readline()  # the line holding byte offset-1 belongs to the previous block
        else:
            handle.seek(offset)
        chunk, chunk_position = [], handle.tell()
        while True:
            line_start = handle.tell()
            if line_start >= end:
                break
            line = handle.readline()
            if not line:
                break
            if not line.strip():
                continue
            if not chunk:
                chunk_position = line_start
            chunk.append((LineAt(path, line_start), line))
            if len(chunk) == chunk_size:
                yield chunk_position, chunk
                chunk = []
        if chunk:
            yield chunk_position, chunk


def _gzip_chunks(path, first_line, chunk_size):
    """``first_line`` and the chunk positions count lines from 0."""
    chunk, chunk_position = [], first_line
    for line_no, line in iter_file_lines(path):
        if line_no <= first_line or not line.strip():
            continue
        if not chunk:
            chunk_position = line_no - 1
        chunk.append((f"{path}:{line_no}", line))
        if len(chunk) == chunk_size:
            yield chunk_position, chunk
            chunk = []
    if chunk:
        yield chunk_position, chunk


def _parquet_chunks(path, group, first_row, chunk_size):
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path).read_row_group(group)  # one row group: bounded by the writer's group size
    for chunk_position in range(first_row, table.num_rows, chunk_size):
        rows = table.slice(chunk_position, chunk_size).to_pylist()
        yield chunk_position, [(f"{path} row group {group} row {chunk_position + i}", r) for i, r in enumerate(rows)]


def parse_pair(raw, columns, where):
    """A raw record -> (query, positive); a list positive takes its first item."""
    if not isinstance(raw, dict):
        raise BadRecord(where, f"a record must be a JSON object, got {type(raw).__name__}")
    texts = []
    for column in columns:
        value = raw.get(column)
        if value is None:
            raise BadRecord(where, f"missing column {column!r}")
        if isinstance(value, list) and value and isinstance(value[0], str):
            value = value[0]
        if not isinstance(value, str):
            raise BadRecord(where, f"column {column!r} must be a string, got {type(value).__name__}")
        texts.append(value)
    return tuple(texts)


def training_pair(raw, columns, where):
    """A taken record (a parquet row or a JSON line) -> (query, positive), both texts non-empty."""
    record = parse_json_line(raw, where) if isinstance(raw, bytes) else raw
    return tuple(nonempty_text(text, repr(column), where) for text, column in zip(parse_pair(record, columns, where),
                                                                                   columns))


# --------------------------------------------------------------------------- one source, one rank


class SourceStream:
    """This rank's endless, shuffled stream of (query, positive) pairs from one source."""

    def __init__(self, source: PairSource, source_index, seed, rank, world_size, chunk_size, block_bytes, state=None,
                 skip_bad=False):
        self.source, self.source_index, self.seed = source, source_index, seed
        self.rank, self.world_size, self.chunk_size = rank, world_size, chunk_size
        self.blocks = list_blocks(source.files, block_bytes)
        self.stride = world_size if len(self.blocks) < world_size else 1
        state = state or {"epoch": 0, "block": 0, "chunk_position": None, "taken": 0, "held_back": []}
        self.epoch, self.block = state["epoch"], state["block"]
        self.held_back = deque(tuple(pair) for pair in state["held_back"])
        self.skip_bad = skip_bad
        self.skipped = SkippedRecords(state.get("skipped", 0), state.get("first_skipped", ""))
        self._open(state["chunk_position"], state["taken"])

    def state(self) -> dict:
        return {"epoch": self.epoch, "block": self.block, "chunk_position": self.chunk_position,
                "taken": self.taken, "held_back": [list(pair) for pair in self.held_back],
                "skipped": self.skipped.count, "first_skipped": self.skipped.first}

    def _my_blocks(self, epoch):
        order = np.random.default_rng([self.seed, self.source_index, epoch]).permutation(len(self.blocks))
        return order.tolist() if self.stride > 1 else order[self.rank :: self.world_size].tolist()

    def _open(self, chunk_position, taken):
        """Start reading block ``self.block`` of this epoch at a chunk, skipping ``taken`` records of it."""
        blocks = self._my_blocks(self.epoch)
        self.chunk, self.taken, self.chunk_position = [], 0, chunk_position
        if self.block >= len(blocks):
            self._chunks = iter(())
            return
        self.block_id = blocks[self.block]
        block = self.blocks[self.block_id]
        if chunk_position is None:  # the block's first record: its first byte for JSONL, else row/line 0
            chunk_position = block[1] if block[0].endswith(".jsonl") else 0
        self._chunks = read_chunks(block, chunk_position, self.chunk_size * self.stride)
        self._next_chunk()
        self.taken = taken

    def _next_chunk(self):
        for position, records in self._chunks:
            records = records[self.rank :: self.stride] if self.stride > 1 else records
            if not records:
                continue
            order = np.random.default_rng([self.seed, self.source_index, self.epoch, self.block_id, position])
            self.chunk = [records[i] for i in order.permutation(len(records))]
            self.chunk_position, self.taken = position, 0
            return True
        self.chunk, self.taken = [], 0
        return False

    def next_pair(self):
        if self.held_back:
            return self.held_back.popleft()
        first_epoch = self.epoch
        while True:
            where, raw = self._take()
            try:
                return training_pair(raw, self.source.columns, where)
            except BadRecord as error:
                if not self.skip_bad:
                    raise
                self.skipped.add(error)
            if self.epoch > first_epoch + 1:  # a whole epoch of this rank's records went by, every one bad
                raise DataError(f"{self.source.source}: every record rank {self.rank} reads is bad; "
                                f"{self.skipped.line(self.source.name)}")

    def _take(self):
        """The next (where, raw record) of this rank's stream, on to the next chunk, block and epoch as needed."""
        empty_blocks = 0
        while self.taken >= len(self.chunk) and not self._next_chunk():
            empty_blocks += 1
            if empty_blocks > len(self.blocks) + 1:
                raise DataError(f"{self.source.source}: source gives rank {self.rank} no records")
            self.block += 1
            if self.block >= len(self._my_blocks(self.epoch)):
                self.epoch, self.block = self.epoch + 1, 0
            self._open(None, 0)
        self.taken += 1
        return self.chunk[self.taken - 1]


def choose_source(seed, step, weights):
    """Index of the source step ``step`` draws from: a pure function of (seed, step, weights)."""
    probabilities = np.asarray(weights, dtype=float) / sum(weights)
    return int(np.random.default_rng([seed, step, 2**31]).choice(len(weights), p=probabilities))


def take_unique_pairs(stream: SourceStream, count):
    """``count`` pairs with no text twice among them; pairs that would repeat one wait for the next batch."""
    pairs, seen, deferred = [], set(), []
    while len(pairs) < count:
        query, positive = stream.next_pair()
        if query in seen or positive in seen:
            deferred.append((query, positive))
            if len(deferred) > MAX_HELD_BACK:
                raise DataError(f"{stream.source.source}: over {MAX_HELD_BACK} duplicate texts while building one "
                                f"batch; deduplicate the source (tools/dedup_pairs.py)")
            continue
        seen.update((query, positive))
        pairs.append((query, positive))
    stream.held_back.extendleft(reversed(deferred))
    return pairs


class PretrainBatches(torch.utils.data.IterableDataset):
    """This rank's endless sequence of tokenized pair batches, each with the loader state after it.

    Iterate it in the training process or in DataLoader workers (each tokenizes every W-th batch).
    ``batch["loader_state"]`` is what a checkpoint saves to resume after that batch.
    """

    def __init__(self, sources, batch_size, tokenizer, max_length, seed, rank=0, world_size=1,
                 chunk_size=8192, block_bytes=64 << 20, query_prefix="", state=None, skip_bad=False):
        self.sources, self.batch_size, self.tokenizer = sources, batch_size, tokenizer
        self.max_length, self.seed, self.rank, self.world_size = max_length, seed, rank, world_size
        self.chunk_size, self.block_bytes, self.query_prefix = chunk_size, block_bytes, query_prefix
        self.skip_bad = skip_bad
        self.state = state or {"step": 0, "sources": [None] * len(sources)}
        if len(self.state["sources"]) != len(sources):
            raise DataError(f"the checkpoint's loader state has {len(self.state['sources'])} sources, the meta list "
                            f"{len(sources)}; resume with the meta list the run started with")

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        try:
            yield from self._batches(*((worker.id, worker.num_workers) if worker else (0, 1)))
        except DataError as error:
            if worker is None:
                raise
            yield {"data_error": str(error)}  # raised, it would reach the training process inside a worker traceback

    def _batches(self, worker_id, num_workers):
        streams = [SourceStream(source, i, self.seed, self.rank, self.world_size, self.chunk_size, self.block_bytes,
                                state, self.skip_bad)
                   for i, (source, state) in enumerate(zip(self.sources, self.state["sources"]))]
        weights = [source.weight for source in self.sources]
        step = self.state["step"]
        # With W DataLoader workers, every worker reads the whole stream (reading is ~50x cheaper than
        # tokenizing) and tokenizes every W-th batch; the DataLoader takes workers in turn, so order holds.
        while True:
            source_index = choose_source(self.seed, step, weights)
            pairs = take_unique_pairs(streams[source_index], self.batch_size)
            step += 1
            if (step - 1 - self.state["step"]) % num_workers != worker_id:
                continue
            yield {
                "source": source_index,
                "query": self._tokenize([self.query_prefix + q for q, _ in pairs], "query"),
                "passage": self._tokenize([p for _, p in pairs], "passage"),
                "loader_state": {"step": step, "sources": [s.state() for s in streams]},
            }

    def _tokenize(self, texts, role):
        return tokenize(self.tokenizer, texts, self.max_length[role])


def checked_batch(batch):
    """A batch from a PretrainBatches loader; the DataError a loader worker met is raised here, as one line."""
    if "data_error" in batch:
        raise DataError(batch["data_error"])
    return batch


def _source_states(loader_state):
    return [state or {} for state in loader_state["sources"]] if loader_state else []


def skipped_record_count(loader_state):
    """Bad records this process skipped so far (--skip_bad_records), over all sources."""
    return sum(state.get("skipped", 0) for state in _source_states(loader_state))


def skipped_record_lines(sources, loader_state):
    """'skipped N bad records of NAME (first: ...)' for each source this process skipped records of."""
    return [SkippedRecords(state["skipped"], state["first_skipped"]).line(source.name)
            for source, state in zip(sources, _source_states(loader_state)) if state.get("skipped")]

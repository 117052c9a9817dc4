"""What a run shows while it trains (and a long tool stage while it runs), and throughput over training time only.

On a terminal, a tqdm bar with the latest metrics; otherwise (slurm, nohup, a pipe) a plain line every
``--log_every`` steps, since a bar's carriage returns put a whole log on one line.
"""

import contextlib
import sys
import time
from datetime import timedelta

from tqdm.auto import tqdm


class Progress:
    """The bar or log lines of the main process; other processes show nothing."""

    def __init__(self, total, initial, enabled, stream=None):
        self.stream = stream or sys.stderr
        self.enabled, self.total, self.initial = enabled, total, initial
        self.interactive = enabled and self.stream.isatty()
        self.started = time.perf_counter()
        self.bar = tqdm(total=total, initial=initial, disable=not self.interactive, file=self.stream)

    def update(self):
        self.bar.update(1)

    def log(self, step, metrics):
        shown = {name.removeprefix("loss/"): value for name, value in metrics.items() if name != "epoch"}
        if self.interactive:
            self.bar.set_postfix({name: f"{value:.3g}" for name, value in shown.items()})
        elif self.enabled:
            elapsed = time.perf_counter() - self.started
            remaining = elapsed / max(step - self.initial, 1) * (self.total - step)
            values = " ".join(f"{name} {value:.4g}" for name, value in shown.items())
            print(f"step {step}/{self.total} | {values} | elapsed {clock(elapsed)} eta {clock(remaining)}",
                  file=self.stream, flush=True)

    def close(self):
        self.bar.close()


class StageProgress:
    """A long stage's plain progress lines (done/total, percent, elapsed and left) at most every ``every`` seconds,
    and the last (hard-negative mining: encoding, indexing, search)."""

    def __init__(self, stage, total, unit, every=30.0, stream=None):
        self.stage, self.total, self.unit, self.every = stage, total, unit, every
        self.stream = stream or sys.stdout
        self.started = self.shown = time.perf_counter()
        print(f"{stage}: {total:,} {unit}", file=self.stream, flush=True)

    def update(self, done):
        now = time.perf_counter()
        if done < self.total and now - self.shown < self.every:
            return
        self.shown, elapsed = now, now - self.started
        left = elapsed / done * (self.total - done) if done else 0.0
        print(f"{self.stage}: {done:,}/{self.total:,} {self.unit} ({100 * done / self.total:.0f}%), "
              f"{clock(elapsed)} elapsed, {clock(left)} left", file=self.stream, flush=True)


EVERY = 30.0  # seconds between plain progress lines in a log
_embedding_stages = []  # the embedding stages open now (embedding_progress), innermost last


@contextlib.contextmanager
def embedding_progress(label, enabled=True, texts=None, stream=None):
    """While open, ``modules.evaluation.embed_texts`` shows its progress under ``label``: each call on its own, or,
    given all the stage's ``texts`` (embedded in several calls), the stage as a whole, ending with a line at 100%.
    ``enabled`` False (another process of the run) shows nothing."""
    shared = TextProgress(texts, label, stream=stream, last_line=True) if enabled and texts is not None else None
    _embedding_stages.append((label if enabled else None, shared))
    try:
        yield
    finally:
        _embedding_stages.pop()
        if shared is not None:
            shared.close()


def text_progress(texts):
    """The progress an ``embed_texts`` call of ``texts`` reports to: the open stage's shared one, a new one for this
    call, or one that shows nothing outside ``embedding_progress``."""
    label, shared = _embedding_stages[-1] if _embedding_stages else (None, None)
    return shared if shared is not None else TextProgress(texts, label, own=True)


class TextProgress:
    """Progress of embedding ``texts`` by characters (long texts cost more; embed_texts goes shortest first, so a
    count of texts would read 90% with most of the work left): a bar on a terminal, else a plain line once the
    stage has run ``every`` seconds, then every ``every`` seconds, and a last one. ``label`` None: silent."""

    def __init__(self, texts, label, every=None, stream=None, own=False, last_line=False):
        self.label, self.own, self.last_line = label, own, last_line
        self.stream, self.every = stream or sys.stderr, EVERY if every is None else every
        self.total, self.done, self.count = sum(map(len, texts)) or 1, 0, len(texts)
        self.started = self.shown = time.perf_counter()
        self.printed = False
        interactive = label is not None and self.stream.isatty()
        self.bar = tqdm(total=self.total, desc=label, unit="char", unit_scale=True, leave=False,
                        file=self.stream) if interactive else None

    def update(self, texts):
        if self.label is None:
            return
        characters = sum(map(len, texts))
        self.done += characters
        if self.bar is not None:
            self.bar.update(characters)
            return
        now = time.perf_counter()
        if now - self.shown >= self.every or ((self.printed or self.last_line) and self.done >= self.total):
            self.shown, elapsed = now, now - self.started
            left = elapsed / self.done * max(self.total - self.done, 0)
            print(f"{self.label}: {self.count:,} texts, {min(100 * self.done / self.total, 100):.0f}% of their "
                  f"characters, {clock(elapsed)} elapsed, {clock(left)} left", file=self.stream, flush=True)
            self.printed = True

    def finish_call(self):
        """The end of an embed_texts call: a call's own progress closes; a stage's shared one goes on."""
        if self.own:
            self.close()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def clock(seconds):
    return str(timedelta(seconds=round(seconds)))


class Stopwatch:
    """Seconds spent in training steps: evaluation, checkpoints and mining happen between ``stop`` and ``start``."""

    def __init__(self):
        self.seconds, self.started = 0.0, time.perf_counter()

    def start(self):
        self.started = time.perf_counter()

    def stop(self):
        """Add the time since ``start`` and return it."""
        lap = time.perf_counter() - self.started
        self.seconds += lap
        return lap


def no_library_bars():
    """Turns off the progress bars of transformers (loading and saving weights) and datasets (loading data): in a
    log file each is a line of carriage returns."""
    import datasets
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()

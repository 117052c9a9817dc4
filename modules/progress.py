"""What a run shows while it trains (and a long tool stage while it runs), and throughput over training time only.

On a terminal, a tqdm bar with the latest metrics; otherwise (slurm, nohup, a pipe) a plain line every
``--log_every`` steps, since a bar's carriage returns put a whole log on one line.
"""

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
            print(f"step {step}/{self.total} | {values} | elapsed {_clock(elapsed)} eta {_clock(remaining)}",
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
              f"{_clock(elapsed)} elapsed, {_clock(left)} left", file=self.stream, flush=True)


def _clock(seconds):
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

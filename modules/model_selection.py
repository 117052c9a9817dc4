"""Dev scores over a run and the weights they select (--eval_every, --metric_for_best, --keep_best, --final_is_best).

Every evaluation scores what final/ would hold if the run stopped there, embedded as final/ will be: the moving
average under --ema_decay, texts given the prompts final/ saves (WiSE-FT, applied at export, is scored on final/
itself, modules/outputs.py). Step 0, the start model, is a candidate like any other step: when it scores best,
--keep_best keeps checkpoint-0 and --final_is_best ships the start weights, and the run says so. The history and the
best travel in every checkpoint's trainer_state.json, so a resumed run reports the whole run.
"""

import math
import sys
from pathlib import Path

from .checkpoints import load_checkpoint
from .ema import scoring_weights


class BestCheckpoint:
    """``--metric_for_best`` (higher is better; NaN is never best) over a run's evaluations; with ``--keep_best`` every
    new best is saved as a checkpoint that the checkpoint limit spares."""

    def __init__(self, metric, keep, state=None):
        self.metric, self.keep = metric, keep
        self.step, self.value = (state["step"], state["value"]) if state else (None, None)

    def improved(self, step, metrics):
        """Record the evaluation ``metrics`` of ``step`` if it is a new best; returns whether to save it (False
        without --keep_best)."""
        value = metrics.get(self.metric) if self.metric else None
        if value is None or not math.isfinite(value) or (self.value is not None and value <= self.value):
            return False
        self.step, self.value = step, value
        return self.keep

    def kept(self):
        return (f"checkpoint-{self.step}",) if self.keep and self.step is not None else ()

    def state(self):
        return {"metric": self.metric, "step": self.step, "value": self.value} if self.step is not None else None

    def summary(self):
        """{"best": ...} for train_summary.json; its checkpoint named relative to the run's output dir."""
        if self.step is None:
            return {}
        return {"best": {**self.state(), "checkpoint": f"checkpoint-{self.step}" if self.keep else None}}


class DevRun:
    """A run's dev sets, evaluation history and best evaluation. ``saved``: a checkpoint's trainer state."""

    def __init__(self, dev_sets, args, prompts, ema, saved=None, output_dim=None):
        saved = saved or {}
        self.variants, self.calibration_texts = final_variants(args, output_dim) if dev_sets else ([], None)
        self.dev_sets, self.prompts, self.ema, self.every = dev_sets, prompts, ema, args.eval_every
        self.history = {int(step): {name: math.nan if value is None else value for name, value in metrics.items()}
                        for step, metrics in (saved.get("eval_history") or {}).items()}  # null: a NaN (json_files)
        self.best = BestCheckpoint(args.metric_for_best, args.keep_best, saved.get("best"))

    def __bool__(self):
        return bool(self.dev_sets)

    def due(self, step, last_step):
        """Whether ``step`` is evaluated: every --eval_every steps and the last step (the first is, before the loop)."""
        return bool(self.dev_sets) and step not in self.history and (
            step == last_step or bool(self.every) and step % self.every == 0)

    def evaluate(self, accelerator, model, tokenizer, max_lengths, step):
        """Score what final/ would hold at ``step`` (every process together, each embedding and ranking its share),
        log and record it; returns whether a checkpoint must keep it (a new best under --keep_best)."""
        from .process_shares import ProcessShares

        with scoring_weights(self.ema):
            self.history[step] = self.dev_sets.evaluate(accelerator, model, tokenizer, max_lengths, self.prompts, step,
                                                        ProcessShares.of(accelerator))
        return self.best.improved(step, self.history[step])

    def state(self):
        """What a checkpoint keeps (trainer_state.json)."""
        return {"best": self.best.state(), "eval_history": self.history}

    def final_step(self, final_is_best, last_step, main_process=True):
        """The step whose weights final/ holds: the best under --final_is_best, else the last. Says loudly (stderr,
        ``main_process``) when the start model scored best."""
        best = self.best
        if best.step == 0 and main_process:
            shipped = ("final/ holds the start weights (--final_is_best)" if final_is_best else
                       f"final/ holds step {last_step}'s weights, which score "
                       f"{self.history.get(last_step, {}).get(best.metric, float('nan')):.2f}")
            print(f"warning: the start model (step 0) scored best on {best.metric} ({best.value:.2f}): training did "
                  f"not improve it; {shipped}", file=sys.stderr, flush=True)
        return best.step if final_is_best and best.step is not None else last_step

    def final_weights(self, accelerator, model, tokenizer, max_lengths, last_step, final_is_best, output_dir,
                      saved_beside=()):
        """After the last step: scores it if it was not, and loads the checkpoint of the step final/ ships when that
        is not the last (``--final_is_best``, with the states saved beside it). Returns that step."""
        if self and last_step not in self.history:
            self.evaluate(accelerator, model, tokenizer, max_lengths, last_step)
        final_step = self.final_step(final_is_best, last_step, accelerator.is_main_process)
        if final_step != last_step:
            load_checkpoint(accelerator, Path(output_dir) / f"checkpoint-{final_step}", saved_beside)
        return final_step

    def scorer(self, tokenizer, max_lengths):
        """A function scoring a model on this process alone (final/'s weights, modules/outputs.py)."""
        return lambda module: self.dev_sets(module, tokenizer, max_lengths, self.prompts)

    def variant_scorer(self, tokenizer, max_lengths):
        """A function scoring a model at every --eval_dims size and --eval_quantize precision on this process alone
        (final/'s weights): [{"dim", "quantization", "scores"}]; None when the flags ask for nothing beyond float32
        at the full size."""
        if len(self.variants) < 2:
            return None
        return lambda module: self.dev_sets.at_variants(module, tokenizer, max_lengths, self.prompts, self.variants,
                                                        self.calibration_texts)

    def summary(self):
        return self.best.summary()


def final_variants(args, output_dim):
    """([(dim, quantization)] final/ is scored at, by --eval_dims and --eval_quantize, the full size always; the
    texts of --eval_calibration or None), checked before training starts (exit 2)."""
    from .quantization import INT8, parse_dims, parse_quantizations, read_calibration_texts

    if output_dim is None or not (getattr(args, "eval_dims", "") or getattr(args, "eval_quantize", "")):
        return [], None
    dims = parse_dims(args.eval_dims, output_dim, "--eval_dims")
    quantizations = parse_quantizations(args.eval_quantize, args.eval_calibration, "--eval_quantize")
    texts = read_calibration_texts(args.eval_calibration) if INT8 in quantizations else None
    return [(dim, quantization) for dim in dims for quantization in quantizations], texts

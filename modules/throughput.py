"""Honest speed figures: model FLOPs of the real (non-padding) tokens a step trains, and model FLOPs utilisation.

    FLOPs(batch) = 2 T W(N) + 2 S W(N_seq) + passes 4 L d sum_s len_s^2
    W(n)         = passes n_trained + (passes - 1) n_frozen

N the parameters outside the embedding tables and the ScalingLayer (each does a multiply-add per token), T the real
tokens, N_seq the ScalingLayer's parameters (applied to each of the S pooled sequence embeddings, not per token),
L layers of width d whose attention scores and weighted sums cost 2 len^2 d multiply-adds per sequence (Kaplan et al.
2020, arXiv 2001.08361, Sec. 2.1, for bidirectional attention); passes = 3 for a forward and its backward, 4 with
GradCache's second forward (Gao et al. 2021). A frozen weight (LoRA's base) has no gradient of its own: one pass
less than a trained one (its forward and the gradient to its inputs). Padding is not counted: a step that computes
on padding shows a lower MFU. MFU = FLOPs per second / (peak x processes) (Chowdhery et al. 2022,
arXiv 2204.02311, App. B).
"""

import torch

# Dense bf16 tensor-core peaks, TFLOP/s per device (vendor datasheets), matched against the CUDA device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
               "L40": 181.0, "A10G": 70.0, "A10": 125.0, "L4": 121.0, "RTX 4090": 165.0, "V100": 125.0}


def peak_tflops(flag_value, device):
    """--peak_tflops, else the datasheet peak of a known GPU, else None (MFU is then not logged)."""
    if flag_value:
        return flag_value
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


class FlopCounter:
    """FLOPs of the attention masks a step trains (see the module docstring)."""

    def __init__(self, model, passes=3):
        config = model.backbone.config
        self.layers = getattr(config, "num_hidden_layers", 0)
        self.width = getattr(config, "hidden_size", 0)
        scaling_layer = getattr(model, "scaling_layer", None)
        per_sequence = {id(p) for p in scaling_layer.parameters()} if scaling_layer is not None else set()
        counted = [p for name, p in model.named_parameters() if not _embedding_table(name)]
        self.matmul_params, self.frozen_params = _counts([p for p in counted if id(p) not in per_sequence])
        self.sequence_params, self.frozen_sequence_params = _counts([p for p in counted if id(p) in per_sequence])
        self.passes = passes

    def of_lengths(self, lengths):
        """FLOPs of sequences of these real lengths (a 1-d tensor)."""
        lengths = lengths.double()
        token_passes = self.passes * self.matmul_params - self.frozen_params
        sequence_passes = self.passes * self.sequence_params - self.frozen_sequence_params
        return (2.0 * token_passes * float(lengths.sum()) + 2.0 * sequence_passes * lengths.numel()
                + self.passes * 4.0 * self.layers * self.width * float((lengths**2).sum()))

    def of_masks(self, masks):
        """FLOPs of the real tokens of some [rows, length] attention masks."""
        return self.of_lengths(torch.cat([mask.sum(1).cpu() for mask in masks]))

    def of_batch(self, batch):
        """FLOPs of one task batch (its query, passage or pair texts)."""
        return self.of_lengths(real_lengths(batch))


def real_lengths(batch):
    """The real (non-padding) length of every text of a task batch (query, passage or pair), on the CPU."""
    return torch.cat([batch[role]["attention_mask"].sum(1) for role in ("query", "passage", "pair")
                      if role in batch]).cpu()


def _counts(parameters):
    """The number of weights in ``parameters`` and how many of them are frozen."""
    return sum(p.numel() for p in parameters), sum(p.numel() for p in parameters if not p.requires_grad)


def _embedding_table(name):
    """Lookup tables (no multiply-adds per token) and BERT's pooler (one row a sequence, and unused by our pooling)."""
    return any(part in name for part in ("word_embeddings", "position_embeddings", "token_type_embeddings",
                                         "embed_tokens", "embed_positions", "wte", "wpe", "pooler"))


def speed_metrics(window, processes, peak):
    """pairs/s, real tokens/s, model TFLOP/s (all processes) and MFU (with a peak) of a window of steps."""
    seconds = window["seconds"]
    if not seconds:  # a run of one step has no timed steps
        return {"pairs_per_s": None}
    metrics = {"pairs_per_s": window["pairs"] / seconds, "tokens_per_s": window["tokens"] / seconds,
               "tflops": window["flops"] / seconds / 1e12}
    if peak:
        metrics["mfu"] = metrics["tflops"] / (peak * processes)
    return metrics


def batch_records(batch):
    """Records in one task batch: its queries, or half its pair texts (cosent, parallel: [texts | their pairs])."""
    return batch["pair"]["input_ids"].size(0) // 2 if "pair" in batch else batch["query"]["input_ids"].size(0)


class SpeedMeter:
    """Pairs, real tokens, model FLOPs and seconds of the training steps of every process (each assumed to train as
    much as this one): over the log window (``window_metrics``, which starts a new one) and over the run's steps
    after the first, which pays for the warm-up (``run_figures``, for train_summary.json).

    ``shared_kinds``: task kinds whose batch every process holds the same copy of (the retrieval batch under CBB, whose
    queries and positives are shared). Their pairs count once, as the step trains on them once; their tokens and
    FLOPs count on every process, since each process does embed them: tokens/s and MFU measure the work the devices
    do, pairs/s the data the run trains on, so CBB's repeated work shows in pairs/s and not as an idle device.
    """

    KEYS = ("pairs", "tokens", "flops", "seconds")

    def __init__(self, flop_counter, processes, peak, shared_kinds=()):
        self.flop_counter, self.processes, self.peak = flop_counter, processes, peak
        self.shared_kinds = frozenset(shared_kinds)
        self.window = dict.fromkeys(self.KEYS, 0)
        self.run = {"timed_steps": 0, **dict.fromkeys(self.KEYS, 0)}
        self.warm = False

    def add_batches(self, batches):
        """Count the task batches of one forward and backward (a micro-step)."""
        for batch in batches:
            lengths = real_lengths(batch)  # one copy from the device serves tokens and FLOPs
            holders = 1 if batch.get("kind") in self.shared_kinds else self.processes
            self._add(pairs=batch_records(batch) * holders, tokens=int(lengths.sum()) * self.processes,
                      flops=self.flop_counter.of_lengths(lengths) * self.processes)

    def add_step(self, seconds):
        """End an optimizer step that took ``seconds``; the first is left out of the run's figures."""
        if self.warm:
            self.run["timed_steps"] += 1
        self._add(seconds=seconds)
        self.warm = True

    def _add(self, **counts):
        for key, value in counts.items():
            self.window[key] += value
            if self.warm:
                self.run[key] += value

    def window_metrics(self):
        """speed_metrics of the steps since the last call."""
        metrics, self.window = speed_metrics(self.window, self.processes, self.peak), dict.fromkeys(self.KEYS, 0)
        return metrics

    def run_figures(self, device):
        """The run's counts and speed_metrics over its timed steps, and this process's peak memory (what CUDA's
        allocator held at most on a GPU, the peak resident set elsewhere)."""
        if device.type == "cuda":
            memory = {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                      "peak_memory_of": "cuda allocated"}
        else:
            import resource

            memory = {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
                      "peak_memory_of": "process resident set"}
        return {**self.run, **speed_metrics(self.run, self.processes, self.peak), **memory}

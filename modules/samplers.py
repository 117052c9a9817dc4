"""Task-homogeneous batches: the samplers that cut an epoch into global batches, identical on every process and
sliced per process (``TaskBatchSampler``; Conan's cross-GPU balance, ``BalancedBatchSampler``), an epoch's batches
collated in order (``EpochBatches``), and the lines and JSON that describe them."""

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .cli import DataError
from .task_kinds import TASK_KINDS


def describe_data_order(datasets, batch_sizes, **setup):
    """What fixes a fine-tuning run's batches (JSON): ``setup`` (processes, seed, ...) and every dataset's
    file, size, repeat and batch size."""
    return {**setup, "datasets": [{"path": str(d.path), "records": len(d), "repeat": d.repeat, "batch_size": size,
                                   "weight": d.weight} for d, size in zip(datasets, batch_sizes)]}


def dataset_shares(datasets, sampler, batch_sizes):
    """Every dataset's kind, records, batch size, batches an epoch and share of the steps (of its kind's
    batches under CBB, where every step holds one batch of every kind): the start-up lines and train_summary.json."""
    if isinstance(sampler, BalancedBatchSampler):
        counts, within = {}, {}
        for kind, kind_sampler in sampler.samplers.items():
            for member, count in zip(sampler.members[kind], kind_sampler.batch_counts()):
                counts[member], within[member] = count, f"of the {kind} batches (one every step)"
        total = {i: sum(sampler.samplers[d.kind].batch_counts()) for i, d in enumerate(datasets)}
    else:
        counts = dict(enumerate(sampler.batch_counts()))
        total = {i: sum(counts.values()) for i in counts}
        within = {i: "of the steps" for i in counts}
    return [{"name": d.name, "path": str(d.path), "source": d.source, "kind": d.kind, "records": len(d),
             "batch_size": size, "batches_per_epoch": counts[i], "share": counts[i] / total[i], "share_of": within[i]}
            for i, (d, size) in enumerate(zip(datasets, batch_sizes))]


def describe_batches(datasets, sampler, batch_sizes=None):
    """One line per dataset: kind, records, batches an epoch and share of the steps (printed at start-up)."""
    return [f"{d['name']} ({d['kind']}, {d['source']}): {d['records']} records, {d['batches_per_epoch']} batches an "
            f"epoch, {100 * d['share']:.1f}% {d['share_of']}"
            for d in dataset_shares(datasets, sampler, batch_sizes or [None] * len(datasets))]


def build_sampler(datasets, batch_sizes, seed, num_processes=1, process_index=0, cbb=False):
    """The run's batch sampler: task-homogeneous batches, or one batch of every kind a step under CBB."""
    sources = [f"{d.source}: {d.path}" for d in datasets]
    if cbb:
        return BalancedBatchSampler(datasets, batch_sizes, seed, num_processes, process_index, sources)
    weights = [d.weight for d in datasets] if datasets[0].weight is not None else None
    return TaskBatchSampler([len(d) for d in datasets], [d.repeat for d in datasets], batch_sizes, seed,
                            num_processes, process_index, sources, weights)


@dataclass
class TaskBatchSampler:
    """Task-homogeneous global batches, identical on every process, sliced per process.

    The batches of epoch e are a pure function of (seed, e): each dataset contributes ``repeat``
    fresh permutations of its indices (occurrences 0..repeat-1), each cut into global batches (the
    remainder of a permutation is dropped, so no batch holds a record twice), and the batch order is
    shuffled. Process r takes rows [r*b, (r+1)*b) of each global batch, so every process computes the
    same loss on the same dataset at every step. Resuming needs only (epoch, batch index).

    With ``weights`` an epoch has the same number of batches, shared out in proportion to the
    weights (largest remainder) instead of to size x repeat: dataset i then walks through its own
    stream of permutations (permutation p from (seed, i, p)), continuing from epoch to epoch, so a
    down-weighted dataset is not restarted at every epoch and an up-weighted one cycles.

    A local batch is (dataset index, record indices, draw key); the draw key seeds which positive and
    negatives each record uses, so the draws of a record repeated within or across epochs differ.
    """

    dataset_sizes: list
    repeats: list
    batch_sizes: list  # per-process batch size of each dataset
    seed: int
    num_processes: int = 1
    process_index: int = 0
    sources: list = None  # "meta.txt:3: path" of each dataset, for error messages
    weights: list = None  # sampling weights (all datasets) or None
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for i, (size, batch_size) in enumerate(zip(self.dataset_sizes, self.batch_sizes)):
            if size < batch_size * self.num_processes:
                raise DataError(
                    f"{self.sources[i] if self.sources else f'dataset #{i}'} has {size} records, fewer than one "
                    f"global batch ({batch_size} x {self.num_processes} processes)"
                )

    def batches_per_permutation(self, i):
        return self.dataset_sizes[i] // (self.batch_sizes[i] * self.num_processes)

    def batch_counts(self) -> list:
        """Global batches of each dataset in one epoch."""
        if self.weights is None:
            return [repeat * self.batches_per_permutation(i) for i, repeat in enumerate(self.repeats)]
        # the weights over a power of two (exact) near the largest: total x w cannot overflow, and w / sum is unchanged
        scale = -math.frexp(max(self.weights))[1]
        weights = [math.ldexp(w, scale) for w in self.weights]
        total, weight_sum = len(self), sum(weights)
        exact = [total * w / weight_sum for w in weights]
        counts = [math.floor(x) for x in exact]
        by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
        for i in by_remainder[: total - sum(counts)]:
            counts[i] += 1
        return counts

    def global_batches(self, epoch: int) -> list:
        """[(dataset index, [record indices of the global batch], draw key)] for one epoch."""
        if epoch not in self._cache:
            rng = np.random.default_rng([self.seed, epoch])
            batches = []
            for i, count in enumerate(self.batch_counts()):
                global_size = self.batch_sizes[i] * self.num_processes
                if self.weights is None:  # ``repeat`` fresh permutations of this epoch: occurrences 0..repeat-1
                    permutations = [(rng.permutation(self.dataset_sizes[i]), (epoch, occurrence))
                                    for occurrence in range(self.repeats[i])]
                    cuts = [(order, draw, b) for order, draw in permutations
                            for b in range(self.batches_per_permutation(i))]
                else:
                    cuts = self._weighted_cuts(i, epoch, count)
                batches.extend((i, order[b * global_size : (b + 1) * global_size].tolist(), draw)
                               for order, draw, b in cuts)
            batch_order = rng.permutation(len(batches))
            self._cache = {epoch: [batches[b] for b in batch_order]}
        return self._cache[epoch]

    def _weighted_cuts(self, i, epoch, count):
        """Dataset i's ``count`` batches of the epoch from its own stream of permutations, continued across
        epochs: [(permutation, draw key, batch within it)]."""
        cuts, orders = [], {}
        for position in range(epoch * count, (epoch + 1) * count):
            permutation, b = divmod(position, self.batches_per_permutation(i))
            if permutation not in orders:
                orders[permutation] = np.random.default_rng([self.seed, i, permutation]).permutation(self.dataset_sizes[i])
            cuts.append((orders[permutation], (permutation,), b))
        return cuts

    def local_batch(self, epoch: int, position: int) -> tuple:
        """This process's slice of the epoch's ``position``-th global batch: (dataset, indices, draw key)."""
        dataset_index, indices, draw = self.global_batches(epoch)[position]
        size = len(indices) // self.num_processes
        return dataset_index, indices[self.process_index * size : (self.process_index + 1) * size], draw

    def local_batches(self, epoch: int) -> list:
        """This process's slice of every global batch of the epoch."""
        return [self.local_batch(epoch, position) for position in range(len(self))]

    def __len__(self):
        return sum(repeat * self.batches_per_permutation(i) for i, repeat in enumerate(self.repeats))


class BalancedBatchSampler:
    """Conan's cross-GPU batch balance (CBB): every step holds one batch of every task kind present.

    Each kind samples its own datasets like TaskBatchSampler. Retrieval batches are not sliced:
    every process gets the whole query batch and holds its own part of the hard negatives
    (TaskCollator.negative_part); the other kinds are sliced across processes as usual. An epoch is
    one pass over the retrieval batches; the other kinds cycle through their own epochs, their
    position a function of the step count, so resuming still needs only (epoch, batch index).
    """

    def __init__(self, datasets, batch_sizes, seed, num_processes=1, process_index=0, sources=None):
        kinds = [kind for kind in TASK_KINDS if any(d.kind == kind for d in datasets)]
        if "retri_contrast" not in kinds:
            raise DataError("--cbb needs at least one retri_contrast dataset in the meta list")
        self.kinds = ["retri_contrast"] + [kind for kind in kinds if kind != "retri_contrast"]
        self.members = {kind: [i for i, d in enumerate(datasets) if d.kind == kind] for kind in self.kinds}
        self.samplers = {}
        for offset, kind in enumerate(self.kinds):
            members = self.members[kind]
            sliced = kind != "retri_contrast"
            self.samplers[kind] = TaskBatchSampler(
                [len(datasets[i]) for i in members], [datasets[i].repeat for i in members],
                [batch_sizes[i] for i in members], seed + offset,
                num_processes if sliced else 1, process_index if sliced else 0,
                [sources[i] for i in members] if sources else None,
                [datasets[i].weight for i in members] if datasets[0].weight is not None else None)

    def __len__(self):
        return len(self.samplers["retri_contrast"])

    def local_batches(self, epoch: int) -> list:
        """[[(dataset index, local record indices, draw key) for each kind] for each step of the epoch]."""
        steps = []
        for batch_no, (member, indices, draw) in enumerate(self.samplers["retri_contrast"].local_batches(epoch)):
            parts = [(self.members["retri_contrast"][member], indices, draw)]
            for kind in self.kinds[1:]:
                sampler = self.samplers[kind]
                kind_epoch, position = divmod(epoch * len(self) + batch_no, len(sampler))
                member, kind_indices, kind_draw = sampler.local_batch(kind_epoch, position)
                parts.append((self.members[kind][member], kind_indices, kind_draw))
            steps.append(parts)
        return steps


class EpochBatches(torch.utils.data.Dataset):
    """Item i is the i-th local batch of an epoch, tokenized; starts at ``start`` to resume.

    A batch also names its ``dataset_index`` and record ``indices`` (for hard-negative re-mining);
    under CBB an item is ``{"parts": [one batch per task kind]}``.
    """

    def __init__(self, sampler: TaskBatchSampler, datasets: list, collator, epoch: int, start: int = 0):
        self.batches = sampler.local_batches(epoch)[start:]
        self.datasets = datasets
        self.collator = collator

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        if isinstance(self.batches[i], list):
            return {"parts": [self._collate(*part) for part in self.batches[i]]}
        return self._collate(*self.batches[i])

    def _collate(self, dataset_index, indices, draw):
        batch = self.collator(self.datasets[dataset_index], indices, draw)
        return {**batch, "dataset_index": dataset_index, "indices": list(indices)}

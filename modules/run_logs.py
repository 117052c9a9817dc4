"""What a training run logs every ``--log_every`` steps besides throughput: the loss of each task kind and of each
dataset, and the gradient norm before clipping (``--max_grad_norm`` decides results: README, Model quality).

The gradient norms stay on the device until the log step: no wait for the GPU each step for them.
"""

import torch


class LossWindow:
    """The mean loss of each task kind over a log window (``loss/<kind>``), and of each dataset whose kind has more
    than one in the run (``loss/<kind>/<dataset name>``): each process's mean, averaged over processes."""

    def __init__(self, kinds, datasets):
        self.kinds, self.datasets = list(kinds), datasets
        shared = {kind for kind in self.kinds if sum(d.kind == kind for d in datasets) > 1}
        self.split = [i for i, d in enumerate(datasets) if d.kind in shared]  # datasets logged on their own
        self.reset()

    def reset(self):
        size = len(self.kinds) + len(self.datasets)  # [kinds | datasets]
        self.loss, self.count = torch.zeros(size), torch.zeros(size)

    def add(self, part, loss):
        """A forward's (unweighted) loss of a batch ``part`` (its ``kind`` and ``dataset_index``)."""
        value = loss.detach().float().cpu()  # stop_on_non_finite_loss has read the loss already: no extra wait
        for i in (self.kinds.index(part["kind"]), len(self.kinds) + part["dataset_index"]):
            self.loss[i] += value
            self.count[i] += 1

    def metrics(self, accelerator):
        """The window's means, then a new window. Every process calls it (one all-reduce)."""
        means = accelerator.reduce(self.loss.to(accelerator.device), "mean").cpu() / self.count.clamp(min=1)
        metrics = {f"loss/{kind}": means[i].item() for i, kind in enumerate(self.kinds) if self.count[i]}
        for i in self.split:
            if self.count[len(self.kinds) + i]:
                dataset = self.datasets[i]
                metrics[f"loss/{dataset.kind}/{dataset.name}"] = means[len(self.kinds) + i].item()
        self.reset()
        return metrics


class GradNorms:
    """Gradient clipping at ``max_norm`` (0: none) that keeps the total norm before clipping of every optimizer step,
    for ``grad_norm`` (the window's mean) and ``grad_clipped`` (the share of its steps clipped; not without
    clipping), kept on the device until ``metrics``."""

    def __init__(self, accelerator, max_norm):
        self.accelerator, self.max_norm = accelerator, max_norm
        self.reset()

    def reset(self):
        self.total, self.clipped, self.steps = 0.0, 0.0, 0

    def clip(self, parameters):
        """Clip the synced gradients at ``max_norm``; without clipping measure them only, at max_norm inf (a factor of
        exactly 1, or none: the same weights as no call)."""
        norm = self.accelerator.clip_grad_norm_(parameters, self.max_norm if self.max_norm > 0 else float("inf"))
        if norm is None:  # DeepSpeed clips inside its engine; accelerate may have no norm from it: nothing logged
            return
        norm = torch.as_tensor(norm).detach().float()  # DeepSpeed's may be a Python float
        self.total = self.total + norm
        if self.max_norm > 0:
            self.clipped = self.clipped + (norm > self.max_norm).float()
        self.steps += 1

    def metrics(self):
        """{"grad_norm", "grad_clipped"} of the steps since the last call (then reset); {} when none measured. The
        norm is of the whole gradient, the same on every process."""
        if not self.steps:
            return {}
        metrics = {"grad_norm": float(self.total) / self.steps}
        if self.max_norm > 0:
            metrics["grad_clipped"] = float(self.clipped) / self.steps
        self.reset()
        return metrics

"""Merging trained models in weight space: a (weighted) mean of several, or spherical interpolation of two.

    mean:   w = sum_m a_m w_m / sum_m a_m                          (model soups, Wortsman et al. 2022, arXiv 2203.05482)
    slerp:  w = sin((1 - t) theta) / sin(theta) w_1 + sin(t theta) / sin(theta) w_2,
            theta = arccos(<w_1, w_2> / (|w_1| |w_2|)),  t = a_2 / (a_1 + a_2)      (each tensor on its own; Shoemake
            1985, as in the merge step of Qwen3-Embedding and mergekit)

Models are merged file by file and tensor by tensor: every ``*.safetensors`` file of the first model directory must
exist in the others with the same tensor names and shapes. Integer tensors (position ids) must be equal.
"""

from pathlib import Path

import torch

from .cli import UsageError


def weight_files(model_dir):
    """The relative paths of a model directory's safetensors files (the backbone, a Dense layer, ...)."""
    model_dir = Path(model_dir)
    files = sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*.safetensors"))
    if not files:
        raise UsageError(f"{model_dir}: no *.safetensors weights (a sentence-transformers or transformers directory, "
                         "or a checkpoint-<step> of a run)")
    return files


def merge_tensors(tensors, weights, method, name):
    """The merge of one tensor of every model (float64 math, the first model's dtype)."""
    first = tensors[0]
    for other in tensors[1:]:
        if other.shape != first.shape:
            raise UsageError(f"{name}: shapes {tuple(first.shape)} and {tuple(other.shape)} differ")
    if not first.is_floating_point():
        if any(not torch.equal(first, other) for other in tensors[1:]):
            raise UsageError(f"{name}: integer tensors differ between the models")
        return first
    total = sum(weights)
    if method == "mean":
        merged = sum(w * t.double() for w, t in zip(weights, tensors)) / total
    else:
        merged = slerp(tensors[0].double(), tensors[1].double(), weights[1] / total)
    return merged.to(first.dtype)


def slerp(a, b, t, eps=1e-7):
    """Spherical interpolation from ``a`` (t = 0) to ``b`` (t = 1) along the arc between their directions, lengths
    interpolated linearly; plain linear interpolation when they are (anti)parallel within ``eps``."""
    a_flat, b_flat = a.flatten(), b.flatten()
    norm_a, norm_b = a_flat.norm(), b_flat.norm()
    if norm_a < eps or norm_b < eps:
        return (1 - t) * a + t * b
    cosine = torch.clamp(a_flat @ b_flat / (norm_a * norm_b), -1.0, 1.0)
    theta = torch.arccos(cosine)
    if theta < eps or torch.pi - theta < eps:
        return (1 - t) * a + t * b
    direction = (torch.sin((1 - t) * theta) * a_flat / norm_a + torch.sin(t * theta) * b_flat / norm_b) / torch.sin(theta)
    return (((1 - t) * norm_a + t * norm_b) * direction / direction.norm()).view_as(a)


def merge_model_dirs(model_dirs, weights, method, out_dir):
    """Write the merged weights of ``model_dirs`` into ``out_dir`` (already holding a copy of the first model's
    files); returns the names of the merged files."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    files = weight_files(model_dirs[0])
    for model_dir in model_dirs[1:]:
        missing = sorted(set(files) - set(weight_files(model_dir)))
        if missing:
            raise UsageError(f"{model_dir}: no {missing[0]} (the models must have the same layout)")
    for relative in files:
        handles = [safe_open(str(Path(d) / relative), "pt") for d in model_dirs]
        names = list(handles[0].keys())
        for model_dir, handle in zip(model_dirs[1:], handles[1:]):
            if set(handle.keys()) != set(names):
                different = sorted(set(handle.keys()) ^ set(names))[0]
                raise UsageError(f"{Path(model_dir) / relative}: tensor {different} is not in both models")
        metadata = handles[0].metadata()
        merged = {name: merge_tensors([h.get_tensor(name) for h in handles], weights, method, f"{relative}: {name}")
                  for name in names}
        save_file(merged, str(Path(out_dir) / relative), metadata=metadata)
    return files

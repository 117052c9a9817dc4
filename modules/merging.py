"""Merging trained models in weight space: a (weighted) mean of several, or spherical interpolation of two.

    mean:   w = sum_m a_m w_m / sum_m a_m                          (model soups, Wortsman et al. 2022, arXiv 2203.05482)
    slerp:  w = sin((1 - t) theta) / sin(theta) w_1 + sin(t theta) / sin(theta) w_2,
            theta = arccos(<w_1, w_2> / (|w_1| |w_2|)),  t = a_2 / (a_1 + a_2)      (each tensor on its own; Shoemake
            1985, as in the merge step of Qwen3-Embedding and mergekit)

Models are merged module by module (the folders of a sentence-transformers directory's modules.json that hold
weights: the transformer, a Dense; a transformers directory itself) and tensor by tensor. A module's weights are its
``model*.safetensors`` files or, without them, its ``pytorch_model*.bin`` files (older hub snapshots); a tensor is
matched by name, a name under one leading prefix (``bert.``, as a BertForPreTraining checkpoint saves it) being the
same tensor, as transformers loads either into the base model.

Every trained tensor must be in every model, with the same shape. Savers differ in what else they write, and a merge
of a fine-tune with its own start model (WiSE-FT, LM-Cocktail) meets both layouts, so two kinds of tensor need not be
in every model:

- buffers nobody trains: integer tensors (``position_ids``, saved by transformers 4, not by 5) and rotary
  ``inv_freq``; where several models have one it must be equal in all of them;
- BERT's pooler: no sentence embedding reads it (sentence-transformers pools the hidden states, EmbeddingModel drops
  it and saves zeros in its place), so it is taken from the first model: a mean with our zeros would only shrink the
  packaged model's pooler.

The merged directory keeps the first model's layout: its files and their format, its tensor names, its buffers and its
pooler; a buffer or pooler that only the other models have is not added. Weights of the first model that the merge
does not write (a ``pytorch_model.bin`` beside the safetensors that were read, a LoRA run's ``adapter/``) are removed
from it: they would hold the first model's weights under the merged model's name.
"""

import json
import re
import shutil
from functools import partial
from pathlib import Path

import torch

from .cli import UsageError
from .weight_files import load_pickle, open_safetensors

WEIGHT_PATTERNS = ("model*.safetensors", "pytorch_model*.bin")  # in this order: safetensors when a folder has both
WEIGHT_SUFFIXES = (".safetensors", ".bin")
_BUFFER_NAME = re.compile(r"(^|\.)inv_freq$")  # float buffers transformers computes (rotary frequencies)
_POOLER_NAME = re.compile(r"(^|\.)pooler\.")


class ModuleWeights:
    """The tensors of one module folder, read lazily (a 7B model is not loaded whole for each input): ``files``
    maps each weight file to the names it holds."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.files, self._loaders, self.metadata = {}, {}, {}
        for path in weight_paths(self.folder):
            handle = _open(path)
            self.files[path] = list(handle.keys())
            self.metadata[path] = handle.metadata() if hasattr(handle, "metadata") else None
            getter = handle.get_tensor if hasattr(handle, "get_tensor") else handle.__getitem__
            self._loaders.update({name: (path, partial(getter, name)) for name in self.files[path]})

    def names(self):
        return set(self._loaders)

    def tensor(self, name):
        return self._loaders[name][1]()

    def file_of(self, name):
        return self._loaders[name][0]


def weight_paths(folder):
    """A module folder's weight files: its safetensors, or without them its pytorch_model.bin files."""
    found = (sorted(Path(folder).glob(pattern)) for pattern in WEIGHT_PATTERNS)
    return next((paths for paths in found if paths), [])


def _open(path):
    """A safetensors handle, or a pytorch_model.bin's state dict memory-mapped (tensors only, no pickled code); a
    damaged file is refused naming it."""
    return open_safetensors(path) if path.suffix == ".safetensors" else load_pickle(path, mmap=True)


def module_folders(model_dir):
    """The relative folders of a model directory that hold its modules' weights: the folders its modules.json names
    (a sentence-transformers directory; not a LoRA run's adapter/), or the directory itself."""
    model_dir = Path(model_dir)
    modules_file = model_dir / "modules.json"
    modules = json.loads(modules_file.read_text()) if modules_file.is_file() else [{"path": ""}]
    paths = dict.fromkeys(module.get("path", "") for module in modules)
    folders = [folder for folder in paths if weight_paths(model_dir / folder)]
    if not folders:
        raise UsageError(f"{model_dir}: no model weights ({' or '.join(WEIGHT_PATTERNS)}; a sentence-transformers or "
                         "transformers directory, or a checkpoint-<step> of a run)")
    return folders


def tensor_kind(name, tensor):
    """'buffer' (trained by nobody: integer indices, rotary frequencies), 'pooler' (BERT's, read by no sentence
    embedding) or 'trained': only trained tensors must be in every model."""
    if not tensor.is_floating_point() or _BUFFER_NAME.search(name):
        return "buffer"
    return "pooler" if _POOLER_NAME.search(name) else "trained"


def aligned_names(names, first_names):
    """{first model's name: this model's name} for this model's ``names``: equal names, or names equal but for one
    leading prefix on either side (``bert.embeddings...`` is ``embeddings...``)."""
    unprefixed_first = {name.split(".", 1)[1]: name for name in first_names if "." in name}

    def first_name(name):
        if name in first_names:
            return name
        rest = name.split(".", 1)[-1]
        return rest if rest in first_names else unprefixed_first.get(name, name)

    return {first_name(name): name for name in names}


def merge_tensors(tensors, weights, method):
    """The merge of one trained tensor of every model (float64 math, the first model's dtype)."""
    first = tensors[0]
    if method == "mean":
        merged = sum(w * t.double() for w, t in zip(weights, tensors)) / sum(weights)
    else:
        merged = slerp(tensors[0].double(), tensors[1].double(), weights[1] / sum(weights))
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


def merged_tensor(name, sources, aligned, weights, method):
    """The merged tensor ``name`` (the first model's name) from every model that has it: trained tensors merged,
    buffers checked equal, the pooler the first model's."""
    first = sources[0].tensor(name)
    present = [(source, names[name], weight) for source, names, weight in zip(sources, aligned, weights)
               if name in names]
    tensors = [first] + [source.tensor(own) for source, own, _ in present[1:]]
    for (source, own, _), tensor in zip(present[1:], tensors[1:]):
        if tensor.shape != first.shape:
            raise UsageError(f"{source.file_of(own)}: tensor {own}: shapes {tuple(first.shape)} (in "
                             f"{sources[0].file_of(name)}) and {tuple(tensor.shape)} differ")
    kind = tensor_kind(name, first)
    if kind == "buffer":
        for (source, own, _), tensor in zip(present[1:], tensors[1:]):
            if not torch.equal(first, tensor.to(first.dtype)):
                raise UsageError(f"{source.file_of(own)}: buffer {own} differs from {sources[0].file_of(name)}'s")
        return first
    return first if kind == "pooler" else merge_tensors(tensors, [w for *_, w in present], method)


def checked_names(sources, aligned):
    """Refuse a trained tensor that is not in every model: missing from another, or another's alone."""
    first = sources[0]
    for source, names in zip(sources[1:], aligned[1:]):
        for name in sorted(first.names() - set(names)):
            if tensor_kind(name, first.tensor(name)) == "trained":
                raise UsageError(f"{first.file_of(name)}: tensor {name} is not in {source.folder} (a trained weight "
                                 "every model must have)")
        for name in sorted(set(names) - first.names()):
            own = names[name]
            if tensor_kind(own, source.tensor(own)) == "trained":
                raise UsageError(f"{source.file_of(own)}: tensor {own} is not in {first.folder} (a trained weight "
                                 "every model must have)")


def merge_module(folder, model_dirs, weights, method, out_dir):
    """Write the merged weights of one module folder into ``out_dir`` in the first model's files and format;
    returns the paths written."""
    from safetensors.torch import save_file

    sources = [ModuleWeights(Path(model_dir) / folder) for model_dir in model_dirs]
    aligned = [{name: name for name in sources[0].names()}] + [
        aligned_names(source.names(), sources[0].names()) for source in sources[1:]]
    checked_names(sources, aligned)
    written = []
    for path, names in sources[0].files.items():
        merged = {name: merged_tensor(name, sources, aligned, weights, method) for name in names}
        target = Path(out_dir) / folder / path.name
        if path.suffix == ".safetensors":
            save_file(merged, str(target), metadata=sources[0].metadata[path])
        else:
            torch.save(merged, target)
        written.append(target)
    return written


def drop_unmerged_weights(out_dir, folders, written):
    """Remove the weights the merge did not write from ``out_dir`` (a copy of the first model): another format's
    files (and their shard index) in a module folder, and any other folder holding weights (a LoRA run's adapter/,
    which would not describe the merged model)."""
    out_dir = Path(out_dir)
    modules = {out_dir / folder for folder in folders}
    for path in sorted(out_dir.rglob("*")):
        if path.is_file() and path.suffix in WEIGHT_SUFFIXES and path not in written:
            if path.parent in modules or any(path.parent in module.parents for module in modules):
                path.unlink()
            else:
                shutil.rmtree(path.parent)
    for index in out_dir.rglob("*.index.json"):
        shards = json.loads(index.read_text()).get("weight_map", {}).values()
        if not all((index.parent / shard).is_file() for shard in shards):
            index.unlink()


def merge_model_dirs(model_dirs, weights, method, out_dir):
    """Write the merged weights of ``model_dirs`` into ``out_dir`` (already holding a copy of the first model's
    files); returns the merged files relative to ``out_dir``."""
    folders = module_folders(model_dirs[0])
    for model_dir in model_dirs[1:]:
        checked_modules(folders, model_dirs[0], module_folders(model_dir), model_dir)
    written = [path for folder in folders for path in merge_module(folder, model_dirs, weights, method, out_dir)]
    drop_unmerged_weights(out_dir, folders, written)
    return [str(path.relative_to(out_dir)) for path in written]


def checked_modules(folders, first_dir, other_folders, other_dir):
    """Refuse models whose modules with weights differ (a ScalingLayer's 2_Dense in one only), before writing."""
    missing = [folder for folder in folders if folder not in other_folders]
    if missing:
        wanted = Path(missing[0]) / weight_paths(Path(first_dir) / missing[0])[0].name
        raise UsageError(f"{other_dir}: no {wanted} (the models must have the same layout)")
    extra = [folder for folder in other_folders if folder not in folders]
    if extra:
        raise UsageError(f"{Path(other_dir) / extra[0]}: a module with weights that {first_dir} does not have (the "
                         "models must have the same layout)")

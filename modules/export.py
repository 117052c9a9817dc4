"""A training checkpoint back as a model: its full weights, whatever wrote them, and the model the run's script built.

    from modules.export import read_checkpoint, rebuild_model
    kind, weights = read_checkpoint(Path("runs/ft/checkpoint-500"))    # ("DeepSpeed ZeRO-1", {name: tensor})
    script, args, model = rebuild_model(Path("runs/ft"))                # from runs/ft/run_config.json

tools/export_checkpoint.py puts the two together. The layouts accelerate's ``save_state`` writes:

- one process or DDP: ``model.safetensors`` (``pytorch_model.bin`` without safe serialization), the keys of the
  prepared model (DDP's start with ``module.``);
- DeepSpeed: ``pytorch_model/``, the engine's own checkpoint. Trained weights come from the fp32 master copy in the
  optimizer states (deepspeed's zero_to_fp32), as final/ does; parameters without a master copy (frozen ones) from
  the saved module (ZeRO-1/2, in the engine's dtype) or from every process's partition of it (ZeRO-3). Its pickles
  are read weights-only, with the few DeepSpeed types they hold allowed (modules/weight_files.py): a checkpoint is
  input from anyone, and unpickling could run code;
- FSDP: ``pytorch_model_fsdp_0/`` (SHARDED_STATE_DICT: a torch.distributed.checkpoint folder, keys
  ``model.<name>``) or ``pytorch_model_fsdp.bin`` (FULL_STATE_DICT).
"""

import argparse
import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate.utils.constants import FSDP_MODEL_NAME, MODEL_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_NAME

from .checkpoints import TRAINER_STATE, completed_checkpoints
from .cli import UsageError
from .output_paths import refuse_output_over_inputs
from .weight_files import check_pickles, deepspeed_globals, load_pickle, load_safetensors, weights_only_loads

SCRIPTS = ("train_finetune.py", "train_llm_embed.py", "train_pretrain.py")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile


def read_checkpoint(checkpoint):
    """(kind, full state dict on CPU) of a checkpoint folder; a UsageError naming it when no known layout is there."""
    checkpoint = Path(checkpoint)
    processes = len(list(checkpoint.glob("random_states_*.pkl")))  # one file per process
    for name in (SAFE_WEIGHTS_NAME, WEIGHTS_NAME):
        if (checkpoint / name).is_file():
            kind = "single process" if processes <= 1 else f"DDP ({processes} processes)"
            return kind, _unwrapped(_load_weights_file(checkpoint / name))
    if (checkpoint / MODEL_NAME).is_dir():
        return _deepspeed_weights(checkpoint / MODEL_NAME)
    if (checkpoint / f"{FSDP_MODEL_NAME}_0").is_dir():
        return "FSDP (SHARDED_STATE_DICT)", _distributed_checkpoint_weights(checkpoint / f"{FSDP_MODEL_NAME}_0")
    if (checkpoint / f"{FSDP_MODEL_NAME}.bin").is_file():
        return "FSDP (FULL_STATE_DICT)", _unwrapped(_load_weights_file(checkpoint / f"{FSDP_MODEL_NAME}.bin"))
    raise UsageError(f"{checkpoint}: no model weights in a layout accelerate writes ({SAFE_WEIGHTS_NAME}, {WEIGHTS_NAME}, "
                     f"{MODEL_NAME}/, {FSDP_MODEL_NAME}_0/ or {FSDP_MODEL_NAME}.bin)")


def _load_weights_file(path):
    return load_safetensors(path) if path.suffix == ".safetensors" else load_pickle(path)


def _unwrapped(state_dict):
    for prefix in WRAPPER_PREFIXES:
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def _deepspeed_weights(folder):
    """(kind, weights) of DeepSpeed's checkpoint folder: its pickles checked, then read by zero_to_fp32 under
    weights-only loading (a crafted pickle would run code)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    allowed = deepspeed_globals()
    check_pickles(sorted(folder.glob("*.pt")), allowed)  # names a file the weights-only loads below would refuse
    try:
        with weights_only_loads(allowed):
            state_dict = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    except (ValueError, FileNotFoundError, KeyError, pickle.UnpicklingError) as error:
        raise UsageError(f"{folder}: not a DeepSpeed ZeRO checkpoint deepspeed can read "
                         f"({str(error).strip().splitlines()[0]})") from None
    # ZeRO-1/2 tensors are views of flat partitions: copies, which safetensors can save
    state_dict = {key: value.clone() for key, value in state_dict.items()}
    whole_module = folder / "mp_rank_00_model_states.pt"  # ZeRO-1/2; ZeRO-3 saves one partition per process
    if not whole_module.is_file():
        return "DeepSpeed ZeRO-3", state_dict
    saved = load_pickle(whole_module, allowed)
    stage = saved.get("ds_config", {}).get("zero_optimization", {}).get("stage", "1/2")
    # ZeRO-1 records no frozen parameters beside the module (ZeRO-2 does): the saved module has them, as the run
    # had them at the end; every parameter with a master copy is taken from that copy
    return f"DeepSpeed ZeRO-{stage}", {**saved["module"], **state_dict}


def _distributed_checkpoint_weights(folder):
    """The full tensors of a torch.distributed.checkpoint folder holding ``{"model": state_dict}``, read on one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    odd = [key for key, entry in entries.items()
           if not key.startswith("model.") or not isinstance(entry, TensorStorageMetadata)]
    if odd:
        raise UsageError(f"{folder}: {odd[:3]} are not model tensors (accelerate saves {{'model': state_dict}})")
    state_dict = {key.removeprefix("model."): torch.empty(entry.size, dtype=entry.properties.dtype)
                  for key, entry in entries.items()}
    dcp.load({"model": state_dict}, storage_reader=dcp.FileSystemReader(str(folder)), no_dist=True)
    return state_dict


def matching_weights(state_dict, model, checkpoint):
    """``state_dict`` in the order of ``model.state_dict()``; a UsageError naming the keys when one is missing, extra,
    or of another shape."""
    expected = model.state_dict()
    problems = {
        "missing": [key for key in expected if key not in state_dict],
        "unexpected": [key for key in state_dict if key not in expected],
        "of another shape": [key for key in expected if key in state_dict and state_dict[key].shape != expected[key].shape],
    }
    if any(problems.values()):
        found = "; ".join(f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                          for what, keys in problems.items() if keys)
        raise UsageError(f"{checkpoint}: its weights do not fit the model its run_config.json builds: {found}")
    return {key: state_dict[key] for key in expected}


def refuse_run_dir(path):
    """A UsageError when ``path`` is a run's output dir (it has run_config.json) given where a model is wanted: the
    run dir holds no weights itself, so name what in it does (its final/, its checkpoints)."""
    path = Path(path)
    if not (path / "run_config.json").is_file():
        return
    choices = [str(path / "final")] if (path / "final").is_dir() else []
    checkpoints = [checkpoint.name for checkpoint in completed_checkpoints(path)]
    if checkpoints:
        choices.append(f"one of its checkpoints ({', '.join(checkpoints)})")
    found = f"give {' or '.join(choices)}" if choices else "it holds no final/ or checkpoint yet"
    raise UsageError(f"{path} is a run's output directory: {found}")


def read_run_config(run_dir):
    config_file = Path(run_dir) / "run_config.json"
    if not config_file.is_file():
        raise UsageError(f"{config_file}: not found; a checkpoint's parent must be the output dir of its run")
    try:
        config = json.loads(config_file.read_text())
        return config_file, config, argparse.Namespace(**config["args"])
    except (ValueError, KeyError, TypeError) as error:
        raise UsageError(f"{config_file}: not a run config ({type(error).__name__}: {error})") from None


def training_script(config, config_file):
    """The script that wrote a run: argv[0] of its command, else told by flags only that script has."""
    command = config.get("command") or [""]
    if Path(command[0]).name in SCRIPTS:
        return Path(command[0]).name
    flags = config["args"]
    for script, flag in (("train_llm_embed.py", "lora_r"), ("train_pretrain.py", "mini_batch_size"),
                         ("train_finetune.py", "retri_batch_size")):
        if flag in flags:
            return script
    raise UsageError(f"{config_file}: written by none of {', '.join(SCRIPTS)} (command {command[0]!r})")


def rebuild_model(run_dir):
    """(script, args, model): the model as the run's script built it before step one (the start weights, by its
    builder in modules/model_builders.py), from the run's run_config.json, with the prompts the script adds after
    building it."""
    from .meta_list import entry_kind, read_meta_list
    from .model_builders import build_encoder, build_llm_model, build_pretrain_encoder
    from .prompts import set_training_prompts

    config_file, config, args = read_run_config(run_dir)
    script = training_script(config, config_file)
    quiet = SimpleNamespace(print=lambda *_, **__: None)  # the builders' accelerator, used to print only
    if script == "train_pretrain.py":
        model = build_pretrain_encoder(args)
        datasets = [("pairs", "retri_contrast")]  # every source's queries take --query_prefix
    else:
        if script == "train_llm_embed.py":
            model = build_llm_model(args, quiet)
        else:
            model = build_encoder(args, quiet)
        datasets = [(entry.name, entry_kind(entry)) for entry in read_meta_list(args.meta_list, args.root_dir)]
    set_training_prompts(model, args, datasets)  # as the script does after building the model
    return script, args, model


def checked_step(checkpoint, out, overwrite):
    """The checkpoint's step; refuses a folder that is no complete checkpoint, and an OUT it must not replace: the
    checkpoint itself or a folder holding it (its run dir; --overwrite would delete it), or a folder inside it."""
    state_file = checkpoint / TRAINER_STATE
    if not state_file.is_file():
        raise UsageError(f"{checkpoint}: not a checkpoint (no {TRAINER_STATE}; a complete checkpoint-<step> has one)")
    refuse_output_over_inputs(out, [checkpoint])  # before the advice of --overwrite below
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out} exists and is not empty (--overwrite replaces it)")
    return json.loads(state_file.read_text())["global_step"]


def export_checkpoint(checkpoint, out, no_wise_ft, step, no_ema=False):
    """Write OUT with a model card; returns (kind of checkpoint, training script, run args, whether WiSE-FT averaged).
    A run with --ema_decay exports the checkpoint's weight average (ema.safetensors), as its final/, unless
    ``no_ema``."""
    from .card_weights import export_summary
    from .checkpoints import written_whole
    from .model_card import write_model_card
    from .nonfinite import check_finite_weights
    from .outputs import final_weights

    read_run_config(checkpoint.parent)  # a missing config is reported before the weights are read
    kind, weights = read_checkpoint(checkpoint)
    script, run_args, model = rebuild_model(checkpoint.parent)
    wise_ft = run_args.wise_ft_alpha < 1 and not no_wise_ft
    weights = matching_weights(weights, model, checkpoint)
    if getattr(run_args, "ema_decay", 0) and not no_ema:
        weights = averaged_weights(weights, checkpoint)
    weights, _ = final_weights(weights, run_args, wise_ft)

    check_finite_weights(weights, str(checkpoint))
    with written_whole(out) as partial:
        model.save_pretrained(partial, state_dict=weights)
        write_model_card(partial, run_args, export_summary(checkpoint.parent, step, 0 if no_ema else getattr(
            run_args, "ema_decay", 0), run_args.wise_ft_alpha if wise_ft else 1))
    return kind, script, run_args, wise_ft


def averaged_weights(weights, checkpoint):
    """``weights`` with the checkpoint's moving average (--ema_decay) in place of the trained weights it averages."""
    from .ema import EMA_STATE

    file = checkpoint / EMA_STATE
    if not file.is_file():
        raise UsageError(f"{checkpoint}: the run averages its weights (--ema_decay) but {EMA_STATE} is missing")
    average = load_safetensors(file)
    unknown = sorted(set(average) - set(weights))
    if unknown:
        raise UsageError(f"{file}: {unknown[0]} is not a weight of the model")
    return {key: average[key].to(value.dtype) if key in average else value for key, value in weights.items()}

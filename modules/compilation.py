"""torch.compile of the trained model (``--torch_compile``): the embedding model's forward (backbone, pooling,
ScalingLayer) compiled by inductor with dynamic shapes, so that length buckets, GradCache mini-batches and a last short
batch reuse one graph instead of compiling one per shape.

The model is compiled in place (``nn.Module.compile``): it stays the same module, so its state dict has none of
torch.compile's ``_orig_mod.`` prefixes; checkpoints, final/ and the export are an eager run's, and a compiled run
resumes an eager run's checkpoint and the other way round. It is compiled before ``accelerator.prepare``: DDP wraps the
compiled module (dynamo's DDP optimizer splits the graph at DDP's gradient buckets).

Graphs: dynamo specialises a batch of one row and keeps one graph for each grad mode (GradCache's first pass and the
dev sets run without one) and each of train / eval mode, so a run compiles a handful (train_summary.json counts them:
``compile_figures``), far below dynamo's recompile limit (8, past which it would run that shape eagerly with a
warning). Dropout masks come from inductor's random stream, not eager's: a run with dropout trains with other masks
than the same run eager (the same law); GradCache's replay gives both of its passes the same masks.

What it cannot do is refused when the flags are read (``modules.flags.check_compile_flags``): --padding_free,
--gradient_checkpointing, and DeepSpeed, FSDP or accelerate's own dynamo_backend as launchers.
"""


def compile_for_training(model, args):
    """Compile ``model``'s forward in place when ``args.torch_compile``; the model itself either way."""
    if args.torch_compile:
        from torch._dynamo.utils import compilation_time_metrics, counters

        counters.clear()  # compile_figures counts this run's compiles (several runs share a test process)
        compilation_time_metrics.clear()
        model.compile(dynamic=True)
    return model


def compile_figures(args):
    """{"torch_compile": graphs compiled, frames compiled (the first, then one per new shape class, grad or train
    mode), graph breaks, seconds spent compiling, and those of the recompiles after the first compile (they fall in
    timed steps; the first falls in step one, which throughput leaves out)} of a --torch_compile run, for
    train_summary.json; {} otherwise."""
    if not args.torch_compile:
        return {}
    from torch._dynamo.utils import compilation_time_metrics, counters

    seconds = compilation_time_metrics.get("_compile.compile_inner", [])
    return {"torch_compile": {"graphs": counters["stats"]["unique_graphs"],
                              "compiled_frames": counters["frames"]["total"],
                              "graph_breaks": sum(counters["graph_break"].values()),
                              "compile_seconds": round(sum(seconds), 2),
                              "recompile_seconds": round(sum(seconds[1:]), 2)}}


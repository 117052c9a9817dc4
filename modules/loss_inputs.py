"""What every loss does with its inputs before its math: embeddings in float32 or wider, and the rows of every
process gathered with their gradient (so a loss over the global batch trains every process's rows)."""

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_gather


def is_distributed() -> bool:
    """Whether more than one process is training (a loss then gathers the global batch)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate ``tensor`` from every process along dim 0, keeping the autograd graph.

    Returns the gathered tensor and this process's row offset into it. Every process must pass
    the same shape.
    """
    if not is_distributed():
        return tensor, 0
    gathered = all_gather(tensor.contiguous())
    return torch.cat(gathered), dist.get_rank() * tensor.size(0)


def at_least_fp32(tensor):
    """``tensor`` in float32 (float64 stays): losses never run in bf16/fp16, whatever the launcher's precision."""
    if tensor is None:
        return None
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))

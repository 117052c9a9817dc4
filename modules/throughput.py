"""Honest speed figures: model FLOPs of the real (non-padding) tokens a step trains, and model FLOPs utilisation.

    FLOPs(batch) = passes x (2 N T + 4 L d sum_s len_s^2)

N the parameters outside the embedding tables (each does a multiply-add per token), T the real tokens, L layers of
width d whose attention scores and weighted sums cost 2 len^2 d multiply-adds per sequence (Kaplan et al. 2020,
arXiv 2001.08361, Sec. 2.1, for bidirectional attention); passes = 3 for a forward and its backward, 4 with
GradCache's second forward (Gao et al. 2021). Padding is not counted: a step that computes on padding shows a lower
MFU. MFU = FLOPs per second / (peak x processes) (Chowdhery et al. 2022, arXiv 2204.02311, App. B).
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
        self.matmul_params = sum(p.numel() for name, p in model.named_parameters() if not _embedding_table(name))
        self.passes = passes

    def of_masks(self, masks):
        """FLOPs of the real tokens of some [rows, length] attention masks."""
        lengths = torch.cat([mask.sum(1).double().cpu() for mask in masks])
        return self.passes * (2.0 * self.matmul_params * float(lengths.sum())
                              + 4.0 * self.layers * self.width * float((lengths**2).sum()))

    def of_batch(self, batch):
        """FLOPs of one task batch (its query, passage or pair texts)."""
        return self.of_masks([batch[role]["attention_mask"] for role in ("query", "passage", "pair") if role in batch])


def _embedding_table(name):
    """Lookup tables (no multiply-adds per token) and BERT's pooler (one row a sequence, and unused by our pooling)."""
    return any(part in name for part in ("word_embeddings", "position_embeddings", "token_type_embeddings",
                                         "embed_tokens", "embed_positions", "wte", "wpe", "pooler"))


def speed_metrics(window, processes, peak):
    """pairs/s, real tokens/s, model TFLOP/s (all processes) and MFU (with a peak) of a window of steps."""
    seconds = window["seconds"]
    metrics = {"pairs_per_s": window["pairs"] / seconds, "tokens_per_s": window["tokens"] / seconds,
               "tflops": window["flops"] / seconds / 1e12}
    if peak:
        metrics["mfu"] = metrics["tflops"] / (peak * processes)
    return metrics

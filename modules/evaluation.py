"""Quick in-training evaluation: embed texts and score STS-style pairs (Spearman of cosine)."""

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr


@torch.no_grad()
def embed_texts(model, tokenizer, texts, max_length, batch_size=64, normalize=True):
    """Embed ``texts`` with ``model(**tokens)`` in eval mode, in length-sorted batches.

    ``model`` may be the accelerate-wrapped module (DDP, FSDP, DeepSpeed), so every process of a
    sharded run must call this together.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    chunks = []
    for start in range(0, len(order), batch_size):
        batch_texts = [texts[i] for i in order[start : start + batch_size]]
        tokens = tokenizer(batch_texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        chunks.append(model(**tokens.to(device)).float().cpu())
    model.train(was_training)
    embeddings = torch.cat(chunks)[torch.argsort(torch.tensor(order))]
    return F.normalize(embeddings, dim=-1) if normalize else embeddings


def sts_spearman(model, tokenizer, pairs, max_length, batch_size=64):
    """Spearman correlation (x100) between cos(text, text_pair) and the gold label."""
    embeddings = embed_texts(model, tokenizer, [p["text"] for p in pairs] + [p["text_pair"] for p in pairs],
                             max_length, batch_size)
    first, second = embeddings[: len(pairs)], embeddings[len(pairs) :]
    scores = (first * second).sum(-1).numpy()
    return 100 * spearmanr(scores, [p["label"] for p in pairs]).statistic

"""Each query's best documents by dot product, computed by blocks of queries and chunks of the corpus: memory
O(queries x k + block x chunk), never the queries x corpus score matrix, and exactly the ranking of a stable sort of
the whole matrix (tied scores in corpus order: quantized similarities tie often)."""

import math

import torch

SCORE_BLOCK_ELEMENTS = 1 << 24  # scores held at once (64 MiB in float32): a query block times a corpus chunk
QUERY_BLOCK = 256


def chunked_top_k(queries, documents, k, block_elements=SCORE_BLOCK_ELEMENTS, query_block=QUERY_BLOCK):
    """[queries, min(k, documents)] indices of each query's best documents by ``queries @ documents.T``, best first,
    tied scores in corpus order (as ``torch.sort(scores, descending=True, stable=True)`` ranks them; NaN first)."""
    return blocks_top_k(queries, documents, k, query_blocks(len(queries), query_block), block_elements, query_block)


def query_blocks(count, query_block=QUERY_BLOCK):
    """[(start, stop)] of ``count`` queries in blocks of at most ``query_block``, as even as can be: no block of a
    few queries, which a BLAS library multiplies by another kernel (its scores a rounding apart)."""
    blocks = math.ceil(count / query_block)
    bounds = [count * i // blocks for i in range(blocks + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def blocks_top_k(queries, documents, k, blocks, block_elements=SCORE_BLOCK_ELEMENTS, query_block=QUERY_BLOCK):
    """``chunked_top_k`` of the queries of ``blocks`` ([(start, stop)]), in their order: the same scores, bit for bit,
    whichever blocks a process takes, since every block meets the same corpus chunks."""
    k = min(k, len(documents))
    chunk = max(k, block_elements // query_block)
    ranked = [_block_top_k(queries[start:stop], documents, k, chunk) for start, stop in blocks]
    return torch.cat(ranked) if ranked else torch.empty(0, k, dtype=torch.long)


def _block_top_k(queries, documents, k, chunk):
    """The top ``k`` of one query block, merged chunk by chunk of the corpus: an earlier chunk's documents come
    first among equal scores, so a stable sort of (kept, new) keeps corpus order."""
    kept_scores = kept_indices = None
    for start in range(0, len(documents), chunk):
        scores = queries @ documents[start : start + chunk].T
        chunk_scores, chunk_indices = _exact_top_k(scores, min(k, scores.shape[1]))
        chunk_indices += start
        if kept_scores is not None:
            chunk_scores, chunk_indices = torch.cat([kept_scores, chunk_scores], 1), torch.cat([kept_indices,
                                                                                                chunk_indices], 1)
        order = torch.sort(chunk_scores, dim=1, descending=True, stable=True).indices[:, :k]
        kept_scores, kept_indices = chunk_scores.gather(1, order), chunk_indices.gather(1, order)
    return kept_indices


def _exact_top_k(scores, k):
    """(scores, column indices) of each row's ``k`` best columns, the lowest columns among ties at the cut, in
    column order (``torch.topk`` finds the cut value exactly but picks among its ties arbitrarily)."""
    best = torch.topk(scores, k, dim=1, sorted=False).values
    if torch.isnan(best).any():  # topk and a descending sort put NaN first
        scores = scores.nan_to_num(nan=math.inf, posinf=math.inf, neginf=-math.inf)
        best = best.nan_to_num(nan=math.inf, posinf=math.inf, neginf=-math.inf)
    cut = best.min(1, keepdim=True).values
    rows, columns = (scores >= cut).nonzero(as_tuple=True)  # row by row, columns ascending
    if len(rows) > k * len(scores):  # more ties at the cut than places: the first ones in column order
        wanted = k - (best > cut).sum(1)  # the places left for ties at the cut
        at_cut = scores[rows, columns] == cut[rows, 0]
        ties = torch.bincount(rows[at_cut], minlength=len(scores))
        tie_rank = at_cut.cumsum(0) - at_cut.long() - (ties.cumsum(0) - ties)[rows]  # among its row's ties
        keep = ~at_cut | (tie_rank < wanted[rows])
        rows, columns = rows[keep], columns[keep]
    columns = columns.view(len(scores), k)
    return scores.gather(1, columns), columns

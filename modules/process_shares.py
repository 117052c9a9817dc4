"""Evaluation work shared by the processes of a run: each embeds its share of the texts and ranks its share of the
queries, and every process gets the whole back, bit for bit what one process computes alone (the same batches, the
same blocks of scores), so N processes evaluate about N times faster."""

import torch
import torch.nn.functional as F

from . import evaluation
from .top_k import blocks_top_k, query_blocks

GATHER_ROWS = 1 << 16  # rows gathered at once: a bounded buffer on the device, whatever the corpus


class ProcessShares:
    """This process's share of the run's ``num_processes``. ``embed`` (``embed_texts``'s signature) and ``top_k``
    (``chunked_top_k``'s) are called by every process together and return the same on each; with one process they
    are ``embed_texts`` and ``chunked_top_k``. ``device``: where the collective runs (the accelerator's)."""

    def __init__(self, process_index=0, num_processes=1, device="cpu"):
        self.process_index, self.num_processes, self.device = process_index, num_processes, torch.device(device)

    @classmethod
    def of(cls, accelerator):
        return cls(accelerator.process_index, accelerator.num_processes, accelerator.device)

    def embed(self, model, tokenizer, texts, max_length, batch_size=64, normalize=True):
        """``embed_texts``: the length-sorted batches dealt to the processes, each running as many forwards as the
        busiest (a sharded model needs every process in every forward), the embeddings gathered once."""
        if self.num_processes == 1:
            return evaluation.embed_texts(model, tokenizer, texts, max_length, batch_size, normalize)  # at call time
        batches = evaluation.length_batches(texts, batch_size)
        dealt = deal(len(batches), self.num_processes)
        rows_of_each = [[i for b in share for i in batches[b]] for share in dealt]
        mine = [batches[b] for b in dealt[self.process_index]]
        extra_forwards = max(map(len, dealt)) - len(mine)
        local = torch.cat(evaluation.embed_batches(model, tokenizer, texts, mine, max_length, extra_forwards))
        embeddings = self._gather_rows(local[: len(rows_of_each[self.process_index])], rows_of_each)
        return F.normalize(embeddings, dim=-1) if normalize else embeddings

    def top_k(self, queries, documents, k):
        """``chunked_top_k``: each process ranks a run of the query blocks one process would rank, then gathers."""
        blocks = query_blocks(len(queries))
        runs = [blocks[len(blocks) * p // self.num_processes : len(blocks) * (p + 1) // self.num_processes]
                for p in range(self.num_processes)]
        local = blocks_top_k(queries, documents, k, runs[self.process_index])
        if self.num_processes == 1:
            return local
        return self._gather_rows(local, [[i for start, stop in run for i in range(start, stop)] for run in runs])

    def _gather_rows(self, local, rows_of_each):
        """[rows, ...]: process p's ``local`` rows put at rows ``rows_of_each[p]``, gathered ``GATHER_ROWS`` at a
        time (a collective needs the same shape everywhere: each piece padded to the longest)."""
        import torch.distributed as dist

        gathered = local.new_empty(sum(map(len, rows_of_each)), *local.shape[1:])
        longest = max(map(len, rows_of_each))
        for start in range(0, longest, GATHER_ROWS):
            piece = local.new_zeros(min(GATHER_ROWS, longest - start), *local.shape[1:])
            piece[: max(0, min(len(local) - start, len(piece)))] = local[start : start + len(piece)]
            received = [torch.empty_like(piece, device=self.device) for _ in rows_of_each]
            dist.all_gather(received, piece.to(self.device))
            for rows, piece_of_process in zip(rows_of_each, received):
                destination = torch.tensor(rows[start : start + len(piece)], dtype=torch.long)
                gathered[destination] = piece_of_process[: len(destination)].cpu()
        return gathered


def deal(count, parts):
    """[[item index]] of each of ``parts``: items sorted by size dealt in rounds, every other round backwards, so the
    shares balance; a share's items stay in order."""
    shares = [[] for _ in range(parts)]
    for item in range(count):
        round_, seat = divmod(item, parts)
        shares[seat if round_ % 2 == 0 else parts - 1 - seat].append(item)
    return shares

"""Tokenization of fine-tuning batches: ``TaskCollator`` turns a task-homogeneous batch of records into tensors
(drawing each record's positive and negatives), with the text hashes of InfoNCE's duplicate mask and the character
cut every tokenized text gets first (``tokenize``)."""

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from .cli import DataError
from .task_datasets import TaskDataset


@dataclass
class TaskCollator:
    """Tokenize one task-homogeneous batch.

    Contrastive kinds give ``query`` (short max length) and ``passage`` = [positives | negatives
    of row 0 | negatives of row 1 | ...] (long max length); ``cosent`` gives ``pair`` =
    [texts | text_pairs] and ``labels``. Which positive and which negatives a record uses is drawn
    from (seed, draw key, record index), the draw key being the sampler's (epoch, occurrence), so it
    does not depend on process, worker or resume point, and differs between the draws of a repeated
    record. Under CBB each process takes its own part of the same shuffled retrieval negatives.
    """

    tokenizer: object
    max_length: dict  # {"query": int, "passage": int, "pair": int}
    negatives_per_kind: dict  # {"retri_contrast": n, "cls_contrast": n}
    seed: int = 0
    query_prefix: str | dict = ""  # one prefix, or {dataset name: prefix} (datasets not named: none)
    negative_part: tuple = (0, 1)  # (part, parts): CBB gives process r part r of each retrieval record's negatives
    hash_texts: bool = False  # add "text_ids" (for InfoNCE's duplicate mask) to contrastive batches
    teacher_tokenizer: object = None  # --teacher_model: "teacher" tokens of parallel batches (its own tokenizer)
    teacher_prefix: str = ""  # the teacher's query prompt
    distill: bool = False  # retrieval batches too: "teacher" tokens, or without a teacher model the records'
    # "teacher_scores" [B, 1 + K] of the positive and negatives drawn

    def __call__(self, dataset: TaskDataset, indices, draw):
        """``draw``: the sampler's draw key (epoch, occurrence), or an epoch."""
        records = [dataset.records[i] for i in indices]
        if dataset.kind == "cosent":
            texts = [r["text"] for r in records] + [r["text_pair"] for r in records]
            return {"kind": "cosent", "task": dataset.name, "pair": self._tokenize(texts, "pair"),
                    "labels": torch.tensor([r["label"] for r in records], dtype=torch.float64)}
        key = list(draw) if isinstance(draw, (tuple, list)) else [draw]
        if dataset.kind == "parallel":  # [sources | one translation of each], the teacher embeds the sources
            sources = [r["text"] for r in records]
            translations = [r["text_pos"][np.random.default_rng([self.seed, *key, i]).integers(len(r["text_pos"]))]
                            for i, r in zip(indices, records)]
            return {"kind": "parallel", "task": dataset.name, "pair": self._tokenize(sources + translations, "pair"),
                    "teacher": {"query": tokenize(self.teacher_tokenizer, sources, self.max_length["pair"])}}
        num_negatives = self.negatives_per_kind.get(dataset.kind, 0)
        positives, negatives, scores = [], [], []
        # CBB's processes share the retrieval records and take disjoint parts of their negatives (the pools
        # were checked at load to hold parts x n); other kinds are sliced by record and use part 0
        part = self.negative_part[0] * num_negatives if dataset.kind == "retri_contrast" else 0
        for index, record in zip(indices, records):
            rng = np.random.default_rng([self.seed, *key, index])
            chosen = [int(rng.integers(len(record["text_pos"])))]
            positives.append(record["text_pos"][chosen[0]])
            if num_negatives:
                pool = record["text_neg"]
                if len(pool) < part + num_negatives:  # load_meta_list checks pools against the run's needs
                    raise DataError(f"{dataset.source}: record {index} has {len(pool)} negatives, part "
                                    f"{self.negative_part} of {num_negatives} each needs {part + num_negatives}")
                chosen += [int(i) for i in rng.permutation(len(pool))[part : part + num_negatives]]
                negatives.extend(pool[i] for i in chosen[1:])
            if self.distill and "pos_scores" in record:
                scores.append([record["pos_scores"][chosen[0]], *(record["neg_scores"][i] for i in chosen[1:])])
        batch = {
            "kind": dataset.kind,
            "task": dataset.name,
            "num_negatives": num_negatives,
            "query": self._tokenize([self.prefix_for(dataset.name) + r["text"] for r in records], "query"),
            "passage": self._tokenize(positives + negatives, "passage"),
            **({"text_ids": text_ids(records, positives, negatives, num_negatives)} if self.hash_texts else {}),
        }
        if self.distill and self.teacher_tokenizer is not None and dataset.kind == "retri_contrast":
            batch["teacher"] = {"query": tokenize(self.teacher_tokenizer, [self.teacher_prefix + r["text"] for r in records],
                                                  self.max_length["query"]),
                                "passage": tokenize(self.teacher_tokenizer, positives + negatives,
                                                    self.max_length["passage"])}
        elif scores:
            batch["teacher_scores"] = torch.tensor(scores, dtype=torch.float32)
        return batch

    def prefix_for(self, dataset_name):
        return self.query_prefix if isinstance(self.query_prefix, str) else self.query_prefix.get(dataset_name, "")

    def _tokenize(self, texts, length_key):
        return tokenize(self.tokenizer, texts, self.max_length[length_key])


def text_hashes(texts):
    """A 64-bit hash of each text (the same in every process, unlike ``hash``), as a LongTensor."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)
                         for text in texts], dtype=torch.long)


def text_ids(records, positives, negatives, num_negatives):
    """What the duplicate mask of InfoNCE compares (modules.candidates.CandidateRules): hashes of the query texts
    (without prefix: documents have none) [B], the positives used [B], the negatives [B, K], and every positive of
    each record [B, P] (padded with the query's own hash, which is masked anyway)."""
    queries = text_hashes([r["text"] for r in records])
    widest = max(len(r["text_pos"]) for r in records)
    positive_sets = torch.stack([torch.cat([text_hashes(r["text_pos"]), query.repeat(widest - len(r["text_pos"]))])
                                 for r, query in zip(records, queries)])
    return {"query": queries, "positive": text_hashes(positives),
            "negative": text_hashes(negatives).view(len(records), num_negatives), "positive_sets": positive_sets}


# A fast tokenizer reads a whole text (and allocates its offsets) before truncating: one 50 MB record cost 7.3 GB and
# 95 s in one step. So each text is first cut to this many characters per token of the max length. The cut can only
# change the ids if a text's first max_length tokens average more than 128 characters each; ordinary text averages
# 1 (CJK) to 6 (English) and vocabulary entries are mostly far shorter, so only a text made mostly of whitespace or
# of 100+-character "words" (one [UNK] each in WordPiece) could lose tokens to it.
MAX_CHARS_PER_TOKEN = 128


def cut_texts(texts, max_length):
    """``texts``, each cut to ``max_length * MAX_CHARS_PER_TOKEN`` characters: what a tokenizer truncating to
    ``max_length`` tokens needs of them (eval/cmteb_encoder.py cuts what sentence-transformers tokenizes by this
    too)."""
    budget = max_length * MAX_CHARS_PER_TOKEN
    return [text[:budget] for text in texts]


def tokenize(tokenizer, texts, max_length):
    """Padded, truncated tensors of ``texts``, each cut to ``max_length * MAX_CHARS_PER_TOKEN`` characters first."""
    return dict(tokenizer(cut_texts(texts, max_length), padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt"))

#!/usr/bin/env python
"""Exact and MinHash near-duplicate removal for (query, positive) pairs, keeping the first of each group.

    python tools/dedup_pairs.py filtered.jsonl.gz --output dedup.jsonl.gz --threshold 0.8

Records stream in order. A record whose key (the pair by default, or one side with --key) equals
that of an earlier record after normalisation (NFKC, case-folded, whitespace collapsed) is an
``exact_duplicate``. Otherwise its character n-gram shingles are MinHashed and looked up in a
MinHashLSH index of the kept records: a hit, an estimated Jaccard similarity of about --threshold
or more, makes it a ``near_duplicate``; a miss keeps it and adds it to the index. The LSH answer is
approximate near the threshold. Memory grows with the number of kept records (a 16-byte hash each,
plus the LSH bands), not with their length.
"""

import hashlib

from modules.cli import ArgumentParser, run_cli
from modules.pair_tools import (
    PairWriter, Report, add_io_arguments, char_shingles, iter_pairs, normalize_text, script_ratio,
)


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    add_io_arguments(parser)
    parser.add_argument("--key", choices=["pair", "query", "positive"], default="pair",
                        help="what must repeat for a duplicate: both sides, or one side only")
    parser.add_argument("--exact_only", action="store_true", help="exact duplicates only, no MinHash")
    parser.add_argument("--threshold", type=float, default=0.8, help="Jaccard similarity of shingle sets")
    parser.add_argument("--ngram", type=int, default=None,
                        help="shingle size in characters; default: 3 for mostly-Han text, 5 otherwise")
    parser.add_argument("--num_perm", type=int, default=128, help="MinHash permutations")
    parser.add_argument("--seed", type=int, default=1, help="MinHash seed")
    return parser.parse_args(argv)


def dedup_key(query, positive, key):
    sides = {"pair": (query, positive), "query": (query,), "positive": (positive,)}[key]
    return "\n".join(normalize_text(side) for side in sides)  # normalised text holds no newline


def main(argv=None):
    args = parse_args(argv)
    from datasketch import MinHash, MinHashLSH  # after parsing: --help answers at once

    report = Report("dedup_pairs")
    seen_hashes = set()
    lsh = None if args.exact_only else MinHashLSH(
        threshold=args.threshold, num_perm=args.num_perm,
        # Store each LSH band as an 8-byte digest instead of its raw hash values: less memory per record.
        hashfunc=lambda band: hashlib.blake2b(band, digest_size=8).digest())
    permutations = MinHash(num_perm=args.num_perm, seed=args.seed)  # generated once, reused for every record
    with PairWriter(args.output, args.inputs) as writer:
        for record, query, positive in iter_pairs(args, report):
            key = dedup_key(query, positive, args.key)
            key_hash = hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()
            if key_hash in seen_hashes:
                report.drop("exact_duplicate")
                continue
            seen_hashes.add(key_hash)
            if lsh is not None:
                ngram = args.ngram or (3 if script_ratio(key, "zh") >= 0.5 else 5)
                minhash = MinHash(num_perm=args.num_perm, seed=args.seed,
                                  permutations=permutations.permutations, scheme=permutations.scheme)
                minhash.update_batch([shingle.encode("utf-8") for shingle in char_shingles(key, ngram)])
                if lsh.query(minhash):
                    report.drop("near_duplicate")
                    continue
                lsh.insert(report.kept, minhash, check_duplication=False)
            writer.write(record)
            report.keep()
    return report.finish(args)


if __name__ == "__main__":
    run_cli(main)

#!/usr/bin/env python
"""Rule filters for (query, positive) pairs, the first stage of Conan-Embedding's data pipeline.

    python tools/filter_pairs.py pairs.jsonl.gz --output filtered.jsonl.gz --language zh

A pair is dropped for the first rule it breaks, in this order: an empty side (``empty``), sides
identical after normalisation (``identical``), a side shorter or longer than its bounds in
characters (``query_too_short``, ``query_too_long``, ``positive_too_short``,
``positive_too_long``), a side with too small a share of the language's script among its
letters (``language``), a side made mostly of one repeated character (``repetition``).
Kept records are written unchanged; counts per reason go to stdout and <output>.report.json.
"""


from modules.cli import ArgumentParser, run_cli
from modules.pair_tools import (
    PairWriter, Report, add_io_arguments, collapse_whitespace, iter_pairs, normalize_text, script_ratio,
    top_char_ratio,
)


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    add_io_arguments(parser)
    parser.add_argument("--query_min_chars", type=int, default=1, help="lengths count characters, whitespace collapsed")
    parser.add_argument("--query_max_chars", type=int, default=512)
    parser.add_argument("--positive_min_chars", type=int, default=1)
    parser.add_argument("--positive_max_chars", type=int, default=8192)
    parser.add_argument("--language", choices=["zh", "en"], default=None,
                        help="zh: Han characters, en: Latin letters; default: no language rule")
    parser.add_argument("--min_script_ratio", type=float, default=0.5,
                        help="with --language: least share of the script among the letters of each side")
    parser.add_argument("--max_top_char_ratio", type=float, default=None,
                        help="drop a side whose most frequent character is more than this share of its "
                             "non-space characters (e.g. 0.5); default: off")
    return parser.parse_args(argv)


def broken_rule(query, positive, args):
    """The reason to drop the pair, or None to keep it."""
    query, positive = collapse_whitespace(query), collapse_whitespace(positive)
    if not query or not positive:
        return "empty"
    if normalize_text(query) == normalize_text(positive):
        return "identical"
    for side, text in (("query", query), ("positive", positive)):
        if len(text) < getattr(args, f"{side}_min_chars"):
            return f"{side}_too_short"
        if len(text) > getattr(args, f"{side}_max_chars"):
            return f"{side}_too_long"
    if args.language:
        if min(script_ratio(query, args.language), script_ratio(positive, args.language)) < args.min_script_ratio:
            return "language"
    if args.max_top_char_ratio is not None:
        if max(top_char_ratio(query), top_char_ratio(positive)) > args.max_top_char_ratio:
            return "repetition"
    return None


def main(argv=None):
    args = parse_args(argv)
    report = Report("filter_pairs")
    with PairWriter(args.output, args.inputs) as writer:
        for record, query, positive in iter_pairs(args, report):
            reason = broken_rule(query, positive, args)
            if reason:
                report.drop(reason)
            else:
                writer.write(record)
                report.keep()
    return report.finish(args)


if __name__ == "__main__":
    run_cli(main)

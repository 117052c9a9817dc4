"""Random-weight models of real shapes, built from configs with tokenizers trained on the spot: nothing downloaded.

    python tools/random_model.py --arch bert --size large --output_dir runs/bert-large-random
    python tools/random_model.py --arch qwen2 --size 0.5b --output_dir runs/qwen2-0.5b-random

For speed and memory checks (bench/gpu_check.py) and tests: the parameter count and layer shapes are the named
model's (BERT-large: 24 x 1024, 335M; Qwen2-0.5B: 24 x 896, GQA 14/2 heads, 494M with its 151,936-row embedding
table), the tokenizer is a small one trained on ``corpus`` (ids below its size), so the texts cost the same compute
whatever the vocabulary. Not for quality: the weights are random.
"""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from modules.cli import ArgumentParser  # noqa: E402

DEMO_TEXTS = REPO / "data" / "demo" / "sick_retrieval.jsonl"

SHAPES = {
    "bert": {
        "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     vocab_size=30522),
        "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                      vocab_size=30522),
    },
    "qwen2": {
        "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2),
        "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2),
        "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                     num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0),
    },
}


def demo_sentences():
    """The distinct sentences of the bundled SICK retrieval set (data/demo): real English words for the corpus."""
    sentences = set()
    for record in map(json.loads, DEMO_TEXTS.open()):
        sentences.update([record["text"], *record["text_pos"]])
    return sorted(sentences)


def trained_bpe(corpus, pre_tokenizer, special_tokens, vocab_size=300):
    """(vocab, merges) of a byte-pair encoding of ``vocab_size`` tokens trained on ``corpus``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet() if isinstance(pre_tokenizer, pre_tokenizers.ByteLevel) else []
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                                              initial_alphabet=alphabet))
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]


def bert_tokenizer(corpus, folder):
    """A lower-casing WordPiece tokenizer: BERT's special tokens, every word of ``corpus`` and its letters."""
    import inspect

    from transformers import BertTokenizerFast

    words = sorted({word for text in corpus for word in text.lower().replace(".", " . ").replace(",", " , ").split()})
    letters = sorted({letter for word in words for letter in word})
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = dict.fromkeys([*special, *letters, *(f"##{letter}" for letter in letters), *words])
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:  # transformers >= 5
        return BertTokenizerFast(vocab={token: i for i, token in enumerate(tokens)}, do_lower_case=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)


def qwen2_tokenizer(corpus):
    """Qwen2's tokenizer class on a 1,000-token byte-level BPE of ``corpus``: EOS = pad = <|endoftext|>, no BOS."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer(*trained_bpe(corpus, pre_tokenizers.ByteLevel(add_prefix_space=False), ["<|endoftext|>"],
                                       vocab_size=1000))


def save_random_model(arch, size, output_dir, max_positions=None, seed=0):
    """Write a random ``arch`` model of shape ``size`` and its tokenizer to ``output_dir``; return its parameter
    count."""
    import torch
    from transformers import BertConfig, BertModel, Qwen2Config, Qwen2Model

    torch.manual_seed(seed)
    output_dir = Path(output_dir)
    corpus = demo_sentences()
    if arch == "bert":
        tokenizer = bert_tokenizer(corpus, output_dir)
        shape = {"vocab_size": len(tokenizer), **SHAPES[arch][size], "max_position_embeddings": max_positions or 512}
        model = BertModel(BertConfig(**shape))
    else:
        tokenizer = qwen2_tokenizer(corpus)
        shape = {"vocab_size": len(tokenizer), **SHAPES[arch][size], "max_position_embeddings": max_positions or 4096}
        model = Qwen2Model(Qwen2Config(**shape))
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return sum(p.numel() for p in model.parameters())


def main(argv=None):
    parser = ArgumentParser(description=__doc__)  # defaults shown in --help
    parser.add_argument("--arch", choices=sorted(SHAPES), required=True)
    parser.add_argument("--size", required=True, help="bert: tiny, base, large; qwen2: tiny, small, 0.5b")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_positions", type=int, default=None, help="position table (bert: 512, qwen2: 4096)")
    args = parser.parse_args(argv)
    if args.size not in SHAPES[args.arch]:
        parser.error(f"--size {args.size}: {args.arch} sizes are {', '.join(SHAPES[args.arch])}")
    count = save_random_model(args.arch, args.size, args.output_dir, args.max_positions)
    print(f"saved a random {args.arch} ({args.size}, {count:,} parameters) to {args.output_dir}")


if __name__ == "__main__":
    sys.exit(main())

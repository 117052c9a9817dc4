"""The shipped recipes' meta lists: every file is found, and each dataset gets the share of steps the
comments and docs/results.md state (the recipes' dev scores are measured by `make demo` / `make en-sts`)."""

import pytest

from conftest import REPO, shared_data
from modules.data import load_meta_list
from modules.samplers import build_sampler, describe_batches

BATCH = {"cosent": 32, "retri_contrast": 16}


def shares(meta_list):
    datasets = load_meta_list(REPO / "meta_lists" / meta_list)
    sampler = build_sampler(datasets, [BATCH[d.kind] for d in datasets], seed=1)
    return [line.split(", ")[-1] for line in describe_batches(datasets, sampler)], sum(sampler.batch_counts())


def test_the_demo_trains_similarity_and_retrieval_from_bundled_data():
    lines, batches = shares("demo.txt")
    assert lines == ["44.3% of the steps", "43.5% of the steps", "12.2% of the steps"]
    assert batches == 131  # make demo's 200 steps are about 1.5 epochs


@pytest.mark.parametrize("path", ["en-stsb/train.jsonl", "en-sick/train.jsonl"])
def test_en_sts_reads_the_shared_training_sets(path):
    assert shared_data(path).is_file()


def test_en_sts_keeps_one_epoch_of_sts_b_and_sick_proportions():
    lines, batches = shares("en_sts.txt")
    assert lines == ["51.7% of the steps", "39.6% of the steps", "8.7% of the steps"]
    assert batches >= 316  # make en-sts's 316 steps (one epoch of STS-B + SICK train at batch 32) fit in one epoch

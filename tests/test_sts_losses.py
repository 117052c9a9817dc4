"""The STS menu of the cosent kind (--sts_loss): each objective against a direct, loop-by-loop float64 reference
(values and gradients), under Matryoshka, in bf16, as a weighted sum; the flag's errors; a real run reaching it.
Two processes: tests/test_losses_distributed.py."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

from modules.flags import sts_loss_description, sts_loss_terms
from modules.matryoshka import Matryoshka
from modules.sts_losses import AnglE, CoSENT, PRO, Pearson, RankKL, WeightedSum, average_ranks, sts_loss
from tests.conftest import REPO, write_jsonl
from tests.test_losses import assert_same_value_and_grads, leaves, reference_cosent


# --------------------------------------------------------------------------- loop references (float64)


def cosines(a, b):
    return [F.cosine_similarity(a[i], b[i], dim=0) for i in range(a.size(0))]


def reference_pearson(a, b, labels):
    """1 - r(scores, labels), population moments, written out (CoDiEmb's PearsonCorrelationLoss)."""
    x, y, n = cosines(a, b), [float(v) for v in labels], a.size(0)
    if min(y) == max(y):
        return torch.tensor(0.0, dtype=torch.float64)
    mean_x, mean_y = sum(x) / n, sum(y) / n
    covariance = sum((x[i] - mean_x) * (y[i] - mean_y) for i in range(n)) / n
    var_x = sum((x[i] - mean_x) ** 2 for i in range(n)) / n
    var_y = sum((y[i] - mean_y) ** 2 for i in range(n)) / n
    return 1 - covariance / (torch.sqrt(var_x) * math.sqrt(var_y))


def reference_rank_kl(a, b, labels, tau):
    """CoDiEmb's RankKLDivergenceLoss: 0-based average ranks of -label (scipy), targets (n-1-rank)/(n-1),
    KL(softmax(targets / tau) || softmax(scores / tau)) summed and divided by n (kl_div's batchmean of a 1-D input)."""
    s, n = cosines(a, b), a.size(0)
    descending = rankdata([-float(v) for v in labels], method="average") - 1
    ideal = [(n - 1 - descending[i]) / (n - 1) if n > 1 else 0.0 for i in range(n)]
    target_norm = sum(math.exp(ideal[j] / tau) for j in range(n))
    target = [math.exp(ideal[i] / tau) / target_norm for i in range(n)]
    log_norm = torch.log(sum(torch.exp(s[j] / tau) for j in range(n)))
    return sum(target[i] * (math.log(target[i]) - (s[i] / tau - log_norm)) for i in range(n)) / n


def reference_pro(a, b, labels, tau):
    """PRO over the batch sorted by label (descending): for each position k, -log of the pair at k winning against
    the pairs after it with a strictly lower label, logits scaled by label differences; mean over the k that have
    one."""
    s, y, n = cosines(a, b), [float(v) for v in labels], a.size(0)
    order = sorted(range(n), key=lambda i: -y[i])
    terms = []
    for k in range(n - 1):
        top = order[k]
        below = [j for j in order[k + 1:] if y[top] - y[j] > 0]
        if not below:
            continue
        weights = [y[top] - y[j] for j in below]
        logits = [s[top] / tau * max(weights)] + [s[j] / tau * w for j, w in zip(below, weights)]
        terms.append(logits[0] - torch.log(sum(torch.exp(logit) for logit in logits)))
    return -sum(terms) / len(terms) if terms else torch.tensor(0.0, dtype=torch.float64)


def reference_angle_scores(a, b):
    """AnglE's complex-space form (Li & Li 2023's reference code): x = (p, q), y = (u, v) halves of the embeddings
    (a zero coordinate appended to an odd one); score = |sum(Re + Im)| of (p + iq) / (u + iv), rescaled by |y| / |x|."""
    scores = []
    for i in range(a.size(0)):
        x, y = a[i], b[i]
        if x.numel() % 2:
            x, y = F.pad(x, (0, 1)), F.pad(y, (0, 1))
        half = x.numel() // 2
        p, q, u, v = x[:half], x[half:], y[:half], y[half:]
        z = torch.sum(u * u + v * v)
        real, imaginary = (p * u + q * v) / z, (q * u - p * v) / z
        rescale = torch.sqrt(torch.sum(p * p + q * q)) / torch.sqrt(z)
        scores.append(torch.abs(torch.sum(real / rescale) + torch.sum(imaginary / rescale)))
    return scores


def reference_angle(a, b, labels, tau):
    scores = reference_angle_scores(a, b)
    terms = [torch.exp((scores[i] - scores[j]) / tau)
             for i in range(len(scores)) for j in range(len(scores)) if labels[i] < labels[j]]
    return torch.log(1 + sum(terms)) if terms else torch.tensor(0.0, dtype=torch.float64)


REFERENCES = {
    "cosent": reference_cosent,
    "pearson": lambda a, b, labels, tau: reference_pearson(a, b, labels),
    "rank_kl": reference_rank_kl,
    "pro": reference_pro,
    "angle": reference_angle,
}
CLASSES = {"cosent": CoSENT, "pearson": Pearson, "rank_kl": RankKL, "pro": PRO, "angle": AnglE}
NEW = ["pearson", "rank_kl", "pro", "angle"]
TIED = torch.tensor([0.0, 1.5, 3.0, 1.5, 5.0, 2.0, 0.0, 1.5], dtype=torch.float64)  # ties of two and three


def make_loss(name, tau=0.05):
    return Pearson() if name == "pearson" else CLASSES[name](tau)


# --------------------------------------------------------------------------- each objective against its loop


@pytest.mark.parametrize("tau", [0.05, 0.2])
@pytest.mark.parametrize("name", NEW)
def test_objective_matches_its_loop_reference(name, tau):
    a, b = leaves((8, 12), (8, 12), seed=7)
    ours = make_loss(name, tau)(a, b, TIED)
    assert_same_value_and_grads(ours, REFERENCES[name](a, b, TIED, tau), [a, b])


@pytest.mark.parametrize("name", NEW)
def test_objective_without_ties_and_with_an_odd_dimension(name):
    a, b = leaves((6, 7), (6, 7), seed=8)
    labels = torch.tensor([0.2, 4.0, 1.0, 3.5, 2.5, 0.7], dtype=torch.float64)
    ours = make_loss(name)(a, b, labels)
    assert_same_value_and_grads(ours, REFERENCES[name](a, b, labels, 0.05), [a, b])


@pytest.mark.parametrize("name", ["pearson", "pro", "angle"])
def test_all_labels_equal_gives_zero_loss_and_zero_gradient(name):
    """Nothing to rank or correlate: 0, with a graph (backward works) and zero gradients (AnglE: CoSENT's log 1)."""
    a, b = leaves((4, 6), (4, 6), seed=9)
    loss = make_loss(name)(a, b, torch.full((4,), 2.0, dtype=torch.float64))
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    for grad in torch.autograd.grad(loss, [a, b]):
        assert torch.count_nonzero(grad) == 0


def test_rank_kl_with_all_labels_equal_pulls_towards_equal_scores():
    """CoDiEmb's targets: tied labels share a rank, so all tied is the uniform target, KL(uniform || softmax(s/tau))
    / n."""
    a, b = leaves((4, 6), (4, 6), seed=9)
    labels = torch.full((4,), 2.0, dtype=torch.float64)
    loss = RankKL(0.05)(a, b, labels)
    scores = torch.stack(cosines(a, b))
    expected = sum(0.25 * (math.log(0.25) - torch.log_softmax(scores / 0.05, 0)[i]) for i in range(4)) / 4
    assert_same_value_and_grads(loss, expected, [a, b])
    assert loss.item() > 0


@pytest.mark.parametrize("name", NEW)
def test_one_pair_gives_zero_loss(name):
    a, b = leaves((1, 6), (1, 6), seed=10)
    loss = make_loss(name)(a, b, torch.tensor([3.0], dtype=torch.float64))
    assert loss.item() == pytest.approx(0.0, abs=1e-12) and loss.requires_grad


@pytest.mark.parametrize("name", NEW + ["cosent"])
def test_the_loss_does_not_depend_on_the_order_of_the_pairs(name):
    """PRO's sort breaks ties somehow; tied pairs never compete, so any order gives the same loss."""
    a, b = leaves((8, 6), (8, 6), seed=11)
    order = torch.tensor([7, 3, 1, 0, 6, 2, 5, 4])
    loss_fn = make_loss(name)
    assert torch.allclose(loss_fn(a, b, TIED), loss_fn(a[order], b[order], TIED[order]), atol=1e-12)


def test_average_ranks_are_scipys_average_ranks():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (40,), generator=generator).double() / 2
    expected = torch.tensor(rankdata(labels.numpy(), method="average") - 1, dtype=torch.float64)
    assert torch.equal(average_ranks(labels).double(), expected)


def test_rank_kl_targets_are_a_softmax_of_normalised_ranks():
    """Normalised average ranks: the (untied) best pair 1, the two tied worst (ranks 0 and 1) 0.5 / 7 each; tied pairs
    the same probability."""
    from modules.sts_losses import rank_targets

    targets = rank_targets(TIED, 0.05)
    assert targets.sum().item() == pytest.approx(1.0)
    assert targets[4] == targets.max() and targets[0] == targets[6] == targets.min()
    assert targets[1] == targets[3] == targets[7]
    assert (targets[4] / targets[0]).item() == pytest.approx(math.exp((1 - 0.5 / 7) / 0.05))


def test_angle_scores_are_scale_invariant_and_sentence_transformers_pairwise_angle_sim():
    from sentence_transformers.util import pairwise_angle_sim

    from modules.sts_losses import angle_similarity

    a, b = leaves((5, 9), (5, 9), seed=12)
    ours = angle_similarity(a, b)
    assert torch.allclose(ours, pairwise_angle_sim(a, b).double(), atol=1e-12)
    assert torch.allclose(ours, angle_similarity(3 * a, 0.5 * b), atol=1e-12)
    assert torch.allclose(ours, torch.stack(reference_angle_scores(a, b)), atol=1e-12)


# --------------------------------------------------------------------------- Matryoshka, precision, the menu


@pytest.mark.parametrize("name", NEW)
def test_matryoshka_averages_the_objective_at_each_dim(name):
    a, b = leaves((7, 12), (7, 12), seed=13)
    ours = Matryoshka(make_loss(name), [5, 12], [1.0, 3.0])(a, b, TIED[:7])
    reference = (REFERENCES[name](a[:, :5], b[:, :5], TIED[:7], 0.05) + 3 * REFERENCES[name](a, b, TIED[:7], 0.05)) / 4
    assert_same_value_and_grads(ours, reference, [a, b])


@pytest.mark.parametrize("name", NEW)
def test_bf16_embeddings_give_the_float32_loss_and_gradient(name):
    generator = torch.Generator().manual_seed(0)
    rows = 52
    bf16 = [torch.randn(rows, 16, generator=generator).bfloat16().requires_grad_() for _ in range(2)]
    fp32 = [t.detach().float().requires_grad_() for t in bf16]
    labels = torch.linspace(4.0, 5.0, rows, dtype=torch.float64)  # the collator's dtype; bf16 would merge them
    loss_fn = make_loss(name)
    ours, reference = loss_fn(*bf16, labels), loss_fn(*fp32, labels)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, reference, rtol=1e-6, atol=1e-6), (ours, reference)
    for g_ours, g_reference in zip(torch.autograd.grad(ours, bf16), torch.autograd.grad(reference, fp32)):
        assert torch.allclose(g_ours.float(), g_reference.bfloat16().float(), rtol=1e-2, atol=1e-6)


def test_cosent_is_todays_cosent():
    loss = sts_loss("cosent", 0.07)
    assert type(loss) is CoSENT and loss.temperature == 0.07
    assert type(sts_loss("cosent:1", 0.07)) is CoSENT


@pytest.mark.parametrize("name", NEW)
def test_a_single_name_is_that_objective_with_the_shared_temperature(name):
    loss = sts_loss(name, 0.07)
    assert type(loss) is CLASSES[name]
    assert getattr(loss, "temperature", None) == (None if name == "pearson" else 0.07)


def test_a_comma_list_is_the_weighted_sum_codiembs_mix_included():
    a, b = leaves((8, 10), (8, 10), seed=14)
    loss = sts_loss("pearson:2,pro:0.5,rank_kl:5", 0.05)
    assert isinstance(loss, WeightedSum)
    reference = (2 * reference_pearson(a, b, TIED) + 0.5 * reference_pro(a, b, TIED, 0.05)
                 + 5 * reference_rank_kl(a, b, TIED, 0.05))
    assert_same_value_and_grads(loss(a, b, TIED), reference, [a, b])
    both = sts_loss("cosent,angle", 0.05)(a, b, TIED)
    assert_same_value_and_grads(both, reference_cosent(a, b, TIED, 0.05) + reference_angle(a, b, TIED, 0.05), [a, b])


def test_task_losses_default_is_cosent_and_the_flag_picks_the_menu(tiny_data, tmp_path):
    import train_finetune
    from modules.objective import task_losses

    base = ["--model_name_or_path", "m", "--meta_list", str(tiny_data / "meta.txt"), "--output_dir", str(tmp_path)]
    losses, _ = task_losses(train_finetune.parse_args(base), {"cosent"}, 32)
    assert type(losses["cosent"]) is CoSENT and losses["cosent"].temperature == 0.05
    args = train_finetune.parse_args(base + ["--sts_loss", "rank_kl", "--cosent_temperature", "0.1",
                                             "--mrl_dims", "16,32"])
    losses, _ = task_losses(args, {"cosent"}, 32)
    assert isinstance(losses["cosent"], Matryoshka) and type(losses["cosent"].loss) is RankKL
    assert losses["cosent"].loss.temperature == 0.1


# --------------------------------------------------------------------------- the flag


@pytest.mark.parametrize("value, named", [
    ("cosine", "unknown STS loss 'cosine'"),
    ("pro,", "unknown STS loss ''"),
    ("pro:0", "pro:0: the weight must be > 0"),
    ("pro:-1", "pro:-1: the weight must be > 0"),
    ("pro:nan", "pro:nan: the weight must be > 0"),
    ("pro:x", "pro:x: the weight must be a number"),
    ("pro,pro:2", "pro is named twice"),
])
def test_a_bad_sts_loss_is_one_line_with_exit_2(value, named, tmp_path, capsys):
    import train_finetune

    with pytest.raises(SystemExit) as stopped:
        train_finetune.parse_args(["--model_name_or_path", "m", "--meta_list", "x", "--output_dir", str(tmp_path),
                                   "--sts_loss", value])
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and ": error: argument --sts_loss: " in lines[0]
    assert named in lines[0]


def test_the_command_line_refuses_a_bad_sts_loss_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "train_finetune.py", "--model_name_or_path", "m", "--meta_list", "x",
                             "--output_dir", str(tmp_path), "--sts_loss", "spearman"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "train_finetune.py: error: argument --sts_loss: unknown STS loss 'spearman': give one of cosent, pearson, "
        "rank_kl, pro, angle, or a comma list of NAME[:WEIGHT] to sum (see --help)"]


def test_a_card_names_the_sts_objective():
    assert sts_loss_description("cosent") == "CoSENT"  # the card of a default run reads as before
    assert sts_loss_description("pearson:2,pro:0.5,rank_kl:5") == (
        "2 x Pearson (1 - r, no temperature) + 0.5 x PRO (listwise) + 5 x rank KL (tie-aware rank targets)")


def test_help_names_the_menu():
    result = subprocess.run([sys.executable, "train_finetune.py", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    shown = " ".join(result.stdout.split())  # argparse wraps the help
    assert "--sts_loss STS_LOSS objective of cosent-kind batches: cosent | pearson" in shown
    assert "pearson:2,pro:0.5,rank_kl:5" in shown and "(default: 'cosent')" in shown


# --------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def sts_only(tmp_path_factory):
    """A cosent-only meta list: every step is an STS step. No pair of a text with itself: its cosine is 1, where the
    gradient vanishes, and Adam turns the float noise left on its words' embeddings into steps of +-lr, which two
    processes and one do not share."""
    from tests.conftest import SENTENCES

    root = tmp_path_factory.mktemp("sts_only")
    n = len(SENTENCES)
    write_jsonl(root / "sts.jsonl", [{"text": s, "text_pair": SENTENCES[(i * 3 + 1) % n], "label": float((i * 7) % 6)}
                                     for i, s in enumerate(SENTENCES)])
    (root / "meta.txt").write_text("sts.jsonl 1 type=cosent\n")
    return root


@pytest.mark.parametrize("spec", ["cosent", "pearson", "rank_kl", "pro", "angle", "pearson:2,pro:0.5,rank_kl:5"])
def test_sts_loss_reaches_the_loss_of_a_real_run(spec, tiny_bert, sts_only, tmp_path, monkeypatch, capsys):
    """train_finetune.py --sts_loss X: the objectives named (and no other) score every STS batch, and the logged
    cosent loss is what they returned."""
    import train_finetune

    calls = {name: [] for name in CLASSES}
    for name, cls in CLASSES.items():
        def spy(self, *args, _name=name, _forward=cls.forward):
            value = _forward(self, *args)
            calls[_name].append(value.item())
            return value
        monkeypatch.setattr(cls, "forward", spy)
    train_finetune.main(["--model_name_or_path", str(tiny_bert), "--meta_list", str(sts_only / "meta.txt"),
                         "--output_dir", str(tmp_path), "--cosent_batch_size", "8", "--pair_max_len", "16",
                         "--max_steps", "2", "--log_every", "1", "--report_to", "none", "--num_workers", "0",
                         "--lr", "1e-3", "--sts_loss", spec])
    terms = dict(sts_loss_terms(spec))
    assert {name for name, values in calls.items() if values} == set(terms)
    assert all(len(calls[name]) == 2 for name in terms)  # two steps, one STS batch each
    card_rows = [line for line in (tmp_path / "final" / "README.md").read_text().splitlines()
                 if line.startswith("| cosent |")]  # the card's loss table names the objective
    assert card_rows == [f"| cosent | {sts_loss_description(spec)} | 0.05 | 1 |"]
    logged = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert len(logged) == 2
    for step, line in enumerate(logged):  # "step 1/2 | cosent 0.1234 lr ... | elapsed ..."
        shown = float(line.split("| cosent ")[1].split()[0])
        value = sum(weight * calls[name][step] for name, weight in terms.items())
        assert shown == pytest.approx(value, rel=1e-3, abs=1e-6), (line, value)


def test_two_processes_train_the_weights_of_one_on_the_same_global_batch(tiny_bert_no_dropout, sts_only, tmp_path):
    """DDP over 2 processes (4 pairs each, scores and labels gathered) == 1 process with batches of 8, under CoDiEmb's
    mix of three objectives: the whole chain, collator to optimizer."""
    from modules.model import EmbeddingModel
    from tests.conftest import assert_same_final_weights, run_script
    from tests.test_train_finetune import CPU_ENV, two_process_cmd

    def args(out, batch):
        return ["train_finetune.py", "--model_name_or_path", str(tiny_bert_no_dropout), "--meta_list",
                str(sts_only / "meta.txt"), "--output_dir", str(out), "--cosent_batch_size", batch, "--pair_max_len",
                "16", "--max_steps", "4", "--lr", "1e-3", "--seed", "11", "--report_to", "none",
                "--sts_loss", "pearson:2,pro:0.5,rank_kl:5"]

    run_script([sys.executable, *args(tmp_path / "one", "8")])
    run_script([*two_process_cmd("ddp"), *args(tmp_path / "two", "4")], env_extra=CPU_ENV["ddp"])
    trained = assert_same_final_weights(tmp_path / "one", tmp_path / "two", exact=False)
    start = EmbeddingModel.from_pretrained(tiny_bert_no_dropout).backbone.state_dict()
    name = "encoder.layer.0.attention.self.query.weight"
    assert (trained[name] - start[name]).abs().max() > 1e-3  # it trained, well above the tolerance

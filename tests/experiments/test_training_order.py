import matplotlib

matplotlib.use("Agg")

# Notebook 18's computations: the orders (by hand and by brute force), the reference setup (its batches,
# their difficulty and the run against direct calls), and the studies' numbers against direct calls of
# hk.optim.train_adam / estimate_order and direct evaluations. The method itself:
# tests/optim/test_training_order.py; the explorer: tests/widgets/test_training_order_explorer.py.

import itertools  # noqa: E402
import math  # noqa: E402
from collections import Counter  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

import hesskit as hk  # noqa: E402
from hesskit.experiments.tasks import char_lm_task  # noqa: E402
from hesskit.experiments.training_order import (  # noqa: E402
    CURRICULA,
    compare_order,
    curriculum_order,
    curriculum_study,
    default_candidates,
    distance_study,
    kendall_distance,
    lm_loss,
    lr_study,
    moved_order,
    order_setup,
    position_study,
    reversed_order,
    shuffled_order,
    swapped_order,
    window_surprisal,
)

T, BS = 6, 4


@pytest.fixture(scope="module")
def task():
    return char_lm_task(num_chars=3000)  # 84 training windows of 32 characters


@pytest.fixture(scope="module")
def setup(task):
    return order_setup(lr=5e-3, num_batches=T, batch_size=BS, task=task)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def loaded(setup, flat_params):
    """A copy of the setup's model holding `flat_params`, loaded by hand (not through Trajectory.into)."""
    model = hk.models.CharTransformerLM(len(setup.task.vocab), max_length=32, dim=16, blocks=1, heads=2,
                                        mlp_ratio=2).double().eval()
    model.load_state_dict(setup.model.state_dict())
    torch.nn.utils.vector_to_parameters(flat_params, model.parameters())
    return model


def heldout(setup, flat_params):
    x, y = setup.task.test
    with torch.no_grad():
        return lm_loss(loaded(setup, flat_params)(x), y).item()


# --------------------------------------------------------------------------- orders
def test_orders_by_hand():
    assert reversed_order(4) == [3, 2, 1, 0]
    assert moved_order(5, 1, 3) == [0, 2, 3, 1, 4] and moved_order(5, 3, 0) == [3, 0, 1, 2, 4]
    assert moved_order(5, 2, 2) == list(range(5))
    assert swapped_order(7, 0, 3) == list(range(7))
    one = swapped_order(7, 1, 3)
    assert sorted(one) == list(range(7)) and sum(a != b for a, b in zip(one, range(7))) == 2
    shuffled = shuffled_order(10, 4)
    assert sorted(shuffled) == list(range(10)) and shuffled == shuffled_order(10, 4) != shuffled_order(10, 5)
    d = [0.3, 0.1, 0.5, 0.2, 0.4]  # easy to hard: 1, 3, 0, 4, 2
    assert curriculum_order(d, "easy-first") == [1, 3, 0, 4, 2]
    assert curriculum_order(d, "hard-first") == [2, 4, 0, 3, 1]
    assert curriculum_order(d, "hard-middle") == [1, 0, 2, 4, 3]  # up to the hardest, then down
    assert curriculum_order(d, "easy-middle") == [2, 0, 1, 3, 4]
    for kind in CURRICULA:
        assert sorted(curriculum_order(d, kind)) == list(range(5))


def test_kendall_distance_against_brute_force():
    rng = np.random.default_rng(0)
    for n in (2, 5, 9):
        for _ in range(5):
            order, ref = rng.permutation(n).tolist(), rng.permutation(n).tolist()
            pos_o, pos_r = {b: i for i, b in enumerate(order)}, {b: i for i, b in enumerate(ref)}
            discordant = sum((pos_o[a] - pos_o[b]) * (pos_r[a] - pos_r[b]) < 0 for a, b in itertools.combinations(range(n), 2))
            assert kendall_distance(order, ref) == pytest.approx(discordant / (n * (n - 1) / 2), abs=1e-15)
    assert kendall_distance(list(range(6))) == 0 and kendall_distance(reversed_order(6)) == 1
    assert kendall_distance([1, 0, 2, 3]) == pytest.approx(1 / 6)


def test_order_arguments_are_checked():
    with pytest.raises(ValueError, match="kind"):
        curriculum_order([1.0, 2.0], "medium-first")
    with pytest.raises(ValueError, match="difficulty"):
        curriculum_order([1.0, float("nan")], "easy-first")
    with pytest.raises(ValueError, match="position"):
        moved_order(4, 0, 4)
    with pytest.raises(ValueError, match="batch"):
        moved_order(4, -1, 0)
    with pytest.raises(ValueError, match="swaps"):
        swapped_order(4, -1, 0)
    with pytest.raises(ValueError, match="steps"):
        reversed_order(1)
    with pytest.raises(ValueError, match="permutation"):
        kendall_distance([0, 0, 1])


# --------------------------------------------------------------------------- the setup
def test_window_surprisal_by_hand(task):
    y = task.train[1]
    counts = Counter(y.reshape(-1).tolist())
    total = sum(counts.values())
    for i in (0, 7, len(y) - 1):
        expected = -sum(math.log(counts[c] / total) for c in y[i].tolist()) / y.shape[1]
        assert window_surprisal(task)[i].item() == pytest.approx(expected, rel=1e-12)


def test_setup_batches_difficulty_and_reference(task, setup):
    x, y = task.train
    rows = {tuple(r) for b in setup.batches for r in b[0].tolist()}
    assert len(setup.batches) == T and all(len(b[0]) == BS for b in setup.batches)
    assert len(rows) == T * BS  # drawn without replacement
    surprisal = {tuple(r): s for r, s in zip(x.tolist(), window_surprisal(task).tolist())}
    per_batch = [[surprisal[tuple(r)] for r in b[0].tolist()] for b in setup.batches]
    assert setup.difficulty.tolist() == pytest.approx([np.mean(p) for p in per_batch], rel=1e-12)
    ranked = sorted(range(T), key=lambda i: setup.difficulty[i])
    for easier, harder in zip(ranked, ranked[1:]):  # grouped by difficulty: ranges do not overlap
        assert max(per_batch[easier]) <= min(per_batch[harder])
    assert ranked != list(range(T))  # the reference takes them in a random order, not sorted
    for (bx, by) in setup.batches:  # targets are the windows shifted by one character
        assert torch.equal(bx[:, 1:], by[:, :-1])
    assert all(p.dtype == torch.float64 for p in setup.model.parameters()) and not setup.model.training
    start = task.model(0).double()
    assert torch.equal(flat(setup.model), flat(start))
    direct = hk.optim.train_adam(start.eval(), setup.batches, lm_loss, lr=5e-3, seed=0)
    assert torch.equal(direct.final, setup.reference.final) and torch.equal(direct.sketches, setup.reference.sketches)

    random = order_setup(lr=5e-3, num_batches=T, batch_size=BS, grouping="random", task=task)
    assert {tuple(r) for b in random.batches for r in b[0].tolist()} == rows  # the same draw, cut differently
    with pytest.raises(ValueError, match="grouping"):
        order_setup(num_batches=T, batch_size=BS, grouping="sorted", task=task)
    with pytest.raises(ValueError, match="num_batches"):
        order_setup(num_batches=100, batch_size=BS, task=task)


# --------------------------------------------------------------------------- one order
def test_compare_order_against_direct_calls(setup):
    before = flat(setup.model).clone()
    order = reversed_order(T)
    c = compare_order(setup, order, name="reversed")
    true = hk.optim.train_adam(setup.model, setup.batches, lm_loss, order=order, lr=5e-3)
    assert torch.equal(c.retrained.final, true.final)
    scale = (setup.reference.final - true.final).norm().item()
    assert c.reference_distance == pytest.approx(scale, rel=1e-12)
    for k in (0, 1, 2):
        est = hk.optim.estimate_order(setup.model, setup.reference, order, taylor_order=k)
        assert torch.equal(c.estimates[k].final, est.final)
        assert c.param_error[k] == pytest.approx((est.final - true.final).norm().item() / scale, rel=1e-12)
        assert c.heldout[k] == pytest.approx(heldout(setup, est.final), rel=1e-12)
        assert c.heldout_error[k] == pytest.approx(abs(c.heldout[k] - c.heldout["retrained"]), abs=1e-15)
        exact = (c.estimates[k].iterates - true.iterates).norm(dim=1)
        assert np.allclose(c.exact_step_distance[k], exact.numpy(), rtol=1e-12, atol=0)
        assert c.step_distance[k][-1] == pytest.approx(exact[-1].item(), rel=1e-12)  # the last step is exact
        ok = exact[1:-1] > 0
        ratio = c.step_distance[k][1:-1][ok.numpy()] / exact[1:-1][ok].numpy()
        assert np.all(np.abs(ratio - 1) < 0.5)  # k = 64: relative sd 0.09, so 0.5 is > 5 sd
    assert c.heldout["retrained"] == pytest.approx(heldout(setup, true.final), rel=1e-12)
    assert c.heldout["reference"] == pytest.approx(heldout(setup, setup.reference.final), rel=1e-12)
    assert c.heldout_change == pytest.approx(abs(c.heldout["reference"] - c.heldout["retrained"]), abs=1e-15)
    assert c.kendall == 1.0 and c.order == order and c.name == "reversed"
    terms = c.estimates[2].loss_terms  # L, g.delta, delta.H.delta / 2, D3L[delta]^3 / 6 per step
    assert terms.shape == (T, 4) and c.estimates[1].loss_terms.shape == (T, 3)
    assert c.term_ratio[2] == pytest.approx(terms[:, 3].abs().sum().item() / terms[:, 2].abs().sum().item(), rel=1e-12)
    assert c.term_ratio[1] < 1 and c.term_ratio[2] < 1  # inside the expansion's range at this lr
    assert set(c.term_ratio) == {1, 2} and set(c.seconds) == {"retrained", 0, 1, 2}
    # a small lr on a smooth model: the expansion converges, each order better than the one below
    assert c.param_error[2] < c.param_error[1] < 0.5 * c.param_error[0] < 0.5
    assert torch.equal(flat(setup.model), before) and not setup.model.training


def test_identity_order_has_no_error(setup):
    c = compare_order(setup, list(range(T)), (0, 2))
    assert c.reference_distance == 0 and c.param_error == {0: 0.0, 2: 0.0}
    assert torch.equal(c.retrained.final, setup.reference.final) and torch.equal(c.estimates[2].final, setup.reference.final)
    assert c.heldout_change == 0 and c.heldout_error == {0: 0.0, 2: 0.0} and math.isnan(c.term_ratio[2])
    assert np.all(c.step_distance["reference"] == 0)


def test_repeats_are_allowed_and_bad_taylor_orders_refused(setup):
    order = [0, 0, 2, 3, 4, 5]  # batch 1 replaced by a second copy of batch 0
    c = compare_order(setup, order, (1,))
    assert math.isnan(c.kendall) and c.retrained.order == order
    with pytest.raises(ValueError, match="taylor_orders"):
        compare_order(setup, order, (3,))
    with pytest.raises(ValueError, match="taylor_orders"):
        compare_order(setup, order, ())


# --------------------------------------------------------------------------- studies
def test_distance_study_rows_are_compare_order(setup):
    d = distance_study([setup], swaps=(1, 3), shuffles=1, taylor_orders=(0, 1))
    assert d.label == ["1 swaps", "3 swaps", "shuffled 0", "reversed"]
    assert set(d.param_error) == {0, 1} and set(d.term_ratio) == {1}
    c = compare_order(setup, swapped_order(T, 3, setup.seed), (0, 1))
    assert d.param_error[1][1] == pytest.approx(c.param_error[1], rel=1e-12)
    assert d.heldout_error[0][1] == pytest.approx(c.heldout_error[0], abs=1e-15)
    assert d.kendall[1] == pytest.approx(kendall_distance(swapped_order(T, 3, setup.seed)))
    assert d.kendall[3] == 1 and d.reference_distance[3] == pytest.approx(
        compare_order(setup, reversed_order(T), (0,)).reference_distance, rel=1e-12)
    assert np.all(d.lr == 5e-3) and np.all(d.seed == 0)
    with pytest.raises(ValueError, match="setups"):
        distance_study([])


def test_lr_study_builds_a_fresh_reference_per_learning_rate(task):
    study = lr_study([2e-3, 1e-2], seeds=(0,), taylor_orders=(1,), num_batches=T, batch_size=BS, task=task)
    assert study.lr.tolist() == [2e-3, 1e-2] and study.label == ["lr 0.002", "lr 0.01"]
    s = order_setup(lr=1e-2, num_batches=T, batch_size=BS, task=task)
    c = compare_order(s, shuffled_order(T, 1), (1,))
    assert study.param_error[1][1] == pytest.approx(c.param_error[1], rel=1e-12)
    assert study.reference_distance[0] < study.reference_distance[1]  # larger steps drive the runs apart


def test_curriculum_study_against_retraining(setup):
    candidates = {"reference": list(range(T)), "easy-first": curriculum_order(setup.difficulty, "easy-first"),
                  "reversed": reversed_order(T), "shuffled": shuffled_order(T, 3)}
    study = curriculum_study(setup, candidates, (0, 2))
    assert study.names == list(candidates)
    truth = np.array([heldout(setup, setup.retrain(o).final) for o in candidates.values()])
    assert np.allclose(study.retrained, truth, rtol=1e-12)
    assert study.estimated[2][0] == pytest.approx(truth[0], rel=1e-12)  # the reference order is estimated exactly
    for k in (0, 2):
        assert study.spearman[k] == pytest.approx(spearmanr(truth, study.estimated[k]).statistic)
        assert study.picked[k] == study.names[int(np.argmin(study.estimated[k]))]
        assert study.regret[k] == pytest.approx(truth[study.names.index(study.picked[k])] - truth.min(), abs=1e-15)
    assert study.best == study.names[int(np.argmin(truth))] and study.spread == pytest.approx(np.ptp(truth))
    assert study.seconds["retrained"] > 0 and set(study.comparisons) == set(candidates)
    defaults = default_candidates(setup, shuffles=2)
    assert list(defaults) == ["reference", *CURRICULA, "shuffled 1", "shuffled 2"]
    with pytest.raises(ValueError, match="candidates"):
        curriculum_study(setup, {"only": list(range(T))})


def test_position_study_against_retraining(setup):
    study = position_study(setup, batches=[2], positions=[0, 2, 5], taylor_orders=(1,))
    for j, p in enumerate([0, 2, 5]):
        true = setup.retrain(moved_order(T, 2, p))
        x, y = setup.batches[2]
        with torch.no_grad():
            own = lm_loss(loaded(setup, true.final)(x), y).item()
        assert study.memorised["retrained"][0, j] == pytest.approx(own, rel=1e-12)
        assert study.heldout["retrained"][0, j] == pytest.approx(heldout(setup, true.final), rel=1e-12)
    # at its reference position the order is the reference's: every number is the reference's
    ref_own = study.reference_memorised[0]
    assert study.memorised["retrained"][0, 1] == pytest.approx(ref_own, rel=1e-12)
    assert study.memorised[1][0, 1] == pytest.approx(ref_own, rel=1e-12)
    assert study.reference_position == [2]
    with pytest.raises(ValueError, match="batches"):
        position_study(setup, [], [0])

"""Iteration controllers on scripted similarity sequences (Algorithm 1 of iPEAR; IIRP-Net's IterStop)."""

import math

import pytest
import torch

from monai_ipear.controllers import (
    TCI,
    FixedIterations,
    IterStop,
    SinglePass,
    TCIWindow,
    controlled_refinement,
    global_ncc,
    global_ncc_iirp,
    negative_mae,
    negative_mse,
    select_samples,
    simulate_controller,
)

RISING = [0.1 * i for i in range(1, 20)]  # gains of 0.1 every update: never stable, never converged


def test_tci_never_stable_runs_k_max():
    assert simulate_controller(TCI(), RISING) == (10, 10)
    assert simulate_controller(TCI(k_max=4), RISING) == (4, 4)


def test_tci_needs_a_full_window_before_stopping():
    # perfectly flat: stable and converged from the start, but W must hold t = 3 values first
    assert simulate_controller(TCI(), [0.5] * 10) == (3, 3)
    assert simulate_controller(TCI(window=5), [0.5] * 10) == (5, 5)


def test_tci_stable_but_still_improving_continues_then_stops_on_small_gain():
    # window [0.5, 0.506, 0.512]: population std 0.0049 <= 0.005 (stable) but gain 0.006 > 0.005
    seq = [0.5, 0.506, 0.512, 0.513, 0.6]
    assert simulate_controller(TCI(), seq) == (4, 4)


def test_tci_drop_stops_and_keeps_the_update():
    seq = [0.5, 0.506, 0.512, 0.511, 0.6]
    assert simulate_controller(TCI(), seq) == (4, 4)  # TCI keeps the current field


def test_tci_default_is_algorithm_1_rechecking_both_stages():
    # the example: stability holds at k=3 (gain 0.0075 too large), fails at k=4 and k=5 while the gain
    # drops to 0.001 at k=5; Algorithm 1 re-checks stability and stops at k=6 where both hold
    seq = [0.80, 0.80, 0.8075, 0.82, 0.821, 0.8212] + [0.8212] * 6
    assert simulate_controller(TCI(), seq) == (6, 6)
    # the sequential ("latched") reading remembers the stability passed at k=3 and stops at k=5
    assert simulate_controller(TCI(latched=True), seq) == (5, 5)


def test_tci_stages_are_latched_only_when_asked():
    # stability passes at k=3 (gain still 0.006); at k=5 the gain is small but the window is no longer
    # stable (std 0.0087): latched, the stability stage is not checked again, so TCI stops at 5;
    # Algorithm 1 waits for a window that is stable and a gain <= delta_c together (k=9: 0.7, 0.7, 0.7)
    seq = [0.5, 0.506, 0.512, 0.530, 0.531, 0.6, 0.7, 0.7, 0.7, 0.7]
    assert simulate_controller(TCI(latched=True), seq) == (5, 5)
    assert simulate_controller(TCI(), seq) == (9, 9)


def test_tci_four_orderings_differ_as_table_6_when_latched():
    # convergence reached at k=3 (flat), stability only at k=4; then gains of 0.006 with a stable window
    seq = [0.1, 0.3, 0.3, 0.306, 0.312, 0.313, 0.9, 0.9]
    assert simulate_controller(TCI(order="convergence_stability", latched=True), seq) == (4, 4)
    assert simulate_controller(TCI(order="stability_convergence", latched=True), seq) == (6, 6)
    assert simulate_controller(TCI(order="convergence"), seq) == (3, 3)
    assert simulate_controller(TCI(order="stability"), seq) == (4, 4)
    # Algorithm 1 (not latched): a conjunction, both two-stage orders stop where both hold together (k=6)
    assert simulate_controller(TCI(order="convergence_stability"), seq) == (6, 6)
    assert simulate_controller(TCI(order="stability_convergence"), seq) == (6, 6)
    # stability only stops while the similarity still improves by more than delta_c
    assert simulate_controller(TCI(order="stability"), [0.5, 0.506, 0.512, 0.6]) == (3, 3)
    # the default goes on (gain 0.006 at k=3, 0.088 at k=4) until a stable window with gain <= delta_c at k=6
    assert simulate_controller(TCI(order="stability_convergence"), [0.5, 0.506, 0.512, 0.6, 0.6, 0.6]) == (6, 6)
    assert simulate_controller(TCI(latched=True), [0.5, 0.506, 0.512, 0.6, 0.6, 0.6]) == (5, 5)


def test_tci_window_uses_population_std():
    w = TCIWindow(3)
    for s in (0.5, 0.506, 0.512):
        w.push(s)
    assert w.full and math.isclose(w.std(), 0.004898979, rel_tol=1e-6)
    assert w.previous == 0.506 and w.latest == 0.512


def test_tci_rejects_bad_arguments():
    with pytest.raises(ValueError, match="order"):
        TCI(order="sideways")
    with pytest.raises(ValueError, match="window"):
        TCI(window=0)
    with pytest.raises(ValueError, match="similarity"):
        TCI(similarity="psnr")


def test_iterstop_paper_rule_discards_the_non_improving_update():
    seq = [0.52, 0.53, 0.532, 0.6]
    assert simulate_controller(IterStop(), seq, initial_similarity=0.5, coarsest=True) == (3, 2)
    assert simulate_controller(IterStop(), seq, initial_similarity=0.5, coarsest=False) == (3, 2)
    # the first update is judged against the starting field
    assert simulate_controller(IterStop(), seq, initial_similarity=0.6, coarsest=False) == (1, 0)
    # the k_max-th update is checked too
    nine_then_flat = [0.1 * i for i in range(1, 10)] + [0.9]
    assert simulate_controller(IterStop(), nine_then_flat, initial_similarity=0.0) == (10, 9)


def test_iterstop_faithful_mode_reproduces_the_published_decisions():
    seq = [0.52, 0.53, 0.532, 0.6]
    f = IterStop(faithful=True)
    # coarsest level: compared with 0, not with the starting field; a non-improving update is discarded
    assert simulate_controller(f, seq, initial_similarity=0.6, coarsest=True) == (3, 2)
    # finer levels: the non-improving update is kept
    assert simulate_controller(f, seq, initial_similarity=0.5, coarsest=False) == (3, 3)
    # finer levels: a starting field with NCC below delta stops before any update
    assert simulate_controller(f, seq, initial_similarity=0.004, coarsest=False) == (0, 0)
    # finer levels: the 10th update is never checked
    nine_then_flat = [0.1 * i for i in range(1, 10)] + [0.9]
    assert simulate_controller(f, nine_then_flat, initial_similarity=0.05, coarsest=False) == (10, 10)
    assert f.similarity is global_ncc_iirp


def test_fixed_and_single_pass():
    assert simulate_controller(SinglePass(), [0.0] * 5) == (1, 1)
    assert simulate_controller(FixedIterations(3), [None] * 5) == (3, 3)
    with pytest.raises(ValueError):
        FixedIterations(0)


def test_similarities_values_and_constant_images():
    torch.manual_seed(0)
    a = torch.rand(2, 1, 6, 7)
    b = 3 * a + 1
    assert torch.allclose(global_ncc(a, b), torch.ones(2), atol=1e-6)
    assert torch.allclose(global_ncc(a, -b), -torch.ones(2), atol=1e-6)
    n = a[0].numel()
    assert torch.allclose(global_ncc_iirp(a, b), torch.full((2,), (n - 1) / n), atol=1e-6)
    const = torch.full_like(a, 0.3)
    for fn in (global_ncc, global_ncc_iirp):
        v = fn(const, a)
        assert torch.equal(v, torch.zeros(2))
    assert torch.allclose(negative_mse(a, a + 0.5), torch.full((2,), -0.25))
    assert torch.allclose(negative_mae(a, a - 0.5), torch.full((2,), -0.5))


def test_controlled_refinement_is_per_sample():
    """Each sample stops on its own; samples that stopped are not updated again."""
    ddf = torch.zeros(3, 2, 4, 4)
    targets = torch.tensor([1.0, 3.0, 6.0])  # sample b's similarity saturates after targets[b] updates
    calls = []

    def update(u, index, k):
        calls.append(index.tolist())
        return u + 1.0

    def evaluate(u, index):
        steps = u[:, 0, 0, 0]
        return torch.minimum(steps, targets[index]) * 0.1

    out, kept, trace = controlled_refinement(TCI(), ddf, update, evaluate)
    # sample 0 flat from k=1 -> stops at 3; sample 1 flat from k=3 -> window flat at k=5; sample 2 at k=8
    assert kept.tolist() == [3, 5, 8]
    assert out[:, 0, 0, 0].tolist() == [3.0, 5.0, 8.0]
    assert calls[0] == [0, 1, 2] and calls[4] == [1, 2] and calls[7] == [2]
    assert torch.isnan(trace[0, 4:]).all() and math.isclose(trace[2, 8].item(), 0.6, rel_tol=1e-6)


def test_refinement_passes_the_whole_batch_without_copies():
    """While every sample iterates, ``update`` gets the field itself and its proposal becomes the field (no
    per-update copy of full-resolution maps); once some stopped, the others get a copy of their rows only."""
    t = torch.arange(6.0).view(3, 2)
    assert select_samples(t, torch.arange(3)) is t
    part = select_samples(t, torch.tensor([0, 2]))
    assert part.tolist() == [[0.0, 1.0], [4.0, 5.0]] and part.data_ptr() != t.data_ptr()

    ddf = torch.zeros(2, 2, 4, 4)
    targets = torch.tensor([1.0, 6.0])
    calls = []  # (active samples, whether u is the previous proposal's memory)
    last = {"ptr": ddf.data_ptr()}

    def update(u, index, k):
        calls.append((index.tolist(), u.data_ptr() == last["ptr"]))
        out = u + 1.0
        last["ptr"] = out.data_ptr()
        return out

    def evaluate(u, index):
        return torch.minimum(u[:, 0, 0, 0], targets[index]) * 0.1

    out, kept, _ = controlled_refinement(TCI(), ddf, update, evaluate)
    assert kept.tolist() == [3, 8] and out[:, 0, 0, 0].tolist() == [3.0, 8.0]
    assert calls[:3] == [([0, 1], True)] * 3  # both samples: the field itself, each update
    assert calls[3] == ([1], False)  # one sample left: its rows, copied


@pytest.mark.parametrize("controller", [TCI(), IterStop(), IterStop(faithful=True)])
def test_non_finite_similarity_discards_the_update_and_stops(controller):
    ddf = torch.zeros(2, 1, 3)
    bad_at = {0: 2, 1: 99}  # sample 0 gives NaN after its 2nd update, sample 1 never

    def update(u, index, k):
        return u + 1.0

    def evaluate(u, index):
        steps = u[:, 0, 0]
        out = 0.1 * steps
        for j, b in enumerate(index.tolist()):
            if steps[j].item() == bad_at[b]:
                out[j] = float("nan")
        return out

    out, kept, trace = controlled_refinement(controller, ddf, update, evaluate, coarsest=True)
    assert kept[0] == 1 and out[0, 0, 0] == 1.0  # the NaN update was not composed
    assert torch.isnan(trace[0, 2]) and torch.isfinite(out).all()
    assert kept[1] >= 3


def test_controller_from_spec():
    from monai_ipear.controllers import TCI, FixedIterations, SinglePass, controller_from_spec

    assert isinstance(controller_from_spec("tci"), TCI) and isinstance(controller_from_spec(" TCI "), TCI)
    assert type(controller_from_spec(1)) is SinglePass and type(controller_from_spec("1")) is SinglePass
    four = controller_from_spec("4")
    assert type(four) is FixedIterations and four.k_max == 4 and controller_from_spec(4).k_max == 4
    for bad in ("0", "-1", "2.5", 2.5, True, "fixed", ""):
        with pytest.raises(ValueError, match="'tci' or a whole number"):
            controller_from_spec(bad)

"""Property-based tests (hypothesis) for the iteration controllers and field composition."""

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is a dev extra: pip install -e '.[dev]'")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from monai_ipear.controllers import TCI, TCI_ORDERS, IterStop, controlled_refinement, simulate_controller  # noqa: E402
from monai_ipear.networks.blocks import FieldComposer  # noqa: E402

sims = st.lists(st.floats(-1, 1, allow_nan=False), min_size=12, max_size=12)


@settings(max_examples=200, deadline=None)
@given(sims, st.integers(1, 5), st.integers(1, 10), st.sampled_from(sorted(TCI_ORDERS)))
def test_tci_runs_between_window_and_k_max_and_keeps_every_update(seq, window, k_max, order):
    run, kept = simulate_controller(TCI(window=window, k_max=k_max, order=order), seq)
    assert min(window, k_max) <= run <= k_max
    assert kept == run


@settings(max_examples=200, deadline=None)
@given(sims, st.integers(1, 5), st.sampled_from(sorted(TCI_ORDERS)), st.booleans())
def test_tci_stops_no_later_on_a_flat_sequence(seq, window, order, latched):
    # s_4 = s_5 = ... : from k = 3 + window the window holds only equal values (std 0), and from k = 5 the gain
    # is 0, so every ordering, latched or not, has stopped by k = 3 + max(window, 2)
    flat = seq[:3] + [seq[3]] * 9
    run, _ = simulate_controller(TCI(window=window, order=order, latched=latched), flat)
    assert run <= 3 + max(window, 2)


def test_tci_flat_sequence_bound_is_tight_for_window_1():
    # the example Hypothesis found against the old bound: the gain of the flat part is first seen at k = 5
    assert simulate_controller(TCI(window=1), [0, 0.25, 0.5, 1] + [1] * 8) == (5, 5)


@settings(max_examples=200, deadline=None)
@given(sims, st.integers(1, 5), st.integers(1, 10), st.sampled_from(sorted(TCI_ORDERS)))
def test_tci_latched_stops_no_later_than_algorithm_1(seq, window, k_max, order):
    run_alg1, _ = simulate_controller(TCI(window=window, k_max=k_max, order=order), seq)
    run_latched, _ = simulate_controller(TCI(window=window, k_max=k_max, order=order, latched=True), seq)
    assert run_latched <= run_alg1


@settings(max_examples=200, deadline=None)
@given(sims, st.floats(-1, 1), st.floats(0, 0.1))
def test_iterstop_paper_keeps_only_improving_updates(seq, s0, delta):
    run, kept = simulate_controller(IterStop(delta=delta), seq, initial_similarity=s0)
    assert kept in (run, run - 1)
    history = [s0] + seq[:kept]
    assert all(b >= a + delta for a, b in zip(history, history[1:]))  # every kept update improved by delta


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.floats(0, 1), min_size=10, max_size=10), min_size=1, max_size=4))
def test_batch_decisions_equal_one_by_one(scripts):
    """controlled_refinement on a batch gives each sample the count it gets alone."""
    batch = len(scripts)
    table = torch.tensor(scripts)

    def run(index_map):
        ddf = torch.zeros(len(index_map), 1, 2)

        def update(u, index, k):
            return u + 1

        def evaluate(u, index):
            k = u[:, 0, 0].long() - 1
            return table[torch.tensor(index_map)[index], k]

        return controlled_refinement(TCI(), ddf, update, evaluate)[1]

    together = run(list(range(batch)))
    alone = torch.cat([run([b]) for b in range(batch)])
    assert torch.equal(together, alone)


@settings(max_examples=30, deadline=None)
@given(st.floats(-3, 3), st.floats(-3, 3), st.floats(-3, 3), st.floats(-3, 3))
def test_composing_translations_adds_them(a0, a1, b0, b1):
    fc = FieldComposer("border")
    u = torch.tensor([a0, a1]).view(1, 2, 1, 1).expand(1, 2, 16, 16).contiguous()
    d = torch.tensor([b0, b1]).view(1, 2, 1, 1).expand(1, 2, 16, 16).contiguous()
    composed = fc.compose(u, d)
    # a constant field sampled anywhere (border padding) is itself: the composition is the sum
    assert torch.allclose(composed, u + d, atol=1e-4)
    assert torch.allclose(fc.compose(u, torch.zeros_like(u)), u, atol=1e-5)

"""The pruned greedy coreset against the plain loop and a float64 brute force."""

import time

import numpy as np
import pytest
import torch
from hydra.utils import get_object
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from helpers.configs import ROOT
from patchlab.core import coreset
from patchlab.core.coreset import (
    CoresetSampler,
    GreedyCoresetSampler,
    PrunedGreedyCoresetSampler,
    random_projection,
)
from patchlab.core.grouped_greedy import GroupedGreedyCoresetSampler
from patchlab.core.pruned_greedy import bound_basis, pruned_greedy
from patchlab.core.stoppable import stoppable


def reference(points: np.ndarray, first: int, keep: int) -> list[int]:
    """Textbook greedy k-center in float64; argmax takes the lowest index among equals."""
    points = points.astype(np.float64)
    selected = [first]
    dist = ((points - points[first]) ** 2).sum(1)
    for _ in range(keep - 1):
        selected.append(int(np.argmax(dist)))
        dist = np.minimum(dist, ((points - points[selected[-1]]) ** 2).sum(1))
    return selected


def pruned(
    points: np.ndarray, first: int, keep: int, bound_dims: int, spare: int = -1
) -> list[int]:
    """The pruned selection with its bounds over `bound_dims` principal axes (all of them
    when `bound_dims` >= the points' width) and `spare` free arena rows (-1: the default)."""
    mean, basis = bound_basis(points, min(bound_dims, points.shape[1]))
    return pruned_greedy(points, first, keep, mean, basis, spare).tolist()


def coverage(points: np.ndarray, selected: list[int]) -> float:
    """The k-center objective: how far the worst-covered point is from the selection."""
    points = points.astype(np.float64)
    centers = points[selected]
    squared = (points**2).sum(1)[:, None] + (centers**2).sum(1)[None] - 2 * points @ centers.T
    return float(np.sqrt(max(squared.min(1).max(), 0.0)))


def clustered(count: int, dim: int, seed: int) -> torch.Tensor:
    """Patch-like features: a few tight clusters on a low-dimensional subspace, as a CNN's."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(8, dim, generator=generator)
    modes = torch.randn(12, 8, generator=generator) * 4
    which = torch.randint(12, (count,), generator=generator)
    latent = modes[which] + torch.randn(count, 8, generator=generator)
    return latent @ basis + 0.05 * torch.randn(count, dim, generator=generator)


@pytest.mark.parametrize(("count", "ratio"), [(3_000, 0.1), (40_000, 0.05)])
def test_pruned_selection_equals_the_plain_loop(count: int, ratio: float) -> None:
    features = clustered(count, 96, seed=count)
    plain = GreedyCoresetSampler(projection_dim=64, progress=False)
    pruned = PrunedGreedyCoresetSampler(projection_dim=64, progress=False)
    keep = int(count * ratio)
    a = plain.select(features, keep, torch.Generator().manual_seed(0)).tolist()
    b = pruned.select(features, keep, torch.Generator().manual_seed(0)).tolist()
    if a == b:
        return
    # The plain loop rounds |x|^2 - 2 x.c + |c|^2, the pruned one sums differences: they may
    # part at a near-tie only (here ~1e-5), and then cover the data equally well.
    points = random_projection(features, 64, torch.Generator().manual_seed(0)).double().numpy()
    step = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
    distances = ((points[[a[step], b[step]], None] - points[a[:step]][None]) ** 2).sum(-1).min(1)
    assert distances[0] == pytest.approx(distances[1], rel=1e-5), step
    assert coverage(points, b) == pytest.approx(coverage(points, a), rel=1e-5)


def test_a_tight_arena_compacts_and_grows_without_changing_a_pick() -> None:
    points = clustered(20_000, 64, seed=5).numpy()
    mean, basis = bound_basis(points)
    roomy = pruned_greedy(points, 3, 2_000, mean, basis, 10 * len(points))
    assert pruned_greedy(points, 3, 2_000, mean, basis, 0).tolist() == roomy.tolist()
    assert pruned_greedy(points, 3, 2_000, mean, basis).tolist() == roomy.tolist()


def test_a_stop_callback_abandons_a_compiled_selection_at_once() -> None:
    """The compiled loop cannot look at Python state; `stop` is asked while it runs aside."""
    points = clustered(100_000, 64, seed=3).numpy()
    mean, basis = bound_basis(points)
    pruned_greedy(points[:3000], 0, 10, mean, basis)  # compiled before the clock starts
    start = time.perf_counter()

    def stop() -> None:
        if time.perf_counter() - start > 0.3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stoppable(pruned_greedy, stop, points, 0, 10_000, mean, basis)
    assert time.perf_counter() - start < 1.5


def test_a_bank_size_outside_one_to_n_is_refused() -> None:
    points = clustered(50, 8, seed=2).numpy()
    mean, basis = bound_basis(points)
    for keep in (0, 51):
        with pytest.raises(ValueError, match="keep must be between 1 and the number of points"):
            pruned_greedy(points, 0, keep, mean, basis)


def test_the_default_sampler_is_the_pruned_one_and_small_inputs_take_the_plain_loop() -> None:
    default = OmegaConf.load(ROOT / "conf" / "sampler" / "greedy_coreset.yaml")
    assert get_object(default._target_) is PrunedGreedyCoresetSampler
    features = clustered(500, 16, seed=1)
    generator = torch.Generator().manual_seed(0)
    small = PrunedGreedyCoresetSampler(progress=False).select(features, 50, generator)
    again = GreedyCoresetSampler(progress=False).select(
        features, 50, torch.Generator().manual_seed(0)
    )
    assert small.tolist() == again.tolist()


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(1, 120),
    dim=st.integers(1, 6),
    levels=st.integers(1, 4),
    keep_fraction=st.floats(0.01, 1.0),
    bound_dims=st.integers(1, 6),
    spare=st.sampled_from([-1, 0, 3]),
    seed=st.integers(0, 2**16),
)
def test_exact_ties_and_duplicates_select_as_the_reference(
    count: int, dim: int, levels: int, keep_fraction: float, bound_dims: int, spare: int, seed: int
) -> None:
    """Small integer coordinates: many duplicates and equal distances, all computed exactly,
    so the tie-breaking (lowest index) alone decides, and it must match. A small `spare`
    makes the arena compact and grow in most steps."""
    rng = np.random.default_rng(seed)
    points = rng.integers(0, levels, size=(count, dim)).astype(np.float32)
    keep = max(1, int(count * keep_fraction))
    first = int(rng.integers(count))
    selected = pruned(points, first, keep, bound_dims, spare)
    assert selected == reference(points, first, keep)


@settings(max_examples=40, deadline=None)
@given(
    count=st.integers(2, 400),
    dim=st.integers(1, 64),
    keep_fraction=st.floats(0.01, 0.5),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    bound_dims=st.integers(1, 48),
    seed=st.integers(0, 2**16),
)
def test_random_features_reach_the_reference_coverage(
    count: int, dim: int, keep_fraction: float, scale: float, bound_dims: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    points = (rng.standard_normal((count, dim)) * scale).astype(np.float32)
    keep = max(1, int(count * keep_fraction))
    first = int(rng.integers(count))
    selected = pruned(points, first, keep, bound_dims)
    assert selected[0] == first and len(selected) == keep
    expected = coverage(points, reference(points, first, keep))
    assert coverage(points, selected) == pytest.approx(expected, rel=1e-5, abs=1e-6 * scale)


def test_grouped_selection_is_greedy_when_every_group_is_updated() -> None:
    """With each centre lowering every group the grouped rounds are exact greedy: the same
    picks as the plain loop (up to a rounding near-tie) and the same coverage."""
    features = clustered(4_000, 32, seed=5)
    keep = 400
    plain = GreedyCoresetSampler(projection_dim=16, progress=False)
    grouped = GroupedGreedyCoresetSampler(projection_dim=16, groups=8, neighbours=8, progress=False)
    a = plain.select(features, keep, torch.Generator().manual_seed(0)).tolist()
    b = grouped.select(features, keep, torch.Generator().manual_seed(0)).tolist()
    assert a[:50] == b[:50]
    points = random_projection(features, 16, torch.Generator().manual_seed(0)).double().numpy()
    assert coverage(points, b) == pytest.approx(coverage(points, a), rel=1e-4)


def test_grouped_selection_covers_nearly_as_well_as_exact_greedy() -> None:
    features = clustered(12_000, 64, seed=6)
    keep = 600
    exact = GreedyCoresetSampler(projection_dim=32, progress=False)
    grouped = GroupedGreedyCoresetSampler(projection_dim=32, groups=32, progress=False)
    a = exact.select(features, keep, torch.Generator().manual_seed(0)).tolist()
    b = grouped.select(features, keep, torch.Generator().manual_seed(0)).tolist()
    assert len(set(b)) == keep
    points = features.double().numpy()
    assert coverage(points, b) <= 1.05 * coverage(points, a)
    anything = torch.randperm(len(features), generator=torch.Generator().manual_seed(0))
    assert coverage(points, anything[:keep].tolist()) > 1.2 * coverage(points, b)


def test_the_default_sampler_approximates_only_above_its_size() -> None:
    default = OmegaConf.load(ROOT / "conf" / "sampler" / "greedy_coreset.yaml")
    assert default.approximate_above == 300_000
    features = clustered(5_000, 16, seed=7)

    def chosen(sampler: CoresetSampler) -> list[int]:
        return sampler.select(features, 200, torch.Generator().manual_seed(0)).tolist()

    grouped = chosen(GroupedGreedyCoresetSampler(progress=False))
    exact = chosen(PrunedGreedyCoresetSampler(progress=False))
    assert chosen(PrunedGreedyCoresetSampler(progress=False, approximate_above=4_999)) == grouped
    assert chosen(PrunedGreedyCoresetSampler(progress=False, approximate_above=5_000)) == exact
    assert grouped != exact


def test_grouped_selection_can_be_stopped_between_rounds() -> None:
    calls = []

    def stop() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    sampler = GroupedGreedyCoresetSampler(groups=16, candidates=8, progress=False)
    threads = torch.get_num_threads()
    with pytest.raises(KeyboardInterrupt):
        sampler.select(clustered(5_000, 16, seed=8), 500, torch.Generator().manual_seed(0), stop)
    assert len(calls) == 2
    assert torch.get_num_threads() == threads


def test_prepare_compiles_in_another_process_and_the_selection_waits_for_it(monkeypatch) -> None:
    monkeypatch.setattr(PrunedGreedyCoresetSampler, "compiling", None)
    monkeypatch.setattr(coreset, "_compiled_before", lambda: False)  # as after an install
    sampler = PrunedGreedyCoresetSampler(progress=False)
    sampler.prepare()
    features = clustered(3_000, 16, seed=9)
    chosen = sampler.select(features, 30, torch.Generator().manual_seed(0))
    assert sampler.compiling is not None and sampler.compiling.returncode == 0
    again = PrunedGreedyCoresetSampler(progress=False).select(
        features, 30, torch.Generator().manual_seed(0)
    )
    assert chosen.tolist() == again.tolist()


def test_prepare_starts_nothing_once_numbas_cache_holds_the_loop(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(PrunedGreedyCoresetSampler, "compiling", None)
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    assert not coreset._compiled_before()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "loop.select-67.py311.1.nbc").touch()
    PrunedGreedyCoresetSampler.prepare()
    assert PrunedGreedyCoresetSampler.compiling is None

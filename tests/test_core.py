"""The PatchCore maths against brute force, and the core's independence from frameworks."""

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from patchlab.core.coreset import GreedyCoresetSampler, random_projection
from patchlab.core.detector import PatchCore
from patchlab.core.patches import aggregate_patches, flatten_patches
from patchlab.core.scoring import NearestNeighbourScorer, anomaly_maps
from patchlab.core.search import ExactIndex, IVFIndex, nearest_neighbours

CORE = Path(__file__).resolve().parents[1] / "src" / "patchlab" / "core"


@pytest.mark.parametrize("path", sorted(CORE.rglob("*.py")), ids=lambda p: str(p.relative_to(CORE)))
def test_core_imports_no_framework(path: Path) -> None:
    tree = ast.parse(path.read_text())
    names = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    names |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    roots = {name.split(".")[0] for name in names}
    assert not roots & {"lightning", "pytorch_lightning", "hydra", "mlflow", "optuna", "omegaconf"}
    assert len(path.read_text().splitlines()) < 200


def brute_force_greedy(features: torch.Tensor, keep: int, first: int) -> list[int]:
    """Textbook k-center greedy: recompute every distance to the selected set each step."""
    selected = [first]
    for _ in range(keep - 1):
        dist = torch.cdist(features, features[selected]).min(1).values
        selected.append(int(dist.argmax()))
    return selected


def test_coreset_matches_brute_force_greedy() -> None:
    features = torch.randn(400, 32, generator=torch.Generator().manual_seed(1))
    sampler = GreedyCoresetSampler(projection_dim=16, progress=False)
    selected = sampler.select(features, 40, torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)
    projected = random_projection(features, 16, generator)
    first = int(torch.randint(400, (1,), generator=generator))
    assert selected.tolist() == brute_force_greedy(projected, 40, first)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_precision_selects_nearly_the_same_coreset(dtype: str) -> None:
    features = torch.randn(3000, 64, generator=torch.Generator().manual_seed(2)) * 3
    exact = GreedyCoresetSampler(32, progress=False)
    approx = GreedyCoresetSampler(32, coreset_dtype=dtype, progress=False)
    a = exact.select(features, 150, torch.Generator().manual_seed(0))
    b = approx.select(features, 150, torch.Generator().manual_seed(0))
    overlap = len(set(a.tolist()) & set(b.tolist())) / len(a)

    def radius(index: torch.Tensor) -> float:
        """The k-center objective: the farthest any patch is from its nearest coreset member."""
        return float(torch.cdist(features, features[index]).min(1).values.max())

    # Greedy paths part ways after a near-tie, so judge the coverage, not only the overlap.
    assert overlap > 0.7
    assert radius(b) <= 1.05 * radius(a)


def test_coreset_is_seeded_and_bounded() -> None:
    features = torch.randn(500, 8)
    sampler = GreedyCoresetSampler(progress=False)
    first = sampler.select(features, 10, torch.Generator().manual_seed(3))
    again = sampler.select(features, 10, torch.Generator().manual_seed(3))
    assert first.tolist() == again.tolist() and len(first) == 10 and len(set(first.tolist())) == 10
    assert sampler.select(features, 500, torch.Generator()).tolist() == list(range(500))


def test_the_detector_keeps_its_coreset_ratio_of_the_patches() -> None:
    detector = PatchCore(None, coreset_ratio=0.02)
    assert [detector.bank_size(n) for n in (500, 10, 49)] == [10, 1, 1]


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5])
def test_coreset_ratio_outside_unit_interval_is_rejected(ratio: float) -> None:
    with pytest.raises(ValueError, match="coreset_ratio must be > 0 and <= 1"):
        PatchCore(None, coreset_ratio=ratio)


def test_nearest_neighbours_match_cdist_in_chunks() -> None:
    queries, bank = torch.randn(1000, 24), torch.randn(300, 24)
    dist, index = nearest_neighbours(queries, bank, k=5, chunk_size=128)
    expected = torch.cdist(queries, bank).topk(5, dim=1, largest=False)
    torch.testing.assert_close(dist, expected.values, atol=1e-4, rtol=1e-4)
    assert (index == expected.indices).float().mean() > 0.99


def brute_force_image_score(patches: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Paper eq. 6-7 written out with full distance matrices."""
    dist = torch.cdist(patches, bank)
    patch_scores, nearest = dist.min(1)
    top = int(patch_scores.argmax())
    anchor = bank[nearest[top]]
    support = torch.cdist(anchor[None], bank)[0].topk(k, largest=False).indices
    to_support = torch.cdist(patches[top][None], bank[support])[0]
    weight = 1 - torch.exp(to_support[0]) / torch.exp(to_support).sum()
    return weight * patch_scores[top]


def test_scorer_matches_brute_force_knn_and_reweighting() -> None:
    generator = torch.Generator().manual_seed(4)
    bank = torch.randn(200, 16, generator=generator)
    embeddings = torch.randn(3, 49, 16, generator=generator) * 0.3
    scorer = NearestNeighbourScorer(num_neighbors=9)
    scorer.fit(bank)
    patch_scores, image_scores = scorer.score(embeddings)
    for i in range(3):
        expected = torch.cdist(embeddings[i], bank).min(1).values
        torch.testing.assert_close(patch_scores[i], expected, atol=1e-4, rtol=1e-4)
        expected_image = brute_force_image_score(embeddings[i], bank, 9)
        torch.testing.assert_close(image_scores[i], expected_image, atol=1e-4, rtol=1e-4)


def test_scorer_without_reweighting_takes_the_top_patch() -> None:
    scorer = NearestNeighbourScorer(num_neighbors=1)
    scorer.fit(torch.zeros(4, 2))
    patch_scores, image_scores = scorer.score(torch.tensor([[[3.0, 4.0], [0.0, 1.0]]]))
    assert patch_scores.tolist() == [[5.0, 1.0]] and image_scores.tolist() == [5.0]


def test_a_bank_off_the_cpu_is_scored_and_mapped_on_its_own_device() -> None:
    """A model fitted on a GPU scores there. The meta device stands in for the GPU: any CPU
    tensor mixed into the search, the reweighting or the map operators would raise."""
    scorer = NearestNeighbourScorer(num_neighbors=3)
    scorer.fit(torch.empty(64, 8, device="meta"))
    patch_scores, image_scores = scorer.score(torch.empty(2, 16, 8, device="meta"))
    maps = anomaly_maps(patch_scores.reshape(2, 4, 4), (32, 24))
    assert [t.device.type for t in (patch_scores, image_scores, maps)] == ["meta"] * 3
    assert (patch_scores.shape, image_scores.shape, maps.shape) == ((2, 16), (2,), (2, 32, 24))


def test_exact_index_answers_on_the_queries_device_with_faiss_results() -> None:
    generator = torch.Generator().manual_seed(0)
    bank, queries = (
        torch.randn(300, 12, generator=generator),
        torch.randn(50, 12, generator=generator),
    )
    index = ExactIndex()
    index.fit(bank)
    dist, nearest = index.search(queries, 4)
    ref_dist, ref_nearest = nearest_neighbours(queries, bank, 4)
    assert torch.equal(nearest, ref_nearest)
    torch.testing.assert_close(dist, ref_dist, rtol=1e-5, atol=1e-5)
    assert dist.device == queries.device and nearest.dtype == torch.int64


def test_ivf_visiting_every_cell_is_exact() -> None:
    generator = torch.Generator().manual_seed(5)
    bank = torch.randn(256, 16, generator=generator)
    embeddings = torch.randn(2, 64, 16, generator=generator)
    exact, approximate = NearestNeighbourScorer(9), NearestNeighbourScorer(9, IVFIndex(4, 4))
    exact.fit(bank)
    approximate.fit(bank)
    for got, expected in zip(approximate.score(embeddings), exact.score(embeddings), strict=True):
        torch.testing.assert_close(got, expected)


def test_ivf_only_overestimates_and_mostly_finds_the_neighbour() -> None:
    # Patches drawn near bank entries, as test patches of good parts are.
    generator = torch.Generator().manual_seed(6)
    bank = torch.randn(4096, 32, generator=generator)
    picks = torch.randint(0, 4096, (2000,), generator=generator)
    embeddings = (bank[picks] + 0.3 * torch.randn(2000, 32, generator=generator)).view(4, 500, 32)
    exact, approximate = NearestNeighbourScorer(1), NearestNeighbourScorer(1, IVFIndex(None, 8))
    exact.fit(bank)
    approximate.fit(bank)
    expected, _ = exact.score(embeddings)
    got, _ = approximate.score(embeddings)
    assert approximate.index.faiss_index.nlist == 4096 // 39
    assert approximate.index.faiss_index.nprobe == 8
    assert (got >= expected - 1e-4).all()
    assert (got - expected).abs().lt(1e-4).float().mean() > 0.99


def test_num_neighbors_larger_than_bank_is_rejected() -> None:
    with pytest.raises(ValueError, match="num_neighbors=9 is larger than the memory bank"):
        NearestNeighbourScorer(9).fit(torch.randn(5, 3))


def test_patch_aggregation_resizes_to_the_finest_grid() -> None:
    features = [torch.randn(2, 8, 16, 16), torch.randn(2, 12, 8, 8)]
    embedding = aggregate_patches(features)
    assert embedding.shape == (2, 20, 16, 16)
    assert aggregate_patches(features, embedding_dim=10).shape == (2, 10, 16, 16)
    assert flatten_patches(embedding).shape == (2, 256, 20)
    torch.testing.assert_close(flatten_patches(embedding)[1, 17], embedding[1, :, 1, 1])


def test_anomaly_maps_equal_upsampling_then_2d_blur() -> None:
    """The separable-operator form against the direct pipeline it replaces."""
    grid = torch.rand(3, 7, 9, generator=torch.Generator().manual_seed(7)) * 40
    sigma, radius = 2.0, 8
    upsampled = F.interpolate(grid[:, None], size=(40, 50), mode="bilinear", align_corners=False)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel[:, None] * kernel[None, :]) / kernel.sum() ** 2
    padded = F.pad(upsampled, (radius,) * 4, mode="reflect")
    expected = F.conv2d(padded, kernel[None, None])[:, 0]
    torch.testing.assert_close(anomaly_maps(grid, (40, 50), sigma), expected)
    torch.testing.assert_close(anomaly_maps(grid, (40, 50), 0.0), upsampled[:, 0])


def test_anomaly_map_is_upsampled_and_blurred() -> None:
    grid = torch.zeros(1, 8, 8)
    grid[0, 4, 4] = 1.0
    maps = anomaly_maps(grid, (64, 64), sigma=4.0)
    assert maps.shape == (1, 64, 64)
    peak = divmod(int(maps[0].argmax()), 64)
    assert abs(peak[0] - 36) <= 4 and abs(peak[1] - 36) <= 4
    flat = anomaly_maps(torch.full((2, 4, 4), 3.0), (32, 32))
    torch.testing.assert_close(flat, torch.full((2, 32, 32), 3.0))

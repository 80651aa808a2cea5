"""Coreset selection on real training patches: time and coverage radius of every sampler.

    python benchmarks/bench_coreset.py                       # bottle 448 px, magnetic tile
    python benchmarks/bench_coreset.py --data bottle_448     # one data set
    python benchmarks/bench_coreset.py --synthetic           # + jittered copies (stand-in row)

The patches are collected as a run collects them (Lite2 `blocks.2/4`, the data set's own
geometry), then each sampler selects 10% of them. The coverage radius is the k-center
objective: the largest distance from any training patch to its nearest bank entry, in the
stored features (not the projection), computed exactly with faiss; it takes minutes on 600k
patches, `--radius-sample` bounds it by a random subset. Prints numbers; asserts nothing.
"""

import argparse
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from tqdm.auto import tqdm

from patchlab.core.coreset import PrunedGreedyCoresetSampler
from patchlab.core.grouped_greedy import GroupedGreedyCoresetSampler
from patchlab.core.patches import PatchCollector
from patchlab.core.pruned_greedy import warm_up
from patchlab.jobs.build import build

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SETS = {
    "bottle_448": [
        "category=bottle",
        f"data.root={DATA / 'mvtec_ad'}",
        "data.geometry.resize=448",
        "data.geometry.crop_size=448",
    ],
    "magnetic_tile": ["category.name=magnetic_tile", f"data.root={DATA / 'surfaces'}"],
}
SAMPLERS = {
    "exact (pruned)": PrunedGreedyCoresetSampler(progress=False),
    "grouped": GroupedGreedyCoresetSampler(progress=False),
}


def training_patches(overrides: list[str]) -> torch.Tensor:
    """All (N, D) training patches of the first member, as `fit` receives them."""
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(
            "config", overrides=["backbone=efficientnet_lite2", "tracking=none", *overrides]
        )
    datamodule, module, _, _ = build(cfg)
    detector, collector = module.detector, None
    with torch.inference_mode():
        for batch in tqdm(datamodule.train_dataloader(), desc="features", unit="batch"):
            images = batch["image"]
            if collector is None:
                units = len(detector.units(tuple(images.shape[-2:])))
                collector = PatchCollector(len(datamodule.train_samples) * units)
            for embeddings, valid in detector.training_patches(images, batch.get("valid")):
                collector.add(embeddings, valid)
    return collector.features()[0].float()


def coverage_radius(features: torch.Tensor, bank: np.ndarray, sample: int | None) -> float:
    """max over patches of the distance to the nearest bank row (over `sample` random ones)."""
    queries = features.numpy()
    if sample is not None and sample < len(queries):
        rows = np.random.default_rng(0).choice(len(queries), sample, replace=False)
        queries = queries[rows]
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(np.ascontiguousarray(bank))
    squared, _ = index.search(np.ascontiguousarray(queries), 1)
    return float(np.sqrt(max(float(squared.max()), 0.0)))


def jittered(features: torch.Tensor, copies: int) -> torch.Tensor:
    """The synthetic stand-in: copies of the patches moved by 0.05 x their std."""
    generator = torch.Generator().manual_seed(0)
    noise = 0.05 * features.std()
    return torch.cat(
        [features]
        + [
            features + torch.randn(features.shape, generator=generator) * noise
            for _ in range(copies)
        ]
    )


def measure(name: str, features: torch.Tensor, ratio: float, sample: int | None) -> None:
    keep = int(len(features) * ratio)
    print(f"\n{name}: {len(features):,} patches x {features.shape[1]}, keep {keep:,}")
    radii = {}
    for label, sampler in SAMPLERS.items():
        started = time.perf_counter()
        chosen = sampler.select(features, keep, torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - started
        radii[label] = coverage_radius(features, features[chosen].numpy(), sample)
        ratio_to_exact = radii[label] / next(iter(radii.values()))
        print(
            f"  {label:16s} {seconds:7.1f} s   coverage radius {radii[label]:8.4f}"
            f"  ({ratio_to_exact:.3f} x exact)",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=list(SETS), action="append")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--radius-sample", type=int, default=None)
    parser.add_argument("--synthetic", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    warm_up()  # numba's one-off compile (or cache load) outside the timings
    for name in args.data or list(SETS):
        if not DATA.exists():
            raise SystemExit(f"no real data at {DATA} (see ../shared/data/README.md)")
        features = training_patches(SETS[name])
        measure(name, features, args.ratio, args.radius_sample)
        if args.synthetic and name == "bottle_448":
            seed = training_patches(SETS[name][:2])
            measure(
                "synthetic: bottle 256/224 + 3 jittered copies",
                jittered(seed, 3),
                args.ratio,
                args.radius_sample,
            )


if __name__ == "__main__":
    main()

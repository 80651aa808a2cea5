"""Where the time and memory of a PatchCore run go, stage by stage, on this machine.

    python benchmarks/bench_bottle.py                      # bottle, efficientnet_lite2, seed recipe
    python benchmarks/bench_bottle.py --scaling            # coreset (50k-2M) and scoring vs N
    python benchmarks/bench_bottle.py search=ivf            # any Hydra override

Prints numbers; it asserts nothing. The end-to-end figures come from the same `pipeline.run`
that train.py uses; the per-stage split re-runs each stage on its own.
"""

import argparse
import math
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from patchlab.core.coreset import GreedyCoresetSampler, PrunedGreedyCoresetSampler
from patchlab.core.metrics import evaluate
from patchlab.core.patches import aggregate_patches, flatten_patches
from patchlab.core.scoring import NearestNeighbourScorer, anomaly_maps
from patchlab.core.search import IVFIndex
from patchlab.jobs.build import build
from patchlab.jobs.pipeline import peak_rss_mb, run

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = [
    "category=bottle",
    "backbone=efficientnet_lite2",
    "tracking=none",
    f"data.root={ROOT.parent / 'shared' / 'data' / 'mvtec_ad'}",
    "+trainer.enable_progress_bar=false",
]


class Stopwatch:
    """Accumulates wall time per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def time(self, stage: str, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        self.seconds[stage] += time.perf_counter() - start
        return result


def machine() -> str:
    cpu = next(
        (
            line.split(":")[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def stages(overrides: list[str]) -> None:
    """Each stage timed on its own, in the order a run does them."""
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("config", overrides=DEFAULTS + overrides)
    datamodule, module, _, _ = build(cfg)
    detector, member = module.detector, module.detector.embedder.members[0]
    watch = Stopwatch()
    embeddings = {}
    for split, loader in (
        ("train", datamodule.train_dataloader()),
        ("test", datamodule.test_dataloader()),
    ):
        batches, iterator = [], iter(loader)
        while (
            batch := watch.time(f"{split}: decode+preprocess (wait)", next, iterator, None)
        ) is not None:
            with torch.inference_mode():
                images = batch["image"].contiguous(memory_format=torch.channels_last)
                features = watch.time(f"{split}: backbone forward", member.backbone, images)
                embedding = watch.time(
                    f"{split}: patch aggregation",
                    aggregate_patches,
                    features,
                    member.patch_size,
                    member.embedding_dim,
                )
            batches.append((embedding, batch))
        embeddings[split] = batches
    train = torch.cat([flatten_patches(e).reshape(-1, e.shape[1]) for e, _ in embeddings["train"]])
    keep = detector.bank_size(len(train))
    generator = torch.Generator().manual_seed(0)
    index = watch.time("train: coreset selection", detector.sampler.select, train, keep, generator)
    bank = train[index]
    del train
    scorer = NearestNeighbourScorer(cfg.model.num_neighbors, instantiate(cfg.search))
    watch.time("train: bank indexing", scorer.fit, bank)
    scores, maps, labels, masks = [], [], [], []
    for embedding, batch in embeddings["test"]:
        patch_scores, image_scores = watch.time(
            "test: scoring", scorer.score, flatten_patches(embedding)
        )
        grid = patch_scores.reshape(len(embedding), *embedding.shape[-2:])
        maps.append(
            watch.time(
                "test: map upsampling+blur",
                anomaly_maps,
                grid,
                (cfg.data.crop_size,) * 2,
                cfg.model.blur_sigma,
            )
        )
        scores.append(image_scores)
        labels.append(batch["label"])
        masks.append(batch["mask"])
    watch.time(
        "test: metrics",
        evaluate,
        torch.cat(scores),
        torch.cat(labels),
        torch.cat(maps),
        torch.cat(masks),
    )
    forward = watch.seconds["test: backbone forward"]
    test = {k.removeprefix("test: "): v for k, v in watch.seconds.items() if k.startswith("test:")}
    inference = sum(test[k] for k in ("patch aggregation", "scoring", "map upsampling+blur"))
    print("\nper stage (s):")
    for stage, seconds in watch.seconds.items():
        print(f"  {stage:38s} {seconds:8.2f}")
    evaluation = inference + test["metrics"]
    everything = sum(test.values()) - forward
    print("test time beside the forward, as a share of the forward:")
    print(f"  aggregation + scoring + maps (inference) {inference / forward:6.0%}")
    print(f"  + metrics (evaluation)                   {evaluation / forward:6.0%}")
    print(f"  + waiting on decode (everything)         {everything / forward:6.0%}")
    print(f"  bank: {tuple(bank.shape)}")


def end_to_end(overrides: list[str], output: Path) -> None:
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("config", overrides=DEFAULTS + overrides)
    metrics, _, datamodule = run(cfg, output)
    images = len(datamodule.test_samples)
    print("\nend to end (pipeline.run, as train.py):")
    for key in ("image_auroc", "pixel_auroc", "pixel_f1_max", "aupro", "bank_size"):
        print(f"  {key:14s} {metrics[key]:.4f}")
    print(
        f"  fit {metrics['fit_seconds']:.1f} s, test {metrics['test_seconds']:.1f} s, "
        f"total {metrics['fit_seconds'] + metrics['test_seconds']:.1f} s, "
        f"{images / metrics['test_seconds']:.1f} test images/s, peak RSS {peak_rss_mb():.0f} MB"
    )


def growth(sizes: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) on log(size)."""
    xs, ys = [math.log(s) for s in sizes], [math.log(t) for t in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def bottle_features(overrides: list[str]) -> torch.Tensor:
    """Bottle's training patches as the pipeline embeds them: (164k, D) at the seed recipe."""
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("config", overrides=DEFAULTS + overrides)
    datamodule, module, _, _ = build(cfg)
    embed = module.detector.embed
    parts = [flatten_patches(embed(b["image"])[0]) for b in datamodule.train_dataloader()]
    return torch.cat([part.reshape(-1, part.shape[-1]) for part in parts])


def tiled(features: torch.Tensor, size: int, jitter: float = 0.05) -> torch.Tensor:
    """`size` real-feature-like rows: copies of bottle's patches, each copy but the first
    moved by Gaussian noise of `jitter` x the features' std (a larger set of similar parts)."""
    generator = torch.Generator().manual_seed(1)
    copies = [features]
    while sum(len(c) for c in copies) < size:
        noise = torch.randn(features.shape, generator=generator) * (jitter * features.std())
        copies.append(features + noise)
    return torch.cat(copies)[:size]


def coreset_scaling(features: torch.Tensor, ratio: float, plain_up_to: int) -> None:
    """Total selection seconds of the pruned and the plain greedy coreset against N."""
    sizes = [50_000, 100_000, 200_000, 400_000, 650_000, 800_000, 1_600_000, 2_000_000]
    print(f"\ncoreset selection at {ratio:.0%} on jittered copies of bottle's patches:")
    pruned, plain = [], []
    pruned_sampler = PrunedGreedyCoresetSampler(progress=False)
    pruned_sampler.select(features[:5000], 500, torch.Generator())  # compiled before timing
    for size in sizes:
        data, keep = tiled(features, size), int(size * ratio)
        generator = torch.Generator().manual_seed(0)
        pruned.append(timed(pruned_sampler.select, data, keep, generator))
        line = f"  N={size:9,d} keep {keep:7,d}: pruned {pruned[-1]:7.1f} s"
        if size <= plain_up_to:
            sampler = GreedyCoresetSampler(progress=False)
            plain.append(timed(sampler.select, data, keep, torch.Generator().manual_seed(0)))
            line += f", plain loop {plain[-1]:7.1f} s"
        print(line, flush=True)
        del data
    print(f"  growth exponent of total time in N: pruned {growth(sizes, pruned):.2f}", end="")
    print(f", plain loop {growth(sizes[: len(plain)], plain):.2f} (2.0 = quadratic)")


def scoring_scaling(dim: int, queries: int) -> None:
    """Scoring seconds against bank size N, exact and search=ivf."""
    sizes = [50_000, 100_000, 200_000, 400_000, 800_000]
    exact, ivf = [], []
    print(f"\nscoring {queries} patches on synthetic banks, D={dim}: exact and ivf")
    patches = torch.randn(1, queries, dim)
    for size in sizes:
        features = torch.randn(size, dim, generator=torch.Generator().manual_seed(0))
        scorer = NearestNeighbourScorer(9)
        scorer.fit(features)
        exact.append(timed(scorer.score, patches))
        scorer = NearestNeighbourScorer(9, IVFIndex())
        build_seconds = timed(scorer.fit, features)
        ivf.append(timed(scorer.score, patches))
        print(
            f"  N={size:7d}  exact {exact[-1]:6.2f} s, ivf {ivf[-1]:6.2f} s"
            f" ({scorer.index.faiss_index.nlist} cells, built in {build_seconds:5.1f} s)"
        )
    print(f"  growth exponent: exact {growth(sizes, exact):.2f}, ivf {growth(sizes, ivf):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scaling", action="store_true", help="coreset and scoring vs N")
    parser.add_argument(
        "--plain-up-to", type=int, default=200_000, help="largest N also run with the plain loop"
    )
    parser.add_argument("--output", type=Path, default=Path("/tmp/patchlab-bench"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    if args.scaling:
        coreset_scaling(bottle_features(args.overrides), 0.1, args.plain_up_to)
        scoring_scaling(dim=168, queries=8192)
        return
    end_to_end(args.overrides, args.output)
    stages(args.overrides)


if __name__ == "__main__":
    main()

"""Inference speed and memory of a trained model, per engine and batch size, on this machine.

    python benchmarks/bench_predict.py RUN_DIR            # bottle's test images, all engines
    python benchmarks/bench_predict.py RUN_DIR --streaming  # peak RSS: 100 vs 1000 images

RUN_DIR is a finished run's folder (e.g. outputs/<date>/<time>). Each measurement runs in its
own process so its peak RSS is its own. Latency is per image, from decoded images to maps and
masks at the input's resolution (decoding and PNG writing excluded); the streaming check runs
the whole predict CLI path on generated copies (hard links) of the test images. Prints
numbers; asserts nothing.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from patchlab.artifacts.bank import BANK_FILE
from patchlab.data.mvtec import read_image
from patchlab.deploy.export import export
from patchlab.deploy.loading import load_predictor
from patchlab.deploy.predict import expand_inputs, predict_folder

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT.parent / "shared" / "data" / "mvtec_ad" / "bottle" / "test"
ENGINES = ("torch", "onnx", "openvino")
BATCHES = (1, 16)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(bank: Path, engine: str, batch: int, images_dir: Path) -> dict:
    """One engine at one batch size, in this process."""
    predictor = load_predictor(bank, engine)
    images = [read_image(path) for path in expand_inputs([str(images_dir)])]
    predictor.predict(images[:batch])  # warm-up: first-call allocations and graph compilation
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        predictor.predict(images[i : i + batch])
    seconds = time.perf_counter() - start
    return {
        "ms_per_image": 1000 * seconds / len(images),
        "images_per_s": len(images) / seconds,
        "peak_rss_mb": peak_rss_mb(),
    }


def stream(bank: Path, count: int, images_dir: Path) -> dict:
    """The predict CLI's path over `count` hard-linked copies of the test images."""
    sources = expand_inputs([str(images_dir)])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "inputs"
        folder.mkdir()
        for i in range(count):
            source = sources[i % len(sources)]
            os.link(source, folder / f"{i:05d}{source.suffix}")
        start = time.perf_counter()
        predict_folder(
            load_predictor(bank), expand_inputs([str(folder)]), Path(tmp) / "out", 16, False
        )
        seconds = time.perf_counter() - start
    return {"images": count, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def child(*args: str) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--images", type=Path, default=IMAGES)
    parser.add_argument("--streaming", action="store_true")
    parser.add_argument(
        "--one", nargs=3, metavar=("BANK", "ENGINE", "BATCH"), help=argparse.SUPPRESS
    )
    parser.add_argument("--stream", nargs=2, metavar=("BANK", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        bank, engine, batch = args.one
        print(json.dumps(measure(Path(bank), engine, int(batch), args.images)))
        return
    if args.stream:
        print(json.dumps(stream(Path(args.stream[0]), int(args.stream[1]), args.images)))
        return
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    bank = args.run_dir / BANK_FILE
    if args.streaming:
        for count in (100, 1000):
            found = child(
                str(args.run_dir), "--images", str(args.images), "--stream", str(bank), str(count)
            )
            print(
                f"{count} images: {found['seconds']:.0f} s, peak RSS {found['peak_rss_mb']:.0f} MB"
            )
        return
    with tempfile.TemporaryDirectory() as tmp:
        banks = {"torch": bank}
        for fmt in ("onnx", "openvino"):
            export(bank, fmt, Path(tmp) / fmt)
            banks[fmt] = Path(tmp) / fmt / BANK_FILE
        print("| engine | batch | ms / image | images / s | peak RSS (MB) |")
        print("| --- | --- | --- | --- | --- |")
        for engine in ENGINES:
            for batch in BATCHES:
                found = child(
                    str(args.run_dir),
                    "--images",
                    str(args.images),
                    "--one",
                    str(banks[engine]),
                    engine,
                    str(batch),
                )
                print(
                    f"| {engine} | {batch} | {found['ms_per_image']:.1f} | "
                    f"{found['images_per_s']:.1f} | {found['peak_rss_mb']:.0f} |"
                )


if __name__ == "__main__":
    main()

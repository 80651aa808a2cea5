"""Where the wall time of the README's bottle command goes, from process start to exit.

    python benchmarks/bench_run.py                 # the README command, twice into one store
    python benchmarks/bench_run.py --sweep 15      # one job's share inside a 15-job sweep
    python benchmarks/bench_run.py -- figures.count=0   # with any Hydra overrides

Runs `train.py` as a user does (MLflow on, figures on, default loader workers) on real bottle
(`../shared/data/mvtec_ad`), reads the timestamps of the lines the run logs at each boundary
(train.log), and prints one table: wall, peak RSS and every segment. The first run starts with
an empty numba cache (NUMBA_CACHE_DIR in the tmp dir): what a first run after install waits.
Prints numbers; asserts nothing.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOTTLE = ROOT.parent / "shared" / "data" / "mvtec_ad"
README = ["category=bottle", "backbone=efficientnet_lite2", f"data.root={BOTTLE}"]
# (segment, the log line that ends it); the first starts at process launch.
MARKS = [
    ("imports, Hydra, config", r"\] - Job "),
    ("MLflow: experiment, run, params", r"MLflow run \w+: "),
    ("data scan", r"train, \d+ test images"),
    ("model build", r"Model ready"),
    ("loader start, feature extraction", r"Stage: coreset selection"),
    ("coreset selection", r"Stage: scoring"),
    ("scoring (test pass)", r"Metrics computed"),
    ("tuning", r"Stage: writing results"),
    ("scores, figures", r"Figures written"),
    ("bank, metrics.json", r"Results written"),
    ("MLflow model", r"MLflow model logged"),
    ("result line", r": image_auroc="),
    ("MLflow artifacts, run end", r"MLflow run \w+ logged"),
]
STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def stamps(log: Path) -> list[tuple[float, str]]:
    lines = []
    for line in log.read_text().splitlines():
        if match := STAMP.match(line):
            moment = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            lines.append((moment, line))
    return lines


def segments(log: Path, launched: float, ended: float) -> list[tuple[str, float]]:
    """Each MARKS segment's seconds (absent ones, e.g. tuning without it, take 0)."""
    lines, previous, found = stamps(log), launched, []
    for name, pattern in MARKS:
        hit = next((t for t, line in lines if re.search(pattern, line)), None)
        if hit is None:
            found.append((name, 0.0))
            continue
        found.append((name, hit - previous))
        previous = hit
    return [*found, ("exit", ended - previous)]


def run(args: list[str], cwd: Path, numba_cache: Path) -> tuple[float, float, float, int]:
    """Launches train.py; returns launch and end times, wall seconds, peak RSS (KiB)."""
    command = [sys.executable, str(ROOT / "train.py"), *args]
    env = os.environ | {"NUMBA_CACHE_DIR": str(numba_cache)}
    launched = time.time()
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(process.pid, 0)
    ended = time.time()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"train.py failed:\n{process.stderr.read().decode()[-3000:]}")
    return launched, ended, ended - launched, usage.ru_maxrss


def single(overrides: list[str], tmp: Path) -> None:
    print(
        "| segment | first run: fresh MLflow store, empty numba cache | second run |\n"
        "| --- | --- | --- |"
    )
    columns = []
    for number in (1, 2):
        out = tmp / f"run{number}"
        args = [*README, f"hydra.run.dir={out}", f"tracking.root={tmp / 'mlruns'}", *overrides]
        launched, ended, wall, rss = run(args, ROOT, tmp / "numba")
        metrics = json.loads((out / "metrics.json").read_text())
        work = metrics["fit_seconds"] + metrics["test_seconds"]
        columns.append((segments(out / "train.log", launched, ended), wall, rss, work))
    for row, (name, _) in enumerate(columns[0][0]):
        print(f"| {name} | " + " | ".join(f"{c[0][row][1]:.1f} s" for c in columns) + " |")
    print("| **wall** | " + " | ".join(f"**{c[1]:.1f} s**" for c in columns) + " |")
    print(
        "| fit + test (the run's own clocks) | "
        + " | ".join(f"{c[3]:.1f} s" for c in columns)
        + " |"
    )
    print("| outside fit and test | " + " | ".join(f"{c[1] - c[3]:.1f} s" for c in columns) + " |")
    print("| peak RSS | " + " | ".join(f"{c[2] / 1024:.0f} MiB" for c in columns) + " |")


def sweep(count: int, overrides: list[str], tmp: Path) -> None:
    data = tmp / "parts"
    data.mkdir()
    names = [f"part{i:02d}" for i in range(count)]
    for name in names:
        (data / name).symlink_to(BOTTLE / "bottle")
    args = ["-m", f"category.name={','.join(names)}", "backbone=efficientnet_lite2"]
    args += [f"data.root={data}", f"hydra.sweep.dir={tmp / 'sweep'}"]
    args += [f"tracking.root={tmp / 'mlruns'}", *overrides]
    launched, ended, wall, rss = run(args, ROOT, tmp / "numba")
    starts = [stamps(tmp / "sweep" / name / "train.log")[0][0] for name in names]
    ends = [*starts[1:], ended]
    print(f"{count}-job sweep: wall {wall:.0f} s, peak RSS {rss / 1024:.0f} MiB")
    print(f"before the first job {starts[0] - launched:.1f} s\n")
    print("| job | job wall | fit + test | overhead |\n| --- | --- | --- | --- |")
    for name, start, end in zip(names, starts, ends, strict=True):
        metrics = json.loads((tmp / "sweep" / name / "metrics.json").read_text())
        work = metrics["fit_seconds"] + metrics["test_seconds"]
        print(f"| {name} | {end - start:.1f} s | {work:.1f} s | {end - start - work:.1f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sweep", type=int, default=0, help="jobs in a basic-launcher sweep")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.sweep:
            sweep(args.sweep, args.overrides, Path(tmp))
        else:
            single(args.overrides, Path(tmp))


if __name__ == "__main__":
    main()

"""Benchmark the capture stage: wall time and peak memory of ``mg3d capture`` over repeated runs.

Each run is a fresh process (``mg3d capture ... --force``), so peak memory is that of one capture.
Prints one Markdown table row per input for BENCHMARKS.md.

    python scripts/bench_capture.py ../shared/data/woman-512/woman-512.mp4 --frames 70 --repeat 3
    python scripts/bench_capture.py --demo --repeat 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(args: list[str], ws: Path) -> tuple[float, dict]:
    """Wall seconds of one capture process, and its manifest metrics (which hold its peak RSS)."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mg3d", "capture", *args, "--out", str(ws), "--force"], check=True, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    return wall, json.loads((ws / "capture" / "manifest.json").read_text())["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?")
    parser.add_argument("--demo", action="store_true")
    parser.add_argument("--frames", type=int)
    parser.add_argument("--repeat", type=int, default=3)
    opts = parser.parse_args()
    args = ["--demo"] if opts.demo else [opts.source]
    if opts.frames:
        args += ["--frames", str(opts.frames)]
    walls, peaks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(opts.repeat):
            wall, metrics = run_once(args, Path(tmp) / "ws")
            walls.append(wall)
            peaks.append(metrics["peak_rss_mb"])
    name = "demo" if opts.demo else Path(opts.source).name
    machine = f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"
    print(
        f"| capture {name} {' '.join(args[1:])} | `python scripts/bench_capture.py {' '.join(args)} --repeat {opts.repeat}` "
        f"| {machine} | {datetime.date.today()} | median {statistics.median(walls):.1f} s wall "
        f"(runs {', '.join(f'{w:.1f}' for w in walls)}), peak RSS {max(peaks):.0f} MiB, "
        f"{metrics['frames_registered']}/{metrics['frames_selected']} registered, "
        f"{metrics['mean_reprojection_error_px']:.2f} px mean reprojection error |"
    )


if __name__ == "__main__":
    main()

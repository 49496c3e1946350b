"""Bench: latency and on-device quality of the exported student per device.

``mg3d bench WS --device host[,cuda,...]`` measures every exported variant on each device (load time, first
inference, median/p90/p99/min latency after warm-up, FPS, peak memory, PSNR of the device's images
against the torch fp32 student on held-out poses) and writes ``WS/bench/``::

    <device>.json     every figure with device, runtime, provider, threads, precision and resolution
    report.json       all devices; report.html: the table and a latency-vs-PSNR plot per device

``--estimate`` gives roofline figures from the profile's peak rates for devices that are not connected
(clearly labelled). A device that fails does not stop the others; its error is in the report.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from typing import Any

from mg3d.config import config_to_dict
from mg3d.errors import ConfigError
from mg3d.workspace import Workspace, sha256_file

STAGE = "bench"


@dataclass(frozen=True)
class BenchConfig:
    """Options of ``mg3d bench``."""

    device: str = "host"  # one or more device names or aliases, comma-separated (mg3d devices lists them)
    precision: str = ""  # fp32, fp16, int8 or all; "": the profile's precision, else every exported variant
    estimate: bool = False  # roofline estimates instead of measurements (for devices not connected)
    runs: int = 20  # timed runs after warm-up
    warmup: int = 3
    views: int = 4  # held-out poses the on-device PSNR is measured on
    sweep: bool = False  # pick depth/width/resolution for the device instead (see mg3d.bench.sweep)
    sweep_depths: str = "4,8,16,28"
    sweep_widths: str = "64,128,256"
    sweep_sizes: str = "256,400"  # long side of the output in pixels
    sweep_sr_factor: int = 8
    sweep_top: int = 2  # how many of the fastest-enough, largest students to train
    sweep_budget_s: float = 600.0  # training time shared by them
    sweep_eval_views: int = 16

    def __post_init__(self) -> None:
        if self.runs < 1 or self.warmup < 0 or self.views < 1:
            raise ConfigError("runs and views must be at least 1 and warmup not negative")
        if self.precision and self.precision not in ("fp32", "fp16", "int8", "all"):
            raise ConfigError(f"unknown precision {self.precision!r}", hint="use fp32, fp16, int8 or all")
        if self.sweep_top < 1 or self.sweep_budget_s <= 0 or self.sweep_eval_views < 0:
            raise ConfigError("sweep_top must be at least 1 and sweep_budget_s positive")
        for name in ("sweep_depths", "sweep_widths", "sweep_sizes"):
            values = getattr(self, name).split(",")
            if not all(v.strip().isdigit() and int(v) > 0 for v in values):
                raise ConfigError(f"{name} {getattr(self, name)!r} must be positive integers separated by commas", hint="e.g. 4,8,16")
        if not self.device.strip(","):
            raise ConfigError("no device given", hint="e.g. --device host (mg3d devices lists them)")


def run(workspace: Workspace, config: BenchConfig) -> dict[str, Any]:
    """Measure (or estimate) on every device in ``config.device``; returns the report."""
    from mg3d.bench.measure import bench_device
    from mg3d.bench.profiles import BenchError, resolve
    from mg3d.bench.report import write_report

    t0 = time.perf_counter()  # the measurements run before the stage's folder is opened: count them too
    if config.sweep:  # a sweep trains its own candidates: it needs the pseudo data, not a student
        source = workspace.require("distill", how=f"run mg3d distill {workspace.root} first")
        inputs = {"distill": {"path": str(source / "manifest.json"), "sha256": sha256_file(source / "manifest.json")}}
    else:
        source = workspace.require("student", how=f"train one with: mg3d student {workspace.root}")
        inputs = {"student": {"path": str(source / "student.safetensors"), "sha256": sha256_file(source / "student.safetensors")}}
    profiles = [resolve(name) for name in config.device.split(",") if name.strip()]  # unknown names fail first
    results: dict[str, Any] = {}
    failures = []
    for profile in profiles:  # a device that cannot run does not stop the others
        try:
            if config.sweep:
                from mg3d.bench.sweep import sweep

                results[profile.name] = {"device": profile.name, "description": profile.description, "mode": "sweep", "target_fps": profile.target_fps,
                                         "status": "sweep", "rows": [], "sweep": sweep(workspace, profile, config)}
            else:
                results[profile.name] = bench_device(workspace, profile, config)
        except BenchError as exc:
            failures.append(exc)
            results[profile.name] = {"device": profile.name, "mode": "failed", "status": str(exc), "rows": [], "error": str(exc)}
    if len(failures) == len(profiles):
        raise failures[0]
    old = workspace.manifest(STAGE) or {}
    keep = [d for d in old.get("metrics", {}).get("devices", {}) if d not in results and (workspace.stage_dir(STAGE) / f"{d}.json").is_file()]
    with workspace.begin(STAGE, {"last": config_to_dict(config)}, inputs) as run_:
        old_dir = workspace.stage_dir(STAGE)
        for device in keep:
            shutil.copy(old_dir / f"{device}.json", run_.path / f"{device}.json")
        for choice in old_dir.glob("choice-*.json"):  # sweep choices of devices not swept now stay
            if choice.stem[len("choice-"):] not in results or not config.sweep:
                shutil.copy(choice, run_.path / choice.name)
        for device, result in results.items():
            (run_.path / f"{device}.json").write_text(json.dumps(result, indent=2) + "\n")
            if "sweep" in result:
                (run_.path / f"choice-{device}.json").write_text(json.dumps(result["sweep"]["choice"], indent=2) + "\n")
        every = {p.stem: json.loads(p.read_text()) for p in sorted(run_.path.glob("*.json")) if not p.name.startswith("choice-")}
        report = write_report(run_.path, every)
        run_.metrics["devices"] = {d: _headline(r) for d, r in every.items()}
        run_.metrics["duration_s"] = round(time.perf_counter() - t0, 3)
        run_.outputs.update({"report": "report.json", "html": "report.html"})
    return report


def _headline(result: dict[str, Any]) -> dict[str, Any]:
    if "sweep" in result:
        c = result["sweep"]["choice"]
        return {"choice": f"{c['depth']}x{c['width']} at {c['resolution']} px", "best_fps": c["fps"], "psnr": c["psnr"], "estimate": c["estimate"]}
    rows = [r for r in result.get("rows", []) if "fps" in r]
    best = max(rows, key=lambda r: r["fps"], default=None)
    return {"rows": len(result.get("rows", [])), "best_fps": best["fps"] if best else None, "best": best["file"] if best else None,
            "estimate": bool(best and best.get("estimate")), "errors": sum(1 for r in result.get("rows", []) if "error" in r)}

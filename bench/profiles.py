"""Device profiles (``devices/*.yaml``): what a device is, how to reach it, what it should reach.

    name, aliases          pixel -> pixel-8
    transport              local (this machine), browser, adb (Android), ios (Core ML via Xcode), qemu
    runtime, provider      onnxruntime + CPUExecutionProvider / NNAPI, torch + cuda, coreml, onnxruntime-web
    threads, target_fps    the setting to measure with and the frame rate a model must reach
    precision              the export variant measured by default
    peak                   published or approximate peak rates (gflops_fp32/fp16, gops_int8, bandwidth_gbs,
                           source): only for clearly labelled ``--estimate`` figures
"""

from __future__ import annotations

import difflib
import importlib.util
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from mg3d.errors import Mg3dError


class BenchError(Mg3dError):
    """A device is unknown or unreachable, or a measurement failed."""


TRANSPORTS = ("local", "browser", "adb", "ios", "qemu")
#: Transports this version measures on; the others get --estimate figures only.
MEASURED = ("local", "adb", "ios", "browser", "qemu")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    transport: str
    runtime: str
    provider: str
    aliases: tuple[str, ...] = ()
    threads: int = 0
    target_fps: float = 30.0
    precision: str = "fp32"
    runner: str = ""
    numerics_only: bool = False
    peak: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise BenchError(f"device profile {self.name}: transport {self.transport!r} is unknown", hint=f"use one of {', '.join(TRANSPORTS)}")


def load_profiles() -> dict[str, DeviceProfile]:
    """Every shipped profile by name."""
    profiles = {}
    for entry in sorted(resources.files("mg3d.devices").iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".yaml"):
            continue
        data = yaml.safe_load(entry.read_text()) or {}
        try:
            data["aliases"] = tuple(data.get("aliases", ()))
            profile = DeviceProfile(**data)
        except TypeError as exc:
            raise BenchError(f"device profile {entry.name} is malformed ({exc})", hint="see devices/README.md for the fields") from None
        profiles[profile.name] = profile
    return profiles


def resolve(name: str) -> DeviceProfile:
    """The profile called ``name`` (or with that alias); a BenchError naming the known ones otherwise."""
    profiles = load_profiles()
    key = name.strip().lower()
    for profile in profiles.values():
        if key == profile.name or key in profile.aliases:
            return profile
    names = sorted(profiles) + sorted(a for p in profiles.values() for a in p.aliases)
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = (f"did you mean {close[0]}? " if close else "") + f"known devices: {', '.join(sorted(profiles))} (mg3d devices lists them)"
    raise BenchError(f"unknown device {name!r}", hint=hint)


def reachable(profile: DeviceProfile) -> tuple[bool, str]:
    """Whether the device can be measured now, and if not, how to make it so (one line)."""
    if profile.transport not in MEASURED:
        return False, f"{profile.transport} devices get --estimate figures only in this version"
    if profile.transport == "local":
        if profile.runtime == "torch":
            import torch

            if not torch.cuda.is_available():
                return False, "no CUDA GPU here; run on a machine with one, or use --estimate"
            return True, torch.cuda.get_device_name(0)
        if importlib.util.find_spec("onnxruntime") is None:
            return False, "onnxruntime is not installed: pip install 'mg3d[export]'"
        return True, f"this machine, {profile.threads} threads"
    if profile.transport == "adb":
        adb = shutil.which("adb")
        if adb is None:
            return False, "adb is not installed: apt-get install adb (or Android platform-tools), connect the phone with USB debugging on, or use --estimate"
        serials = adb_devices(adb)
        if not serials:
            return False, "no Android device connected: plug it in with USB debugging on (adb devices lists it), or use --estimate"
        return True, f"adb serial {serials[0]}"
    if profile.transport == "ios":
        if platform.system() != "Darwin" or shutil.which("xcrun") is None:
            return False, "iPhones are measured from macOS with Xcode (xcrun devicectl); use --estimate here"
        return True, "macOS with Xcode"
    if profile.transport == "qemu":
        from mg3d.bench import arm64

        if arm64.qemu() is None:
            return False, "qemu-user is not installed: apt-get install qemu-user-static, then mg3d devices --setup arm64-emulated"
        if not arm64.ready():
            return False, "no aarch64 Python and onnxruntime yet: mg3d devices --setup arm64-emulated"
        return True, f"aarch64 onnxruntime {arm64.ORT_VERSION} under {arm64.qemu()} (numerics only)"
    if profile.transport == "browser":
        from mg3d.viewer import browser_executable, find_runtime

        if importlib.util.find_spec("playwright") is None:
            return False, "playwright is not installed: pip install 'mg3d[view]' (and apt-get install chromium)"
        if browser_executable() is None:
            return False, "no Chromium here: apt-get install chromium"
        if find_runtime() is None:
            return False, "onnxruntime-web is not installed: mg3d view --install-runtime"
        return True, f"headless Chromium ({browser_executable()})"
    return False, "not reachable"  # pragma: no cover - every measured transport is handled above


def adb_devices(adb: str) -> list[str]:
    """Serials of the Android devices adb sees in the 'device' state."""
    try:
        out = subprocess.run([adb, "devices"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.split()[0] for line in out.splitlines()[1:] if line.strip().endswith("\tdevice") or line.split()[1:2] == ["device"]]

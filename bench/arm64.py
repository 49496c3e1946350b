"""``arm64-emulated``: the aarch64 onnxruntime wheel run under ``qemu-aarch64-static``, to check that ARM
kernels give the same image as the x86 ones and as torch. Timing under emulation means nothing and is
never reported.

The sysroot (``~/.cache/mg3d/arm64/``) holds Debian's aarch64 Python 3.11 with its libraries, and the
aarch64 wheels of onnxruntime and numpy. ``mg3d devices --setup arm64-emulated`` makes it (root, apt,
PyPI). onnxruntime is pinned to 1.19.2: newer aarch64 wheels crash on import under Debian 12's qemu-user
7.2 (measured: 1.32.0 segfaults while importing, 1.19.2 runs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from mg3d.bench.profiles import BenchError

ORT_VERSION = "1.19.2"
PYTHON = "usr/bin/python3.11"
#: Debian 12 packages that aarch64 Python 3.11 needs at run time.
DEBS = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "libgcc-s1", "libstdc++6", "zlib1g", "libexpat1",
        "libffi8", "libbz2-1.0", "liblzma5", "libuuid1", "libcrypt1", "libssl3", "libsqlite3-0", "libncursesw6", "libtinfo6", "libreadline8",
        "libdb5.3", "libnsl2", "libtirpc3")
_RUN = """
import sys, numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
poses = np.load(sys.argv[2])
np.save(sys.argv[3], np.concatenate([session.run(None, {"c2w": p[None]})[0] for p in poses]))
print(ort.__version__)
"""


def sysroot() -> Path:
    return Path(os.environ.get("MG3D_CACHE", Path.home() / ".cache" / "mg3d")) / "arm64"


def qemu() -> str | None:
    return shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")


def ready() -> bool:
    root = sysroot()
    return qemu() is not None and (root / "root" / PYTHON).is_file() and (root / "site" / "onnxruntime").is_dir()


def setup() -> Path:
    """Make the sysroot: Debian's arm64 packages (dpkg -x) and the aarch64 wheels (unzipped)."""
    if ready():
        return sysroot()
    if qemu() is None:
        raise BenchError("qemu-aarch64-static is not installed", hint="apt-get install qemu-user-static")
    apt = shutil.which("apt-get")
    if apt is None or shutil.which("dpkg") is None:
        raise BenchError("the arm64 sysroot is made from Debian packages and this machine has no apt-get", hint=f"put an aarch64 Python 3.11 at {sysroot() / 'root' / PYTHON}")
    target = sysroot()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".arm64-", dir=target.parent))
    try:
        arches = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True).stdout.split()
        if "arm64" not in arches:
            _check(["dpkg", "--add-architecture", "arm64"], "dpkg --add-architecture arm64 (needs root)")
            _check([apt, "update", "-qq"], "apt-get update")
        debs = staging / "debs"
        debs.mkdir()
        _check([apt, "download", *(f"{p}:arm64" for p in DEBS)], "apt-get download of the arm64 Python packages", cwd=debs)
        for deb in debs.glob("*.deb"):
            _check(["dpkg", "-x", str(deb), str(staging / "root")], f"dpkg -x {deb.name}")
        wheels = staging / "wheels"
        _check([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
                "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux_2_17_aarch64", "--platform", "manylinux2014_aarch64",
                "-d", str(wheels), f"onnxruntime=={ORT_VERSION}", f"numpy=={np.__version__}"], "pip download of the aarch64 wheels")
        for wheel in wheels.glob("*.whl"):
            with zipfile.ZipFile(wheel) as z:
                z.extractall(staging / "site")
        shutil.rmtree(debs)
        shutil.rmtree(wheels)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # complete or absent
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _check(command: list[str], what: str, cwd: Path | None = None) -> None:
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=900)
    if done.returncode != 0:
        raise BenchError(f"{what} failed: {(done.stderr or done.stdout).strip().splitlines()[-1][:200] if (done.stderr or done.stdout).strip() else done.returncode}",
                         hint="run mg3d devices --setup arm64-emulated as root on Debian or Ubuntu")


def run_arm64(path: Path, poses: np.ndarray, reference: np.ndarray, timeout_s: float = 1800) -> dict[str, Any]:
    """The model's images from aarch64 onnxruntime under qemu, compared with torch and with x86 onnxruntime."""
    from mg3d.bench.runners import _psnr
    from mg3d.export.onnxmodel import render, session

    root = sysroot()
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "poses.npy", poses.astype(np.float32))
        env = {**os.environ, "PYTHONPATH": str(root / "site"), "PYTHONNOUSERSITE": "1"}
        try:
            done = subprocess.run([qemu(), "-L", str(root / "root"), str(root / "root" / PYTHON), "-c", _RUN, str(path), f"{tmp}/poses.npy", f"{tmp}/out.npy"],
                                  capture_output=True, text=True, env=env, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{path.name} did not finish under qemu within {timeout_s:.0f} s", hint="use fewer --views") from None
        if done.returncode != 0:
            raise BenchError(f"{path.name} failed on aarch64 onnxruntime: {(done.stderr.strip().splitlines() or ['exit ' + str(done.returncode)])[-1][:300]}")
        images = np.load(Path(tmp) / "out.npy")
    x86 = render(session(path), poses)
    return {"numerics_only": True, "runtime_version": done.stdout.strip(), "psnr_vs_torch": _psnr(images, reference),
            "psnr_vs_x86": _psnr(images, x86), "max_abs_vs_x86": float(np.abs(images - x86).max()), "views": len(poses)}

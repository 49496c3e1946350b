"""Workspaces: one folder per project, one sub-folder per stage, a manifest written last.

Layout::

    WS/
      workspace.json          # marks the folder as an mg3d workspace
      capture/                # one folder per finished stage ...
        manifest.json         # ... whose manifest is written last and atomically
      .teacher.partial/       # a stage in progress writes here, never into teacher/
      edit/                   # a stage with several results keeps each in a sub-folder ("edit/<name>")
        van-gogh/manifest.json
        .sepia.partial/
        active.json           # which one later stages read

A stage writes into ``WS/.<stage>.partial/``. Only when it succeeds is ``manifest.json`` written (to a
temporary name, fsynced, renamed) and the folder swapped into place, so an interrupted or failed stage
leaves the previous result, or nothing, and is never mistaken for done. A stage whose manifest has the
same config and input hashes as the current request is up to date and is skipped unless forced.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import resource
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

from mg3d import __version__
from mg3d.errors import WorkspaceError

MANIFEST = "manifest.json"
MARKER = "workspace.json"
ACTIVE_EDIT = "active.json"
SCHEMA_VERSION = 1
#: The order stages run in; ``mg3d info`` lists them this way.
STAGE_ORDER = ("capture", "teacher", "edit", "distill", "student", "export", "bench")
_VERSIONED = ("numpy", "torch", "pycolmap", "av", "diffusers", "onnx", "onnxruntime", "coremltools")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_input(path: Path) -> dict[str, Any]:
    """Content hash of a file or of a folder (every file under it, by relative path).

    Example:
        >>> hash_input(Path("video.mp4"))  # doctest: +SKIP
        {'path': '/abs/video.mp4', 'sha256': '9f2c...', 'bytes': 1523113}
    """
    path = Path(path).resolve()
    if path.is_dir():
        digest, total = hashlib.sha256(), 0
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(path)).encode() + b"\0" + sha256_file(file).encode())
            total += file.stat().st_size
        return {"path": str(path), "sha256": digest.hexdigest(), "bytes": total}
    return {"path": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _versions() -> dict[str, str]:
    """Installed versions of the packages that shape results, read without importing them."""
    found = {"mg3d": __version__, "python": platform.python_version()}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


class Workspace:
    """A workspace folder. Creating the object touches nothing on disk.

    Example:
        >>> ws = Workspace("my-scene")            # doctest: +SKIP
        >>> ws.manifest("capture")["metrics"]     # doctest: +SKIP
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise WorkspaceError(f"{self.root} is a file, not a workspace folder", hint="choose another --out path")
        self._recover()

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def partial_dir(self, stage: str) -> Path:
        """Where ``stage`` is written while it runs: ``WS/.teacher.partial``, ``WS/edit/.sepia.partial``."""
        final = self.root / stage
        return final.parent / f".{final.name}.partial"

    def manifest(self, stage: str) -> dict[str, Any] | None:
        """The finished stage's manifest, or None when the stage has not finished."""
        path = self.stage_dir(stage) / MANIFEST
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WorkspaceError(
                f"{path} is corrupt", hint=f"redo the stage with --force, or delete {self.stage_dir(stage)}"
            ) from None

    def stages(self) -> list[str]:
        """Finished stages, in pipeline order (unknown stage names last, alphabetically)."""
        if not self.root.is_dir():
            return []
        names = [p.name for p in self.root.iterdir() if p.is_dir() and (p / MANIFEST).is_file()]
        names += [f"edit/{name}" for name in self.edits()]
        rank = {name: i for i, name in enumerate(STAGE_ORDER)}
        return sorted(names, key=lambda n: (rank.get(n.split("/")[0], len(rank)), n))

    def partial_stages(self) -> list[str]:
        """Stages that were started and did not finish (their partial folder is still there)."""
        if not self.root.is_dir():
            return []
        found = [p for pattern in (".*.partial", "*/.*.partial") for p in self.root.glob(pattern) if p.is_dir()]
        return sorted(str(p.parent.relative_to(self.root) / p.name[1 : -len(".partial")]).removeprefix("./") for p in found)

    def require(self, stage: str, how: str = "") -> Path:
        """The folder of a finished stage, or a WorkspaceError that says which command makes it."""
        if not self.root.is_dir():
            raise WorkspaceError(f"workspace {self.root} does not exist", hint=how or "check the path")
        if self.manifest(stage) is None:
            raise WorkspaceError(f"workspace {self.root} has no finished {stage} stage", hint=how or f"run mg3d {stage} first")
        return self.stage_dir(stage)

    # ---- which radiance field later stages read: the teacher, or one of the edits -------------------
    def edits(self) -> list[str]:
        """Names of the finished edits (``WS/edit/<name>/``)."""
        folder = self.root / "edit"
        return sorted(p.name for p in folder.iterdir() if (p / MANIFEST).is_file()) if folder.is_dir() else []

    def active_edit(self) -> str | None:
        """The edit that ``mg3d edit`` made or chose last (``WS/edit/active.json``), if it is finished."""
        path = self.root / "edit" / ACTIVE_EDIT
        if not path.is_file():
            return None
        try:
            name = json.loads(path.read_text())["name"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise WorkspaceError(f"{path} is corrupt", hint="choose an edit again with mg3d edit WS --use NAME") from None
        return name if name in self.edits() else None

    def set_active_edit(self, name: str | None) -> None:
        """Make ``WS/edit/<name>`` the field later stages read (None: the unedited teacher)."""
        if name is not None and name not in self.edits():
            raise WorkspaceError(f"{self.root} has no finished edit named {name!r}", hint=f"finished edits: {', '.join(self.edits()) or 'none'}")
        (self.root / "edit").mkdir(parents=True, exist_ok=True)
        _write_json_atomic(self.root / "edit" / ACTIVE_EDIT, {"name": name})

    def field_source(self, choice: str = "auto") -> str:
        """The stage whose radiance field later stages read: ``teacher`` or ``edit/<name>``.

        ``choice``: auto (the active edit if there is one, else the teacher), teacher, edit (the active
        edit, which must exist) or the name of an edit.
        """
        if choice == "teacher":
            return "teacher"
        active = self.active_edit()
        if choice == "auto":
            return f"edit/{active}" if active else "teacher"
        name = active if choice == "edit" else choice
        if name is None or name not in self.edits():
            raise WorkspaceError(
                f"{self.root} has no finished edit {'' if choice == 'edit' else repr(choice) + ' '}to read".replace("  ", " "),
                hint=f"run mg3d edit {self.root} --prompt \"...\" first (finished edits: {', '.join(self.edits()) or 'none'})",
            )
        return f"edit/{name}"

    def is_up_to_date(self, stage: str, config: dict[str, Any], inputs: dict[str, Any]) -> bool:
        """True when the stage finished with this config and these input contents, and its outputs exist."""
        manifest = self.manifest(stage)
        if manifest is None or manifest.get("schema") != SCHEMA_VERSION:
            return False
        same_inputs = {k: v.get("sha256") for k, v in manifest.get("inputs", {}).items()} == {
            k: v.get("sha256") for k, v in inputs.items()
        }
        outputs_exist = all((self.stage_dir(stage) / rel).exists() for rel in manifest.get("outputs", {}).values())
        return manifest.get("config") == config and same_inputs and outputs_exist

    def begin(self, stage: str, config: dict[str, Any], inputs: dict[str, Any], resumable: bool = False) -> StageRun:
        """Start writing a stage; use as a context manager (see :class:`StageRun`).

        A ``resumable`` stage keeps its partial folder when it fails or is interrupted after writing to it,
        and finds it again next time (its checkpoints are there); other stages start from an empty folder.
        """
        def leftovers(p: Path) -> bool:  # what an unfinished stage leaves: WS/.x.partial, WS/edit/.y.partial
            if p.name.startswith(".") and p.name.endswith((".partial", ".old")):
                return True
            return p.name in STAGE_ORDER and p.is_dir() and all(q.name.startswith(".") and q.name.endswith((".partial", ".old")) for q in p.iterdir())

        foreign = self.root.exists() and any(not leftovers(p) for p in self.root.iterdir())
        if foreign and not (self.root / MARKER).is_file():
            raise WorkspaceError(
                f"{self.root} is a non-empty folder that is not an mg3d workspace",
                hint="choose a new or empty folder for --out",
            )
        return StageRun(self, stage, config, inputs, resumable)

    def _recover(self) -> None:
        """Finish a swap that was interrupted between its two renames."""
        if not self.root.is_dir():
            return
        for old in [*self.root.glob(".*.old"), *self.root.glob("*/.*.old")]:
            final = old.parent / old.name[1 : -len(".old")]
            if not final.exists() and (old / MANIFEST).is_file():
                old.rename(final)
            else:
                shutil.rmtree(old, ignore_errors=True)


class StageRun:
    """Writes one stage atomically.

    Inside the ``with`` block, write files under ``run.path`` and put numbers into ``run.metrics`` and the
    key files' relative paths into ``run.outputs``. On success the manifest is written and the folder
    becomes ``WS/<stage>/`` (replacing an older result); on any exception the partial folder is removed
    (kept, for a resumable stage that wrote something to resume from), the older result is kept, and a
    workspace folder this run created is removed again.
    """

    def __init__(self, workspace: Workspace, stage: str, config: dict[str, Any], inputs: dict[str, Any], resumable: bool = False) -> None:
        self.workspace = workspace
        self.resumable = resumable
        self.stage = stage
        self.config = config
        self.inputs = inputs
        self.metrics: dict[str, Any] = {}
        self.outputs: dict[str, str] = {}
        self.device = "cpu"  # a stage that runs on a GPU says so, e.g. "cuda:0 (NVIDIA H100)"
        self.path = workspace.partial_dir(stage)
        self.manifest: dict[str, Any] = {}
        self._created_root = False
        self._t0 = 0.0
        self._started = ""

    def __enter__(self) -> StageRun:
        self._created_root = not self.workspace.root.exists()
        self.workspace.root.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and not self.resumable:
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._t0, self._started = time.perf_counter(), _now()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            if self.resumable and self.path.is_dir() and any(p.is_file() for p in self.path.rglob("*")):
                return  # keep the checkpoints for the next run; no manifest, so it is not "done"
            shutil.rmtree(self.path, ignore_errors=True)
            root = self.workspace.root
            if self._created_root and root.is_dir() and not any(root.iterdir()):
                root.rmdir()
            return
        self._commit()

    def _commit(self) -> None:
        missing = [rel for rel in self.outputs.values() if not (self.path / rel).exists()]
        if missing:
            raise WorkspaceError(f"{self.stage} did not write {', '.join(missing)}")
        files = [p for p in self.path.rglob("*") if p.is_file()]
        self.metrics.setdefault("duration_s", round(time.perf_counter() - self._t0, 3))
        self.metrics.setdefault("peak_rss_mb", round(peak_rss_mb(), 1))
        self.manifest = {
            "schema": SCHEMA_VERSION,
            "stage": self.stage,
            "config": self.config,
            "inputs": self.inputs,
            "versions": _versions(),
            "device": {"kind": self.device, "host": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform()},
            "started": self._started,
            "finished": _now(),
            "metrics": self.metrics,
            "outputs": self.outputs,
            "files": {"count": len(files), "bytes": sum(p.stat().st_size for p in files)},
        }
        _write_json_atomic(self.path / MANIFEST, self.manifest)
        root = self.workspace.root
        if not (root / MARKER).is_file():
            _write_json_atomic(root / MARKER, {"schema": SCHEMA_VERSION, "created": _now(), "mg3d": __version__})
        final = root / self.stage
        old = final.parent / f".{final.name}.old"
        if final.exists():
            final.rename(old)
        self.path.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        self.path = final

"""Edit: change the captured scene by a text instruction, consistently in 3D (Instruct-NeRF2NeRF).

The teacher keeps training while its training images are replaced by InstructPix2Pix's edits of its
own renders, each conditioned on the original photo, until the field and the edited images agree.
Two schedules:

- ``rounds`` (default): render every training view, edit them all in batches, train; a few rounds,
  the noise level coming down each round (as Instruct-GS2GS edits the whole set at once). Batched
  diffusion and few edits per view make it the faster mode.
- ``idu``: IN2N's Iterative Dataset Update: one view every ``edit_every`` steps, all views always
  supervising.

Writes ``WS/edit/<name>/`` (``name`` from the prompt unless given), so several prompts keep separate
results, and marks it active in ``WS/edit/active.json`` for the stages after it::

    teacher.safetensors, teacher.json   the edited radiance field
    images/*.png, transforms.json       the edited training images (nerfstudio format, train split)
    renders/view_*.png                  held-out views: original | edited
    edit.json, manifest.json            prompt, editor, figures

An interrupted edit resumes from ``WS/edit/.<name>.partial/`` with the same prompt and options; a
different prompt or option set under the same name is refused instead of being mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mg3d.config import config_to_dict
from mg3d.errors import ConfigError
from mg3d.workspace import Workspace, sha256_file

STAGE = "edit"
MODES = ("rounds", "idu")
#: Options that change only how long or how the work is laid out, not what is learned.
_SCHEDULE_ONLY = ("max_time_s", "checkpoint_every", "eval_views", "save_views", "chunk", "device", "offload", "attention_slicing", "name")


@dataclass(frozen=True)
class EditConfig:
    """Options of ``mg3d edit`` (each is a CLI option of the same name)."""

    prompt: str = ""
    name: str = ""  # result folder WS/edit/<name> (default: from the prompt)
    edit_model: str = "timbrooks/instruct-pix2pix"  # model id, local diffusers folder, or builtin:color
    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5
    diffusion_steps: int = 20
    noise_min: float = 0.02  # fraction of the diffusion's 1000 steps
    noise_max: float = 0.98
    mode: str = "rounds"  # rounds: edit all views between training rounds; idu: one view every edit_every steps
    rounds: int = 3
    edit_every: int = 10
    edit_batch: int = 4  # views per diffusion batch (rounds mode)
    edit_resolution: int = 512  # long side the diffusion runs at
    edit_dtype: str = "auto"  # auto (float16 on CUDA), float16, bfloat16, float32
    offload: bool = False
    attention_slicing: bool = False
    downscale: int = 0  # shrink the training images by this factor for the edit (0: as the teacher trained)
    steps: int = 3000  # teacher training steps during the edit
    max_time_s: float = 0.0
    lr: float = 0.01
    #: grid cells the edited field may occupy beyond the teacher's occupied cells (each grown by this many
    #: cells); -1: anywhere (IN2N). Inconsistent edits otherwise fill free space with fog, which costs
    #: every later render (the distill stage above all)
    grow_cells: int = 4
    #: weight of mip-NeRF 360's distortion loss while the field learns the edits: inconsistent edits pull
    #: it towards fog, which the loss pushes back onto surfaces
    distortion: float = 0.002  # nerfacto's weight, which IN2N edits with
    checkpoint_every: int = 500
    eval_views: int = 8  # held-out views rendered before and after
    save_views: int = 4
    chunk: int = 1 << 16  # rays per render chunk: renders share the GPU with the editor, so they stay small (whole views: 23.7 GB peak)
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r} is unknown", hint="use rounds or idu")
        if not 0 <= self.noise_min <= self.noise_max <= 1:
            raise ConfigError("noise levels must satisfy 0 <= noise_min <= noise_max <= 1")
        if self.downscale < 0:
            raise ConfigError("downscale must not be negative")
        if self.distortion < 0:
            raise ConfigError("distortion must not be negative")
        if self.grow_cells < -1:
            raise ConfigError(f"grow_cells {self.grow_cells} is out of range", hint="use -1 (the edit may fill any cell) or 0 and up (cells around the teacher's)")
        for name in ("rounds", "edit_every", "edit_batch", "edit_resolution", "diffusion_steps", "steps", "checkpoint_every", "chunk"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.edit_dtype not in ("auto", "float16", "bfloat16", "float32"):
            raise ConfigError(f"edit_dtype {self.edit_dtype!r} is unknown", hint="use auto, float16, bfloat16 or float32")
        if self.name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", self.name):
            raise ConfigError(f"edit name {self.name!r} is not a simple folder name", hint="use letters, digits, '.', '_' and '-'")


@dataclass
class EditResult:
    manifest: dict[str, Any]
    name: str
    skipped: bool


def slug(prompt: str) -> str:
    """A folder name for a prompt: ``"Turn her into a Van Gogh painting!"`` -> ``turn-her-into-a-van-gogh-painting``."""
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return (words[:48].rstrip("-") or "edit") if words else "edit-" + hashlib.sha256(prompt.encode()).hexdigest()[:8]


def check_prompt(prompt: str) -> None:
    from mg3d.edit.editors import EditError

    if not prompt.strip():
        raise EditError("the prompt is empty", hint='say what to change, e.g. --prompt "Turn her into a Van Gogh painting"')


def run(workspace: Workspace, config: EditConfig, force: bool = False) -> EditResult:
    """Edit the teacher of ``workspace`` by ``config.prompt`` into ``WS/edit/<name>``."""
    from mg3d.edit.editors import EditError
    from mg3d.teacher import _device
    from mg3d.ui import console

    check_prompt(config.prompt)
    teacher = workspace.require("teacher", how=f"run mg3d teacher {workspace.root} first")
    capture = workspace.stage_dir("capture")
    name = config.name or slug(config.prompt)
    stage = f"{STAGE}/{name}"
    inputs = {s: {"path": str(d / "manifest.json"), "sha256": sha256_file(d / "manifest.json")} for s, d in (("capture", capture), ("teacher", teacher))}
    config_dict = config_to_dict(config)
    if not force and workspace.is_up_to_date(stage, config_dict, inputs):
        console.print(f"edit {name!r} in {workspace.root} is up to date (use --force to redo it)")
        workspace.set_active_edit(name)
        return EditResult(workspace.manifest(stage) or {}, name, skipped=True)
    key_fields = {k: v for k, v in config_dict.items() if k not in _SCHEDULE_ONLY}
    key = hashlib.sha256(json.dumps([key_fields, inputs], sort_keys=True).encode()).hexdigest()[:16]
    partial = workspace.partial_dir(stage)
    if force:
        import shutil

        shutil.rmtree(partial, ignore_errors=True)
    started = partial / "progress.json"
    if started.is_file():
        before = json.loads(started.read_text())
        if before.get("key") != key:
            what = "prompt" if before.get("prompt") != config.prompt else "options"
            raise EditError(
                f"an interrupted edit named {name!r} with other {what} (prompt {before.get('prompt')!r}) is in {partial}",
                hint="run it again with the same prompt and options to resume it, pick another --name, or add --force to drop it",
            )
    # the editor's and the field's allocations alternate in size: growable segments keep the reserved
    # memory near the allocated peak (set before CUDA starts; a user's own setting wins)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    _device(config.device)
    editor = _load_editor(config)  # fails on missing weights before anything is trained or written
    with workspace.begin(stage, config_dict, inputs, resumable=True) as run_:
        from mg3d.edit.update import edit_field

        run_.metrics.update(edit_field(workspace, editor, config, run_, key))
        run_.outputs.update({"weights": "teacher.safetensors", "spec": "teacher.json", "transforms": "transforms.json"})
    workspace.set_active_edit(name)
    return EditResult(run_.manifest, name, skipped=False)


def _load_editor(config: EditConfig) -> Any:
    from mg3d.edit.editors import load_editor
    from mg3d.teacher import _device

    return load_editor(
        config.edit_model, _device(config.device), dtype=config.edit_dtype, resolution=config.edit_resolution,
        steps=config.diffusion_steps, guidance_scale=config.guidance_scale, image_guidance_scale=config.image_guidance_scale,
        offload=config.offload, attention_slicing=config.attention_slicing,
    )


def preview(workspace: Workspace, config: EditConfig, views: int = 4) -> Path:
    """Edit ``views`` training photos in 2D only (no 3D), and write them beside the originals as one PNG.

    Needs only the capture, so a person can judge a prompt and the guidance scales in seconds before
    the full edit. Returns the picture's path: ``WS/edit/previews/<name>.png``.
    """
    import time

    import numpy as np
    import torch

    from mg3d.formats.nerfstudio import load_nerfstudio
    from mg3d.imageio import write_image
    from mg3d.ui import console, progress

    check_prompt(config.prompt)
    capture = workspace.require("capture", how=f"run mg3d capture VIDEO --out {workspace.root} first")
    editor = _load_editor(config)
    scene = load_nerfstudio(capture / "transforms.json")
    train = scene.splits["train"]
    picks = train[np.linspace(0, len(train) - 1, min(views, len(train))).round().astype(int)]
    generator = torch.Generator().manual_seed(config.seed)
    rows, t0 = [], time.perf_counter()
    with progress() as bar:
        task = bar.add_task("previewing the edit", total=len(picks))
        for i in picks:
            photo = _rgb(scene.image(int(i)))
            x = torch.from_numpy(photo)[None]
            edited = editor.edit(x, x, config.prompt, noise=(config.noise_max, config.noise_max), generator=generator)[0].cpu().numpy()
            rows.append(np.concatenate([photo, edited], 1))
            bar.advance(task)
    width = max(r.shape[1] for r in rows)
    sheet = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=1.0) for r in rows], 0)
    out = workspace.root / STAGE / "previews" / f"{config.name or slug(config.prompt)}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    write_image(tmp, (sheet * 255).round().astype(np.uint8))
    tmp.replace(out)
    console.print(f"{len(picks)} views edited in {time.perf_counter() - t0:.1f} s (original | edited, guidance {config.guidance_scale}, image guidance {config.image_guidance_scale})")
    return out


def _rgb(image: Any) -> Any:
    """uint8 [H, W, 3|4] -> float32 [H, W, 3] in [0, 1], RGBA composited on white."""
    import numpy as np

    x = image.astype(np.float32) / 255.0
    if x.shape[2] == 4:
        x = x[..., :3] * x[..., 3:] + (1 - x[..., 3:])
    return np.ascontiguousarray(x[..., :3])

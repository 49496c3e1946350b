"""Training checkpoints shared by the stages: model + optimizer state + random streams in safetensors,
progress in JSON, each written to a temporary name and renamed (never half-written). Nothing is unpickled.

    save_checkpoint(folder, model, optimizer, {"key": key, "step": 100})
    meta = load_checkpoint(folder, model, optimizer, key, TeacherError)   # None: start from zero
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mg3d.errors import Mg3dError

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_META = "checkpoint.json"
META_KEY = "mg3d.meta"  # the progress, in the safetensors header too


def check_finite(loss: float, step: int, last_good: int, lr: float, error: type[Mg3dError] = Mg3dError, what: str = "the loss") -> None:
    """Stop training with a message that names the step, the checkpoint kept and what to change."""
    if not math.isfinite(loss):
        raise error(
            f"training diverged: {what} became {loss} at step {step}",
            hint=f"the last good checkpoint (step {last_good}) is kept; lower --lr (now {lr}) and run again to resume from it",
        )


def load_tensors(path: Path, error: type[Mg3dError] = Mg3dError) -> dict[str, Tensor]:
    """Read a safetensors file, turning any failure into ``error`` (never a pickle traceback)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise error(f"{path} does not exist") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise error(f"checkpoint {path} is corrupt ({exc})", hint="delete it, or redo the stage with --force") from None


def save_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    """Model, optimizer state, the random streams and ``meta`` (JSON: at least key and step)."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    for idx, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value).detach().contiguous().cpu()
    # the random streams too, so that a resumed run draws what an uninterrupted one would have drawn
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    tmp = folder / (CHECKPOINT + ".tmp")
    # ``meta`` also in the tensors' own header: a kill between the two renames below cannot pair these weights
    # with the previous step (a resume would then run a shifted schedule); checkpoint.json is for people
    save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
    os.replace(tmp, folder / CHECKPOINT)
    (folder / (CHECKPOINT_META + ".tmp")).write_text(json.dumps(meta, indent=1))
    os.replace(folder / (CHECKPOINT_META + ".tmp"), folder / CHECKPOINT_META)


def _header_meta(path: Path, required: tuple[str, ...]) -> dict[str, Any] | None:
    """The progress saved in a checkpoint's safetensors header; None for an older checkpoint without it (or
    an unreadable header: :func:`load_tensors` then reports the file)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "null"))
    except (SafetensorError, OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and all(k in meta for k in required) else None


def load_checkpoint(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, key: str, error: type[Mg3dError] = Mg3dError,
    required: tuple[str, ...] = ("key", "step"),
) -> dict[str, Any] | None:
    """Restore a checkpoint made with the same ``key`` (config and inputs); None when there is none.

    A corrupt or mismatched checkpoint raises ``error`` with a hint to delete it or use --force.
    """
    meta_path = folder / CHECKPOINT_META
    if not meta_path.is_file() or not (folder / CHECKPOINT).is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict) or not all(k in meta for k in required):
            raise ValueError
    except ValueError:  # also JSONDecodeError and UnicodeDecodeError
        raise error(f"checkpoint {meta_path} is corrupt", hint="delete it, or run with --force to start over") from None
    meta = _header_meta(folder / CHECKPOINT, required) or meta  # the one written with these weights
    if meta.get("key") != key:
        return None
    tensors = load_tensors(folder / CHECKPOINT, error)
    device = next(model.parameters()).device
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    except RuntimeError as exc:
        raise error(f"checkpoint {folder / CHECKPOINT} does not fit this model ({str(exc)[:80]})", hint="run with --force") from None
    state: dict[int, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, field = name.split(".", 2)
            state.setdefault(int(idx), {})[field] = value.to(device) if value.dim() else value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    if "rng.cpu" in tensors:
        torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta

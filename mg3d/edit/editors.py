"""Editors: (image, conditioning image, prompt) -> edited image.

``InstructPixPix`` is the default: InstructPix2Pix (Brooks et al. 2023) run the way Instruct-NeRF2NeRF
runs it. The image to edit (a render of the radiance field) is encoded and partly noised, and the
original photo conditions every denoising step:

    eps = eps(z, photo, "") + s_text (eps(z, photo, prompt) - eps(z, photo, "")) + s_image (eps(z, photo, "") - eps(z, 0, ""))

This runs for about 20 DDIM steps from a noise level drawn between 2% and 98%. ``ColorShift`` is a
deterministic editor: a fixed colour transform of the photo. The tests use it to check the 3D
machinery, because it says exactly what every view should look like after the edit.

    editor = load_editor("timbrooks/instruct-pix2pix", device="cuda")     # or a local diffusers folder
    edited = editor.edit(render, photo, "Turn her into a Van Gogh painting", noise=(0.02, 0.98))
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from mg3d.errors import Mg3dError

DEFAULT_MODEL = "timbrooks/instruct-pix2pix"
BUILTIN_COLOR = "builtin:color"
#: InstructPix2Pix's architecture with random weights (``full``: the real size, for timing; ``tiny``: tests).
BUILTIN_RANDOM = ("builtin:random-full", "builtin:random-tiny")
#: The diffusers sub-folders InstructPix2Pix needs, and the file in each that says it is complete.
COMPONENTS = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json", "tokenizer": None, "scheduler": "scheduler_config.json"}
_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors", "model.safetensors", "model.fp16.safetensors",
            "diffusion_pytorch_model.bin", "pytorch_model.bin", "diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
_HOW = (
    "download the weights on a machine with internet (huggingface-cli download timbrooks/instruct-pix2pix, or "
    "StableDiffusionInstructPix2PixPipeline.from_pretrained(...).save_pretrained(FOLDER)), copy them here and pass "
    "--edit-model FOLDER, or set HF_HOME to a Hugging Face cache that holds them; --no-edit skips the edit"
)


class EditError(Mg3dError):
    """The edit cannot run: no editor weights, an empty prompt, out of memory, or a mixed-up resume."""


class Editor(Protocol):
    """Edits a batch of images. ``image`` and ``condition`` are [B, H, W, 3] in [0, 1] on any device;
    the result has the same shape and is on the same device as ``image``."""

    name: str

    def edit(self, image: Tensor, condition: Tensor, prompt: str, noise: tuple[float, float] = (0.02, 0.98),
             generator: torch.Generator | None = None) -> Tensor: ...


@dataclass
class ColorShift:
    """A deterministic editor: rotates the colour channels and dims them (white stays a light grey).

    It ignores the prompt and the render and transforms the photo, so an edited scene must look like
    the transform of the original scene from every view, including the views that were never edited.
    """

    name: str = BUILTIN_COLOR

    @staticmethod
    def transform(rgb: Tensor) -> Tensor:  # [..., 3] in [0, 1]
        return 0.1 + 0.8 * rgb[..., [2, 0, 1]]

    def edit(self, image: Tensor, condition: Tensor, prompt: str, noise: tuple[float, float] = (0.02, 0.98),
             generator: torch.Generator | None = None) -> Tensor:
        return self.transform(condition.to(image.device, torch.float32))


class InstructPixPix:
    """InstructPix2Pix through diffusers components (UNet, VAE, CLIP text encoder, tokenizer, DDIM).

    ``resolution`` caps the long side the diffusion runs at (it needs a multiple of 64 at full size);
    images are resized there and back. ``offload`` keeps the models in CPU memory and moves each to the
    GPU only while it runs; ``attention_slicing`` trades speed for memory in the UNet's attention.
    """

    def __init__(self, unet: Any, vae: Any, text_encoder: Any, tokenizer: Any, scheduler: Any, device: torch.device,
                 dtype: torch.dtype, name: str = DEFAULT_MODEL, resolution: int = 512, steps: int = 20,
                 guidance_scale: float = 7.5, image_guidance_scale: float = 1.5, offload: bool = False,
                 attention_slicing: bool = False) -> None:
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.name, self.device, self.dtype, self.offload = name, device, dtype, offload
        self.resolution, self.steps = resolution, steps
        self.guidance_scale, self.image_guidance_scale = guidance_scale, image_guidance_scale
        self.alphas = scheduler.alphas_cumprod.to(torch.float32)
        self.final_alpha = float(getattr(scheduler, "final_alpha_cumprod", torch.tensor(1.0)))
        self.train_steps = int(scheduler.config.num_train_timesteps)
        self.steps_offset = int(scheduler.config.get("steps_offset", 0))
        self.prediction = scheduler.config.get("prediction_type", "epsilon")
        self.latent_scale = float(vae.config.get("scaling_factor", 0.18215))
        self.multiple = 2 ** (len(vae.config.block_out_channels) - 1) * 2 ** (len(unet.config.down_block_types) - 1)
        self._embeddings: dict[str, Tensor] = {}
        for model in (unet, vae, text_encoder):
            model.requires_grad_(False).eval()
            model.to(device="cpu" if offload else device, dtype=dtype)
        if attention_slicing:
            unet.set_attention_slice("auto")

    # ---- pieces -------------------------------------------------------------------------------------
    def _on_device(self, model: Any) -> Any:
        if self.offload:
            model.to(self.device)
        return model

    def _off_device(self, model: Any) -> None:
        if self.offload:
            model.to("cpu")

    @torch.no_grad()
    def embed(self, prompt: str) -> Tensor:
        """[3, L, D]: the prompt, then the empty prompt twice (text, image and unconditional guidance)."""
        if prompt not in self._embeddings:
            tokens = self.tokenizer([prompt, ""], padding="max_length", max_length=self.tokenizer.model_max_length,
                                    truncation=True, return_tensors="pt").input_ids
            encoder = self._on_device(self.text_encoder)
            cond, uncond = encoder(tokens.to(self.device))[0].to(self.dtype).chunk(2)
            self._off_device(self.text_encoder)
            self._embeddings[prompt] = torch.cat([cond, uncond, uncond])
        return self._embeddings[prompt]

    def size_for(self, height: int, width: int) -> tuple[int, int]:
        """The size the diffusion runs at: long side at most ``resolution``, both sides multiples of ``multiple``."""
        scale = min(1.0, self.resolution / max(height, width))
        m = self.multiple
        return max(m, int(round(height * scale / m)) * m), max(m, int(round(width * scale / m)) * m)

    def timesteps(self, t_max: int) -> list[int]:
        """DDIM timesteps from ``t_max`` down, ``steps`` of them spaced t_max // steps apart (as IN2N does
        by shrinking the scheduler's training range to ``t_max``)."""
        n = max(1, min(self.steps, t_max))
        ratio = t_max // n
        return [min(i * ratio + self.steps_offset, self.train_steps - 1) for i in range(n - 1, -1, -1)]

    # ---- the edit -----------------------------------------------------------------------------------
    @torch.no_grad()
    def edit(self, image: Tensor, condition: Tensor, prompt: str, noise: tuple[float, float] = (0.02, 0.98),
             generator: torch.Generator | None = None) -> Tensor:
        if not prompt.strip():
            raise EditError("the prompt is empty", hint='say what to change, e.g. --prompt "Turn her into a Van Gogh painting"')
        b, h, w, _ = image.shape
        out_device = image.device
        size = self.size_for(h, w)
        to_model = lambda x: F.interpolate(x.to(self.device, torch.float32).permute(0, 3, 1, 2), size=size, mode="bilinear", antialias=True, align_corners=False)  # noqa: E731
        x, c = to_model(image) * 2 - 1, to_model(condition) * 2 - 1
        embeddings = self.embed(prompt).repeat_interleave(b, 0)  # [3B, L, D]: text x B, empty x B, empty x B
        t_lo, t_hi = (int(self.train_steps * f) for f in noise)
        t_max = int(torch.randint(t_lo, t_hi + 1, (1,), generator=generator).item())
        steps = self.timesteps(t_max)
        try:
            vae = self._on_device(self.vae)
            latents = vae.encode(x.to(self.dtype)).latent_dist.sample(generator=_device_generator(generator, self.device)) * self.latent_scale
            cond = vae.encode(c.to(self.dtype)).latent_dist.mode()
            self._off_device(self.vae)
            cond = torch.cat([cond, cond, torch.zeros_like(cond)])
            eps = torch.randn(latents.shape, generator=_device_generator(generator, self.device), device=self.device, dtype=latents.dtype)
            a0 = self.alphas[steps[0]]
            latents = (a0.sqrt() * latents.float() + (1 - a0).sqrt() * eps.float()).to(self.dtype)
            unet = self._on_device(self.unet)
            for i, t in enumerate(steps):
                model_in = torch.cat([torch.cat([latents] * 3), cond], dim=1)
                pred = unet(model_in, t, encoder_hidden_states=embeddings).sample.float()
                p_text, p_image, p_none = pred.chunk(3)
                pred = p_none + self.guidance_scale * (p_text - p_image) + self.image_guidance_scale * (p_image - p_none)
                latents = self._ddim_step(latents.float(), pred, t, steps[i + 1] if i + 1 < len(steps) else -1).to(self.dtype)
            self._off_device(self.unet)
            vae = self._on_device(self.vae)
            decoded = vae.decode(latents / self.latent_scale).sample.float()
            self._off_device(self.vae)
        except torch.cuda.OutOfMemoryError:
            raise EditError(
                f"the GPU ran out of memory editing {b} view(s) at {size[1]}x{size[0]}",
                hint="lower --edit-resolution or --edit-batch, or use --offload / --attention-slicing (fp16 is the CUDA default)",
            ) from None
        if not torch.isfinite(decoded).all():
            raise EditError("the editor produced NaN or infinite pixels", hint="use --edit-dtype float32 (fp16 overflowed) or check the weights")
        out = F.interpolate((decoded / 2 + 0.5).clamp(0, 1), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        return out.clamp(0, 1).permute(0, 2, 3, 1).to(out_device)

    def _ddim_step(self, x: Tensor, pred: Tensor, t: int, t_prev: int) -> Tensor:
        """One deterministic DDIM step (eta 0) from t to t_prev (-1: to the clean image)."""
        a_t = self.alphas[t]
        a_prev = self.alphas[t_prev] if t_prev >= 0 else torch.tensor(self.final_alpha)
        if self.prediction == "v_prediction":
            x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * pred
            pred = a_t.sqrt() * pred + (1 - a_t).sqrt() * x
        else:
            x0 = (x - (1 - a_t).sqrt() * pred) / a_t.sqrt()
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * pred


def _device_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """A generator on ``device`` seeded from ``generator`` (CUDA sampling needs a CUDA generator)."""
    if generator is None:
        return None
    seeded = torch.Generator(device=device)
    seeded.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator).item()))
    return seeded


# ---- loading -------------------------------------------------------------------------------------------
def check_weights(source: str, download: bool = True) -> Path:
    """The local diffusers folder of ``source``, checked complete.

    ``source`` is a folder, or a model id: looked up in the local Hugging Face cache first, then (when
    ``download`` and the hub answers) fetched, only the parts InstructPix2Pix needs. Raises EditError
    naming what is missing and how to provide it; the edit stage calls this before any training.
    """
    folder = Path(source).expanduser()
    if not folder.is_dir():
        if source.startswith((".", "/", "~")) or Path(source).suffix or source.count("/") != 1:
            raise EditError(f"the edit model folder {source} does not exist", hint=_HOW)
        folder = _snapshot(source, download)
        if folder is None:
            where = "in the local Hugging Face cache" + (" or on the hub (it cannot be reached)" if download else "")
            raise EditError(f"the InstructPix2Pix weights {source!r} are not {where}", hint=_HOW)
    if not (folder / "model_index.json").is_file():
        raise EditError(f"{folder} is not a diffusers pipeline folder (no model_index.json)", hint=_HOW)
    missing = []
    for part, config in COMPONENTS.items():
        sub = folder / part
        if not sub.is_dir() or (config and not (sub / config).is_file()):
            missing.append(part)
        elif part not in ("tokenizer", "scheduler") and not any((sub / f).is_file() for f in _WEIGHTS):
            missing.append(f"{part} weights")
        elif part == "tokenizer" and not ((sub / "tokenizer.json").is_file() or (sub / "vocab.json").is_file()):
            missing.append("tokenizer files")
    if missing:
        raise EditError(f"the InstructPix2Pix weights in {folder} are incomplete (missing: {', '.join(missing)})", hint=_HOW)
    return folder


#: What a hub download fetches: configs, tokenizer files and one safetensors file per model.
_HUB_FILES = ["model_index.json", "*/*.json", "*/*.txt", "unet/diffusion_pytorch_model.safetensors",
              "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"]


def _snapshot(model_id: str, download: bool) -> Path | None:
    """The snapshot of ``model_id`` in the Hugging Face cache, else downloaded (``download``), else None."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    for local_only in (True, False) if download else (True,):
        try:
            return Path(snapshot_download(model_id, allow_patterns=_HUB_FILES, local_files_only=local_only))
        except Exception:  # noqa: BLE001 - not cached, no network, bad id or a broken cache all mean "not here"
            continue
    return None


def quiet_diffusers() -> None:
    """diffusers' and transformers' own progress bars and advice would break mg3d's rich display."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_editor(source: str, device: str | torch.device = "cpu", dtype: str = "auto", resolution: int = 512, steps: int = 20,
                guidance_scale: float = 7.5, image_guidance_scale: float = 1.5, offload: bool = False,
                attention_slicing: bool = False) -> Editor:
    """The editor ``source`` names: a local diffusers folder, a model id (cache, then hub), ``builtin:color``,
    or ``builtin:random-full`` / ``builtin:random-tiny`` (random weights: timing and tests only)."""
    if source == BUILTIN_COLOR:
        return ColorShift()
    if source in BUILTIN_RANDOM:  # same compute and memory as the real weights; the pictures mean nothing
        from mg3d.edit.random_models import random_editor

        return random_editor(source.rsplit("-", 1)[1], device=device, dtype=dtype, resolution=resolution, steps=steps,
                             guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale, offload=offload,
                             attention_slicing=attention_slicing)
    try:
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError:
        raise EditError("diffusers and transformers are not installed", hint="pip install 'mg3d[edit]'") from None
    folder = check_weights(source)
    quiet_diffusers()
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        parts = dict(
            unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch_dtype),
            vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch_dtype),
            text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=torch_dtype),
            tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            scheduler=DDIMScheduler.from_pretrained(folder, subfolder="scheduler"),
        )
    except (OSError, ValueError, RuntimeError, json.JSONDecodeError) as exc:
        raise EditError(f"the InstructPix2Pix weights in {folder} could not be loaded ({str(exc).splitlines()[0][:160]})", hint=_HOW) from None
    if parts["unet"].config.in_channels != 8:
        raise EditError(f"{folder} is not an InstructPix2Pix model (its UNet takes {parts['unet'].config.in_channels} channels, not 8)", hint=_HOW)
    return InstructPixPix(**parts, device=device, dtype=torch_dtype, name=source, resolution=resolution, steps=steps,
                          guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale, offload=offload,
                          attention_slicing=attention_slicing)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]


def noise_range(lower: float, upper: float, round_: int, rounds: int) -> tuple[float, float]:
    """Noise levels for one editing round: IN2N's [lower, upper] in the first, then the upper bound
    comes down to the middle of the range by the last round, so that later rounds refine what the
    scene already agrees on instead of redrawing it."""
    if rounds <= 1:
        return lower, upper
    top = upper - 0.5 * (upper - lower) * round_ / (rounds - 1)
    return lower, max(lower, top)


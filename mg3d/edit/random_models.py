"""InstructPix2Pix with random weights: a tiny one for offline tests, the full-size one for timing.

No weights can be downloaded here. A model built from the published configs with random weights costs
the same compute and memory as the real one, so timings and memory figures carry over; its pictures
mean nothing. The tokenizer is a byte-level CLIP BPE tokenizer with no merges, built locally: it
encodes any text into the usual 77 tokens.

    save_pipeline("tests/ip2p-tiny", size="tiny")        # a diffusers folder that load_editor reads
    editor = random_editor("full", device="cuda")         # the full-size architecture, for benchmarks
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: Stable Diffusion 1.5 / InstructPix2Pix (timbrooks/instruct-pix2pix) architecture.
FULL = {
    "unet": dict(
        sample_size=64, in_channels=8, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    ),
    "vae": dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215,
    ),
    "text": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768),
}
#: The same design at toy scale: runs the real code path on CPU in a second.
TINY = {
    "unet": dict(
        sample_size=8, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32,
    ),
    "vae": dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32, scaling_factor=0.18215,
    ),
    "text": dict(vocab_size=600, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32),
}
SIZES = {"tiny": TINY, "full": FULL}
#: DDIM with Stable Diffusion's noise schedule, as Instruct-NeRF2NeRF loads it.
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def byte_tokenizer() -> Any:
    """A CLIP tokenizer over single bytes (no merges): 512 byte tokens plus start and end."""
    from transformers import CLIPTokenizer

    # GPT-2 / CLIP byte-to-character table: printable bytes stand for themselves, the rest map past 255
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    extra = iter(range(256, 512))
    chars = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build(size: str = "tiny", seed: int = 0, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The five components with random weights (created directly on ``device``)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from mg3d.edit.editors import quiet_diffusers

    quiet_diffusers()
    config = SIZES[size]
    torch.manual_seed(seed)
    tokenizer = byte_tokenizer()
    with torch.device(device):
        text_config = CLIPTextConfig(**config["text"], bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1)
        parts = dict(unet=UNet2DConditionModel(**config["unet"]), vae=AutoencoderKL(**config["vae"]), text_encoder=CLIPTextModel(text_config))
    return dict(**parts, tokenizer=tokenizer, scheduler=DDIMScheduler(**SCHEDULER))


def save_pipeline(folder: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a complete diffusers InstructPix2Pix folder with random weights (what ``--edit-model`` takes)."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = StableDiffusionInstructPix2PixPipeline(**build(size, seed), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return Path(folder)


def random_editor(size: str = "full", device: str | torch.device = "cuda", dtype: str = "auto", **options: Any) -> Any:
    """An ``InstructPixPix`` editor with random weights: the real edit code, for timing and memory."""
    from mg3d.edit.editors import InstructPixPix, resolve_dtype

    device = torch.device(device)
    return InstructPixPix(**build(size, device=device), device=device, dtype=resolve_dtype(dtype, device), name=f"builtin:random-{size}", **options)

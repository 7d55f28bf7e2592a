"""The engine: owns the loaded model components and turns requests into latents and images.

Components load on first use, so a run that never needs the text encoder or the VAE never loads it.
The engine never prints and never writes output files; the CLI does that.
"""

import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import QimgError, UsageError
from .model.text import TextEncoder
from .model.transformer import QwenImageTransformer, TransformerConfig, patchify, unpatchify
from .model.vae import QwenImageVAE, VAEConfig
from .sampling import ScheduleConfig, euler, flow_sigmas, true_cfg
from .weights import load_module, read_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MULTIPLE = 16  # VAE 8x downsampling times the transformer's 2x2 patches


@dataclass(frozen=True)
class Defaults:
    """Sampling defaults: the reference pipeline's, unless the model folder's `qimg.json` says otherwise."""

    width: int = 1024
    height: int = 1024
    steps: int = 50
    cfg: float = 4.0
    negative_prompt: str = " "

    @classmethod
    def from_folder(cls, folder: Path) -> "Defaults":
        file = folder / "qimg.json"
        if not file.is_file():
            return cls()
        d = json.loads(file.read_text())
        names = {f.name for f in fields(cls)}
        unknown = sorted(d.keys() - names)
        if unknown:
            raise QimgError(f"{file}: unknown keys {', '.join(unknown)} (allowed: {', '.join(sorted(names))})")
        return cls(**d)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name!r} is not supported (auto, cpu, cuda, cuda:N, mps)")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise UsageError(f"--dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def check_size(width: int, height: int) -> None:
    for name, v in (("width", width), ("height", height)):
        if v <= 0 or v % MULTIPLE:
            raise UsageError(f"{name} {v} must be a positive multiple of {MULTIPLE}")


def to_image(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] to an 8-bit image, rounding like the reference's postprocess."""
    x = (x.float() * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray((x * 255).round().astype(np.uint8))


class Engine:
    def __init__(self, folder: Path, device: str = "auto", dtype: str = "auto"):
        self.folder = folder
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.defaults = Defaults.from_folder(folder)
        try:
            self.schedule = ScheduleConfig.from_dict(read_config(folder / "scheduler", "scheduler_config.json"))
        except ValueError as e:
            raise QimgError(f"{folder / 'scheduler'}: {e}") from None
        self._text = self._transformer = self._vae = None

    @property
    def text(self) -> TextEncoder:
        if self._text is None:
            self._text = TextEncoder(self.folder, self.dtype, self.device)
        return self._text

    @property
    def transformer(self) -> QwenImageTransformer:
        if self._transformer is None:
            cfg = self._config(TransformerConfig, "transformer")
            self._transformer = load_module(lambda: QwenImageTransformer(cfg), self.folder / "transformer",
                                            self.dtype, self.device)
        return self._transformer

    @property
    def vae(self) -> QwenImageVAE:
        if self._vae is None:
            cfg = self._config(VAEConfig, "vae")
            self._vae = load_module(lambda: QwenImageVAE(cfg), self.folder / "vae", self.dtype, self.device)
        return self._vae

    def _config(self, cls, component: str):
        try:
            return cls.from_dict(read_config(self.folder / component))
        except (ValueError, TypeError) as e:
            raise QimgError(f"{self.folder / component / 'config.json'}: {e}") from None

    def encode_prompts(self, prompts: list[str]) -> list[torch.Tensor]:
        # One call per prompt, as the reference does, so padding never changes a prompt's embedding.
        return [self.text.encode([p])[0] for p in prompts]

    @torch.no_grad()
    def generate_latent(self, prompt: str, negative_prompt: str, width: int, height: int, steps: int,
                        cfg: float, seed: int, callback=None) -> torch.Tensor:
        """Sample a normalized latent (1, 16, height/8, width/8) for one prompt."""
        check_size(width, height)
        guided = cfg > 1
        embeds = self.encode_prompts([prompt, negative_prompt] if guided else [prompt])
        h, w = height // 8, width // 8
        # The reference draws noise on a CPU generator in the model dtype, shaped (B, 1, C, H, W).
        noise = torch.randn((1, 16, h, w), generator=torch.Generator("cpu").manual_seed(seed), dtype=self.dtype)
        x = patchify(noise.float().to(self.device))
        sigmas = flow_sigmas(steps, x.shape[1], self.schedule).to(self.device)

        def velocity_for(txt: torch.Tensor):
            txt = txt[None].to(self.device, self.dtype)

            def velocity(x, sigma):
                # The reference feeds timestep = sigma * 1000 in the model dtype, divided back by 1000.
                t = (sigma * 1000).to(self.dtype).expand(x.shape[0]) / 1000
                return self.transformer(x.to(self.dtype), txt, None, t, (h // 2, w // 2)).float()

            return velocity

        velocity = velocity_for(embeds[0])
        if guided:
            velocity = true_cfg(velocity, velocity_for(embeds[1]), cfg)
        x = euler(velocity, x, sigmas, callback)
        return unpatchify(x, h, w)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> Image.Image:
        return to_image(self.vae.decode(latent.to(self.device, self.dtype))[0])

    def generate(self, prompt: str, negative_prompt: str, width: int, height: int, steps: int, cfg: float,
                 seed: int, callback=None) -> Image.Image:
        return self.decode(self.generate_latent(prompt, negative_prompt, width, height, steps, cfg, seed, callback))

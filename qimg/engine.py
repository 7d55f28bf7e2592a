"""The engine: owns the loaded model components and turns requests into latents and images.

Components load on first use, so a run that never needs the text encoder or the VAE never loads it.
The engine never prints and never writes output files; the CLI does that.
"""

import gc
import json
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import QimgError, UsageError
from .masks import composite, crop, crop_box, latent_mask, pad_to_multiple, resize_mask, work_size
from .model.offload import place_for_streaming
from .model.text import TextEncoder, pad_batch
from .model.tiling import tiled_decode
from .model.transformer import QwenImageTransformer, TransformerConfig, patchify, unpatchify
from .model.vae import QwenImageVAE, VAEConfig
from .sampling import ScheduleConfig, euler, flow_sigmas, first_step, keep_known, noised, true_cfg
from .weights import load_module, read_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MULTIPLE = 16  # VAE 8x downsampling times the transformer's 2x2 patches
OFFLOAD = ("none", "model", "blocks")
ATTENTION = ("auto", "math", "flash", "efficient", "cudnn")  # auto: let PyTorch's SDPA pick
TILING = ("auto", "on", "off")
TILE_ABOVE = 2048 * 2048  # decoded pixels above which "auto" decodes the VAE in tiles
TILE, TILE_OVERLAP = 64, 8  # in latent pixels: 512 px tiles sharing 64 px


@dataclass(frozen=True)
class Defaults:
    """Sampling defaults: the reference pipeline's, unless the model folder's `qimg.json` says otherwise."""

    width: int = 1024
    height: int = 1024
    steps: int = 50
    cfg: float = 4.0
    negative_prompt: str = " "
    max_pixels: int = 1024 * 1024  # the working area edits are scaled to (Qwen-Image's ~1 megapixel)

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


@dataclass(frozen=True)
class Edit:
    image: np.ndarray  # (H, W, 3) uint8, the input's size
    box: tuple[int, int, int, int]  # the region the model saw, (x0, y0, x1, y1) in input pixels
    work_size: tuple[int, int]  # (W, H) the model ran at


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


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] to (H, W, 3) uint8, rounding like the reference's postprocess."""
    x = (x.float() * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return (x * 255).round().astype(np.uint8)


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise UsageError(f"{option} {value!r} is not one of {', '.join(choices)}")
    return value


class Engine:
    """offload: none keeps every component on the device; model loads text encoder, transformer and VAE
    one at a time and frees each after use; blocks keeps the transformer's blocks in CPU memory and streams
    them to the device. compile: torch.compile the transformer blocks. attention: the SDPA backend.
    vae_tiling: decode in tiles (auto: above TILE_ABOVE pixels)."""

    def __init__(self, folder: Path, device: str = "auto", dtype: str = "auto", offload: str = "none",
                 compile: bool = False, attention: str = "auto", vae_tiling: str = "auto"):
        self.folder = folder
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.offload = check_choice("--offload", offload, OFFLOAD)
        self.attention = check_choice("--attention", attention, ATTENTION)
        self.vae_tiling = check_choice("--vae-tiling", vae_tiling, TILING)
        if compile and offload == "blocks":
            raise UsageError("--compile does not combine with --offload blocks (the blocks run from streamed copies)")
        self.compile = compile
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
            streamed = self.offload == "blocks"
            transformer = load_module(lambda: QwenImageTransformer(cfg), self.folder / "transformer", self.dtype,
                                      torch.device("cpu") if streamed else self.device)
            if streamed:
                place_for_streaming(transformer, self.device)
            if self.compile:
                transformer.compile_blocks()
            self._transformer = transformer
        return self._transformer

    @property
    def vae(self) -> QwenImageVAE:
        if self._vae is None:
            cfg = self._config(VAEConfig, "vae")
            self._vae = load_module(lambda: QwenImageVAE(cfg), self.folder / "vae", self.dtype, self.device)
        return self._vae

    def _release(self, component: str) -> None:
        """With offload=model, free a component once its part of the job is done; it reloads when next needed."""
        if self.offload != "model":
            return
        setattr(self, f"_{component}", None)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _attention_backend(self):
        if self.attention == "auto":
            return nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        names = {"math": "MATH", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION"}
        return sdpa_kernel(getattr(SDPBackend, names[self.attention]))

    def _config(self, cls, component: str):
        try:
            return cls.from_dict(read_config(self.folder / component))
        except (ValueError, TypeError) as e:
            raise QimgError(f"{self.folder / component / 'config.json'}: {e}") from None

    def encode_prompts(self, prompts: list[str]) -> list[torch.Tensor]:
        # One call per prompt, as the reference does, so padding never changes a prompt's embedding.
        embeds = [self.text.encode([p])[0] for p in prompts]
        self._release("text")
        return embeds

    def _noise(self, seed: int, h: int, w: int) -> torch.Tensor:
        # The reference draws noise on a CPU generator in the model dtype, shaped (B, 1, C, H, W).
        noise = torch.randn((1, 16, h, w), generator=torch.Generator("cpu").manual_seed(seed), dtype=self.dtype)
        return noise.float().to(self.device)

    def _velocity(self, prompt: str, negative_prompt: str, cfg: float, grid: tuple[int, int], keep=None):
        """The guided velocity field for one prompt over a latent grid (h, w) in patches.

        With guidance, the conditional and unconditional passes run as one batch of 2 (the shorter prompt
        zero-padded and its padding masked as keys), so a step reads the transformer's weights once."""
        guided = cfg > 1
        embeds = self.encode_prompts([prompt, negative_prompt] if guided else [prompt])
        txt, txt_mask = pad_batch([e.to(self.device, self.dtype) for e in embeds])

        def velocity(x, sigma):
            x = x.expand(len(embeds), -1, -1).to(self.dtype)
            # The reference feeds timestep = sigma * 1000 in the model dtype, divided back by 1000.
            t = (sigma * 1000).to(self.dtype).expand(len(embeds)) / 1000
            with self._attention_backend():
                return self.transformer(x, txt, txt_mask, t, grid, keep).float()

        return true_cfg(velocity, cfg) if guided else velocity

    @torch.no_grad()
    def generate_latent(self, prompt: str, negative_prompt: str, width: int, height: int, steps: int,
                        cfg: float, seed: int, callback=None) -> torch.Tensor:
        """Sample a normalized latent (1, 16, height/8, width/8) for one prompt."""
        check_size(width, height)
        h, w = height // 8, width // 8
        x = patchify(self._noise(seed, h, w))
        sigmas = flow_sigmas(steps, x.shape[1], self.schedule).to(self.device)
        x = euler(self._velocity(prompt, negative_prompt, cfg, (h // 2, w // 2)), x, sigmas, callback)
        self._release("transformer")
        return unpatchify(x, h, w)

    @torch.no_grad()
    def inpaint_latent(self, z0: torch.Tensor, mask: torch.Tensor, prompt: str, negative_prompt: str, steps: int,
                       cfg: float, seed: int, strength: float = 1.0, attn_mask: bool = False,
                       callback=None) -> torch.Tensor:
        """Regenerate latent z0 (1, 16, h, w) where mask (h, w) in [0, 1] says so; the rest ends exactly z0."""
        h, w = z0.shape[-2:]
        x0, noise = patchify(z0.float().to(self.device)), patchify(self._noise(seed, h, w))
        m = patchify(mask.float().to(self.device)[None, None].expand(1, 16, h, w))
        sigmas = flow_sigmas(steps, x0.shape[1], self.schedule)[first_step(steps, strength):].to(self.device)
        if len(sigmas) < 2:
            raise UsageError(f"--strength {strength} with {steps} steps runs no step; raise one of them")
        keep = (m[0] == 0).all(-1) if attn_mask else None  # (L,) tokens wholly outside the mask
        velocity = self._velocity(prompt, negative_prompt, cfg, (h // 2, w // 2), keep)
        x = euler(velocity, noised(x0, noise, sigmas[0]), sigmas, callback, keep_known(x0, noise, m, len(sigmas) - 1))
        self._release("transformer")
        return unpatchify(x, h, w)

    @torch.no_grad()
    def encode(self, image: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3), sides multiples of 16, to a normalized latent (1, 16, H/8, W/8)."""
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255 * 2 - 1  # the reference's preprocess
        z = self.vae.encode(x.to(self.device, self.dtype)).float()
        self._release("vae")
        return z

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> np.ndarray:
        z = latent.to(self.device, self.dtype)
        pixels = 64 * z.shape[-2] * z.shape[-1]
        if self.vae_tiling == "on" or (self.vae_tiling == "auto" and pixels > TILE_ABOVE):
            x = tiled_decode(self.vae.decode, z, TILE, TILE_OVERLAP)
        else:
            x = self.vae.decode(z)
        self._release("vae")
        return to_uint8(x[0])

    def generate(self, prompt: str, negative_prompt: str, width: int, height: int, steps: int, cfg: float,
                 seed: int, callback=None) -> np.ndarray:
        return self.decode(self.generate_latent(prompt, negative_prompt, width, height, steps, cfg, seed, callback))

    def inpaint(self, image: np.ndarray, mask: np.ndarray, prompt: str, negative_prompt: str, steps: int,
                cfg: float, seed: int, strength: float = 1.0, attn_mask: bool = False, context: int = 64,
                callback=None) -> "Edit":
        """Regenerate image (H, W, 3) uint8 where mask (H, W) in [0, 1] says so. The result has the input's
        size and is byte-identical to it wherever the mask is 0; soft mask values blend.

        An image larger than the model's working area is not shrunk as a whole: the model sees the mask's
        bounding box plus `context` pixels around it, scaled to the working area, and that is pasted back."""
        height, width = mask.shape
        max_pixels = self.defaults.max_pixels
        x0, y0, x1, y1 = crop_box(mask, context, max_pixels)
        region, region_mask = image[y0:y1, x0:x1], mask[y0:y1, x0:x1]
        resized = (x1 - x0) * (y1 - y0) != width * height or width * height > max_pixels
        if resized:
            size = work_size(x1 - x0, y1 - y0, max_pixels)
            work = np.asarray(Image.fromarray(region).resize(size, Image.LANCZOS))
            work_mask = resize_mask(region_mask, size)
        else:
            work, work_mask, _ = pad_to_multiple(region, region_mask)
        m = torch.from_numpy(latent_mask(work_mask, 8))
        latent = self.inpaint_latent(self.encode(work), m, prompt, negative_prompt, steps, cfg, seed, strength,
                                     attn_mask, callback)
        out = self.decode(latent)
        if resized:
            out = np.asarray(Image.fromarray(out).resize((x1 - x0, y1 - y0), Image.LANCZOS))
        generated = image.copy()
        generated[y0:y1, x0:x1] = crop(out, (x1 - x0, y1 - y0))
        return Edit(composite(image, generated, mask), (x0, y0, x1, y1), work.shape[1::-1])

"""The engine: owns the loaded model components and turns requests into latents and images.

Components load on first use, so a run that never needs the text encoder or the VAE never loads it; with a
cache (a `Store`), prompt embeddings and the latents of earlier outputs are looked up first, so a run whose
prompts and input are all known loads neither the text encoder nor the VAE's encoder.
The engine never prints and never writes output files; the CLI does that.
"""

import gc
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import lora
from .adapters import apply_adapters, targets
from .cache import Store, fingerprint, pixel_key, prompt_key
from .canvas import Canvas, edited, place, to_window, window_size
from .errors import QimgError, UsageError
from .masks import composite, crop_box, latent_mask, pad_to_multiple, resize_mask, work_size
from .memory import activation_bytes, check_weights, device_bytes, gigabytes, resident_bytes
from .model.offload import place_for_streaming
from .model.qwen2 import Qwen2Config
from .model.text import TextEncoder, pad_batch
from .model.tiling import tiled_decode
from .model.transformer import QwenImageTransformer, TransformerConfig, patchify, unpatchify
from .model.vae import QwenImageVAE, VAEConfig
from .preview import mapped, watching
from .sampling import (Reuse, ScheduleConfig, Shortcuts, cfg_until, euler, first_step, flow_sigmas, keep_known, noised,
                       reusing, shifted, true_cfg)
from .transformer_weights import Source, load_transformer, provenance, tensor_sizes
from .weights import load_module, model_kind, read_config, read_json_object

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MULTIPLE = 16  # VAE 8x downsampling times the transformer's 2x2 patches
VAE_PARTS = {"encoder": ("encoder.", "quant_conv."), "decoder": ("decoder.", "post_quant_conv.")}  # key prefixes
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
    edit_area: int = 1024 * 1024  # Edit models: the area pictures are resized to for the VAE (the reference's)
    vision_area: int = 384 * 384  # Edit-2509/2511: the area pictures are resized to for the vision tower

    @classmethod
    def from_folder(cls, folder: Path) -> "Defaults":
        file = folder / "qimg.json"
        if not file.is_file():
            return cls()
        d = read_json_object(file)
        names = {f.name for f in fields(cls)}
        unknown = sorted(d.keys() - names)
        if unknown:
            raise QimgError(f"{file}: unknown keys {', '.join(unknown)} (allowed: {', '.join(sorted(names))})")
        return cls(**d)


@dataclass(frozen=True)
class Output:
    image: np.ndarray  # (H, W, 3) uint8
    # (1, 16, h, w) normalized: the latent the image came from, when it covers the image 1:1 (padded right and
    # bottom to a multiple of 16); None when the model ran on a crop or a resized copy
    latent: torch.Tensor | None
    latent_cache: str  # "hit": the input's latent came from the cache, the VAE encoder did not run; "miss"; "off"
    prompt_cache: str  # "hit": every prompt embedding came from the cache, the text encoder did not run; "miss"; "off"


@dataclass(frozen=True)
class Edit(Output):
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


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] to (H, W, 3) uint8, rounding like the reference's postprocess."""
    x = (x.float() * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return (x * 255).round().astype(np.uint8)


def finite(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t, unless it holds NaN or infinity (float16 overflowing, most often): then a QimgError, before anything
    of it is decoded, saved or cached."""
    if not torch.isfinite(t).all():
        name = str(dtype).removeprefix("torch.")
        others = " or ".join(d for d in ("bfloat16", "float32") if d != name)
        raise QimgError(f"the model produced non-finite values (NaN/inf) in {name}; use --dtype {others}")
    return t


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise UsageError(f"{option} {value!r} is not one of {', '.join(choices)}")
    return value


class Engine:
    """offload: none keeps every component on the device; model loads text encoder, transformer and VAE
    (encoder and decoder apart) one at a time and frees each after use; blocks keeps the transformer's blocks
    in CPU memory and streams them to the device. compile: torch.compile the transformer blocks. attention:
    the SDPA backend. vae_tiling: decode in tiles (auto: above TILE_ABOVE pixels). loras: lora.LoraSpec, read
    and checked against the transformer's layers here, fused into its weights when it loads (a side branch on
    packed layers). transformer, dequantize, quantize: where the transformer's weights come from and whether
    they stay packed (transformer_weights.py)."""

    def __init__(self, folder: Path, device: str = "auto", dtype: str = "auto", cache: Store | None = None,
                 offload: str = "none", compile: bool = False, attention: str = "auto", vae_tiling: str = "auto",
                 loras: tuple = (), transformer: Path | None = None, dequantize: bool | None = None,
                 quantize: str = "none"):
        self.folder = folder
        self.cache = cache
        self.prompts_encoded = 0  # prompts the text encoder has run on, cache misses included
        self.calls = 0  # transformer samples run (a CFG pair counts 2): a job's share is the difference
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.offload = check_choice("--offload", offload, OFFLOAD)
        self.attention = check_choice("--attention", attention, ATTENTION)
        self.vae_tiling = check_choice("--vae-tiling", vae_tiling, TILING)
        if compile and offload == "blocks":
            raise UsageError("--compile does not combine with --offload blocks (the blocks run from streamed copies)")
        self.compile = compile
        self.source = Source(Path(transformer) if transformer else None, dequantize, quantize)
        self.defaults = Defaults.from_folder(folder)
        try:
            self.schedule = ScheduleConfig.from_dict(read_config(folder / "scheduler", "scheduler_config.json"))
        except ValueError as e:
            raise QimgError(f"{folder / 'scheduler'}: {e}") from None
        self.loras = tuple(lora.load(spec, self.layers) for spec in loras)
        self._text = self._transformer = None
        self._vae = {}  # part ("encoder", "decoder") -> the VAE with that part's weights loaded

    @property
    def text(self):
        """The TextEncoder, or for an Edit model the InstructEncoder (instruction plus pictures)."""
        if self._text is None:
            if self.kind == "qwen-image":
                self._text = TextEncoder(self.folder, self.dtype, self.device)
            else:
                from .model.instruct_text import InstructEncoder

                self._text = InstructEncoder(self.folder, self.dtype, self.device, plus=self.kind != "edit")
        return self._text

    @cached_property
    def kind(self) -> str:
        """weights.model_kind: "qwen-image", "edit", "edit-2509" or "edit-2511"."""
        return model_kind(self.folder)

    @property
    def transformer(self) -> QwenImageTransformer:
        if self._transformer is None:
            cfg = self._config(TransformerConfig, "transformer")
            streamed = self.offload == "blocks"
            transformer = load_transformer(cfg, self.folder / "transformer", self.source, self.dtype,
                                           torch.device("cpu") if streamed else self.device)
            apply_adapters(transformer, [one.adapters for one in self.loras])
            if streamed:
                place_for_streaming(transformer, self.device)
            if self.compile:
                transformer.compile_blocks()
            self._transformer = transformer
        return self._transformer

    def vae(self, part: str) -> QwenImageVAE:
        """The VAE with only `part`'s weights loaded: a run that finds its input's latent in the cache, or
        generates from noise, never loads the encoder."""
        if part not in self._vae:
            cfg = self._config(VAEConfig, "vae")
            self._vae[part] = load_module(lambda: QwenImageVAE(cfg), self.folder / "vae", self.dtype, self.device,
                                          only=VAE_PARTS[part])
        return self._vae[part]

    @cached_property
    def layers(self) -> dict[str, tuple[int, int]]:
        """The transformer's linear layers, (out, in) by name, from its config alone (built on the meta device)."""
        cfg = self._config(TransformerConfig, "transformer")
        with torch.device("meta"):
            return targets(QwenImageTransformer(cfg))

    @cached_property
    def model_fingerprint(self) -> str:
        """The whole model's identity (weights, configs, tokenizer, a --transformer file, LoRAs), for output
        metadata and caches."""
        model = "-".join(p for p in (fingerprint(self.folder), self.source.fingerprint()) if p)
        return lora.fingerprint(model, self.loras)

    @cached_property
    def transformer_info(self) -> dict | None:
        """Where the transformer's weights came from when not the folder's: file name, sha256, format."""
        return provenance(self.source)

    @cached_property
    def vae_fingerprint(self) -> str:
        return fingerprint(self.folder / "vae")

    @cached_property
    def text_fingerprint(self) -> str:
        # dtype and device too: an embedding computed elsewhere would give a slightly different image
        parts = (fingerprint(self.folder / "text_encoder"), fingerprint(self.folder / "tokenizer"))
        if (self.folder / "processor").is_dir():  # an Edit model's image sizes and vision tokens come from there
            parts += (fingerprint(self.folder / "processor"),)
        return "-".join((*parts, str(self.dtype).removeprefix("torch."), self.device.type))

    @cached_property
    def z_dim(self) -> int:
        """Channels of a latent."""
        return self._config(VAEConfig, "vae").z_dim

    @cached_property
    def text_width(self) -> int:
        """Width of a prompt embedding (the text encoder's hidden size)."""
        if not (self.folder / "text_encoder").is_dir():  # said as the text encoder says it
            raise QimgError(f"{self.folder / 'text_encoder'} is missing: the model folder is incomplete")
        return self._config(Qwen2Config, "text_encoder").hidden_size

    def latent_spec(self, width: int, height: int) -> dict:
        """What a cached latent of an image of width x height pixels (multiples of 16) must be."""
        return {"latent": ("float32", (1, self.z_dim, height // 8, width // 8))}

    def check_size(self, width: int, height: int, encodes: bool = True) -> None:
        """Refuse, before any weights load, a size the model cannot take or the device could not hold.
        encodes: whether the VAE encodes an image of that size too (a generation only decodes, maybe tiled)."""
        for name, v in (("width", width), ("height", height)):
            if v <= 0 or v % MULTIPLE:
                raise UsageError(f"{name} {v} must be a positive multiple of {MULTIPLE}")
        tile = (8 * TILE) ** 2 if not encodes and self.tiled(width, height) else None
        cfg = self._config(TransformerConfig, "transformer")
        need = activation_bytes(width, height, cfg, self._config(VAEConfig, "vae"), self.dtype.itemsize, tile)
        have = device_bytes(self.device)
        if have is not None and need > have:
            raise UsageError(f"{width}x{height} would need about {gigabytes(need)} of {self.device.type} memory "
                             f"besides the weights, and the device has {gigabytes(have)}; use a smaller size")
        check_weights(self.weight_bytes, need, have, self.device.type, (width, height))

    @cached_property
    def weight_bytes(self) -> int:
        """The transformer's weights resident on the device, at their packed sizes (read from the headers)."""
        sizes = tensor_sizes(self._config(TransformerConfig, "transformer"), self.folder / "transformer", self.source,
                             self.dtype, self.device)
        return resident_bytes(sizes, self.offload == "blocks" and self.device.type != "cpu")

    def _release(self, component: str) -> None:
        """With offload=model, free a component ("text", "transformer", or the VAE's "encoder" or "decoder") once
        its part of the job is done; it reloads when next needed."""
        if self.offload != "model":
            return
        if component in VAE_PARTS:
            self._vae.pop(component, None)
        else:
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

    def encode_prompts(self, prompts: list[str], pictures: tuple[np.ndarray, ...] = ()) -> list[torch.Tensor]:
        """One embedding per prompt; with an Edit model, each encoded with the pictures (at the vision size)."""
        embeds = [self._encode_prompt(p, pictures) for p in prompts]
        self._release("text")
        return embeds

    def _encode_prompt(self, prompt: str, pictures: tuple[np.ndarray, ...] = ()) -> torch.Tensor:
        key = prompt_key(self._prompt_text(prompt, len(pictures)), self.text_fingerprint, pictures) if self.cache \
            else None
        spec = {"embed": (str(self.dtype).removeprefix("torch."), (None, self.text_width))}
        entry = self.cache.get("prompt", key, spec) if key else None
        if entry:
            return entry[0]["embed"].to(self.device)
        # One call per prompt, as the reference does, so padding never changes a prompt's embedding.
        if self.kind == "qwen-image":
            embed = finite(self.text.encode([prompt])[0], self.dtype)
        else:
            embed = finite(self.text.encode(prompt, list(pictures)), self.dtype)
        self.prompts_encoded += 1
        if self.cache:
            self.cache.put("prompt", key, {"embed": embed}, {"text_encoder": self.text_fingerprint})
        return embed

    def _prompt_text(self, prompt: str, pictures: int) -> str:
        """What the text encoder reads of a prompt: an Edit model's instruction in its template (the pictures'
        places included), a Qwen-Image prompt as given (the template is fixed)."""
        if self.kind == "qwen-image":
            return prompt
        from .model.instruct_text import prompt_text

        return prompt_text(prompt, pictures, plus=self.kind != "edit")

    def _prompt_cache(self, encoded_before: int) -> str:
        """How the prompts of a call that started when `prompts_encoded` was encoded_before were found."""
        if self.cache is None:
            return "off"
        return "hit" if self.prompts_encoded == encoded_before else "miss"

    def cache_latent(self, image: np.ndarray, latent: torch.Tensor | None) -> None:
        """Remember `latent` as the latent of `image` (H, W, 3) uint8, so an edit of it skips the VAE encoder."""
        if self.cache is not None and latent is not None:
            record = {"vae": self.vae_fingerprint, "model": self.model_fingerprint, "size": list(image.shape[1::-1])}
            self.cache.put("latent", pixel_key(image, self.vae_fingerprint), {"latent": latent.float()}, record)

    def input_latent(self, image: np.ndarray, work: np.ndarray, whole: bool) -> tuple[torch.Tensor, str]:
        """The latent of `work` and whether the cache gave it. Only when `work` is the whole `image` at its own
        size (padded right and bottom) does a latent stored for image's pixels stand in for encoding it, and
        only then is a fresh encoding stored for the next edit of the same image."""
        if self.cache is None:
            return self.encode(work), "off"
        key = pixel_key(image, self.vae_fingerprint)
        entry = self.cache.get("latent", key, self.latent_spec(*work.shape[1::-1])) if whole else None
        if entry:
            return entry[0]["latent"], "hit"
        latent = self.encode(work)
        if whole:
            self.cache_latent(image, latent)
        return latent, "miss"

    def _noise(self, seed: int, h: int, w: int) -> torch.Tensor:
        # The reference draws noise on a CPU generator in the model dtype, shaped (B, 1, C, H, W).
        noise = torch.randn((1, 16, h, w), generator=torch.Generator("cpu").manual_seed(seed), dtype=self.dtype)
        return noise.float().to(self.device)

    def _velocity(self, prompt: str, negative_prompt: str, cfg: float, grid: tuple[int, int], sigmas: torch.Tensor,
                  shortcuts: Shortcuts, keep=None):
        """The guided velocity field for one prompt over a latent grid (h, w) in patches, for the steps of
        `sigmas`, with the shortcuts asked for (CFG only early, adaptive reuse).

        With guidance, the conditional and unconditional passes run as one batch of 2 (the shorter prompt
        zero-padded and its padding masked as keys), so a step reads the transformer's weights once."""
        embeds = self.encode_prompts([prompt, negative_prompt] if cfg > 1 else [prompt])
        return self.guided_velocity(embeds, cfg, grid, sigmas, shortcuts, keep)

    def guided_velocity(self, embeds: list[torch.Tensor], cfg: float, grid: tuple[int, int], sigmas: torch.Tensor,
                        shortcuts: Shortcuts, keep=None, refs: torch.Tensor | None = None, ref_grids=()):
        """_velocity from the prompt embeddings (the negative one second when cfg > 1). refs: (1, R, 64)
        packed latents of reference pictures on grids `ref_grids`, shown to the model after the noisy tokens
        (instruction editing)."""
        guided = cfg > 1
        txt, txt_mask = pad_batch([e.to(self.device, self.dtype) for e in embeds])
        refs = None if refs is None else refs.to(self.device, self.dtype)

        def model(batch: int):  # the first `batch` prompts: both, or the conditional one alone
            def velocity(x, sigma):
                x = x.expand(batch, -1, -1).to(self.dtype)
                if refs is not None:
                    x = torch.cat([x, refs.expand(batch, -1, -1)], dim=1)
                # The reference feeds timestep = sigma * 1000 in the model dtype, divided back by 1000.
                t = (sigma * 1000).to(self.dtype).expand(batch) / 1000
                self.calls += batch
                with self._attention_backend():
                    mask = None if txt_mask is None else txt_mask[:batch]  # None: no padding to mask
                    return self.transformer(x, txt[:batch], mask, t, grid, keep, ref_grids).float()

            return velocity

        velocity = model(len(embeds))
        if guided:
            velocity = true_cfg(velocity, cfg)
            if shortcuts.cfg_until < 1:
                velocity = cfg_until(velocity, model(1), sigmas, shortcuts.cfg_until)
        return reusing(velocity, sigmas, Reuse(shortcuts.reuse)) if shortcuts.reuse > 0 else velocity

    @torch.no_grad()
    def generate_latent(self, prompt: str, negative_prompt: str, width: int, height: int, steps: int,
                        cfg: float, seed: int, callback=None, shortcuts: Shortcuts = Shortcuts(),
                        preview=None) -> torch.Tensor:
        """Sample a normalized latent (1, 16, height/8, width/8) for one prompt; `preview` (preview.Preview)
        sees each step's estimate of it."""
        self.check_size(width, height, encodes=False)
        h, w = height // 8, width // 8
        x = patchify(self._noise(seed, h, w))
        sigmas = flow_sigmas(steps, x.shape[1], shifted(self.schedule, shortcuts.shift)).to(self.device)
        velocity, callback = watching(self._velocity(prompt, negative_prompt, cfg, (h // 2, w // 2), sigmas, shortcuts),
                                      callback, sigmas, mapped(preview, lambda z: unpatchify(z, h, w)))
        x = euler(velocity, x, sigmas, callback)
        self._release("transformer")
        return finite(unpatchify(x, h, w), self.dtype)

    @torch.no_grad()
    def inpaint_latent(self, z0: torch.Tensor, mask: torch.Tensor, prompt: str, negative_prompt: str, steps: int,
                       cfg: float, seed: int, strength: float = 1.0, attn_mask: bool = False,
                       callback=None, shortcuts: Shortcuts = Shortcuts(), preview=None) -> torch.Tensor:
        """Regenerate latent z0 (1, 16, h, w) where mask (h, w) in [0, 1] says so; the rest ends exactly z0.
        `preview` sees each step's estimate of the result, blended as the last step blends."""
        embeds = self.encode_prompts([prompt, negative_prompt] if cfg > 1 else [prompt])
        return self.sample_known(z0, mask, embeds, steps, cfg, seed, strength, attn_mask, callback, shortcuts,
                                 preview=preview)

    @torch.no_grad()
    def sample_known(self, z0: torch.Tensor, mask: torch.Tensor, embeds: list[torch.Tensor], steps: int, cfg: float,
                     seed: int, strength: float = 1.0, attn_mask: bool = False, callback=None,
                     shortcuts: Shortcuts = Shortcuts(), refs: torch.Tensor | None = None, ref_grids=(), preview=None):
        """inpaint_latent from the prompt embeddings, with reference pictures as guided_velocity takes them."""
        h, w = z0.shape[-2:]
        x0, noise = patchify(z0.float().to(self.device)), patchify(self._noise(seed, h, w))
        m = patchify(mask.float().to(self.device)[None, None].expand(1, 16, h, w))
        sigmas = flow_sigmas(steps, x0.shape[1], shifted(self.schedule, shortcuts.shift))[first_step(steps, strength):]
        sigmas = sigmas.to(self.device)
        if len(sigmas) < 2:
            raise UsageError(f"--strength {strength} with {steps} steps runs no step; raise one of them")
        keep = (m[0] == 0).all(-1) if attn_mask else None  # (L,) tokens wholly outside the mask
        velocity = self.guided_velocity(embeds, cfg, (h // 2, w // 2), sigmas, shortcuts, keep, refs, ref_grids)
        blend = keep_known(x0, noise, m, len(sigmas) - 1)
        velocity, callback = watching(velocity, callback, sigmas, mapped(
            preview, lambda z: unpatchify(blend(len(sigmas) - 2, z, sigmas[-1]), h, w)))
        x = euler(velocity, noised(x0, noise, sigmas[0]), sigmas, callback, blend)
        self._release("transformer")
        return finite(unpatchify(x, h, w), self.dtype)

    @torch.no_grad()
    def encode(self, image: np.ndarray) -> torch.Tensor:
        """uint8 (H, W, 3), sides multiples of 16, to a normalized latent (1, 16, H/8, W/8)."""
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255 * 2 - 1  # the reference's preprocess
        z = self.vae("encoder").encode(x.to(self.device, self.dtype)).float()
        self._release("encoder")
        return finite(z, self.dtype)

    def tiled(self, width: int, height: int) -> bool:
        """Whether an image of width x height decodes in tiles."""
        return self.vae_tiling == "on" or (self.vae_tiling == "auto" and width * height > TILE_ABOVE)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> np.ndarray:
        z = latent.to(self.device, self.dtype)
        decoder = self.vae("decoder")
        if self.tiled(8 * z.shape[-1], 8 * z.shape[-2]):
            x = tiled_decode(decoder.decode, z, TILE, TILE_OVERLAP)
        else:
            x = decoder.decode(z)
        self._release("decoder")
        return to_uint8(finite(x[0], self.dtype))

    def generate(self, prompt: str, negative_prompt: str, width: int, height: int, steps: int, cfg: float,
                 seed: int, callback=None, shortcuts: Shortcuts = Shortcuts(), preview=None) -> Output:
        """`preview` (preview.Preview) sees each step's estimate of the image."""
        encoded_before = self.prompts_encoded
        latent = self.generate_latent(prompt, negative_prompt, width, height, steps, cfg, seed, callback, shortcuts,
                                      mapped(preview, self.decode))
        return Output(self.decode(latent), latent, "off" if self.cache is None else "miss",
                      self._prompt_cache(encoded_before))

    def inpaint(self, image: np.ndarray, mask: np.ndarray, prompt: str, negative_prompt: str, steps: int,
                cfg: float, seed: int, strength: float = 1.0, attn_mask: bool = False, context: int = 64,
                callback=None, shortcuts: Shortcuts = Shortcuts(), preview=None) -> "Edit":
        """Regenerate image (H, W, 3) uint8 where mask (H, W) in [0, 1] says so. The result has the input's
        size and is byte-identical to it wherever the mask is 0; soft mask values blend.

        Within the working area this is a one-edit chain (`edit_canvas`, then `render`): the input's latent
        comes from the cache when one is stored for its pixels (the VAE encoder is not loaded), else it is
        encoded and stored. An image larger than the working area is not shrunk as a whole: the model sees
        the mask's bounding box plus `context` pixels around it, scaled to the working area, pasted back.
        `preview` (preview.Preview) sees each step's estimate of the result, composited as the result is."""
        height, width = mask.shape
        if width * height > self.defaults.max_pixels:
            return self._inpaint_resampled(image, mask, prompt, negative_prompt, steps, cfg, seed, strength,
                                           attn_mask, context, callback, shortcuts, preview)
        encoded_before = self.prompts_encoded
        work = pad_to_multiple(image, None)[0]
        self.check_size(*work.shape[1::-1])
        z0, latent_cache = self.input_latent(image, work, whole=True)
        canvas = self.edit_canvas(replace(Canvas.start(image), latent=z0), mask, prompt, negative_prompt, steps,
                                  cfg, seed, strength, attn_mask, context, callback, shortcuts, preview)
        result = self.render(canvas)
        # Where the mask keeps, the latent is z0 and the result the input's own pixels; where it edits, both hold
        # the new content (the pixels blended at soft mask values): the latent stands for the result, as the
        # model ran on the whole image at its size, if the padding strip is still what padding the result gives.
        padded = pad_to_multiple(result, None)[0]
        fits = np.array_equal(padded[height:], work[height:]) and np.array_equal(padded[:, width:], work[:, width:])
        return Edit(result, canvas.latent if fits else None, latent_cache, self._prompt_cache(encoded_before),
                    (0, 0, width, height), work.shape[1::-1])

    def edit_canvas(self, canvas: Canvas, mask: np.ndarray, prompt: str, negative_prompt: str, steps: int,
                    cfg: float, seed: int, strength: float = 1.0, attn_mask: bool = False, context: int = 64,
                    callback=None, shortcuts: Shortcuts = Shortcuts(), preview=None) -> Canvas:
        """One edit of a chain: the canvas's latent regenerated where mask (H, W) says so, nothing decoded
        (but for `preview`, which sees each step's estimate of the canvas rendered).
        A canvas that carries no latent yet starts from its pixels' latent, from the cache when stored.

        A canvas over the working area goes through pixels instead (the model sees a resampled crop of it,
        which has no latent to carry): it is rendered, edited as `inpaint` does, and its pixels kept."""
        width, height = canvas.size
        if width * height > self.defaults.max_pixels:
            edit = self._inpaint_resampled(self.render(canvas), mask, prompt, negative_prompt, steps, cfg, seed,
                                           strength, attn_mask, context, callback, shortcuts, preview)
            return Canvas.start(edit.image)
        self.check_size(*window_size(canvas.size, canvas.origin))
        if canvas.latent is None:  # the whole canvas at its own size: its pixels' latent may be cached
            work = pad_to_multiple(canvas.pixels, None)[0]
            canvas = replace(canvas, latent=self.input_latent(canvas.pixels, work, whole=True)[0])
        m = torch.from_numpy(latent_mask(to_window(mask, canvas.origin), 8))
        latent = self.inpaint_latent(canvas.latent, m, prompt, negative_prompt, steps, cfg, seed, strength,
                                     attn_mask, callback, shortcuts,
                                     mapped(preview, lambda z: self.render(edited(canvas, mask, z))))
        return edited(canvas, mask, latent)

    def render(self, canvas: Canvas) -> np.ndarray:
        """The canvas's pixels: its latent decoded once and composited over the known pixels."""
        if canvas.latent is None:
            return canvas.pixels
        return composite(canvas.pixels, place(self.decode(canvas.latent), canvas), canvas.pending)

    def _inpaint_resampled(self, image: np.ndarray, mask: np.ndarray, prompt: str, negative_prompt: str,
                           steps: int, cfg: float, seed: int, strength: float, attn_mask: bool, context: int,
                           callback, shortcuts: Shortcuts, preview=None) -> "Edit":
        """inpaint for an image over the working area: the mask's box plus context, scaled to fit it. The model
        sees a resampled copy, so no cached latent stands for it and its latent stands for no output."""
        max_pixels = self.defaults.max_pixels
        x0, y0, x1, y1 = crop_box(mask, context, max_pixels)
        size = work_size(x1 - x0, y1 - y0, max_pixels)
        self.check_size(*size)
        work = np.asarray(Image.fromarray(image[y0:y1, x0:x1]).resize(size, Image.LANCZOS))
        m = torch.from_numpy(latent_mask(resize_mask(mask[y0:y1, x0:x1], size), 8))
        encoded_before = self.prompts_encoded
        z0, latent_cache = self.input_latent(image, work, whole=False)

        def paste(latent: torch.Tensor) -> np.ndarray:  # the image with the crop's decode composited in
            generated = image.copy()
            generated[y0:y1, x0:x1] = np.asarray(Image.fromarray(self.decode(latent)).resize((x1 - x0, y1 - y0),
                                                                                           Image.LANCZOS))
            return composite(image, generated, mask)

        latent = self.inpaint_latent(z0, m, prompt, negative_prompt, steps, cfg, seed, strength, attn_mask, callback,
                                     shortcuts, mapped(preview, paste))
        return Edit(paste(latent), None, latent_cache, self._prompt_cache(encoded_before), (x0, y0, x1, y1), size)

"""The engine's latent side: requests turned into latents on the components (components.py), and back.

Prompts become embeddings, looked up in the cache first (a `Store`), so a run whose prompts are all known
never loads the text encoder. A latent is sampled from noise, or regenerated where a mask says so with the rest
kept, under guidance and the shortcuts asked for. Pixels become latents (an earlier output's from the cache,
so an edit of it skips the VAE's encoder) and latents pixels (decoded in tiles when large). `check_size`
refuses a size the model cannot take or the device could not hold, before any weights load.
"""

from typing import NamedTuple

import numpy as np
import torch

from qimg.cache import pixel_key, prompt_key
from qimg.engine.components import Components
from qimg.engine.memory import activation_bytes, check_weights, device_bytes, edit_activation_bytes, gigabytes
from qimg.engine.preview import mapped, watching
from qimg.engine.request import Sampling
from qimg.errors import QimgError, UsageError
from qimg.model.qwen2 import Qwen2Config
from qimg.model.text import pad_batch
from qimg.model.tiling import tiled_decode
from qimg.model.transformer import TransformerConfig, patchify, unpatchify
from qimg.model.vae import VAEConfig
from qimg.model.vision import VisionConfig
from qimg.sampling import (
    euler,
    first_step,
    flow_sigmas,
    keep_known,
    noised,
    shifted,
    true_cfg,
    with_shortcuts,
)

MULTIPLE = 16  # VAE 8x downsampling times the transformer's 2x2 patches
TILE_ABOVE = 2048 * 2048  # decoded pixels above which "auto" decodes the VAE in tiles
TILE, TILE_OVERLAP = 64, 8  # in latent pixels: 512 px tiles sharing 64 px


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] to (H, W, 3) uint8, rounding like the reference's postprocess."""
    x = (x.float() * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return (x * 255).round().astype(np.uint8)


def multiples(size: tuple[int, int]) -> None:
    for name, v in zip(("width", "height"), size):
        if v <= 0 or v % MULTIPLE:
            raise UsageError(f"{name} {v} must be a positive multiple of {MULTIPLE}")


def finite(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t, unless it holds NaN or infinity: then a QimgError, before anything of it is decoded, saved or cached.
    In float16 the number format is the likely cause (its range is small); otherwise it is not, as the weights
    were checked finite at load: the LoRAs and their scales are what is left."""
    if not torch.isfinite(t).all():
        name = str(dtype).removeprefix("torch.")
        if dtype == torch.float16:
            raise QimgError(f"the model produced non-finite values (NaN/inf) in {name}, whose range is small; use "
                            "--dtype bfloat16 or float32")
        raise QimgError(f"the model produced non-finite values (NaN/inf) in {name}; its weights are finite, so a "
                        "--lora (or its scale) is the likely cause: try without it, or at a lower scale")
    return t


class Condition(NamedTuple):
    """What the model is conditioned on: the prompt embeddings (the negative one second when cfg > 1) and, for
    instruction editing, reference pictures' packed latents (1, R, 64) on grids `ref_grids` ((h, w) in patches
    each), shown to the model after the noisy tokens."""

    embeds: list[torch.Tensor]
    refs: torch.Tensor | None = None
    ref_grids: tuple[tuple[int, int], ...] = ()


class Sampler(Components):
    """The components and what the engine does with them in latent space; `Engine` (engine.py) makes images
    of it."""

    def latent_spec(self, width: int, height: int) -> dict:
        """What a cached latent of an image of width x height pixels (multiples of 16) must be."""
        return {"latent": ("float32", (1, self.z_dim, height // 8, width // 8))}

    def check_size(self, width: int, height: int, encodes: bool = True) -> None:
        """Refuse, before any weights load, a size the model cannot take or the device could not hold.
        encodes: whether the VAE encodes an image of that size too (a generation only decodes, maybe tiled)."""
        multiples((width, height))
        tile = (8 * TILE) ** 2 if not encodes and self.tiled(width, height) else None
        cfg = self._config(TransformerConfig, "transformer")
        need = activation_bytes(width, height, cfg, self._config(VAEConfig, "vae"), self.dtype.itemsize, tile)
        self._check_memory(need, f"{width}x{height}", (width, height), "use a smaller size")

    def check_edit(self, work: tuple[int, int], pictures: list[tuple[int, int]], patches: int) -> None:
        """check_size for an instruction edit: the noisy image of `work` (W, H) with every picture's latent
        (`pictures`, (W, H) each at the edit area) and the vision tower's `patches` (memory.edit_activation_bytes)."""
        for size in (work, *pictures):
            multiples(size)
        configs = (self._config(TransformerConfig, "transformer"), self._config(VAEConfig, "vae"),
                   self._config(Qwen2Config, "text_encoder"), self._config(VisionConfig, "text_encoder"))
        need = edit_activation_bytes(work, pictures, patches, *configs, self.dtype.itemsize)
        sizes = ", ".join(f"{w}x{h}" for w, h in pictures)
        self._check_memory(need, f"an edit at {work[0]}x{work[1]} with pictures of {sizes} and {patches:,} vision "
                           "patches", work, "use a smaller --edit-area or --vision-area, or fewer --ref pictures")

    def _check_memory(self, need: int, what: str, size: tuple[int, int], fix: str) -> None:
        have = device_bytes(self.device)
        if have is not None and need > have:
            raise UsageError(f"{what} would need about {gigabytes(need)} of {self.device.type} memory besides the "
                             f"weights, and the device has {gigabytes(have)}; {fix}")
        check_weights(self.weight_bytes, need, have, self.device.type, size, self.text_bytes)

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
        if not self.kind.edits:
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
        if not self.kind.edits:
            return prompt
        from qimg.model.instruct_text import prompt_text

        return prompt_text(prompt, pictures, plus=self.kind.plus)

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

    def guided_velocity(self, condition: Condition, sampling: Sampling, grid: tuple[int, int], sigmas: torch.Tensor,
                        keep=None):
        """The guided velocity field over a latent grid (h, w) in patches, for the steps of `sigmas`, with the
        sampling's guidance and shortcuts (CFG only early, adaptive reuse). keep: (L,) tokens the attention
        may leave out as queries (wholly outside an inpaint's mask), or None.

        With guidance, the conditional and unconditional passes run as one batch of 2 (the shorter prompt
        zero-padded and its padding masked as keys), so a step reads the transformer's weights once."""
        cfg, shortcuts, ref_grids = sampling.cfg, sampling.shortcuts, condition.ref_grids
        guided = cfg > 1
        txt, txt_mask = pad_batch([e.to(self.device, self.dtype) for e in condition.embeds])
        refs = None if condition.refs is None else condition.refs.to(self.device, self.dtype)

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

        velocity = model(len(condition.embeds))
        if not guided and self.parallel is not None:
            self.parallel.unguided()  # --cfg-parallel has no pair to split: said once
        if guided:
            return with_shortcuts(true_cfg(velocity, cfg), sigmas, shortcuts, model(1))
        return with_shortcuts(velocity, sigmas, shortcuts)

    @torch.no_grad()
    def generate_latent(self, sampling: Sampling, width: int, height: int, callback=None,
                        preview=None) -> torch.Tensor:
        """Sample a normalized latent (1, 16, height/8, width/8) for one prompt (the sampling's strength is
        not used: generating starts from noise); `preview` (preview.Preview) sees each step's estimate of it."""
        self.check_size(width, height, encodes=False)
        h, w = height // 8, width // 8
        x = patchify(self._noise(sampling.seed, h, w))
        sigmas = flow_sigmas(sampling.steps, x.shape[1], shifted(self.schedule, sampling.shortcuts.shift))
        sigmas = sigmas.to(self.device)
        condition = Condition(self.encode_prompts(sampling.prompts))
        velocity, callback = watching(self.guided_velocity(condition, sampling, (h // 2, w // 2), sigmas),
                                      callback, sigmas, mapped(preview, lambda z: unpatchify(z, h, w)))
        x = euler(velocity, x, sigmas, callback)
        self._release("transformer")
        return finite(unpatchify(x, h, w), self.dtype)

    @torch.no_grad()
    def inpaint_latent(self, z0: torch.Tensor, mask: torch.Tensor, sampling: Sampling, attn_mask: bool = False,
                       callback=None, preview=None) -> torch.Tensor:
        """Regenerate latent z0 (1, 16, h, w) where mask (h, w) in [0, 1] says so; the rest ends exactly z0.
        `preview` sees each step's estimate of the result, blended as the last step blends."""
        condition = Condition(self.encode_prompts(sampling.prompts))
        return self.sample_known(z0, mask, condition, sampling, attn_mask, callback, preview)

    @torch.no_grad()
    def sample_known(self, z0: torch.Tensor, mask: torch.Tensor, condition: Condition, sampling: Sampling,
                     attn_mask: bool = False, callback=None, preview=None) -> torch.Tensor:
        """inpaint_latent from the prompt embeddings, with reference pictures as guided_velocity takes them."""
        steps, strength = sampling.steps, sampling.strength
        h, w = z0.shape[-2:]
        x0, noise = patchify(z0.float().to(self.device)), patchify(self._noise(sampling.seed, h, w))
        m = patchify(mask.float().to(self.device)[None, None].expand(1, 16, h, w))
        schedule = shifted(self.schedule, sampling.shortcuts.shift)
        sigmas = flow_sigmas(steps, x0.shape[1], schedule)[first_step(steps, strength):].to(self.device)
        if len(sigmas) < 2:
            raise UsageError(f"--strength {strength} with {steps} steps runs no step; raise one of them")
        keep = (m[0] == 0).all(-1) if attn_mask else None  # (L,) tokens wholly outside the mask
        velocity = self.guided_velocity(condition, sampling, (h // 2, w // 2), sigmas, keep)
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
        z = self.vae("encoder").encode(x.to(self.place("vae"), self.dtype)).float().to(self.device)
        self._release("encoder")
        return finite(z, self.dtype)

    def tiled(self, width: int, height: int) -> bool:
        """Whether an image of width x height decodes in tiles."""
        return self.vae_tiling == "on" or (self.vae_tiling == "auto" and width * height > TILE_ABOVE)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> np.ndarray:
        z = latent.to(self.place("vae"), self.dtype)
        decoder = self.vae("decoder")
        if self.tiled(8 * z.shape[-1], 8 * z.shape[-2]):
            x = tiled_decode(decoder.decode, z, TILE, TILE_OVERLAP)
        else:
            x = decoder.decode(z)
        self._release("decoder")
        return to_uint8(finite(x[0], self.dtype))

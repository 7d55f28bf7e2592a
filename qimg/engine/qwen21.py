"""Qwen-Image-2.1 (and Turbo) on the engine: one model that generates and edits with up to 10 pictures, as its
reference pipeline (diffusers' QwenImage21Pipeline) does, in RGBA.

Latents have 64 channels on a 16x grid and the transformer reads them unpatched, one token per 16x16 pixels. A
prompt is encoded with its pictures (model/qwen21_prompt.py); every picture is resized once (LANCZOS, RGBA, to
about the edit area in multiples of 32) and that copy feeds both the vision tower (over white) and the VAE (all
four channels). The transformer sees [text with the pictures' latents in their slots | target]; the prefix's keys
and values are computed at the first step and reused (one cache per guidance branch) unless the sampling's
kv_cache is off. Guidance is plain CFG, on only with cfg > 1 and a negative prompt. The schedule is the model's
own grid (Turbo) or linspace(1, 1/N, N), dynamically shifted by the target's token count.

On purpose unlike the reference: an edit's result is at the input's size (the reference's follows the last
picture's aspect at the edit area), and a masked edit keeps the input's bytes outside the mask.
"""

import warnings
from dataclasses import replace
from functools import cached_property

import numpy as np
import torch

from qimg.cache import prompt_key
from qimg.engine.canvas import resample
from qimg.engine.components import Loading, read_schedule
from qimg.engine.engine import EditResult, Result
from qimg.engine.latents import Sampler, finite, to_uint8
from qimg.engine.preview import mapped, watching
from qimg.engine.qwen21_files import Files21, split_loading
from qimg.engine.qwen21_inputs import CHANNELS, MULTIPLE, SCALE, Defaults21, pack, rgba, unpack, working_size
from qimg.engine.qwen21_velocity import Counts, Velocity21
from qimg.engine.request import Sampling
from qimg.errors import QimgWarning, UsageError
from qimg.masks import composite, crop_box, latent_mask, resize_mask
from qimg.model.qwen21_prompt import MAX_PICTURES, prompt_text
from qimg.sampling import ScheduleConfig, euler, first_step, flow_sigmas, keep_known, noised, shifted
from qimg.weights.folders import read_config, sample_sigmas


class Engine21(Files21, Velocity21, Sampler):
    """A Qwen-Image-2.1 folder's components (the prompt encoder, the transformer, the RGBA VAE), loaded on first
    use, and what the jobs ask of an engine: generate, and `edit` with pictures. It keeps the Sampler's cache
    plumbing (cache_latent, _prompt_cache) and replaces everything that depends on the model."""

    def __init__(self, folder, device: str = "auto", dtype: str = "auto", cache=None, loading: Loading = Loading()):
        files, loading = split_loading(loading)
        super().__init__(folder, device, dtype, cache, loading)
        self.check_files(files)
        self.defaults = Defaults21.from_folder(folder)
        self.schedule = read_schedule(folder, ScheduleConfig.from_scheduler)
        self.grid = sample_sigmas(folder)
        if self.grid:
            self.defaults = replace(self.defaults, steps=len(self.grid))
        self.counts = Counts()

    # --- components ----------------------------------------------------------------------------------------

    @property
    def text(self):
        """The PromptEncoder21 (model/qwen21_prompt.py)."""
        if self._text is None:
            if self._transformer is not None and self.devices and self.placement.text_released:
                self._free("transformer")  # a later prompt: the encoder does not fit beside the blocks; they reload
            self._text = self.load_prompt_encoder()
        return self._text

    @property
    def transformer(self):
        """The transformer (weights/qwen21.py: the folder's, or --transformer's, packed with --quantize), its LoRAs
        fused; with --offload blocks its blocks streamed from CPU memory (model/offload.py)."""
        if self._transformer is None:
            from qimg.model.offload import place_for_streaming
            from qimg.weights.adapters import apply_adapters
            from qimg.weights.qwen21 import load_transformer21

            streamed = self.offload == "blocks"  # the blocks stay in CPU memory, each copied over for its turn
            on_cpu = streamed or bool(self.devices)  # --devices: then split, as Components does
            if self.parallel is not None and self.parallel.layout.tp > 1:  # this rank's slices of the weights
                from qimg.parallel.tensor import load_split
                from qimg.weights.qwen21 import transformer21_config

                transformer = load_split(transformer21_config(self.folder), self.folder / "transformer", self.dtype,
                                         self.device, self.parallel.mesh["tp"], [one.adapters for one in self.loras])
            else:
                transformer = load_transformer21(self.folder, self.source, self.dtype,
                                                 torch.device("cpu") if on_cpu else self.device)
                apply_adapters(transformer, [one.adapters for one in self.loras])
            if streamed:
                place_for_streaming(transformer, self.device)
            if self.devices:
                from qimg.model.split import BlockSplit21, place_split

                stages = [(d, a, b) for d, (a, b) in zip(self.devices, self.placement.ranges)]
                place_split(transformer, stages, self.device, BlockSplit21)
            if self.compile:
                transformer.compile_blocks()
            if self.parallel is not None:  # this process is one rank of a torchrun (qimg/parallel/qwen21.py)
                transformer = self.parallel.wrap(transformer)
            self._transformer = transformer
        return self._transformer

    def vae(self, part: str):
        """The RGBA VAE with only `part`'s weights loaded ("encoder" or "decoder")."""
        if part not in self._vae:
            from qimg.engine.components import VAE_PARTS

            self._vae[part] = self.load_vae(VAE_PARTS[part])
        return self._vae[part]

    @cached_property
    def layers(self) -> dict[str, tuple[int, int]]:
        """The transformer's linear layers, (out, in) by name, for LoRAs (built on the meta device)."""
        from qimg.model.transformer21 import QwenImage21Transformer
        from qimg.weights.adapters import targets
        from qimg.weights.qwen21 import transformer21_config

        with torch.device("meta"):
            return targets(QwenImage21Transformer(transformer21_config(self.folder)))

    @cached_property
    def z_dim(self) -> int:
        return CHANNELS

    @cached_property
    def placement(self):
        """The layer split over --devices (engine/placement.py) of 2.1's components, or --split."""
        from qimg.engine.qwen21_split import plan21

        return plan21(self)

    @cached_property
    def weight_bytes(self) -> int:
        """The transformer's weights on the device, at their packed sizes (read from the headers)."""
        if self.devices:  # the first device's share of the split
            return sum(n for d, n in zip(self.devices, self.placement.weights) if d == self.device)
        from qimg.engine.memory import resident_bytes
        from qimg.weights.qwen21 import transformer21_config
        from qimg.weights.transformer import tensor_sizes

        return resident_bytes(tensor_sizes(transformer21_config(self.folder), self.folder / "transformer",
                                           self.source, self.dtype, self.device),
                              self.offload == "blocks" and self.device.type != "cpu")

    # --- sizes ---------------------------------------------------------------------------------------------

    def latent_spec(self, width: int, height: int) -> dict:
        return {"latent": ("float32", (1, CHANNELS, height // SCALE, width // SCALE))}

    def check_size(self, width: int, height: int, *, pictures: tuple[tuple[int, int], ...] = ()) -> None:
        """Refuse, before loading, a size that is not a positive multiple of 32, over the model's largest, or
        that the device could not hold with `pictures` ((W, H) each at their working sizes) beside it."""
        from qimg.engine.memory import qwen21_activation_bytes
        from qimg.weights.qwen21 import transformer21_config

        for name, v in (("width", width), ("height", height)):
            if v <= 0 or v % MULTIPLE:
                raise UsageError(f"{name} {v} must be a positive multiple of {MULTIPLE} for {self.kind.display}")
        if width * height > self.defaults.max_pixels:
            raise UsageError(f"{width}x{height} is over {self.kind.display}'s largest size "
                             f"({self.defaults.max_pixels:,} pixels, 2048x2048); use a smaller --size")
        vae = read_config(self.folder / "vae")
        base = vae.get("decoder_base_dim") or vae.get("base_dim", 96)
        need = qwen21_activation_bytes((width, height), list(pictures), transformer21_config(self.folder).dim,
                                       base if isinstance(base, int) else 96, self.dtype.itemsize)
        self._check_memory(need, f"{width}x{height}" + (f" with {len(pictures)} pictures" if pictures else ""),
                           (width, height), "use a smaller size or --edit-area, or fewer pictures")

    def check_vision(self, sizes: tuple[tuple[int, int], ...], area: int) -> None:
        """Refuse pictures the vision processor would resize again (outside its pixel bounds): each slot of the
        prompt must stand for 2x2 of the picture's latent tokens, as the model was trained."""
        from qimg.model.vl_image import smart_resize
        from qimg.weights.qwen3vl import load_image_config

        cfg = load_image_config(self.folder / "processor")
        for w, h in sizes:
            if smart_resize(h, w, cfg) != (h, w):
                bound = "under its smallest" if w * h < cfg.min_pixels else "over its largest"
                raise UsageError(f"--edit-area {area}: a picture resized to {w}x{h} is {bound} area for the vision "
                                 f"processor ({cfg.min_pixels:,} to {cfg.max_pixels:,} pixels, processor/ of "
                                 f"{self.folder.name}); give an --edit-area in that range")

    # --- prompts -------------------------------------------------------------------------------------------

    def encode_prompts(self, prompts: list[str], pictures: tuple[np.ndarray, ...] = ()) -> list[tuple]:
        """(embedding (S, D), picture-slot mask (S,) bool) per prompt, each encoded with the same pictures
        ((H, W, 4) uint8 at their working sizes), from the cache when stored."""
        embeds = [self._encode_prompt(p, pictures) for p in prompts]
        self._release("text")
        return embeds

    def _encode_prompt(self, prompt: str, pictures: tuple[np.ndarray, ...]) -> tuple:
        key = prompt_key(prompt_text(prompt, len(pictures)), self.text_fingerprint, pictures) if self.cache \
            else None
        spec = {"embed": (str(self.dtype).removeprefix("torch."), (None, None)), "slots": ("bool", (None,))}
        entry = self.cache.get("prompt", key, spec) if key else None
        if entry:
            return entry[0]["embed"].to(self.device), entry[0]["slots"].to(self.device)
        embed, slots = self.text.encode(prompt, list(pictures))
        embed = finite(embed, self.dtype)
        self.prompts_encoded += 1
        if self.cache:
            self.cache.put("prompt", key, {"embed": embed, "slots": slots}, {"text_encoder": self.text_fingerprint})
        return embed, slots

    @cached_property
    def text_fingerprint(self) -> str:
        return "-".join((*self.text_parts(), str(self.dtype).removeprefix("torch."), self.device.type))

    # --- latents -------------------------------------------------------------------------------------------

    def _noise(self, seed: int, h: int, w: int) -> torch.Tensor:
        # The reference draws (B, 1, C, h, w) on a CPU generator in the model dtype.
        noise = torch.randn((1, CHANNELS, h, w), generator=torch.Generator("cpu").manual_seed(seed), dtype=self.dtype)
        return noise.float().to(self.device)

    def own_steps(self, sampling: Sampling) -> Sampling:
        """The sampling with the steps it will run: Turbo's grid decides their count, as in the reference (a
        --steps that differs is a warning); the base model takes them as asked."""
        if not self.grid or sampling.steps == len(self.grid):
            return sampling
        warnings.warn(f"{self.kind.display} samples its own {len(self.grid)}-step grid (sample_sigmas in "
                      f"model_index.json); --steps {sampling.steps} does not apply", QimgWarning, stacklevel=2)
        return replace(sampling, steps=len(self.grid))

    def sigmas(self, sampling: Sampling, tokens: int) -> torch.Tensor:
        """The schedule for a target of `tokens` tokens: the model's grid (Turbo) or the sampling's steps."""
        schedule = shifted(self.schedule, sampling.shortcuts.shift)
        return flow_sigmas(sampling.steps, tokens, schedule, self.grid)

    @torch.no_grad()
    def encode(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 4) uint8, sides multiples of 16 -> normalized latent (1, 64, H/16, W/16), the posterior mode."""
        x = torch.from_numpy(np.array(rgba(image))).permute(2, 0, 1)[None].float() / 255 * 2 - 1
        z = self.vae("encoder").encode(x.to(self.place("vae"), self.dtype)).float().to(self.device)
        self._release("encoder")
        return finite(z, self.dtype)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> np.ndarray:
        """Normalized latent (1, 64, h, w) -> (16h, 16w, 4) uint8 RGBA."""
        x = self.vae("decoder").decode(latent.to(self.place("vae"), self.dtype))
        self._release("decoder")
        return to_uint8(finite(x[0], self.dtype))

    def picture_latent(self, picture: np.ndarray) -> tuple[torch.Tensor, bool]:
        """A picture's latent at its working size (H, W, 4), from the cache when stored; and whether the VAE
        encoder ran."""
        from qimg.cache import pixel_key

        if self.cache is None:
            return self.encode(picture), True
        key = pixel_key(picture, self.vae_fingerprint)
        entry = self.cache.get("latent", key, self.latent_spec(*picture.shape[1::-1]))
        if entry:
            return entry[0]["latent"].to(self.device), False
        latent = self.encode(picture)
        self.cache_latent(picture, latent)
        return latent, True

    @torch.no_grad()
    def sample(self, sampling: Sampling, size: tuple[int, int], pictures: list[np.ndarray],
               known: tuple[torch.Tensor, torch.Tensor] | None = None, callback=None, preview=None):
        """The target's latent (1, 64, H/16, W/16) at size (W, H) for the sampling's prompt with `pictures`
        ((H, W, 4) uint8 at their working sizes); known: (z0 (1, 64, h, w), mask (h, w)) to keep z0 where the
        mask is 0 (a masked edit). Returns (latent, whether the VAE encoder ran)."""
        width, height = size
        h, w = height // SCALE, width // SCALE
        sampling = self.own_steps(sampling)
        guided = self.guided(sampling)
        prompts = [sampling.prompt, sampling.negative_prompt] if guided else [sampling.prompt]
        embeds = self.encode_prompts(prompts, tuple(pictures))
        latents = [self.picture_latent(p) for p in pictures]
        refs = torch.cat([pack(z) for z, _ in latents], dim=1) if latents else None
        grids = [(z.shape[-2], z.shape[-1]) for z, _ in latents] + [(h, w)]
        steps = sampling.steps
        sigmas = self.sigmas(sampling, h * w).to(self.device)
        noise = pack(self._noise(sampling.seed, h, w))
        if known is None:
            x, blend = noise, None
        else:
            z0, mask = pack(known[0].float().to(self.device)), known[1].float().to(self.device)
            sigmas = sigmas[first_step(steps, sampling.strength):]
            if len(sigmas) < 2:
                raise UsageError(f"--strength {sampling.strength} with {steps} steps runs no step; raise one of them")
            m = mask.reshape(1, h * w, 1).expand_as(z0)
            blend = keep_known(z0, noise, m, len(sigmas) - 1)
            x = noised(z0, noise, sigmas[0])
        velocity = self.velocity(embeds, refs, grids, sampling, sigmas, guided)
        velocity, callback = watching(velocity, callback, sigmas, mapped(preview, lambda z: unpack(z, h, w)))
        x = euler(velocity, x, sigmas, callback, blend)
        self._release("transformer")
        return finite(unpack(x, h, w), self.dtype), any(ran for _, ran in latents)

    # --- what the jobs call --------------------------------------------------------------------------------

    def render(self, canvas) -> np.ndarray:
        """A chain's canvas as pixels: 2.1's edits leave pixels (RGBA), no latent to decode."""
        return canvas.pixels

    def generate(self, sampling: Sampling, width: int, height: int, callback=None, preview=None) -> Result:
        """An RGBA image of width x height (multiples of 32) for the sampling's prompt."""
        self.check_size(width, height)
        encoded_before = self.prompts_encoded
        latent, _ = self.sample(sampling, (width, height), [], None, callback, mapped(preview, self.decode))
        return Result(self.decode(latent), None, "off" if self.cache is None else "miss",
                      self._prompt_cache(encoded_before))

    def edit(self, image: np.ndarray, refs: list[np.ndarray], mask: np.ndarray | None, area: int,
             sampling: Sampling, size: tuple[int, int] | None = None, callback=None, preview=None) -> EditResult:
        """`qimg edit` of image (H, W, 3 or 4) uint8, Picture 1, with `refs` (Pictures 2...): the result (RGBA) at
        the input's size, or `size` (W, H) (no mask), resampled from the working size (about `area` pixels at the
        output's aspect, reported as work_size). With mask (H, W) in [0, 1] the edit starts from Picture 1's latent
        and keeps it where the mask is 0, and the result is the input's bytes there."""
        if len(refs) + 1 > MAX_PICTURES:
            raise UsageError(f"{len(refs) + 1} pictures: {self.kind.display} takes up to {MAX_PICTURES}")
        encoded_before = self.prompts_encoded
        image = rgba(image)
        height, width = image.shape[:2]
        out = size or (width, height)
        work = working_size(out, area)
        sizes = tuple(working_size(p.shape[1::-1], area) for p in (image, *refs))
        self.check_size(*work, pictures=sizes)
        self.check_vision(sizes, area)
        pictures = [resample(rgba(p), size) for p, size in zip((image, *refs), sizes)]
        known = None
        if mask is not None:  # the target is Picture 1's own grid: its latent is kept outside the mask
            z0, _ = self.picture_latent(pictures[0])
            known = (z0, torch.from_numpy(latent_mask(resize_mask(mask, work), SCALE)))

        def result_of(latent: torch.Tensor) -> np.ndarray:
            pixels = resample(self.decode(latent), out)
            return pixels if mask is None else composite(image, pixels, mask)

        latent, encoded = self.sample(sampling, work, pictures, known, callback, mapped(preview, result_of))
        latent_cache = "off" if self.cache is None else "miss" if encoded else "hit"
        return EditResult(result_of(latent), None, latent_cache, self._prompt_cache(encoded_before),
                          (0, 0, width, height), work)

    def edit_cropped(self, image: np.ndarray, refs: list[np.ndarray], mask: np.ndarray, margin: int, area: int,
                     sampling: Sampling, callback=None, preview=None) -> EditResult:
        """`edit` inside a mask where the model sees only the mask's box plus `margin` pixels around it (--mask-crop):
        finer detail on a large picture. The crop's result is pasted back; outside the mask the input's bytes."""
        image = rgba(image)
        x0, y0, x1, y1 = crop_box(mask, margin, 0)

        def pasted(crop: np.ndarray) -> np.ndarray:
            whole = image.copy()
            whole[y0:y1, x0:x1] = crop
            return whole

        edit = self.edit(image[y0:y1, x0:x1], refs, mask[y0:y1, x0:x1], area, sampling, None, callback,
                         mapped(preview, pasted))
        return replace(edit, image=pasted(edit.image), box=(x0, y0, x1, y1))

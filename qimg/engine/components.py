"""The model components an engine holds, and what identifies them.

Each component loads on first use, so a run that never needs the text encoder or the VAE never loads it: the
text encoder (an Edit model's instruction encoder; weights/text_encoder.py), the transformer (with its LoRAs,
from the folder or a single file, weights/transformer.py) and the VAE's encoder and decoder apart. With
--offload model each is freed once its part of the job is done. Fingerprints (weights/fingerprint.py) say
which weights computed a cached tensor or an output; `weight_bytes` what the transformer's weights take on
the device. The devices and dtype the options name are devices.py's to resolve.
"""

import gc
import math
from contextlib import nullcontext
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path

import torch

from qimg.cache import Store
from qimg.engine import placement
from qimg.engine.devices import check_choice, pick_device, pick_devices, pick_dtype
from qimg.engine.memory import activation_bytes, free_bytes, resident_bytes
from qimg.errors import QimgError, UsageError
from qimg.model.offload import place_for_streaming
from qimg.model.qwen2 import Qwen2Config, Qwen2Model
from qimg.model.split import place_split
from qimg.model.transformer import QwenImageTransformer, TransformerConfig
from qimg.model.vae import QwenImageVAE, VAEConfig
from qimg.model.vision import VisionConfig, VisionTower
from qimg.option_values import ATTENTION, OFFLOAD, TILING
from qimg.sampling import ScheduleConfig
from qimg.weights import lora
from qimg.weights.adapters import apply_adapters, targets
from qimg.weights.fingerprint import fingerprint
from qimg.weights.folders import ModelKind, load_module, model_kind, read_config, read_json_object
from qimg.weights.split_files import (
    Files,
    check_files,
    files_provenance,
    load_text_files,
    load_vae,
    text_files,
    text_weight_bytes,
)
from qimg.weights.text_encoder import load_instruct_encoder, load_text_encoder
from qimg.weights.transformer import Source, load_transformer, provenance, start_sha256, tensor_sizes

VAE_PARTS = {"encoder": ("encoder.", "quant_conv."), "decoder": ("decoder.", "post_quant_conv.")}  # key prefixes


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
            raise UsageError(f"{file}: unknown keys {', '.join(unknown)} (allowed: {', '.join(sorted(names))})")
        for name, value in d.items():
            check_default(file, name, value, cls.__dataclass_fields__[name].default)
        return cls(**d)


# The least value each number in qimg.json may take: what the command line's options allow.
LEAST = {"width": 16, "height": 16, "steps": 1, "cfg": 0, "max_pixels": 16 * 16, "edit_area": 32 * 32,
         "vision_area": 28 * 28}


def check_default(file: Path, name: str, value, default) -> None:
    """A qimg.json value of the kind its default is (a whole number, a number, a text) and not below LEAST; a
    UsageError like its shape's (folders.read_json_object): the file is the user's to fix."""
    if isinstance(default, str):
        if not isinstance(value, str):
            raise UsageError(f"{file}: {name} must be a text, not {value!r}")
        return
    whole = isinstance(default, int)
    kinds = int if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) \
            or value < LEAST[name]:
        raise UsageError(f"{file}: {name} must be a {'whole ' if whole else ''}number of at least {LEAST[name]}, "
                        f"not {value!r}")


def read_schedule(folder: Path, parse=ScheduleConfig.from_dict) -> ScheduleConfig:
    """The folder's scheduler/scheduler_config.json through `parse` (from_scheduler: diffusers' defaults for a
    key it lacks); an option qimg cannot sample with is a QimgError naming the folder."""
    try:
        return parse(read_config(folder / "scheduler", "scheduler_config.json"))
    except ValueError as e:
        raise QimgError(f"{folder / 'scheduler'}: {e}") from None


@dataclass(frozen=True)
class Loading:
    """How the components load and run. offload: none keeps every component on the device; model loads text
    encoder, transformer and VAE (encoder and decoder apart) one at a time and frees each after use; blocks keeps
    the transformer's blocks in CPU memory and streams them to the device. compile: torch.compile the transformer
    blocks. attention: the SDPA backend. vae_tiling: decode in tiles (auto: above latents.TILE_ABOVE pixels).
    loras: lora.LoraSpec, read and checked against the transformer's layers when the components are made, fused
    into its weights when it loads (a side branch on packed layers). transformer, dequantize, quantize: where the
    transformer's weights come from and whether they stay packed (weights/transformer.py). text_encoder, vae,
    vision: single files in place of the folder's parts (weights/split_files.py)."""

    offload: str = "none"
    compile: bool = False
    attention: str = "auto"
    vae_tiling: str = "auto"
    loras: tuple = ()
    transformer: Path | None = None
    dequantize: bool | None = None
    quantize: str = "none"
    devices: tuple[str, ...] = ()  # --devices: the layer split over these (placement.py); () = one device
    split: tuple[int, ...] = ()  # --split: blocks per device; () = sized by each device's free memory
    text_encoder: Path | None = None
    vae: Path | None = None
    vision: Path | None = None
    parallel: object = None  # qimg.parallel.group.Group: this process is one rank of an image's torchrun


class Components:
    """A model folder's components, loaded on first use onto `device` in `dtype` as `loading` says."""

    def __init__(self, folder: Path, device: str = "auto", dtype: str = "auto", cache: Store | None = None,
                 loading: Loading = Loading()):
        self.folder = folder
        self.cache = cache
        self.prompts_encoded = 0  # prompts the text encoder has run on, cache misses included
        self.calls = 0  # transformer samples run (a CFG pair counts 2): a job's share is the difference
        self.devices = pick_devices(loading.devices)
        if self.devices and loading.offload == "blocks":
            raise UsageError("--devices does not combine with --offload blocks: the blocks already live on the devices")
        self.split = loading.split
        self.device = self.devices[0] if self.devices else pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.offload = check_choice("--offload", loading.offload, OFFLOAD)
        self.attention = check_choice("--attention", loading.attention, ATTENTION)
        self.vae_tiling = check_choice("--vae-tiling", loading.vae_tiling, TILING)
        if loading.compile and loading.offload == "blocks":
            raise UsageError("--compile does not combine with --offload blocks (the blocks run from streamed copies)")
        self.compile = loading.compile
        transformer = Path(loading.transformer) if loading.transformer else None
        self.source = Source(transformer, loading.dequantize, loading.quantize)
        if self.devices:  # loaded on the CPU, then split: packed or not as on the first device
            self.source = Source(transformer, self.source.unpacks(self.device), loading.quantize)
        self.files = Files(*(Path(p) if p else None for p in (loading.text_encoder, loading.vae, loading.vision)))
        if self.files:  # headers only: a file of the wrong part or width is refused before anything loads
            check_files(self.files, folder, self.kind, transformer)
            for file in (f for f in (loading.text_encoder, loading.vae, loading.vision) if f):
                start_sha256(Path(file))
        self.defaults = Defaults.from_folder(folder)
        self.schedule = read_schedule(folder)
        self.loras = tuple(lora.load(spec, self.layers) for spec in loading.loras)
        self.parallel = loading.parallel
        self._text = self._transformer = None
        self._vae = {}  # part ("encoder", "decoder") -> the VAE with that part's weights loaded

    @property
    def text(self):
        """The TextEncoder, or for an Edit model the InstructEncoder (instruction plus pictures)."""
        if self._text is None:
            if self._transformer is not None and self.devices and self.placement.text_released:
                self._free("transformer")  # a later prompt: the encoder does not fit beside the blocks; they reload
            device = self.place("text")
            if self.files.text_encoder:
                self._text = load_text_files(self.files, self.folder, self.kind, self.dtype, device,
                                             self.source.unpacks(device))
            elif not self.kind.edits:
                self._text = load_text_encoder(self.folder, self.dtype, device)
            else:
                self._text = load_instruct_encoder(self.folder, self.dtype, device, plus=self.kind.plus)
        return self._text

    @cached_property
    def kind(self) -> ModelKind:
        """weights.folders.model_kind's: QWEN_IMAGE, EDIT, EDIT_2509 or EDIT_2511."""
        return model_kind(self.folder)

    @property
    def transformer(self) -> QwenImageTransformer:
        if self._transformer is None:
            cfg = self._config(TransformerConfig, "transformer")
            on_cpu = self.offload == "blocks" or bool(self.devices)
            if self.parallel is not None and self.parallel.layout.tp > 1:  # this rank's slices of the weights
                from qimg.parallel.tensor import load_split

                transformer = load_split(cfg, self.folder / "transformer", self.dtype, self.device,
                                         self.parallel.mesh["tp"], [one.adapters for one in self.loras])
            else:
                transformer = load_transformer(cfg, self.folder / "transformer", self.source, self.dtype,
                                               torch.device("cpu") if on_cpu else self.device)
                apply_adapters(transformer, [one.adapters for one in self.loras])
            if self.offload == "blocks":
                place_for_streaming(transformer, self.device)
            if self.devices:
                stages = [(d, a, b) for d, (a, b) in zip(self.devices, self.placement.ranges)]
                place_split(transformer, stages, self.device)
            if self.compile:
                transformer.compile_blocks()
            if self.parallel is not None:
                transformer = self.parallel.wrap(transformer)
            self._transformer = transformer
        return self._transformer

    def vae(self, part: str) -> QwenImageVAE:
        """The VAE with only `part`'s weights loaded: a run that finds its input's latent in the cache, or
        generates from noise, never loads the encoder."""
        if part not in self._vae:
            cfg = self._config(VAEConfig, "vae")
            if self.files.vae:
                self._vae[part] = load_vae(self.files.vae, cfg, self.dtype, self.place("vae"), only=VAE_PARTS[part])
            else:
                self._vae[part] = load_module(lambda: QwenImageVAE(cfg), self.folder / "vae", self.dtype,
                                              self.place("vae"), only=VAE_PARTS[part])
        return self._vae[part]

    def place(self, component: str) -> torch.device:
        """Where the text encoder ("text") or the VAE ("vae") runs: the device, or under --devices the plan's."""
        if not self.devices:
            return self.device
        return torch.device(getattr(self.placement, component))

    @cached_property
    def placement(self) -> placement.Placement:
        """The layer split over --devices, sized by the devices' free memory now (before anything loads) or by
        --split, from the weights' sizes (headers and configs only)."""
        cfg, vae_cfg = self._config(TransformerConfig, "transformer"), self._config(VAEConfig, "vae")
        sizes = tensor_sizes(cfg, self.folder / "transformer", self.source, self.dtype, self.device)
        blocks, rest = placement.by_block(sizes)
        side = math.isqrt(self.defaults.max_pixels) // 16 * 16  # working memory for the model's default area
        text_cfg = self._config(Qwen2Config, "text_encoder")
        vision_cfg = self._config(VisionConfig, "text_encoder") if self.kind.edits else None
        with torch.device("meta"):
            text = [Qwen2Model(text_cfg)] + ([VisionTower(vision_cfg)] if vision_cfg else [])
            text_bytes = sum(placement.module_bytes(m, self.dtype.itemsize) for m in text)
            vae_bytes = placement.module_bytes(QwenImageVAE(vae_cfg), self.dtype.itemsize)
        if self.files.text_encoder:  # a file's packed layers at their packed size, as text_bytes counts them
            text_bytes = text_weight_bytes(self.files, self.kind.edits, self.dtype, self.source.unpacks(self.device))
        needs = placement.Needs(blocks, rest, text_bytes, vae_bytes,
                                activation_bytes(side, side, cfg, vae_cfg, self.dtype.itemsize))
        names = [str(d) for d in self.devices]
        return placement.plan(names, needs, {name: free_bytes(torch.device(name)) for name in names}, self.split)

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
        used = (self.files.text_encoder, self.files.vae, self.files.vision)
        if self.files.text_encoder:  # and the tokenizer it goes with, wherever it was found
            used += text_files(self.files, self.folder, self.kind.edits)
        files = tuple(fingerprint(f) for f in dict.fromkeys(used) if f)
        model = "-".join(p for p in (fingerprint(self.folder), self.source.fingerprint(), *files) if p)
        return lora.fingerprint(model, self.loras)

    @cached_property
    def transformer_info(self) -> dict | None:
        """Where the transformer's weights came from when not the folder's: file name, sha256, format."""
        return provenance(self.source)

    @cached_property
    def files_info(self) -> dict:
        """The single files in place of the folder's parts: {"text_encoder": {name, sha256, format, tokenizer}, ...}."""
        return files_provenance(self.files, self.folder, self.kind.edits)

    @cached_property
    def vae_fingerprint(self) -> str:
        return fingerprint(self.files.vae or self.folder / "vae")

    @cached_property
    def text_fingerprint(self) -> str:
        # dtype and device too: an embedding computed elsewhere would give a slightly different image
        encoder = self.files.text_encoder or self.folder / "text_encoder"
        parts = (fingerprint(encoder), *(fingerprint(p) for p in text_files(self.files, self.folder, self.kind.edits)))
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

    @cached_property
    def weight_bytes(self) -> int:
        """The transformer's weights resident on the device, at their packed sizes (read from the headers)."""
        if self.devices:  # the first device's share of the split
            return sum(n for d, n in zip(self.devices, self.placement.weights) if d == self.device)
        sizes = tensor_sizes(self._config(TransformerConfig, "transformer"), self.folder / "transformer", self.source,
                             self.dtype, self.device)
        return resident_bytes(sizes, self.offload == "blocks" and self.device.type != "cpu")

    @cached_property
    def text_bytes(self) -> int:
        """A --text-encoder file's weights kept on the device beside the transformer's (without --offload model),
        at their packed sizes, from the headers; 0 for the folder's (not counted, as before split files)."""
        if not self.files.text_encoder or self.offload != "none":
            return 0
        return text_weight_bytes(self.files, self.kind.edits, self.dtype, self.source.unpacks(self.device))

    def _release(self, component: str) -> None:
        """With offload=model, free a component ("text", "transformer", or the VAE's "encoder" or "decoder") once
        its part of the job is done; it reloads when next needed."""
        if self.offload != "model" and not (component == "text" and self.devices and self.placement.text_released):
            return
        self._free(component)

    def _free(self, component: str) -> None:
        if component in VAE_PARTS:
            self._vae.pop(component, None)
        else:
            setattr(self, f"_{component}", None)
        gc.collect()
        if any(d.type == "cuda" for d in (self.device, *self.devices)):
            torch.cuda.empty_cache()

    def _attention_backend(self):
        if self.attention == "auto":
            return nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        names = {"math": "MATH", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "cudnn": "CUDNN_ATTENTION"}
        return sdpa_kernel(getattr(SDPBackend, names[self.attention]))

    def _config(self, cls, component: str):
        try:
            return cls.from_dict(read_config(self.folder / component))
        except (ValueError, TypeError) as e:
            raise QimgError(f"{self.folder / component / 'config.json'}: {e}") from None

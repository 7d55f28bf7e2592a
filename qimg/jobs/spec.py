"""Jobs as data: what one command asks for, parsed and typed, with nothing loaded yet. The command line
builds them (cli/app.py, cli/to_job.py, cli/chain_file.py), the runner executes them (jobs/runner.py); batches and
chains are jobs too. The worker does not share these classes: its client sends the command's argv and the
worker's job process runs the command line again (worker/runner.py)."""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from qimg.jobs.shard import Shard
from qimg.option_values import CACHE_SIZE, CONTEXT, MASK_THRESHOLD, RAY_RETRIES, SAFETY_THRESHOLD
from qimg.parallel.layout import Layout


@dataclass(frozen=True)
class ModelSpec:
    """Which engine runs the job: everything that changes its numbers or its memory use."""

    model: Optional[str] = None  # folder, repo id or builtin; None: $QIMG_MODEL, else builtin
    device: str = "auto"
    dtype: str = "auto"
    offload: str = "none"
    compile: bool = False
    attention: str = "auto"
    vae_tiling: str = "auto"
    loras: tuple = ()  # lora.LoraSpec, applied in order (they add up)
    transformer: Optional[Path] = None  # the transformer's weights from one file (GGUF, fp8, ...)
    dequantize: Optional[bool] = None  # unpack packed weights at load; None: on the CPU only
    quantize: str = "none"  # fp8: pack the transformer's block weights at load
    local_rank: Optional[int] = None  # torchrun's LOCAL_RANK (--shard auto): with device auto, that GPU
    transformer_from_env: bool = False  # the transformer file came from $QIMG_TRANSFORMER, not --transformer
    devices: tuple[str, ...] = ()  # --devices: the transformer's blocks split over these; (): one device
    split: tuple[int, ...] = ()  # --split: blocks per device; (): by their free memory
    text_encoder: Optional[Path] = None  # the text encoder from one file (ComfyUI's, a llama.cpp GGUF)
    vae: Optional[Path] = None  # the VAE from one file (Wan or diffusers names)
    vision: Optional[Path] = None  # an Edit model's vision tower from a llama.cpp mmproj file
    parallel: Optional[Layout] = None  # --cfg-parallel, --ulysses, --tp: one image on the ranks of a torchrun

    def speed(self) -> dict:
        """The Engine's memory and speed options, and where its transformer weights come from (an absolute path:
        the worker keys its kept engine off it)."""
        return dict(offload=self.offload, compile=self.compile, attention=self.attention, vae_tiling=self.vae_tiling,
                    transformer=os.path.abspath(self.transformer) if self.transformer else None,
                    dequantize=self.dequantize, quantize=self.quantize, devices=self.devices, split=self.split,
                    **{part: os.path.abspath(f) if f else None for part, f in (
                        ("text_encoder", self.text_encoder), ("vae", self.vae), ("vision", self.vision))})


@dataclass(frozen=True)
class CacheSpec:
    folder: Optional[Path] = None  # None: the default cache folder
    off: bool = False
    size: str = CACHE_SIZE


@dataclass(frozen=True)
class Prompt:
    prompt: str
    negative_prompt: Optional[str] = None  # None: the model's
    steps: Optional[int] = None
    cfg: Optional[float] = None
    seed: Optional[int] = None  # None: random, reported
    reuse: float = 0.0  # adaptive velocity reuse threshold; 0: off
    cfg_until: float = 1.0  # true CFG for this first fraction of the steps; 1: every step
    shift: Optional[float] = None  # a constant flow shift (Lightning); None: the model's schedule
    kv_cache: bool = True  # Qwen-Image-2.1's prefix key/value cache (--no-kv-cache: off)

    def resolve(self, defaults, seed: int, strength: float = 1.0):
        """The request the engine takes (engine.request.Sampling), every value this prompt leaves open filled in
        from the model's `defaults` (components.Defaults); the seed is the caller's (a random one, a batch
        file's, a chain edit's)."""
        from qimg.engine.request import Sampling
        from qimg.sampling import Shortcuts

        return Sampling(self.prompt, defaults.negative_prompt if self.negative_prompt is None else self.negative_prompt,
                        self.steps or defaults.steps, defaults.cfg if self.cfg is None else self.cfg, seed, strength,
                        Shortcuts(self.reuse, self.cfg_until, self.shift, self.kv_cache))


@dataclass(frozen=True)
class Safety:
    """The safety filter (jobs/safety.py, docs/safety.md): what it checks, with what, and what a hit does; the
    command line has already applied the operator's environment ($QIMG_SAFETY and the rest)."""

    check: str = "off"  # off, prompt, image, both (option_values.SAFETY)
    words: tuple[Path, ...] = ()  # word lists: $QIMG_SAFETY_WORDS's and --safety-words' (both apply)
    prompt_classifier: Optional[str] = None  # module:callable, a function of the text
    classifier: Optional[str] = None  # module:callable (a function of a PIL image) or an .onnx file; None: default
    threshold: float = SAFETY_THRESHOLD  # a score at or over it is a hit
    action: str = "refuse"  # an image hit: refuse, blur or black (option_values.SAFETY_ACTIONS)
    debug: bool = False  # --debug: a prompt hit's line names what matched
    item: Optional[str] = None  # a --prompts entry ("p.txt line 2"): a hit's line names it, not its output file

    @property
    def prompts(self) -> bool:
        return self.check in ("prompt", "both")

    @property
    def images(self) -> bool:
        return self.check in ("image", "both")


@dataclass(frozen=True)
class Output:
    """Where results go and how they are reported."""

    out: Optional[Path] = None
    overwrite: bool = False
    as_json: bool = False
    preview: Optional[Path] = None  # the running estimate of the image, replaced as it renders; a batch: a folder
    preview_every: Optional[int] = None  # steps between previews; None: about a tenth of the steps
    metadata: str = "full"  # what a PNG output records: full, minimal, off (option_values.METADATA)
    safety: Safety = field(default_factory=Safety)  # what is held back before it is written
    background: Optional[tuple[int, int, int]] = None  # --background: an RGBA result flattened over this colour
    quiet: bool = False  # --quiet: no licence notice


@dataclass(frozen=True)
class Generate:
    prompt: Prompt
    size: Optional[tuple[int, int]] = None  # (W, H); None: the model's
    output: Output = field(default_factory=Output)
    model: ModelSpec = field(default_factory=ModelSpec)
    cache: CacheSpec = field(default_factory=CacheSpec)
    preset: Optional[str] = None  # recorded in the metadata
    member: bool = False  # one entry of a --prompts batch: its output named "output", not "--out", in messages


@dataclass(frozen=True)
class WordMask:
    """A mask from words (--mask-prompt, `qimg mask`): the union of the phrases' regions (jobs/word_masks.py)."""

    phrases: tuple[str, ...]
    model: Optional[str] = None  # clipseg, grounded-sam, a folder or repo id; None: clipseg
    threshold: float = MASK_THRESHOLD
    device: str = "auto"


@dataclass(frozen=True)
class InpaintMask:
    """How each input's inpaint mask is made."""

    mask: Optional[Path] = None
    mask_dir: Optional[Path] = None  # a batch: DIR/<stem>.png or DIR/<stem>_mask.png per input
    rect: tuple[str, ...] = ()
    mask_resize: bool = False
    invert_mask: bool = False
    grow: int = 0
    feather: int = 0
    words: Optional[WordMask] = None  # --mask-prompt: regions from words, in the union with --mask and --rect
    save_mask: Optional[Path] = None  # --save-mask: the mask used written here (a file, or a batch's folder)


@dataclass(frozen=True)
class Mask:
    """`qimg mask`: one mask file from words per input, `<stem>_mask.png` (what --mask-dir reads)."""

    images: tuple[Path, ...]
    words: WordMask
    invert_mask: bool = False
    grow: int = 0
    feather: int = 0
    output: Output = field(default_factory=Output)
    out_dir: Optional[Path] = None
    skip_existing: bool = False
    cache: CacheSpec = field(default_factory=CacheSpec)


@dataclass(frozen=True)
class Outpaint:
    """How far each input's canvas grows."""

    left: int = 0
    right: int = 0
    top: int = 0
    bottom: int = 0
    expand: int = 0
    to: Optional[tuple[int, int]] = None  # (W, H): --to, parsed by the command line
    anchor: str = "center"
    feather: int = 32


@dataclass(frozen=True)
class Inpaint:
    """inpaint or outpaint over one file or a batch (files, folders, globs)."""

    images: tuple[Path, ...]
    shape: Union[InpaintMask, Outpaint]
    prompt: Prompt
    strength: float = 1.0
    attn_mask: str = "off"
    context: int = CONTEXT
    output: Output = field(default_factory=Output)
    out_dir: Optional[Path] = None
    skip_existing: bool = False
    model: ModelSpec = field(default_factory=ModelSpec)
    cache: CacheSpec = field(default_factory=CacheSpec)
    preset: Optional[str] = None
    shard: Optional[Shard] = None  # --shard: only this part of the batch
    member: bool = False  # one file of a batch whose other files run elsewhere (a Ray actor's): named, seeded,
    # reported as in the batch, whose up-front checks the batch's own process made

    @property
    def kind(self) -> str:
        return "inpaint" if isinstance(self.shape, InpaintMask) else "outpaint"


@dataclass(frozen=True)
class Edit:
    """edit: an instruction applied with an Edit model to one file or a batch, everywhere or inside a mask."""

    images: tuple[Path, ...]
    prompt: Prompt
    refs: tuple[Path, ...] = ()  # Pictures 2, 3...: the same for every input
    shape: Optional[InpaintMask] = None  # None: the whole picture
    strength: float = 1.0
    size: Optional[tuple[int, int]] = None  # (W, H) of the output; None: the input's
    edit_area: Optional[int] = None  # None: the model's (qimg.json), else the reference's
    vision_area: Optional[int] = None
    mask_crop: Optional[int] = None  # the model sees the mask's box plus this margin; None: the whole picture
    output: Output = field(default_factory=Output)
    out_dir: Optional[Path] = None
    skip_existing: bool = False
    model: ModelSpec = field(default_factory=ModelSpec)
    cache: CacheSpec = field(default_factory=CacheSpec)
    preset: Optional[str] = None
    shard: Optional[Shard] = None  # --shard: only this part of the batch
    member: bool = False  # one file of a batch run elsewhere (a Ray actor's), as in Inpaint
    kind = "edit"


@dataclass(frozen=True)
class ChainStep:
    """One edit of a chain file, its options resolved by the command line (cli/chain_file.py): the edit's own
    over its preset's over the file's defaults, the chain's command line over all."""

    index: int  # 1-based, as errors and reports say it
    kind: str  # "inpaint", "outpaint" or "edit"
    where: str  # how errors name it: the chain file, the index, the kind
    prompt: Prompt
    shape: Union[InpaintMask, Outpaint, None]  # None: an instruction edit of the whole picture
    strength: float = 1.0
    refs: tuple[Path, ...] = ()  # an instruction edit's Pictures 2, 3...
    attn_mask: str = "off"  # an inpaint's or outpaint's
    context: int = CONTEXT
    edit_area: Optional[int] = None  # an instruction edit's; None: the model's
    vision_area: Optional[int] = None
    preset: Optional[str] = None  # the edit's own --preset, recorded in the lineage


@dataclass(frozen=True)
class Chain:
    """A chain file's edits (read and checked by the command line) run on one image."""

    image: Path
    chain_file: Path
    steps: tuple[ChainStep, ...]  # one per edit
    seed: Optional[int] = None
    keep_steps: Optional[Path] = None
    output: Output = field(default_factory=Output)
    model: ModelSpec = field(default_factory=ModelSpec)
    cache: CacheSpec = field(default_factory=CacheSpec)
    preset: Optional[str] = None


@dataclass(frozen=True)
class Prompts:
    """generate --prompts FILE: one image per entry of the file (prompts.py), <out_dir>/<n>-<slug>.png."""

    file: Path
    prompt: Prompt  # the command line's values for every entry (its prompt text unused); an entry's own win
    size: Optional[tuple[int, int]] = None
    output: Output = field(default_factory=Output)
    out_dir: Path = Path(".")
    skip_existing: bool = False
    model: ModelSpec = field(default_factory=ModelSpec)
    cache: CacheSpec = field(default_factory=CacheSpec)
    preset: Optional[str] = None
    shard: Optional[Shard] = None


@dataclass(frozen=True)
class RaySpec:
    """--ray: the batch's files spread over a pool of Ray actors, each holding one loaded engine."""

    address: str  # local: a cluster started for the run; auto: $RAY_ADDRESS or the running one; else an address
    workers: Optional[int] = None  # --ray-workers: this many actors on CPUs; None: one per GPU of the cluster
    retries: int = RAY_RETRIES  # a file whose actor failed or was lost runs again on another, this many times


Job = Union[Generate, Inpaint, Edit, Chain, Prompts, Mask]

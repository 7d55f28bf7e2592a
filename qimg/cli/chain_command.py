"""`qimg chain`: a list of edits from a YAML file (read by chain_file.py) run on one image in one process."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from qimg.cli.execute import execute
from qimg.cli.options import (
    OUTPUT,
    AttentionOpt,
    BackgroundOpt,
    CacheDirOpt,
    CacheSizeOpt,
    CfgOpt,
    CfgParallelOpt,
    CfgUntilOpt,
    CompileOpt,
    DequantizeOpt,
    DeviceOpt,
    DevicesOpt,
    DtypeOpt,
    JsonOpt,
    LoraOpt,
    MetadataOpt,
    ModelOpt,
    NoCacheOpt,
    NoWorkerOpt,
    OffloadOpt,
    OutOpt,
    OverwriteOpt,
    PresetOpt,
    PreviewEveryOpt,
    PreviewOpt,
    QuantizeOpt,
    QuietOpt,
    ReuseOpt,
    SafetyActionOpt,
    SafetyClassifierOpt,
    SafetyOpt,
    SafetyPromptClassifierOpt,
    SafetyThresholdOpt,
    SafetyWordsOpt,
    SeedOpt,
    ShiftOpt,
    SplitOpt,
    StepsOpt,
    TextEncoderOpt,
    TilingOpt,
    TpOpt,
    TransformerOpt,
    UlyssesOpt,
    VaeOpt,
    VisionOpt,
)
from qimg.cli.to_job import cache_of, model_of, output_of, working_folder
from qimg.jobs import spec
from qimg.option_values import CACHE_SIZE, SAFETY_THRESHOLD


def chain(
    ctx: typer.Context, image: Annotated[Path, typer.Argument(help="Input image.", show_default=False)],
    chain_file: Annotated[Path, typer.Argument(help="YAML file: optional defaults, then `edits:`, a list of "
                                                    "{inpaint: {...}} / {outpaint: {...}} / {edit: {...}}.",
                                                    show_default=False)],
    steps: StepsOpt = None, cfg: CfgOpt = None, seed: SeedOpt = None, preset: PresetOpt = None,
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", out: OutOpt = None,
    keep_steps: Annotated[Optional[Path], typer.Option(
        rich_help_panel=OUTPUT, help="Folder to write each edit's image to, as <stem>.<NN>-<kind>.png.")] = None,
    overwrite: OverwriteOpt = False, json_: JsonOpt = False, metadata: MetadataOpt = "full",
    cache_dir: CacheDirOpt = None, no_cache: NoCacheOpt = False, cache_size: CacheSizeOpt = CACHE_SIZE,
    offload: OffloadOpt = "none", compile_: CompileOpt = False, attention: AttentionOpt = "auto",
    vae_tiling: TilingOpt = "auto", reuse: ReuseOpt = None, cfg_until: CfgUntilOpt = None,
    no_worker: NoWorkerOpt = False, preview: PreviewOpt = None, preview_every: PreviewEveryOpt = None,
    lora: LoraOpt = None, shift: ShiftOpt = None, transformer: TransformerOpt = None,
    dequantize: DequantizeOpt = None, quantize: QuantizeOpt = "none", devices: DevicesOpt = None,
    split: SplitOpt = None, text_encoder: TextEncoderOpt = None, vae: VaeOpt = None, vision: VisionOpt = None,
    safety: SafetyOpt = None, safety_words: SafetyWordsOpt = None, safety_classifier: SafetyClassifierOpt = None,
    safety_prompt_classifier: SafetyPromptClassifierOpt = None, safety_threshold: SafetyThresholdOpt = SAFETY_THRESHOLD,
    safety_action: SafetyActionOpt = "refuse", background: BackgroundOpt = None, quiet: QuietOpt = False,
    cfg_parallel: CfgParallelOpt = False, ulysses: UlyssesOpt = 1, tp: TpOpt = 1,
):
    """Run a list of inpaint/outpaint edits (or, with an Edit model, edit: instructions) in one process, the
    latent carried in memory between them.

    --steps, --cfg, --seed, --reuse, --cfg-until and --shift (given here or by a preset) apply to every edit and
    win over the file's values, and --lora to the whole chain;
    an edit with no seed anywhere takes one random seed, reported. Each edit's result is cached (with the
    prompt embeddings, as the other commands cache theirs), so a re-run recomputes from the first changed edit."""
    from qimg.cli.chain_file import read_chain

    working_folder()  # before the chain's files are read
    given = {k: v for k, v in (("steps", steps), ("cfg", cfg), ("seed", seed), ("reuse", reuse),
                               ("cfg_until", cfg_until), ("shift", shift)) if v is not None}
    edit_steps = tuple(read_chain(ctx, chain_file, given))
    execute(spec.Chain(image, chain_file, edit_steps, seed, keep_steps, output_of(locals()), model_of(locals()),
                       cache_of(locals()), preset), json_)

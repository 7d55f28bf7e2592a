"""The job runner: executes a job (spec.py) against an engine and reports through a Reporter.

Every check that needs no model runs before one loads (the cache options, the model folder, output names,
input files, masks, chain plans), so a mistake costs nothing. In the worker, the engine of the last job
stays loaded for the next (kept_engine.py). One module per kind of job: generate.py (one prompt, or a
--prompts batch), edit.py (inpaint, outpaint, edit; one file or a batch), chain.py; previews.py writes
--preview files, common.py what every job does around its engine call (cache, model, engine, saving).
"""

from pathlib import Path

from qimg.errors import UsageError, Withheld
from qimg.jobs import chain, edit, generate, mask
from qimg.jobs.metadata import read_params
from qimg.jobs.report import Reporter
from qimg.jobs.spec import Chain, Edit, Generate, Inpaint, Job, Mask, Prompts
from qimg.small_files import GGUF_MAGIC, open_regular, safetensors_header


def execute(job: Job, reporter: Reporter) -> None:
    run = {Generate: generate.generate, Inpaint: edit.edit, Edit: edit.edit, Chain: chain.chain,
           Prompts: generate.prompts, Mask: mask.mask}[type(job)]
    try:
        if getattr(getattr(job, "model", None), "parallel", None) is not None:  # one image, every torchrun rank
            from qimg.jobs import together

            together.execute(job, reporter, run)
        else:
            run(job, reporter)
    except Withheld as e:  # a single item's (a batch's end has no record): --json says so too
        if e.record:
            reporter.withheld(item_of(job), e, line=False)
        raise


def item_of(job: Job):
    """How a single run's JSON names its item: its input image, else its --out, else its prompt."""
    images = getattr(job, "images", None) or (getattr(job, "image", None),)
    return images[0] if len(images) == 1 and images[0] else job.output.out or "--prompt"


def file_info(path: Path) -> dict:
    """`qimg info FILE`: a qimg image's parameters or a LoRA's summary. The file is opened the one way
    (small_files: a regular file, so a FIFO or a device is refused, not waited on) and told by its first bytes."""
    with open_regular(path, "", "; give an image qimg wrote or a LoRA file") as f:
        head = f.read(4)
        lora = path.suffix.lower() == ".safetensors" or safetensors_header(f, str(path)) is not None
    if head == GGUF_MAGIC or lora:  # a model part's file (transformer, text encoder, VAE, vision tower)?
        from qimg.weights.comfy_folder import describe_file

        part = describe_file(path)
        if part is not None:
            return part
    if head == GGUF_MAGIC:
        raise UsageError(f"{path} is a GGUF file of no model part qimg reads (a Qwen-Image part's file goes to "
                         "--transformer, --text-encoder or --vision); qimg info reads images qimg wrote, LoRA files "
                         "and those parts' files")
    return lora_info(path) if lora else read_params(path)


def lora_info(path: Path) -> dict:
    """`qimg info` on a LoRA file: lora.summary against Qwen-Image's layer names (the same in every variant)."""
    import torch

    from qimg.model.transformer import QwenImageTransformer, TransformerConfig
    from qimg.weights.adapters import targets
    from qimg.weights.lora import summary

    with torch.device("meta"):
        return summary(path, targets(QwenImageTransformer(TransformerConfig())))

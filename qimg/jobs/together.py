"""A job whose one image runs on every rank of a torchrun (--cfg-parallel, --ulysses, --tp; qimg/parallel): the
checks every rank makes alike before the ranks connect, then rank 0 runs the job and the others serve its
transformer calls until it is done.

Only rank 0 speaks: a refusal every rank reaches alike (the world size, the head count, an option that does not
combine) is said by rank 0 alone, the others exit with its code in silence; so is a file every rank loads after
connecting (a bad --lora, --transformer or weights file: rank 0 fails on it as well). Warnings are rank 0's. What
fails on one rank only (a lost peer, a timeout, its own memory) that rank says, in one line naming it."""

import os
import warnings
from typing import Callable

from qimg.errors import QimgError, QimgWarning, UsageError
from qimg.jobs.common import engine_device, open_engine, resolve_model
from qimg.parallel.layout import check_world, timeout


def execute(job, reporter, run: Callable) -> None:
    layout = job.model.parallel
    try:
        check_world(layout)
        timeout()  # QIMG_PARALLEL_TIMEOUT, which the group reads once the ranks connect
        check_options(job)
        folder = resolve_model(job.model)
        layout.check_heads(heads(folder))
        device = engine_device(job.model)
    except UsageError as e:
        if os.environ.get("RANK", "0").strip() not in ("", "0"):
            raise SystemExit(e.code) from None  # rank 0 says it
        raise
    from qimg.parallel import group

    ranks = group.start(layout, device)
    try:
        if ranks.lead:
            run(job, reporter)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", QimgWarning)
                try:
                    ranks.serve(open_engine(folder, job.model, None).transformer)
                except QimgError as e:  # a bad --lora, --transformer or weights file: rank 0 fails on it and says it
                    if isinstance(e, group.Stopped):
                        raise
                    raise SystemExit(e.code) from None
    finally:
        group.stop()


def heads(folder) -> int:
    """The model's attention heads, from its transformer config (Qwen-Image's or 2.1's)."""
    from qimg.model.transformer import TransformerConfig
    from qimg.model.transformer21 import Transformer21Config
    from qimg.weights.folders import model_kind, read_config

    config = Transformer21Config if model_kind(folder).family == "qwen-image-2.1" else TransformerConfig
    try:
        return config.from_dict(read_config(folder / "transformer")).num_attention_heads
    except (ValueError, TypeError) as e:
        raise QimgError(f"{folder / 'transformer' / 'config.json'}: {e}") from None


def check_options(job) -> None:
    """The options that do not combine with these modes yet, each refused by name."""
    layout, model = job.model.parallel, job.model
    names = layout.named
    refused = {  # option: (given, why)
        "--shard": (getattr(job, "shard", None) is not None, "these put every rank on each image of a batch, one "
                    "image at a time; run the whole batch"),
        "--devices": (bool(model.devices), "--devices splits the layers within one process; give each rank one "
                      "device"),
        "--offload blocks": (model.offload == "blocks", "each rank keeps its blocks on its device (--offload "
                             "model works: rank 0 frees its text encoder, transformer and VAE between uses)"),
        "--compile": (model.compile and (layout.ulysses > 1 or layout.tp > 1), "the exchanges inside the blocks "
                      "are not compiled"),
    }
    for option, (given, why) in refused.items():
        if given:
            raise UsageError(f"{option} does not combine with {names} yet: {why}")
    check_device(model.device, names)
    if layout.tp > 1:
        from qimg.parallel.tensor import check_source

        check_source(model.transformer, model.quantize, f"--tp {layout.tp}")


def check_device(name: str, names: str) -> None:
    """Each rank takes a device of its own: GPU LOCAL_RANK of its node (--device auto or cuda; NCCL wants one GPU
    per rank) or the CPU (gloo)."""
    import torch

    from qimg.engine.devices import pick_device

    device = pick_device(name)
    if device.type == "mps":
        raise UsageError(f"{names} runs its ranks on CUDA GPUs or the CPU, not MPS (--device {name}): give "
                         "--device cpu")
    if device.type != "cuda":
        return
    if device.index is not None:
        raise UsageError(f"--device {name} puts every rank on GPU {device.index}: give --device cuda or auto with "
                         f"{names} (each rank takes GPU LOCAL_RANK of its node)")
    local, gpus = os.environ.get("LOCAL_WORLD_SIZE", "").strip(), torch.cuda.device_count()
    if local.isdigit() and int(local) > gpus:
        raise UsageError(f"{names}: torchrun starts {local} ranks on this node (LOCAL_WORLD_SIZE) and {gpus} GPU(s) "
                         f"are visible; NCCL needs one GPU per rank: start at most --nproc-per-node {gpus} per node "
                         "(on more nodes), or give --device cpu")

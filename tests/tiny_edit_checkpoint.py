"""Tiny random Qwen-Image-Edit checkpoints (Edit, 2509, 2511) in the diffusers folder layout, and the
diffusers pipelines run on them as the reference.

One set of random weights serves all three folders; they differ where the real ones do: model_index.json
names QwenImageEditPipeline (Edit) or QwenImageEditPlusPipeline (2509 and 2511), and 2511's transformer
config sets `zero_cond_t`. The text encoder carries a real (if small) vision tower: two blocks, one of them
full attention, so the windowed path runs. The tokenizer is trained on the base and the edit templates, so
their system prefixes are exactly the 34 and 64 tokens the reference pipelines drop. `processor/` holds the
tokenizer and the image processor's config, written by hand: transformers cannot save a Qwen2VLProcessor
without torchvision (and with torchvision it would switch the image processor to another backend).

The reference pipelines are assembled from components, with the fixes the research notes list
(/work/shared/research/edit.md, section 5): the processor built without a video processor, the PIL image
processor, and `mm_token_type_ids` passed to the text encoder so image tokens get their trained 3D mRoPE
positions (diffusers 0.42.1 with transformers >= 5.15 drops them). `small_areas` shrinks the pipelines'
hard-coded 1 MP and 384x384 areas, which would take minutes on CPU.
"""

import json
import shutil
from pathlib import Path

import torch
from tiny_checkpoint import PROMPTS, TEXT_HIDDEN, perturb

from qimg.model.instruct_text import EDIT_TEMPLATE, PLUS_PICTURE
from qimg.model.text import TEMPLATE
from qimg.train.checkpoint import COMPONENTS, DIFFUSERS_VERSION, SCHEDULER_CONFIG, text_encoder, train_tokenizer

# The research notes' tiny Qwen2.5-VL vision config: two blocks, the second one full attention; the real
# patch, merge, temporal and window sizes, so windows are 4x4 merged tokens and small images fill them partly.
VISION = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=TEXT_HIDDEN,
              fullatt_block_indexes=[1], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
              window_size=112)
MIN_PIXELS, MAX_PIXELS = 3136, 12845056  # Qwen-Image-Edit's processor/preprocessor_config.json
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
KINDS = {"edit": "QwenImageEditPipeline", "plus": "QwenImageEditPlusPipeline", "2511": "QwenImageEditPlusPipeline"}
PICTURES = [PLUS_PICTURE.format(i).split("<")[0] for i in (1, 2, 3)]  # "Picture 1: " ...


def build_tokenizer():
    """Both templates' words one token each (so the prefixes are 34 and 64 tokens), and "Picture N: "."""
    return train_tokenizer(PROMPTS + PICTURES * 100, vocab_size=500, templates=(TEMPLATE, EDIT_TEMPLATE))


def preprocessor_config() -> dict:
    """As Qwen-Image-Edit ships it: the pixel bounds both at the top (Qwen2.5-VL's own keys) and in `size`
    (what transformers >= 5 writes)."""
    return {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "image_processor_type": "Qwen2VLImageProcessor",
        "max_pixels": MAX_PIXELS, "merge_size": 2, "min_pixels": MIN_PIXELS, "patch_size": 14,
        "processor_class": "Qwen2VLProcessor", "resample": 3, "rescale_factor": 1 / 255,
        "size": {"longest_edge": MAX_PIXELS, "shortest_edge": MIN_PIXELS}, "temporal_patch_size": 2,
    }


def build_tiny_edit_checkpoints(root: Path, seed: int = 0) -> dict[str, Path]:
    """Write the Edit, 2509 and 2511 folders under `root`; {"edit" | "plus" | "2511": folder}."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    root = Path(root)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    encoder = text_encoder(tokenizer, TEXT_HIDDEN, vision=VISION)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_HIDDEN, axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=16)
    for model in (encoder, transformer, vae):
        perturb(model)

    first = root / "edit"
    encoder.save_pretrained(first / "text_encoder", safe_serialization=True)
    transformer.save_pretrained(first / "transformer", safe_serialization=True)
    vae.save_pretrained(first / "vae", safe_serialization=True)
    for name in ("tokenizer", "processor"):
        tokenizer.save_pretrained(first / name)
    (first / "processor" / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(), indent=2) + "\n")
    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION}
    (first / "scheduler").mkdir()
    (first / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler | SCHEDULER_CONFIG, indent=2))

    folders = {}
    for kind, pipeline in KINDS.items():
        folder = root / kind
        if folder != first:
            shutil.copytree(first, folder)
        index = {"_class_name": pipeline, "_diffusers_version": DIFFUSERS_VERSION,
                 "processor": ["transformers", "Qwen2VLProcessor"]} | COMPONENTS
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if kind == "2511":
            config = folder / "transformer" / "config.json"
            config.write_text(json.dumps(json.loads(config.read_text()) | {"zero_cond_t": True}, indent=2))
        folders[kind] = folder
    return folders


def allow_missing_video_processor():
    """transformers checks every processor argument's class, the absent video processor's too, which fails
    without torchvision: skip the check for None (idempotent)."""
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class
    if getattr(check, "allows_none", False):
        return

    def checked(self, name, argument):
        return None if argument is None else check(self, name, argument)

    checked.allows_none = True
    ProcessorMixin.check_argument_for_proper_class = checked


def reference_processor(folder: Path):
    """The Qwen2VLProcessor the pipelines run: the folder's tokenizer and the PIL image processor."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    allow_missing_video_processor()
    images = Qwen2VLImageProcessorPil.from_pretrained(folder / "processor")
    return Qwen2VLProcessor(image_processor=images, tokenizer=AutoTokenizer.from_pretrained(folder / "processor"))


def pass_token_types(encoder) -> None:
    """Make the text encoder see `mm_token_type_ids` (1 at image tokens) as the processor returns them, so
    image tokens get 3D mRoPE positions as trained (diffusers#14194; the fix of PR #14189)."""
    import inspect

    forward = encoder.forward
    assert "mm_token_type_ids" in inspect.signature(forward).parameters

    def with_types(*args, input_ids=None, **kwargs):
        if input_ids is not None and kwargs.get("mm_token_type_ids") is None:
            kwargs["mm_token_type_ids"] = (input_ids == encoder.config.image_token_id).int()
        return forward(*args, input_ids=input_ids, **kwargs)

    encoder.forward = with_types


def reference_edit_pipeline(folder: Path, token_types: bool = True):
    """The folder's diffusers edit pipeline in float32, assembled from components; `token_types=False` keeps
    diffusers 0.42.1's own behaviour (1D positions for the image tokens)."""
    import diffusers
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    pipeline = getattr(diffusers, json.loads((folder / "model_index.json").read_text())["_class_name"])
    encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder / "text_encoder", dtype=torch.float32)
    if token_types:
        pass_token_types(encoder)
    pipe = pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        vae=AutoencoderKLQwenImage.from_pretrained(folder / "vae", dtype=torch.float32),
        text_encoder=encoder.eval(),
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
        processor=reference_processor(folder),
        transformer=QwenImageTransformer2DModel.from_pretrained(folder / "transformer", dtype=torch.float32),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def small_areas(monkeypatch, edit_area: int, vision_area: int) -> None:
    """Make the edit pipelines size with `edit_area` where they hard-code 1024*1024 (condition image, output;
    2509's VAE_IMAGE_SIZE) and `vision_area` where they hard-code 384*384 (CONDITION_IMAGE_SIZE, the vision
    images): every area goes through their calculate_dimensions."""
    from diffusers.pipelines.qwenimage import (
        pipeline_qwenimage_edit,
        pipeline_qwenimage_edit_inpaint,
        pipeline_qwenimage_edit_plus,
    )

    areas = {1024 * 1024: edit_area, 384 * 384: vision_area}
    for module in (pipeline_qwenimage_edit, pipeline_qwenimage_edit_inpaint, pipeline_qwenimage_edit_plus):
        original = module.calculate_dimensions
        monkeypatch.setattr(module, "calculate_dimensions",
                            lambda area, ratio, original=original: original(areas.get(area, area), ratio))

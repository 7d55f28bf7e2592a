"""Load Qwen-Image-2.1's text encoder (Qwen3-VL: model/qwen3vl.py and model/qwen3vl_vision.py) from a model
folder's `text_encoder/`, and its image processor's settings from `processor/`, as transformers saves
Qwen3VLForConditionalGeneration and Qwen3VLProcessor. Every weight is checked as it is read; lm_head and the
final norm are accepted unread (the pipeline uses neither). A folder that is incomplete or from another model
is one error line naming the file or key."""

from pathlib import Path

import torch

from qimg.errors import QimgError, UsageError
from qimg.model import qwen3vl, qwen3vl_vision
from qimg.model.qwen3vl import Qwen3VLTextConfig, Qwen3VLTextModel
from qimg.model.qwen3vl_image import image_config
from qimg.model.qwen3vl_vision import Qwen3VLEncoder, Qwen3VLVisionConfig, Qwen3VLVisionTower
from qimg.model.vl_image import ImageConfig
from qimg.weights.folders import load_module, read_config, read_json_object, weight_names


def load_qwen3vl(encoder: Path, dtype: torch.dtype, device: torch.device) -> Qwen3VLEncoder:
    """The language model and vision tower in `encoder` (a text_encoder/ folder: config.json + safetensors),
    in dtype on device."""
    if not encoder.is_dir():
        raise QimgError(f"{encoder} is missing: the model folder is incomplete")
    text_cfg, vision_cfg = configs(encoder)
    if not any(qwen3vl_vision.remap_keys(k) for k in weight_names(encoder)):
        raise UsageError(f"{encoder} has no vision tower weights (model.visual.*): Qwen-Image-2.1 needs the full "
                         "Qwen3-VL text encoder; download it again")
    try:
        text = load_module(lambda: Qwen3VLTextModel(text_cfg), encoder, dtype, device, remap=qwen3vl.remap_keys)
        tower = load_module(lambda: Qwen3VLVisionTower(vision_cfg), encoder, dtype, device,
                            remap=qwen3vl_vision.remap_keys)
    except QimgError as e:
        raise QimgError(f"cannot load the text encoder from {encoder.parent}: {e}") from None
    return Qwen3VLEncoder(text, tower).eval().requires_grad_(False)


def configs(encoder: Path) -> tuple[Qwen3VLTextConfig, Qwen3VLVisionConfig]:
    """The language model's and the vision tower's configs from encoder/config.json, checked to fit together."""
    file = encoder / "config.json"
    d = read_config(encoder)
    if d.get("model_type", "qwen3_vl") != "qwen3_vl":
        raise QimgError(f"{file}: model_type {d['model_type']!r:.40} is not qwen3_vl; Qwen-Image-2.1's text "
                        "encoder is Qwen3-VL (files from another model?)")
    try:
        text_cfg, vision_cfg = Qwen3VLTextConfig.from_dict(d), Qwen3VLVisionConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise QimgError(f"{file}: {e}") from None
    if vision_cfg.out_hidden_size != text_cfg.hidden_size:
        raise QimgError(f"{file}: vision_config out_hidden_size {vision_cfg.out_hidden_size} is not text_config "
                        f"hidden_size {text_cfg.hidden_size}")
    if len(vision_cfg.deepstack_visual_indexes) > text_cfg.num_hidden_layers:
        raise QimgError(f"{file}: more DeepStack blocks than language model layers")
    return text_cfg, vision_cfg


def load_image_config(processor: Path, vision_cfg: Qwen3VLVisionConfig | None = None) -> ImageConfig:
    """The image processor's settings from a processor/ folder: preprocessor_config.json (transformers 4's
    save), else processor_config.json's `image_processor` (transformers 5's). With vision_cfg, checked to cut
    the patches that tower reads."""
    legacy, current = processor / "preprocessor_config.json", processor / "processor_config.json"
    if legacy.is_file():
        file, d = legacy, read_json_object(legacy)
    elif current.is_file():
        file, d = current, read_json_object(current).get("image_processor")
        if not isinstance(d, dict):
            raise UsageError(f"{file} has no image_processor settings; download the model's processor/ again")
    else:
        raise UsageError(f"{processor} has neither preprocessor_config.json nor processor_config.json: "
                         "Qwen-Image-2.1 needs its processor/ folder; download it again")
    try:
        cfg = image_config(d)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{file}: {e}") from None
    if vision_cfg is not None:
        patches = (vision_cfg.patch_size, vision_cfg.spatial_merge_size, vision_cfg.temporal_patch_size)
        if patches != (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size):
            raise QimgError(f"{file} cuts patches of another size than the text encoder's vision tower: they are "
                            "from different models")
    return cfg

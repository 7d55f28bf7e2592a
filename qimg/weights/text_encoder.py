"""Load the text encoders from a model folder, as the transformer and VAE are loaded: Qwen-Image's prompt
encoder (model/text.py) from `tokenizer/` and `text_encoder/`, and an Edit model's instruction encoder
(model/instruct_text.py) from `text_encoder/` (language model and vision tower) and `processor/` (tokenizer and
image sizes). Each file is checked as it is read, and a folder that is incomplete or from another model is one
error line naming what is wrong."""

from pathlib import Path

import torch

from qimg.errors import QimgError, UsageError
from qimg.model import instruct_text, text, vision
from qimg.model.instruct_text import InstructEncoder
from qimg.model.qwen2 import Qwen2Config, Qwen2Model, remap_keys
from qimg.model.text import TextEncoder
from qimg.model.tokenizer import Tokenizer
from qimg.model.vision import VisionConfig, VisionTower
from qimg.model.vl_image import ImageConfig
from qimg.weights.folders import load_module, read_config, read_json_object, weight_names
from qimg.weights.tokenizer import read_tokenizer


def load_text_encoder(folder: Path, dtype: torch.dtype, device: torch.device) -> TextEncoder:
    """Qwen-Image's prompt encoder from a model folder: the tokenizer, checked to read the prompt template as
    Qwen-Image's does, and the language model in dtype on device."""
    for part in ("tokenizer", "text_encoder"):
        if not (folder / part).is_dir():
            raise QimgError(f"{folder / part} is missing: the model folder is incomplete")
    tokenizer = read_tokenizer(folder / "tokenizer")
    prefix = len(tokenizer.ids([text.TEMPLATE.split("{}")[0]])[0])
    if prefix != text.DROP:  # a vocabulary from another model, or one missing its merges, reads it otherwise
        raise QimgError(f"{folder / 'tokenizer'} is not Qwen-Image's tokenizer: it reads the prompt template's "
                        f"prefix as {prefix} tokens, not {text.DROP} (files missing or from another model?)")
    try:
        cfg = Qwen2Config.from_dict(read_config(folder / "text_encoder"))
    except (ValueError, TypeError) as e:
        raise QimgError(f"{folder / 'text_encoder' / 'config.json'}: {e}") from None
    try:
        model = load_module(lambda: Qwen2Model(cfg), folder / "text_encoder", dtype, device, remap=remap_keys)
    except QimgError as e:
        raise QimgError(f"cannot load the text encoder from {folder}: {e}") from None
    return TextEncoder(tokenizer, model, device)


def load_instruct_encoder(folder: Path, dtype: torch.dtype, device: torch.device, plus: bool) -> InstructEncoder:
    """Qwen-Image-Edit's (plus=False) or 2509/2511's (plus=True) instruction encoder from a model folder:
    the language model and vision tower from text_encoder/, the tokenizer and image sizes from processor/."""
    encoder = folder / "text_encoder"
    image_cfg = image_config(folder)
    if not encoder.is_dir():
        raise QimgError(f"{encoder} is missing: the model folder is incomplete")
    tokenizer = edit_tokenizer(folder)
    cfg, vision_cfg = configs(encoder, image_cfg)
    if not any(vision.remap_keys(k) for k in weight_names(encoder)):
        raise UsageError(f"{encoder} has no vision tower weights (visual.* or model.visual.*): an edit model "
                         "needs the full Qwen2.5-VL text encoder; download it again")
    try:
        model = load_module(lambda: Qwen2Model(cfg), encoder, dtype, device, remap=remap_keys)
        tower = load_module(lambda: VisionTower(vision_cfg), encoder, dtype, device, remap=vision.remap_keys)
    except QimgError as e:
        raise QimgError(f"cannot load the text encoder from {folder}: {e}") from None
    return InstructEncoder(tokenizer, model, tower, image_cfg, plus, dtype, device)


def edit_tokenizer(folder: Path) -> Tokenizer:
    """The tokenizer the edit pipelines run: their processor's (processor/), else tokenizer/ (the same files)."""
    files = folder / "processor"
    if not any((files / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        files = folder / "tokenizer"
    tokenizer = read_tokenizer(files)
    prefix = len(tokenizer.ids([instruct_text.SYSTEM])[0])
    if prefix != instruct_text.DROP:
        raise QimgError(f"{files} is not Qwen-Image-Edit's tokenizer: it reads the edit template's prefix as "
                        f"{prefix} tokens, not {instruct_text.DROP} (files missing or from another model?)")
    return tokenizer


def image_config(folder: Path) -> ImageConfig:
    """An Edit model's image processor config (processor/preprocessor_config.json), its pixel bounds checked:
    read before any weights load, for the bounds of the pictures' areas and the memory estimate, and again by
    the encoder. A bound that is not a whole number from 1 to vl_image.MOST_PIXELS, or a min_pixels over
    max_pixels, is refused naming the key: a clamped bound would size every picture otherwise than the folder
    says, and no shipped Qwen2-VL or Qwen2.5-VL processor needs one."""
    file = folder / "processor" / "preprocessor_config.json"
    if not file.is_file():
        raise UsageError(f"{folder} has no processor/preprocessor_config.json: an edit model needs its "
                         "processor/ folder (as Qwen-Image-Edit ships it); download it again")
    try:
        return ImageConfig.from_dict(read_json_object(file))
    except (ValueError, TypeError) as e:
        raise UsageError(f"{file}: {e}") from None


def configs(encoder: Path, image_cfg: ImageConfig) -> tuple[Qwen2Config, VisionConfig]:
    """The language model's and the vision tower's configs, checked to agree with the image processor's."""
    config = encoder / "config.json"
    d = read_config(encoder)
    try:
        cfg, vision_cfg = Qwen2Config.from_dict(d), VisionConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise QimgError(f"{config}: {e}") from None
    patches = (vision_cfg.patch_size, vision_cfg.spatial_merge_size, vision_cfg.temporal_patch_size)
    if patches != (image_cfg.patch_size, image_cfg.merge_size, image_cfg.temporal_patch_size):
        raise QimgError(f"{encoder.parent / 'processor' / 'preprocessor_config.json'} cuts patches of another size "
                        f"than {config}'s vision tower: they are from different models")
    return cfg, vision_cfg

"""Instruction encoding for the Qwen-Image-Edit family: the instruction and its pictures through Qwen2.5-VL,
exactly as the reference edit pipelines' `encode_prompt(prompt, image=...)` does it.

The instruction goes into the edit system template, with its pictures as <|vision_start|><|image_pad|>
<|vision_end|>: one inline picture for Qwen-Image-Edit, "Picture N: " and the picture before the text for
2509/2511. Each <|image_pad|> becomes as many tokens as the vision tower makes of its picture, the tower's
tokens are spliced in there, and the language model runs with 3D mRoPE positions (as Qwen2.5-VL was trained,
which diffusers 0.42.1 with transformers >= 5.15 no longer does: diffusers#14194). The last hidden state is
kept minus the 64-token system prefix, picture tokens included. Unlike the base model's prompts nothing is cut:
the reference applies no 512-token cap to edit prompts. A negative prompt is encoded with the same pictures.
"""

from pathlib import Path

import numpy as np
import torch

from qimg.errors import QimgError, UsageError
from qimg.model import vision
from qimg.model.qwen2 import Qwen2Config, Qwen2Model, mrope_positions, remap_keys
from qimg.model.tokenizer import Tokenizer
from qimg.model.vision import VisionConfig, VisionTower
from qimg.model.vl_image import ImageConfig, preprocess
from qimg.weights.folders import load_module, read_config, read_json_object, weight_names

# The edit pipelines' system prompt; its prefix through "user\n" is DROP tokens.
SYSTEM = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n"
)
PICTURE = "<|vision_start|><|image_pad|><|vision_end|>"  # <|image_pad|> is expanded to the picture's tokens
EDIT_TEMPLATE = SYSTEM + PICTURE + "{}<|im_end|>\n<|im_start|>assistant\n"  # Qwen-Image-Edit: one inline picture
PLUS_TEMPLATE = SYSTEM + "{}<|im_end|>\n<|im_start|>assistant\n"  # 2509/2511: "Picture N: " prefixes in the text
PLUS_PICTURE = "Picture {}: " + PICTURE
DROP = 64  # the reference's prompt_template_encode_start_idx: the system prefix, in Qwen2 tokens
IMAGE_PAD = "<|image_pad|>"


def prompt_text(prompt: str, pictures: int, plus: bool) -> str:
    """The text the reference's processor gets for one prompt, before <|image_pad|> is expanded."""
    if not plus:
        return EDIT_TEMPLATE.format(prompt)
    return PLUS_TEMPLATE.format("".join(PLUS_PICTURE.format(i + 1) for i in range(pictures)) + prompt)


def expand_image_pads(ids: list[int], pad: int, counts: list[int]) -> list[int]:
    """Each `pad` id repeated to its picture's token count, in order (the processor's replace_image_token)."""
    if ids.count(pad) != len(counts):
        raise UsageError(f"the instruction must not contain {IMAGE_PAD}: it marks where the pictures go")
    counts, out = iter(counts), []
    for i in ids:
        out.extend([i] * next(counts) if i == pad else [i])
    return out


def edit_tokenizer(folder: Path) -> Tokenizer:
    """The tokenizer the edit pipelines run: their processor's (processor/), else tokenizer/ (the same files)."""
    files = folder / "processor"
    if not any((files / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        files = folder / "tokenizer"
    tokenizer = Tokenizer(files)
    prefix = len(tokenizer.ids([SYSTEM])[0])
    if prefix != DROP:
        raise QimgError(f"{files} is not Qwen-Image-Edit's tokenizer: it reads the edit template's prefix as "
                        f"{prefix} tokens, not {DROP} (files missing or from another model?)")
    return tokenizer


def configs(encoder: Path, processor: Path) -> tuple[Qwen2Config, VisionConfig, ImageConfig]:
    """The language model's, the vision tower's and the image processor's configs, checked to agree."""
    config, preprocessor = encoder / "config.json", processor / "preprocessor_config.json"
    d = read_config(encoder)
    try:
        cfg, vision_cfg = Qwen2Config.from_dict(d), VisionConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise QimgError(f"{config}: {e}") from None
    try:
        image_cfg = ImageConfig.from_dict(read_json_object(preprocessor))
    except (ValueError, TypeError) as e:
        raise QimgError(f"{preprocessor}: {e}") from None
    patches = (vision_cfg.patch_size, vision_cfg.spatial_merge_size, vision_cfg.temporal_patch_size)
    if patches != (image_cfg.patch_size, image_cfg.merge_size, image_cfg.temporal_patch_size):
        raise QimgError(f"{preprocessor} cuts patches of another size than {config}'s vision tower: they are from "
                        "different models")
    return cfg, vision_cfg, image_cfg


class InstructEncoder:
    def __init__(self, folder: Path, dtype: torch.dtype, device: torch.device, plus: bool):
        """Qwen-Image-Edit's (plus=False) or 2509/2511's (plus=True) instruction encoder from a model folder:
        the language model and vision tower from text_encoder/, the tokenizer and image sizes from processor/."""
        processor, encoder = folder / "processor", folder / "text_encoder"
        if not (processor / "preprocessor_config.json").is_file():
            raise UsageError(f"{folder} has no processor/preprocessor_config.json: an edit model needs its "
                             "processor/ folder (as Qwen-Image-Edit ships it); download it again")
        if not encoder.is_dir():
            raise QimgError(f"{encoder} is missing: the model folder is incomplete")
        self.tokenizer = edit_tokenizer(folder)
        self.pad = self.tokenizer.bpe.token_to_id(IMAGE_PAD)
        cfg, vision_cfg, self.image_cfg = configs(encoder, processor)
        if not any(vision.remap_keys(k) for k in weight_names(encoder)):
            raise UsageError(f"{encoder} has no vision tower weights (visual.* or model.visual.*): an edit model "
                             "needs the full Qwen2.5-VL text encoder; download it again")
        try:
            self.model = load_module(lambda: Qwen2Model(cfg), encoder, dtype, device, remap=remap_keys)
            self.vision = load_module(lambda: VisionTower(vision_cfg), encoder, dtype, device, remap=vision.remap_keys)
        except QimgError as e:
            raise QimgError(f"cannot load the text encoder from {folder}: {e}") from None
        self.plus, self.dtype, self.device = plus, dtype, device
        self.last = None  # (patch rows, grids, tower tokens) of the last pictures encoded

    def inputs(self, prompt: str, images: list[np.ndarray]) -> tuple[list[int], list[np.ndarray], list[tuple]]:
        """What the reference's processor makes of one prompt and its pictures: the token ids with every
        <|image_pad|> expanded, each picture's patch rows, and its grid (rows, cols) in patches."""
        if not self.plus and len(images) != 1:
            raise UsageError(f"a Qwen-Image-Edit model takes exactly one picture, not {len(images)}")
        patches = [preprocess(np.asarray(image), self.image_cfg) for image in images]
        grids = [grid for _, grid in patches]
        tokens = [h * w // self.image_cfg.merge_size ** 2 for h, w in grids]
        ids = self.tokenizer.ids([prompt_text(prompt, len(images), self.plus)])[0]
        return expand_image_pads(ids, self.pad, tokens), [rows for rows, _ in patches], grids

    @torch.no_grad()
    def encode(self, prompt: str, images: list[np.ndarray]) -> torch.Tensor:
        """(tokens, dim) embedding of one instruction with its pictures ((H, W, 3) uint8, already at the size
        the pipeline gives the processor), picture tokens included."""
        ids, rows, grids = self.inputs(prompt, images)
        ids = torch.tensor([ids], device=self.device)
        features, positions = None, None
        if images:
            features = self.features(rows, grids)
            merge = self.image_cfg.merge_size
            positions = mrope_positions(ids[0] == self.pad, [(h // merge, w // merge) for h, w in grids])
        return self.model(ids, images=features, positions=positions)[0, DROP:]

    def features(self, rows: list[np.ndarray], grids: list[tuple[int, int]]) -> torch.Tensor:
        """The vision tower's tokens for these pictures. The last pictures' are kept: the negative prompt is
        encoded with the same pictures, and the tower is the costly part of a short prompt."""
        last = self.last
        if not (last and last[1] == grids and all(np.array_equal(a, b) for a, b in zip(last[0], rows))):
            tokens = self.vision(torch.from_numpy(np.concatenate(rows)).to(self.device, self.dtype), grids)
            self.last = last = (rows, grids, tokens)
        return last[2]

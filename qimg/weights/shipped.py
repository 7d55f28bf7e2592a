"""The configs qimg ships for running from split files with no model folder (`qimg/weights/configs/<variant>/`:
model_index.json and each part's config.json, the scheduler's, an Edit model's image processor's; no weights;
Qwen-Image-2.1 and 2.1-Turbo too, Turbo's sampling grid in its model_index.json), Qwen2.5's tokenizer
(`qimg/weights/tokenizers/qwen2.5/`, for a safetensors text encoder with none beside it), and which config fits a
transformer file: its shapes say the architecture (blocks, width, the text width it takes; 2.1's text projection
tells it from the 20B), its name the variant (Qwen-Image, Edit, 2509, 2511 share one layout, as 2.1 and Turbo do)."""

from pathlib import Path

from qimg.errors import UsageError
from qimg.model.transformer import TransformerConfig
from qimg.weights.folders import QWEN_IMAGE_21, QWEN_IMAGE_21_TURBO, model_kind, named_kind, read_config
from qimg.weights.single_file import open_weights

CONFIGS = Path(__file__).resolve().parent / "configs"
# Qwen2.5's BPE (ids 0-151642) and Qwen2.5-VL's 22 added tokens (151643-151664), from llama.cpp's
# ggml-vocab-qwen2.gguf by scripts/build_qwen25_tokenizer.py; its NOTICE and LICENSE say where from.
TOKENIZER = Path(__file__).resolve().parent / "tokenizers" / "qwen2.5"
TOKENIZER_IDS = 151665  # a text encoder whose vocabulary has fewer rows cannot take every id it gives


def architecture(transformer: Path) -> tuple[int, int, int]:
    """(blocks, width, text width) of a transformer file, from its header."""
    with open_weights(transformer) as found:
        shapes = {k: w.shape for k, w in found.weights.items()}
    blocks = {k.split(".")[1] for k in shapes if k.startswith("transformer_blocks.")}
    if "img_in.weight" not in shapes or "txt_in.weight" not in shapes:
        raise UsageError(f"--transformer {transformer} has no img_in.weight or txt_in.weight: not a Qwen-Image 20B "
                         "transformer (its Edit models' included) nor a Qwen-Image-2.1 one; for another model's file "
                         "pass --model with its folder")
    return len(blocks), shapes["img_in.weight"][0], shapes["txt_in.weight"][1]


def architecture21(transformer: Path) -> tuple[int, int, int] | None:
    """(blocks, width, text width) of a Qwen-Image-2.1 transformer file (txt_in.in_layer: its text projection),
    from its header; None for another model's."""
    with open_weights(transformer) as found:
        shapes = {k: w.shape for k, w in found.weights.items()}
    if "txt_in.in_layer.weight" not in shapes or "img_in.weight" not in shapes:
        return None
    blocks = {k.split(".")[1] for k in shapes if k.startswith("transformer_blocks.")}
    return len(blocks), shapes["img_in.weight"][0], shapes["txt_in.in_layer.weight"][1]


def _shipped_architecture(folder: Path) -> tuple[int, int, int]:
    config = read_config(folder / "transformer")
    if model_kind(folder).family == QWEN_IMAGE_21.family:
        from qimg.model.transformer21 import Transformer21Config

        cfg = Transformer21Config.from_dict(config)
        return cfg.num_layers, cfg.num_attention_heads * cfg.attention_head_dim, cfg.context_in_dim
    cfg = TransformerConfig.from_dict(config)
    return cfg.num_layers, cfg.dim, cfg.joint_attention_dim


def shipped_folder(transformer: Path) -> Path:
    """The shipped config folder for a transformer file; a UsageError naming its shapes when none fits. A 2.1
    transformer (told by its shapes) is 2.1-Turbo when its name says so, else the base 2.1."""
    arch = architecture21(transformer)
    if arch is not None:
        kind = QWEN_IMAGE_21_TURBO if named_kind(transformer) == QWEN_IMAGE_21_TURBO else QWEN_IMAGE_21
    else:
        kind, arch = named_kind(transformer), architecture(transformer)
    for folder in sorted(p for p in CONFIGS.iterdir() if p.is_dir()):
        if model_kind(folder) == kind and _shipped_architecture(folder) == arch:
            return folder
    raise UsageError(f"--transformer {transformer}: no config qimg ships fits it ({arch[0]} blocks {arch[1]} wide, "
                     f"text {arch[2]} wide, a {kind.display} transformer by its name); pass --model with its model "
                     "folder for the configs")

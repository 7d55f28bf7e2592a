"""Tiny random segmentation models in the folder layouts transformers saves: a CLIPSeg folder, and a grounded-sam
folder (`detector/` a GroundingDINO, `segmenter/` a SAM2), built with transformers' own classes and offline
tokenizers (a CLIP BPE and a BERT word-piece vocabulary of a few words)."""

import json
from pathlib import Path

import torch

WORDS = ["the", "sky", "a", "cat", "dog", "sofa", "red", "car", "person"]


def clip_tokenizer(folder: Path):
    """A CLIP BPE tokenizer that knows WORDS whole (merged letter by letter) and single letters."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz.":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def build_clipseg(folder: Path, seed: int = 0) -> Path:
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, ViTImageProcessorPil

    folder.mkdir(parents=True)
    tokenizer = clip_tokenizer(folder)
    torch.manual_seed(seed)
    config = CLIPSegConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=32, reduce_dim=16, extract_layers=[1], decoder_num_attention_heads=2,
        decoder_intermediate_size=20)
    CLIPSegForImageSegmentation(config).eval().save_pretrained(folder)
    images = ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.48, 0.46, 0.41],
                               image_std=[0.27, 0.26, 0.28])
    CLIPSegProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def build_grounded_sam(folder: Path, seed: int = 0) -> Path:
    from transformers import (
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        Sam2Config,
        Sam2Model,
    )
    from transformers.models.grounding_dino import GroundingDinoImageProcessorPil

    detector, segmenter = folder / "detector", folder / "segmenter"
    detector.mkdir(parents=True)
    (detector / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS]) + "\n")
    tokenizer = BertTokenizer(str(detector / "vocab.txt"))
    torch.manual_seed(seed)
    config = GroundingDinoConfig(
        backbone_config=dict(model_type="swin", embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                             window_size=4, image_size=64, out_features=["stage2", "stage3", "stage4"]),
        text_config=dict(model_type="bert", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=16, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10, num_feature_levels=3,
        encoder_n_points=2, decoder_n_points=2, max_text_len=32)
    GroundingDinoForObjectDetection(config).eval().save_pretrained(detector)
    images = GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96})
    GroundingDinoProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(detector)
    backbone = dict(model_type="sam2_hiera_det_model", hidden_size=8, num_attention_heads=1,
                    blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[8, 16, 32, 64],
                    num_attention_heads_per_stage=[1, 1, 1, 1], window_size_per_stage=[2, 2, 2, 2],
                    global_attention_blocks=[3], image_size=[64, 64],
                    window_positional_embedding_background_size=[2, 2])
    sam = Sam2Config(
        vision_config=dict(backbone_config=backbone, backbone_channel_list=[64, 32, 16, 8], fpn_hidden_size=32,
                           backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]]),
        prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, num_attention_heads=2, mlp_dim=32, iou_head_hidden_dim=32))
    Sam2Model(sam).eval().save_pretrained(segmenter)
    (segmenter / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Sam2ImageProcessorFast", "size": {"height": 64, "width": 64},
        "mask_size": {"height": 16, "width": 16}, "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225]}))
    return folder

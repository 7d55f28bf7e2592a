"""Segmentation models run through transformers (the optional extra qimg[masks]; the one qimg module that
imports transformers, and only when a mask is made from words).

A provider takes an image (uint8 RGB, (H, W, 3)) and phrases and gives each phrase's per-pixel probability at
the image's size, (P, H, W) float32 in [0, 1]; thresholds and unions are the caller's (masks.py).
- ClipSeg: the sigmoid of CLIPSeg's logits (352x352 for the released model), resized bilinearly to the image;
  the vision tower runs once an image, its activations shared by the phrases' decoder passes.
- GroundedSam: GroundingDINO's boxes for the phrase (scores above BOX_THRESHOLD), each refined by SAM2 into a
  mask; the phrase's probability is the largest over its boxes of the sigmoid of SAM2's mask logits, resized
  to the image as SAM2's own post-processing does; 0 where it found no box. SAM2's image preprocessing is
  done here (its transformers processor needs torchvision): resized to its square input size with
  antialiasing and rounded to 8 bits, as the torchvision backend does, then normalised.
"""

import numpy as np
import torch
import torch.nn.functional as F

from qimg.errors import UsageError
from qimg.segment.models import BadMaskModel, MaskModel
from qimg.small_files import parse_json, read_small

BOX_THRESHOLD, TEXT_THRESHOLD = 0.3, 0.25  # Grounded-SAM's demo values
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # SAM2's processor defaults


def load(model: MaskModel, device: str):
    """The provider for `model` on `device`, its weights loaded (safetensors only)."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    kind = ClipSeg if model.kind == "clipseg" else GroundedSam
    return loading(model, lambda: kind(model.folders, torch.device(device)))


def loading(model: MaskModel, make):
    """make(), a folder's missing or damaged files (transformers' OSError, ValueError; safetensors') one line
    naming --mask-model."""
    from safetensors import SafetensorError

    try:
        return make()
    except SafetensorError as e:
        raise BadMaskModel(f"--mask-model {model.name}: its .safetensors weights are damaged or truncated ({e}); "
                           "download the model again") from None
    except (OSError, ValueError) as e:
        reason = str(e).split(". ")[0].strip()[:200]
        raise BadMaskModel(f"--mask-model {model.name}: could not be loaded ({type(e).__name__}: {reason}); give a "
                           "complete model folder (config, processor and tokenizer files, .safetensors weights), "
                           "or download the model again") from None


def check_phrases(model: MaskModel, phrases: tuple[str, ...]) -> None:
    """Refuse, before any image is segmented, a phrase longer (in tokens) than the model's text encoder reads:
    CLIPSeg's text positions (77 in the released model); GroundingDINO's max_text_len (256) and its BERT's."""
    from transformers import AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    folder = model.folders[0]
    path = folder / "config.json"
    config = parse_json(read_small(path, "model config", 1024 * 1024), str(path))
    text = config.get("text_config") or {}
    if model.kind == "clipseg":
        limit, texts = text.get("max_position_embeddings", 77), phrases
    else:
        limit = min(config.get("max_text_len", 256), text.get("max_position_embeddings", 512))
        texts = tuple(grounding_text(p) for p in phrases)
    tokenizer = loading(model, lambda: AutoTokenizer.from_pretrained(folder))
    for phrase, words in zip(phrases, texts):
        n = len(tokenizer(words)["input_ids"])
        if n > limit:
            shown = phrase if len(phrase) <= 60 else phrase[:57] + "..."
            raise UsageError(f"--mask-prompt {shown!r} is {n} tokens, more than the {limit} the mask model's text "
                             "encoder reads; use fewer words (or give several --mask-prompt: their union is masked)")


def grounding_text(phrase: str) -> str:
    """GroundingDINO's prompt form of a phrase: lower case, ending in '.'."""
    return phrase.strip().lower().rstrip(".") + "."


def resize(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(P, h, w) -> (P, H, W) for size (H, W): bilinear, corners not aligned (transformers' post-processing)."""
    return F.interpolate(probs[:, None], size, mode="bilinear", align_corners=False)[:, 0]


class ClipSeg:
    def __init__(self, folders, device: torch.device):
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        self.processor = CLIPSegProcessor.from_pretrained(folders[0])
        self.model = CLIPSegForImageSegmentation.from_pretrained(folders[0], use_safetensors=True).to(device).eval()
        self.device = device

    @torch.no_grad()
    def probabilities(self, image: np.ndarray, phrases: list[str]) -> np.ndarray:
        """CLIPSegForImageSegmentation's forward, with its vision tower run once for all phrases (the forward
        runs it once per phrase): the activations of its extract_layers, one per phrase's decoder pass."""
        inputs = self.processor(text=list(phrases), images=[image], padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        model, n = self.model, len(phrases)
        hidden = model.clip.get_image_features(pixel_values=inputs["pixel_values"], interpolate_pos_encoding=True,
                                               output_hidden_states=True).hidden_states
        activations = [hidden[i + 1].expand(n, -1, -1) for i in model.extract_layers]  # +1: the embeddings
        condition = model.get_conditional_embeddings(batch_size=n, input_ids=inputs["input_ids"],
                                                     attention_mask=inputs["attention_mask"])
        logits = model.decoder(activations, condition).logits  # (P, h, w); (h, w) for one phrase
        probs = logits.reshape(n, *logits.shape[-2:]).float().sigmoid()
        return resize(probs, image.shape[:2]).cpu().numpy()


class GroundedSam:
    def __init__(self, folders, device: torch.device):
        from transformers import AutoTokenizer, GroundingDinoForObjectDetection, GroundingDinoProcessor, Sam2Model
        from transformers.models.grounding_dino import GroundingDinoImageProcessorPil

        detector, segmenter = folders
        self.processor = GroundingDinoProcessor(GroundingDinoImageProcessorPil.from_pretrained(detector),
                                                AutoTokenizer.from_pretrained(detector))
        self.detector = GroundingDinoForObjectDetection.from_pretrained(detector, use_safetensors=True)
        self.segmenter = Sam2Model.from_pretrained(segmenter, use_safetensors=True)
        self.detector, self.segmenter = self.detector.to(device).eval(), self.segmenter.to(device).eval()
        config = segmenter / "preprocessor_config.json"
        self.sam_config = parse_json(read_small(config, "SAM2 preprocessor config", 1024 * 1024), str(config)) \
            if config.is_file() else {}
        self.device = device

    def boxes(self, image: np.ndarray, phrase: str) -> torch.Tensor:
        """(N, 4) x0, y0, x1, y1 in the image's pixels: GroundingDINO's boxes for the phrase."""
        inputs = self.processor(images=image, text=grounding_text(phrase), return_tensors="pt").to(self.device)
        outputs = self.detector(**inputs)
        found = self.processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=BOX_THRESHOLD, text_threshold=TEXT_THRESHOLD,
            target_sizes=[image.shape[:2]])[0]
        return found["boxes"]

    def sam_inputs(self, image: np.ndarray) -> tuple[torch.Tensor, int]:
        """SAM2's pixel_values (1, 3, S, S) and S."""
        size = self.sam_config.get("size", {}).get("height", 1024)
        mean = torch.tensor(self.sam_config.get("image_mean", IMAGENET_MEAN))[:, None, None]
        std = torch.tensor(self.sam_config.get("image_std", IMAGENET_STD))[:, None, None]
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
        x = F.interpolate(x, (size, size), mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255) / 255
        return ((x - mean) / std).to(self.device), size

    @torch.no_grad()
    def probabilities(self, image: np.ndarray, phrases: list[str]) -> np.ndarray:
        h, w = image.shape[:2]
        out = np.zeros((len(phrases), h, w), np.float32)
        embeddings = None
        for i, phrase in enumerate(phrases):
            boxes = self.boxes(image, phrase)
            if len(boxes) == 0:
                continue
            if embeddings is None:
                pixels, size = self.sam_inputs(image)
                embeddings = self.segmenter.get_image_embeddings(pixels)
            scaled = boxes.float() * torch.tensor([size / w, size / h] * 2, device=boxes.device)
            logits = self.segmenter(image_embeddings=embeddings, input_boxes=scaled[None],
                                    multimask_output=False).pred_masks[0, :, 0]  # (N, s, s)
            out[i] = resize(logits.float(), (h, w)).sigmoid().amax(0).cpu().numpy()
        return out

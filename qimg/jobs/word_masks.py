"""Masks from words (--mask-prompt, `qimg mask`): the union of the regions a segmentation model (segment/) finds
for the phrases, where their probability reaches the threshold (masks.union_above).

A batch's masks are made in one pass with the segmentation model loaded once (`prepare`), before any image
model loads, and the model is released after it: the two never share memory. It is held in kept_engine's
one slot, so the worker keeps it between `qimg mask` jobs, and loading it drops a kept image engine (and loading
an engine drops it). Each image's mask is cached as bits ("mask" entries, keyed by cache.mask_key: the
pixels, the phrases, the model and the threshold), so a re-run over a folder loads no segmentation model.
A mask here is the union alone; --invert-mask, --grow and --feather apply after (they are cheap)."""

from pathlib import Path

import numpy as np

from qimg import masks
from qimg.errors import QimgError, UsageError
from qimg.jobs import kept_engine
from qimg.jobs.spec import WordMask


class WordMasks:
    """The masks of one job's phrases, model and threshold: made, cached, remembered for the job (as bits)."""

    def __init__(self, spec: WordMask, store):
        from qimg.segment import models

        phrases = tuple(p.strip() for p in spec.phrases)
        if not phrases or not all(phrases):
            raise UsageError("--mask-prompt is empty: name what to mask, e.g. --mask-prompt sky")
        if not 0 < spec.threshold < 1:
            raise UsageError(f"--mask-threshold {spec.threshold}: must be between 0 and 1")
        models.require_extra()
        self.spec, self.phrases, self.store = spec, phrases, store
        self.model = models.resolve(spec.model)
        from qimg.segment import providers

        providers.check_phrases(self.model, phrases)
        self.fingerprint = self.model.fingerprint()
        self.found: dict[str, np.ndarray] = {}  # cache key -> the mask's bits, for this job

    def record(self) -> dict:
        """What an output's metadata says of the words its mask came from."""
        return dict(mask_prompt=list(self.phrases), mask_model=self.model.public, mask_threshold=self.spec.threshold)

    def describe(self) -> str:
        return " + ".join(repr(p) for p in self.phrases)

    def mask(self, pixels: np.ndarray) -> masks.Mask:
        """The union mask of uint8 RGB pixels (H, W, 3): remembered, cached, or made now (loading the model)."""
        import torch

        from qimg.cache import mask_key

        h, w = pixels.shape[:2]
        key = mask_key(pixels, self.phrases, self.fingerprint, self.spec.threshold)
        bits = self.found.get(key)
        if bits is None and self.store is not None:
            entry = self.store.get("mask", key, {"mask": ("uint8", ((w * h + 7) // 8,))})
            if entry is not None:
                bits = entry[0]["mask"].numpy()
        if bits is None:
            probabilities = self.provider().probabilities(pixels, list(self.phrases))
            bits = masks.pack(masks.union_above(probabilities, self.spec.threshold))
            if self.store is not None:
                self.store.put("mask", key, {"mask": torch.from_numpy(bits)},
                               {"model": self.model.name, "phrases": list(self.phrases),
                                "threshold": self.spec.threshold, "size": [w, h]})
        self.found[key] = bits
        return masks.unpack(bits, (w, h))

    def region(self, pixels: np.ndarray, image: Path | str) -> masks.Mask:
        """mask(pixels), or the error of that image when the words select nothing in it: never an empty mask."""
        m = self.mask(pixels)
        if not m.any():
            raise QimgError(f"{image}: nothing matches {self.describe()} at --mask-threshold {self.spec.threshold} "
                            "(no mask written); try other words or a lower --mask-threshold")
        return m

    def provider(self):
        """The segmentation model, loaded on first use (the one loaded now, if it is this job's)."""
        from qimg.engine.devices import pick_device

        def make():
            from qimg.segment import providers

            return providers.load(self.model, device)

        device = str(pick_device(self.spec.device))
        return kept_engine.segmenter(self.fingerprint, device, self.model.public, make)

    def prepare(self, files: list[Path], reporter) -> None:
        """Every file's mask made now, the segmentation model loaded once, then released (before an image model
        loads). A file that cannot be read is left to fail in its turn; a model that cannot load ends the job."""
        from qimg.images import load_image

        advance = reporter.bar("masks", len(files)) if len(files) > 1 else (lambda: None)
        try:
            for image in files:
                try:
                    pixels = load_image(image)[0]
                except QimgError:
                    pass
                else:
                    self.mask(pixels)
                advance()
        finally:
            release()


def release(keep: bool = False) -> None:
    """Drop the segmentation model and its memory (a kept image engine stays); `keep`: the worker keeps it for
    the next job."""
    if not (keep and kept_engine.enabled):
        kept_engine.drop("segmenter")

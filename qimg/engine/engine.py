"""The engine: the one object callers hold, which turns requests into images.

It stands on two layers: components.py loads the model's components on first use and says what identifies
them; latents.py (`Sampler`) turns prompts and pixels into latents and latents into pixels, through the cache.
Here the requests (a request.Sampling, with the pixels, mask or canvas it works on) become images: generate,
inpaint (an outpaint is a canvas and a mask, then an inpaint), one edit of a chain (`edit_canvas`) and its
`render`. instruct.py edits by instruction on the same engine; chain.py applies a chain's edits, cached.
The engine never prints and never writes output files; the job layer (qimg/jobs) does that.
"""

from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from qimg.engine.canvas import Canvas, edited, place, to_window, window_size
from qimg.engine.latents import Sampler
from qimg.engine.preview import mapped
from qimg.engine.request import Sampling
from qimg.masks import composite, crop_box, latent_mask, pad_to_multiple, resize_mask, work_size
from qimg.option_values import CONTEXT


@dataclass(frozen=True)
class Result:
    image: np.ndarray  # (H, W, 3) uint8
    # (1, 16, h, w) normalized: the latent the image came from, when it covers the image 1:1 (padded right and
    # bottom to a multiple of 16); None when the model ran on a crop or a resized copy
    latent: torch.Tensor | None
    latent_cache: str  # "hit": the input's latent came from the cache, the VAE encoder did not run; "miss"; "off"
    prompt_cache: str  # "hit": every prompt embedding came from the cache, the text encoder did not run; "miss"; "off"


@dataclass(frozen=True)
class EditResult(Result):
    box: tuple[int, int, int, int]  # the region the model saw, (x0, y0, x1, y1) in input pixels
    work_size: tuple[int, int]  # (W, H) the model ran at


class Engine(Sampler):
    """A model loaded on demand (components.py) and sampled (latents.py), making images."""

    def generate(self, sampling: Sampling, width: int, height: int, callback=None, preview=None) -> Result:
        """An image of width x height for the sampling's prompt; `preview` (preview.Preview) sees each step's
        estimate of it."""
        encoded_before = self.prompts_encoded
        latent = self.generate_latent(sampling, width, height, callback, mapped(preview, self.decode))
        return Result(self.decode(latent), latent, "off" if self.cache is None else "miss",
                      self._prompt_cache(encoded_before))

    def inpaint(self, image: np.ndarray, mask: np.ndarray, sampling: Sampling, attn_mask: bool = False,
                context: int = CONTEXT, callback=None, preview=None) -> "EditResult":
        """Regenerate image (H, W, 3) uint8 where mask (H, W) in [0, 1] says so. The result has the input's
        size and is byte-identical to it wherever the mask is 0; soft mask values blend.

        Within the working area this is a one-edit chain (`edit_canvas`, then `render`): the input's latent
        comes from the cache when one is stored for its pixels (the VAE encoder is not loaded), else it is
        encoded and stored. An image larger than the working area is not shrunk as a whole: the model sees
        the mask's bounding box plus `context` pixels around it, scaled to the working area, pasted back.
        `preview` (preview.Preview) sees each step's estimate of the result, composited as the result is."""
        height, width = mask.shape
        if width * height > self.defaults.max_pixels:
            return self._inpaint_resampled(image, mask, sampling, attn_mask, context, callback, preview)
        encoded_before = self.prompts_encoded
        work = pad_to_multiple(image, None)[0]
        self.check_size(*work.shape[1::-1])
        z0, latent_cache = self.input_latent(image, work, whole=True)
        canvas = self.edit_canvas(replace(Canvas.start(image), latent=z0), mask, sampling, attn_mask, context,
                                  callback, preview)
        result = self.render(canvas)
        # Where the mask keeps, the latent is z0 and the result the input's own pixels; where it edits, both hold
        # the new content (the pixels blended at soft mask values): the latent stands for the result, as the
        # model ran on the whole image at its size, if the padding strip is still what padding the result gives.
        padded = pad_to_multiple(result, None)[0]
        fits = np.array_equal(padded[height:], work[height:]) and np.array_equal(padded[:, width:], work[:, width:])
        return EditResult(result, canvas.latent if fits else None, latent_cache, self._prompt_cache(encoded_before),
                    (0, 0, width, height), work.shape[1::-1])

    def edit_canvas(self, canvas: Canvas, mask: np.ndarray, sampling: Sampling, attn_mask: bool = False,
                    context: int = CONTEXT, callback=None, preview=None) -> Canvas:
        """One edit of a chain: the canvas's latent regenerated where mask (H, W) says so, nothing decoded
        (but for `preview`, which sees each step's estimate of the canvas rendered).
        A canvas that carries no latent yet starts from its pixels' latent, from the cache when stored.

        A canvas over the working area goes through pixels instead (the model sees a resampled crop of it,
        which has no latent to carry): it is rendered, edited as `inpaint` does, and its pixels kept."""
        width, height = canvas.size
        if width * height > self.defaults.max_pixels:
            edit = self._inpaint_resampled(self.render(canvas), mask, sampling, attn_mask, context, callback, preview)
            return Canvas.start(edit.image)
        self.check_size(*window_size(canvas.size, canvas.origin))
        if canvas.latent is None:  # the whole canvas at its own size: its pixels' latent may be cached
            work = pad_to_multiple(canvas.pixels, None)[0]
            canvas = replace(canvas, latent=self.input_latent(canvas.pixels, work, whole=True)[0])
        m = torch.from_numpy(latent_mask(to_window(mask, canvas.origin), 8))
        latent = self.inpaint_latent(canvas.latent, m, sampling, attn_mask, callback,
                                     mapped(preview, lambda z: self.render(edited(canvas, mask, z))))
        return edited(canvas, mask, latent)

    def render(self, canvas: Canvas) -> np.ndarray:
        """The canvas's pixels: its latent decoded once and composited over the known pixels."""
        if canvas.latent is None:
            return canvas.pixels
        return composite(canvas.pixels, place(self.decode(canvas.latent), canvas), canvas.pending)

    def _inpaint_resampled(self, image: np.ndarray, mask: np.ndarray, sampling: Sampling, attn_mask: bool,
                           context: int, callback, preview=None) -> "EditResult":
        """inpaint for an image over the working area: the mask's box plus context, scaled to fit it. The model
        sees a resampled copy, so no cached latent stands for it and its latent stands for no output."""
        max_pixels = self.defaults.max_pixels
        x0, y0, x1, y1 = crop_box(mask, context, max_pixels)
        size = work_size(x1 - x0, y1 - y0, max_pixels)
        self.check_size(*size)
        work = np.asarray(Image.fromarray(image[y0:y1, x0:x1]).resize(size, Image.LANCZOS))
        m = torch.from_numpy(latent_mask(resize_mask(mask[y0:y1, x0:x1], size), 8))
        encoded_before = self.prompts_encoded
        z0, latent_cache = self.input_latent(image, work, whole=False)

        def paste(latent: torch.Tensor) -> np.ndarray:  # the image with the crop's decode composited in
            generated = image.copy()
            generated[y0:y1, x0:x1] = np.asarray(Image.fromarray(self.decode(latent)).resize((x1 - x0, y1 - y0),
                                                                                           Image.LANCZOS))
            return composite(image, generated, mask)

        latent = self.inpaint_latent(z0, m, sampling, attn_mask, callback, mapped(preview, paste))
        return EditResult(paste(latent), None, latent_cache, self._prompt_cache(encoded_before), (x0, y0, x1, y1), size)

"""The running estimate of the final image while a sampler works, for previews.

At each step it is the x0 prediction x - sigma v (flow matching: the straight line from x along the velocity
the step used, followed to sigma 0), which at the last step is the sampler's result itself. The sampler's
numbers are never touched: the hook gets the estimate as a function that makes it on demand, so a step whose
estimate nobody asks for costs nothing, and turning it into an image (decoding, compositing) is the
caller's, composed with `mapped`.
"""

from typing import Any, Callable, Optional

import torch

from qimg.sampling import Velocity

# hook(steps done, steps this run takes, estimate): estimate() makes the picture, on demand
Preview = Callable[[int, int, Callable[[], Any]], None]


def mapped(preview: Optional[Preview], f: Callable[[Any], Any]) -> Optional[Preview]:
    """The hook for estimates that `f` turns into what `preview` takes (a latent into an image); None stays None."""
    if preview is None:
        return None
    return lambda done, total, estimate: preview(done, total, lambda: f(estimate()))


def watching(velocity: Velocity, callback, sigmas: torch.Tensor, preview: Optional[Preview]):
    """(velocity, callback) for `euler` that also hand `preview` each step's x0 prediction, made from the
    input and the velocity of that step, as returned (so after any reuse or guidance); without a preview,
    the two as they are."""
    if preview is None:
        return velocity, callback
    used = {}

    def recorded(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        v = velocity(x, sigma)
        used.update(x=x, sigma=sigma, v=v)
        return v

    def step(i: int, x_next: torch.Tensor) -> None:
        if callback is not None:
            callback(i, x_next)
        x, sigma, v = used["x"], used["sigma"], used["v"]  # this step's: the next one replaces them
        preview(i + 1, len(sigmas) - 1, lambda: x - sigma * v.float())

    return recorded, step

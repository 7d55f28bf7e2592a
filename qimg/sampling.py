"""Flow-matching sampling: sigma schedules, the Euler loop and true CFG, as pure functions.

The schedule reproduces diffusers' FlowMatchEulerDiscreteScheduler as the Qwen-Image pipeline drives it
(linear sigmas, resolution-dependent time shift, stretch to `shift_terminal`), computed in float32 numpy
like the reference so the same steps give the same sigmas.
"""

import math
from dataclasses import dataclass, fields
from typing import Callable

import numpy as np
import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma) -> v


@dataclass(frozen=True)
class ScheduleConfig:
    """The fields of `scheduler/scheduler_config.json` that shape the sigmas (Qwen-Image's values)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = True
    base_shift: float = 0.5
    max_shift: float = 0.9
    base_image_seq_len: int = 256
    max_image_seq_len: int = 8192
    shift_terminal: float | None = 0.02
    time_shift_type: str = "exponential"

    @classmethod
    def from_dict(cls, d: dict) -> "ScheduleConfig":
        # Options that change the sampler itself; Qwen-Image uses none of them.
        for key in ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                    "stochastic_sampling"):
            if d.get(key):
                raise ValueError(f"scheduler option {key}=true is not supported")
        if d.get("time_shift_type", "exponential") not in ("exponential", "linear"):
            raise ValueError(f"scheduler time_shift_type={d['time_shift_type']!r} is not supported")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def shift_mu(seq_len: int, cfg: ScheduleConfig) -> float:
    """Resolution-dependent shift: linear in the image token count (the pipeline's calculate_shift)."""
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    return seq_len * m + cfg.base_shift - m * cfg.base_image_seq_len


def time_shift(t, shift: float):
    """The static time shift t -> shift t / (1 + (shift - 1) t) (SD3), on arrays or tensors: shift > 1
    moves times towards noise."""
    return shift * t / (1 + (shift - 1) * t)


def flow_sigmas(steps: int, seq_len: int, cfg: ScheduleConfig) -> torch.Tensor:
    """`steps + 1` decreasing sigmas from about 1 to exactly 0, for an image of `seq_len` tokens."""
    sigmas = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
    if cfg.use_dynamic_shifting:
        mu = shift_mu(seq_len, cfg)
        if cfg.time_shift_type == "exponential":
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        else:
            sigmas = mu / (mu + (1 / sigmas - 1))
    else:
        sigmas = time_shift(sigmas, cfg.shift)
    if cfg.shift_terminal and sigmas[-1] < 1:  # with one step there is nothing to stretch
        # Stretch so the last sigma before 0 is exactly shift_terminal (LTX-Video's rf schedule).
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))
    return torch.cat([torch.from_numpy(np.asarray(sigmas, dtype=np.float32)), torch.zeros(1)])


def first_step(steps: int, strength: float) -> int:
    """Where an edit of `strength` enters a `steps`-step schedule (the reference img2img's get_timesteps);
    it runs `steps - first_step` steps, at least one for any strength above 0."""
    return int(max(steps - steps * strength, 0))


def noised(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """The flow-matching path: x0 at sigma 0, pure noise at sigma 1."""
    return (1 - sigma) * x0 + sigma * noise


def euler(velocity: Velocity, x: torch.Tensor, sigmas: torch.Tensor, callback=None, blend=None) -> torch.Tensor:
    """Integrate dx/dsigma = v(x, sigma) from sigmas[0] to sigmas[-1]; x stays float32 throughout.

    `blend(i, x, sigma_next)`, if given, replaces what must not change after each step (inpainting)."""
    x = x.float()
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x = x + (sigma_next - sigma) * velocity(x, sigma).float()
        if blend is not None:
            x = blend(i, x, sigma_next)
        if callback is not None:
            callback(i, x)
    return x


def keep_known(x0: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, steps: int):
    """The inpainting blend: after step i, latents the mask keeps are replaced by x0 re-noised to the next
    sigma, so the last step leaves them exactly x0. A soft mask value m joins the edit only for the last
    fraction m of the steps (differential diffusion's per-step threshold), so 0.3 edits like strength 0.3
    and feathered edges blend instead of showing a line; a binary mask is the reference inpaint's blend."""

    def blend(i: int, x: torch.Tensor, sigma_next) -> torch.Tensor:
        free = mask > 1 - (i + 1) / steps
        return torch.where(free, x, noised(x0, noise, sigma_next))

    return blend


def true_cfg(velocity: Velocity, scale: float) -> Velocity:
    """Classifier-free guidance with Qwen-Image's rescale: the guided velocity keeps the per-token norm
    of the conditional one (pipeline_qwenimage.py), which stops high scales from over-saturating.

    `velocity` runs the conditional and unconditional model as one batch, conditional first: (2B, ...)."""

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        v_cond, v_uncond = velocity(x, sigma).chunk(2)
        v = v_uncond + scale * (v_cond - v_uncond)
        return v * (v_cond.norm(dim=-1, keepdim=True) / v.norm(dim=-1, keepdim=True))

    return guided

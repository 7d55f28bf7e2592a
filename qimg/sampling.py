"""Flow-matching sampling: sigma schedules, the Euler loop and true CFG, as pure functions.

The schedule reproduces diffusers' FlowMatchEulerDiscreteScheduler as the Qwen-Image pipeline drives it
(linear sigmas, resolution-dependent time shift, stretch to `shift_terminal`), computed in float32 numpy
like the reference so the same steps give the same sigmas.
"""

import math
from dataclasses import dataclass, fields, replace
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
    def from_scheduler(cls, d: dict) -> "ScheduleConfig":
        """A scheduler_config.json as diffusers reads it: a key it lacks takes the scheduler class's default (what
        Qwen-Image-2.1's pipeline sees), not Qwen-Image's value."""
        return cls.from_dict(SCHEDULER_DEFAULTS | d)

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


# FlowMatchEulerDiscreteScheduler's own defaults, for the keys that shape the sigmas.
SCHEDULER_DEFAULTS = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5,
                      "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096, "shift_terminal": None,
                      "time_shift_type": "exponential"}


def shifted(cfg: ScheduleConfig, shift: float | None) -> ScheduleConfig:
    """`cfg` with a constant flow shift (None: unchanged): the schedule Qwen-Image-Lightning's scheduler config
    gives, mu = ln shift at every resolution (base_shift = max_shift) and no stretch to a terminal sigma, so
    sigma -> shift sigma / (1 + (shift - 1) sigma) (ComfyUI's ModelSamplingAuraFlow)."""
    if shift is None:
        return cfg
    mu = math.log(shift)
    return replace(cfg, use_dynamic_shifting=True, base_shift=mu, max_shift=mu, shift_terminal=None,
                   time_shift_type="exponential")


def shift_mu(seq_len: int, cfg: ScheduleConfig) -> float:
    """Resolution-dependent shift: linear in the image token count (the pipeline's calculate_shift)."""
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    return seq_len * m + cfg.base_shift - m * cfg.base_image_seq_len


def time_shift(t, shift: float):
    """The static time shift t -> shift t / (1 + (shift - 1) t) (SD3), on arrays or tensors: shift > 1
    moves times towards noise."""
    return shift * t / (1 + (shift - 1) * t)


def flow_sigmas(steps: int, seq_len: int, cfg: ScheduleConfig,
                grid: tuple[float, ...] | None = None) -> torch.Tensor:
    """`steps + 1` decreasing sigmas from about 1 to exactly 0, for an image of `seq_len` tokens: the linear grid
    linspace(1, 1/steps, steps), or `grid` (a model's own, as Qwen-Image-2.1-Turbo ships it; its length is then
    the step count) shifted and stretched the same way, as the scheduler treats sigmas it is given."""
    sigmas = np.asarray(grid if grid is not None else np.linspace(1.0, 1 / steps, steps)).astype(np.float32)
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


def plain_cfg(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance without Qwen-Image's norm rescale, as Qwen-Image-2.1's pipeline guides."""
    return v_uncond + scale * (v_cond - v_uncond)


@dataclass(frozen=True)
class Shortcuts:
    """Fewer transformer calls for nearly the same image, and the schedule distilled few-step models need; the
    defaults change nothing."""

    reuse: float = 0.0  # adaptive velocity reuse threshold (`reusing`); 0: off
    cfg_until: float = 1.0  # true CFG for this first fraction of the steps (`cfg_until`); 1: every step
    shift: float | None = None  # a constant flow shift replacing the model's schedule (`shifted`); None: the model's
    kv_cache: bool = True  # Qwen-Image-2.1: the prompt and pictures' keys and values computed once, reused each step


def cfg_until(guided: Velocity, conditional: Velocity, sigmas: torch.Tensor, fraction: float) -> Velocity:
    """True CFG for the first `fraction` of the steps of `sigmas`, the conditional pass alone after (one
    transformer sample a step instead of two). fraction 1 guides every step."""
    n = len(sigmas) - 1
    cut = float(sigmas[min(math.ceil(fraction * n - 1e-9), n)])  # the first sigma left unguided

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return guided(x, sigma) if float(sigma) > cut else conditional(x, sigma)

    return velocity


@dataclass(frozen=True)
class Reuse:
    """When adaptive velocity reuse may skip the model (EasyCache's rule, stable-diffusion.cpp): never in the
    first `warmup` fraction of the steps nor the last `tail`, never more than `max_run` steps in a row."""

    threshold: float
    warmup: float = 0.15
    tail: float = 0.05
    max_run: int = 3


def reusing(velocity: Velocity, sigmas: torch.Tensor, rule: Reuse) -> Velocity:
    """`velocity`, computed only when its output may have changed enough to matter.

    On computed steps it records the input x and output v, and k = mean|dv| / mean|dx| between the last two
    computed steps: how much the output moves per unit of input change. On the next steps it accumulates
    k * mean|x - x_before| / mean|v| (the estimated relative change of the output) and, while that stays
    under the threshold, returns the last computed velocity extrapolated to first order in sigma instead of
    calling the model. Wrapping the guided velocity makes one decision for the CFG pair."""
    n = len(sigmas) - 1
    steps = {float(s): i for i, s in enumerate(sigmas[:-1])}
    first, last = max(2, round(rule.warmup * n)), n - max(1, round(rule.tail * n))
    done: list[tuple[float, torch.Tensor, torch.Tensor]] = []  # the last two computed: (sigma, x, v)
    state = dict(x=None, change=0.0, run=0, k=None)

    def step(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        i, s = steps[float(sigma)], float(sigma)
        if state["k"] is not None and first <= i < last and state["run"] < rule.max_run:
            sigma_c, _, v_c = done[-1]
            change = state["change"] + state["k"] * float((x - state["x"]).abs().mean() / v_c.abs().mean())
            if change < rule.threshold:
                state.update(x=x, change=change, run=state["run"] + 1)
                sigma_p, _, v_p = done[-2]
                return v_c + (v_c - v_p) * ((s - sigma_c) / (sigma_c - sigma_p))
        v = velocity(x, sigma)
        if done:
            _, x_c, v_c = done[-1]
            dx = float((x - x_c).abs().mean())
            state["k"] = float((v - v_c).abs().mean()) / dx if dx > 0 else None
        done[:] = [*done[-1:], (s, x, v)]
        state.update(x=x, change=0.0, run=0)
        return v

    return step


def with_shortcuts(velocity: Velocity, sigmas: torch.Tensor, shortcuts: Shortcuts,
                   conditional: Velocity | None = None) -> Velocity:
    """The velocity a sampling runs over `sigmas` with its shortcuts: a guided `velocity` gives way to
    `conditional` (its conditional pass alone; None: `velocity` is unguided) after the first cfg_until fraction
    of the steps (`cfg_until`), and adaptive reuse wraps the result when shortcuts.reuse is on (`reusing`: one
    decision for a guidance pair)."""
    if conditional is not None and shortcuts.cfg_until < 1:
        velocity = cfg_until(velocity, conditional, sigmas, shortcuts.cfg_until)
    return reusing(velocity, sigmas, Reuse(shortcuts.reuse)) if shortcuts.reuse > 0 else velocity

"""Qwen-Image-2.1's guidance and the transformer's velocity: whether guidance runs (plain CFG, cfg > 1 with a
negative prompt), the prompt branches with their rotary layouts and prefix caches, a guidance pair in one call, and
the tokens computed and spared (Counts). A mixin over Engine21 (qwen21.py)."""

import warnings
from dataclasses import dataclass

import torch

from qimg.engine.request import Sampling
from qimg.errors import QimgWarning
from qimg.sampling import plain_cfg, with_shortcuts


@dataclass
class Counts:
    """The transformer's tokens computed, and those the prefix cache spared (read from it instead); the calls
    are Components.calls (a guidance pair counts 2)."""

    tokens: int = 0
    cached: int = 0


class Velocity21:
    """Engine21's guidance and velocity: a mixin over Components (transformer, device, dtype, calls, counts,
    parallel, kind)."""

    def guided(self, sampling: Sampling) -> bool:
        """Whether guidance runs: cfg > 1 with a negative prompt, as the reference (which warns otherwise)."""
        if sampling.cfg > 1 and not sampling.negative_prompt:
            warnings.warn(f"--cfg {sampling.cfg:g} needs --negative-prompt on {self.kind.display} (it is sampled "
                          "without guidance unless one is given): sampling without guidance", QimgWarning,
                          stacklevel=3)
        return sampling.cfg > 1 and bool(sampling.negative_prompt)

    def velocity(self, embeds: list[tuple], refs: torch.Tensor | None, grids: list[tuple[int, int]],
                 sampling: Sampling, sigmas: torch.Tensor, guided: bool):
        """The (guided) velocity over the target's tokens (1, h*w, 64) for the steps of `sigmas`; refs: the
        pictures' packed latents (1, R, 64) or None; grids: each picture's (h, w) in tokens, the target last."""
        from qimg.model.rope21 import build_layout
        from qimg.model.transformer21 import PrefixCache

        model = self.transformer
        target = grids[-1][0] * grids[-1][1]
        kv = sampling.shortcuts.kv_cache and model.cfg.causal_condition
        filled = set()  # the branches whose prefix cache the first call filled

        def branch(embed: torch.Tensor, slots: torch.Tensor) -> tuple:
            layout = build_layout(slots.to(self.device), grids, model.cfg.axes_dims_rope, device=self.device)
            return embed.to(self.device, self.dtype)[None], layout, PrefixCache() if kv else None

        def run(branches: list[tuple], x: torch.Tensor, sigma: torch.Tensor) -> list[torch.Tensor]:
            """The velocity of each branch (txt, layout, cache): a guidance pair in one call (--cfg-parallel
            gives each rank one), computed as one process computes them, one after the other."""
            x = x.to(self.dtype)
            if refs is not None:
                x = torch.cat([refs.to(self.device, self.dtype), x], dim=1)
            t = (sigma * 1000).to(self.dtype).reshape(1) / 1000
            for one in branches:
                warm = kv and id(one) in filled
                filled.add(id(one))
                self.calls += 1
                self.counts.tokens += target if warm else one[1].length
                self.counts.cached += one[1].prefix if warm else 0
            with self._attention_backend():
                if len(branches) == 2 and hasattr(model, "pair"):
                    return [v.float() for v in model.pair(x, t, branches)]
                return [model(x, txt, t, layout, cache).float() for txt, layout, cache in branches]

        conditional_branch = branch(*embeds[0])

        def conditional(x, sigma):
            return run([conditional_branch], x, sigma)[0]

        velocity = conditional
        if not guided and self.parallel is not None:
            self.parallel.unguided(f"for {self.kind.display} unless --cfg is above 1 with a --negative-prompt")
        if guided:
            pair = [conditional_branch, branch(*embeds[1])]

            def velocity(x, sigma):
                return plain_cfg(*run(pair, x, sigma), sampling.cfg)

        return with_shortcuts(velocity, sigmas, sampling.shortcuts, conditional if guided else None)

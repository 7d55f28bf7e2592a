"""What one sampling run is asked to do, with every value filled in: the request the engine's methods take
(with the pictures, canvases and masks they work on) instead of a dozen loose arguments. The job layer builds
it once per run from the command's options and the model's defaults (`jobs.spec.Prompt.resolve`)."""

from dataclasses import dataclass

from qimg.sampling import Shortcuts, first_step


@dataclass(frozen=True)
class Sampling:
    prompt: str
    negative_prompt: str  # used when cfg > 1
    steps: int  # of the whole schedule; an edit of strength < 1 runs only its last ones
    cfg: float  # true CFG scale; 1 or below: the conditional pass alone
    seed: int
    strength: float = 1.0  # an edit's: how far into the schedule it starts (1: from noise)
    shortcuts: Shortcuts = Shortcuts()

    @property
    def prompts(self) -> list[str]:
        """The prompts to encode: the negative one second, only when guidance uses it."""
        return [self.prompt, self.negative_prompt] if self.cfg > 1 else [self.prompt]

    @property
    def steps_run(self) -> int:
        """The steps sampling takes: all of them, or an edit's share of them (sampling.first_step)."""
        return self.steps - first_step(self.steps, self.strength)

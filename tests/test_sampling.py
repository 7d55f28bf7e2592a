"""Sampling math: schedule parity with diffusers' scheduler, the Euler loop and true CFG."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

from qimg.sampling import ScheduleConfig, euler, first_step, flow_sigmas, keep_known, noised, shift_mu, true_cfg

QWEN_SCHEDULER = dict(
    base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192, max_shift=0.9,
    num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, stochastic_sampling=False,
    time_shift_type="exponential", use_beta_sigmas=False, use_dynamic_shifting=True,
    use_exponential_sigmas=False, use_karras_sigmas=False,
)


def reference_sigmas(steps, seq_len, **overrides):
    config = {**QWEN_SCHEDULER, **overrides}
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    mu = calculate_shift(seq_len, config["base_image_seq_len"], config["max_image_seq_len"],
                         config["base_shift"], config["max_shift"])
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas


@pytest.mark.parametrize("steps", [2, 7, 20, 50])
@pytest.mark.parametrize("seq_len", [16, 256, 4096, 6000])
def test_sigmas_match_reference_scheduler(steps, seq_len):
    ours = flow_sigmas(steps, seq_len, ScheduleConfig.from_dict(QWEN_SCHEDULER))
    assert torch.equal(ours, reference_sigmas(steps, seq_len))


@pytest.mark.parametrize("overrides", [
    dict(time_shift_type="linear"),
    dict(shift_terminal=None),
    dict(use_dynamic_shifting=False, shift=3.0),
])
def test_sigmas_match_reference_for_other_configs(overrides):
    ours = flow_sigmas(10, 1024, ScheduleConfig.from_dict({**QWEN_SCHEDULER, **overrides}))
    torch.testing.assert_close(ours, reference_sigmas(10, 1024, **overrides), rtol=0, atol=1e-6)


def test_schedule_ends_at_terminal_then_zero():
    sigmas = flow_sigmas(30, 4096, ScheduleConfig())
    assert sigmas[-1] == 0 and abs(sigmas[-2].item() - 0.02) < 1e-6
    assert torch.all(sigmas[1:] < sigmas[:-1])
    assert torch.isfinite(flow_sigmas(1, 4096, ScheduleConfig())).all()


def test_mu_grows_with_resolution():
    cfg = ScheduleConfig()
    assert shift_mu(256, cfg) == pytest.approx(0.5) and shift_mu(8192, cfg) == pytest.approx(0.9)


@pytest.mark.parametrize("key", ["use_karras_sigmas", "stochastic_sampling", "invert_sigmas"])
def test_unsupported_scheduler_options_are_refused(key):
    with pytest.raises(ValueError, match=key):
        ScheduleConfig.from_dict({**QWEN_SCHEDULER, key: True})


def test_euler_recovers_x0_from_exact_velocity_in_one_step():
    # For x_sigma = (1 - sigma) x0 + sigma noise the velocity is noise - x0, constant along the path.
    x0, noise = torch.randn(2, 8, 4), torch.randn(2, 8, 4)
    out = euler(lambda x, s: noise - x0, noise, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(out, x0)


def test_euler_follows_straight_path_over_many_steps_and_reports_each():
    x0, noise = torch.randn(1, 4, 4), torch.randn(1, 4, 4)
    sigmas = flow_sigmas(9, 64, ScheduleConfig())
    seen = []
    out = euler(lambda x, s: noise - x0, sigmas[0] * noise + (1 - sigmas[0]) * x0, sigmas,
                callback=lambda i, x: seen.append(i))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    assert seen == list(range(9))


def test_true_cfg_combines_then_keeps_conditional_norm():
    cond, uncond = torch.randn(1, 5, 64), torch.randn(1, 5, 64)
    v = true_cfg(lambda x, s: torch.cat([cond, uncond]), 4.0)(None, None)
    combined = uncond + 4.0 * (cond - uncond)
    torch.testing.assert_close(v.norm(dim=-1), cond.norm(dim=-1))
    cosine = torch.nn.functional.cosine_similarity(v, combined, dim=-1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine))


def test_true_cfg_at_scale_one_is_the_conditional_velocity():
    cond, uncond = torch.randn(1, 5, 64), torch.randn(1, 5, 64)
    torch.testing.assert_close(true_cfg(lambda x, s: torch.cat([cond, uncond]), 1.0)(None, None), cond)


@pytest.mark.parametrize("steps, strength", [(10, 1.0), (10, 0.35), (7, 0.5), (20, 0.01)])
def test_first_step_is_where_the_reference_img2img_starts(steps, strength):
    t_start = int(max(steps - min(steps * strength, steps), 0))  # pipeline_qwenimage_img2img.get_timesteps
    assert first_step(steps, strength) == t_start
    assert steps - first_step(steps, strength) >= 1


def test_inpaint_keeps_x0_exactly_where_the_mask_is_zero():
    x0, noise = torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    mask = torch.zeros(1, 6, 8)
    mask[:, :3] = 1.0
    sigmas = flow_sigmas(6, 64, ScheduleConfig())
    out = euler(lambda x, s: torch.randn_like(x), noised(x0, noise, sigmas[0]), sigmas,
                blend=keep_known(x0, noise, mask, len(sigmas) - 1))
    assert torch.equal(out[:, 3:], x0[:, 3:])
    assert not torch.allclose(out[:, :3], x0[:, :3])


def test_soft_mask_value_edits_only_its_fraction_of_the_steps():
    steps = 10
    x0, noise = torch.zeros(1, 3, 1), torch.ones(1, 3, 1)
    mask = torch.tensor([1.0, 0.3, 0.0]).view(1, 3, 1)
    sigmas = flow_sigmas(steps, 64, ScheduleConfig())
    free_steps = torch.zeros(3)

    def velocity(x, sigma):
        return torch.zeros_like(x)

    def count(i, x):
        on_path = torch.isclose(x, noised(x0, noise, sigmas[i + 1])).view(3)
        free_steps.add_((~on_path).float())

    # A zero velocity moves nothing: a latent leaves the re-noised path only on steps it is free.
    euler(velocity, noise.clone(), sigmas, callback=count, blend=keep_known(x0, noise, mask, steps))
    assert free_steps.tolist() == [10, 3, 0]

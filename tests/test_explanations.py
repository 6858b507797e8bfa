"""The plain-words explanations say what the numbers are: one noise share for every family, and a guidance panel
that agrees with the run at scale 1 and below and names the negative prompt."""
import pytest

from visualizer import api
from visualizer.analysis.noising import guidance_note
from visualizer.engine.run import DEFAULTS, Step


def test_noise_share_reads_the_same_for_an_sd_and_a_flow_step_at_equal_snr():
    sd = Step(index=1, timestep=500.0, sigma=1.0, progress=0.5, evaluations=1)  # x = x0 + 1 * eps: SNR 1
    flow = Step(index=1, timestep=500.0, sigma=0.5, progress=0.5, evaluations=1, flow=True)  # (1 - .5) x0 + .5 eps
    assert sd.snr == pytest.approx(flow.snr) == pytest.approx(1.0)
    assert sd.noise_share == pytest.approx(flow.noise_share) == pytest.approx(0.5)
    late = Step(index=9, timestep=100.0, sigma=0.2, progress=0.9, evaluations=1, flow=True)
    assert late.noise_share == pytest.approx(0.04 / (0.64 + 0.04))  # the share of the input's variance


def test_noise_share_of_an_sd_step_is_one_minus_alpha_bar(tiny_model, tiny_pipe):
    run = api.run("a red circle", model=tiny_model, sampler="DDIM", num_inference_steps=4, frames=())
    alphas = tiny_pipe.scheduler.alphas_cumprod
    for step in run.steps:
        assert step.noise_share == pytest.approx(1 - float(alphas[int(step.timestep)]), rel=1e-5)
        assert step.noise_share < 1  # t = 999 on SD's schedule still holds some of the image


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.0])
def test_the_guidance_panel_says_guidance_is_off_at_1_and_below(tiny_model, scale):
    run = api.run("a red circle", model=tiny_model, num_inference_steps=2, guidance_scale=scale, frames=())
    assert "eps_uncond" not in run.tensors  # as diffusers: no unconditional branch ran
    note = guidance_note(run)
    assert "off" in note and f"scale {scale:g}" in note


def test_the_guidance_panel_names_the_negative_prompt_when_one_is_set(tiny_model):
    plain = guidance_note(api.run("a red circle", model=tiny_model, num_inference_steps=2, frames=()))
    negative = guidance_note(api.run("a red circle", model=tiny_model, num_inference_steps=2, frames=(),
                                     negative_prompt="blue square", guidance_scale=7.5))
    assert "the empty prompt" in plain and f"Scale {DEFAULTS['guidance_scale']:g}" in plain
    assert "the negative prompt “blue square”" in negative and "Scale 7.5" in negative

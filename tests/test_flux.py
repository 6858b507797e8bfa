"""The Flux.1 family (families.py: packed latents, position ids, dynamic shifting, distilled guidance) through the
shared loop, against diffusers' own FluxPipeline on tiny random dev-like and schnell-like models."""
import numpy as np
import pytest
import torch
from diffusers import (DEISMultistepScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                       FluxPipeline, UniPCMultistepScheduler)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from visualizer import api
from visualizer.engine.decode import vae_decode
from visualizer.engine.families import BY_KEY
from visualizer.engine.denoise import generate, generate_many
from visualizer.errors import SettingsError, UnknownSamplerError
from visualizer.engine.families import family_of
from visualizer.analysis.stages import pipeline_stages
from visualizer.engine.run import Run, Settings
from visualizer.engine.samplers import FLUX_SAMPLERS, valid_for

from conftest import (assert_same_image, check_latent_colour_preview, check_taesd_lookup, tiny_family_model,
                      trace_diffusers)
from test_img2img import init_image

PROMPT = "a red circle on the left"
SEED = 11


def _flow_solver(cls):
    """diffusers' documented way to put a multistep solver on a Flux model: flow sigmas, a velocity output."""
    return lambda config: cls.from_config(config, use_flow_sigmas=True, prediction_type="flow_prediction")


REFERENCE_SCHEDULERS = {
    "Euler": lambda config: None,  # the pipeline's own FlowMatchEulerDiscreteScheduler, untouched
    "DPM++ 2M": _flow_solver(DPMSolverMultistepScheduler),
    "UniPC": _flow_solver(UniPCMultistepScheduler),
    "DEIS": _flow_solver(DEISMultistepScheduler),
}


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(folder, pipeline) of a tiny random guidance-distilled (dev-like) Flux model, loaded like a real one."""
    return tiny_family_model(tmp_path_factory, "tiny_flux_pipeline")


@pytest.fixture(scope="module")
def schnell(tmp_path_factory):
    """The same without a guidance embedding (schnell-like)."""
    return tiny_family_model(tmp_path_factory, "tiny_flux_pipeline", guidance_embeds=False)


def settings(folder, sampler="Euler", steps=6, **kw):
    kw.setdefault("guidance_scale", 3.5)
    kw.setdefault("prompt", PROMPT)
    return Settings(model=folder, sampler=sampler, num_inference_steps=steps, seed=SEED, height=32, width=32, **kw)


def diffusers_image(pipe, sampler="Euler", steps=6, prompt=PROMPT, guidance_scale=3.5):
    reference = FluxPipeline(**pipe.components)
    reference.scheduler = REFERENCE_SCHEDULERS[sampler](pipe.scheduler.config) or pipe.scheduler
    reference.set_progress_bar_config(disable=True)
    return reference(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, height=32, width=32,
                     generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]


def final_image(pipe, run) -> np.ndarray:
    """The run's final image as the app shows it: uint8, through the model's own VAE."""
    return vae_decode(pipe.vae, run.tensors["latents"][-1:])[0]


@pytest.mark.parametrize("sampler", list(REFERENCE_SCHEDULERS))
def test_final_image_matches_diffusers_flux_pipeline(flux, sampler):
    folder, pipe = flux
    run = generate(settings(folder, sampler), pipe)
    assert run.info.family == "flux" and run.info.prediction_type == "flow_prediction" and len(run) == 6
    assert run.info.guidance == "distilled" and "eps_cond" not in run.tensors  # no unconditional branch
    assert_same_image(final_image(pipe, run), diffusers_image(pipe, sampler))
    assert run.steps[0].sigma == pytest.approx(1.0, abs=1e-3) and all(s.flow for s in run.steps)


def test_euler_follows_the_size_shifted_schedule_and_keeps_latents_unpacked(flux):
    folder, pipe = flux
    run = generate(settings(folder), pipe)
    # the schedule FluxPipeline sets: sigmas 1 .. 1/6 shifted by mu of the image's 4 x 4 = 16 tokens
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    config = scheduler.config
    mu = calculate_shift(16, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=mu)
    assert [s.sigma for s in run.steps] == pytest.approx(scheduler.sigmas[:-1].tolist())
    plain = FlowMatchEulerDiscreteScheduler.from_config(config, use_dynamic_shifting=False)
    plain.set_timesteps(6)
    assert [s.sigma for s in run.steps] != pytest.approx(plain.sigmas[:-1].tolist())  # the shift is not SD 3's
    t = run.tensors
    assert t["latents"].shape == (6, 16, 8, 8) and run.info.latent_shape == [1, 16, 8, 8]
    assert torch.allclose(t["x0"][-1], t["latents"][-1], atol=1e-5)  # Euler's last step lands on x0-hat


@pytest.mark.parametrize("sampler", list(REFERENCE_SCHEDULERS))
def test_x_t_and_x0_hat_are_what_diffusers_flux_pipeline_computes(flux, sampler):
    """x_t: the latents FluxPipeline hands its callback_on_step_end after each step, unpacked from its tokens.
    x0-hat: the schedulers' own prediction x0 = x - sigma * v, with v what diffusers' transformer returned in
    diffusers' own run (hooked; guidance-distilled: one evaluation, no CFG branch), unpacked; the noise estimate
    x + (1 - sigma) v likewise."""
    folder, pipe = flux
    run = generate(settings(folder, sampler), pipe)
    reference = FluxPipeline(**pipe.components)
    reference.scheduler = REFERENCE_SCHEDULERS[sampler](pipe.scheduler.config) or pipe.scheduler
    reference.set_progress_bar_config(disable=True)
    theirs = trace_diffusers(reference, reference.transformer, prompt=PROMPT, num_inference_steps=6,
                             guidance_scale=3.5, height=32, width=32, generator=torch.Generator().manual_seed(SEED),
                             output_type="np")
    assert theirs["evaluations"] == 6 and theirs["model_output"].shape[1] == 1

    def unpack(tokens):  # [steps, 16 tokens, 64] -> [steps, 16, 8, 8], as FluxPipeline unpacks its final latents
        return FluxPipeline._unpack_latents(tokens, 32, 32, reference.vae_scale_factor)

    t = run.tensors
    assert torch.allclose(t["xt"], unpack(theirs["latents"]), rtol=0, atol=1e-5)
    assert [s.sigma for s in run.steps] == pytest.approx(theirs["sigmas"].tolist(), rel=1e-6)
    x, v, sigma = theirs["model_input"][:, 0], theirs["model_output"][:, 0], theirs["sigmas"][:, None, None]
    assert torch.allclose(t["x_in"], unpack(x), rtol=0, atol=1e-5)
    assert torch.allclose(t["x0"], unpack(x - sigma * v), rtol=0, atol=1e-5)
    assert torch.allclose(t["eps"], unpack(x + (1 - sigma) * v), rtol=0, atol=1e-5)


def test_distilled_guidance_is_a_per_row_input_even_in_lockstep(flux):
    folder, pipe = flux
    low, high = (generate(settings(folder, guidance_scale=g), pipe) for g in (1.0, 6.0))
    assert not torch.allclose(low.tensors["latents"][-1], high.tensors["latents"][-1], atol=1e-3)
    assert_same_image(final_image(pipe, low), diffusers_image(pipe, guidance_scale=1.0))
    # two samplers with different guidance scales in one batched call: each row gets its own
    together = generate_many([settings(folder, "Euler", guidance_scale=1.0),
                              settings(folder, "DPM++ 2M", guidance_scale=6.0)], pipe)
    alone = [low, generate(settings(folder, "DPM++ 2M", guidance_scale=6.0), pipe)]
    for run, single in zip(together, alone):
        assert run.info.lockstep_batch == 2
        assert torch.allclose(run.tensors["latents"], single.tensors["latents"], rtol=1e-4, atol=1e-4)


def test_img2img_matches_diffusers_flux_img2img_pipeline(flux):
    from diffusers import FluxImg2ImgPipeline

    folder, pipe = flux
    run = generate(settings(folder, steps=6, init_image=init_image(), strength=0.8), pipe)
    assert len(run) == 5 and run.info.img2img.skipped_steps == 1  # 6 - int(6 - 4.8), as FluxImg2ImgPipeline counts
    reference = FluxImg2ImgPipeline(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    theirs = reference(PROMPT, image=init_image(), strength=0.8, num_inference_steps=6, guidance_scale=3.5, height=32,
                       width=32, generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]
    assert_same_image(final_image(pipe, run), theirs)


def test_word_maps_read_the_double_stream_blocks_and_leave_the_image_untouched(flux):
    folder, pipe = flux
    plain, mapped = (generate(settings(folder, attention=a), pipe) for a in (False, True))
    assert torch.equal(plain.tensors["latents"], mapped.tensors["latents"])
    assert mapped.info.attention["tokens"] == PROMPT.split()  # T5's tokens: no start token, the end one dropped
    raw = mapped.tensors["attention_4"]  # 8x8 latents packed into a 4x4 grid of tokens
    assert raw.shape == (6, 6, 4, 4) and (raw >= 0).all() and (raw.sum(1) <= 1).all()
    assert not torch.allclose(raw[:, 0], raw[:, 1])


@pytest.mark.parametrize("negative", ["blue square", ""])
def test_true_cfg_runs_a_negative_branch_as_flux_pipeline_does(flux, negative):
    folder, pipe = flux
    run = generate(settings(folder, negative_prompt=negative, true_cfg_scale=4.0), pipe)
    assert "eps_cond" in run.tensors and run.info.guidance == "distilled"  # both: distilled guidance in each branch
    reference = FluxPipeline(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    theirs = reference(PROMPT, negative_prompt=negative, true_cfg_scale=4.0, guidance_scale=3.5, num_inference_steps=6,
                       height=32, width=32, generator=torch.Generator().manual_seed(SEED), output_type="np").images[0]
    assert_same_image(final_image(pipe, run), theirs)
    assert not torch.allclose(run.tensors["latents"][-1], generate(settings(folder), pipe).tensors["latents"][-1])
    parts = api.guidance_breakdown(run, 2)
    assert set(parts) == {"uncond", "cond", "guided", "added"} and parts["added"].max() > 0
    assert "**true CFG** (scale 4)" in pipeline_stages(run)


def test_true_cfg_is_for_flux_only(tmp_path, tiny_model):
    with pytest.raises(SettingsError, match="True CFG is for Flux"):
        generate(Settings(prompt=PROMPT, model=tiny_model, num_inference_steps=2, true_cfg_scale=3.0))


def test_schnell_like_models_ignore_guidance_as_their_pipeline_does(schnell):
    folder, pipe = schnell
    runs = [generate(settings(folder, guidance_scale=g), pipe) for g in (1.0, 5.0)]
    assert torch.equal(runs[0].tensors["latents"], runs[1].tensors["latents"]) and runs[0].info.guidance == "none"
    assert_same_image(final_image(pipe, runs[1]), diffusers_image(pipe, guidance_scale=5.0))
    assert "no guidance" in pipeline_stages(runs[0])


def test_api_run_end_to_end_saves_and_loads(flux, tmp_path):
    folder, pipe = flux
    run = api.run(settings(folder, steps=4))
    assert len(run.frames["xt"]) == len(run.frames["x0"]) == 4 and run.final_image.shape == (32, 32, 3)
    assert (run.final_image == run.frames["xt"][-1]).all() and run.info.metrics
    i = run.info
    assert i.text_embedding_shape == [1, 512, 64] and i.pooled_embedding_shape == [1, 32]  # T5 tokens; CLIP pooled
    assert i.token_limit == 512 and i.vae_shift_factor == pytest.approx(0.1159)
    stages = pipeline_stages(run)
    for words in ("(Flux)", "T5", "pooled_projections", "packed into tokens", "txt_ids", "**input** of the model",
                  "use_dynamic_shifting=True", "+ 0.1159"):
        assert words in stages, words
    assert api.guidance_breakdown(run, 1) is None  # no unconditional branch to break down
    assert len(api.forward_noising(run)) == 4
    loaded = Run.load(run.save(tmp_path / "run"))
    assert loaded.info == run.info and (loaded.final_image == run.final_image).all()


def test_flux_samplers_and_what_flux_refuses(flux):
    folder, pipe = flux
    assert valid_for("flux") == list(FLUX_SAMPLERS) == ["Euler", "DPM++ 2M", "UniPC", "DEIS"]
    with pytest.raises(UnknownSamplerError, match="The Heun sampler does not fit Flux models"):
        generate(settings(folder, "Heun"), pipe)
    with pytest.raises(SettingsError, match="no unconditional branch"):
        generate(settings(folder, negative_prompt="blue"), pipe)
    assert family_of(pipe).size_multiple(pipe) == 8  # the VAE's 4 x the 2x2 packing (16 for real Flux models)


def test_flux_previews_use_flux_latent_colours_and_taef1(flux, tmp_path, monkeypatch):
    _, pipe = flux
    check_latent_colour_preview(pipe, BY_KEY["flux"].latent_rgb_factors, BY_KEY["flux"].latent_rgb_bias)
    check_taesd_lookup("flux", "VISUALIZER_TAEF1", tmp_path / "taef1", monkeypatch)


def test_the_apps_sampler_menu_for_a_flux_folder(flux, tmp_path):
    from visualizer.engine.models import family_of_reference
    from visualizer.app.handlers import App
    from visualizer.app.runs import AppConfig

    folder, _ = flux
    assert family_of_reference(folder).key == "flux"
    app = App(AppConfig(output_dir=tmp_path, example_dir=None))
    menu = app.runs.sampler_choices(folder, ["Euler", "Heun", "UniPC"])
    assert menu["choices"] == valid_for("flux") and menu["value"] == ["Euler", "UniPC"]
    assert "no CFG branch" in app.runs.guidance_label(folder)["label"]
    assert app.runs.guidance_label("embedded")["label"] == "Guidance scale (CFG; 1 = off)"


def test_flux_alias_and_the_dtype_auto_picks_per_family():
    from visualizer.engine.families import BY_KEY
    from visualizer.engine.models import LoadOptions, family_of_reference, resolve

    assert resolve("flux-schnell").source == "black-forest-labs/FLUX.1-schnell"
    assert family_of_reference("flux-schnell").key == "flux"  # without loading it or the network
    auto, gpu = LoadOptions(), torch.device("cuda")  # a device object only: nothing runs on it
    assert [auto.compute_dtype(gpu, BY_KEY[k]) for k in ("sd", "sdxl", "sd3", "flux")] == [
        torch.float16, torch.float16, torch.bfloat16, torch.bfloat16]
    assert auto.compute_dtype(torch.device("cpu"), BY_KEY["flux"]) == torch.float32
    assert LoadOptions(dtype="fp16").compute_dtype(gpu, BY_KEY["flux"]) == torch.float16


def test_the_app_streams_a_flux_run_into_the_player(flux, tmp_path):
    from visualizer.app.handlers import App
    from visualizer.app.runs import AppConfig

    folder, _ = flux
    app = App(AppConfig(output_dir=tmp_path, example_dir=None))
    updates = list(app.generate_tab.generate(PROMPT, "", SEED, 4, 3.5, "Euler", 32, 32, folder))
    props, final, run_id, _, status, *_, stages = updates[-1]
    assert status.startswith("Done: 4 steps") and final.shape == (32, 32, 3)
    cell = props["cells"][0]
    assert cell["start"] and len(cell["frames"]["x0"]) == len(cell["frames"]["latents"]) == 1 + 4 and cell["curve"]
    assert cell["steps"][0]["sigma"] == pytest.approx(1.0, abs=1e-3)  # flow sigma in [0, 1] on the schedule plot
    assert "(Flux)" in stages and "no unconditional branch" in stages
    panel = app.generate_tab.guidance(run_id, 2)
    assert panel[:4] == (None,) * 4 and "input of the model" in panel.note  # no unconditional branch: no images


def test_the_apps_true_cfg_gives_flux_a_guidance_breakdown(flux, tmp_path):
    from visualizer.app.handlers import App
    from visualizer.app.runs import AppConfig

    folder, _ = flux
    app = App(AppConfig(output_dir=tmp_path, example_dir=None))
    *_, last = app.generate_tab.generate(PROMPT, "blue square", SEED, 4, 3.5, "Euler", 32, 32, folder, None, None, False, 4.0)
    run = app.runs.store.get(last.run_id)[0]
    assert run.settings.true_cfg_scale == 4.0 and "eps_cond" in run.tensors
    assert all(image is not None for image in app.generate_tab.guidance(last.run_id, 2)[:4])  # the four panels, filled

"""What each model family's adapter holds (families.py), read by models, decode and the pipeline-stages view; and
run bundles written before RunInfo.unet_evaluations was renamed denoiser_evaluations."""
import json
from pathlib import Path

import pytest

from visualizer import api
from visualizer.analysis.stages import pipeline_stages
from visualizer.engine import models
from visualizer.engine.families import BY_KEY
from visualizer.engine.run import Run

EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "example"
LATENT_CHANNELS = {"sd": 4, "sdxl": 4, "sd3": 16, "flux": 16}


def test_each_alias_and_checkpoint_kind_belongs_to_one_family():
    aliases = [name for family in BY_KEY.values() for name in family.aliases]
    kinds = [kind for family in BY_KEY.values() for kind in family.checkpoint_kinds]
    assert len(set(aliases)) == len(aliases) and len(set(kinds)) == len(kinds)  # no family's entry hides another's
    for family in BY_KEY.values():
        for name, hub_id in family.aliases.items():
            assert models.resolve(name).source == models.ALIASES[name] == hub_id
            assert models.family_of_reference(name) is family
        assert all(models.CHECKPOINT_FAMILIES[kind] is family for kind in family.checkpoint_kinds)
    assert not set(models.CHECKPOINT_KINDS) & set(kinds)  # the kinds that do not run are none of theirs


@pytest.mark.parametrize("key", list(BY_KEY))
def test_each_family_has_its_own_latent_colours_and_taesd(key):
    family = BY_KEY[key]
    assert len(family.latent_rgb_factors) == LATENT_CHANNELS[key]
    assert all(len(row) == 3 for row in family.latent_rgb_factors) and len(family.latent_rgb_bias) == 3
    others = [f for f in BY_KEY.values() if f is not family]
    assert all(family.latent_rgb_factors != f.latent_rgb_factors for f in others)
    assert all(family.taesd_variable != f.taesd_variable and family.taesd_repo != f.taesd_repo for f in others)


def test_the_stages_of_an_example_bundle_come_from_its_family():
    run = Run.load(EXAMPLES / "euler")
    family = BY_KEY[run.info.family]
    stages = pipeline_stages(run).splitlines()
    assert stages[0].startswith(f"1. **{family.tokenizer_heading}**: ")
    assert stages[1] == f"2. {family.text_encoder_stage(run.info, 'eps_cond' in run.tensors, False)}"
    assert stages[3].startswith(f"4. **{family.denoiser_heading}: {len(run)} evaluations for {len(run)} steps")


def test_a_run_saved_with_the_old_key_loads_its_denoiser_evaluations(tiny_model, tmp_path):
    run = api.run("a red circle", model=tiny_model, sampler="Heun", num_inference_steps=2, seed=1)
    assert run.info.denoiser_evaluations == 3  # Heun: 2N - 1
    folder = run.save(tmp_path / "run")
    doc = json.loads((folder / "run.json").read_text())
    assert doc["info"]["denoiser_evaluations"] == 3 and "unet_evaluations" not in doc["info"]
    doc["info"]["unet_evaluations"] = doc["info"].pop("denoiser_evaluations")  # as bundles before the rename
    (folder / "run.json").write_text(json.dumps(doc))
    loaded = Run.load(folder)
    assert loaded.info.denoiser_evaluations == 3 and not hasattr(loaded.info, "unet_evaluations")
    assert loaded.info == run.info

"""SDXL, SD3 and Flux backbones on tiny random pipelines built here (nothing from a hub).

On each: PoGDiff, vanilla and resample train LoRA adapters that diffusers' own pipeline loads with
``load_lora_weights``; pogdiff samples exactly as that pipeline does at the same seed; a run resumed
from its checkpoint ends with the same weights as one never stopped; SDXL also trains in full. What
cannot be trained is refused in one line before any work, hub ids included.
"""

import json
import shutil

import diffusers
import pytest
import torch
from conftest import write_toy_dataset
from safetensors.torch import load_file

from pogdiff.backbones.backbone import load_backbone
from pogdiff.backbones.random_pipeline import write_random_pipeline
from pogdiff.backbones.sampling import generate
from pogdiff.cli import main
from pogdiff.training.ownership import MARK_FILE

PROMPT = "An image of Chen."
FAMILIES = {"tiny-sdxl": "StableDiffusionXLPipeline", "tiny-sd3": "StableDiffusion3Pipeline",
            "tiny-flux": "FluxPipeline"}
KINDS = {"tiny-sdxl": "stable-diffusion-xl", "tiny-sd3": "stable-diffusion-3", "tiny-flux": "flux"}
LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="session")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {shape: write_random_pipeline(root / shape, shape) for shape in FAMILIES}


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("family-data") / "data")


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("family-cache")


def train_cli(data, pretrained, out, cache, *options):
    argv = ["train", data, "--pretrained", pretrained, "--output-dir", out, "--train-batch-size", 4,
            "--resolution", 32, "--cache-dir", cache, "--no-progress", "--learning-rate", 1e-3, *options]
    assert main([str(a) for a in argv]) == 0
    return out


def pipeline_images(shape, pipeline, steps=2):
    """The diffusers pipeline's own sampler at seed 0 (DDIM for the UNet families, as pogdiff samples them)."""
    if shape == "tiny-sdxl":
        pipeline.scheduler = diffusers.DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    guidance = {"tiny-sdxl": 7.5, "tiny-sd3": 7.0, "tiny-flux": 3.5}[shape]
    extra = {"max_sequence_length": {"tiny-sd3": 77, "tiny-flux": 512}[shape]} if shape != "tiny-sdxl" else {}
    out = pipeline(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                   output_type="pt", generator=torch.Generator().manual_seed(0), **extra).images
    return out * 2 - 1


def pogdiff_images(run, steps=2):
    return generate(load_backbone(run), [PROMPT], num_inference_steps=steps, seed=0, progress=False)


@pytest.mark.parametrize("shape", FAMILIES)
def test_lora_runs_load_in_their_diffusers_pipeline_and_sample_alike(shape, pipelines, data, cache, tmp_path):
    pipeline_class = getattr(diffusers, FAMILIES[shape])
    base = pipeline_class.from_pretrained(pipelines[shape])
    for method in ("pogdiff", "vanilla", "resample"):
        run = train_cli(data, pipelines[shape], tmp_path / method, cache, "--method", method, "--max-train-steps", 2,
                        "--lora-rank", 4)
        info = json.loads((run / "pogdiff_run.json").read_text())
        assert info["backbone"] == KINDS[shape] and info["resolution"] == 32
        assert (run / LORA_FILE).is_file() and not any((run / part).exists() for part in ("unet", "transformer"))
    tuned = pipeline_class.from_pretrained(pipelines[shape])
    tuned.load_lora_weights(tmp_path / "pogdiff")
    # every adapter trained (its B moved from 0) is loaded as trained, not left at its initial 0
    denoiser = tuned.unet if shape == "tiny-sdxl" else tuned.transformer
    loaded = sum(int(p.abs().sum() > 0) for name, p in denoiser.named_parameters() if "lora_B" in name)
    saved = load_file(tmp_path / "pogdiff" / LORA_FILE)
    assert loaded > 0 and loaded == sum(int(v.abs().sum() > 0) for k, v in saved.items()
                                        if "lora_B" in k or k.endswith("lora.up.weight"))
    expected = pipeline_images(shape, tuned)
    assert expected.shape == (1, 3, 32, 32) and torch.isfinite(expected).all()
    assert not torch.allclose(expected, pipeline_images(shape, base), atol=1e-5)  # the adapters changed the model
    torch.testing.assert_close(pogdiff_images(tmp_path / "pogdiff"), expected, atol=2e-5, rtol=0)
    psi = load_file(tmp_path / "pogdiff" / "psi.safetensors")["psi"]
    assert torch.isfinite(psi).all() and (psi > 0).any()  # Eq. 12 on this backbone's own features


@pytest.mark.parametrize("shape", FAMILIES)
def test_a_resumed_run_ends_with_the_same_weights(shape, pipelines, data, tmp_path):
    options = ["--method", "pogdiff", "--lora-rank", 4, "--max-train-steps", 4, "--checkpointing-steps", 2]
    whole = train_cli(data, pipelines[shape], tmp_path / "whole", tmp_path / "cache", *options)
    resumed = tmp_path / "resumed"  # the run as it stood when killed after its first checkpoint
    resumed.mkdir()
    shutil.copy(whole / MARK_FILE, resumed / MARK_FILE)
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    train_cli(data, pipelines[shape], resumed, tmp_path / "cache", *options, "--resume-from-checkpoint", "latest")
    expected, got = load_file(whole / LORA_FILE), load_file(resumed / LORA_FILE)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_sdxl_trains_in_full_and_loads_as_a_pipeline(pipelines, data, cache, tmp_path):
    run = train_cli(data, pipelines["tiny-sdxl"], tmp_path / "run", cache, "--method", "pogdiff",
                    "--max-train-steps", 2)
    tuned = diffusers.StableDiffusionXLPipeline.from_pretrained(run)
    base = diffusers.StableDiffusionXLPipeline.from_pretrained(pipelines["tiny-sdxl"])
    for part in ("vae", "text_encoder", "text_encoder_2"):  # frozen parts saved untouched
        assert all(torch.equal(a, b) for a, b in zip(getattr(tuned, part).state_dict().values(),
                                                      getattr(base, part).state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(tuned.unet.state_dict().values(), base.unet.state_dict().values()))
    torch.testing.assert_close(pogdiff_images(run), pipeline_images("tiny-sdxl", tuned), atol=2e-5, rtol=0)


@pytest.mark.parametrize("method", ["cbdm", "t2h"])
def test_the_baselines_train_under_flow_matching(method, pipelines, data, cache, tmp_path):
    """CBDM's w = tau * sigma_t and T2H's redrawn velocity target on a flow backbone."""
    run = train_cli(data, pipelines["tiny-flux"], tmp_path / "run", cache, "--method", method, "--max-train-steps", 2,
                    "--lora-rank", 4, "--sampler", "balanced" if method == "t2h" else "uniform")
    assert (run / LORA_FILE).is_file()


def one_line_error(capsys, argv) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pogdiff: error: ") and len(err.strip().splitlines()) == 1, err
    return err


def edit_config(folder, component, **changes):
    path = folder / component / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("case, expected", [
    ("inpainting", "its input has 9 channels and the VAE's latents 4"),
    ("other pipeline", "a StableDiffusionImg2ImgPipeline is not supported"),
    ("sdxl without time ids", "not SDXL's text_time conditioning"),
    ("missing part", "without text_encoder_2"),
])
def test_what_cannot_be_trained_is_refused_before_any_work(case, expected, pipelines, data, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(pipelines["tiny-sdxl"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    if case == "inpainting":
        edit_config(folder, "unet", in_channels=9)
    elif case == "other pipeline":
        index["_class_name"] = "StableDiffusionImg2ImgPipeline"
    elif case == "sdxl without time ids":
        edit_config(folder, "unet", addition_embed_type=None)
    else:
        del index["text_encoder_2"]
    (folder / "model_index.json").write_text(json.dumps(index))
    cache = tmp_path / "cache"
    err = one_line_error(capsys, ["train", data, "--pretrained", folder, "--output-dir", tmp_path / "run",
                                  "--cache-dir", cache, "--no-progress"])
    assert expected in err and not (tmp_path / "run").exists() and not cache.exists()


@pytest.mark.parametrize("options, expected", [
    (["--snr-gamma", 5.0], "drop --snr-gamma"),
    (["--prediction-type", "v_prediction"], "always predicts the velocity"),
])
def test_options_a_flow_backbone_cannot_take_are_refused(options, expected, pipelines, data, tmp_path, capsys):
    err = one_line_error(capsys, ["train", data, "--pretrained", pipelines["tiny-sd3"], "--output-dir",
                                  tmp_path / "run", "--cache-dir", tmp_path / "cache", "--no-progress", *options])
    assert expected in err and not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_a_weighting_scheme_on_a_ddpm_backbone_is_refused(pipelines, data, tmp_path, capsys):
    err = one_line_error(capsys, ["train", data, "--pretrained", pipelines["tiny-sdxl"], "--output-dir",
                                  tmp_path / "run", "--weighting-scheme", "logit_normal", "--no-progress",
                                  "--cache-dir", tmp_path / "cache"])
    assert "applies to flow-matching backbones" in err and not (tmp_path / "cache").exists()


def fake_hub_cache(root, repo_id, folder):
    """An offline Hugging Face cache holding ``folder`` as the snapshot of ``repo_id``."""
    snapshot = root / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    return root


def test_hub_ids_are_checked_like_folders(pipelines, data, tmp_path, capsys, monkeypatch):
    """An inpainting model given as a hub id is refused from its config files, before any encoding."""
    model = tmp_path / "inpainting"
    shutil.copytree(pipelines["tiny-sdxl"], model)
    edit_config(model, "unet", in_channels=9)
    hub = fake_hub_cache(tmp_path / "hub", "someone/sdxl-inpainting", model)
    fake_hub_cache(hub, "someone/sdxl", pipelines["tiny-sdxl"])
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    err = one_line_error(capsys, ["train", data, "--pretrained", "someone/sdxl-inpainting", "--output-dir",
                                  tmp_path / "run", "--cache-dir", tmp_path / "cache", "--no-progress"])
    assert "its input has 9 channels" in err and not (tmp_path / "cache").exists()
    run = train_cli(data, "someone/sdxl", tmp_path / "run", tmp_path / "cache", "--lora-rank", 4,
                    "--max-train-steps", 1)
    assert json.loads((run / "pogdiff_run.json").read_text())["backbone"] == "stable-diffusion-xl"


@pytest.mark.parametrize("shape", FAMILIES)
def test_a_dry_run_announces_the_cache_encoding_writes(shape, pipelines, data, tmp_path, capsys):
    """Each family's caches from its config files alone: latents, and per caption the states + pooled row."""
    import re

    cache = tmp_path / "cache"
    common = ["encode", data, "--pretrained", pipelines[shape], "--method", "pogdiff", "--resolution", 32,
              "--cache-dir", cache, "--no-progress"]
    assert main([str(a) for a in [*common, "--dry-run"]]) == 0 and not cache.exists()
    plan = capsys.readouterr().out
    assert main([str(a) for a in common]) == 0
    for table, folder in (("latents", "latents-*"), ("caption states", "text-[0-9a-f]*"),
                          ("image features", "image-features-*")):
        value, unit = re.search(rf"{table} ([\d.]+) (B|KB|MB|GB)", plan).groups()
        announced = float(value) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit]
        written = sum(f.stat().st_size for f in cache.glob(folder) for f in ([f] if f.is_file() else f.rglob("*")))
        assert abs(announced - written) <= 0.05 * written + 1024, (table, announced, written)


def test_other_weights_at_the_base_path_are_refused_on_resume_and_sample(pipelines, data, tmp_path, capsys):
    """A LoRA run names its base by path; other weights moved to that path are another model (#37 item 4)."""
    base = tmp_path / "base"
    shutil.copytree(pipelines["tiny-sd3"], base)
    options = ["--lora-rank", 4, "--max-train-steps", 2, "--checkpointing-steps", 1, "--method", "vanilla"]
    run = train_cli(data, base, tmp_path / "run", tmp_path / "cache", *options)
    assert len(generate(load_backbone(run), [PROMPT], num_inference_steps=1, progress=False)) == 1
    shutil.rmtree(base)
    write_random_pipeline(base, "tiny-sd3", seed=1)  # same shapes, other weights
    shutil.rmtree(run / "checkpoint-2")
    (run / "pogdiff_run.json").unlink()
    err = one_line_error(capsys, ["train", data, "--pretrained", base, "--output-dir", run, "--train-batch-size", 4,
                                  "--resolution", 32, "--cache-dir", tmp_path / "cache", "--learning-rate", 1e-3,
                                  "--no-progress", "--resume-from-checkpoint", "latest", *options])
    assert "the run was started on other weights" in err
    (tmp_path / "run2").mkdir()
    finished = train_cli(data, pipelines["tiny-sd3"], tmp_path / "run2", tmp_path / "cache", "--lora-rank", 4,
                         "--max-train-steps", 1)
    info = json.loads((finished / "pogdiff_run.json").read_text())
    (finished / "pogdiff_run.json").write_text(json.dumps({**info, "pretrained": str(base)}))
    err = one_line_error(capsys, ["sample", finished, "--prompt", PROMPT, "--out", tmp_path / "samples",
                                  "--no-progress"])
    assert "not the weights the LoRA run" in err and not (tmp_path / "samples").exists()


def test_a_flux_resolution_that_does_not_pack_is_refused(pipelines):
    """Flux packs 2x2 latent patches: with its tiny VAE's factor 2, 34 px is an odd 17-wide latent (FLUX.1's factor
    8 makes it multiples of 16, finer than --resolution's multiples of 8)."""
    from pogdiff.backbones.backbone import pretrained_backbone
    from pogdiff.errors import PogdiffError

    with pytest.raises(PogdiffError, match="--resolution 34: a FluxPipeline takes multiples of 4"):
        pretrained_backbone(pipelines["tiny-flux"], resolution=34)

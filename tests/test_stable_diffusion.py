"""Stable Diffusion backbones on a tiny random checkpoint built here (nothing from a hub).

`pogdiff train --pretrained` fine-tunes it fully or with LoRA; diffusers' own
StableDiffusionPipeline loads the results; pogdiff samples exactly as that pipeline does;
a resumed run ends with the same weights as an uninterrupted one.
"""

import json
import shutil

import pytest
import torch
from conftest import write_toy_dataset
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from pogdiff.backbones.backbone import load_backbone
from pogdiff.backbones.stable_diffusion import StableDiffusionBackbone
from pogdiff.cli import main
from pogdiff.data.dataset import load_dataset
from pogdiff.training.ownership import MARK_FILE
from pogdiff.backbones.random_pipeline import write_random_pipeline
from pogdiff.backbones.sampling import generate
from pogdiff.data.image_files import ImageFiles
from pogdiff.encode.encoded_dataset import training_latents

PROMPT = "An image of Chen."


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A random Stable Diffusion pipeline folder: 32x32 images, 4x16x16 latents, 32-d CLIP."""
    return write_random_pipeline(tmp_path_factory.mktemp("tiny-sd") / "sd", "tiny")


@pytest.fixture(scope="session")
def sd_data(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("sd-data") / "data")


@pytest.fixture(scope="session")
def sd_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("sd-cache")


def train_cli(data, pretrained, out, cache, *options):
    argv = ["train", data, "--pretrained", pretrained, "--output-dir", out, "--train-batch-size", 4,
            "--cache-dir", cache, "--no-progress", *options]
    assert main([str(a) for a in argv]) == 0
    return out


def diffusers_images(pipeline, prompt=PROMPT, steps=2):
    """StableDiffusionPipeline's own sampler: DDIM, guidance 7.5, seeded CPU noise; images in [-1, 1]."""
    from diffusers import DDIMScheduler

    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    out = pipeline(prompt, num_inference_steps=steps, guidance_scale=7.5, output_type="pt",
                   generator=torch.Generator().manual_seed(0)).images
    return out * 2 - 1


def pogdiff_images(run, prompt=PROMPT, steps=2):
    return generate(load_backbone(run), [prompt], num_inference_steps=steps, seed=0, progress=False)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("method", ["vanilla", "pogdiff"])
def test_train_saves_what_diffusers_loads(method, lora, tiny_sd, sd_data, sd_cache, tmp_path):
    options = ["--method", method, "--max-train-steps", 2, "--learning-rate", 1e-3]
    run = train_cli(sd_data, tiny_sd, tmp_path / "run", sd_cache, *options, *(["--lora-rank", 4] if lora else []))
    info = json.loads((run / "pogdiff_run.json").read_text())
    assert info["backbone"] == "stable-diffusion" and info["config"]["method"] == method
    assert info["config"]["resolution"] == 32  # the checkpoint's own: 16 latents x VAE factor 2

    base = StableDiffusionPipeline.from_pretrained(tiny_sd)
    if lora:
        assert (run / "pytorch_lora_weights.safetensors").is_file() and not (run / "unet").exists()
        tuned = StableDiffusionPipeline.from_pretrained(tiny_sd)
        tuned.load_lora_weights(run)
    else:
        assert (run / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        tuned = StableDiffusionPipeline.from_pretrained(run)
        for part in ("vae", "text_encoder"):  # frozen parts saved untouched
            assert all(torch.equal(a, b) for a, b in zip(getattr(tuned, part).state_dict().values(),
                                                          getattr(base, part).state_dict().values()))
    expected = diffusers_images(tuned)
    assert expected.shape == (1, 3, 32, 32) and torch.isfinite(expected).all()
    assert not torch.allclose(expected, diffusers_images(base), atol=1e-4)  # training changed the model
    # `pogdiff sample` / `evaluate` draw the same images as diffusers' pipeline for this run.
    torch.testing.assert_close(pogdiff_images(run), expected, atol=2e-5, rtol=0)


def test_plain_diffusers_folder_samples_and_evaluates(tiny_sd, sd_data, sd_cache, tmp_path, capsys):
    expected = diffusers_images(StableDiffusionPipeline.from_pretrained(tiny_sd))
    torch.testing.assert_close(pogdiff_images(tiny_sd), expected, atol=2e-5, rtol=0)
    code = main([str(a) for a in ["sample", tiny_sd, "--prompt", PROMPT, "--num-images", 2, "--num-inference-steps", 2,
                                  "--out", tmp_path / "samples", "--no-progress"]])
    assert code == 0 and len(list((tmp_path / "samples").glob("*.png"))) == 2
    code = main([str(a) for a in ["evaluate", tiny_sd, "--data", sd_data, "--out", tmp_path / "eval", "--num-images", 1,
                                  "--num-inference-steps", 2, "--cache-dir", sd_cache, "--no-progress"]])
    assert code == 0, capsys.readouterr().err
    assert list(json.loads((tmp_path / "eval" / "metrics.json").read_text())["methods"]) == ["sd"]


@pytest.mark.parametrize("options", [["--use-ema", "--random-flip", "--gradient-accumulation-steps", 2,
                                      "--validation-prompts", PROMPT, "--validation-steps", 2,
                                      "--num-validation-images", 1, "--report-to", "tensorboard"],
                                     ["--lora-rank", 4, "--lr-scheduler", "cosine", "--snr-gamma", 5.0]],
                         ids=["full-ema-flip-accumulate-validate", "lora-cosine-snr"])
def test_resumed_run_ends_with_the_same_weights(options, tiny_sd, sd_data, tmp_path):
    """Train 4 steps with a checkpoint at 2; resume a copy from that checkpoint; same final weights.

    The first run fills an empty cache and the resumed one reads it, as after a crash.
    """
    cache = tmp_path / "cache"
    whole = train_cli(sd_data, tiny_sd, tmp_path / "whole", cache, "--max-train-steps", 4,
                      "--checkpointing-steps", 2, "--learning-rate", 1e-3, *options)
    assert sorted(p.name for p in whole.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]  # and the final
    resumed = tmp_path / "resumed"  # the run as it stood when stopped after the checkpoint
    resumed.mkdir()
    shutil.copy(whole / MARK_FILE, resumed / MARK_FILE)  # pogdiff's own run folder
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    train_cli(sd_data, tiny_sd, resumed, cache, "--max-train-steps", 4, "--checkpointing-steps", 2,
              "--learning-rate", 1e-3, "--resume-from-checkpoint", "latest", *options)

    lora = "--lora-rank" in options
    weights = "pytorch_lora_weights.safetensors" if lora else "unet/diffusion_pytorch_model.safetensors"
    expected, got = load_file(whole / weights), load_file(resumed / weights)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    if lora:
        assert (whole / "checkpoint-2" / "trained_weights.safetensors").stat().st_size < 200_000  # adapters only
    else:
        base = load_file(tiny_sd / "unet" / "diffusion_pytorch_model.safetensors")
        assert not all(torch.equal(base[k], got[k]) for k in got)
        assert sorted(p.name for p in (whole / "validation").iterdir()) == ["step-000002.png", "step-000004.png"]
        assert list((whole / "logs").rglob("events.out.tfevents.*"))


def test_same_seed_same_weights_with_a_cold_or_warm_cache(tiny_sd, sd_data, tmp_path):
    """Building the caches (encoders, VAE) must not shift the random draws of training."""
    runs = [train_cli(sd_data, tiny_sd, tmp_path / name, tmp_path / "cache", "--max-train-steps", 1,
                      "--learning-rate", 1e-3) for name in ("cold", "warm")]
    first, second = (load_file(run / "unet" / "diffusion_pytorch_model.safetensors") for run in runs)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_random_flip_caches_the_latents_of_the_mirror_image(tiny_sd, sd_data, tmp_path):
    backbone = StableDiffusionBackbone.from_pretrained(tiny_sd)
    dataset = load_dataset(sd_data)
    images = ImageFiles(dataset, 32, cache_dir=tmp_path)
    plain, mirror = (table[:] for table in training_latents(backbone, images, random_flip=True, cache_dir=tmp_path))
    assert plain.shape == mirror.shape == (len(dataset), 8, 16, 16)  # N x (mean, log-variance) x h x w
    assert plain.dtype == torch.float16  # stored in half precision (test_fp16_latents_round_off_...)
    pixels = next(images.batches(range(len(dataset)), len(dataset)))
    torch.testing.assert_close(mirror, backbone.cache_images(pixels.flip(-1)).half())
    assert not torch.allclose(mirror.float(), plain.float().flip(-1), atol=1e-3)  # flipping latents would be wrong
    again = training_latents(backbone, images, random_flip=True, cache_dir=tmp_path)
    assert torch.equal(again[1][:], mirror) and len(list(tmp_path.glob("latents-*"))) == 2  # plain, mirror


def test_unsupported_pipeline_folder_gives_one_line_error(tiny_sd, sd_data, tmp_path, capsys):
    sdxl = tmp_path / "sdxl"
    shutil.copytree(tiny_sd, sdxl)
    index = json.loads((sdxl / "model_index.json").read_text())
    (sdxl / "model_index.json").write_text(json.dumps({**index, "text_encoder_2": index["text_encoder"]}))
    for argv in (["train", sd_data, "--pretrained", sdxl, "--output-dir", tmp_path / "run"],
                 ["sample", sdxl, "--prompt", PROMPT, "--out", tmp_path / "s"],
                 ["train", sd_data, "--lora-rank", 4, "--output-dir", tmp_path / "run2"]):
        assert main([str(a) for a in argv + ["--no-progress"]]) == 2
        err = capsys.readouterr().err
        assert err.startswith("pogdiff: error: ") and len(err.strip().splitlines()) == 1, err

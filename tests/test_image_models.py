"""Hugging Face image models by type (pogdiff.encode.encoders.HuggingFaceImageFeatures): tiny random checkpoints, offline."""

import json

import pytest
import torch

from pogdiff.cli import main
from pogdiff.encode.encoders import HF_IMAGE_MODEL_TYPES
from pogdiff.errors import PogdiffError
from pogdiff.evaluation.features import load_feature_extractor
from pogdiff.images import to_uint8
from pogdiff.encode.neighbour_features import neighbour_feature_space

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
TINY_TEXT = dict(TINY, vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)

NAME_PREFIX_AND_DIM = {"clip": ("hf-clip", 16), "clip-vision": ("hf-clip", 16), "siglip": ("hf-siglip", 32),
                       "vit": ("hf-vit-cls", 32), "dinov2": ("hf", 32)}  # CLIP: projection_dim
REFUSALS = {
    "resnet": "a 'resnet' model is not a supported image model",
    "dinov2-without-layernorm": "lacks weights its Dinov2Model needs (layernorm.weight), which would be random",
    "clip-vision-without-projection": "lacks weights its CLIPVisionModelWithProjection needs "
                                      "(visual_projection.weight)",
}


def save(folder, model, processor, **options):
    model.save_pretrained(folder, **options)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Folders of tiny random checkpoints, as ``save_pretrained`` writes them, by name."""
    from transformers import (BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig,
                              CLIPVisionModel, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model,
                              ResNetConfig, SiglipConfig, SiglipImageProcessor, SiglipModel, ViTConfig,
                              ViTImageProcessor, ViTModel)

    root = tmp_path_factory.mktemp("image-models")
    torch.manual_seed(0)
    vision = dict(TINY, image_size=32, patch_size=16)
    clip_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    dinov2 = Dinov2Model(Dinov2Config(**TINY, image_size=28, patch_size=14))
    dinov2_processor = BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    resnet = root / "resnet"
    ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1]).save_pretrained(resnet)
    return {
        "clip": save(root / "clip", CLIPModel(CLIPConfig(text_config=TINY_TEXT, vision_config=vision,
                                                         projection_dim=16)), clip_processor),
        "clip-vision": save(root / "clip-vision", CLIPVisionModelWithProjection(
            CLIPVisionConfig(**vision, projection_dim=16)), clip_processor),
        "siglip": save(root / "siglip", SiglipModel(SiglipConfig(text_config=TINY_TEXT, vision_config=vision)),
                       SiglipImageProcessor(size={"height": 32, "width": 32})),
        # DINO v1 checkpoints (facebook/dino-vitb16) are ViTModels saved without a pooler
        "vit": save(root / "vit", ViTModel(ViTConfig(**vision), add_pooling_layer=False),
                    ViTImageProcessor(size={"height": 32, "width": 32})),
        "dinov2": save(root / "dinov2", dinov2, dinov2_processor),
        # refused: another model type, and checkpoints that lack weights the model needs
        "resnet": str(resnet),
        "dinov2-without-layernorm": save(root / "dinov2-without-layernorm", dinov2, dinov2_processor,
                                         state_dict={k: v for k, v in dinov2.state_dict().items()
                                                     if k != "layernorm.weight"}),
        "clip-vision-without-projection": save(root / "clip-vision-without-projection",
                                               CLIPVisionModel(CLIPVisionConfig(**vision)), clip_processor),
    }


@pytest.mark.parametrize("kind", NAME_PREFIX_AND_DIM)
def test_each_type_gives_the_same_features_on_every_load(models, kind):
    prefix, dim = NAME_PREFIX_AND_DIM[kind]
    images = torch.rand(3, 3, 24, 24) * 2 - 1
    first, second = load_feature_extractor(models[kind]), load_feature_extractor(models[kind])
    features = first(images, batch_size=2)
    assert first.name == f"{prefix}:{models[kind]}"  # DINOv2 keeps the name (and caches) it had before types
    assert features.shape == (3, dim) and features.dtype == torch.float32 and features.device.type == "cpu"
    assert torch.equal(second(images, batch_size=2), features)  # no randomly initialised layer (ViT's pooler was one)


def test_clip_gives_the_projected_image_embedding(models):
    from transformers import CLIPModel

    extractor = load_feature_extractor(models["clip"])
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    pixels = extractor.processor(images=list(to_uint8(images).permute(0, 2, 3, 1).numpy()),
                                 return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        clip = CLIPModel.from_pretrained(models["clip"]).eval()
        expected = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
    assert torch.allclose(extractor(images), expected, atol=1e-5)


def test_the_neighbour_space_names_the_type_and_the_weights(models):
    assert neighbour_feature_space(models["clip"]).name.startswith(f"hf-clip:{models['clip']}@")
    assert neighbour_feature_space(models["dinov2"]).name.startswith(f"hf:{models['dinov2']}@")


@pytest.mark.parametrize("kind", REFUSALS)
def test_unsupported_or_incomplete_models_are_refused_in_one_line(models, kind, toy_data, tmp_path, capsys):
    run = tmp_path / "fake-run"  # read, never loaded: the feature space is refused before sampling
    run.mkdir()
    (run / "pogdiff_run.json").write_text(json.dumps({"backbone": "pixel", "config": {"method": "vanilla"}}))
    out = tmp_path / "eval"
    code = main(["evaluate", str(run), "--data", str(toy_data), "--out", str(out), "--features", models[kind],
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("pogdiff: error: "), err
    assert models[kind] in err and REFUSALS[kind] in err, err
    assert f"supported model types: {', '.join(HF_IMAGE_MODEL_TYPES)}" in err, err
    assert not out.exists()
    with pytest.raises(PogdiffError, match="--neighbour-features .*: not a built-in space"):
        neighbour_feature_space(models[kind])


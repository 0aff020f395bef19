"""Does the pretrained small backbone follow captions and draw people? Trait agreement and fd, per run.

    python benchmarks/pretrained_backbone.py                       # the shipped backbone
    python benchmarks/pretrained_backbone.py --runs pogdiff-small-people scratch-300 --samples 32

For prompts that name one trait ("An image of a person with ginger hair.", "... in front
of a teal background.", "... wearing round glasses."), a classifier trained on fresh
renders of the synthetic generator says which value each sample shows; the agreement
with the prompt is reported per trait (mean over the trait's values). fd compares all
samples with as many fresh renders of random people, in EfficientNet-Lite0 features.
The classifier's own accuracy on unseen renders is printed first: agreement cannot be
read above it. Prints a table and writes OUT/pretrained_backbone.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pogdiff.backbones.backbone import load_backbone
from pogdiff.data.synth import BACKGROUNDS, GLASSES, HAIR_COLOURS, draw_portrait, random_look, random_traits
from pogdiff.evaluation.features import load_feature_extractor
from pogdiff.evaluation.identity import _SmallCNN
from pogdiff.evaluation.metrics import frechet_distance
from pogdiff.backbones.shipped import SHIPPED_NAME
from pogdiff.backbones.sampling import generate

TRAITS = {  # trait -> (values, prompt); values index the classifier's head for the trait
    "hair_colour": (tuple(HAIR_COLOURS), "An image of a person with {} hair."),
    "background": (tuple(BACKGROUNDS), "An image of a person in front of a {} background."),
    "glasses": (GLASSES, "An image of a person {}."),
}
GLASSES_PHRASES = {"none": "with no glasses", "round": "wearing round glasses", "square": "wearing square glasses"}


def trait_of(traits: dict, look) -> dict[str, str]:
    return {"hair_colour": traits["hair_colour"], "background": look.background, "glasses": traits["glasses"]}


def renders(count: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``count`` renders of random people in [-1, 1] and the index of each trait's value."""
    rng = np.random.default_rng([seed, 7])
    images, labels = [], {trait: [] for trait in TRAITS}
    for _ in range(count):
        traits, look = random_traits(rng), random_look(rng)
        images.append(np.asarray(draw_portrait(traits, look, 32)))
        for trait, value in trait_of(traits, look).items():
            labels[trait].append(TRAITS[trait][0].index(value))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, {trait: torch.tensor(v) for trait, v in labels.items()}


def train_trait_classifier(steps: int = 800, count: int = 8000, seed: int = 0) -> tuple[_SmallCNN, dict]:
    """One CNN, one head per trait (logits side by side), trained on noisy renders; scored on unseen ones."""
    sizes = [len(values) for values, _ in TRAITS.values()]
    x, y = renders(count, seed)
    torch.manual_seed(seed)
    model = _SmallCNN(sum(sizes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    for _ in tqdm(range(steps), desc="trait classifier"):
        rows = torch.randint(len(x), (128,))
        noisy = x[rows] + 0.4 * torch.rand(128, 1, 1, 1) * torch.randn_like(x[rows])
        logits = model(noisy).split(sizes, dim=1)
        loss = sum(F.cross_entropy(lg, y[trait][rows]) for lg, trait in zip(logits, TRAITS))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    x, y = renders(1000, seed + 1)
    predicted = predict(model, x)
    return model, {trait: (predicted[trait] == y[trait]).float().mean().item() for trait in TRAITS}


@torch.no_grad()
def predict(model: _SmallCNN, images: torch.Tensor) -> dict[str, torch.Tensor]:
    sizes = [len(values) for values, _ in TRAITS.values()]
    logits = torch.cat([model(chunk.float()) for chunk in images.split(256)]).split(sizes, dim=1)
    return {trait: lg.argmax(1) for trait, lg in zip(TRAITS, logits)}


def score_run(run: str, classifier: _SmallCNN, extractor, real_features: torch.Tensor, samples: int,
              steps: int) -> dict:
    backbone = load_backbone(run, "cpu")
    result, everything = {}, []
    for trait, (values, template) in TRAITS.items():
        prompts = [template.format(GLASSES_PHRASES[v] if trait == "glasses" else v) for v in values]
        images = generate(backbone, prompts, samples, steps, progress=False)
        everything.append(images)
        predicted = predict(classifier, images)[trait].view(len(values), samples)
        agreement = {v: (predicted[i] == i).float().mean().item() for i, v in enumerate(values)}
        result[trait] = {"agreement": float(np.mean(list(agreement.values()))), "per_value": agreement}
    generated = torch.cat(everything)
    result["fd"] = frechet_distance(extractor(generated), real_features[:len(generated)])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=[SHIPPED_NAME], help=f"run folders (default: {SHIPPED_NAME})")
    parser.add_argument("--samples", type=int, default=16, help="samples per prompt (default: 16)")
    parser.add_argument("--num-inference-steps", type=int, default=50)
    parser.add_argument("--out", default="benchmark-out", help="folder for pretrained_backbone.json")
    args = parser.parse_args()

    start = time.time()
    classifier, accuracy = train_trait_classifier()
    print("trait classifier, accuracy on unseen renders: " + ", ".join(f"{t} {a:.3f}" for t, a in accuracy.items()))
    extractor = load_feature_extractor()
    real, _ = renders(args.samples * sum(len(v) for v, _ in TRAITS.values()), seed=99)
    real_features = extractor(real)
    results = {run: score_run(run, classifier, extractor, real_features, args.samples, args.num_inference_steps)
               for run in args.runs}
    print(f"\n| run | {' | '.join(f'{t} agreement' for t in TRAITS)} | fd vs fresh renders ({extractor.name}) |")
    print("|---|" + "---|" * (len(TRAITS) + 1))
    for run, result in results.items():
        print(f"| {run} | " + " | ".join(f"{result[t]['agreement']:.3f}" for t in TRAITS) + f" | {result['fd']:.1f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretrained_backbone.json").write_text(json.dumps(
        {"classifier_accuracy": accuracy, "samples_per_prompt": args.samples, "features": extractor.name,
         "num_inference_steps": args.num_inference_steps, "runs": results}, indent=2))
    print(f"\n{time.time() - start:.0f} s; written to {out / 'pretrained_backbone.json'}")


if __name__ == "__main__":
    main()

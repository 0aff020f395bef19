"""Identity accuracy: an objective, offline stand-in for the paper's human and GPT-4o judges.

Is a generated image of "An image of {name}." the person {name}? A judge assigns every
image to one of the dataset's identities; accuracy is the fraction assigned to the
intended one. Judges:

- :class:`SynthIdentityJudge`: for the embedded synthetic people, a small CNN trained on
  many fresh renders of every identity (the ground truth is known), cached on disk
  (:mod:`pogdiff.encode.cache`).
- :class:`CentroidJudge`: any dataset: the nearest identity centroid of real images in a
  frozen feature space.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pogdiff.encode.cache import cached
from pogdiff.encode.encoders import process_device
from pogdiff.errors import PogdiffWarning
from pogdiff.images import from_uint8

JUDGE_VERSION = 3  # bump when the judge is trained differently


class _SmallCNN(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))
        self.features = nn.Sequential(block(3, 16), block(16, 32), block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


class SynthIdentityJudge:
    """Ground-truth identity classifier for a dataset written by ``pogdiff data synth``.

    Trained for ``STEPS_PER_IDENTITY`` steps per identity, and never fewer than ``MIN_STEPS`` (a
    fixed number of epochs left a 2-identity set with 24 steps and a judge that called every
    image the majority person; a fixed 300 steps left the large preset's 220 people with a
    judge that recognised 69% of held-out renders, and none of one person's), with Gaussian
    noise of random strength added to the renders so that a sample's leftover sampling noise
    does not decide its identity. It is then scored on
    renders it has not seen; ``name`` carries that score and a weak judge is warned about. It is trained and
    predicts on this process's device (the GPU when there is one; every random draw is made on the CPU, so a
    device changes only the arithmetic's rounding).
    """

    MIN_ACCURACY = 0.9  # below this on clean held-out renders, identity accuracy says little
    MIN_STEPS, STEPS_PER_IDENTITY = 300, 30

    def __init__(self, model: _SmallCNN, names: list[str], size: int, heldout_accuracy: dict[str, float],
                 device: str | torch.device | None = None):
        self.model = model.eval().to(process_device() if device is None else device)
        self.names = names
        self.size = size
        self.heldout_accuracy = heldout_accuracy
        worst = min(heldout_accuracy, key=heldout_accuracy.get)
        self.name = ("synthetic ground-truth classifier (CNN on fresh renders; accuracy on held-out renders "
                     f"{np.mean(list(heldout_accuracy.values())):.2f}, lowest {heldout_accuracy[worst]:.2f} for {worst})")
        if heldout_accuracy[worst] < self.MIN_ACCURACY:
            warnings.warn(f"the identity judge recognises only {heldout_accuracy[worst]:.0%} of held-out renders of "
                          f"{worst}: id_acc is unreliable for this dataset", PogdiffWarning, stacklevel=2)

    @classmethod
    def for_dataset(cls, synth_json: str | Path, cache_dir: str | Path | None, renders_per_identity: int = 200,
                    steps: int | None = None, batch_size: int = 128, max_noise: float = 0.4, heldout_per_identity: int = 50,
                    seed: int = 0, progress: bool = True) -> "SynthIdentityJudge":
        """Load the cached classifier for this synth.json, or train, score and cache one."""
        from pogdiff.data.synth import load_identities

        synth_json = Path(synth_json)
        identities = load_identities(synth_json)
        names = [identity.name for identity in identities]
        size = json.loads(synth_json.read_text())["size"]
        steps = steps or max(cls.MIN_STEPS, cls.STEPS_PER_IDENTITY * len(names))
        params = {"synth": hashlib.sha256(synth_json.read_bytes()).hexdigest(), "judge_version": JUDGE_VERSION,
                  "renders_per_identity": renders_per_identity, "steps": steps, "batch_size": batch_size,
                  "max_noise": max_noise, "heldout_per_identity": heldout_per_identity, "seed": seed}

        trained_now: list[_SmallCNN] = []  # on a cache miss: the network just trained, not built again

        def train_and_score() -> dict[str, torch.Tensor]:
            model, accuracy = _train_judge(identities, size, renders_per_identity, steps, batch_size, max_noise,
                                           heldout_per_identity, seed, progress)
            trained_now.append(model)
            return {**{name: value.cpu() for name, value in model.state_dict().items()}, HELDOUT_ACCURACY: accuracy}

        state = cached(cache_dir, "identity-judge", params, train_and_score)
        accuracy = state.pop(HELDOUT_ACCURACY)
        if trained_now:
            model = trained_now[0]
        else:
            model = _SmallCNN(len(names))
            model.load_state_dict(state)
        return cls(model, names, size, dict(zip(names, accuracy.tolist())))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[str]:
        """Identity name for each image (N, 3, H, W) in [-1, 1]."""
        if images.shape[-1] != self.size:
            images = F.interpolate(images.float(), size=self.size, mode="bilinear", antialias=True, align_corners=False)
        device = next(self.model.parameters()).device
        logits = torch.cat([self.model(chunk.to(device, torch.float32)).cpu() for chunk in images.split(256)])
        return [self.names[i] for i in logits.argmax(1).tolist()]


HELDOUT_ACCURACY = "heldout_accuracy"  # its key in the cache file, beside the CNN's weights


def _train_judge(identities, size: int, renders_per_identity: int, steps: int, batch_size: int, max_noise: float,
                 heldout_per_identity: int, seed: int, progress: bool) -> tuple[_SmallCNN, torch.Tensor]:
    """The CNN trained on noisy fresh renders, and its accuracy per identity on renders it has not seen."""
    x, y = _renders(identities, renders_per_identity, seed, size, progress)
    device = process_device()
    with torch.random.fork_rng(devices=[]):  # the CPU's generator only: torch.manual_seed would reseed the GPUs' too
        torch.random.default_generator.manual_seed(seed)
        model = _SmallCNN(len(identities)).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
        model.train()
        for _ in tqdm(range(steps), desc="training identity judge", disable=not progress):
            rows = torch.randint(len(x), (batch_size,))
            noisy = x[rows] + max_noise * torch.rand(batch_size, 1, 1, 1) * torch.randn_like(x[rows])
            loss = F.cross_entropy(model(noisy.to(device)), y[rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    x, y = _renders(identities, heldout_per_identity, seed + 1, size, progress=False)
    with torch.no_grad():
        predicted = torch.cat([model.eval()(chunk.to(device)).cpu() for chunk in x.split(256)]).argmax(1)
    accuracy = torch.stack([(predicted[y == i] == i).float().mean() for i in range(len(identities))])
    return model, accuracy


def _renders(identities, per_identity: int, seed: int, size: int, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_identity`` fresh renders of every identity in [-1, 1], and their identity indices."""
    from pogdiff.data.synth import render

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, identity in enumerate(tqdm(identities, desc="rendering judge data", disable=not progress)):
        for _ in range(per_identity):
            images.append(np.asarray(render(identity, rng, size)[0]))
            labels.append(label)
    return from_uint8(np.stack(images)), torch.tensor(labels)


class CentroidJudge:
    """Nearest identity centroid (cosine) of real images' features in a frozen feature space.

    Built from the real images' features (``real_features``: identity -> (n, D), in ``extractor``'s space).
    """

    def __init__(self, extractor, real_features: dict[str, torch.Tensor]):
        self.extractor = extractor
        self.name = f"nearest identity centroid in {extractor.name} features"
        self.names = list(real_features)
        self.centroids = F.normalize(torch.stack([F.normalize(real_features[n].float(), dim=1).mean(0)
                                                  for n in self.names]), dim=1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[str]:
        return self.predict_features(self.extractor(images))

    def predict_features(self, features: torch.Tensor) -> list[str]:
        """Identity name for each image, from its features in the extractor's space."""
        features = F.normalize(features.float(), dim=1)
        return [self.names[i] for i in (features @ self.centroids.T).argmax(1).tolist()]

"""Identity accuracy: an objective, offline stand-in for the paper's human and GPT-4o judges.

Is a generated image of "An image of {name}." the person {name}? A judge assigns every
image to one of the dataset's identities; accuracy is the fraction assigned to the
intended one. Judges:

- :class:`SynthIdentityJudge`: for the embedded synthetic people, a small CNN trained on
  many fresh renders of every identity (the ground truth is known), cached on disk.
- :class:`CentroidJudge`: any dataset: the nearest identity centroid of real images in a
  frozen feature space.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm


class _SmallCNN(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))
        self.features = nn.Sequential(block(3, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


class SynthIdentityJudge:
    """Ground-truth identity classifier for a dataset written by ``pogdiff data synth``."""

    name = "synthetic ground-truth classifier (CNN on fresh renders)"

    def __init__(self, model: _SmallCNN, names: list[str], size: int):
        self.model = model.eval()
        self.names = names
        self.size = size

    @classmethod
    def for_dataset(cls, synth_json: str | Path, cache_dir: str | Path, renders_per_identity: int = 200,
                    epochs: int = 6, seed: int = 0, progress: bool = True) -> "SynthIdentityJudge":
        """Load the cached classifier for this synth.json, or train and cache one."""
        from pogdiff.data.synth import load_identities, render

        synth_json = Path(synth_json)
        identities = load_identities(synth_json)
        names = [identity.name for identity in identities]
        key = hashlib.sha256(synth_json.read_bytes() + f"{renders_per_identity}-{epochs}-{seed}-v1".encode()).hexdigest()[:20]
        path = Path(cache_dir) / f"identity-judge-{key}.safetensors"
        size = json.loads(synth_json.read_text())["size"]
        model = _SmallCNN(len(names))
        if path.is_file():
            model.load_state_dict(load_file(path))
            return cls(model, names, size)
        rng = np.random.default_rng(seed)
        images, labels = [], []
        for label, identity in enumerate(tqdm(identities, desc="rendering judge data", disable=not progress)):
            for _ in range(renders_per_identity):
                images.append(np.asarray(render(identity, rng, size)[0]))
                labels.append(label)
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        y = torch.tensor(labels)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _SmallCNN(len(names))
            optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
            steps = epochs * (len(x) // 128 + 1)
            schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
            model.train()
            for _ in tqdm(range(epochs), desc="training identity judge", disable=not progress):
                for rows in torch.randperm(len(x)).split(128):
                    loss = F.cross_entropy(model(x[rows]), y[rows])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_file(model.state_dict(), tmp)
        os.replace(tmp, path)
        return cls(model.eval(), names, size)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[str]:
        """Identity name for each image (N, 3, H, W) in [-1, 1]."""
        if images.shape[-1] != self.size:
            images = F.interpolate(images.float(), size=self.size, mode="bilinear", antialias=True, align_corners=False)
        logits = torch.cat([self.model(chunk.float()) for chunk in images.split(256)])
        return [self.names[i] for i in logits.argmax(1).tolist()]


class CentroidJudge:
    """Nearest identity centroid (cosine) of real images' features in a frozen feature space."""

    def __init__(self, extractor, real_images: dict[str, torch.Tensor]):
        self.extractor = extractor
        self.name = f"nearest identity centroid in {extractor.name} features"
        self.names = list(real_images)
        self.centroids = F.normalize(torch.stack([F.normalize(extractor(real_images[n]), dim=1).mean(0)
                                                  for n in self.names]), dim=1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[str]:
        features = F.normalize(self.extractor(images), dim=1)
        return [self.names[i] for i in (features @ self.centroids.T).argmax(1).tolist()]

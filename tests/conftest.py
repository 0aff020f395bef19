import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_toy_dataset(root, counts=(12, 6, 2), size=32, seed=0):
    """Solid-colour-ish images, one colour per identity, captions naming it."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    palette = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (200, 200, 40)]
    names = ["Anna", "Bruno", "Chen", "Dara"]
    rows = []
    for ident, count in enumerate(counts):
        for j in range(count):
            array = np.clip(np.array(palette[ident]) + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            file = f"images/{ident}_{j}.png"
            Image.fromarray(array).save(root / file)
            rows.append({"file_name": file, "text": f"An image of {names[ident]}, pose {j % 3}.",
                         "identity": names[ident]})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def training_loss(backbone, images, tables):
    """Vanilla loss of a backbone on every training image, 8 fixed noise draws each (the global RNG is left alone)."""
    import torch

    from pogdiff.objectives.losses import TrainBatch, VanillaLoss

    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        rows = torch.arange(len(images)).repeat(8)
        batch = TrainBatch(images[rows], tables.caption_states(rows), rows, torch.zeros(len(rows), dtype=torch.bool))
        loss = VanillaLoss(backbone.forward_process(), tables)(
            lambda x, t, c: backbone.denoise(backbone.denoiser, x, t, c), batch)
    return loss.mean().item()


@pytest.fixture
def toy_data(tmp_path):
    return write_toy_dataset(tmp_path / "data")


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def small_synth(tmp_path_factory):
    """The embedded small preset and a cache shared by the tests that evaluate on it (its identity judge trains once)."""
    from pogdiff.data.synth import write_dataset

    root = tmp_path_factory.mktemp("small-synth")
    write_dataset(root / "data", preset="small", seed=0)
    return root / "data", root / "cache"


@pytest.fixture
def small_disk(tmp_path):
    """mount(size, read_only=False): a fresh tmpfs of that size; the test is skipped where mounting is not allowed."""
    mounted = []

    def mount(size: str, read_only: bool = False) -> Path:
        point = tmp_path / f"disk-{len(mounted)}"
        point.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True,
                                text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip() or 'needs root'})")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)

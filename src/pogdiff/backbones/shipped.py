"""The small backbone that ships inside the package, pretrained by ``pogdiff pretrain`` (:mod:`pogdiff.training.pretraining`).

:data:`SHIPPED_DIR` is a run folder like any other (``unet/`` in fp16, ``scheduler/``,
``pogdiff_run.json``) plus ``manifest.json``, which records how it was made and the
sha256 of its weights. ``pogdiff train`` without ``--pretrained`` or ``--from-scratch``
starts from it, and :data:`SHIPPED_NAME` names it wherever a run folder is expected
(``pogdiff sample pogdiff-small-people ...``, ``pogdiff evaluate pogdiff-small-people ...``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from pogdiff.errors import PogdiffError
from pogdiff.files import sha256

SHIPPED_NAME = "pogdiff-small-people"
SHIPPED_DIR = Path(__file__).parent.parent / "weights" / SHIPPED_NAME
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "unet/diffusion_pytorch_model.safetensors"
SHIPPED_RESOLUTION = 32
SHIPPED_FIX = "reinstall pogdiff, or train with --from-scratch (`pogdiff pretrain` makes such weights again)"


def shipped_backbone_dir(folder: Path = SHIPPED_DIR) -> Path:
    """The shipped backbone's folder, once its weights match the sha256 of its manifest."""
    manifest = folder / MANIFEST_FILE
    fix = SHIPPED_FIX
    try:
        expected = json.loads(manifest.read_text())["sha256"]
    except FileNotFoundError:
        raise PogdiffError(f"{manifest}: the shipped pretrained backbone is missing; {fix}") from None
    except (ValueError, KeyError, TypeError):
        raise PogdiffError(f"{manifest}: damaged manifest of the shipped pretrained backbone; {fix}") from None
    for file, digest in expected.items():
        path = folder / file
        if not path.is_file():
            raise PogdiffError(f"{path}: shipped pretrained weights are missing; {fix}")
        if sha256(path) != digest:
            raise PogdiffError(f"{path}: a file of the shipped pretrained backbone is damaged (sha256 differs from "
                               f"{MANIFEST_FILE}); {fix}")
    return folder


@contextlib.contextmanager
def loading_shipped(folder: str | Path) -> Iterator[None]:
    """A failure to load the shipped backbone (a file edited or missing in the installed package) is one line
    that says to reinstall pogdiff, not to train the run again; other folders' errors pass as they are."""
    try:
        yield
    except (PogdiffError, OSError, ValueError, KeyError, SafetensorError) as error:
        if Path(folder).resolve() != SHIPPED_DIR.resolve():
            raise
        reason = (str(error).split("; ")[0].strip() or type(error).__name__).splitlines()[0]
        raise PogdiffError(f"{SHIPPED_DIR}: the shipped pretrained backbone does not load ({reason}); "
                           f"{SHIPPED_FIX}") from None


def shipped_manifest() -> dict:
    """How the shipped weights were made (:mod:`pogdiff.training.pretraining`), once they match its sha256."""
    return json.loads((shipped_backbone_dir() / MANIFEST_FILE).read_text())


def resolve_run_dir(run: str | Path) -> Path:
    """A run folder as given, or the shipped backbone's for :data:`SHIPPED_NAME` (unless a folder has that name)."""
    if str(run) == SHIPPED_NAME and not Path(run).exists():
        return shipped_backbone_dir()
    return Path(run)

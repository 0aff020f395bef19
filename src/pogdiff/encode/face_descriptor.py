"""dlib's 128-d face descriptor: one vector per image that names the person in it.

Offline: the models ship in the ``face-recognition-models`` package and run in
``dlib-bin`` (extra ``pogdiff[faces]``): a face detector (HOG, ``get_frontal_face_detector``,
or the CNN ``mmod_human_face_detector``), the 5-point landmark model for alignment and
``dlib_face_recognition_resnet_model_v1`` (King, 2017; 99.38% on LFW). Images smaller
than ``min_size`` pixels are upscaled first: the detector misses faces below ~80 pixels.

Shared by training (a feature space for PoGDiff's neighbours, Eq. 8:
:mod:`pogdiff.encode.neighbour_features`) and evaluation (the faces judge,
:mod:`pogdiff.evaluation.faces`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pogdiff.errors import PogdiffError
from pogdiff.images import to_uint8

DETECTOR_FILE = "mmod_human_face_detector.dat"
LANDMARKS_FILE = "shape_predictor_5_face_landmarks.dat"
DESCRIPTOR_FILE = "dlib_face_recognition_resnet_model_v1.dat"


def face_models_dir() -> Path:
    """The ``models`` folder of ``face-recognition-models``.

    Found without importing the package: its ``__init__`` needs ``pkg_resources``, which
    recent setuptools no longer ship.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise PogdiffError("dlib face descriptors need face-recognition-models and dlib-bin: pip install 'pogdiff[faces]'")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class FaceDescriptor:
    """dlib face detection + 5-point alignment + 128-d ResNet descriptor, one per image."""

    def __init__(self, detector: str = "hog", min_size: int = 128):
        try:
            import dlib
        except ImportError:
            raise PogdiffError("dlib face descriptors need dlib: pip install 'pogdiff[faces]' (dlib-bin)") from None
        models = face_models_dir()
        if detector == "hog":
            self._detect = dlib.get_frontal_face_detector()
        elif detector == "cnn":
            cnn = dlib.cnn_face_detection_model_v1(str(models / DETECTOR_FILE))
            self._detect = lambda image, upsample: [d.rect for d in cnn(image, upsample)]
        else:
            raise PogdiffError(f"unknown face detector {detector!r}; use 'hog' or 'cnn'")
        self._landmarks = dlib.shape_predictor(str(models / LANDMARKS_FILE))
        self._describe = dlib.face_recognition_model_v1(str(models / DESCRIPTOR_FILE))
        self.detector = detector
        self.min_size = min_size

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Descriptors (N, 128) and a mask (N,) of the images where a face was found (zeros elsewhere)."""
        descriptors = torch.zeros(len(images), 128, dtype=torch.float64)
        found = torch.zeros(len(images), dtype=torch.bool)
        for i, array in enumerate(to_uint8(images).permute(0, 2, 3, 1).numpy()):
            array = self._upscaled(array)
            faces = self._detect(array, 0)
            if len(faces) == 0:
                continue
            largest = max(faces, key=lambda rect: rect.area())
            descriptor = self._describe.compute_face_descriptor(array, self._landmarks(array, largest))
            descriptors[i] = torch.tensor(np.asarray(descriptor))
            found[i] = True
        return descriptors, found

    def _upscaled(self, array: np.ndarray) -> np.ndarray:
        height, width = array.shape[:2]
        if min(height, width) >= self.min_size:
            return np.ascontiguousarray(array)
        scale = self.min_size / min(height, width)
        image = Image.fromarray(array).resize((round(width * scale), round(height * scale)), Image.BICUBIC)
        return np.asarray(image)

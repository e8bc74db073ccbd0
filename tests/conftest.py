"""Shared fixtures: real photos (scikit-image / scikit-learn / matplotlib), materialised at run time."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _real_photos() -> dict[str, np.ndarray]:
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {
        "astronaut": data.astronaut(),
        "coffee": data.coffee(),
        "chelsea": data.chelsea(),
        "rocket": data.rocket(),
    }
    for name, img in zip(("china", "flower"), load_sample_images().images, strict=True):
        photos[name] = img
    return photos


@pytest.fixture(scope="session")
def real_photos() -> dict[str, np.ndarray]:
    return _real_photos()


@pytest.fixture
def photo_dir(tmp_path: Path, real_photos: dict[str, np.ndarray]) -> Path:
    """A folder of real photos (JPEG), as a user would point `rmskit build` at."""
    d = tmp_path / "photos"
    d.mkdir()
    for name, arr in real_photos.items():
        Image.fromarray(arr).save(d / f"{name}.jpg", quality=90)
    return d

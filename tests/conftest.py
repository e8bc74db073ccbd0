"""Shared fixtures: real photos (scikit-image / scikit-learn / matplotlib), materialised at run time, and
the session's scripted build (tests/rundir_fixture.py) that the review / report tests read."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

if TYPE_CHECKING:
    from rundir_fixture import RunInfo

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Builds here finish as users' do, in a thread of the test's own process, where monkeypatched probes and
# embedders apply (and MiniLM loads once per session). A finish worker process is what
# test_finish_worker.py and the kill -9 test in test_build_e2e.py run.
os.environ.setdefault("RMSKIT_FINISH", "thread")


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


@pytest.fixture(scope="session")
def run_template(tmp_path_factory: pytest.TempPathFactory) -> RunInfo:
    """One real scripted build per test session (rundir_fixture.build_run): read it, or copy it (`run`)."""
    from rundir_fixture import build_run

    return build_run(tmp_path_factory.mktemp("template"))


@pytest.fixture
def run(run_template: RunInfo, tmp_path: Path) -> RunInfo:
    """A private copy of the session's run (tests write decisions into it)."""
    dst = tmp_path / "run"
    shutil.copytree(run_template.run_dir, dst, ignore=shutil.ignore_patterns(".lock"))
    return replace(run_template, run_dir=dst)

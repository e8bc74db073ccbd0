"""Real photographs that ship inside installed packages, for offline demos and tests.

The files are located on disk inside scikit-image, scikit-learn and matplotlib without importing
those packages (their imports are slow). Licences are the ones the packages document:
skimage/data/_fetchers.py docstrings, sklearn/datasets/images/README.txt, and the U.S. Navy public
domain portrait of Grace Hopper that matplotlib ships as sample data."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
from pathlib import Path

from PIL import Image
from pydantic import BaseModel

log = logging.getLogger(__name__)

CC0 = "https://creativecommons.org/publicdomain/zero/1.0/"
CC_BY_2 = "https://creativecommons.org/licenses/by/2.0/"


class BundledPhoto(BaseModel):
    name: str
    file_name: str
    title: str
    caption: str
    license: str
    license_url: str | None = None
    attribution: str
    source_url: str | None = None
    package: str  # the installed package the file comes from
    package_path: str  # path of the original file inside that package


_PHOTOS: list[BundledPhoto] = [
    BundledPhoto(
        name="astronaut",
        file_name="astronaut.jpg",
        title="Astronaut Eileen Collins",
        caption="A smiling astronaut in an orange pressure suit next to a flag and a space shuttle model.",
        license="Public domain (NASA; no known copyright restrictions)",
        attribution="NASA",
        source_url="https://flic.kr/p/r9qvLn",
        package="skimage",
        package_path="data/astronaut.png",
    ),
    BundledPhoto(
        name="coffee",
        file_name="coffee.jpg",
        title="Coffee cup",
        caption="An espresso in a red cup on a red saucer with a metal spoon, on a wooden table.",
        license="CC0 1.0",
        license_url=CC0,
        attribution="Rachel Michetti, courtesy of Pikolo Espresso Bar",
        source_url="https://github.com/scikit-image/scikit-image/tree/main/skimage/data",
        package="skimage",
        package_path="data/coffee.png",
    ),
    BundledPhoto(
        name="chelsea",
        file_name="chelsea.jpg",
        title="Chelsea the cat",
        caption="Close-up of a tabby cat's face with green eyes and long whiskers.",
        license="CC0 1.0",
        license_url=CC0,
        attribution="Stefan van der Walt",
        source_url="https://github.com/scikit-image/scikit-image/tree/main/skimage/data",
        package="skimage",
        package_path="data/chelsea.png",
    ),
    BundledPhoto(
        name="rocket",
        file_name="rocket.jpg",
        title="Falcon 9 with DSCOVR on the launch pad",
        caption="A white rocket on its launch pad at dusk between tall lattice towers with bright lights.",
        license="Public domain (released by SpaceX)",
        attribution="SpaceX",
        source_url="https://www.flickr.com/photos/spacexphotos/16511594820/",
        package="skimage",
        package_path="data/rocket.jpg",
    ),
    BundledPhoto(
        name="camera",
        file_name="camera.jpg",
        title="Cameraman",
        caption=(
            "Black-and-white photo of a man in a dark coat looking through a camera on a tripod on a lawn."
        ),
        license="CC0 1.0",
        license_url=CC0,
        attribution="Lav Varshney",
        source_url="https://github.com/scikit-image/scikit-image/tree/main/skimage/data",
        package="skimage",
        package_path="data/camera.png",
    ),
    BundledPhoto(
        name="china",
        file_name="china.jpg",
        title="Tower above a lake",
        caption=(
            "A multi-tiered Chinese tower with red pillars and orange tiled roofs above trees and a lake."
        ),
        license="CC BY 2.0",
        license_url=CC_BY_2,
        attribution="danielbuechele on Flickr",
        source_url="https://www.flickr.com/photos/danielbuechele/6061409035/",
        package="sklearn",
        package_path="datasets/images/china.jpg",
    ),
    BundledPhoto(
        name="flower",
        file_name="flower.jpg",
        title="Dahlia",
        caption="An orange ball dahlia flower in sharp focus against dark green blurred leaves.",
        license="CC BY 2.0",
        license_url=CC_BY_2,
        # sklearn's README credits danielbuechele for both photos, but the source it links is vultilion's
        attribution="vultilion on Flickr",
        source_url="https://www.flickr.com/photos/vultilion/6056698931/",
        package="sklearn",
        package_path="datasets/images/flower.jpg",
    ),
    BundledPhoto(
        name="grace_hopper",
        file_name="grace_hopper.jpg",
        title="Commodore Grace M. Hopper, USN",
        caption="Portrait of an elderly woman in a navy uniform and cap with glasses, in front of a flag.",
        license="Public domain (U.S. Navy photograph)",
        attribution="U.S. Navy, photograph by James S. Davis",
        source_url="https://commons.wikimedia.org/wiki/File:Commodore_Grace_M._Hopper,_USN_(covered).jpg",
        package="matplotlib",
        package_path="mpl-data/sample_data/grace_hopper.jpg",
    ),
]

PHOTO_NAMES: tuple[str, ...] = tuple(p.name for p in _PHOTOS)


def package_file(photo: BundledPhoto) -> Path | None:
    """Where the original file lives in the installed package, or None if the package is missing."""
    try:
        spec = importlib.util.find_spec(photo.package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        candidate = Path(base) / photo.package_path
        if candidate.is_file():
            return candidate
    return None


def _jpeg_bytes(src: Path) -> bytes:
    """JPEG originals are copied byte for byte; PNG originals are encoded once as JPEG (quality 95)."""
    data = src.read_bytes()
    if data[:3] == b"\xff\xd8\xff":
        return data
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB")
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=95)
        return buf.getvalue()


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _licenses_md(photos: list[BundledPhoto]) -> str:
    lines = [
        "# Bundled photographs",
        "",
        "Real photographs copied from the sample data of installed packages (scikit-image,",
        "scikit-learn, matplotlib) by `rmskit.ingest.bundled.materialize_real_photos`.",
        "",
        "| file | title | licence | attribution | source |",
        "|---|---|---|---|---|",
    ]
    for p in photos:
        lic = f"[{p.license}]({p.license_url})" if p.license_url else p.license
        lines.append(f"| {p.file_name} | {p.title} | {lic} | {p.attribution} | {p.source_url or ''} |")
    return "\n".join(lines) + "\n"


def materialize_real_photos(dest: Path, names: list[str] | None = None) -> list[BundledPhoto]:
    """Write the bundled real photos into `dest` as JPEG files, plus `manifest.jsonl` (an rmskit
    manifest: path, caption, license, source_url, attribution) and `LICENSES.md`. Idempotent: files
    that already have the right content are left alone.

    `names=None` writes every photo whose package is installed (missing packages are logged);
    naming a photo whose package is missing raises FileNotFoundError."""
    by_name = {p.name: p for p in _PHOTOS}
    if names is not None:
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"unknown bundled photo(s) {unknown}; available: {', '.join(PHOTO_NAMES)}")
    wanted = [by_name[n] for n in names] if names is not None else list(_PHOTOS)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written: list[BundledPhoto] = []
    for photo in wanted:
        src = package_file(photo)
        if src is None:
            if names is not None:
                raise FileNotFoundError(
                    f"{photo.name}: {photo.package_path} not found (is {photo.package} installed?)"
                )
            log.warning("bundled photo %s skipped: package %s not installed", photo.name, photo.package)
            continue
        _write_if_changed(dest / photo.file_name, _jpeg_bytes(src))
        written.append(photo.model_copy())
    manifest = "".join(
        json.dumps(
            {
                "path": p.file_name,
                "caption": p.caption,
                "license": p.license,
                "source_url": p.source_url,
                "attribution": p.attribution,
                "title": p.title,
            },
            ensure_ascii=False,
        )
        + "\n"
        for p in written
    )
    _write_if_changed(dest / "manifest.jsonl", manifest.encode("utf-8"))
    _write_if_changed(dest / "LICENSES.md", _licenses_md(written).encode("utf-8"))
    return written

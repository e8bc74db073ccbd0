"""The JPEG pass-through check (models/images.py) reads segment headers itself instead of opening the
file with Pillow; it must give Pillow's verdict on every file Pillow can describe, and never pass a file
Pillow would not."""

from __future__ import annotations

import io
import itertools
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rmskit.models import images
from rmskit.models.images import _clean_jpeg_size, passthrough_data_url


def _pillow_verdict(data: bytes) -> tuple[int, int] | None:
    """What the check answered when it opened the file with Pillow (the reference)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG" and im.mode == "RGB" and not {"exif", "comment", "adobe"} & im.info.keys():
                return im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        pass  # (a corrupted size can pass Pillow's pixel limit: the old check let that error through)
    return None


def _jpegs(photo: Image.Image) -> list[tuple[str, bytes]]:
    exif = Image.Exif()
    exif[0x0112] = 6
    icc = b"\x00" * 128  # an APP2 ICC segment: allowed through
    out = []
    for (w, h), q, prog, sub in itertools.product(
        [(64, 48), (320, 240), (240, 320), (511, 97)], [40, 90], [False, True], [0, 2]
    ):
        im = photo.resize((w, h))
        for extra_name, extra in [
            ("plain", {}),
            ("exif", {"exif": exif.tobytes()}),
            ("comment", {"comment": b"hello"}),
            ("icc", {"icc_profile": icc}),
        ]:
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=q, progressive=prog, subsampling=sub, **extra)
            out.append((f"{w}x{h} q{q} prog={prog} sub={sub} {extra_name}", buf.getvalue()))
    for mode in ("L", "CMYK"):  # one and four components (CMYK also writes an Adobe segment)
        buf = io.BytesIO()
        photo.resize((100, 80)).convert(mode).save(buf, "JPEG", quality=90)
        out.append((mode, buf.getvalue()))
    buf = io.BytesIO()
    photo.resize((50, 40)).save(buf, "PNG")
    out.append(("png", buf.getvalue()))
    return out


def test_the_header_scan_gives_pillows_verdict(real_photos: dict[str, np.ndarray]) -> None:
    photo = Image.fromarray(real_photos["astronaut"]).convert("RGB")
    files = _jpegs(photo)
    assert sum(_pillow_verdict(d) is not None for _, d in files) >= 32  # both verdicts are exercised
    for name, data in files:
        assert _clean_jpeg_size(data) == _pillow_verdict(data), name


def test_the_header_scan_never_passes_what_pillow_would_not(real_photos: dict[str, np.ndarray]) -> None:
    """Truncated, corrupted and junk files: the scan may send a file to the re-encode that Pillow would
    have passed (e.g. junk bytes Pillow skips), never the other way round."""
    photo = Image.fromarray(real_photos["coffee"]).convert("RGB")
    rng = random.Random(0)
    seeds = [d for _, d in _jpegs(photo)[::5]]
    cases = [b"", b"\xff\xd8", b"\xff\xd8\xff", b"<html>no</html>"]
    for data in seeds:
        for _ in range(12):
            d = bytearray(data[: rng.randrange(2, 700)] if rng.random() < 0.4 else data)
            for _ in range(rng.randrange(1, 4)):  # flip bytes in the header
                d[rng.randrange(0, min(len(d), 700))] = rng.randrange(256)
            cases.append(bytes(d))
    for d in cases:
        mine = _clean_jpeg_size(d)
        # a corrupted size past Pillow's bomb limit: Pillow refuses it, and so does every max_side
        if mine is not None and mine[0] * mine[1] <= (Image.MAX_IMAGE_PIXELS or 2**62):
            assert _pillow_verdict(d) == mine


@pytest.mark.parametrize("max_side,expect_pass", [(320, True), (319, False)])
def test_passthrough_checks_the_side_and_the_size_bound(
    tmp_path: Path, real_photos: dict[str, np.ndarray], max_side: int, expect_pass: bool
) -> None:
    p = tmp_path / "a.jpg"
    Image.fromarray(real_photos["chelsea"]).convert("RGB").resize((320, 200)).save(p, quality=90)
    url = passthrough_data_url(p, max_side)
    assert (url is not None) == expect_pass
    assert passthrough_data_url(tmp_path / "missing.jpg", 320) is None
    bloated = tmp_path / "b.jpg"  # a clean header, but far more bytes than its pixels need
    bloated.write_bytes(p.read_bytes()[:-2] + b"\x00" * (320 * 200 * 2) + b"\xff\xd9")
    assert _clean_jpeg_size(bloated.read_bytes()) == (320, 200)
    assert passthrough_data_url(bloated, 320) is None
    assert images._PASS_BYTES_PER_PIXEL == 1.5

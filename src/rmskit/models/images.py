"""Images for remote backends: JPEG data URLs, resized, encoded once per image and cached by bytes."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections import OrderedDict
from pathlib import Path

from rmskit.models.base import BackendError, ErrorKind, ImageInput

_IMAGE_CACHE: OrderedDict[tuple[str, int], str] = OrderedDict()
# Data URLs of recently used images, bounded by bytes: every image in the build's window (default
# 2x concurrency) stays encoded while its stages run, so each image is encoded once, not per request.
# 64 MB holds a window of 128 images at ~500 KB each (1024 px JPEGs are ~150-250 KB as base64) and
# keeps a long run's memory flat: the cache is full, not growing, after the first few hundred images.
_IMAGE_CACHE_MAX_BYTES = 64 * 1024 * 1024
_image_cache_bytes = 0
_IMAGE_CACHE_LOCK = threading.Lock()


def _cache_get(key: tuple[str, int]) -> str | None:
    with _IMAGE_CACHE_LOCK:
        url = _IMAGE_CACHE.get(key)
        if url is not None:
            _IMAGE_CACHE.move_to_end(key)
        return url


def forget_image(sha256: str) -> None:
    """Drop an image's data URLs once its stages are done (the pipeline calls this), so the cache holds
    the images in flight rather than the last 64 MB of them."""
    global _image_cache_bytes
    with _IMAGE_CACHE_LOCK:
        for side in _SIDES:
            url = _IMAGE_CACHE.pop((sha256, side), None)
            if url is not None:
                _image_cache_bytes -= len(url)


_SIDES: set[int] = set()  # the max_side values in use (one or two per run)


def _cache_put(key: tuple[str, int], url: str) -> None:
    global _image_cache_bytes
    with _IMAGE_CACHE_LOCK:
        _SIDES.add(key[1])
        old = _IMAGE_CACHE.pop(key, None)
        _image_cache_bytes += len(url) - (len(old) if old else 0)
        _IMAGE_CACHE[key] = url
        while _image_cache_bytes > _IMAGE_CACHE_MAX_BYTES and len(_IMAGE_CACHE) > 1:
            _, evicted = _IMAGE_CACHE.popitem(last=False)
            _image_cache_bytes -= len(evicted)


_JPEG_PREFIX = "data:image/jpeg;base64,"
# A JPEG sent as it is must be no larger than a q95 encoding of its pixels would be (about 1 byte per
# pixel), so odd files (huge APP segments, embedded previews) still go through the re-encode.
_PASS_BYTES_PER_PIXEL = 1.5


# JPEG start-of-frame markers (as Pillow reads them: not DHT C4, JPG C8 or DAC CC) and markers with no length.
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_STANDALONE = frozenset(range(0xD0, 0xDA))  # RSTn, SOI, EOI
# Read otherwise by Pillow (JPG and JPGn as lengthless, DHP as a frame header): never in a plain file.
_ODD = frozenset({0xC8, 0xDE, *range(0xF0, 0xFE)})


def _segment_ok(marker: int, seg: bytes) -> bool:
    """A header segment Pillow reads without error, and none that disqualifies a pass-through: EXIF
    (APP1 "Exif"), a comment (COM), Adobe colour (APP14)."""
    if (
        marker == 0xFE
        or (marker == 0xE1 and seg[:6] == b"Exif\x00\x00")
        or (marker == 0xEE and seg[:5] == b"Adobe")
    ):
        return False
    if marker == 0xE0 and seg[:4] == b"JFIF":
        return len(seg) >= 6  # Pillow reads the version
    if marker == 0xE2 and seg[:12] == b"ICC_PROFILE\x00":
        return len(seg) >= 14  # Pillow reads the chunk's sequence numbers
    if marker == 0xDB:  # quantisation tables: 65 or 129 bytes each, as Pillow checks
        pos = 0
        while pos < len(seg):
            pos += 1 + 64 * (1 if seg[pos] >> 4 == 0 else 2)
        return pos == len(seg)
    return True


def _clean_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) when `data` opens as a clean JPEG: 8-bit, 3 components (RGB once decoded), no
    EXIF, comment or Adobe segment before the scan, every header segment whole; else None.

    Pillow's verdict from the segment headers alone (tests/test_images.py compares the two on many
    files and fuzzes the headers: this check may send a file Pillow would pass to the re-encode, never
    the reverse). Pillow also parses each quantisation table in Python: 0.2 ms per new image, the
    largest client cost of a one-call-per-image run after the HTTP send."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    size: tuple[int, int] | None = None
    i, n = 2, len(data)
    while i + 1 < n:
        if data[i] != 0xFF:
            return None  # Pillow skips junk between segments; such a file is re-encoded
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker < 0xC0 or marker in _ODD or i + 4 > n:  # not a marker Pillow knows; a cut-off length
            return None
        end = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if end > n or end < i + 4:
            return None
        seg = data[i + 4 : end]
        if marker == 0xDA:  # start of scan: the header is over
            return size
        if not _segment_ok(marker, seg):
            return None
        if marker in _SOF:
            # 8-bit samples, 3 components of 3 bytes each (Pillow reads every component entry)
            if len(seg) != 15 or seg[0] != 8 or seg[5] != 3 or size is not None:
                return None
            size = (int.from_bytes(seg[3:5], "big"), int.from_bytes(seg[1:3], "big"))
            if not size[0] or not size[1]:
                return None
        i = end
    return None


def passthrough_data_url(path: Path, max_side: int) -> str | None:
    """The file's own bytes as a data URL when re-encoding would change nothing a server sees: a
    baseline-decodable RGB JPEG within `max_side`, without EXIF (no orientation to apply, no GPS to
    leak) or comments. Ingest's normalised copies are such files, so most requests skip the decode
    and re-encode (the largest client cost per image). None: the caller must re-encode."""
    try:
        data = path.read_bytes()
    except OSError:
        return None  # the re-encode reports the error
    size = _clean_jpeg_size(data)
    if size is None:
        return None
    w, h = size
    if max(w, h) > max_side or len(data) > w * h * _PASS_BYTES_PER_PIXEL + 16384:
        return None
    return _JPEG_PREFIX + base64.b64encode(data).decode("ascii")


def encode_image_data_url(path: Path, max_side: int, quality: int = 90, *, passthrough: bool = True) -> str:
    """A JPEG data URL of the image at `path`, longest side at most `max_side` (EXIF orientation
    applied, alpha flattened onto white). Blocking: call it off the event loop."""
    from PIL import Image, ImageOps

    url = passthrough_data_url(path, max_side) if passthrough else None
    if url is not None:
        return url
    with Image.open(path) as src:
        src.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale when much larger
        im = ImageOps.exif_transpose(src)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.new("RGB", rgba.size, (255, 255, 255))
            im.paste(rgba, mask=rgba.getchannel("A"))
        elif im.mode != "RGB":
            im = im.convert("RGB")
        if max(im.size) > max_side:
            im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        # comment=b"": Pillow would otherwise copy the source's JPEG comment (free text) to the server
        im.save(buf, "JPEG", quality=quality, comment=b"")
    return _JPEG_PREFIX + base64.b64encode(buf.getvalue()).decode("ascii")


def _small(path: Path) -> bool:
    try:
        return path.stat().st_size <= _INLINE_MAX_BYTES
    except OSError:
        return False


_INLINE_MAX_BYTES = 256 * 1024


class ImageURLs:
    """Data URLs for one backend's requests: one encoding per image even when several requests for
    it start at once (the encodings are shared through the module cache)."""

    def __init__(self) -> None:
        self._pending: dict[tuple[str, int], asyncio.Future[str]] = {}

    async def url(self, img: ImageInput, max_side: int) -> str:
        key = (img.sha256, max_side)
        url = _cache_get(key)
        if url is not None:
            return url
        fut = self._pending.get(key)
        tried = False  # the pass-through was tried here: the re-encode need not read the file for it again
        if fut is None and _small(img.path):
            tried = True
            # A small file is read on the loop: a thread hop costs more than the read itself.
            url = passthrough_data_url(img.path, max_side)
            if url is not None:
                _cache_put(key, url)
                return url
        if fut is None:
            # One encoding per image even when several requests for it start at once.
            fut = asyncio.ensure_future(
                asyncio.to_thread(encode_image_data_url, img.path, key[1], passthrough=not tried)
            )
            self._pending[key] = fut

            def _done(f: asyncio.Future[str], key: tuple[str, int] = key) -> None:
                self._pending.pop(key, None)
                if not f.cancelled() and f.exception() is None:
                    _cache_put(key, f.result())

            fut.add_done_callback(_done)
        try:
            return await asyncio.shield(fut)
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for unreadable images
            raise BackendError(ErrorKind.image, f"cannot encode image {img.sha256[:12]}: {e}") from None

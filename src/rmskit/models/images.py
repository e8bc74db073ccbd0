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
_IMAGE_CACHE_MAX_BYTES = 256 * 1024 * 1024
_image_cache_bytes = 0
_IMAGE_CACHE_LOCK = threading.Lock()


def _cache_get(key: tuple[str, int]) -> str | None:
    with _IMAGE_CACHE_LOCK:
        url = _IMAGE_CACHE.get(key)
        if url is not None:
            _IMAGE_CACHE.move_to_end(key)
        return url


def _cache_put(key: tuple[str, int], url: str) -> None:
    global _image_cache_bytes
    with _IMAGE_CACHE_LOCK:
        old = _IMAGE_CACHE.pop(key, None)
        _image_cache_bytes += len(url) - (len(old) if old else 0)
        _IMAGE_CACHE[key] = url
        while _image_cache_bytes > _IMAGE_CACHE_MAX_BYTES and len(_IMAGE_CACHE) > 1:
            _, evicted = _IMAGE_CACHE.popitem(last=False)
            _image_cache_bytes -= len(evicted)


def encode_image_data_url(path: Path, max_side: int, quality: int = 90) -> str:
    """A JPEG data URL of the image at `path`, longest side at most `max_side` (EXIF orientation
    applied, alpha flattened onto white). Blocking: call it off the event loop."""
    from PIL import Image, ImageOps

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
        im.save(buf, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


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
        if fut is None:
            # One encoding per image even when several requests for it start at once.
            fut = asyncio.ensure_future(asyncio.to_thread(encode_image_data_url, img.path, key[1]))
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

"""Safe decoding of one image under `IngestConfig`.

Order of work for one file (each step can refuse with a human-readable reason):
1. size cap from `stat` (nothing is read when the file is too big or empty);
2. the bytes are read once: sha256 (identity) is taken from them and Pillow parses them from memory;
3. `Image.open` reads only the header: the pixel cap, min side and aspect checks run *before* any
   pixel is decoded (decompression bombs never allocate); Pillow's own bomb error also refuses;
4. the first frame is decoded, EXIF orientation applied, and the mode normalised to RGB
   (CMYK / ICC to sRGB, 16-bit and 32-bit grey rescaled, palette and alpha composited onto white);
5. the perceptual hash (imagehash.phash) is taken from the normalised image, which is written
   content-addressed into the cache dir.

Cache file format: sources with a lossy codec (JPEG, MPO, WebP) are re-encoded as `<sha256>.jpg`
(quality 95); lossless sources (PNG, GIF, BMP, TIFF, ...) up to 4 megapixels become `<sha256>.png`
so no generation loss is added, larger ones `.jpg` q95 to keep the cache small. The copy carries pixels
only: EXIF/GPS, XMP, ICC profiles, JPEG comments (COM) and PNG text chunks (tEXt/iTXt/zTXt) are all
dropped, so nothing a camera or an attacker wrote reaches the pipeline or the exported dataset (a JPEG
copy has only the JFIF APP0 header, a PNG copy only IHDR/IDAT/IEND). A `<sha256>.json`
sidecar records the result so a resumed run does not decode the same bytes again."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import threading
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ValidationError

from rmskit.config import IngestConfig
from rmskit.console import is_storage_failure

# Formats Pillow may parse. Deliberately excludes EPS (runs Ghostscript), PSD, FITS, WMF, … : plugins
# for formats no photo collection needs are attack surface.
# TGA is left out too: it has no magic number, so random bytes could pass for it.
_SAFE_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "PPM", "AVIF", "QOI")
_LOSSY_FORMATS = {"JPEG", "MPO", "WEBP", "AVIF"}
_PNG_MAX_PIXELS = 4_000_000
_SIDECAR_VERSION = 2  # 2: copies carry no metadata (v1 copies kept JPEG comments)


class ImageRefused(Exception):
    """A file or blob that is not a usable photo; `reason` is shown to the user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Decoded(BaseModel):
    sha256: str
    phash: str
    path: str  # absolute path of the normalised RGB copy
    width: int  # after EXIF orientation
    height: int
    orig_format: str | None = None
    orig_mode: str | None = None


def safe_formats() -> list[str]:
    Image.init()
    return [f for f in _SAFE_FORMATS if f in Image.OPEN]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"


def read_file_capped(path: Path, cfg: IngestConfig) -> bytes:
    """Read a regular file once, refusing empty or over-size files without reading them."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageRefused("file not found (it may have been removed during ingest)") from None
    except PermissionError:
        raise ImageRefused("permission denied") from None
    except OSError as exc:
        raise ImageRefused(f"cannot stat file: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageRefused("not a regular file (fifo, socket or device)")
    if st.st_size == 0:
        raise ImageRefused("empty file (0 bytes)")
    if st.st_size > cfg.max_file_bytes:
        raise ImageRefused(
            f"file too large: {_human_bytes(st.st_size)} "
            f"(max_file_bytes is {_human_bytes(cfg.max_file_bytes)})"
        )
    try:
        with open(path, "rb") as fh:
            data = fh.read(cfg.max_file_bytes + 1)  # the file may grow between stat and read
    except PermissionError:
        raise ImageRefused("permission denied") from None
    except OSError as exc:
        raise ImageRefused(f"cannot read file: {exc.strerror or exc}") from None
    check_blob_size(data, cfg)
    return data


def check_blob_size(data: bytes, cfg: IngestConfig) -> None:
    if not data:
        raise ImageRefused("empty file (0 bytes)")
    if len(data) > cfg.max_file_bytes:
        raise ImageRefused(f"file too large: more than max_file_bytes ({_human_bytes(cfg.max_file_bytes)})")


def describe_non_image(data: bytes) -> str:
    """Name what a blob that Pillow cannot open is, for the refusal reason."""
    head = data[:4096]
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    magic = {
        b"%pdf": "a PDF document",
        b"pk\x03\x04": "a ZIP archive (or office document)",
        b"\x1f\x8b": "a gzip archive",
        b"\x7felf": "an executable (ELF)",
        b"%!ps": "a PostScript/EPS file (not decoded for safety)",
        b"8bps": "a Photoshop PSD file (not supported)",
        b"rar!": "a RAR archive",
        b"7z\xbc\xaf": "a 7z archive",
    }
    for sig, what in magic.items():
        if stripped.startswith(sig):
            return what
    if head[4:8] == b"ftyp":
        brand = head[8:12].decode("ascii", "replace")
        if brand in ("heic", "heix", "mif1", "msf1", "hevc", "heim", "heis"):
            return "a HEIC/HEIF image (unsupported; convert it to JPEG)"
        return f"an ISO media file (brand {brand!r}), e.g. a video"
    if stripped.startswith((b"<!doctype html", b"<html")) or b"<html" in stripped[:1024]:
        return "an HTML document"
    if stripped.startswith(b"<svg") or (stripped.startswith(b"<?xml") and b"<svg" in stripped):
        return "an SVG drawing (vector images are not supported)"
    if stripped.startswith(b"<?xml"):
        return "an XML document"
    if stripped.startswith((b"{", b"[")):
        return "a JSON document"
    if looks_like_text(head):
        return "a text file"
    return f"unrecognised binary data (starts with {data[:8].hex(' ')})"


def looks_like_text(head: bytes) -> bool:
    """UTF-8 without control characters (a multi-byte character cut at the end of `head` is fine)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start <= len(head) - 4:
            return False
        text = head[: exc.start].decode("utf-8")
    return all(c.isprintable() or c in "\r\n\t\f" for c in text.lstrip("\ufeff"))


def _check_geometry(width: int, height: int, cfg: IngestConfig) -> None:
    if width <= 0 or height <= 0:
        raise ImageRefused(f"invalid image size {width}x{height}")
    pixels = width * height
    if pixels > cfg.max_pixels:
        raise ImageRefused(
            f"possible decompression bomb: header claims {width}x{height} = {pixels:,} pixels "
            f"(max_pixels is {cfg.max_pixels:,}); not decoded"
        )
    pillow_cap = Image.MAX_IMAGE_PIXELS
    if pillow_cap and pixels > pillow_cap:  # what Pillow would only warn about is refused here
        raise ImageRefused(
            f"possible decompression bomb: {width}x{height} = {pixels:,} pixels exceeds Pillow's "
            f"MAX_IMAGE_PIXELS ({pillow_cap:,}); not decoded"
        )
    if min(width, height) < cfg.min_side:
        raise ImageRefused(f"image too small: {width}x{height} (min_side is {cfg.min_side})")
    aspect = max(width, height) / min(width, height)
    if aspect > cfg.max_aspect:
        raise ImageRefused(
            f"extreme aspect ratio {aspect:.1f}:1 ({width}x{height}; max_aspect is {cfg.max_aspect:g})"
        )


def _rescale_to_uint8(arr: np.ndarray, full_scale: float | None) -> np.ndarray:
    arr = arr.astype(np.float64)
    if full_scale is None:  # unknown range (float / 32-bit int): stretch what is there
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        if lo >= 0 and hi <= 255:
            lo, hi = 0.0, 255.0
        arr = (arr - lo) / ((hi - lo) or 1.0) * 255.0
    else:
        arr = arr / full_scale * 255.0
    return np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8)


def _composite_on_white(im: Image.Image) -> Image.Image:
    if im.mode == "La":  # Pillow converts premultiplied La only to LA
        im = im.convert("LA")
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_srgb(im: Image.Image) -> Image.Image:
    """Colour-manage through the embedded ICC profile when there is one (CMYK, Adobe RGB, P3)."""
    icc = im.info.get("icc_profile")
    if not icc:
        return im.convert("RGB")
    try:
        from PIL import ImageCms

        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if im.mode == "RGB" and "srgb" in (ImageCms.getProfileDescription(src) or "").lower():
            return im
        out = ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        return out if out is not None else im.convert("RGB")
    except Exception:  # a broken or exotic profile: fall back to Pillow's plain conversion
        return im.convert("RGB")


def normalise_to_rgb(im: Image.Image) -> Image.Image:
    """Any decoded Pillow image (first frame, EXIF already applied) to 8-bit RGB."""
    mode = im.mode
    if mode == "RGB":
        return _to_srgb(im) if im.info.get("icc_profile") else im
    if mode == "CMYK":
        return _to_srgb(im)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite_on_white(im)
    if mode == "P":
        if "transparency" in im.info or im.palette is not None and im.palette.mode == "RGBA":
            return _composite_on_white(im)
        return im.convert("RGB")
    if mode.startswith("I;16"):
        grey = _rescale_to_uint8(np.asarray(im), 65535.0)
        return Image.fromarray(grey).convert("RGB")
    if mode == "I":  # 32-bit int; Pillow also uses it for some 16-bit PNG/TIFF files
        arr = np.asarray(im)
        hi = int(arr.max()) if arr.size else 0
        lo = int(arr.min()) if arr.size else 0
        scale = 255.0 if lo >= 0 and hi <= 255 else 65535.0 if lo >= 0 and hi <= 65535 else None
        return Image.fromarray(_rescale_to_uint8(arr, scale)).convert("RGB")
    if mode == "F":
        return Image.fromarray(_rescale_to_uint8(np.asarray(im), None)).convert("RGB")
    return im.convert("RGB")  # L, 1, YCbCr, LAB, HSV, RGBX, ...


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _cached(sha: str, cache_dir: Path, cfg: IngestConfig) -> Decoded | None:
    sidecar = cache_dir / f"{sha}.json"
    try:
        raw = json.loads(sidecar.read_text(encoding="utf-8"))
        if raw.pop("v", None) != _SIDECAR_VERSION:
            return None
        dec = Decoded.model_validate(raw)
    except (OSError, ValueError, ValidationError):
        return None
    if not Path(dec.path).is_file():
        return None
    _check_geometry(dec.width, dec.height, cfg)  # the config may have tightened since
    return dec


def decode_bytes(
    data: bytes, cfg: IngestConfig, cache_dir: Path, *, sha256: str | None = None, name: str | None = None
) -> Decoded:
    """Validate, normalise and cache one image given as bytes. Raises ImageRefused with a reason.
    `name` (a file name) only improves the wording of refusals."""
    check_blob_size(data, cfg)
    sha = sha256 or sha256_hex(data)
    cache_dir = Path(cache_dir)
    cached = _cached(sha, cache_dir, cfg)
    if cached is not None:
        return cached
    try:
        return _decode_uncached(data, sha, cfg, cache_dir, name)
    except ImageRefused:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRefused(f"possible decompression bomb (Pillow refused it: {exc})") from None
    except MemoryError:
        raise ImageRefused("not enough memory to decode this image") from None
    except Exception as exc:  # any parser failure on hostile bytes is a refusal, never a crash
        if is_storage_failure(exc):  # a full disk is the run's problem, not this image's
            raise
        raise ImageRefused(f"corrupt or unsupported image: {type(exc).__name__}: {exc}") from None


def _decode_uncached(data: bytes, sha: str, cfg: IngestConfig, cache_dir: Path, name: str | None) -> Decoded:
    named = f" (named {Path(name).name!r})" if name else ""
    try:
        im = Image.open(io.BytesIO(data), formats=safe_formats())  # lazy: header only
    except UnidentifiedImageError:
        raise ImageRefused(f"not an image: {describe_non_image(data)}{named}") from None
    except Image.DecompressionBombError as exc:
        raise ImageRefused(f"possible decompression bomb (Pillow refused the header: {exc})") from None
    with im:
        orig_format, orig_mode = im.format, im.mode
        _check_geometry(im.width, im.height, cfg)
        # Image.open leaves animations and multi-page files on their first frame; asking for n_frames
        # would make Pillow scan every frame of a GIF, so it is not asked.
        try:
            im.load()
        except Image.DecompressionBombError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            msg = str(exc)
            if "truncated" in msg.lower() or isinstance(exc, EOFError):
                raise ImageRefused(
                    f"truncated {orig_format} file: {msg or 'unexpected end of data'}"
                ) from None
            raise ImageRefused(f"corrupt {orig_format} data: {msg or type(exc).__name__}") from None
        _check_geometry(im.width, im.height, cfg)  # some formats pick their size only at load
        try:
            oriented = ImageOps.exif_transpose(im)
        except Exception:  # malformed EXIF: keep the pixels as stored rather than refuse the photo
            oriented = None
        rgb = normalise_to_rgb(oriented if oriented is not None else im)
    if rgb.mode != "RGB":
        rgb = rgb.convert("RGB")
    # Nothing but pixels reaches the copy: Pillow would carry a JPEG comment, an ICC profile (its
    # description is text) and other `info` entries into the saved file (privacy: README promise).
    rgb.info = {}
    phash = str(imagehash.phash(rgb))
    lossless = orig_format not in _LOSSY_FORMATS and rgb.width * rgb.height <= _PNG_MAX_PIXELS
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = (cache_dir / f"{sha}.{'png' if lossless else 'jpg'}").absolute()
    # Always (re)written: a copy left by an older version may still carry metadata.
    if lossless:
        _atomic_write(out, lambda p: rgb.save(p, format="PNG", compress_level=4))
    else:
        _atomic_write(out, lambda p: rgb.save(p, format="JPEG", quality=95))
    dec = Decoded(
        sha256=sha,
        phash=phash,
        path=str(out),
        width=rgb.width,
        height=rgb.height,
        orig_format=orig_format,
        orig_mode=orig_mode,
    )
    payload = json.dumps({"v": _SIDECAR_VERSION, **dec.model_dump()})
    _atomic_write(cache_dir / f"{sha}.json", lambda p: p.write_text(payload, encoding="utf-8"))
    return dec


def decode_file(path: Path, cfg: IngestConfig, cache_dir: Path) -> Decoded:
    """Read (once), hash and decode one file. Raises ImageRefused with a reason."""
    data = read_file_capped(Path(path), cfg)
    return decode_bytes(data, cfg, cache_dir, name=Path(path).name)

"""Ingest's safety checks called directly (rmskit.ingest.decode and .base), fast enough for `make mutate`
(the folder-level tests in test_ingest.py share one large fixture that costs seconds per mutant).
Each test pins a boundary or a refusal reason that a mutation of the check would change."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from rmskit.config import IngestConfig
from rmskit.ingest import base, decode
from rmskit.ingest.decode import ImageRefused, decode_bytes


def _png(arr: np.ndarray, mode: str | None = None, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _refusal(fn, *args, **kw) -> str:
    with pytest.raises(ImageRefused) as ei:
        fn(*args, **kw)
    assert str(ei.value) == ei.value.reason
    return ei.value.reason


# -- size caps ----------------------------------------------------------------------------------------
def test_human_bytes_units() -> None:
    hb = decode._human_bytes
    assert [hb(0), hb(999), hb(1000), hb(1_500_000), hb(2_000_000_000), hb(5 * 10**12)] == [
        "0 B",
        "999 B",
        "1.0 KB",
        "1.5 MB",
        "2.0 GB",
        "5000.0 GB",
    ]


def test_read_file_capped_boundaries_and_reasons(tmp_path: Path) -> None:
    cfg = IngestConfig(max_file_bytes=1500)
    exact = tmp_path / "exact.bin"
    exact.write_bytes(b"x" * 1500)
    assert decode.read_file_capped(exact, cfg) == b"x" * 1500
    over = tmp_path / "over.bin"
    over.write_bytes(b"x" * 1501)
    assert _refusal(decode.read_file_capped, over, cfg) == "file too large: 1.5 KB (max_file_bytes is 1.5 KB)"
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert _refusal(decode.read_file_capped, empty, cfg) == "empty file (0 bytes)"
    assert (
        _refusal(decode.read_file_capped, tmp_path / "gone.jpg", cfg)
        == "file not found (it may have been removed during ingest)"
    )
    assert _refusal(decode.read_file_capped, tmp_path, cfg) == "not a regular file (fifo, socket or device)"
    os.mkfifo(tmp_path / "pipe")
    assert _refusal(decode.read_file_capped, tmp_path / "pipe", cfg).startswith("not a regular file")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert _refusal(decode.read_file_capped, loop, cfg).startswith("cannot stat file: ")


def test_check_blob_size() -> None:
    cfg = IngestConfig(max_file_bytes=2000)
    decode.check_blob_size(b"x" * 2000, cfg)
    assert _refusal(decode.check_blob_size, b"", cfg) == "empty file (0 bytes)"
    assert (
        _refusal(decode.check_blob_size, b"x" * 2001, cfg)
        == "file too large: more than max_file_bytes (2.0 KB)"
    )


# -- what a non-image is ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"%PDF-1.7\n", "a PDF document"),
        (b"\xef\xbb\xbf \n%pdf", "a PDF document"),  # BOM and blank lines before the magic
        (b"PK\x03\x04rest", "a ZIP archive (or office document)"),
        (b"\x1f\x8b\x08\x00", "a gzip archive"),
        (b"\x7fELF\x02\x01", "an executable (ELF)"),
        (b"%!PS-Adobe-3.0 EPSF", "a PostScript/EPS file (not decoded for safety)"),
        (b"8BPS\x00\x01", "a Photoshop PSD file (not supported)"),
        (b"Rar!\x1a\x07", "a RAR archive"),
        (b"7z\xbc\xaf\x27\x1c", "a 7z archive"),
        (b"\x00\x00\x00\x18ftypheic\x00", "a HEIC/HEIF image (unsupported; convert it to JPEG)"),
        (b"\x00\x00\x00\x18ftypmif1\x00", "a HEIC/HEIF image (unsupported; convert it to JPEG)"),
        (b"\x00\x00\x00\x18ftypisom\x00", "an ISO media file (brand 'isom'), e.g. a video"),
        (b"<!DOCTYPE html><p>", "an HTML document"),
        (b"<HTML><body>", "an HTML document"),
        (b"<!-- a comment -->\n<html>", "an HTML document"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "an SVG drawing (vector images are not supported)"),
        (b"<?xml version='1.0'?><svg/>", "an SVG drawing (vector images are not supported)"),
        (b"<?xml version='1.0'?><root/>", "an XML document"),
        (b'  {"a": 1}', "a JSON document"),
        (b"[1, 2]", "a JSON document"),
        ("plain words, caf\u00e9\n".encode(), "a text file"),
        (
            b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09",
            "unrecognised binary data (starts with 00 01 02 03 04 05 06 07)",
        ),
    ],
)
def test_describe_non_image(data: bytes, what: str) -> None:
    assert decode.describe_non_image(data) == what


def test_looks_like_text_boundaries() -> None:
    assert decode.looks_like_text("caf\u00e9\tok\r\n\f".encode())
    assert decode.looks_like_text("\ufeffwith a BOM".encode())
    assert decode.looks_like_text(b"abc" + "\U0001f600".encode()[:3])  # a character cut by the 4 KiB head
    assert decode.looks_like_text(b"abcd\xff" + b"ef")  # a bad byte within the last 3 counts as cut
    assert not decode.looks_like_text(b"abc\xff" + b"def")  # 4 bytes before the end: not text
    assert not decode.looks_like_text(b"bell\x07")
    assert not decode.looks_like_text(b"nul\x00")


# -- geometry ---------------------------------------------------------------------------------------------
def test_geometry_boundaries_and_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = IngestConfig(max_pixels=10_000, min_side=10, max_aspect=4.0)
    g = decode._check_geometry
    g(100, 100, cfg)  # exactly max_pixels
    g(10, 40, cfg)  # exactly min_side and max_aspect
    assert _refusal(g, 0, 50, cfg) == "invalid image size 0x50"
    assert _refusal(g, 50, -1, cfg) == "invalid image size 50x-1"
    assert _refusal(g, 101, 100, cfg) == (
        "possible decompression bomb: header claims 101x100 = 10,100 pixels (max_pixels is 10,000); not decoded"
    )
    assert _refusal(g, 9, 20, cfg) == "image too small: 9x20 (min_side is 10)"
    assert _refusal(g, 41, 10, cfg) == "extreme aspect ratio 4.1:1 (41x10; max_aspect is 4)"
    monkeypatch.setattr(decode.Image, "MAX_IMAGE_PIXELS", 1000)
    g(40, 25, cfg)  # exactly Pillow's cap
    assert _refusal(g, 40, 26, cfg) == (
        "possible decompression bomb: 40x26 = 1,040 pixels exceeds Pillow's MAX_IMAGE_PIXELS (1,000); not decoded"
    )
    monkeypatch.setattr(decode.Image, "MAX_IMAGE_PIXELS", None)  # Pillow's check switched off
    g(100, 100, cfg)


# -- normalisation ----------------------------------------------------------------------------------------
def test_rescale_to_uint8() -> None:
    r = decode._rescale_to_uint8
    assert r(np.array([0.0, 100.0, 255.0]), None).tolist() == [0, 100, 255]  # already 8-bit range
    assert r(np.array([-1.0, 0.0, 1.0]), None).tolist() == [0, 128, 255]  # stretched
    assert r(np.array([300.0, 300.0]), None).tolist() == [0, 0]  # flat: no division by zero
    assert r(np.array([np.nan, 255.0]), None).tolist() == [0, 255]
    assert r(np.array([0, 32768, 65535]), 65535.0).tolist() == [0, 128, 255]
    assert r(np.array([70000.0]), 65535.0).tolist() == [255]  # clipped
    assert r(np.array([0.0, 1.0]), None).dtype == np.uint8


def test_normalise_modes() -> None:
    grey = skdata.camera()[:64, :64]
    rgb = Image.fromarray(skdata.chelsea()[:64, :64])
    assert decode.normalise_to_rgb(rgb) is rgb  # plain RGB without a profile is untouched
    for im in (
        Image.fromarray(grey),  # L
        Image.fromarray(grey > 128),  # 1
        Image.fromarray(grey.astype(np.uint16) * 257),  # I;16
        Image.fromarray(grey.astype(np.float32) / 255.0),  # F
        rgb.convert("CMYK"),
        rgb.convert("YCbCr"),
    ):
        out = decode.normalise_to_rgb(im)
        assert out.mode == "RGB" and out.size == (64, 64)
    # 16-bit grey is rescaled to the full 8-bit range, not clipped
    out16 = np.asarray(decode.normalise_to_rgb(Image.fromarray(grey.astype(np.uint16) * 257)))[..., 0]
    assert np.abs(out16.astype(int) - grey).max() <= 1
    # mode I: 8-bit range kept, 16-bit range scaled, anything else stretched
    for arr, want in (
        (np.array([[0, 200]], np.int32), [0, 200]),
        (np.array([[0, 65535]], np.int32), [0, 255]),
        (np.array([[-10, 10]], np.int32), [0, 255]),
    ):
        got = np.asarray(decode.normalise_to_rgb(Image.fromarray(arr, "I")))[..., 0]
        assert got.ravel().tolist() == want
    # transparency of every kind becomes white
    la = Image.fromarray(np.dstack([grey, np.zeros_like(grey)]), "LA")
    assert np.asarray(decode.normalise_to_rgb(la)).min() == 255
    rgba = Image.fromarray(np.dstack([skdata.chelsea()[:64, :64], np.zeros_like(grey)]), "RGBA")
    assert np.asarray(decode.normalise_to_rgb(rgba)).min() == 255
    pal = rgb.quantize(colors=16)
    pal.info["transparency"] = bytes(16)  # every index fully transparent
    assert np.asarray(decode.normalise_to_rgb(pal)).min() == 255
    opaque = rgb.quantize(colors=16)
    assert np.asarray(decode.normalise_to_rgb(opaque)).std() > 10  # real colours, not white


# -- decode_bytes: copies, sidecars, refusals -----------------------------------------------------------
def test_lossless_sources_stay_png_up_to_the_pixel_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = IngestConfig()
    assert decode._PNG_MAX_PIXELS == 4_000_000
    monkeypatch.setattr(decode, "_PNG_MAX_PIXELS", 100 * 80)  # the same rule on small images
    at_cap = decode_bytes(_png(np.full((80, 100, 3), 90, np.uint8)), cfg, tmp_path)
    assert at_cap.path.endswith(".png") and (at_cap.width, at_cap.height) == (100, 80)
    over = decode_bytes(_png(np.full((81, 100, 3), 90, np.uint8)), cfg, tmp_path)
    assert over.path.endswith(".jpg")
    photo = decode_bytes(_jpeg(skdata.chelsea()), cfg, tmp_path)  # lossy source: JPEG copy
    assert photo.path.endswith(".jpg") and photo.orig_format == "JPEG" and photo.orig_mode == "RGB"
    assert Path(photo.path).is_absolute()
    side = json.loads((tmp_path / f"{photo.sha256}.json").read_text())
    assert side.pop("v") == 2 and side == photo.model_dump()
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave nothing behind


def test_sidecar_reuse_and_invalidation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = IngestConfig()
    data = _jpeg(skdata.chelsea())
    first = decode_bytes(data, cfg, tmp_path)
    calls: list[str] = []
    real = decode._decode_uncached

    def counting(*a, **kw):
        calls.append("decode")
        return real(*a, **kw)

    monkeypatch.setattr(decode, "_decode_uncached", counting)
    assert decode_bytes(data, cfg, tmp_path) == first and calls == []  # sidecar reused
    # the config tightened since: the cached image is refused, not served
    assert _refusal(decode_bytes, data, IngestConfig(min_side=400), tmp_path).startswith("image too small")
    side = tmp_path / f"{first.sha256}.json"
    raw = json.loads(side.read_text())
    side.write_text(json.dumps({**raw, "v": 1}))  # an older sidecar version: decoded again
    assert decode_bytes(data, cfg, tmp_path) == first and calls == ["decode"]
    Path(first.path).unlink()  # the copy vanished: decoded again
    assert decode_bytes(data, cfg, tmp_path) == first and calls == ["decode", "decode"]
    side.write_text("{not json")
    assert decode_bytes(data, cfg, tmp_path) == first and len(calls) == 3
    given = decode_bytes(data, cfg, tmp_path / "other", sha256="ab" * 32)  # a caller-supplied sha
    assert given.sha256 == "ab" * 32 and Path(given.path).name == "ab" * 32 + ".jpg"


def test_decode_refusal_reasons(tmp_path: Path) -> None:
    cfg = IngestConfig()
    assert (
        _refusal(decode_bytes, b"%PDF-1.4\n%%EOF\n", cfg, tmp_path, name="dir/report.pdf")
        == "not an image: a PDF document (named 'report.pdf')"
    )
    assert _refusal(decode_bytes, b"%PDF-1.4\n", cfg, tmp_path) == "not an image: a PDF document"
    jpeg = _jpeg(skdata.rocket())
    assert _refusal(decode_bytes, jpeg[:3000], cfg, tmp_path).startswith("truncated JPEG file: ")
    png = _png(skdata.coffee())
    assert _refusal(decode_bytes, png[: len(png) // 3], cfg, tmp_path).startswith("truncated PNG file: ")
    small = _png(skdata.astronaut()[:64, :64])
    ihdr = struct.pack(">II", 70_000, 70_000) + small[24:29]  # the header claims 4.9 gigapixels
    bomb = small[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + small[33:]
    assert "decompression bomb" in _refusal(decode_bytes, bomb, cfg, tmp_path)
    ihdr = struct.pack(">II", 7000, 7000) + small[24:29]  # 49 MP: over our cap, under Pillow's
    bomb = small[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + small[33:]
    assert _refusal(decode_bytes, bomb, cfg, tmp_path).startswith(
        "possible decompression bomb: header claims 7000x7000"
    )
    assert _refusal(decode_bytes, b"", cfg, tmp_path) == "empty file (0 bytes)"


# -- base: JSON, paths, walking ---------------------------------------------------------------------------
def test_json_helpers(tmp_path: Path) -> None:
    assert base.loads_json('{"a": [1]}') == {"a": [1]}
    with pytest.raises(base.JSONTooDeep, match="JSON nested too deeply"):
        base.loads_json("[" * 100_000 + "]" * 100_000)
    p = tmp_path / "x.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"k": "v"}).encode())  # a BOM is fine
    assert base.load_json_file(p) == {"k": "v"}
    p.write_text("{broken")
    with pytest.raises(ValueError, match=r"^source .*x\.json: invalid JSON \("):
        base.load_json_file(p)
    p.write_text("[" * 100_000)
    with pytest.raises(base.JSONTooDeep):
        base.load_json_file(p)
    p.write_bytes(b"0123456789")
    assert base.read_head(p, 4) == b"0123" and base.read_head(p) == b"0123456789"


def test_path_predicates() -> None:
    root = Path("/data/root")
    assert base.is_within(root, root) and base.is_within(root / "a/b", root)
    assert not base.is_within(Path("/data/rootless/x"), root) and not base.is_within(Path("/data"), root)
    assert base.name_ok("café.jpg") and not base.name_ok(os.fsdecode(b"bad\xff.jpg"))
    assert base.printable(os.fsdecode(b"bad\xff.jpg")) == "bad\ufffd.jpg"
    inside = ["a.jpg", "sub/a.jpg", "a/../b.jpg", "..hidden.jpg", "a/.."]
    outside = [
        "",
        "/etc/passwd",
        "..",
        "../x.jpg",
        "a/../../x.jpg",
        "a\x00.jpg",
        "http://x/y.jpg",
        "s3://b/k",
    ]
    assert all(base.stays_inside(v) for v in inside)
    assert not any(base.stays_inside(v) for v in outside)


def test_check_inside_and_listed_paths(tmp_path: Path) -> None:
    root = (tmp_path / "root").resolve()
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.jpg").write_bytes(b"x")
    (tmp_path / "secret.jpg").write_bytes(b"s")
    (root / "link.jpg").symlink_to(root / "sub" / "a.jpg")
    (root / "escape.jpg").symlink_to(tmp_path / "secret.jpg")
    (root / "dangling.jpg").symlink_to(root / "nope.jpg")
    (root / "loop.jpg").symlink_to(root / "loop.jpg")
    follow, nofollow = IngestConfig(), IngestConfig(follow_symlinks_inside_root=False)
    ci = base.check_inside
    assert ci(root / "sub" / "a.jpg", root, False) == (root / "sub" / "a.jpg", None)
    assert ci(root / "link.jpg", root, True) == (root / "sub" / "a.jpg", None)
    assert ci(root / "link.jpg", root, False) == (
        None,
        "symlink not followed (follow_symlinks_inside_root is off)",
    )
    assert ci(root / "escape.jpg", root, True) == (
        None,
        f"symlink leaves the source root (-> {tmp_path / 'secret.jpg'})",
    )
    assert ci(root / "dangling.jpg", root, True) == (
        None,
        f"dangling symlink (target {root / 'nope.jpg'} does not exist)",
    )
    assert ci(root / "missing.jpg", root, True) == (None, "file not found")
    assert ci(root / "loop.jpg", root, True)[1] in (
        "symlink loop",
        f"dangling symlink (target {root / 'loop.jpg'} does not exist)",
    )
    rl = base.resolve_listed_path
    assert rl("link.jpg", root, root, follow) == (root / "sub" / "a.jpg", "link.jpg", None)
    assert rl("escape.jpg", root, root, follow)[0::2] == (
        None,
        f"symlink leaves the source root (-> {tmp_path / 'secret.jpg'})",
    )
    assert rl("sub/a.jpg", root, root, follow) == (root / "sub" / "a.jpg", "sub/a.jpg", None)
    assert rl(" a.jpg ", root / "sub", root, follow) == (root / "sub" / "a.jpg", "sub/a.jpg", None)
    assert rl(str(root / "sub" / "a.jpg"), tmp_path, root, follow)[1] == "sub/a.jpg"
    assert (
        rl("link.jpg", root, root, nofollow)[2] == "symlink not followed (follow_symlinks_inside_root is off)"
    )
    assert rl("https://x/y.jpg", root, root, follow) == (
        None,
        "https://x/y.jpg",
        "remote URLs are not fetched; download the image and list its local path",
    )
    assert rl("a\x00b.jpg", root, root, follow) == (
        None,
        "a\\0b.jpg",
        "path contains a NUL byte or invalid UTF-8",
    )
    bad = os.fsdecode(b"b\xffd.jpg")
    assert rl(bad, root, root, follow) == (None, "b\ufffdd.jpg", "path contains a NUL byte or invalid UTF-8")
    assert rl("../secret.jpg", root, root, follow) == (
        None,
        "../secret.jpg",
        f"path '../secret.jpg' leaves the source root {root}",
    )


def test_walk_files_order_depth_and_hidden(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "b" / "c").mkdir(parents=True)
    (root / "a").mkdir()
    (root / ".hidden").mkdir()
    for rel in ("z.jpg", "m.jpg", "b/x.jpg", "b/c/y.jpg", "a/w.jpg", ".dot.jpg", ".hidden/h.jpg"):
        (root / rel).write_bytes(b"x")
    (root / "link.jpg").symlink_to(root / "z.jpg")
    got = [(rel, reason) for _p, rel, reason in base.walk_files(root)]
    # files of a folder first, then its subfolders in sorted order; no hidden names, no symlinks
    assert got == [
        ("m.jpg", None),
        ("z.jpg", None),
        ("a/w.jpg", None),
        ("b/x.jpg", None),
        ("b/c/y.jpg", None),
    ]
    paths = [p for p, _rel, _r in base.walk_files(root)]
    assert paths[0] == root / "m.jpg"
    # depth: exactly max_depth levels are walked, one more is refused with a reason
    assert [(rel, r) for _p, rel, r in base.walk_files(root, max_depth=2)] == got
    assert [(rel, r) for _p, rel, r in base.walk_files(root, max_depth=1)] == [
        ("m.jpg", None),
        ("z.jpg", None),
        ("a/w.jpg", None),
        ("b/x.jpg", None),
        ("b/c/", "folder nested deeper than 1 levels; not walked"),
    ]
    assert list(base.walk_files(tmp_path / "none")) == [
        (None, ".", "cannot list directory: No such file or directory")
    ]
    assert base.MAX_FOLDER_DEPTH == 64


def test_colour_profiles() -> None:
    from PIL import ImageCms

    rgb = Image.fromarray(skdata.chelsea()[:64, :64])
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    tagged = rgb.copy()
    tagged.info["icc_profile"] = srgb
    assert decode.normalise_to_rgb(tagged) is tagged  # already sRGB: no conversion
    broken = rgb.convert("CMYK")
    broken.info["icc_profile"] = b"not a profile"
    out = decode.normalise_to_rgb(broken)  # a broken profile falls back to the plain conversion
    assert out.mode == "RGB" and np.array_equal(
        np.asarray(out), np.asarray(rgb.convert("CMYK").convert("RGB"))
    )
    lab = rgb.copy()
    lab.info["icc_profile"] = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    out = decode.normalise_to_rgb(lab)  # a profile that does not fit the pixels: plain conversion too
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(rgb))


# -- second pass: what the first mutation run of this file left alive ------------------------------------
def test_read_file_capped_os_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = IngestConfig()
    one = tmp_path / "one.bin"
    one.write_bytes(b"x")
    assert decode.read_file_capped(one, cfg) == b"x"  # one byte is not empty

    def deny(*_a, **_k):
        raise PermissionError(13, "Permission denied")

    def eio(*_a, **_k):
        raise OSError(5, "Input/output error")

    real_stat = os.stat
    monkeypatch.setattr(decode.os, "stat", deny)
    assert _refusal(decode.read_file_capped, one, cfg) == "permission denied"
    monkeypatch.setattr(decode.os, "stat", eio)
    assert _refusal(decode.read_file_capped, one, cfg) == "cannot stat file: Input/output error"
    monkeypatch.setattr(decode.os, "stat", real_stat)
    monkeypatch.setattr(decode, "open", deny, raising=False)  # module globals shadow the builtin
    assert _refusal(decode.read_file_capped, one, cfg) == "permission denied"
    monkeypatch.setattr(decode, "open", eio, raising=False)
    assert _refusal(decode.read_file_capped, one, cfg) == "cannot read file: Input/output error"


def test_geometry_zero_and_one_pixel_sides() -> None:
    cfg = IngestConfig(min_side=1, max_aspect=100.0)
    assert _refusal(decode._check_geometry, 50, 0, cfg) == "invalid image size 50x0"
    decode._check_geometry(1, 50, cfg)  # one pixel is a size, not an invalid one
    decode._check_geometry(50, 1, cfg)


def test_rescale_range_edges() -> None:
    r = decode._rescale_to_uint8
    assert r(np.array([0.0, 100.0]), None).tolist() == [0, 100]  # starts at 0: already 8-bit
    assert r(np.array([10.0, 256.0]), None).tolist() == [0, 255]  # one past 255: stretched
    assert r(np.array([-1000.0, -2.0, 0.0]), None).tolist() == [0, 254, 255]


def test_sidecar_without_a_version_is_decoded_again(tmp_path: Path) -> None:
    cfg = IngestConfig()
    data = _jpeg(skdata.chelsea())
    first = decode_bytes(data, cfg, tmp_path)
    side = tmp_path / f"{first.sha256}.json"
    raw = json.loads(side.read_text())
    del raw["v"]
    side.write_text(json.dumps(raw))
    assert decode_bytes(data, cfg, tmp_path) == first
    assert json.loads(side.read_text())["v"] == 2  # rewritten


def test_decode_bytes_turns_parser_failures_into_refusals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    cfg = IngestConfig()
    data = _jpeg(skdata.chelsea()[:80, :80])

    def failing(exc: BaseException):
        def f(*_a, **_k):
            raise exc

        return f

    monkeypatch.setattr(decode, "_decode_uncached", failing(MemoryError()))
    assert _refusal(decode_bytes, data, cfg, tmp_path) == "not enough memory to decode this image"
    monkeypatch.setattr(decode, "_decode_uncached", failing(Image.DecompressionBombError("too big")))
    assert (
        _refusal(decode_bytes, data, cfg, tmp_path)
        == "possible decompression bomb (Pillow refused it: too big)"
    )
    monkeypatch.setattr(decode, "_decode_uncached", failing(ValueError("bad huffman table")))
    assert (
        _refusal(decode_bytes, data, cfg, tmp_path)
        == "corrupt or unsupported image: ValueError: bad huffman table"
    )
    full = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(decode, "_decode_uncached", failing(full))
    with pytest.raises(OSError) as ei:  # a full disk stops the run; it is not this image's fault
        decode_bytes(data, cfg, tmp_path)
    assert ei.value is full


def test_decode_file_reads_once_and_names_refusals(tmp_path: Path) -> None:
    cfg = IngestConfig()
    photo = tmp_path / "cat.jpg"
    photo.write_bytes(_jpeg(skdata.chelsea()))
    dec = decode.decode_file(photo, cfg, tmp_path / "cache")
    assert dec.sha256 == decode.sha256_hex(photo.read_bytes()) and Path(dec.path).parent == tmp_path / "cache"
    pdf = tmp_path / "sub" / "report.pdf"
    pdf.parent.mkdir()
    pdf.write_bytes(b"%PDF-1.4\n%%EOF\n")
    assert (
        _refusal(decode.decode_file, str(pdf), cfg, tmp_path / "cache")
        == "not an image: a PDF document (named 'report.pdf')"
    )
    assert _refusal(
        decode.decode_file, tmp_path / "none.jpg", IngestConfig(max_file_bytes=10), tmp_path
    ).startswith("file not found")


@pytest.mark.parametrize("brand", ["heic", "heix", "mif1", "msf1", "hevc", "heim", "heis"])
def test_every_heif_brand_is_named(brand: str) -> None:
    data = b"\x00\x00\x00\x18ftyp" + brand.encode() + b"\x00\x00\x00\x00"
    assert decode.describe_non_image(data) == "a HEIC/HEIF image (unsupported; convert it to JPEG)"


def test_describe_odd_headers() -> None:
    # a brand that is not ASCII is shown, not a crash
    got = decode.describe_non_image(b"\x00\x00\x00\x18ftyp\xff\xfeab\x00")
    assert got == "an ISO media file (brand '\ufffd\ufffdab'), e.g. a video"
    assert decode.describe_non_image(b"X%PDF-1.4") == "a text file"  # only BOM and blanks are skipped


def test_walk_files_goes_on_after_a_refused_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "r"
    (root / "a" / "deep").mkdir(parents=True)
    (root / "a" / "deep" / "x.jpg").write_bytes(b"x")
    (root / "b").mkdir()
    (root / "b" / "y.jpg").write_bytes(b"y")
    (root / "c").mkdir()
    (root / "c" / "z.jpg").write_bytes(b"z")
    (root / "linked").symlink_to(root / "b", target_is_directory=True)  # not walked
    got = [(rel, reason) for _p, rel, reason in base.walk_files(root, max_depth=1)]
    assert got == [
        ("a/deep/", "folder nested deeper than 1 levels; not walked"),
        ("b/y.jpg", None),
        ("c/z.jpg", None),
    ]
    real_scandir = os.scandir

    def flaky(path):
        if Path(path).name == "b":
            raise OSError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(base.os, "scandir", flaky)
    got = [(rel, reason) for _p, rel, reason in base.walk_files(root)]
    assert got == [
        ("a/deep/x.jpg", None),
        ("b/", "cannot list directory: Permission denied"),
        ("c/z.jpg", None),
    ]


def test_read_head_default_and_json_message(tmp_path: Path) -> None:
    p = tmp_path / "big.bin"
    p.write_bytes(b"a" * 70_000)
    assert len(base.read_head(p)) == 65536
    with pytest.raises(base.JSONTooDeep, match=r"^JSON nested too deeply \(hostile or broken document\)$"):
        base.loads_json("[" * 100_000)


def test_mode_i_and_f_scaling() -> None:
    def through(arr: np.ndarray, mode: str) -> list[int]:
        return np.asarray(decode.normalise_to_rgb(Image.fromarray(arr, mode)))[..., 0].ravel().tolist()

    i32 = np.int32
    assert through(np.array([[0, 255]], i32), "I") == [0, 255]  # 8-bit range kept as is
    assert through(np.array([[0, 256]], i32), "I") == [0, 1]  # one past: a 16-bit range
    assert through(np.array([[0, 1000]], i32), "I") == [0, 4]
    assert through(np.array([[0, 51529]], i32), "I") == [0, 201]  # 200.502: the full scale is 65535
    assert through(np.array([[1000, 65535]], i32), "I") == [4, 255]
    assert through(np.array([[1000, 65536]], i32), "I") == [0, 255]  # beyond 16 bits: stretched
    assert through(np.array([[-1.0, 0.0, 1.0]], np.float32), "F") == [0, 128, 255]
    assert through(np.array([[0.0, 1.0]], np.float32), "F") == [0, 1]  # within 0..255: taken as 8-bit
    grey16 = Image.fromarray(np.array([[0, 51529, 65535]], np.uint16))
    assert grey16.mode.startswith("I;16")
    assert np.asarray(decode.normalise_to_rgb(grey16))[..., 0].ravel().tolist() == [0, 201, 255]


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "RGBa", "La"])
def test_every_alpha_mode_is_composited_onto_white(mode: str) -> None:
    im = Image.new(mode, (4, 4))  # all zero: fully transparent black
    if mode == "PA":
        im.putpalette([0, 0, 0] * 256)
    out = decode.normalise_to_rgb(im)
    assert out.mode == "RGB" and np.asarray(out).min() == 255


def test_palettes() -> None:
    rgba_pal = Image.new("P", (4, 4))
    rgba_pal.putpalette([0, 0, 0, 0] * 256, "RGBA")  # transparent through the palette itself
    assert np.asarray(decode.normalise_to_rgb(rgba_pal)).min() == 255
    plain = Image.new("P", (4, 4))
    plain.putpalette([10, 20, 30] * 256)
    out = decode.normalise_to_rgb(plain)
    assert out.mode == "RGB" and np.asarray(out)[0, 0].tolist() == [10, 20, 30]


@pytest.mark.parametrize("fmt", ["TGA", "PCX", "SGI", "ICO"])
def test_formats_outside_the_safe_list_are_not_parsed(tmp_path: Path, fmt: str) -> None:
    buf = io.BytesIO()
    Image.fromarray(skdata.chelsea()[:128, :128]).save(buf, format=fmt)
    assert fmt not in decode.safe_formats()
    assert _refusal(decode_bytes, buf.getvalue(), IngestConfig(), tmp_path).startswith("not an image: ")


def test_copy_orientation_hash_and_quality(tmp_path: Path) -> None:
    import imagehash

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    buf = io.BytesIO()
    Image.fromarray(skdata.chelsea()).save(buf, format="JPEG", quality=90, exif=exif.tobytes())
    dec = decode_bytes(buf.getvalue(), IngestConfig(), tmp_path)
    assert (dec.width, dec.height) == (300, 451)  # stored 451x300, shown upright
    with Image.open(dec.path) as im:
        assert im.size == (300, 451)
        ref = io.BytesIO()
        im.convert("RGB").save(ref, format="JPEG", quality=95)
        with Image.open(ref) as q95:
            assert im.quantization == q95.quantization  # re-encoded at quality 95
    png = decode_bytes(_png(skdata.coffee()), IngestConfig(), tmp_path)
    with Image.open(png.path) as im:
        assert png.phash == str(imagehash.phash(im))  # the hash of the normalised copy


def test_corrupt_data_reason(tmp_path: Path) -> None:
    png = bytearray(_png(skdata.coffee()))
    idat = png.index(b"IDAT")
    png[idat + 40 : idat + 400] = bytes(360)  # garbage inside the compressed stream, length intact
    reason = _refusal(decode_bytes, bytes(png), IngestConfig(), tmp_path)
    assert reason.startswith(("corrupt PNG data: ", "truncated PNG file: ")) and not reason.endswith(": ")


# -- third pass: colour management, odd EXIF, decoder failures without a message ---------------------------
def _swapped_rgb_profile() -> bytes:
    """A real RGB display profile whose red and blue primaries are exchanged: lcms's sRGB profile with
    its rXYZ and bXYZ tag entries swapped and its name changed (so it is not taken for sRGB). Pixels
    tagged with it are colour-managed to sRGB as the same image with red and blue exchanged."""
    from PIL import ImageCms

    b = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    entries = {bytes(b[132 + 12 * i : 136 + 12 * i]): 132 + 12 * i + 4 for i in range(b[131])}
    r_at, b_at = entries[b"rXYZ"], entries[b"bXYZ"]
    b[r_at : r_at + 4], b[b_at : b_at + 4] = b[b_at : b_at + 4], b[r_at : r_at + 4]
    return bytes(b).replace("sRGB".encode("utf-16-be"), "BGRs".encode("utf-16-be"))


def _s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def _cmyk_profile() -> bytes:
    """A minimal ICC v2 printer profile, CMYK -> Lab through one lut8 A2B0 table: grey whose lightness
    is 100 at C = 0 and 0 at C = 100%, whatever M, Y and K are (far from Pillow's naive conversion)."""
    corners = [255 if c == 0 else 0 for c in (0, 1) for _m in (0, 1) for _y in (0, 1) for _k in (0, 1)]
    clut = b"".join(bytes([lightness, 128, 128]) for lightness in corners)
    ramp = bytes(range(256))
    identity = b"".join(_s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
    lut = b"mft1" + b"\0" * 4 + bytes([4, 3, 2, 0]) + identity + ramp * 4 + clut + ramp * 3
    text = b"test CMYK\0"
    desc = b"desc" + b"\0" * 4 + struct.pack(">I", len(text)) + text + b"\0" * 78
    d50 = _s15(0.9642) + _s15(1.0) + _s15(0.8249)
    tags = [(b"desc", desc), (b"wtpt", b"XYZ " + b"\0" * 4 + d50), (b"A2B0", lut)]
    off = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for sig, data in tags:
        body += b"\0" * (-(off + len(body)) % 4)
        table += struct.pack(">4sII", sig, off + len(body), len(data))
        body += data
    # size, CMM, version 2.1, class, colour space, PCS, date, signature, flags etc., illuminant, the rest
    fields = (b"lcms", bytes([2, 0x10, 0, 0]), b"prtr", b"CMYK", b"Lab ", b"", b"acsp", b"", d50, b"")
    header = struct.pack(">I4s4s4s4s4s12s4s28s12s48s", off + len(body), *fields)
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def test_rgb_with_a_foreign_profile_is_colour_managed(tmp_path: Path) -> None:
    arr = skdata.chelsea()[:72, :96]
    tagged = Image.fromarray(arr)
    tagged.info["icc_profile"] = _swapped_rgb_profile()
    out = np.asarray(decode.normalise_to_rgb(tagged)).astype(int)
    assert np.abs(out - arr[..., ::-1].astype(int)).max() <= 1  # red and blue exchanged
    # the same through a real PNG file: the copy holds the managed pixels (and no profile)
    dec = decode_bytes(_png(arr, icc_profile=_swapped_rgb_profile()), IngestConfig(), tmp_path)
    with Image.open(dec.path) as im:
        assert "icc_profile" not in im.info
        assert np.abs(np.asarray(im).astype(int) - arr[..., ::-1].astype(int)).max() <= 1


def test_cmyk_with_a_profile_is_colour_managed(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (80, 80))
    cmyk.paste((0, 0, 0, 255), (0, 0, 40, 80))  # black ink only: white under this profile
    cmyk.paste((255, 0, 0, 0), (40, 0, 80, 80))  # full cyan: black under this profile
    naive = np.asarray(cmyk.convert("RGB"))
    assert naive[0, 0].tolist() == [0, 0, 0] and naive[0, 79].tolist() == [0, 255, 255]
    cmyk.info["icc_profile"] = _cmyk_profile()
    out = np.asarray(decode.normalise_to_rgb(cmyk)).astype(int)
    assert out.shape == (80, 80, 3)
    assert np.abs(out[:, :40] - 255).max() <= 1 and out[:, 40:].max() <= 1
    buf = io.BytesIO()
    cmyk.save(buf, format="TIFF", icc_profile=_cmyk_profile())
    dec = decode_bytes(buf.getvalue(), IngestConfig(), tmp_path)
    assert (dec.orig_format, dec.orig_mode) == ("TIFF", "CMYK")
    with Image.open(dec.path) as im:
        px = np.asarray(im).astype(int)
    assert np.abs(px[:, :40] - 255).max() <= 1 and px[:, 40:].max() <= 1


def test_palette_without_transparency_is_converted_plainly() -> None:
    rgb = Image.fromarray(skdata.chelsea()[:32, :32])
    pal = rgb.quantize(colors=16)
    assert "transparency" not in pal.info and pal.palette is not None and pal.palette.mode == "RGB"
    out = decode.normalise_to_rgb(pal)
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(pal.convert("RGB")))


def test_malformed_exif_keeps_the_pixels_as_stored(tmp_path: Path) -> None:
    """EXIF with orientation 6 (rotate) and a Make tag stored as a FLOAT: Pillow's exif_transpose raises
    on it; the photo is kept, unrotated, rather than refused."""
    from PIL import ImageOps

    ifd = b"MM\x00*\x00\x00\x00\x08" + struct.pack(">H", 2)
    ifd += struct.pack(">HHI", 0x010F, 11, 1) + b"\x77\x98\x2c\x91"  # Make as FLOAT
    ifd += struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0) + b"\0\0\0\0"  # Orientation 6
    buf = io.BytesIO()
    Image.fromarray(skdata.chelsea()[:72, :96]).save(buf, format="JPEG", exif=b"Exif\x00\x00" + ifd)
    with Image.open(io.BytesIO(buf.getvalue())) as im, pytest.raises(AttributeError):
        ImageOps.exif_transpose(im)
    dec = decode_bytes(buf.getvalue(), IngestConfig(), tmp_path)
    assert (dec.width, dec.height) == (96, 72)


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (EOFError(), "truncated PNG file: unexpected end of data"),
        (EOFError("no more data"), "truncated PNG file: no more data"),
        (OSError(), "corrupt PNG data: OSError"),
        (ValueError(), "corrupt PNG data: ValueError"),
        (SyntaxError("bad chunk"), "corrupt PNG data: bad chunk"),
    ],
)
def test_decoder_failures_without_a_message_are_still_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: Exception, reason: str
) -> None:
    """A plugin may raise a bare exception while decoding: the refusal still says what happened."""
    from PIL import ImageFile

    def fail(self: ImageFile.ImageFile) -> None:
        raise exc

    monkeypatch.setattr(ImageFile.ImageFile, "load", fail)
    data = _png(np.full((64, 64, 3), 7, np.uint8))
    assert _refusal(decode_bytes, data, IngestConfig(), tmp_path) == reason


def test_describe_non_image_reads_4_kb_and_finds_html_in_the_first_1024_bytes() -> None:
    assert decode.describe_non_image(b"a" * 4096 + b"\x00" * 8) == "a text file"  # only 4 KB are read
    assert (
        decode.describe_non_image(b"a" * 4095 + b"\x00")
        == "unrecognised binary data (starts with 61 61 61 61 61 61 61 61)"
    )
    assert decode.describe_non_image(b"x" * 1019 + b"<html>") == "an HTML document"
    assert decode.describe_non_image(b"x" * 1020 + b"<html>") == "a text file"


def test_walk_files_skips_an_entry_it_cannot_stat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry that vanishes or cannot be stat'ed between listing and checking is skipped; the rest of
    the folder is still walked."""
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / name).write_bytes(b"x")
    real_scandir = os.scandir

    class Vanished:
        def __init__(self, entry: os.DirEntry[str]) -> None:
            self.name, self.path = entry.name, entry.path

        def is_dir(self, follow_symlinks: bool = True) -> bool:
            raise FileNotFoundError(2, "No such file or directory")

        is_file = is_dir

    class Listing:
        def __init__(self, path: Path) -> None:
            self.it = real_scandir(path)

        def __enter__(self) -> list[object]:
            entries = list(self.it)
            return [Vanished(e) if e.name == "a.jpg" else e for e in entries]

        def __exit__(self, *exc: object) -> None:
            self.it.close()

    monkeypatch.setattr(base.os, "scandir", Listing)
    assert [rel for _p, rel, _r in base.walk_files(tmp_path)] == ["b.jpg", "c.jpg"]

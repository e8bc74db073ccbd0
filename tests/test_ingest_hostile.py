"""Regression tests for the hardening issue's ingest findings (issue 9 items 1-4): deep nesting,
a hostile COCO entry, metadata in normalised copies, and control characters in refusal reasons."""

from __future__ import annotations

import io
import json
import logging
import os
import struct
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin
from skimage import data as skdata

from rmskit.config import IngestConfig
from rmskit.ingest.sources import iter_sources, source_exists
from rmskit.records import ImageRecord, Rejection
from rmskit.textsafe import EscapingFilter, EscapingFormatter, safe_text

SECRET = b"SECRETMARK-7f3a"


def run(sources: list[str | Path], tmp_path: Path):
    items = list(iter_sources([str(s) for s in sources], IngestConfig(), tmp_path / "cache"))
    recs = {i.source_path: i for i in items if isinstance(i, ImageRecord)}
    rejs = {i.path: i.reason for i in items if isinstance(i, Rejection)}
    return recs, rejs


def jpeg(arr=None, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(skdata.chelsea() if arr is None else arr).save(buf, format="JPEG", **kw)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# 1. deep nesting never crashes a build


def test_deeply_nested_json_source_is_one_refusal_and_the_run_goes_on(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(jpeg())
    recs, rejs = run([deep, photos], tmp_path)
    assert list(recs) == ["cat.jpg"]
    assert "nested too deeply" in rejs["deep.json"]


def test_deeply_nested_jsonl_line_is_refused_and_other_lines_are_ingested(tmp_path):
    (tmp_path / "a.jpg").write_bytes(jpeg())
    manifest = tmp_path / "m.jsonl"
    deep_line = '{"a":' * 50_000 + "1" + "}" * 50_000
    manifest.write_text(json.dumps({"path": "a.jpg"}) + "\n" + deep_line + "\n")
    recs, rejs = run([manifest], tmp_path)
    assert list(recs) == ["a.jpg"]
    assert "nested too deeply" in rejs["m.jsonl:2"]
    # a manifest whose *first* line is the deep one is still read line by line
    first = tmp_path / "first.jsonl"
    first.write_text(deep_line + "\n" + json.dumps({"path": "a.jpg", "caption": "c"}) + "\n")
    recs, rejs = run([first], tmp_path)
    assert "nested too deeply" in rejs["first.jsonl:1"]
    assert list(recs) == ["a.jpg"]


def _make_deep(parent: Path, levels: int) -> Path:
    """`levels` nested folders named 'd', made with directory fds (os.makedirs recurses per level)."""
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir("d", dir_fd=fd)
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        with open(os.open("x.jpg", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as fh:
            fh.write(b"not reached")
    finally:
        os.close(fd)
    return parent


def _remove_deep(parent: Path, levels: int) -> None:
    """shutil.rmtree recurses per level too; remove bottom-up instead."""
    paths = [str(parent) + "/d" * i for i in range(1, levels + 1)]
    os.unlink(paths[-1] + "/x.jpg")
    for p in reversed(paths):
        os.rmdir(p)


@pytest.fixture()
def deep_tree(tmp_path):
    """photos/a/d/d/.../x.jpg 1,500 levels deep, then photos/z/cat.jpg: the deep branch sorts first,
    so both the parquet-folder sniff and the folder walker meet it before the photo."""
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    _make_deep(root / "a", 1500)
    (root / "z").mkdir()
    (root / "z" / "cat.jpg").write_bytes(jpeg())
    yield root
    _remove_deep(root / "a", 1500)


def test_folder_1500_levels_deep_is_refused_with_a_reason(deep_tree, tmp_path):
    recs, rejs = run([deep_tree], tmp_path)
    assert list(recs) == ["z/cat.jpg"]
    [(where, reason)] = rejs.items()
    assert where.startswith("a/d/d/") and "nested deeper than" in reason
    assert source_exists(str(deep_tree))


# ---------------------------------------------------------------------------------------------
# 2. one hostile COCO entry does not decide the image root


def test_hostile_coco_entry_does_not_hide_the_real_images(tmp_path):
    coco = tmp_path / "coco"
    (coco / "images").mkdir(parents=True)
    (coco / "images" / "a.jpg").write_bytes(jpeg())
    (tmp_path / "secret.txt").write_text("outside the dataset")  # what '../secret.txt' reaches
    doc = {
        "images": [
            {"id": 1, "file_name": "a.jpg"},
            {"id": 2, "file_name": "../secret.txt"},
            {"id": 3, "file_name": "../../../etc/passwd"},
        ],
        "annotations": [{"image_id": 1, "caption": "a cat on a blanket"}],
    }
    ann = coco / "annotations.json"
    ann.write_text(json.dumps(doc))
    recs, rejs = run([ann], tmp_path)
    assert list(recs) == ["a.jpg"]
    assert recs["a.jpg"].annotation.captions == ["a cat on a blanket"]
    assert recs["a.jpg"].source_root == str((coco / "images").resolve())
    assert set(rejs) == {"../secret.txt", "../../../etc/passwd"}
    assert all("leaves the source root" in r for r in rejs.values())


def test_coco_with_explicit_image_dir_and_source_exists(tmp_path):
    imgs = tmp_path / "elsewhere"
    imgs.mkdir()
    (imgs / "a.jpg").write_bytes(jpeg())
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}]}))
    spec = f"{ann}::{imgs}"
    assert not Path(spec).exists()  # what a naive pre-check would refuse
    assert source_exists(spec) and source_exists("hf://org/name")
    assert not source_exists(f"{ann}::{tmp_path / 'missing'}")
    assert not source_exists(str(tmp_path / "missing.json"))
    recs, rejs = run([spec], tmp_path)
    assert list(recs) == ["a.jpg"] and not rejs


# ---------------------------------------------------------------------------------------------
# 3. normalised copies carry pixels only


def _jpeg_markers(b: bytes) -> list[int]:
    assert b[:2] == b"\xff\xd8"
    out, i = [], 2
    while i < len(b):
        marker = b[i + 1]
        out.append(marker)
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            break
        (length,) = struct.unpack(">H", b[i + 2 : i + 4])
        i += 2 + length
    return out


def _png_chunks(b: bytes) -> list[bytes]:
    out, i = [], 8
    while i < len(b):
        (length,) = struct.unpack(">I", b[i : i + 4])
        out.append(b[i + 4 : i + 8])
        i += 12 + length
    return out


def test_normalised_copies_strip_every_text_bearing_segment(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    chelsea = Image.fromarray(skdata.chelsea())
    exif = chelsea.getexif()
    exif[0x010E] = SECRET.decode() + "-exif"  # ImageDescription
    (src / "comment.jpg").write_bytes(
        jpeg(comment=SECRET + b"-com", exif=exif.tobytes(), xmp=b"<x:xmpmeta>" + SECRET + b"</x:xmpmeta>")
    )
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    (src / "icc.jpg").write_bytes(jpeg(skdata.coffee(), icc_profile=srgb, comment=SECRET))
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", SECRET.decode() + "-tEXt")
    info.add_itxt("Description", SECRET.decode() + "-iTXt")
    info.add_text("Author", SECRET.decode() * 20 + "-zTXt", zip=True)
    buf = io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(buf, format="PNG", pnginfo=info, icc_profile=srgb)
    (src / "text.png").write_bytes(buf.getvalue())
    assert all(SECRET in p.read_bytes() or p.suffix == ".png" for p in src.iterdir())

    recs, rejs = run([src], tmp_path)
    assert not rejs and len(recs) == 3
    for rec in recs.values():
        out = Path(rec.path).read_bytes()
        assert SECRET not in out and b"Exif" not in out and b"ICC_PROFILE" not in out
        if rec.path.endswith(".jpg"):
            markers = _jpeg_markers(out)
            app = [m for m in markers if 0xE0 <= m <= 0xEF or m == 0xFE]
            assert app == [0xE0], [hex(m) for m in markers]  # JFIF APP0 only, no COM
        else:
            assert set(_png_chunks(out)) <= {b"IHDR", b"IDAT", b"IEND"}


# ---------------------------------------------------------------------------------------------
# 4. control characters are escaped in human-facing text


def test_safe_text_escapes_controls_bidi_and_keeps_ordinary_text():
    hostile = "\x1b]0;PWNED\x07\x1b[31mred.jpg"
    shown = safe_text(hostile)
    assert "\x1b" not in shown and "\x07" not in shown
    assert shown == "\\x1b]0;PWNED\\x07\\x1b[31mred.jpg"
    assert safe_text("a\nINFO rmskit: all good") == "a\\nINFO rmskit: all good"
    assert safe_text("x\x9by\x7fz\r\t") == "x\\x9by\\x7fz\\r\\t"  # C1 CSI, DEL
    assert safe_text("photo\u202egpj.exe") == "photo\\u202egpj.exe"  # right-to-left override
    assert safe_text("bad\udcffname") == "bad\\udcffname"  # lone surrogate: printable and encodable
    assert safe_text("café 猫 🐱") == "café 猫 🐱"
    assert safe_text("x" * 50, max_len=10) == "x" * 9 + "…"


def test_log_lines_cannot_be_forged_by_a_file_name():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(EscapingFilter())
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log = logging.getLogger("rmskit.test_forge")
    log.addHandler(handler)
    log.propagate = False
    try:
        name = "cat.jpg\nINFO rmskit: all good"
        log.warning("refused %s (%d bytes)", name, 12)
        log.warning(f"refused {name}")  # an f-string message is escaped too
        log.warning("refused %(name)s", {"name": "\x1b[2Jx"})
    finally:
        log.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines == [
        "WARNING rmskit.test_forge: refused cat.jpg\\nINFO rmskit: all good (12 bytes)",
        "WARNING rmskit.test_forge: refused cat.jpg\\nINFO rmskit: all good",
        "WARNING rmskit.test_forge: refused \\x1b[2Jx",
    ]
    rec = logging.LogRecord("rmskit", logging.INFO, __file__, 1, "name %s", ("a\nb",), None)
    assert EscapingFormatter("%(message)s").format(rec) == "name a\\nb"


def test_refusal_reasons_quoting_untrusted_names_are_escaped(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    outside = tmp_path / "\x1b]0;PWNED\x07\x1b[31mred"
    outside.mkdir()
    (outside / "x.jpg").write_bytes(jpeg())
    os.symlink(outside / "x.jpg", root / "link.jpg")  # the reason names the symlink's target
    (root / "ok.jpg").write_bytes(jpeg(skdata.coffee()))
    recs, rejs = run([root], tmp_path)
    assert list(recs) == ["ok.jpg"]
    assert "leaves the source root" in rejs["link.jpg"]
    assert "\x1b" not in rejs["link.jpg"] and "\\x1b]0;PWNED\\x07" in rejs["link.jpg"]

"""Ingest: safe decoding, hostile inputs, sources sniffed by content, path safety, bundled photos.

Image content is real photographs (scikit-image); hostile files are generated here."""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from skimage import data as skdata

from rmskit.config import IngestConfig
from rmskit.ingest import decode as decode_mod
from rmskit.ingest.bundled import PHOTO_NAMES, materialize_real_photos
from rmskit.ingest.decode import ImageRefused, decode_bytes
from rmskit.ingest.sources import iter_sources
from rmskit.records import ImageRecord, Rejection

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {
        "chelsea": skdata.chelsea(),  # 300x451 RGB
        "coffee": skdata.coffee(),  # 400x600 RGB
        "astronaut": skdata.astronaut(),  # 512x512 RGB
        "camera": skdata.camera(),  # 512x512 grey
        "rocket": skdata.rocket(),  # 427x640 RGB
    }


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def patch_png_size(png: bytes, width: int, height: int) -> bytes:
    """Rewrite the IHDR of a real PNG to claim another size (valid CRC), without allocating it."""
    assert png[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + png[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return png[:16] + ihdr + crc + png[33:]


def load_rgb(path: str) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "RGB"
        return np.asarray(im).astype(np.int16)


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def run(sources: list[str | Path], tmp_path: Path, cfg: IngestConfig | None = None):
    items = list(iter_sources([str(s) for s in sources], cfg or IngestConfig(), tmp_path / "cache"))
    recs = {i.source_path: i for i in items if isinstance(i, ImageRecord)}
    rejs = {i.path: i.reason for i in items if isinstance(i, Rejection)}
    return recs, rejs, items


# ---------------------------------------------------------------------------------------------
# one folder full of hostile and awkward files, ingested once


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, photos):
    base = tmp_path_factory.mktemp("hostile")
    root = base / "photos"
    outside = base / "outside"
    root.mkdir()
    outside.mkdir()
    chelsea = Image.fromarray(photos["chelsea"])
    jpeg = encode(chelsea, "JPEG", quality=90)
    png = encode(Image.fromarray(photos["coffee"]), "PNG")

    # refused
    (root / "empty.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(encode(Image.fromarray(photos["rocket"]), "JPEG")[:6000])
    (root / "truncated.png").write_bytes(png[: len(png) // 3])
    (root / "random.jpg").write_bytes(
        np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes()
    )
    (root / "page.jpg").write_text("<!DOCTYPE html>\n<html><body><img src='cat.jpg'></body></html>\n")
    (root / "notes.jpg").write_text("these are my holiday notes, not a picture\n" * 20)
    small_png = encode(Image.fromarray(photos["astronaut"][:64, :64]), "PNG")
    (root / "bomb.png").write_bytes(patch_png_size(small_png, 100_000, 100_000))  # Pillow's own limit
    (root / "bomb_moderate.png").write_bytes(patch_png_size(small_png, 7000, 7000))  # 49 MP > our 40 MP cap
    (root / "pixel.png").write_bytes(encode(chelsea.resize((1, 1)), "PNG"))
    (root / "strip.png").write_bytes(encode(chelsea.resize((1200, 100)), "PNG"))
    (root / "report.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n")
    (root / "captions.csv").write_text("id,text\n1,a cat\n")
    (outside / "secret.jpg").write_bytes(encode(Image.fromarray(photos["astronaut"]), "JPEG"))
    (outside / "dir").mkdir()
    (outside / "dir" / "inner.jpg").write_bytes(encode(Image.fromarray(photos["coffee"]), "JPEG"))
    os.symlink(outside / "secret.jpg", root / "escape.jpg")
    os.symlink(outside / "dir", root / "escape_dir")
    os.symlink("../outside/secret.jpg", root / "escape_relative.jpg")
    os.symlink(root / "missing.jpg", root / "dangling.jpg")
    os.symlink(".", root / "loop")  # a directory symlink back to the root must not loop forever
    os.mkfifo(root / "pipe.jpg")  # reading it would block forever
    unsupported: set[str] = set()
    try:  # some file systems (APFS) refuse names that are not UTF-8
        (root / os.fsdecode(b"bad\xffname.jpg")).write_bytes(jpeg[::-1])
    except OSError:
        unsupported.add("bad\ufffdname.jpg")

    # accepted after normalisation
    (root / "cmyk.jpg").write_bytes(
        encode(Image.fromarray(photos["coffee"]).convert("CMYK"), "JPEG", quality=95)
    )
    cam16 = photos["camera"].astype(np.uint16) * 257
    (root / "grey16.png").write_bytes(encode(Image.fromarray(cam16), "PNG"))
    pal = Image.fromarray(photos["rocket"][::2, ::2].copy()).quantize(
        colors=63, method=Image.Quantize.FASTOCTREE
    )
    idx = np.asarray(pal).copy()
    idx[:, :100] = 63  # an unused index, declared transparent
    pal2 = Image.fromarray(idx, "P")
    pal2.putpalette(pal.getpalette()[: 63 * 3] + [0, 0, 0])
    (root / "palette.png").write_bytes(encode(pal2, "PNG", transparency=63))
    rgba = np.dstack([photos["astronaut"], np.full(photos["astronaut"].shape[:2], 255, np.uint8)])
    rgba[:, :256, 3] = 0  # left half fully transparent
    (root / "alpha.png").write_bytes(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    la = np.dstack([photos["camera"], np.full(photos["camera"].shape, 255, np.uint8)])
    la[:100, :, 1] = 0
    (root / "grey_alpha.png").write_bytes(encode(Image.fromarray(la, "LA"), "PNG"))
    small_coffee = photos["coffee"][::2, ::2].copy()
    frame0 = Image.fromarray(small_coffee).quantize(colors=255, method=Image.Quantize.FASTOCTREE)
    frame1 = Image.fromarray(255 - small_coffee).quantize(colors=255, method=Image.Quantize.FASTOCTREE)
    (root / "anim.gif").write_bytes(
        encode(frame0, "GIF", save_all=True, append_images=[frame1], duration=100, loop=0)
    )
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    (root / "rotated.jpg").write_bytes(encode(chelsea, "JPEG", quality=95, exif=exif.tobytes()))
    sub = root / "sub folder" / "日本"
    sub.mkdir(parents=True)
    rocket = Image.fromarray(photos["rocket"])
    (root / "my photo (1).jpg").write_bytes(encode(rocket, "JPEG"))
    (sub / "café ☕.jpg").write_bytes(encode(rocket.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "JPEG"))
    (root / 'it\'s "quoted".jpeg').write_bytes(encode(rocket.crop((0, 0, 400, 400)), "JPEG"))
    (root / "UPPER.JPG").write_bytes(encode(chelsea.crop((0, 0, 300, 300)), "JPEG"))
    (root / "LOUD.PNG").write_bytes(encode(chelsea.crop((100, 0, 400, 300)), "PNG"))
    (root / "x.JPEG").write_bytes(encode(Image.fromarray(photos["astronaut"][::2, ::2].copy()), "JPEG"))
    # identical bytes under two names
    (root / "copy_a.jpg").write_bytes(jpeg)
    (sub / "copy_b.jpg").write_bytes(jpeg)

    cfg = IngestConfig()
    recs, rejs, items = run([root], base, cfg)
    return {
        "root": root,
        "recs": recs,
        "rejs": rejs,
        "items": items,
        "photos": photos,
        "cache": base / "cache",
        "unsupported": unsupported,
    }


REFUSED = {
    "empty.jpg": "empty",
    "truncated.jpg": "truncated",
    "truncated.png": "truncated",
    "random.jpg": "not an image: unrecognised binary",
    "page.jpg": "not an image: an HTML document (named 'page.jpg')",
    "notes.jpg": "not an image: a text file",
    "bomb.png": "decompression bomb",
    "bomb_moderate.png": "decompression bomb: header claims 7000x7000",
    "pixel.png": "too small: 1x1",
    "strip.png": "extreme aspect ratio 12.0:1",
    "report.pdf": "PDF",
    "captions.csv": "a text file",
    "escape.jpg": "symlink leaves the source root",
    "escape_relative.jpg": "symlink leaves the source root",
    "escape_dir": "symlink leaves the source root",
    "dangling.jpg": "dangling symlink",
    "loop/": "already visited",
    "pipe.jpg": "not a regular file",
    "bad\ufffdname.jpg": "not valid UTF-8",
    "sub folder/日本/copy_b.jpg": "duplicate of copy_a.jpg",
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_bad_input_refused_with_reason(hostile, name):
    if name in hostile["unsupported"]:
        pytest.skip("this file system cannot hold that file name")
    assert name not in hostile["recs"]
    assert name in hostile["rejs"], f"{name} neither accepted nor refused: {sorted(hostile['rejs'])}"
    assert REFUSED[name] in hostile["rejs"][name]


def test_every_file_is_accounted_for_in_sorted_order(hostile):
    paths = [i.source_path if isinstance(i, ImageRecord) else i.path for i in hostile["items"]]
    assert len(paths) == len(set(paths))
    assert not [p for p in paths if p.startswith("escape_dir/")]  # never walked into
    assert len(hostile["recs"]) == 14
    assert set(hostile["rejs"]) == set(REFUSED) - hostile["unsupported"]
    assert paths.index("alpha.png") < paths.index("anim.gif") < paths.index("copy_a.jpg")
    assert all(i.source_root == str(hostile["root"].resolve()) for i in hostile["items"])


def test_records_are_normalised_rgb_in_the_cache(hostile):
    for rec in hostile["recs"].values():
        assert len(rec.sha256) == 64 and len(rec.phash) == 16
        p = Path(rec.path)
        assert p.is_absolute() and p.parent == hostile["cache"].absolute() and p.stem == rec.sha256
        with Image.open(p) as im:
            assert im.mode == "RGB" and im.size == (rec.width, rec.height)
            assert not im.getexif()  # metadata (GPS, orientation) is not carried along
        raw = hostile["root"] / rec.source_path
        assert decode_mod.sha256_hex(raw.read_bytes()) == rec.sha256


def test_cmyk_becomes_faithful_rgb(hostile):
    rec = hostile["recs"]["cmyk.jpg"]
    assert rec.orig_mode == "CMYK"
    assert mad(load_rgb(rec.path), hostile["photos"]["coffee"]) < 6


def test_16_bit_grey_is_rescaled(hostile):
    rec = hostile["recs"]["grey16.png"]
    assert rec.orig_mode.startswith("I")
    out = load_rgb(rec.path)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert mad(out[..., 0], hostile["photos"]["camera"]) < 1  # not dark, not clipped


def test_palette_transparency_becomes_white(hostile):
    rec = hostile["recs"]["palette.png"]
    assert rec.orig_mode == "P"
    out = load_rgb(rec.path)
    assert (out[:, :100] == 255).all()
    assert mad(out[:, 100:], hostile["photos"]["rocket"][::2, ::2][:, 100:]) < 12


def test_alpha_is_composited_onto_white(hostile):
    rec = hostile["recs"]["alpha.png"]
    assert rec.orig_mode == "RGBA"
    out = load_rgb(rec.path)
    assert (out[:, :256] == 255).all()
    assert mad(out[:, 256:], hostile["photos"]["astronaut"][:, 256:]) < 1
    la = load_rgb(hostile["recs"]["grey_alpha.png"].path)
    assert (la[:100] == 255).all() and mad(la[100:, :, 0], hostile["photos"]["camera"][100:]) < 1


def test_animated_gif_takes_first_frame(hostile):
    rec = hostile["recs"]["anim.gif"]
    out = load_rgb(rec.path)
    coffee = hostile["photos"]["coffee"][::2, ::2]
    assert mad(out, coffee) < 20 < mad(out, 255 - coffee)


def test_exif_orientation_is_applied(hostile):
    rec = hostile["recs"]["rotated.jpg"]
    chelsea = hostile["photos"]["chelsea"]  # 300 high, 451 wide
    assert (rec.width, rec.height) == (300, 451)
    out = load_rgb(rec.path)
    assert mad(out, np.rot90(chelsea, k=-1)) < 6 < mad(out, np.rot90(chelsea, k=1))


def test_odd_names_and_upper_case_extensions_are_accepted(hostile):
    for name in (
        "my photo (1).jpg",
        "sub folder/日本/café ☕.jpg",
        'it\'s "quoted".jpeg',
        "UPPER.JPG",
        "LOUD.PNG",
        "x.JPEG",
    ):
        assert name in hostile["recs"], name
    assert hostile["recs"]["LOUD.PNG"].orig_format == "PNG"
    assert Path(hostile["recs"]["LOUD.PNG"].path).suffix == ".png"  # lossless source -> PNG cache
    assert Path(hostile["recs"]["UPPER.JPG"].path).suffix == ".jpg"


def test_identical_files_collapse_to_one_image(hostile):
    shas = [r.sha256 for r in hostile["recs"].values()]
    assert len(shas) == len(set(shas))
    assert "copy_a.jpg" in hostile["recs"]


# ---------------------------------------------------------------------------------------------
# decoding details


def test_bomb_is_refused_without_decoding(photos, tmp_path, monkeypatch):
    loads: list[object] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self) or real_load(self))
    small = encode(Image.fromarray(photos["astronaut"][:64, :64]), "PNG")
    for w, h in ((7000, 7000), (100_000, 100_000), (200_000, 300)):
        with pytest.raises(ImageRefused, match="decompression bomb"):
            decode_bytes(patch_png_size(small, w, h), IngestConfig(), tmp_path)
    # a real photo under a low cap: refused from the header alone
    with pytest.raises(ImageRefused, match="max_pixels is 10,000"):
        decode_bytes(
            encode(Image.fromarray(photos["coffee"]), "JPEG"), IngestConfig(max_pixels=10_000), tmp_path
        )
    assert loads == []
    assert not list(tmp_path.iterdir())
    decode_bytes(small, IngestConfig(), tmp_path)
    assert loads  # the spy does see real decodes


def test_file_size_cap(photos, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "big.jpg").write_bytes(encode(Image.fromarray(photos["coffee"]), "JPEG"))
    recs, rejs, _ = run([tmp_path / "src"], tmp_path, IngestConfig(max_file_bytes=1000))
    assert not recs and "file too large" in rejs["big.jpg"] and "max_file_bytes" in rejs["big.jpg"]


def test_min_side_and_aspect_are_configurable(photos, tmp_path):
    jpg = encode(Image.fromarray(photos["coffee"]), "JPEG")  # 600x400
    with pytest.raises(ImageRefused, match="too small"):
        decode_bytes(jpg, IngestConfig(min_side=401), tmp_path)
    with pytest.raises(ImageRefused, match="aspect"):
        decode_bytes(jpg, IngestConfig(max_aspect=1.2), tmp_path)
    assert decode_bytes(jpg, IngestConfig(min_side=400, max_aspect=1.5), tmp_path).width == 600


def test_rerun_reuses_the_cache_without_decoding(photos, tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("coffee", "astronaut"):
        (src / f"{name}.jpg").write_bytes(encode(Image.fromarray(photos[name]), "JPEG"))
    first, _, _ = run([src], tmp_path)

    def boom(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(decode_mod, "_decode_uncached", boom)
    second, _, _ = run([src], tmp_path)
    assert first == second
    # a tightened config still applies to cached results
    _, rejs, _ = run([src], tmp_path, IngestConfig(min_side=450))
    assert "too small" in rejs["coffee.jpg"]


def test_iterator_is_lazy_and_survives_files_vanishing(photos, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jpg").write_bytes(encode(Image.fromarray(photos["coffee"]), "JPEG"))
    (src / "b.jpg").write_bytes(encode(Image.fromarray(photos["chelsea"]), "JPEG"))
    it = iter_sources([str(src)], IngestConfig(), tmp_path / "cache")
    assert isinstance(next(it), ImageRecord)
    (src / "b.jpg").unlink()  # listed already, gone before it is read
    rej = next(it)
    assert isinstance(rej, Rejection) and rej.path == "b.jpg" and "not found" in rej.reason
    assert next(it, None) is None


def test_symlinks_inside_the_root(photos, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "real.jpg").write_bytes(encode(Image.fromarray(photos["coffee"]), "JPEG"))
    os.symlink("sub/real.jpg", src / "link.jpg")
    recs, rejs, _ = run([src], tmp_path)
    assert list(recs) == ["link.jpg"] and rejs == {"sub/real.jpg": "duplicate of link.jpg (identical bytes)"}
    recs, rejs, _ = run([src], tmp_path / "b", IngestConfig(follow_symlinks_inside_root=False))
    assert list(recs) == ["sub/real.jpg"] and "not followed" in rejs["link.jpg"]


def test_single_image_file_source(photos, tmp_path):
    p = tmp_path / "Photo Of Cat.JPG"
    p.write_bytes(encode(Image.fromarray(photos["chelsea"]), "JPEG"))
    recs, rejs, _ = run([p], tmp_path)
    assert list(recs) == ["Photo Of Cat.JPG"] and recs["Photo Of Cat.JPG"].source_root == str(
        tmp_path.resolve()
    )


def test_unusable_sources_raise_at_call_time(tmp_path):
    cfg = IngestConfig()
    with pytest.raises(ValueError, match="does not exist"):
        iter_sources([str(tmp_path / "nope")], cfg, tmp_path / "c")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="unknown format"):
        iter_sources([str(junk)], cfg, tmp_path / "c")
    table = tmp_path / "table.csv"
    table.write_text("name,score\nx,1\n")
    with pytest.raises(ValueError, match="no path column"):
        iter_sources([str(table)], cfg, tmp_path / "c")
    with pytest.raises(ValueError, match="hf://ORG/NAME"):
        iter_sources(["hf://bad name!"], cfg, tmp_path / "c")


# ---------------------------------------------------------------------------------------------
# manifests, COCO, parquet, HF datasets


@pytest.fixture()
def image_dir(photos, tmp_path) -> Path:
    d = tmp_path / "data" / "imgs"
    d.mkdir(parents=True)
    for name in ("coffee", "chelsea", "astronaut"):
        (d / f"{name}.jpg").write_bytes(encode(Image.fromarray(photos[name]), "JPEG"))
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(encode(Image.fromarray(photos["rocket"]), "JPEG"))
    return d


def test_jsonl_manifest_sniffed_despite_csv_extension(image_dir, tmp_path):
    manifest = tmp_path / "data" / "list.csv"  # misleading extension: content is JSONL
    rows = [
        {
            "path": "imgs/coffee.jpg",
            "captions": ["an espresso", "a red cup"],
            "license": "CC0-1.0",
            "source_url": "https://example.org/coffee",
            "attribution": "R. Michetti",
        },
        {"image": "imgs/chelsea.jpg", "caption": "a cat"},
        {"file_name": str(image_dir / "astronaut.jpg"), "url": "https://example.org/a"},  # absolute, inside
        {"path": "../../../../../../etc/passwd"},
        {"path": "/etc/passwd"},
        {"path": str(tmp_path / "elsewhere.jpg")},
        {"path": "imgs/../../elsewhere.jpg"},
        {"path": "https://example.org/x.jpg"},
        {"path": "imgs/missing.jpg"},
        {"caption": "no path here"},
    ]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    recs, rejs, items = run([manifest], tmp_path)
    assert list(recs) == ["imgs/coffee.jpg", "imgs/chelsea.jpg", "imgs/astronaut.jpg"]
    ann = recs["imgs/coffee.jpg"].annotation
    assert ann.captions == ["an espresso", "a red cup"] and ann.license == "CC0-1.0"
    assert ann.source_url == "https://example.org/coffee" and ann.attribution == "R. Michetti"
    assert recs["imgs/chelsea.jpg"].annotation.captions == ["a cat"]
    assert recs["imgs/astronaut.jpg"].annotation.source_url == "https://example.org/a"
    assert recs["imgs/coffee.jpg"].source_root == str((tmp_path / "data").resolve())
    for bad in (
        "../../../../../../etc/passwd",
        "/etc/passwd",
        str(tmp_path / "elsewhere.jpg"),
        "imgs/../../elsewhere.jpg",
    ):
        assert "leaves the source root" in rejs[bad], bad
    assert "not fetched" in rejs["https://example.org/x.jpg"]
    assert rejs["imgs/missing.jpg"] == "file not found"
    assert "no image path" in rejs["list.csv:10"] and "invalid JSON on line 11" in rejs["list.csv:11"]
    assert len(items) == 11


def test_csv_manifest_sniffed_despite_txt_extension(image_dir, tmp_path):
    manifest = tmp_path / "data" / "manifest.txt"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Path", "caption", "license", "source_url", "attribution"])
        w.writerow(["imgs/coffee.jpg", "an espresso, on a saucer", "CC0", "https://e.org/c", "Rachel"])
        w.writerow(["imgs/chelsea.jpg", '["a cat", "a tabby"]', "", "", ""])
        w.writerow(["../imgs/../../escape.jpg", "", "", "", ""])
    recs, rejs, _ = run([manifest], tmp_path)
    assert recs["imgs/coffee.jpg"].annotation.captions == ["an espresso, on a saucer"]
    assert recs["imgs/coffee.jpg"].annotation.license == "CC0"
    assert recs["imgs/chelsea.jpg"].annotation.captions == ["a cat", "a tabby"]
    assert recs["imgs/chelsea.jpg"].annotation.license is None
    assert "leaves the source root" in rejs["../imgs/../../escape.jpg"]


def test_manifest_with_explicit_image_root(image_dir, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "coffee.jpg"}\n{"path": "../elsewhere.jpg"}\n')
    recs, rejs, _ = run([f"{manifest}::{image_dir}"], tmp_path)
    assert list(recs) == ["coffee.jpg"] and "leaves the source root" in rejs["../elsewhere.jpg"]


def test_json_array_manifest_and_long_jsonl_lines(image_dir, tmp_path):
    arr = tmp_path / "data" / "list.dat"
    arr.write_text(json.dumps([{"path": "imgs/coffee.jpg", "caption": "espresso"}, "junk"], indent=2))
    recs, rejs, _ = run([arr], tmp_path)
    assert recs["imgs/coffee.jpg"].annotation.captions == ["espresso"]
    assert rejs == {"list.dat[1]": "manifest entry is not an object"}
    long = tmp_path / "data" / "long.jsonl"
    long.write_text(json.dumps({"path": "imgs/chelsea.jpg", "caption": "x" * 100_000}) + "\n")
    recs, _, _ = run([long], tmp_path / "b")
    assert list(recs) == ["imgs/chelsea.jpg"]


def _coco_layout(tmp_path: Path, photos) -> Path:
    coco = tmp_path / "coco"
    (coco / "val2017").mkdir(parents=True)
    (coco / "annotations").mkdir()
    names = {"chelsea": "000000000017.jpg", "coffee": "000000000047.jpg"}
    for photo, fn in names.items():
        (coco / "val2017" / fn).write_bytes(encode(Image.fromarray(photos[photo]), "JPEG"))
    images = [
        {"id": 17, "file_name": names["chelsea"], "license": 1, "flickr_url": "http://flickr.example/17"},
        {"id": 47, "file_name": names["coffee"], "license": 2},
        {"id": 99, "file_name": "../../../etc/passwd", "license": 2},
    ]
    lic = [
        {"id": 1, "name": "Attribution License", "url": "http://creativecommons.org/licenses/by/2.0/"},
        {"id": 2, "name": "CC0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"},
    ]
    caps = {
        "images": images,
        "licenses": lic,
        "annotations": [
            {"id": 1, "image_id": 17, "caption": "A cat looking sideways."},
            {"id": 2, "image_id": 17, "caption": "Close up of a tabby cat."},
            {"id": 3, "image_id": 47, "caption": "An espresso on a red saucer."},
        ],
    }
    inst = {
        "images": images,
        "licenses": lic,
        "categories": [
            {"id": 17, "name": "cat", "supercategory": "animal"},
            {"id": 47, "name": "cup", "supercategory": "kitchen"},
            {"id": 50, "name": "spoon", "supercategory": "kitchen"},
        ],
        "annotations": [
            {"id": 10, "image_id": 17, "category_id": 17, "bbox": [0, 0, 451, 300], "area": 1, "iscrowd": 0},
            {
                "id": 11,
                "image_id": 47,
                "category_id": 47,
                "bbox": [172, 18, 236, 287],
                "area": 1,
                "iscrowd": 0,
            },
            {
                "id": 12,
                "image_id": 47,
                "category_id": 50,
                "bbox": [325, 66, 100, 260],
                "area": 1,
                "iscrowd": 0,
            },
        ],
    }
    (coco / "annotations" / "captions_val2017.json").write_text(json.dumps(caps))  # one line, like COCO
    (coco / "annotations" / "instances_val2017.json").write_text(json.dumps(inst, indent=2))
    return coco


def test_coco_captions_and_instances_are_merged(photos, tmp_path):
    coco = _coco_layout(tmp_path, photos)
    recs, rejs, items = run(
        [coco / "annotations" / "captions_val2017.json", coco / "annotations" / "instances_val2017.json"],
        tmp_path,
    )
    assert list(recs) == ["000000000017.jpg", "000000000047.jpg"]
    cat = recs["000000000017.jpg"].annotation
    assert cat.captions == ["A cat looking sideways.", "Close up of a tabby cat."] and cat.objects == ["cat"]
    assert cat.license == "Attribution License" and cat.source_url == "http://flickr.example/17"
    cup = recs["000000000047.jpg"].annotation
    assert cup.captions == ["An espresso on a red saucer."] and sorted(cup.objects) == ["cup", "spoon"]
    assert recs["000000000017.jpg"].source_root == str((coco / "val2017").resolve())
    assert list(rejs) == ["../../../etc/passwd"] and "leaves the source root" in rejs["../../../etc/passwd"]
    assert len(items) == 3  # merged: each image once


def test_coco_without_its_images_is_an_unusable_source(photos, tmp_path):
    coco = _coco_layout(tmp_path, photos)
    far = tmp_path / "far" / "away"
    far.parent.mkdir()
    (coco / "val2017").rename(far)
    ann = coco / "annotations" / "captions_val2017.json"
    with pytest.raises(ValueError, match="cannot find the COCO images"):
        iter_sources([str(ann)], IngestConfig(), tmp_path / "c")
    recs, _, _ = run([f"{ann}::{far}"], tmp_path)
    assert len(recs) == 2


def test_parquet_with_image_column_sniffed_by_content(photos, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    blobs = [encode(Image.fromarray(photos[n]), "JPEG") for n in ("coffee", "chelsea")]
    table = pa.table(
        {
            "image": pa.array(
                [{"bytes": b, "path": f"{i}.jpg"} for i, b in enumerate(blobs)]
                + [{"bytes": b"<html>nope</html>", "path": "x.jpg"}, {"bytes": None, "path": "/etc/passwd"}]
            ),
            "caption": ["an espresso", "a cat", "broken", "escape"],
            "license": ["CC0", "CC0", None, None],
        }
    )
    shard_dir = tmp_path / "pq" / "data"
    shard_dir.mkdir(parents=True)
    pq.write_table(table, shard_dir / "train-00000.bin")  # misleading extension
    (tmp_path / "pq" / "README.md").write_text("# a dataset card\n")
    for src in (shard_dir / "train-00000.bin", tmp_path / "pq"):
        recs, rejs, _ = run([src], tmp_path / src.name)
        prefix = "" if src.is_file() else "data/"
        assert list(recs) == [f"{prefix}train-00000.bin#0", f"{prefix}train-00000.bin#1"]
        assert recs[f"{prefix}train-00000.bin#1"].annotation.captions == ["a cat"]
        assert recs[f"{prefix}train-00000.bin#0"].annotation.license == "CC0"
        assert "HTML" in rejs[f"{prefix}train-00000.bin#2"]
        assert "leaves the source root" in rejs[f"{prefix}train-00000.bin#3"]


def test_hf_dataset_saved_to_disk(photos, tmp_path):
    import datasets

    blobs = [encode(Image.fromarray(photos[n]), "PNG") for n in ("astronaut", "coffee")]
    feats = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in blobs], "caption": ["an astronaut", "an espresso"]},
        features=feats,
    )
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "hfds"))
    recs, rejs, _ = run([tmp_path / "hfds"], tmp_path)
    assert list(recs) == ["test#0", "train#0"]
    assert recs["train#0"].annotation.captions == ["an astronaut"] and recs["train#0"].width == 512
    assert rejs == {"train#1": "duplicate of test#0 (identical bytes)"}


def test_hf_hub_source_streams_through_load_dataset(photos, tmp_path, monkeypatch):
    import datasets

    blobs = [encode(Image.fromarray(photos[n]), "JPEG") for n in ("rocket", "chelsea")]
    ds = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": b, "path": None} for b in blobs],
            "text": ["a", "b"],
            "caption": ["rocket", "cat"],
        },
        features=datasets.Features(
            {"image": datasets.Image(), "text": datasets.Value("string"), "caption": datasets.Value("string")}
        ),
    )
    calls = []

    def fake_load_dataset(repo, split=None, streaming=False):
        calls.append((repo, split, streaming))
        it = ds.to_iterable_dataset()
        return it if split else datasets.IterableDatasetDict({"validation": it})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    recs, rejs, _ = run(["hf://some-org/some.set:validation"], tmp_path)
    assert calls == [("some-org/some.set", "validation", True)] and not rejs
    assert list(recs) == ["validation#0", "validation#1"]
    assert recs["validation#1"].source_root == "hf://some-org/some.set"
    assert recs["validation#1"].annotation.captions == ["cat"]
    recs2, _, _ = run(["hf://some-org/some.set"], tmp_path)
    assert list(recs2) == list(recs)


# ---------------------------------------------------------------------------------------------
# bundled real photos and the example COCO file


def test_materialize_real_photos_is_idempotent(tmp_path):
    dest = tmp_path / "bundled"
    photos = materialize_real_photos(dest)
    assert [p.name for p in photos] == list(PHOTO_NAMES) and len(photos) >= 8
    mtimes = {p: p.stat().st_mtime_ns for p in dest.iterdir()}
    again = materialize_real_photos(dest)
    assert again == photos and {p: p.stat().st_mtime_ns for p in dest.iterdir()} == mtimes
    for p in photos:
        with Image.open(dest / p.file_name) as im:
            assert im.format == "JPEG" and min(im.size) >= 256
        assert p.license and p.attribution
    assert "CC BY 2.0" in (dest / "LICENSES.md").read_text()
    recs, rejs, _ = run([dest / "manifest.jsonl"], tmp_path)
    assert not rejs and len(recs) == len(photos)
    assert recs["coffee.jpg"].annotation.license == "CC0 1.0"
    assert materialize_real_photos(tmp_path / "two", ["chelsea", "rocket"])[1].file_name == "rocket.jpg"
    with pytest.raises(ValueError, match="unknown bundled photo"):
        materialize_real_photos(tmp_path / "x", ["nope"])


def test_example_coco_annotations_cover_the_bundled_photos(tmp_path):
    dest = tmp_path / "bundled"
    photos = materialize_real_photos(dest)
    ann = EXAMPLES / "annotations.json"
    doc = json.loads(ann.read_text())
    assert {im["file_name"] for im in doc["images"]} == {p.file_name for p in photos}
    recs, rejs, _ = run([f"{ann}::{dest}"], tmp_path)
    assert not rejs and len(recs) == len(photos)
    for rec in recs.values():
        assert 2 <= len(rec.annotation.captions) <= 3 and rec.annotation.license
        w_h = next((im["width"], im["height"]) for im in doc["images"] if im["file_name"] == rec.source_path)
        assert (rec.width, rec.height) == w_h
    assert recs["chelsea.jpg"].annotation.objects == ["cat"]
    # examples/ layout (annotations.json beside photos/): the image folder is found on its own
    (tmp_path / "ex").mkdir()
    (tmp_path / "ex" / "annotations.json").write_bytes(ann.read_bytes())
    materialize_real_photos(tmp_path / "ex" / "photos")
    recs2, rejs2, _ = run([tmp_path / "ex" / "annotations.json"], tmp_path)
    assert not rejs2 and sorted(recs2) == sorted(recs)
    assert recs2["chelsea.jpg"].source_root == str((tmp_path / "ex" / "photos").resolve())
    assert sorted(recs["coffee.jpg"].annotation.objects) == ["cup", "dining table", "spoon"]

"""Ingest: image sources (folders, manifests, COCO, HF datasets / parquet), safe decoding, hashing,
and the bundled real photos used by the demo and tests."""

from rmskit.ingest.bundled import BundledPhoto, materialize_real_photos
from rmskit.ingest.decode import Decoded, ImageRefused, decode_bytes, decode_file
from rmskit.ingest.sources import iter_sources, resolve_source, source_exists

__all__ = [
    "BundledPhoto",
    "Decoded",
    "ImageRefused",
    "decode_bytes",
    "decode_file",
    "iter_sources",
    "materialize_real_photos",
    "resolve_source",
    "source_exists",
]

"""Two wirings across areas: a full disk while ingest writes a normalised copy is the run's failure
(not a per-image "corrupt image" refusal), and build.log escapes untrusted text so a file name
cannot forge a log line."""

from __future__ import annotations

import errno
import io
import logging

import pytest
import skimage.data
from PIL import Image

from rmskit.config import IngestConfig
from rmskit.ingest import decode
from rmskit.pipeline.runner import _setup_logging


def test_a_full_disk_while_storing_a_copy_is_not_an_image_refusal(tmp_path, monkeypatch) -> None:
    buf = io.BytesIO()
    Image.fromarray(skimage.data.coffee()).save(buf, format="JPEG")

    def full(path, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(decode, "_atomic_write", full)
    with pytest.raises(OSError) as err:
        decode.decode_bytes(buf.getvalue(), IngestConfig(), tmp_path)
    assert not isinstance(err.value, decode.ImageRefused) and err.value.errno == errno.ENOSPC


def test_build_log_lines_cannot_be_forged_by_a_file_name(tmp_path) -> None:
    handler = _setup_logging(tmp_path)
    try:
        logging.getLogger("rmskit.ingest").warning("refused %s", "a.jpg\nINFO rmskit: all good \x1b[31m")
    finally:
        logging.getLogger("rmskit").removeHandler(handler)
        handler.close()
    lines = (tmp_path / "build.log").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 and "\x1b" not in lines[0]
    assert not any(line.startswith("INFO rmskit") for line in lines)

"""Schema parity, the sample's side: an answer whose caps the request layer enforced by truncation
(Result.adjustments) keeps its image, and every sample it fed records the truncation in `checks`."""

from __future__ import annotations

from pathlib import Path

from test_build_pipeline import ScriptedBackend, _cfg, _images, _run

from rmskit.ledger import Ledger


class Truncating(ScriptedBackend):
    async def generate(self, messages, *, schema=None, params=None):
        res = await super().generate(messages, schema=schema, params=params)
        if self.requests[-1]["stage"] == "discover":
            return res.model_copy(update={"adjustments": ["scenarios[0].category: cut to 60 characters"]})
        return res


def test_truncated_answers_are_recorded_in_every_sample_they_fed(tmp_path: Path) -> None:
    summary = _run(_cfg(tmp_path, perceive="model"), Truncating(), _images(2))
    assert summary.images_done == 2 and summary.samples_ok > 0
    with Ledger(tmp_path / "run", readonly=True) as led:
        kept = list(led.iter_samples("ok"))
        assert kept and all("cut to 60 characters" in s["checks"]["caps"]["adjustments"][0] for s in kept)
        assert all(s["checks"]["caps"]["pass"] for s in kept)


def test_untruncated_samples_carry_no_caps_entry(tmp_path: Path) -> None:
    _run(_cfg(tmp_path, perceive="model"), ScriptedBackend(), _images(1))
    with Ledger(tmp_path / "run", readonly=True) as led:
        assert all("caps" not in s["checks"] for s in led.iter_samples("ok"))


def test_perceive_model_without_vision_is_refused_at_start(tmp_path: Path) -> None:
    """Text-only end to end: a text-only model cannot perceive pixels, so `--perceive model` with no
    vision model is refused before any request, with the two ways out named."""
    import pytest

    backend = ScriptedBackend(vision=False)
    with pytest.raises(ValueError, match="--stage-model perceive=SPEC.*--perceive annotations"):
        _run(_cfg(tmp_path, perceive="model"), backend, _images(2))
    assert backend.requests == []

"""In-process backends: tiny random Qwen2-VL through HFBackend, the embedded SmolLM2, make-tiny, models list."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub

import pytest
import typer
from pydantic import BaseModel, Field
from typer.testing import CliRunner

from rmskit.config import BackendConfig
from rmskit.models.base import BackendError, ErrorKind, GenParams, ImageInput, Message

pytest.importorskip("torch")
pytest.importorskip("xgrammar")


# Small schemas with nested objects, lists, enums and optional fields. Bounded strings and lists keep a
# random-weight model's worst case inside the token budget.
class Item(BaseModel):
    name: str = Field(max_length=10)
    kind: Literal["tool", "food", "animal", "vehicle"]
    count: int = Field(ge=0, le=9)


class Scene(BaseModel):
    setting: str = Field(max_length=16)
    items: list[Item] = Field(min_length=1, max_length=2)
    risky: bool
    note: str | None = Field(default=None, max_length=8)


class Verdict(BaseModel):
    harmful: bool
    severity: Literal["low", "medium", "high"]
    reason: str


class Hazard(BaseModel):
    hazard: str
    objects: list[str] = Field(min_length=1, max_length=2)
    severity: Literal["low", "medium", "high"]


class Findings(BaseModel):
    hazards: list[Hazard] = Field(min_length=1, max_length=1)
    follow_up: str | None = None


@pytest.fixture(scope="session")
def photo(tmp_path_factory: pytest.TempPathFactory) -> ImageInput:
    from PIL import Image
    from skimage import data

    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    return ImageInput(sha256="astronaut", path=path)


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rmskit.models.tiny import make_tiny

    return make_tiny("qwen2-vl", tmp_path_factory.mktemp("tiny") / "qwen2-vl")


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Convert the GGUF once per session into a private cache dir shared by the embedded tests."""
    root = tmp_path_factory.mktemp("rmskit-cache")
    old = os.environ.get("RMSKIT_CACHE_DIR")
    os.environ["RMSKIT_CACHE_DIR"] = str(root)
    from rmskit.models.embedded import cached_model_dir

    try:
        yield cached_model_dir()
    finally:
        if old is None:
            os.environ.pop("RMSKIT_CACHE_DIR", None)
        else:
            os.environ["RMSKIT_CACHE_DIR"] = old


# ------------------------------------------------------------------ make_tiny


def test_make_tiny_qwen2_vl_is_labelled_and_loads_offline(tiny_qwen: Path) -> None:
    from transformers import AutoConfig, AutoModelForImageTextToText

    from rmskit.models.transformers_local import load_processor

    cfg = json.loads((tiny_qwen / "config.json").read_text())
    assert cfg["rmskit_random_init"] is True and cfg["model_type"] == "qwen2_vl"
    assert "RANDOM WEIGHTS" in (tiny_qwen / "README.md").read_text()
    config = AutoConfig.from_pretrained(tiny_qwen)
    assert config.get_text_config().num_hidden_layers == 2
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    proc = load_processor(str(tiny_qwen))
    tok = proc.tokenizer
    assert tok.convert_tokens_to_ids("<|image_pad|>") == config.image_token_id
    assert len(tok) <= config.get_text_config().vocab_size


def test_make_tiny_rejects_unknown_arch(tmp_path: Path) -> None:
    from rmskit.models.tiny import make_tiny

    with pytest.raises(ValueError, match="unknown arch"):
        make_tiny("gpt-17", tmp_path)


# ------------------------------------------------------------------ HFBackend on the tiny VLM


def test_hf_backend_tiny_vlm_real_images_batching_and_constrained_json(
    tiny_qwen: Path, photo: ImageInput
) -> None:
    from rmskit.models.transformers_local import HFBackend

    backend = HFBackend(BackendConfig(spec=f"hf:{tiny_qwen}", image_max_side=112, max_batch=8))
    assert backend.capabilities.vision is True and backend.capabilities.structured == "grammar"
    seen: list[tuple[int, ...]] = []
    inner = backend._generate_rows

    def spy(rows, texts):  # record the real tensors each batch carries
        seen.append((len(rows), sum(len(p.images) for p in rows)))
        return inner(rows, texts)

    backend._generate_rows = spy  # type: ignore[method-assign]

    async def run() -> list:
        msgs = [
            [Message(role="user", content=f"Describe the photo, take {i}.", images=[photo])] for i in range(3)
        ]
        msgs.append([Message(role="user", content="No image here: describe a kitchen.")])
        greedy = GenParams(temperature=0.0, max_tokens=160)
        jobs = [backend.generate(m, schema=Scene, params=greedy) for m in msgs]
        jobs.append(backend.generate(msgs[0], params=GenParams(temperature=0.0, max_tokens=5)))  # free text
        try:
            return await asyncio.gather(*jobs)
        finally:
            await backend.aclose()

    results = asyncio.run(run())
    assert backend.stats.batches == 1 and backend.stats.max_batch == 5  # all five ran in one batch
    assert seen == [(5, 4)]  # four real images went through the processor
    for r in results[:4]:
        assert r.finish_reason == "stop", r.text
        assert r.parsed is not None and Scene.model_validate(r.parsed)
        assert Scene.model_validate(json.loads(r.text)).model_dump(mode="json") == r.parsed
        assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
    # prompts with an image are longer by the image's visual tokens
    assert results[0].usage.prompt_tokens > results[3].usage.prompt_tokens + 10
    free = results[4]
    assert free.parsed is None and free.usage.completion_tokens <= 5
    assert free.finish_reason in ("stop", "length")
    assert backend.model is None  # aclose freed the weights


def test_hf_backend_processor_tensors_come_from_the_photo(tiny_qwen: Path, photo: ImageInput) -> None:
    from rmskit.models.transformers_local import HFBackend

    backend = HFBackend(BackendConfig(spec=str(tiny_qwen), image_max_side=112))
    backend._ensure_loaded()
    img = backend._load_image(photo.path)
    assert max(img.size) == 112  # resized to image_max_side
    enc = backend.processor(
        text=["<|vision_start|><|image_pad|><|vision_end|>hi"], images=[img], return_tensors="pt"
    )
    assert enc["pixel_values"].ndim == 2 and enc["pixel_values"].std() > 0.1
    n_img = int((enc["input_ids"] == backend.model.config.image_token_id).sum())
    assert n_img == int(enc["image_grid_thw"].prod()) // 4  # merge 2x2 patches per token
    asyncio.run(backend.aclose())


def test_text_backend_refuses_pixels_and_bad_images(tiny_qwen: Path, tmp_path: Path) -> None:
    from rmskit.models.transformers_local import HFBackend

    text_only = HFBackend(BackendConfig(spec=str(tiny_qwen), vision=False))
    assert text_only.capabilities.vision is False
    img = ImageInput(sha256="x", path=tmp_path / "missing.png")
    with pytest.raises(BackendError) as e:
        asyncio.run(text_only.generate([Message(role="user", content="hi", images=[img])]))
    assert e.value.kind == ErrorKind.bad_request

    vlm = HFBackend(BackendConfig(spec=str(tiny_qwen), image_max_side=112))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")

    async def run() -> None:
        try:
            with pytest.raises(BackendError) as err:
                await vlm.generate(
                    [Message(role="user", content="x", images=[ImageInput(sha256="b", path=bad)])]
                )
            assert err.value.kind == ErrorKind.image
        finally:
            await vlm.aclose()

    asyncio.run(run())


# ------------------------------------------------------------------ embedded SmolLM2


def _stage_schemas() -> list[tuple[type[BaseModel], int]]:
    """(schema, max_tokens): this file's schemas plus the lead's stage schemas when present."""
    out: list[tuple[type[BaseModel], int]] = [(Verdict, 64), (Findings, 96)]
    try:
        from rmskit.pipeline import schemas as stage
    except ImportError:
        return out
    # Discovery is left out: this 135M model fills its 8-scenario list past any small budget.
    budgets = {
        "ControlQuery": 96,
        "TextOnlyVerdict": 96,
        "LeakageVerdict": 96,
        "GuidanceResponse": 96,
        "ResponseVerdict": 96,
        "CombinedVerdict": 96,
        "ComposedQuery": 160,
        "Perception": 160,
    }
    for name, n in budgets.items():
        model = getattr(stage, name, None)
        if model is not None:
            out.append((model, n))
    return out


def test_embedded_generates_schema_valid_json(embedded_cache: Path) -> None:
    from rmskit.models.embedded import EmbeddedBackend

    backend = EmbeddedBackend(BackendConfig(max_batch=16))
    assert backend.capabilities.vision is False and backend.capabilities.local is True
    schemas = _stage_schemas()
    msgs = [
        Message(role="system", content="You review scenes for safety risks. Keep every field short."),
        Message(
            role="user",
            content="Scene: a kitchen; a child reaches for a knife on the counter near a hot pan.",
        ),
    ]

    async def run() -> list:
        try:
            plain = await backend.generate(
                [Message(role="user", content="Say hello in three words.")],
                params=GenParams(temperature=0.0, max_tokens=12),
            )
            rs = await asyncio.gather(
                *[
                    backend.generate(msgs, schema=s, params=GenParams(temperature=0.0, max_tokens=n))
                    for s, n in schemas
                ]
            )
            return [plain, *rs]
        finally:
            await backend.aclose()

    plain, *results = asyncio.run(run())
    assert plain.text.strip() and plain.parsed is None and plain.model == "embedded:smollm2-135m-instruct"
    assert any(ch.isalpha() for ch in plain.text)
    for (schema, _), r in zip(schemas, results, strict=True):
        assert r.finish_reason == "stop", (schema.__name__, r.text)
        assert r.parsed is not None, (schema.__name__, r.text)
        schema.model_validate(r.parsed)
    assert backend.stats.max_batch > 1


def test_embedded_cache_is_reused_without_reading_the_gguf(
    embedded_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from rmskit.models import embedded

    assert (embedded_cache / embedded.MARKER).is_file() and (embedded_cache / "model.safetensors").is_file()
    assert embedded_cache.parent == Path(os.environ["RMSKIT_CACHE_DIR"])
    stamp = (embedded_cache / "model.safetensors").stat().st_mtime_ns

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("the GGUF was read again")

    monkeypatch.setattr(embedded, "_convert", boom)
    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", boom)
    backend = embedded.EmbeddedBackend(BackendConfig())
    backend._ensure_loaded()
    assert backend.source == str(embedded_cache) and backend.model is not None
    assert (embedded_cache / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in embedded_cache.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers
    asyncio.run(backend.aclose())


# ------------------------------------------------------------------ CLI and vllm


def _app() -> typer.Typer:
    from rmskit.models.cli import register

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test root"""

    register(app)
    return app


def test_models_list_json_and_spec_resolution(tiny_qwen: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(_app(), ["models", "list", "--json", "--model", str(tiny_qwen)])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert [k["kind"] for k in data["kinds"]] == ["openai", "hf", "vllm", "embedded"]
    assert data["model"]["capabilities"]["vision"] is True and data["model"]["kind"] == "hf"
    res = runner.invoke(_app(), ["models", "list", "--json", "--model", "embedded"])
    emb = json.loads(res.output)["model"]["capabilities"]
    assert emb["vision"] is False and emb["structured"] == "grammar"
    res = runner.invoke(_app(), ["models", "list"])
    assert res.exit_code == 0 and "embedded" in res.output


def test_models_make_tiny_cli(tmp_path: Path) -> None:
    out = tmp_path / "smol"
    res = CliRunner().invoke(_app(), ["models", "make-tiny", "smollm2", str(out), "--seed", "3"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rmskit_random_init"] is True and cfg["model_type"] == "llama"
    res = CliRunner().invoke(_app(), ["models", "make-tiny", "nope", str(tmp_path / "x")])
    assert res.exit_code != 0


def test_vllm_backend_without_vllm_says_how_to_install() -> None:
    from rmskit.models import vllm_engine

    if vllm_engine.vllm_available():
        pytest.skip("vllm is installed here")
    with pytest.raises(BackendError, match="pip install vllm"):
        vllm_engine.VLLMBackend(BackendConfig(spec="vllm:Qwen/Qwen2-VL-2B-Instruct"))


# ------------------------------------------------------------------ shared-prefix KV cache


def _prefix_batch() -> list[list[Message]]:
    """Requests of one stage: a long shared system prompt and user prompts sharing their first part
    but differing in length (so the batch has padding between prefix and suffix)."""
    system = Message(
        role="system",
        content="You review photos of homes for safety risks. Answer in JSON. Keep every field short. "
        "Think about children, heat, electricity, water, sharp objects and heights.",
    )
    scenes = [
        "a kitchen; a child reaches for a knife on the counter near a hot pan.",
        "a bathroom with a hair dryer plugged in next to a full bathtub.",
        "stairs.",
        "a balcony with a low railing, a stool next to it and a toddler playing with a ball nearby.",
    ]
    intro = (
        "Here is the scene description written by the perception stage; read it and name the single "
        "most serious risk in it. Scene:"
    )
    return [[system, Message(role="user", content=f"{intro} {s}")] for s in scenes]


class _Risk(BaseModel):
    hazard: str = Field(max_length=60)
    severity: Literal["low", "medium", "high"]


def _prefix_outputs(
    backend: object, cached: bool, schema: type[BaseModel] | None, batch: list[list[Message]] | None = None
) -> list[str]:
    from rmskit.models.transformers_local import HFBackend

    assert isinstance(backend, HFBackend)
    backend.prefix_cache = cached
    params = GenParams(temperature=0.0, max_tokens=24)

    async def run() -> list[str]:
        rs = await asyncio.gather(
            *[backend.generate(m, schema=schema, params=params) for m in batch or _prefix_batch()]
        )
        return [r.text for r in rs]

    return asyncio.run(run())


@pytest.mark.parametrize("schema", [None, _Risk])
def test_prefix_cache_same_greedy_outputs_tiny(tmp_path_factory: pytest.TempPathFactory, schema) -> None:
    from rmskit.models.tiny import make_tiny
    from rmskit.models.transformers_local import HFBackend

    path = make_tiny("smollm2", tmp_path_factory.mktemp("tiny") / "smollm2")
    backend = HFBackend(BackendConfig(spec=f"hf:{path}", device="cpu", max_batch=8))
    plain = _prefix_outputs(backend, False, schema)
    hits_before = len(backend._prefixes)
    cached = _prefix_outputs(backend, True, schema)
    entries = dict(backend._prefixes)
    again = _prefix_outputs(backend, True, schema)  # served from the stored prefix entry
    alone = _prefix_outputs(backend, True, schema, _prefix_batch()[3:])  # a batch of one
    asyncio.run(backend.aclose())
    assert alone == plain[3:]
    assert hits_before == 0
    # One stored entry: the stage's system prompt, reused by the later batches.
    assert len(entries) == 1 and len(next(iter(entries))) >= backend.prefix_min_tokens
    assert cached == plain and again == plain
    assert max(backend.stats.sizes) > 1  # the rows were batched together
    # Both levels ran: the stored system-prompt entry and the batch's shared user part.
    assert backend.stats.cached_prompt_tokens > 3 * 4 * len(next(iter(entries)))


@pytest.mark.slow
def test_prefix_cache_same_greedy_outputs_smollm2(embedded_cache: Path) -> None:
    from rmskit.models.embedded import EmbeddedBackend

    # fp32: the two paths compute the same logits in different orders; bf16 rounding (the embedded
    # default on CPUs with native bf16) can flip a near-tie, which says nothing about the cache.
    backend = EmbeddedBackend(BackendConfig(max_batch=8, dtype="fp32"))
    plain = _prefix_outputs(backend, False, _Risk)
    cached = _prefix_outputs(backend, True, _Risk)
    n_entries = len(backend._prefixes)
    asyncio.run(backend.aclose())
    assert n_entries == 1
    assert cached == plain, (plain, cached)

"""GPU paths (marker `gpu`): the transformers backend, the vLLM engine and LoRA judge training on
CUDA, on tiny random-init models of real architectures. They run where CUDA is present (a lent GPU
machine) and skip elsewhere; CI has no GPU, so the CPU tests of the same paths always run."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated

import numpy as np
import pytest
from pydantic import BaseModel, Field

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

from rmskit.config import BackendConfig  # noqa: E402
from rmskit.models.base import GenParams, ImageInput, Message  # noqa: E402


class Scene(BaseModel):
    setting: str = Field(max_length=16)
    risky: bool
    objects: list[Annotated[str, Field(max_length=10)]] = Field(min_length=1, max_length=2)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rmskit.models.tiny import make_tiny

    return make_tiny("qwen2-vl", tmp_path_factory.mktemp("tiny") / "qwen2-vl", seed=0)


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> ImageInput:
    from PIL import Image
    from skimage import data

    path = tmp_path_factory.mktemp("photos") / "coffee.png"
    Image.fromarray(data.coffee()).save(path)
    return ImageInput(sha256="coffee", path=path)


def _ask(backend, photo: ImageInput) -> list:
    async def run() -> list:
        msgs = [
            [Message(role="user", content=f"Describe the photo ({i}).", images=[photo])] for i in range(4)
        ]
        greedy = GenParams(temperature=0.0, max_tokens=160)
        try:
            return await asyncio.gather(*(backend.generate(m, schema=Scene, params=greedy) for m in msgs))
        finally:
            await backend.aclose()

    return asyncio.run(run())


def test_hf_backend_on_cuda_batches_images_into_schema_valid_json(tiny_qwen: Path, photo: ImageInput) -> None:
    from rmskit.models.transformers_local import HFBackend

    backend = HFBackend(BackendConfig(spec=f"hf:{tiny_qwen}", device="cuda", image_max_side=112, max_batch=8))
    devices: list[str] = []
    inner = backend._generate_rows

    def spy(rows, texts):  # the weights are loaded on first use: check where they went
        devices.append(next(backend.model.parameters()).device.type)  # type: ignore[union-attr]
        return inner(rows, texts)

    backend._generate_rows = spy  # type: ignore[method-assign]
    results = _ask(backend, photo)
    assert devices == ["cuda"]
    assert backend.stats.batches == 1
    for r in results:
        assert r.parsed is not None and Scene.model_validate(json.loads(r.text))
        assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0


def test_vllm_engine_answers_schema_valid_json(tiny_qwen: Path, photo: ImageInput) -> None:
    pytest.importorskip("vllm")
    from rmskit.models.vllm_engine import VLLMBackend

    results = _ask(VLLMBackend(BackendConfig(spec=f"vllm:{tiny_qwen}", image_max_side=112)), photo)
    for r in results:
        assert r.parsed is not None and Scene.model_validate(r.parsed)


def test_judge_lora_training_on_cuda_lowers_the_loss(tiny_qwen: Path) -> None:
    from PIL import Image
    from skimage import data

    from rmskit.scoring.judge import Judge
    from rmskit.scoring.sample import BenchSample

    photos = []
    root = tiny_qwen.parent / "judge-photos"
    root.mkdir(exist_ok=True)
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        p = root / f"{name}.png"
        Image.fromarray(getattr(data, name)()).save(p)
        photos.append(p)
    samples = [
        BenchSample(
            id=f"s{i}",
            images=[str(p)],
            query=f"What should I do here? ({i})",
            label="unsafe" if i % 2 else "safe",
            source="gpu-test",
        )
        for i, p in enumerate(photos * 2)
    ]
    judge = Judge(str(tiny_qwen), device="cuda", image_max_side=56, seed=0)
    assert judge.device.startswith("cuda")
    stats = judge.train(samples, epochs=3, lr=1e-2, batch_size=4, lora_r=4, seed=0)
    assert np.mean(stats.losses[-2:]) < np.mean(stats.losses[:2])
    scores = judge.score(samples, batch_size=4)
    assert len(scores) == len(samples) and all(0.0 <= s <= 1.0 for s in scores)

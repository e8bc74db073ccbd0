"""`vllm:` backend: vLLM's offline engine in-process (GPU), when the `vllm` package is installed.

Requests queue up and a worker hands everything pending to one `LLM.chat` call (vLLM schedules its
own continuous batching inside). Images travel as base64 data URLs in OpenAI-style content parts, so
vLLM applies the model's own processor and chat template. Structured output uses vLLM's guided JSON
decoding (xgrammar by default in vLLM, the same engine as the `hf:` backend).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from rmskit.models.base import BackendError, Capabilities, ErrorKind, GenParams, Message, Result, Usage
from rmskit.models.batching import Batcher, Pending

if TYPE_CHECKING:
    from rmskit.config import BackendConfig

INSTALL_HINT = (
    "the vllm: backend needs the vllm package on a machine with a supported GPU: `pip install vllm` "
    "(it pins its own torch build; use a separate virtualenv), or serve the model with `vllm serve` and "
    "use --model openai:NAME --base-url http://HOST:8000/v1 instead"
)


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class VLLMBackend:
    """vLLM offline engine behind the backend Protocol."""

    def __init__(self, cfg: BackendConfig) -> None:
        if not vllm_available():
            raise BackendError(ErrorKind.other, INSTALL_HINT)
        self.cfg = cfg
        self.source = cfg.name
        self.model_id = f"vllm:{self.source}"
        vision = cfg.vision
        if vision is None:
            try:
                from rmskit.models.transformers_local import config_has_vision, read_config

                vision = config_has_vision(read_config(self.source))
            except Exception:
                vision = False
        self.capabilities = Capabilities(vision=bool(vision), structured="grammar", max_images=8, local=True)
        self._llm: Any = None
        self._batcher = Batcher(self._run, max_batch=cfg.max_batch, name=f"rmskit-vllm:{cfg.name}")

    def _ensure_llm(self) -> Any:
        if self._llm is None:
            from vllm import LLM  # pyright: ignore[reportMissingImports]

            kwargs: dict[str, Any] = {"model": self.source, "max_num_seqs": max(self.cfg.max_batch, 1)}
            if self.cfg.dtype:
                kwargs["dtype"] = self.cfg.dtype
            if self.capabilities.vision:
                kwargs["limit_mm_per_prompt"] = {"image": self.capabilities.max_images}
            self._llm = LLM(**kwargs)
        return self._llm

    async def load(self) -> None:
        await asyncio.to_thread(self._ensure_llm)

    def _image_url(self, path: Path) -> str:
        from PIL import Image, ImageOps

        try:
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")
                im.thumbnail((self.cfg.image_max_side, self.cfg.image_max_side))
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=92)
        except Exception as e:
            raise BackendError(ErrorKind.image, f"cannot read image {path}: {e}") from e
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()

    def _conversation(self, messages: list[Message]) -> list[dict[str, Any]]:
        conv: list[dict[str, Any]] = []
        for m in messages:
            if not m.images:
                conv.append({"role": m.role, "content": m.content})
                continue
            parts: list[dict[str, Any]] = [
                {"type": "image_url", "image_url": {"url": self._image_url(i.path)}} for i in m.images
            ]
            parts.append({"type": "text", "text": m.content})
            conv.append({"role": m.role, "content": parts})
        return conv

    def _sampling(self, schema: type[BaseModel] | None, params: GenParams) -> Any:
        from vllm import SamplingParams  # pyright: ignore[reportMissingImports]

        kwargs: dict[str, Any] = {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
            "seed": params.seed,
        }
        if schema is not None:
            js = schema.model_json_schema()
            try:  # vLLM >= 0.11
                from vllm.sampling_params import (  # pyright: ignore[reportMissingImports]
                    StructuredOutputsParams,
                )

                kwargs["structured_outputs"] = StructuredOutputsParams(json=js)
            except ImportError:  # older releases
                from vllm.sampling_params import (  # pyright: ignore[reportMissingImports]
                    GuidedDecodingParams,
                )

                kwargs["guided_decoding"] = GuidedDecodingParams(json=js)
        return SamplingParams(**kwargs)

    def _run(self, batch: list[Pending]) -> list[Result | BaseException]:
        llm = self._ensure_llm()
        out: list[Result | BaseException] = [BackendError(ErrorKind.other, "not run")] * len(batch)
        convs, sps, idx = [], [], []
        for i, p in enumerate(batch):
            try:
                msgs = p.messages
                if p.schema is not None:
                    from rmskit.models.structured import with_json_instruction

                    msgs = with_json_instruction(msgs, p.schema)
                convs.append(self._conversation(msgs))
                sps.append(self._sampling(p.schema, p.params))
                idx.append(i)
            except BackendError as e:
                out[i] = e
        if not convs:
            return out
        outputs = llm.chat(convs, sampling_params=sps, use_tqdm=False)
        for i, o in zip(idx, outputs, strict=True):
            comp = o.outputs[0]
            parsed = None
            schema = batch[i].schema
            if schema is not None:
                try:
                    parsed = schema.model_validate(json.loads(comp.text)).model_dump(mode="json")
                except (ValueError, ValidationError):
                    parsed = None
            out[i] = Result(
                text=comp.text,
                parsed=parsed,
                usage=Usage(
                    prompt_tokens=len(o.prompt_token_ids or []), completion_tokens=len(comp.token_ids)
                ),
                finish_reason=comp.finish_reason or "stop",
                model=self.model_id,
            )
        return out

    async def generate(
        self,
        messages: list[Message],
        *,
        schema: type[BaseModel] | None = None,
        params: GenParams | None = None,
    ) -> Result:
        params = params or self.cfg.params
        if not self.capabilities.vision and any(m.images for m in messages):
            raise BackendError(ErrorKind.bad_request, f"{self.model_id} has no vision; send text instead")
        return await self._batcher.submit(messages, schema, params)

    async def aclose(self) -> None:
        await self._batcher.close()
        self._llm = None
        import gc

        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

"""Model backends behind one Protocol (see base.py). Heavy imports happen only when a backend is used."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rmskit.models.base import (
    BackendError,
    Capabilities,
    ErrorKind,
    GenParams,
    ImageInput,
    Message,
    ModelBackend,
    Result,
    Usage,
)

if TYPE_CHECKING:
    from rmskit.config import BackendConfig

__all__ = [
    "BackendError",
    "Capabilities",
    "ErrorKind",
    "GenParams",
    "ImageInput",
    "Message",
    "ModelBackend",
    "Result",
    "Usage",
    "load_backend",
]


def load_backend(cfg: BackendConfig) -> ModelBackend:
    """Instantiate the backend a spec string names (`openai:`, `hf:`/path, `vllm:`, `embedded`)."""
    kind = cfg.kind
    if kind == "openai":
        from rmskit.models.openai_compat import OpenAIBackend

        return OpenAIBackend(cfg)
    if kind == "embedded":
        from rmskit.models.embedded import EmbeddedBackend

        return EmbeddedBackend(cfg)
    if kind == "vllm":
        from rmskit.models.vllm_engine import VLLMBackend

        return VLLMBackend(cfg)
    from rmskit.models.transformers_local import HFBackend

    return HFBackend(cfg)

"""Model backends behind one Protocol (see base.py), found through a registry of backend kinds
(registry.py; plugins add kinds through the `rmskit.backends` entry-point group). Heavy imports
happen only when a backend is used.

    from rmskit.models import get_model
    model = get_model("openai:qwen2.5-vl", base_url="http://gpu:8000/v1")
    result = model.generate("Name three kitchen hazards.", schema=Hazards)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rmskit.models.base import (
    AuthenticationError,
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
from rmskit.models.registry import BackendKind, BackendUnavailable, kinds, register, resolve

if TYPE_CHECKING:
    from rmskit.config import BackendConfig
    from rmskit.models.handle import ModelHandle

__all__ = [
    "AuthenticationError",
    "BackendError",
    "BackendKind",
    "BackendUnavailable",
    "Capabilities",
    "ErrorKind",
    "GenParams",
    "ImageInput",
    "Message",
    "ModelBackend",
    "Result",
    "Usage",
    "get_model",
    "kinds",
    "load_backend",
    "register",
    "resolve",
]


def load_backend(cfg: BackendConfig) -> ModelBackend:
    """Instantiate the backend the spec names. Raises BackendUnavailable (a ValueError, with the
    install hint) when the kind's dependencies are missing."""
    kind, _ = resolve(cfg.spec)
    return kind.load()(cfg)


def get_model(spec: str, **cfg: Any) -> ModelHandle:
    """A handle on the model `spec` names, with sync `generate(...)` and async `agenerate(...)`;
    `cfg` takes any BackendConfig field (base_url, concurrency, structured, vision, ...)."""
    from rmskit.config import BackendConfig
    from rmskit.models.handle import ModelHandle

    return ModelHandle(BackendConfig(spec=spec, **cfg))

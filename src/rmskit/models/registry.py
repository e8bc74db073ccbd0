"""The registry of backend kinds: which spec strings name which backend, what each can do, and how
to load it. Third parties add kinds through the entry-point group `rmskit.backends` (the way `llm`
plugins add models); rmskit's own kinds are registered the same way, below, with no special case.

An entry point's object is a `BackendKind`, a list of them, or a zero-argument callable returning
either. Loading is lazy: a kind names its factory as "module:attr", imported only when used, so
listing kinds or validating a spec never imports torch, vLLM or an HTTP stack.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger("rmskit.models")

ENTRY_POINT_GROUP = "rmskit.backends"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


class BackendUnavailable(ValueError):
    """The spec is valid but its backend cannot run here (a dependency is missing): the message is
    the install hint. A ValueError so that CLIs report it as an unusable argument (exit 2)."""


@dataclass(frozen=True)
class BackendKind:
    """One kind of backend. `prefix` claims specs `PREFIX:NAME`; `exact` claims one literal spec;
    `accepts_path` claims an existing local model folder or .gguf file given without a prefix.
    `check_name(name)` returns why a NAME is unusable, or None."""

    name: str
    factory: str  # "module:attr", called with the BackendConfig
    forms: tuple[str, ...]  # the spec forms, for help texts and error messages
    vision: str  # what the kind says about vision ("probed", "from config", "no", ...)
    structured: str  # structured-output modes it uses
    local: bool  # runs in-process on this machine
    remote: bool = False  # talks to a server through the shared request layer (models/remote.py)
    note: str = ""
    prefix: str | None = None
    exact: str | None = None
    accepts_path: bool = False
    requires: tuple[str, ...] = ()  # importable top-level modules it needs
    install_hint: str = ""
    check_name: Callable[[str], str | None] | None = None

    def missing(self) -> str | None:
        """The install hint when a required module is absent, else None."""
        for mod in self.requires:
            if importlib.util.find_spec(mod) is None:
                return self.install_hint or f"the {self.name} backend needs {mod}: pip install {mod}"
        return None

    def load(self) -> Callable[..., Any]:
        hint = self.missing()
        if hint:
            raise BackendUnavailable(hint)
        module, _, attr = self.factory.partition(":")
        return getattr(importlib.import_module(module), attr)


class ResolvedSpec(NamedTuple):
    """The backend kind a spec names and the model name without the prefix."""

    kind: BackendKind
    name: str


_KINDS: dict[str, BackendKind] = {}
_loaded_entry_points = False


def register(kind: BackendKind, *, replace: bool = False) -> BackendKind:
    """Add a kind (a plugin may also call this directly). A second kind with the same name or
    prefix is refused unless `replace`."""
    clash = [
        k.name
        for k in _KINDS.values()
        if k.name != kind.name
        and ((kind.prefix and k.prefix == kind.prefix) or (kind.exact and k.exact == kind.exact))
    ]
    if (kind.name in _KINDS or clash) and not replace:
        raise ValueError(f"backend kind {kind.name!r} clashes with registered {clash or [kind.name]}")
    _KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    _KINDS.pop(name, None)


def _load_entry_points() -> None:
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, BackendKind):
                obj = obj()
            for kind in obj if isinstance(obj, (list, tuple)) else [obj]:
                if not isinstance(kind, BackendKind):
                    raise TypeError(f"expected BackendKind, got {type(kind).__name__}")
                if kind.name not in _KINDS:  # built-ins win over a plugin reusing their name
                    register(kind)
        except Exception as e:  # noqa: BLE001 - one broken plugin must not break rmskit
            log.warning("backend plugin %s (%s) failed to load: %s", ep.name, ep.value, e)


def kinds() -> list[BackendKind]:
    """Every registered kind, built-ins first, then plugins."""
    _load_entry_points()
    return list(_KINDS.values())


def get_kind(name: str) -> BackendKind:
    for k in kinds():
        if k.name == name:
            return k
    raise KeyError(name)


def valid_forms() -> str:
    return ", ".join(f for k in kinds() for f in k.forms)


def _is_model_path(spec: str) -> bool:
    p = Path(spec).expanduser()
    try:
        return (p.is_dir() and (p / "config.json").is_file()) or (p.is_file() and p.suffix == ".gguf")
    except OSError:
        return False


def resolve(spec: str) -> ResolvedSpec:
    """The kind a spec names. Raises ValueError listing the valid forms when none claims it."""
    spec = spec.strip()
    registered = kinds()
    for k in registered:
        if k.exact is not None and spec == k.exact:
            return ResolvedSpec(k, spec)
    head, sep, rest = spec.partition(":")
    if sep:
        for k in registered:
            if k.prefix is not None and head == k.prefix:
                why = "the model name is empty" if not rest.strip() else None
                if why is None and k.check_name is not None:
                    why = k.check_name(rest)
                if why:
                    raise ValueError(f"model spec {spec!r}: {why}; valid forms: {valid_forms()}")
                return ResolvedSpec(k, rest)
    if _is_model_path(spec):
        for k in registered:
            if k.accepts_path:
                return ResolvedSpec(k, spec)
    hint = ""
    if Path(spec).expanduser().exists():
        hint = " (a path must be a model folder with config.json, or a .gguf file)"
    elif sep and head not in {k.prefix for k in registered}:
        hint = f" (unknown backend {head!r})"
    raise ValueError(f"unknown model spec {spec!r}{hint}; valid forms: {valid_forms()}")


def _hf_name(name: str) -> str | None:
    if _is_model_path(name) or _REPO_ID.match(name):
        return None
    return "expected ORG/NAME (a Hugging Face repo id) or a local model folder"


def _builtin() -> None:
    register(
        BackendKind(
            name="openai",
            factory="rmskit.models.pool:openai_backend",
            forms=("openai:MODEL",),
            vision="probed at start (--vision/--no-vision override)",
            structured="probed: json_schema > json_object+schema > json_object > prompt",
            local=False,
            remote=True,
            note="any OpenAI-compatible server (vLLM, SGLang, llama.cpp, Ollama, OpenAI)",
            prefix="openai",
        )
    )
    register(
        BackendKind(
            name="hf",
            factory="rmskit.models.transformers_local:HFBackend",
            forms=("hf:ORG/NAME", "PATH (model folder or .gguf)"),
            vision="from the model config",
            structured="grammar",
            local=True,
            note="transformers in-process, batched, GGUF",
            prefix="hf",
            accepts_path=True,
            requires=("torch", "transformers"),
            install_hint='the hf backend needs torch and transformers: pip install "rmskit[local]"',
            check_name=_hf_name,
        )
    )
    register(
        BackendKind(
            name="vllm",
            factory="rmskit.models.vllm_engine:VLLMBackend",
            forms=("vllm:ORG/NAME",),
            vision="from the model config",
            structured="grammar",
            local=True,
            note="vLLM offline engine",
            prefix="vllm",
            requires=("vllm",),
            install_hint="the vllm backend needs vLLM: pip install vllm (Linux + CUDA)",
            check_name=_hf_name,
        )
    )
    register(
        BackendKind(
            name="embedded",
            factory="rmskit.models.embedded:EmbeddedBackend",
            forms=("embedded",),
            vision="no",
            structured="grammar",
            local=True,
            note="default; SmolLM2-135M, smoke runs only",
            exact="embedded",
            requires=("torch", "transformers"),
            install_hint='the embedded backend needs torch and transformers: pip install "rmskit[local]"',
        )
    )


_builtin()

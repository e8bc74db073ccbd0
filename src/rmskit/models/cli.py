"""`rmskit models ...`: list backend kinds and their capabilities, resolve a model spec, make tiny models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel

from rmskit.models.base import Capabilities


class KindInfo(BaseModel):
    kind: str
    spec: str
    vision: str
    structured: str
    local: bool
    available: bool
    note: str


class SpecReport(BaseModel):
    spec: str
    kind: str
    model_id: str
    capabilities: Capabilities | None
    note: str | None = None


def backend_kinds() -> list[KindInfo]:
    """The registered backend kinds (built-ins and `rmskit.backends` plugins), with what each declares."""
    from rmskit.models.registry import kinds

    out = []
    for k in kinds():
        missing = k.missing()
        out.append(
            KindInfo(
                kind=k.name,
                spec=" | ".join(k.forms),
                vision=k.vision,
                structured=k.structured,
                local=k.local,
                available=missing is None,
                note=k.note + (f" ({missing})" if missing else ""),
            )
        )
    return out


def resolve_spec(spec: str, *, base_url: str | None = None, gguf_file: str | None = None) -> SpecReport:
    """Capabilities of one model spec without loading weights (backends load lazily)."""
    from rmskit.config import BackendConfig
    from rmskit.models import load_backend

    kwargs: dict[str, Any] = {"spec": spec, "base_url": base_url, "gguf_file": gguf_file}
    cfg = BackendConfig(**kwargs)
    try:
        backend = load_backend(cfg)
    except Exception as e:  # e.g. vllm missing, no API key: say why, still show the kind
        return SpecReport(spec=spec, kind=cfg.kind, model_id=cfg.spec, capabilities=None, note=str(e))
    import asyncio

    async def settle() -> str | None:
        try:
            start = getattr(backend, "start", None)
            if start is not None and cfg.base_url is not None:  # a server: probe what it supports
                got = await start(None)
                return "; ".join(r.line() for r in (got if isinstance(got, list) else [got]))
            return getattr(backend, "capability_note", None)
        except Exception as e:  # noqa: BLE001 - report why, still show the kind
            return f"probe failed: {e}"
        finally:
            await backend.aclose()

    note = asyncio.run(settle())
    return SpecReport(
        spec=spec, kind=cfg.kind, model_id=backend.model_id, capabilities=backend.capabilities, note=note
    )


def register(app: typer.Typer) -> None:
    """Add `rmskit models list` and `rmskit models make-tiny` to `app`."""
    models = typer.Typer(
        help="Model backends: capabilities, tiny random models for tests.", no_args_is_help=True
    )

    @models.command("list")
    def list_cmd(
        model: Annotated[
            str | None, typer.Option("--model", help="Resolve this spec's capabilities.")
        ] = None,
        base_url: Annotated[str | None, typer.Option("--base-url")] = None,
        gguf_file: Annotated[str | None, typer.Option("--gguf-file")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    ) -> None:
        """Backend kinds and what they support; with --model, that spec's resolved capabilities."""
        kinds = backend_kinds()
        report = resolve_spec(model, base_url=base_url, gguf_file=gguf_file) if model else None
        if as_json:
            data: dict[str, Any] = {"kinds": [k.model_dump() for k in kinds]}
            if report is not None:
                data["model"] = report.model_dump(mode="json")
            typer.echo(json.dumps(data, indent=2))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title="rmskit model backends")
        for col in ("kind", "spec", "vision", "structured", "local", "available", "note"):
            table.add_column(col)
        for k in kinds:
            table.add_row(k.kind, k.spec, k.vision, k.structured, str(k.local), str(k.available), k.note)
        console = Console()
        console.print(table)
        if report is not None:
            caps = report.capabilities
            if caps is None:
                console.print(f"[bold]{report.spec}[/bold] ({report.kind}): unavailable: {report.note}")
            else:
                console.print(
                    f"[bold]{report.spec}[/bold] -> {report.model_id}: vision={caps.vision} "
                    f"structured={caps.structured} local={caps.local}"
                    + (f" ({report.note})" if report.note else "")
                )

    @models.command("make-tiny")
    def make_tiny_cmd(
        arch: Annotated[str, typer.Argument(help="qwen2-vl | qwen2.5-vl | llava | smollm2")],
        out: Annotated[Path, typer.Argument(help="Output folder.")],
        seed: Annotated[int, typer.Option("--seed")] = 0,
    ) -> None:
        """Write a tiny RANDOMLY INITIALISED model of a real architecture (for smoke runs and tests)."""
        from rmskit.models.tiny import ARCHS, make_tiny

        if arch not in ARCHS:
            raise typer.BadParameter(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
        path = make_tiny(arch, out, seed=seed)
        typer.echo(f"wrote {path} ({arch}, random weights, seed {seed}); use it with --model {path}")

    app.add_typer(models, name="models")

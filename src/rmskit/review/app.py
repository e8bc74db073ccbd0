"""The review web app: a server-rendered grid and detail view over a run, plus a small JSON API that
appends accept / reject / edit decisions to the ledger."""

from __future__ import annotations

import datetime as dt
import math
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlencode

import jinja2
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rmskit.review.data import IMAGE_SUFFIXES, SAFE_NAME, Filters, ReviewStore
from rmskit.review.security import MAX_BODY_BYTES, BodyLimit, Guard, check_token, is_loopback

HERE = Path(__file__).parent
PAGE_SIZE = 48
UNICODE_REASON = "text is not valid Unicode (it holds a lone surrogate such as \\ud800); send UTF-8 text"
MEDIA_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}


class DecisionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision: Literal["accept", "reject"]


class EditIn(BaseModel):
    """Fields a reviewer may change; at least one. Text is stored as given (escaped when shown)."""

    model_config = ConfigDict(extra="forbid")

    query: str | None = Field(None, min_length=1, max_length=20_000)
    response: str | None = Field(None, min_length=1, max_length=20_000)
    category: str | None = Field(None, min_length=1, max_length=200)

    @field_validator("query", "response", "category")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if not v.strip():
            raise ValueError("must not be blank")
        return v.strip()

    @model_validator(mode="after")
    def _some_field(self) -> EditIn:
        if not self.model_dump(exclude_none=True):
            raise ValueError("give at least one of query, response, category")
        return self


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    """422 listing where and what is wrong, never the input itself (FastAPI's default echoes the whole
    body back, and crashes with a 500 when that body holds a lone surrogate). Text that is not valid
    Unicode is a 400: the request is malformed, not merely invalid."""
    assert isinstance(exc, RequestValidationError)
    errors = []
    for e in exc.errors()[:20]:
        kind = str(e.get("type", ""))
        msg = UNICODE_REASON if kind == "string_unicode" else str(e.get("msg", ""))[:300]
        loc = [str(x)[:100] for x in e.get("loc", ())]
        if kind == "extra_forbidden" and loc:  # the unknown key is itself input: name its place only
            loc[-1] = "(unknown field)"
        errors.append({"loc": loc, "type": kind, "msg": msg})
    status = 400 if any(e["type"] == "string_unicode" for e in errors) else 422
    return JSONResponse({"detail": errors}, status_code=status)


def _filters(request: Request) -> Filters:
    params = {k: v for k, v in request.query_params.items() if v != "" and k in Filters.model_fields}
    try:
        return Filters.model_validate(params)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from e


def _page(request: Request) -> int:
    raw = request.query_params.get("page", "1") or "1"
    try:
        return max(1, int(raw))
    except ValueError as e:
        raise HTTPException(422, "page must be a positive integer") from e


def _fmt_ts(ts: float | None) -> str:
    if not ts:
        return ""
    return dt.datetime.fromtimestamp(float(ts)).strftime("%Y-%m-%d %H:%M:%S")


def _env() -> jinja2.Environment:
    # autoescape=True for every template (not just *.html): model output may contain markup.
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.ChainableUndefined,
    )
    env.filters["ts"] = _fmt_ts
    env.filters["pathseg"] = lambda v: quote(str(v), safe="")
    return env


def create_app(
    run_dir: Path | str,
    token: str | None = None,
    *,
    bind_host: str = "127.0.0.1",
    read_only: bool = False,
    max_body: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The review app for `run_dir`. With `token`, every request must carry it (cookie set by
    `/?token=…`, or the X-RMSKit-Token header). Binding anywhere but loopback without a token is refused.
    In write mode (the default) the app holds the run's lock (`rmskit.ledger.RunLock`): it refuses to
    start while a build, export or other review writes to the run. `read_only` browses without it."""
    if token is None and not is_loopback(bind_host):
        raise ValueError(f"refusing to serve on non-loopback host {bind_host!r} without a token")
    if token is not None:
        check_token(token)
    store = ReviewStore(Path(run_dir), read_only=read_only)
    csrf_token = secrets.token_urlsafe(32)
    env = _env()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        store.close()

    app = FastAPI(title="rmskit review", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.store = store
    app.state.csrf_token = csrf_token
    app.state.token = token
    app.middleware("http")(Guard(token, csrf_token))
    app.add_middleware(BodyLimit, limit=max_body)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def render(name: str, **ctx: Any) -> HTMLResponse:
        ctx.setdefault("run_name", store.run_dir.name)
        ctx["csrf_token"] = csrf_token
        return HTMLResponse(env.get_template(name).render(**ctx))

    def need(sample_id: str) -> None:
        if read_only:
            raise HTTPException(409, "this review is read-only (started with --read-only)")
        if not store.exists(sample_id):
            raise HTTPException(404, "unknown sample id")

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request) -> HTMLResponse:
        f = _filters(request)
        page = _page(request)
        snap = store.snapshot()
        items = store.search(f, snap)
        pages = max(1, math.ceil(len(items) / PAGE_SIZE))
        page = min(page, pages)
        qs = f.query_string()
        return render(
            "index.html",
            filters=f,
            items=store.views(items[(page - 1) * PAGE_SIZE : page * PAGE_SIZE], snap),
            n_matches=len(items),
            counts=store.counts(snap),
            page=page,
            pages=pages,
            qs=urlencode(qs),
            prev_url="/?" + urlencode({**qs, "page": page - 1}) if page > 1 else None,
            next_url="/?" + urlencode({**qs, "page": page + 1}) if page < pages else None,
            categories=store.categories(snap),
        )

    @app.get("/samples/{sample_id}", response_class=HTMLResponse)
    def detail(sample_id: str, request: Request) -> HTMLResponse:
        f = _filters(request)
        d = store.detail(sample_id)
        if d is None:
            raise HTTPException(404, "unknown sample id")
        snap = store.snapshot()
        ids = [smp["id"] for smp in store.search(f, snap)]
        qs = urlencode(f.query_string())
        suffix = f"?{qs}" if qs else ""
        prev_url = next_url = None
        if sample_id in ids:
            i = ids.index(sample_id)
            prev_url = f"/samples/{quote(ids[i - 1], safe='')}{suffix}" if i > 0 else None
            next_url = f"/samples/{quote(ids[i + 1], safe='')}{suffix}" if i + 1 < len(ids) else None
        return render(
            "detail.html",
            d=d,
            s=d["sample"],
            prev_url=prev_url,
            next_url=next_url,
            back_url=f"/{suffix}",
            categories=store.categories(snap),
        )

    @app.get("/img/{name:path}")
    def image(name: str) -> FileResponse:
        # One plain file name inside dataset/images; anything else (../, absolute, encoded, dot-files,
        # symlinks leading out of the folder) is a 404.
        if not SAFE_NAME.match(name) or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            raise HTTPException(404, "no such image")
        root = store.images_dir.resolve()
        try:
            path = (root / name).resolve(strict=True)
        except (OSError, RuntimeError) as e:
            raise HTTPException(404, "no such image") from e
        if path.parent != root or not path.is_file():
            raise HTTPException(404, "no such image")
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix.lower()])

    @app.get("/api/samples")
    def api_samples(request: Request) -> dict[str, Any]:
        f = _filters(request)
        try:
            offset = max(0, int(request.query_params.get("offset", "0") or 0))
            limit = min(1000, max(1, int(request.query_params.get("limit", "200") or 200)))
        except ValueError as e:
            raise HTTPException(422, "offset and limit must be integers") from e
        snap = store.snapshot()
        items = store.search(f, snap)
        return {
            "total": len(items),
            "offset": offset,
            "items": store.views(items[offset : offset + limit], snap),
        }

    @app.get("/api/samples/{sample_id}")
    def api_sample(sample_id: str) -> dict[str, Any]:
        d = store.detail(sample_id)
        if d is None:
            raise HTTPException(404, "unknown sample id")
        return d

    @app.post("/api/samples/{sample_id}/decision")
    def api_decision(sample_id: str, body: DecisionIn) -> dict[str, Any]:
        need(sample_id)
        decision_id = store.decide(sample_id, body.decision)
        return {
            "id": sample_id,
            "decision": body.decision,
            "decision_id": decision_id,
            "sample": store.get(sample_id),
        }

    @app.post("/api/samples/{sample_id}/edit")
    def api_edit(sample_id: str, body: EditIn) -> dict[str, Any]:
        need(sample_id)
        decision_id, changed = store.edit(sample_id, body.model_dump(exclude_none=True))
        return {
            "id": sample_id,
            "decision_id": decision_id,
            "changed": sorted(changed),
            "sample": store.get(sample_id),
        }

    return app


def serve(
    run_dir: Path | str,
    host: str = "127.0.0.1",
    port: int = 8765,
    token: str | None = None,
    *,
    read_only: bool = False,
) -> None:
    """Run the review server (blocking). A non-loopback host gets a generated, printed token."""
    import uvicorn

    from rmskit.review.security import resolve_token

    token = resolve_token(host, token)
    app = create_app(run_dir, token=token, bind_host=host, read_only=read_only)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    print(f"rmskit review: {url}  (Ctrl-C to stop)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")

"""Human review of a run in the browser: `create_app(run_dir)` (FastAPI) and `serve(...)`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rmskit.review.app import create_app, serve

__all__ = ["create_app", "serve"]


def __getattr__(name: str) -> Any:
    # FastAPI is imported only when the review app is actually used.
    if name in __all__:
        from rmskit.review import app

        return getattr(app, name)
    raise AttributeError(name)

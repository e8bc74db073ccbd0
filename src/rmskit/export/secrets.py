"""Defensive secret scrubbing for anything an export writes from the run's config.

The config holds no secrets by design (a backend names the env var of its key), but a dataset is
meant to be published, so: string values under key-ish names are dropped, credentials in URLs are
masked, and the values of secret-looking environment variables are redacted from written text."""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_SECRET_NAME = re.compile(r"key|token|secret|passw|credential|auth(?!or)", re.IGNORECASE)
REDACTED = "[redacted]"


def _is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def _scrub_url(value: str) -> str:
    if not re.match(r"^[a-z][a-z0-9+.-]*://", value, re.IGNORECASE):
        return value
    try:
        parts = urlsplit(value)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, REDACTED if _is_secret_name(k) else v) for k, v in pairs], safe="[]")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def scrub_config(obj: Any) -> Any:
    """A copy without string/collection values under names containing key/token/secret/password/auth
    (numbers such as `tokens_per_minute` or `max_tokens` stay), with URL credentials masked."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            if _is_secret_name(str(k)) and not (isinstance(v, int | float | bool) or v is None):
                continue
            out[k] = scrub_config(v)
        return out
    if isinstance(obj, list | tuple):
        return [scrub_config(v) for v in obj]
    if isinstance(obj, str):
        return _scrub_url(obj)
    return obj


def secret_env_values(min_len: int = 12) -> list[str]:
    """Values of environment variables whose names look secret (longest first, for replacement)."""
    vals = {v for k, v in os.environ.items() if _is_secret_name(k) and len(v) >= min_len}
    return sorted(vals, key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    for value in secret_env_values() if secrets is None else secrets:
        text = text.replace(value, REDACTED)
    return text

"""Escape untrusted text (file names, manifest values, model output) before a human sees it.

A file name is attacker-controlled: `$'\\e]0;PWNED\\a\\e[31mred.jpg'` retitles the terminal and
paints it red when printed raw, and a name containing `"\\nINFO rmskit: all good"` forges a log line.
`safe_text` makes every such character visible instead of active; `EscapingFilter` applies it to
log record arguments (and to the message itself when it has none) so a logger cannot be forged.
Attach it to *handlers* (`handler.addFilter(EscapingFilter())`): a filter on a logger does not see
records that propagate up from its children.

Escaped, as `\\n`, `\\t`, `\\r`, `\\xNN` or `\\uNNNN`:
- C0 controls (U+0000-U+001F, ESC included, so no CSI/OSC sequence survives), DEL, C1 controls
  (U+0080-U+009F, which some terminals treat as CSI);
- line and paragraph separators (U+2028/U+2029, U+0085) that split a line in some viewers;
- bidirectional overrides, embeddings and isolates (U+202A-U+202E, U+2066-U+2069, U+200E/F,
  U+061C) that reorder what is displayed ("gpj.exe" shown as "exe.jpg");
- lone surrogates (undecodable bytes in file names) so printing never raises.
Everything else (accents, CJK, emoji) is kept as it is."""

from __future__ import annotations

import logging
import re
from typing import Any

_BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_UNSAFE = re.compile(f"[\x00-\x1f\x7f-\x9f\u2028\u2029{_BIDI}\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match[str]) -> str:
    c = m.group(0)
    if c in _NAMED:
        return _NAMED[c]
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_text(value: object, max_len: int | None = None) -> str:
    """`str(value)` with every control, separator and bidi-override character escaped (see module
    docstring). With `max_len`, the result is cut to that many characters and ends with '…'.
    Backslashes are kept as they are: the result is for display, not meant to be parsed back."""
    s = value if isinstance(value, str) else str(value)
    out = _UNSAFE.sub(_escape, s)
    if max_len is not None and len(out) > max_len:
        out = out[: max(max_len - 1, 0)] + "…"
    return out


def _safe_arg(arg: Any) -> Any:
    # Numbers keep their type so "%d" and "%.2f" still format; everything else is shown as text.
    if arg is None or isinstance(arg, (bool, int, float)):
        return arg
    return safe_text(arg)


class EscapingFilter(logging.Filter):
    """Escapes untrusted text in every record it sees: the `%`-arguments when there are any (the
    message template is the program's own), else the message itself (it may be an f-string built
    from untrusted input). Exception tracebacks are left alone; they are multi-line by design."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            if isinstance(record.args, dict):
                record.args = {k: _safe_arg(v) for k, v in record.args.items()}
            else:
                record.args = tuple(_safe_arg(a) for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = safe_text(record.msg)
        return True


class EscapingFormatter(logging.Formatter):
    """A Formatter whose formatted message (not the traceback) has control characters escaped,
    for handlers that other code may feed records to without the filter."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        saved = record.message
        record.message = safe_text(saved)
        try:
            return super().formatMessage(record)
        finally:
            record.message = saved

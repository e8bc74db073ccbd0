"""What the command line shows a person: one-line errors, escaped untrusted text, log lines on
stderr, and a quiet mode that silences third-party progress bars.

Untrusted text (file names, manifest values, model output, server messages) is escaped before it
reaches a terminal: a file named `$'\\e]0;PWNED\\a'` must not retitle the terminal, and a name with
`\\nINFO rmskit: all good` must not forge a log line. The CLI escapes whatever it prints, wherever it
came from, with rmskit.textsafe."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import sys
import warnings
from pathlib import Path

from pydantic import ValidationError
from rich.markup import escape as _rich_escape

from rmskit.textsafe import safe_text


def shown(value: object) -> str:
    """`value` as text with control, line-separator and bidi-override characters escaped
    (`\\x1b`, `\\n`, `\\u202e`; see rmskit.textsafe), so printing it cannot drive the terminal."""
    return safe_text(value)


def markup_safe(value: object) -> str:
    """`shown(value)` that is also inert as rich markup (`[red]` in a file name stays literal)."""
    return _rich_escape(shown(value))


def error_line(message: object) -> None:
    """One line on stderr: `error: <message>`, escaped."""
    sys.stderr.write(f"error: {shown(message)}\n")
    sys.stderr.flush()


def validation_lines(exc: ValidationError) -> list[str]:
    """One line per pydantic error: `setting: reason`. The offending value is never shown (it may be
    a secret passed in the wrong place)."""
    lines = []
    for e in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(p) for p in e["loc"]) or "config"
        lines.append(f"invalid setting {where}: {e['msg']}")
    return lines


# -- logging on stderr -----------------------------------------------------------------------------


class EscapingFormatter(logging.Formatter):
    """`LEVEL name: message` on one escaped line, so a record can neither span lines nor carry
    terminal controls. An exception is named, not traced (the run's build.log keeps tracebacks)."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            text += f" ({type(exc).__name__}: {exc})"
        return shown(f"{record.levelname} {record.name}: {text}")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (rich's live display and test runners swap it)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201 - logging's attribute
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


_handler: logging.Handler | None = None


def setup_console_logging(*, quiet: bool) -> logging.Handler:
    """Log records of rmskit at WARNING (ERROR when quiet) go to stderr, one escaped line each.
    Replaces Python's last-resort handler, which prints raw multi-line text."""
    global _handler
    root = logging.getLogger("rmskit")
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = _StderrHandler()
    _handler.setFormatter(EscapingFormatter())
    _handler.setLevel(logging.ERROR if quiet else logging.WARNING)
    root.addHandler(_handler)
    return _handler


def silence_console_logging() -> None:
    """After Ctrl-C or a fatal error: the cleanup of cancelled work is not news to the user."""
    if _handler is not None:
        _handler.setLevel(logging.CRITICAL + 1)


def quiet_third_party() -> None:
    """No progress bars or chatter from transformers / huggingface_hub / sentence-transformers / tqdm,
    and no Python warnings. Environment variables cover libraries not imported yet; the calls cover
    those already imported."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["TQDM_DISABLE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # its fork warning
    warnings.simplefilter("ignore")
    for name in ("transformers", "huggingface_hub", "sentence_transformers", "datasets", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        from transformers.utils import logging as tf_logging

        tf_logging.disable_progress_bar()
        tf_logging.set_verbosity_error()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


# -- a full disk ----------------------------------------------------------------------------------

_SQLITE_FULL = 13
_SQLITE_IOERR = 10
_OS_REASONS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file size limit reached",
}


def storage_failure(exc: BaseException, ledger_path: Path) -> str | None:
    """The one-line message for an exception caused by storage running out (the exception or any
    in its cause/context chain), or None. sqlite reports no path, so its errors name the ledger."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        reason, path = None, None
        if isinstance(cur, OSError) and cur.errno in _OS_REASONS:
            reason, path = _OS_REASONS[cur.errno], cur.filename or ledger_path
        elif isinstance(cur, sqlite3.Error):
            code = getattr(cur, "sqlite_errorcode", None)
            if code == _SQLITE_FULL or "disk is full" in str(cur):
                reason, path = "disk full", ledger_path
            elif code is not None and code & 0xFF == _SQLITE_IOERR:
                reason, path = "disk I/O error (is the disk full?)", ledger_path
        if reason is not None:
            return f"{reason} writing {shown(path)}: free space and re-run the same command to resume"
        cur = cur.__cause__ or cur.__context__
    return None


def is_storage_failure(exc: BaseException) -> bool:
    """Whether `exc` means storage ran out (see storage_failure): the run must stop, not record the
    item as failed, because nothing more can be saved."""
    return storage_failure(exc, Path("?")) is not None

"""Reading the files a user hands the toolkit, with every decoding error caught and named.

A recipe, a calibration text, a config.json or a safetensors header that cannot be read ends in one
:class:`CompressError` naming the file, where in it the problem is, and what to do; never a
``UnicodeDecodeError``, ``JSONDecodeError`` or a reader library's own exception.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import CompressError


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of ``path``; ``what`` names the file in an error ("recipe file")."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CompressError(f"cannot read {what} '{path}': {e.strerror or e}") from None
    return decode(data, path, what)


def decode(data: bytes, path: Path, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise CompressError(
            f"{what} '{path}' is not UTF-8 text (byte {e.start:,}, line {line}: {data[e.start:e.start + 1]!r}); "
            "save it as UTF-8 (e.g. iconv -t UTF-8)"
        ) from None


def read_json(path: Path, what: str) -> Any:
    """The JSON value in ``path``, decoded as UTF-8."""
    return parse_json(read_text(path, what), path, what)


def parse_json(text: str, path: Path, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CompressError(f"{what} '{path}' is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); fix or restore it") from None


def integer(value: Any, key: str, where: str) -> int:
    """``value`` of ``key`` as an int (a digit string is accepted), else a one-line error."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().lstrip("-").isdigit():
        raise CompressError(f"{where}: '{key}' must be an integer, got {value!r}; the file is damaged: restore it or rerun compress run")
    return int(value)

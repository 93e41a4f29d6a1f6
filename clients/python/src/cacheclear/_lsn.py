"""PostgreSQL WAL positions (LSNs) in their two text forms.

- PostgreSQL's ``X/X`` form (``0/16B6C50``), as ``pg_current_wal_lsn()`` and
  ``pg_last_wal_replay_lsn()`` print it: two hexadecimal 32-bit halves. The envelope's
  ``version`` and ``read_after`` fields use it (upper-case hex).
- The fixed form used in Redis (fences, watermarks, ``fill.lua``'s version argument): exactly 16
  upper-case hex digits (``00000000016B6C50``), so Lua can compare LSNs as strings.

An LSN is represented as a Python ``int`` in ``0 .. 2**64 - 1``.
"""

from __future__ import annotations

import re
from typing import Union

__all__ = [
    "LsnLike",
    "parse_lsn",
    "format_lsn",
    "to_fixed_hex",
    "from_fixed_hex",
    "as_lsn",
]

#: What the API accepts where it wants an LSN: PostgreSQL's ``X/X`` text or an ``int``.
LsnLike = Union[str, int]

_PG_FORM = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")
_FIXED_FORM = re.compile(r"[0-9A-Fa-f]{16}")
_MAX = (1 << 64) - 1


def parse_lsn(text: str) -> int:
    """Parses PostgreSQL's ``X/X`` form (``"0/16B6C50"`` → ``0x16B6C50``), any case,
    surrounding whitespace ignored.

    Raises:
        ValueError: ``text`` is not two 1–8 digit hex numbers separated by ``/``.
    """
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not an LSN: expected PostgreSQL's `X/X` form such as `16/B374D848`")
    m = _PG_FORM.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"`{text}` is not an LSN: expected PostgreSQL's `X/X` form such as `16/B374D848`")
    return (int(m.group(1), 16) << 32) | int(m.group(2), 16)


def format_lsn(lsn: int) -> str:
    """PostgreSQL's ``X/X`` form with upper-case hex digits (``0x16B6C50`` → ``"0/16B6C50"``).

    Raises:
        ValueError: ``lsn`` is not in ``0 .. 2**64 - 1``.
    """
    _check(lsn)
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def to_fixed_hex(lsn: int) -> str:
    """The 16-digit upper-case hex form used in Redis (``0x16B6C50`` → ``"00000000016B6C50"``).

    Raises:
        ValueError: ``lsn`` is not in ``0 .. 2**64 - 1``.
    """
    _check(lsn)
    return f"{lsn:016X}"


def from_fixed_hex(text: Union[str, bytes]) -> int:
    """Parses the 16-digit form (any case; ``bytes`` are accepted as Redis returns them).

    Raises:
        ValueError: ``text`` is not exactly 16 hex digits.
    """
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"{text!r} is not a 16-hex-digit LSN") from None
    if not isinstance(text, str) or _FIXED_FORM.fullmatch(text) is None:
        raise ValueError(f"{text!r} is not a 16-hex-digit LSN")
    return int(text, 16)


def as_lsn(value: LsnLike) -> int:
    """Accepts an ``int`` LSN or PostgreSQL's ``X/X`` text and returns the ``int``.

    Raises:
        ValueError: neither form, or out of range.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not an LSN")
    if isinstance(value, int):
        _check(value)
        return value
    return parse_lsn(value)


def _check(lsn: int) -> None:
    if isinstance(lsn, bool) or not isinstance(lsn, int) or not 0 <= lsn <= _MAX:
        raise ValueError(f"{lsn!r} is not an LSN: expected an int in 0 .. 2**64 - 1")

"""The value envelope stored at ``{K}`` (docs/protocol.md §3).

UTF-8 JSON, fields in this order::

    {"format":1,"version":"0/16B6C50","read_after":"0/16B6B00","delta_ms":12,
     "expiry_ms":1764445200000,"payload":{"id":42,"price_cents":1999},"epoch":1796322947552}

- ``format``: ``1``; anything else is a miss.
- ``version``: the loader's replica replay LSN (``X/X``), or ``null`` for a primary read.
- ``read_after``: the key's fence when the lease was taken (``0/0`` without one); optional.
- ``delta_ms``: how long the load took, ms. ``expiry_ms``: Unix ms at which the TTL ends.
- ``payload``: the application's value, any JSON.
- ``epoch``: the namespace epoch the value was filled under; only written by clients with a
  staleness bound; a missing field counts as epoch 0.

Readers ignore unknown fields; bytes that are not JSON, not such an object, or of another format
are a miss (the next fill overwrites them).
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict, Optional, Union

from ._lsn import format_lsn

__all__ = ["FORMAT", "encode_envelope", "decode_envelope"]

#: The envelope format this client reads and writes.
FORMAT = 1

_LSN_TEXT = re.compile(r"[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}")


def _reject_constant(name: str) -> Any:
    # NaN / Infinity are not JSON (the Rust client refuses them too): a miss.
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_envelope(
    payload: Any,
    *,
    version: Optional[int],
    read_after: Optional[int],
    delta_ms: int,
    expiry_ms: int,
    epoch: Optional[int],
) -> bytes:
    """The stored bytes of an envelope.

    Args:
        payload: the application's value; must be JSON-serializable (dict, list, str, int,
            float, bool, None and nestings; no NaN/Infinity).
        version: the loader's version (an ``int`` LSN) or ``None`` (primary read): written as
            ``X/X`` or ``null``.
        read_after: the fence at lease time as an ``int`` LSN (``0`` without one), or ``None``
            when the fence was unreadable (the field is then left out).
        delta_ms: load duration, ms (≥ 0).
        expiry_ms: Unix ms at which the TTL ends.
        epoch: the namespace epoch (clients with a staleness bound), else ``None`` (left out).

    Raises:
        TypeError, ValueError: the payload has no JSON form.
    """
    parts = ['{"format":1,"version":']
    parts.append("null" if version is None else '"' + format_lsn(version) + '"')
    if read_after is not None:
        parts.append(',"read_after":"' + format_lsn(read_after) + '"')
    parts.append(f',"delta_ms":{int(delta_ms)},"expiry_ms":{int(expiry_ms)},"payload":')
    parts.append(_ENCODER.encode(payload))
    if epoch is not None:
        parts.append(f',"epoch":{int(epoch)}')
    parts.append("}")
    return "".join(parts).encode("utf-8")


def _is_uint(v: Any) -> bool:
    return type(v) is int and v >= 0


def _is_lsn_or_null(v: Any) -> bool:
    return v is None or (type(v) is str and _LSN_TEXT.fullmatch(v) is not None)


def decode_envelope(raw: Union[bytes, str, Any]) -> Optional[Dict[str, Any]]:
    """Parses stored bytes (or ``str``). Returns the envelope as a ``dict`` (with at least
    ``format``, ``delta_ms``, ``expiry_ms`` and ``payload``) when they are a format-1 envelope,
    else ``None`` (a miss). Unknown fields are kept and ignored."""
    try:
        text = raw.decode("utf-8") if type(raw) is bytes else raw
        obj = _DECODER.decode(text)  # type: ignore[arg-type]  # non-str: TypeError, a miss
    except (ValueError, TypeError, AttributeError):
        return None
    if type(obj) is not dict:
        return None
    fmt = obj.get("format")
    if fmt != FORMAT or type(fmt) is not int or "payload" not in obj:
        return None
    if not (_is_uint(obj.get("delta_ms")) and _is_uint(obj.get("expiry_ms"))):
        return None
    if not (_is_lsn_or_null(obj.get("version")) and _is_lsn_or_null(obj.get("read_after"))):
        return None
    epoch = obj.get("epoch")
    if epoch is not None and not _is_uint(epoch):
        return None
    return obj

"""cacheclear: the Python client of the cacheclear protocol (docs/protocol.md).

Reads a Redis cache that a cacheclear pipeline keeps consistent with PostgreSQL, and fills it
without undoing the pipeline's invalidations: leases, fenced fills through the protocol's own Lua
scripts, TTL jitter, single-flight, strict reads, the staleness breaker, epochs and
read-your-writes.

- :class:`AsyncClient` — asyncio, on ``redis.asyncio``.
- :class:`Client` — synchronous and thread-safe, on ``redis``.
- :class:`Template` — renders cache keys exactly as the pipeline does.

All durations are in milliseconds (``*_ms``).
"""

from ._aio import AsyncClient, AsyncLoader
from ._breaker import EPOCH_MISSING, WATERMARK_MISSING, WATERMARK_STALE
from ._common import Loaded, Stats
from ._config import (
    BypassFullPolicy,
    Config,
    ReadPolicy,
    RedisErrorPolicy,
    StalenessConfig,
    WaitTimeoutPolicy,
)
from ._envelope import FORMAT, decode_envelope, encode_envelope
from ._errors import (
    BypassOverloaded,
    CacheclearError,
    EncodeError,
    InvalidConfig,
    InvalidKey,
    LeaseWaitTimeout,
    LoaderError,
    RedisError,
    TemplateError,
    KeyRenderError,
)
from ._keys import ColumnValue, Template, encode_value, fence_key, lease_key, validate_key, value_key
from ._lsn import LsnLike, as_lsn, format_lsn, from_fixed_hex, parse_lsn, to_fixed_hex
from ._sync import Client, Loader
from ._ttl import jittered_ttl_ms, xfetch_should_refresh

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AsyncLoader",
    "Client",
    "Loader",
    "Loaded",
    "Stats",
    "Config",
    "StalenessConfig",
    "WaitTimeoutPolicy",
    "RedisErrorPolicy",
    "BypassFullPolicy",
    "ReadPolicy",
    "Template",
    "ColumnValue",
    "encode_value",
    "validate_key",
    "value_key",
    "lease_key",
    "fence_key",
    "FORMAT",
    "encode_envelope",
    "decode_envelope",
    "LsnLike",
    "parse_lsn",
    "format_lsn",
    "to_fixed_hex",
    "from_fixed_hex",
    "as_lsn",
    "jittered_ttl_ms",
    "xfetch_should_refresh",
    "WATERMARK_STALE",
    "WATERMARK_MISSING",
    "EPOCH_MISSING",
    "CacheclearError",
    "InvalidKey",
    "InvalidConfig",
    "LoaderError",
    "LeaseWaitTimeout",
    "BypassOverloaded",
    "RedisError",
    "EncodeError",
    "TemplateError",
    "KeyRenderError",
]

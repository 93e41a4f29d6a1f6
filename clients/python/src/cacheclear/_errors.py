"""The exceptions of the client. Every one is a :class:`CacheclearError`."""

from __future__ import annotations

from typing import Optional

__all__ = [
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


class CacheclearError(Exception):
    """Base class of every error this package raises.

    Attributes:
        key: the cache key the error concerns. ``""`` when there is none: a strict read through
            ``get_strict``, :meth:`Client.check`, and always for :class:`InvalidConfig`,
            :class:`TemplateError` and :class:`KeyRenderError` (a key that could not be built
            has no key; see their own attributes). For :class:`InvalidKey` given a non-``str``
            key, the ``repr()`` of what was passed.
    """

    key: str

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


class InvalidKey(CacheclearError, ValueError):
    """The cache key cannot be laid out in Redis: it is not a ``str``, is empty, or contains
    ``{`` or ``}`` (which would break its Redis Cluster hash tag ``{K}``). Raised before anything
    runs: no Redis command, no loader. ``key`` is the key, or the ``repr()`` of a non-``str``
    one."""

    def __init__(self, key: object) -> None:
        if not isinstance(key, str):
            message = (
                f"a cache key must be a non-empty str, not {type(key).__name__} {key!r}; render keys "
                "with cacheclear.Template (e.g. Template(\"product:{id}\").render({\"id\": 42}))"
            )
            key = repr(key)
        elif key == "":
            message = "a cache key may not be empty"
        else:
            message = (
                f"cache key `{key}` contains `{{` or `}}`, which would break its Redis Cluster "
                "hash tag; render keys with cacheclear.Template, which percent-encodes braces"
            )
        super().__init__(message, key)


class InvalidConfig(CacheclearError, ValueError):
    """A :class:`cacheclear.Config` field is out of range, or the Redis URL given to a client
    does not parse (``field == "redis_url"``, ``value`` the URL without its password). ``key``
    is always ``""``.

    Attributes:
        field: the field's name (``"staleness.refresh_ms"`` for nested ones).
        value: the rejected value.
    """

    def __init__(self, field: str, value: object, expected: str) -> None:
        super().__init__(f"invalid cacheclear client config: `{field}` = {value!r}: {expected}")
        self.field = field
        self.value = value


class LoaderError(CacheclearError):
    """The application's loader raised. Nothing was cached and the lease (if held) was released.
    The loader's own exception is ``__cause__``. Concurrent callers of the same key in this
    process that shared the load get the same error.

    The message (and the client's WARNING log record) names only the key and the exception's
    type, never its text: a database error's text may carry a connection string or row data.
    Read ``__cause__`` for the details.

    Attributes:
        cause_type: the qualified name of the loader's exception type.
    """

    def __init__(self, key: str, cause: BaseException, detail: Optional[str] = None) -> None:
        where = f"cache key `{key}`" if key else "a strict read"
        self.cause_type = type(cause).__qualname__
        message = f"loader for {where} failed: {self.cause_type}"
        if detail:
            message += f" ({detail})"
        super().__init__(message + "; the exception is __cause__", key)


class LeaseWaitTimeout(CacheclearError):
    """Another process held the key's lease for longer than ``lease_wait_ms`` without a value
    appearing, and ``on_wait_timeout`` is ``"error"``. The loader did not run.

    Attributes:
        waited_ms: how long the read waited, in milliseconds.
    """

    def __init__(self, key: str, waited_ms: int) -> None:
        super().__init__(
            f"waited {waited_ms} ms for another loader's lease on cache key `{key}` without a "
            "value appearing (on_wait_timeout = error)",
            key,
        )
        self.waited_ms = waited_ms


class BypassOverloaded(CacheclearError):
    """The staleness breaker is open (reads go to the database) and this process already runs
    ``max_bypass_loads`` such loads; the policy (``on_bypass_full``) is ``"fail"``, or ``"wait"``
    ran out after ``lease_wait_ms``. The loader did not run.

    Attributes:
        namespace: the pipeline namespace.
        reason: why the breaker is open: ``"watermark_stale"``, ``"watermark_missing"`` or
            ``"epoch_missing"``.
    """

    def __init__(self, key: str, namespace: str, reason: str, running: int) -> None:
        super().__init__(
            f"the cache of namespace `{namespace}` is bypassed ({reason}) and {running} database "
            f"loads are already running in this process; refusing the read of `{key}`",
            key,
        )
        self.namespace = namespace
        self.reason = reason


class RedisError(CacheclearError):
    """Redis failed (connection refused or lost, timeout, error reply, unexpected reply) during
    ``op`` and ``on_redis_error`` is ``"error"``; the database was not read. The underlying
    ``redis`` exception (if any) is ``__cause__``.

    Attributes:
        op: the step that failed: ``"GET"``, ``"lease"``, ``"poll"``; for ``check()``:
            ``"PING"``, ``"SCRIPT LOAD"``, ``"namespace"`` (with ``key == ""``).
    """

    def __init__(self, key: str, op: str, detail: str) -> None:
        if key:
            message = (
                f"redis {op} for cache key `{key}` failed: {detail}; the database was not read "
                "(on_redis_error = error)"
            )
        else:
            message = f"redis {op} failed: {detail}"
        super().__init__(message, key)
        self.op = op


class EncodeError(CacheclearError, TypeError):
    """The loader's value cannot be stored as JSON (a set, bytes, NaN, an object without a JSON
    form). Nothing was cached; the lease was released. The ``json`` error is ``__cause__``."""

    def __init__(self, key: str, cause: BaseException) -> None:
        super().__init__(f"value for cache key `{key}` cannot be encoded as JSON: {cause}", key)


class TemplateError(CacheclearError, ValueError):
    """A key template does not parse (see :class:`cacheclear.Template` for the syntax). The
    message is the one the Rust ``Template::parse`` gives. ``key`` is ``""`` (there is no key).

    Attributes:
        column: 1-based character position of the offending character.
        problem: a short code: ``empty``, ``unclosed_placeholder``, ``empty_placeholder``,
            ``nested_placeholder``, ``unexpected_char``, ``uppercase_name``,
            ``unterminated_quote``, ``brace_in_literal``, ``percent_in_literal``,
            ``control_in_literal``, ``missing_separator``, ``no_literal_text``.
    """

    def __init__(self, column: int, problem: str, detail: str, template: Optional[str] = None) -> None:
        super().__init__(f"at column {column}: {detail}")
        self.column = column
        self.problem = problem
        self.template = template


class KeyRenderError(CacheclearError, ValueError, TypeError):
    """:meth:`cacheclear.Template.render` cannot build a key from the values given: a column has
    no value, a value is neither ``str`` nor ``int`` (``float``, ``bool``, ``None``,
    ``Decimal``…), a ``str`` value is not valid UTF-8 text, or a sequence has the wrong length.
    A ``ValueError`` (and a ``TypeError``, as before) too. ``key`` is ``""`` (no key was built).

    Attributes:
        template: the template's source.
        column: the column concerned, or ``None`` (a sequence of the wrong length).
    """

    def __init__(self, template: str, column: Optional[str], detail: str) -> None:
        where = f"key template `{template}`" + (f", column `{column}`" if column is not None else "")
        super().__init__(f"{where}: {detail}")
        self.template = template
        self.column = column

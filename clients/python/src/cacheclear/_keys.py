"""Cache keys: validation, the Redis key layout, and key templates (the pipeline's rendering).

A cache key ``K`` lives at three Redis keys sharing the hash tag ``{K}`` (docs/protocol.md §1):
``{K}`` (the value envelope), ``{K}:lease`` and ``{K}:fence``. ``K`` must be non-empty and free
of ``{`` and ``}``.
"""

from __future__ import annotations

import unicodedata
from typing import List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import quote

from ._errors import InvalidKey, KeyRenderError, TemplateError

__all__ = ["validate_key", "value_key", "lease_key", "fence_key", "encode_value", "Template", "ColumnValue"]

#: A column value for :meth:`Template.render`: PostgreSQL's text output of the column (``str``),
#: or an ``int`` (whose decimal form is PostgreSQL's text output of integer columns).
ColumnValue = Union[str, int]

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def validate_key(key: str) -> None:
    """Checks that ``key`` can be laid out in Redis.

    Raises:
        InvalidKey: ``key`` is empty, not a ``str``, or contains ``{`` / ``}``.
    """
    if not isinstance(key, str) or not key or "{" in key or "}" in key:
        raise InvalidKey(key)


def value_key(key: str) -> str:
    """``{K}``: the Redis key holding the value envelope (``key`` must be valid)."""
    return "{" + key + "}"


def lease_key(key: str) -> str:
    """``{K}:lease``: the Redis key holding the lease token."""
    return "{" + key + "}:lease"


def fence_key(key: str) -> str:
    """``{K}:fence``: the Redis key holding the fence LSN (written by the pipeline only)."""
    return "{" + key + "}:fence"


def encode_value(value: str) -> str:
    """Percent-encodes one column value as the pipeline does: the RFC 3986 unreserved
    characters ``A-Z a-z 0-9 - . _ ~`` stay, every other byte of the value's UTF-8 becomes
    ``%XX`` with upper-case hex (``"a:b"`` → ``"a%3Ab"``, ``"é"`` → ``"%C3%A9"``).

    Raises:
        UnicodeEncodeError: ``value`` holds lone surrogates (not valid UTF-8 text).
    """
    # quote() keeps exactly the unreserved set with safe="" (Python ≥ 3.7) and writes upper hex.
    return quote(value, safe="", encoding="utf-8", errors="strict")


def _is_encoded_alphabet(c: str) -> bool:
    return c == "%" or c in _UNRESERVED


def _is_control(c: str) -> bool:
    return unicodedata.category(c) == "Cc"


_UNEXPECTED = (
    "unexpected `{found}` in a placeholder: a placeholder is a column name `{{column}}` "
    "([a-z_][a-z0-9_$]*) or a quoted name `{{\"Column Name\"}}`; no spaces, formats, "
    "defaults or expressions"
)


class Template:
    """A key template such as ``category:{category_id}:products``, parsed exactly as the
    pipeline parses its ``[[rules]] keys`` (Rust ``cacheclear_rules::Template::parse``), so that
    :meth:`render` gives byte for byte the key the pipeline invalidates.

    Syntax:

    - ``{name}`` is a placeholder for column ``name`` (``[a-z_][a-z0-9_$]*``; upper case is
      refused, write ``{"categoryId"}`` for a case-sensitive name; inside quotes ``""`` is one
      ``"``).
    - Everything else is literal text without ``{``, ``}``, ``%`` or control characters.
    - Two placeholders must be separated by literal text holding a character outside
      ``A-Z a-z 0-9 - . _ ~ %`` (such as ``:``).
    - A template needs some literal text (``{id}`` alone is refused).

    Raises:
        TemplateError: the template does not parse; ``column`` is the 1-based position and the
            message the Rust one.

    Example::

        >>> Template("category:{category_id}:products").render({"category_id": "a:b"})
        'category:a%3Ab:products'
    """

    __slots__ = ("source", "columns", "_prefix", "_suffixes")

    source: str
    columns: Tuple[str, ...]

    def __init__(self, source: str) -> None:
        self.source = source
        prefix, parts = _parse(source)
        self._prefix = prefix
        #: The placeholder columns in order of appearance (a column used twice appears twice).
        self.columns = tuple(column for column, _ in parts)
        self._suffixes = tuple(suffix for _, suffix in parts)

    def render(self, values: Union[Mapping[str, ColumnValue], Sequence[ColumnValue]]) -> str:
        """The cache key for ``values``.

        Args:
            values: either a mapping from column name to value (extra entries, such as the
                other columns of a row, are ignored), or a sequence with one value per
                placeholder in :attr:`columns` order. Each value is the column's PostgreSQL
                **text output** — what ``psql`` prints, what ``SELECT col::text`` returns —
                as a ``str`` (``"t"`` for a true boolean, ``"2026-12-04 16:00:00+00"`` for a
                ``timestamptz`` under the server's settings), or an ``int`` for integer
                columns. Floats, booleans, ``Decimal`` and other types are refused: their
                Python text is not always PostgreSQL's.

        Returns:
            the key, with each value percent-encoded (see :func:`encode_value`).

        Raises:
            KeyRenderError: a column has no value, a value is neither ``str`` nor ``int`` (or
                is a ``str`` with lone surrogates), or the sequence has the wrong length; it
                names the column (also a ``ValueError`` and a ``TypeError``).
        """
        if isinstance(values, Mapping):
            seq: List[ColumnValue] = []
            for c in self.columns:
                if c not in values:
                    raise KeyRenderError(self.source, c, "no value given for this column")
                seq.append(values[c])
        elif isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise KeyRenderError(
                self.source,
                None,
                f"values must be a mapping of column to value or a sequence of "
                f"{len(self.columns)} value(s), not {type(values).__name__}",
            )
        else:
            seq = list(values)
            if len(seq) != len(self.columns):
                raise KeyRenderError(
                    self.source,
                    None,
                    f"{len(self.columns)} placeholder(s) ({', '.join(self.columns) or 'none'}); "
                    f"got {len(seq)} value(s)",
                )
        out = [self._prefix]
        for column, value, suffix in zip(self.columns, seq, self._suffixes):
            text = _text(self.source, column, value)
            try:
                out.append(encode_value(text))
            except UnicodeEncodeError:
                raise KeyRenderError(
                    self.source, column, "the value holds lone surrogates (not valid UTF-8 text)"
                ) from None
            out.append(suffix)
        return "".join(out)

    def __str__(self) -> str:
        return self.source

    def __repr__(self) -> str:
        return f"Template({self.source!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Template) and other.source == self.source

    def __hash__(self) -> int:
        return hash(self.source)


def _text(template: str, column: str, value: ColumnValue) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise KeyRenderError(
            template,
            column,
            f"the value is {type(value).__name__} {value!r}: pass the column's PostgreSQL text "
            "output as a str (e.g. 't' for true), or an int",
        )
    return value if isinstance(value, str) else str(value)


def _parse(source: str) -> Tuple[str, List[Tuple[str, str]]]:
    """Returns (prefix, [(column, suffix), ...])."""

    def err(column: int, problem: str, detail: str) -> TemplateError:
        return TemplateError(column, problem, detail, source)

    if not isinstance(source, str):
        raise TypeError(f"a key template is a str, not {type(source).__name__}")
    if source == "":
        raise err(1, "empty", "the template is empty")
    chars = list(source)
    n = len(chars)
    i = 0
    prefix: Optional[str] = None
    parts: List[List[str]] = []
    literal: List[str] = []
    while i < n:
        c = chars[i]
        col = i + 1
        if c == "{":
            column, i = _parse_placeholder(chars, i + 1, col, err)
            text = "".join(literal)
            literal = []
            if not parts:
                prefix = text
            else:
                if all(_is_encoded_alphabet(ch) for ch in text):
                    why = (
                        "but these two are adjacent"
                        if text == ""
                        else f"but the separator here is `{text}`"
                    )
                    raise err(
                        col,
                        "missing_separator",
                        "placeholders must be separated by literal text containing a character "
                        "outside `A-Z a-z 0-9 - . _ ~ %` (such as `:` or `/`), "
                        f"{why}: otherwise two different value tuples could produce the same key",
                    )
                parts[-1][1] = text
            parts.append([column, ""])
            continue
        if c == "}":
            raise err(
                col,
                "brace_in_literal",
                "`}` in literal text: braces are reserved for placeholders, and in a key they "
                "would break the Redis Cluster hash tag of the layout `{K}`",
            )
        if c == "%":
            raise err(
                col,
                "percent_in_literal",
                "`%` in literal text: `%` is the escape character of encoded values, so a "
                "literal `%` would make keys ambiguous",
            )
        if _is_control(c):
            raise err(col, "control_in_literal", f"control character U+{ord(c):04X} in literal text")
        literal.append(c)
        i += 1
    if not parts:
        prefix = "".join(literal)
    else:
        parts[-1][1] = "".join(literal)
    prefix = prefix or ""
    if len(prefix) + sum(len(s) for _, s in parts) == 0:
        raise err(
            1,
            "no_literal_text",
            "the template is a bare placeholder: add literal text such as `product:` so that "
            "keys are never empty and each kind of key has its own namespace",
        )
    return prefix, [(c, s) for c, s in parts]


def _parse_placeholder(chars: List[str], i: int, open_col: int, err) -> Tuple[str, int]:  # type: ignore[no-untyped-def]
    """Parses after a ``{`` at 1-based column ``open_col``; ``i`` is the index after it.
    Returns (column name, index after the closing ``}``)."""
    n = len(chars)
    unclosed = ("unclosed_placeholder", "`{` opens a placeholder that is never closed with `}`")
    empty = ("empty_placeholder", "empty placeholder: write a column name, e.g. `{id}`")
    nested = ("nested_placeholder", "`{` inside a placeholder: placeholders cannot nest")
    if i >= n:
        raise err(open_col, *unclosed)
    if chars[i] == "}":
        raise err(open_col, *empty)
    name: List[str] = []
    if chars[i] == '"':
        i += 1
        while True:
            if i >= n:
                raise err(open_col, "unterminated_quote", "quoted column name is missing its closing `\"`")
            c = chars[i]
            i += 1
            if c == '"':
                if i < n and chars[i] == '"':
                    name.append('"')
                    i += 1
                else:
                    break
            else:
                name.append(c)
        if i >= n:
            raise err(open_col, *unclosed)
        c = chars[i]
        if c == "}":
            if not name:
                raise err(open_col, *empty)
            return "".join(name), i + 1
        if c == "{":
            raise err(i + 1, *nested)
        raise err(i + 1, "unexpected_char", _UNEXPECTED.format(found=c))
    uppercase_at: Optional[int] = None
    while True:
        if i >= n:
            raise err(open_col, *unclosed)
        c = chars[i]
        col = i + 1
        i += 1
        if c == "}":
            break
        if c == "{":
            raise err(col, *nested)
        first = not name
        ok = ("a" <= c <= "z") or c == "_" or (not first and (("0" <= c <= "9") or c == "$"))
        if "A" <= c <= "Z":
            if uppercase_at is None:
                uppercase_at = col
        elif not ok:
            raise err(col, "unexpected_char", _UNEXPECTED.format(found=c))
        name.append(c)
    text = "".join(name)
    if uppercase_at is not None:
        raise err(
            uppercase_at,
            "uppercase_name",
            f"unquoted column name `{text}` has upper-case letters: PostgreSQL folds unquoted "
            f"names to lower case, so write `{{{text.lower()}}}` for a column created without "
            f'quotes, or `{{"{text}"}}` for a case-sensitive name',
        )
    return text, i

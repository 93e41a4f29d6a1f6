"""Unit tests of the pure parts: LSNs, the envelope, TTL jitter and backoff, XFetch, key
templates, configuration, the breaker's judgment."""

from __future__ import annotations

import json
import random
import re

import pytest

from cacheclear import (
    Config,
    InvalidConfig,
    StalenessConfig,
    Template,
    TemplateError,
    decode_envelope,
    encode_envelope,
    format_lsn,
    from_fixed_hex,
    jittered_ttl_ms,
    parse_lsn,
    to_fixed_hex,
    xfetch_should_refresh,
)
from cacheclear._breaker import Breaker, Snapshot, parse_namespace_reply
from cacheclear._ttl import backoff_pause_ms, next_backoff_ms
from harness import repo_root

# ----- LSNs -----


def test_lsn_forms() -> None:
    assert parse_lsn("0/16B6C50") == 0x16B6C50
    assert to_fixed_hex(parse_lsn("0/16B6C50")) == "00000000016B6C50"
    assert format_lsn(from_fixed_hex("00000000016B6C50")) == "0/16B6C50"
    assert from_fixed_hex(b"00000000016b6c50") == 0x16B6C50
    assert parse_lsn("16/b374d848") == (0x16 << 32) | 0xB374D848
    assert format_lsn((0x16 << 32) | 0xB374D848) == "16/B374D848"
    assert to_fixed_hex(parse_lsn("FFFFFFFF/FFFFFFFF")) == "FFFFFFFFFFFFFFFF"
    assert format_lsn(0) == "0/0" and to_fixed_hex(0) == "0000000000000000"
    rng = random.Random(7)
    for _ in range(1000):
        n = rng.getrandbits(64)
        assert parse_lsn(format_lsn(n)) == n
        assert from_fixed_hex(to_fixed_hex(n)) == n
        # Fixed-width strings order as the numbers do (what Lua's string compare relies on).
        m = rng.getrandbits(64)
        assert (to_fixed_hex(n) < to_fixed_hex(m)) == (n < m)


@pytest.mark.parametrize("bad", ["", "0", "0/", "/1", "1/2/3", "G/1", "123456789/0", "0x1/2", "1 /2", "-1/2"])
def test_lsn_rejects_bad_text(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_lsn(bad)


@pytest.mark.parametrize("bad", ["", "16B6C50", "00000000016B6C5", "00000000016B6C500", "+0000000016B6C50", "0/16B6C50"])
def test_fixed_hex_rejects_bad_text(bad: str) -> None:
    with pytest.raises(ValueError):
        from_fixed_hex(bad)


def test_lsn_range() -> None:
    with pytest.raises(ValueError):
        to_fixed_hex(-1)
    with pytest.raises(ValueError):
        format_lsn(1 << 64)


# ----- the envelope -----


def spec_example() -> str:
    """The envelope example of docs/protocol.md §3, as written there."""
    text = (repo_root() / "docs" / "protocol.md").read_text()
    m = re.search(r"```json\n(\{\"format\":1.*?)\n```", text)
    assert m, "docs/protocol.md §3 has a ```json envelope example"
    return m.group(1)


def test_envelope_writes_the_spec_bytes() -> None:
    example = spec_example()
    doc = json.loads(example)
    body = encode_envelope(
        doc["payload"],
        version=parse_lsn(doc["version"]),
        read_after=parse_lsn(doc["read_after"]),
        delta_ms=doc["delta_ms"],
        expiry_ms=doc["expiry_ms"],
        epoch=doc["epoch"],
    )
    assert body.decode() == example
    # Without a staleness config there is no epoch; a primary read has a null version.
    body = encode_envelope({"a": 1}, version=None, read_after=0, delta_ms=0, expiry_ms=5, epoch=None)
    assert body == b'{"format":1,"version":null,"read_after":"0/0","delta_ms":0,"expiry_ms":5,"payload":{"a":1}}'
    # An unreadable fence leaves read_after out (as the Rust client does).
    assert b"read_after" not in encode_envelope(1, version=None, read_after=None, delta_ms=0, expiry_ms=5, epoch=None)
    # Non-ASCII stays UTF-8, as serde_json writes it.
    assert "café".encode() in encode_envelope("café", version=None, read_after=0, delta_ms=0, expiry_ms=5, epoch=None)


def test_envelope_round_trip_and_unknown_fields() -> None:
    for payload in [{"id": 42, "price_cents": 1999}, [1, "x", None], "s", 0, None, True, 1.5]:
        body = encode_envelope(payload, version=0x10, read_after=0x8, delta_ms=3, expiry_ms=99, epoch=7)
        env = decode_envelope(body)
        assert env is not None
        assert env["payload"] == payload and type(env["payload"]) is type(payload)
        assert (env["version"], env["read_after"], env["epoch"]) == ("0/10", "0/8", 7)
    newer = b'{"format":1,"version":"0/10","delta_ms":1,"expiry_ms":2,"payload":"p","added_later":{"x":[1]}}'
    env = decode_envelope(newer)
    assert env is not None and env["payload"] == "p"
    assert decode_envelope(newer.decode()) is not None  # str as a decode_responses client gives


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1,2,3]",
        b"\xff\xfe",
        b'{"format":2,"version":null,"delta_ms":0,"expiry_ms":0,"payload":1}',
        b'{"format":true,"version":null,"delta_ms":0,"expiry_ms":0,"payload":1}',
        b'{"format":1.0,"version":null,"delta_ms":0,"expiry_ms":0,"payload":1}',
        b'{"format":1,"version":null,"delta_ms":0,"expiry_ms":0}',
        b'{"format":1,"version":null,"delta_ms":-1,"expiry_ms":0,"payload":1}',
        b'{"format":1,"version":null,"expiry_ms":0,"payload":1}',
        b'{"format":1,"version":"zz","delta_ms":0,"expiry_ms":0,"payload":1}',
        b'{"format":1,"version":null,"read_after":7,"delta_ms":0,"expiry_ms":0,"payload":1}',
        b'{"format":1,"version":null,"delta_ms":0,"expiry_ms":0,"payload":1,"epoch":-3}',
        b'{"format":1,"version":null,"delta_ms":0,"expiry_ms":0,"payload":NaN}',
        b'{"format":1,"version":null,"delta_ms":0,"expiry_ms":0,"payload":1} trailing',
    ],
)
def test_envelope_misses(raw: bytes) -> None:
    assert decode_envelope(raw) is None


def test_envelope_refuses_non_json_payloads() -> None:
    for bad in [{1, 2}, b"bytes", float("nan"), object()]:
        with pytest.raises((TypeError, ValueError)):
            encode_envelope(bad, version=None, read_after=0, delta_ms=0, expiry_ms=0, epoch=None)


# ----- TTLs, backoff, XFetch -----


def test_ttl_examples() -> None:
    # The Rust client's examples (crates/client/src/ttl.rs).
    assert jittered_ttl_ms(1000, 0.05, 0.0) == 950
    assert jittered_ttl_ms(1000, 0.05, 0.5) == 1000
    assert jittered_ttl_ms(1000, 0.05, 0.9999999) == 1050
    assert jittered_ttl_ms(1000, 0.0, 0.3) == 1000
    assert jittered_ttl_ms(0, 0.5, 0.0) == 1
    assert jittered_ttl_ms(1, 0.9, 0.0) == 1


def test_ttl_jitter_bounds() -> None:
    rng = random.Random(11)
    for _ in range(20000):
        base = rng.randint(1, 1 << 52)
        jitter = rng.random()
        ttl = jittered_ttl_ms(base, jitter, rng.random())
        assert ttl >= 1
        assert base * (1 - jitter) <= ttl <= base * (1 + jitter), (base, jitter, ttl)
    for _ in range(2000):
        assert jittered_ttl_ms(rng.randint(0, 100), rng.uniform(-5, 5), rng.uniform(-1, 2)) >= 1
    # The spread is really used: 600 s ± 5 % takes values across the whole band.
    ttls = [jittered_ttl_ms(600_000, 0.05, rng.random()) for _ in range(2000)]
    assert min(ttls) < 571_000 and max(ttls) > 629_000


def test_backoff() -> None:
    for u in [0.0, 0.3, 0.999]:
        assert 2.5 <= backoff_pause_ms(5, u) <= 5
    b, seen = 5.0, []
    for _ in range(8):
        seen.append(b)
        b = next_backoff_ms(b, 100)
    assert seen == [5, 10, 20, 40, 80, 100, 100, 100]


def test_xfetch() -> None:
    assert not xfetch_should_refresh(0, 100, 10_000, 1.0, 0.5)
    assert xfetch_should_refresh(10_000, 100, 10_000, 1.0, 1.0)
    assert xfetch_should_refresh(9_950, 100, 10_000, 1.0, 0.6)
    assert not xfetch_should_refresh(9_950, 100, 10_000, 1.0, 0.62)
    assert not xfetch_should_refresh(9_999, 100, 10_000, 0.0, 1e-300)
    assert xfetch_should_refresh(9_500, 1, 10_000, 1.0, 0.0)
    assert not xfetch_should_refresh(0, 1, 10_000, 1.0, 0.0)


# ----- templates -----


@pytest.mark.parametrize(
    "source,column,problem",
    [
        ("", 1, "empty"),
        ("p:{id", 3, "unclosed_placeholder"),
        ("p:{}", 3, "empty_placeholder"),
        ('p:{""}', 3, "empty_placeholder"),
        ("p:{a{b}}", 5, "nested_placeholder"),
        ("p:{id:x}", 6, "unexpected_char"),
        ("p:{ id}", 4, "unexpected_char"),
        ("p:{1d}", 4, "unexpected_char"),
        ("p:{categoryId}", 12, "uppercase_name"),
        ('p:{"ab}', 3, "unterminated_quote"),
        ("p:id}", 5, "brace_in_literal"),
        ("p%:{id}", 2, "percent_in_literal"),
        ("p\n{id}", 2, "control_in_literal"),
        ("p:{a}{b}", 6, "missing_separator"),
        ("p:{a}-x_{b}", 9, "missing_separator"),
        ("{id}", 1, "no_literal_text"),
    ],
)
def test_template_errors(source: str, column: int, problem: str) -> None:
    # The Rust crate's cases (crates/rules/src/template.rs, reports_syntax_errors_with_columns).
    with pytest.raises(TemplateError) as e:
        Template(source)
    assert (e.value.column, e.value.problem) == (column, problem)
    assert str(e.value).startswith(f"at column {column}: ")


def test_template_messages_and_rendering() -> None:
    msg = str(pytest.raises(TemplateError, Template, "p:{categoryId}").value)
    assert "{categoryid}" in msg and '{"categoryId"}' in msg
    msg = str(pytest.raises(TemplateError, Template, "p:{a}-x_{b}").value)
    assert "but the separator here is `-x_`" in msg
    t = Template('u:{"userId"}/{"a""b}"}')
    assert t.columns == ("userId", 'a"b}')
    assert t.render(["1", "2"]) == "u:1/2"
    assert Template("{id}:p").render({"id": "x"}) == "x:p"
    assert Template("o:{a}x-:y{b}.z").render(["p-x", "q:"]) == "o:p-xx-:yq%3A.z"
    # Values: str or int (PostgreSQL's text output); a row dict's other columns are ignored.
    t = Template("product:{id}")
    assert t.render({"id": 42, "name": "x"}) == "product:42" == t.render({"id": "42"})
    for bad in [True, 1.5, None, b"1"]:
        with pytest.raises(TypeError):
            t.render({"id": bad})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        t.render({"name": "x"})
    with pytest.raises(ValueError):
        t.render(["1", "2"])


# ----- configuration -----


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"lease_ms": 0}, "lease_ms"),
        ({"lease_wait_ms": -1}, "lease_wait_ms"),
        ({"backoff_initial_ms": 0}, "backoff_initial_ms"),
        ({"backoff_initial_ms": 50, "backoff_max_ms": 10}, "backoff_max_ms"),
        ({"ttl_base_ms": 0}, "ttl_base_ms"),
        ({"ttl_jitter": 1.0}, "ttl_jitter"),
        ({"ttl_jitter": -0.1}, "ttl_jitter"),
        ({"xfetch_beta": float("inf")}, "xfetch_beta"),
        ({"on_wait_timeout": "later"}, "on_wait_timeout"),
        ({"on_redis_error": "ignore"}, "on_redis_error"),
        ({"strict_key_prefixes": "balance:"}, "strict_key_prefixes"),
        ({"redis_timeout_ms": 0}, "redis_timeout_ms"),
        ({"lease_ms": True}, "lease_ms"),
    ],
)
def test_config_validation(changes: dict, field: str) -> None:
    with pytest.raises(InvalidConfig) as e:
        Config(**changes)
    assert e.value.field == field and f"`{field}`" in str(e.value)


def test_config_defaults_and_staleness() -> None:
    c = Config()
    assert (c.lease_ms, c.lease_wait_ms, c.backoff_initial_ms, c.backoff_max_ms) == (2000, 2500, 5, 100)
    assert (c.ttl_base_ms, c.ttl_jitter, c.redis_timeout_ms) == (600_000, 0.05, 500)
    assert c.on_wait_timeout == "load_without_filling" and c.on_redis_error == "fallback"
    s = StalenessConfig("shop")
    assert (s.max_staleness_ms, s.refresh_ms, s.max_bypass_loads, s.read_your_writes_wait_ms) == (5000, 250, 32, 1000)
    for kwargs, field in [
        ({"namespace": ""}, "staleness.namespace"),
        ({"namespace": "a{b"}, "staleness.namespace"),
        ({"namespace": "n", "refresh_ms": 6000}, "staleness.refresh_ms"),
        ({"namespace": "n", "max_bypass_loads": 0}, "staleness.max_bypass_loads"),
        ({"namespace": "n", "on_bypass_full": "drop"}, "staleness.on_bypass_full"),
    ]:
        with pytest.raises(InvalidConfig) as e:
            StalenessConfig(**kwargs)
        assert e.value.field == field
    c = Config.from_dict({"lease_ms": 5, "staleness": {"namespace": "shop", "refresh_ms": 50}, "strict_key_prefixes": ["b:"]})
    assert c.staleness == StalenessConfig("shop", refresh_ms=50) and c.is_strict_key("b:1") and not c.is_strict_key("p:1")
    with pytest.raises(InvalidConfig):
        Config.from_dict({"lease": 5})
    with pytest.raises(InvalidConfig):
        Config.from_dict({"staleness": {"namespace": "n", "refresh": 5}})


# ----- the breaker -----


def test_namespace_reply_judgment() -> None:
    s = parse_namespace_reply("n", [b"0000000000000010 0 30 1000 7", b"7", b"1500"])
    assert s == Snapshot(530, 7, 16)
    # A watermark of an older epoch counts as absent; garbage too.
    assert parse_namespace_reply("n", ["0000000000000010 0 30 1000 6", "7", "1500"]) == Snapshot(None, 7, 0)
    assert parse_namespace_reply("n", ["garbage", "x", "1500"]) == Snapshot(None, None, 0)
    assert parse_namespace_reply("n", ["", "", "1500"]) == Snapshot(None, None, 0)
    # A watermark written "after" Redis now (clock step) is not negative staleness.
    assert parse_namespace_reply("n", ["0000000000000010 -5 30 2000 7", "7", "1500"]).staleness_ms == 30
    for bad in [None, [], ["a", "b"], 3]:
        with pytest.raises(ValueError):
            parse_namespace_reply("n", bad)


def test_breaker_verdicts_age_on_the_monotonic_clock() -> None:
    b = Breaker(StalenessConfig("n", max_staleness_ms=1000, refresh_ms=100))
    assert b.verdict(0.0)[0] is False and b.due(0.0)
    sent = 10.0
    b.publish(sent, Snapshot(300, 7, 16))
    assert b.verdict(sent) == (True, 7, 16, "watermark_stale")
    assert b.verdict(sent + 0.700)[0] is True
    assert b.verdict(sent + 0.7015)[0] is False  # 300 + 701 ms > 1000
    assert abs(b.view.refresh_at - (sent + 0.1)) < 1e-9
    b.publish(sent, Snapshot(1001, 7, 16))
    assert b.verdict(sent)[:1] == (False,) and b.verdict(sent)[3] == "watermark_stale"
    b.publish(sent, Snapshot(None, 7, 16))
    assert b.verdict(sent)[3] == "watermark_missing" and not b.verdict(sent)[0]
    b.publish(sent, Snapshot(0, None, 0))
    assert b.verdict(sent)[3] == "epoch_missing" and not b.verdict(sent)[0]

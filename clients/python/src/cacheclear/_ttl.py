"""Value TTLs with jitter, the poll backoff, and the XFetch early-refresh decision. Pure
functions: the caller passes its random samples in."""

from __future__ import annotations

import math

__all__ = ["jittered_ttl_ms", "backoff_pause_ms", "next_backoff_ms", "xfetch_should_refresh"]


def jittered_ttl_ms(base_ms: int, jitter: float, unit: float) -> int:
    """TTL in ms: ``base_ms × (1 + jitter × (2·unit − 1))``, i.e. uniform in
    ``[base_ms × (1 − jitter), base_ms × (1 + jitter)]``, rounded half away from zero to whole
    ms, clamped into ``[ceil(base(1−j)), floor(base(1+j))]`` and never below 1 ms (the same
    function as the Rust client's ``jittered_ttl_ms``).

    Args:
        base_ms: the configured TTL, ms; 0 counts as 1.
        jitter: the relative spread, clamped into ``[0, 1)`` (0.05 = ±5 %; NaN counts as 0).
        unit: a uniform sample in ``[0, 1)`` (clamped; NaN counts as 0.5).
    """
    base_ms = max(int(base_ms), 1)
    jitter = 0.0 if math.isnan(jitter) else min(max(jitter, 0.0), 0.999_999)
    unit = 0.5 if math.isnan(unit) else min(max(unit, 0.0), 1.0)
    base = float(base_ms)
    lo = max(math.ceil(base * (1.0 - jitter)), 1)
    hi = max(math.floor(base * (1.0 + jitter)), lo)
    x = base * (1.0 + jitter * (2.0 * unit - 1.0))
    ttl = math.floor(x + 0.5)  # x > 0: round half away from zero, as Rust's f64::round
    return max(min(max(ttl, lo), hi), 1)


def backoff_pause_ms(backoff_ms: float, unit: float) -> float:
    """The pause before the next poll while another process holds the lease: full jitter in
    ``[backoff/2, backoff]`` ms, so pollers of one key in different processes spread out.
    ``unit`` is a uniform sample in ``[0, 1)``."""
    half = backoff_ms / 2.0
    return half + half * min(max(unit, 0.0), 1.0)


def next_backoff_ms(backoff_ms: float, max_ms: float) -> float:
    """The backoff after a poll: doubled, at most ``max_ms``."""
    return min(backoff_ms * 2.0, float(max_ms))


def xfetch_should_refresh(now_ms: float, delta_ms: float, expiry_ms: float, beta: float, unit: float) -> bool:
    """XFetch (Vattani et al., VLDB 2015): refresh early when ``now − δ·β·ln(u) ≥ expiry``.

    Args:
        now_ms: wall-clock Unix ms; expiry_ms: the envelope's ``expiry_ms``.
        delta_ms: δ, how long the load that produced the value took (the envelope's
            ``delta_ms``).
        beta: β ≥ 0 (1.0 is the paper's recommendation; NaN counts as 0).
        unit: a uniform sample in ``(0, 1]`` (clamped).
    """
    unit = 1.0 if math.isnan(unit) else min(max(unit, 5e-324), 1.0)
    beta = 0.0 if math.isnan(beta) else max(beta, 0.0)
    head_start = -float(delta_ms) * beta * math.log(unit)
    return float(now_ms) + head_start >= float(expiry_ms)

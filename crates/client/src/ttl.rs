//! Value TTLs with jitter, and the XFetch early-refresh decision (docs/architecture.md,
//! "Stampedes and avalanches").

/// TTL in milliseconds: `base_ms × (1 + jitter × (2u − 1))`, i.e. uniform in
/// `[base_ms × (1 − jitter), base_ms × (1 + jitter)]`, rounded to whole milliseconds and never
/// below 1 ms.
///
/// Spreading TTLs keeps keys that were filled together from expiring together (a cache
/// *avalanche*: every one of them misses in the same instant and the database takes all the
/// loads at once).
///
/// - `base_ms`: the configured TTL; 0 is treated as 1.
/// - `jitter`: the relative spread, clamped into `[0, 1)` (0.05 = ±5%; NaN counts as 0).
/// - `unit`: a uniform sample in `[0, 1)` (clamped), from the caller's random source so this
///   function stays pure and testable.
///
/// The result lies in `[ceil(base(1−j)), floor(base(1+j))]` (an interval that always contains
/// `base` itself) and is ≥ 1, so it is always a valid `PX` argument: Redis rejects `PX 0`, and a
/// key written without a TTL would never be reclaimed by a `volatile-*` eviction policy.
pub fn jittered_ttl_ms(base_ms: u64, jitter: f64, unit: f64) -> u64 {
    let base_ms = base_ms.max(1);
    let jitter = if jitter.is_nan() {
        0.0
    } else {
        jitter.clamp(0.0, 0.999_999)
    };
    let unit = if unit.is_nan() {
        0.5
    } else {
        unit.clamp(0.0, 1.0)
    };
    let base = base_ms as f64;
    let lo = (base * (1.0 - jitter)).ceil().max(1.0);
    let hi = (base * (1.0 + jitter)).floor().max(lo);
    let ttl = (base * (1.0 + jitter * (2.0 * unit - 1.0)))
        .round()
        .clamp(lo, hi);
    // `hi` is at most 2 × u64::MAX as f64; `as` saturates, and the clamp keeps us ≥ 1.
    (ttl as u64).max(1)
}

/// The XFetch early-refresh test (Vattani, Chierichetti, Lowenstein: "Optimal Probabilistic
/// Cache Stampede Prevention", VLDB 2015): refresh when `now − δ·β·ln(u) ≥ expiry`.
///
/// - `now_ms`, `expiry_ms`: wall-clock Unix milliseconds (the expiry stored in the envelope).
/// - `delta_ms` (δ): how long the load that produced the value took, in ms.
/// - `beta` (β): > 1 refreshes earlier, < 1 later; 1.0 is the paper's recommended value.
/// - `unit`: a uniform sample in `(0, 1]`; `ln(u) ≤ 0`, so `−δ·β·ln(u)` is a random head start
///   that grows with the cost of a load. Samples outside `(0, 1]` are clamped.
///
/// The probability of refreshing rises exponentially as the expiry nears, so with many readers
/// one of them (usually only one) reloads the value shortly before it expires, instead of all of
/// them missing at once when it does.
pub fn xfetch_should_refresh(
    now_ms: u64,
    delta_ms: u64,
    expiry_ms: u64,
    beta: f64,
    unit: f64,
) -> bool {
    let unit = if unit.is_nan() {
        1.0
    } else {
        unit.clamp(f64::MIN_POSITIVE, 1.0)
    };
    let beta = if beta.is_nan() { 0.0 } else { beta.max(0.0) };
    let head_start = -(delta_ms as f64) * beta * unit.ln();
    now_ms as f64 + head_start >= expiry_ms as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ttl_examples() {
        assert_eq!(jittered_ttl_ms(1000, 0.05, 0.0), 950);
        assert_eq!(jittered_ttl_ms(1000, 0.05, 0.5), 1000);
        assert_eq!(jittered_ttl_ms(1000, 0.05, 0.999_999_9), 1050);
        assert_eq!(jittered_ttl_ms(1000, 0.0, 0.3), 1000);
        assert_eq!(jittered_ttl_ms(0, 0.5, 0.0), 1);
        assert_eq!(jittered_ttl_ms(1, 0.9, 0.0), 1);
        assert_eq!(jittered_ttl_ms(u64::MAX, 0.5, 1.0), u64::MAX);
    }

    proptest! {
        /// Required test 4: for any base ≥ 1 ms and jitter in [0, 1), the TTL lies within
        /// [base(1−j), base(1+j)] and is ≥ 1.
        #[test]
        fn jitter_bounds(base in 1u64..=1u64 << 52, jitter in 0.0f64..1.0, unit in 0.0f64..1.0) {
            let ttl = jittered_ttl_ms(base, jitter, unit);
            let b = base as f64;
            prop_assert!(ttl >= 1);
            prop_assert!(ttl as f64 >= b * (1.0 - jitter), "ttl {ttl} < {}", b * (1.0 - jitter));
            prop_assert!(ttl as f64 <= b * (1.0 + jitter), "ttl {ttl} > {}", b * (1.0 + jitter));
        }

        #[test]
        fn jitter_never_zero(base in 0u64..100, jitter in -5.0f64..5.0, unit in -1.0f64..2.0) {
            prop_assert!(jittered_ttl_ms(base, jitter, unit) >= 1);
        }
    }

    #[test]
    fn xfetch_refreshes_only_near_expiry() {
        // Far from expiry: never (u = 0.5 gives a head start of δβ·0.69).
        assert!(!xfetch_should_refresh(0, 100, 10_000, 1.0, 0.5));
        // Past expiry: always.
        assert!(xfetch_should_refresh(10_000, 100, 10_000, 1.0, 1.0));
        // 50 ms before expiry with δ = 100 ms: refresh iff −100·ln(u) ≥ 50, i.e. u ≤ e^−0.5 ≈ 0.61.
        assert!(xfetch_should_refresh(9_950, 100, 10_000, 1.0, 0.6));
        assert!(!xfetch_should_refresh(9_950, 100, 10_000, 1.0, 0.62));
        // β = 0 turns it off until expiry.
        assert!(!xfetch_should_refresh(9_999, 100, 10_000, 0.0, 1e-300));
        // u → 0 is clamped, not −∞ / NaN.
        assert!(xfetch_should_refresh(9_500, 1, 10_000, 1.0, 0.0));
        assert!(!xfetch_should_refresh(0, 1, 10_000, 1.0, 0.0));
    }
}

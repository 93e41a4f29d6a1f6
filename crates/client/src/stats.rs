//! Counters: kept per [`crate::Client`] (read them with [`crate::Client::stats`]) and emitted
//! through the [`metrics`] facade as `cacheclear_client_<name>_total` counters.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($( $name:ident => $desc:literal ),* $(,)?) => {
        /// A snapshot of one [`crate::Client`]'s counters (shared by its clones), each a count of
        /// events since the client was created.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct Stats {
            $( #[doc = $desc] pub $name: u64, )*
        }

        #[derive(Debug, Default)]
        pub(crate) struct Counters {
            $( $name: AtomicU64, )*
        }

        /// Which counter to bump.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[allow(non_camel_case_types)]
        pub(crate) enum Counter {
            $( $name, )*
        }

        impl Counter {
            fn metric_name(self) -> &'static str {
                match self {
                    $( Counter::$name => concat!("cacheclear_client_", stringify!($name), "_total"), )*
                }
            }
        }

        impl Counters {
            pub(crate) fn incr(&self, c: Counter) {
                let cell = match c {
                    $( Counter::$name => &self.$name, )*
                };
                cell.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(c.metric_name()).increment(1);
            }

            pub(crate) fn snapshot(&self) -> Stats {
                Stats { $( $name: self.$name.load(Ordering::Relaxed), )* }
            }
        }

        /// Registers a description of every counter with the installed `metrics` recorder.
        /// Optional: counters work without it.
        pub fn describe_metrics() {
            $(
                metrics::describe_counter!(
                    Counter::$name.metric_name(),
                    $desc
                );
            )*
        }
    };
}

counters! {
    hits => "Reads answered from Redis (including answers found after waiting on another loader).",
    local_hits => "Reads answered from the in-process tier.",
    misses => "Reads whose first `GET` found nothing (or an envelope it could not decode).",
    loads => "Loader runs under a lease (the ones that may fill).",
    fills => "Fills that wrote the value.",
    fills_refused_lease_lost => "Fills refused because the lease was no longer ours (expired, or deleted by an invalidation: the \"stale set\" of the memcache paper).",
    fills_refused_fenced => "Fills refused because the fence was newer than the version read (a lagging replica).",
    fills_skipped_oom => "Reads that could not cache because Redis replied OOM (`maxmemory` reached, nothing evictable) to the lease or the fill: the loaded value is returned, not cached, and not counted as a Redis error.",
    lease_waits => "Reads that found another process's lease and waited.",
    lease_wait_timeouts => "Waits that reached `lease_wait_ms` without a value.",
    unfilled_loads => "Loader runs after a wait timeout, not filled (`WaitTimeoutPolicy::LoadWithoutFilling`).",
    early_refreshes => "Hits that won the XFetch draw and the lease, and reloaded early.",
    redis_errors => "Redis commands that failed (connection, timeout, unexpected reply), any step.",
    fallbacks => "Reads answered by the loader because Redis failed (`RedisErrorPolicy::Fallback`).",
    loader_errors => "Loader runs that returned an error.",
    strict_loads => "Reads that read the database directly (`ReadPolicy::Strict`).",
    coalesced => "Misses that joined another caller's in-flight read of the same key in this process.",
    coalesced_retries => "Joined reads whose shared answer was observed before they joined (it may predate an invalidation they must see), so they read again.",
    bypassed_watermark_stale => "Reads that bypassed the cache (loader, no fill) because the namespace's watermark was older than `max_staleness_ms`.",
    bypassed_watermark_missing => "Reads that bypassed the cache because the namespace has no watermark (pipeline never ran, or not since the last epoch bump) or it was unreadable.",
    bypassed_epoch_missing => "Reads that bypassed the cache because the namespace has no epoch (Redis lost it; the pipeline's next start bumps it).",
    bypass_waits => "Bypassing reads that waited because `max_bypass_loads` loads were running.",
    bypass_overloaded => "Bypassing reads that failed with `BypassOverloaded` (cap reached: policy `Fail`, or the wait ran out).",
    stale_served => "Reads served a cached value while the breaker was open (cap reached, policy `ServeStale`).",
    epoch_misses => "Cached values filled under an older epoch (or without one), treated as misses.",
    namespace_reads => "Round trips reading the namespace's watermark and epoch (at most one per `refresh_ms`).",
    ryw_waits => "`get_at_least` reads that waited for the watermark to pass their LSN.",
    ryw_loads => "`get_at_least` reads answered by the database because the watermark had not passed their LSN in time.",
    decode_errors => "Stored values that could not be decoded as an envelope of the requested type (treated as misses and overwritten by the next fill).",
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts() {
        let c = Counters::default();
        c.incr(Counter::hits);
        c.incr(Counter::hits);
        c.incr(Counter::fills_refused_fenced);
        let s = c.snapshot();
        assert_eq!(s.hits, 2);
        assert_eq!(s.fills_refused_fenced, 1);
        assert_eq!(s.misses, 0);
        assert_eq!(
            Counter::lease_waits.metric_name(),
            "cacheclear_client_lease_waits_total"
        );
        describe_metrics();
    }
}

//! Background DNS resolution for the registry.
//!
//! [`DnsCache`] keeps a set of hostnames resolved, following the semantics of
//! Envoy's `STRICT_DNS` clusters with `respect_dns_ttl: true`:
//!
//! - every A and AAAA record becomes an address; addresses are sorted and
//!   deduplicated, so "changed" means the set changed and the first address is
//!   stable for `DNS_ROUND_ROBIN`;
//! - a name is refreshed when its TTL expires, the TTL clamped to
//!   [`DnsConfig::min_ttl`] and [`DnsConfig::max_ttl`];
//! - a failed refresh keeps the last good answer (recording the error) and is
//!   retried with exponential backoff, like Envoy's `dns_failure_refresh_rate`;
//! - a name that never resolved has no answer.
//!
//! [`DnsCache::resolve_now`] serves ad-hoc names (wildcard hosts with
//! resolution `NONE`) from a small bounded cache honouring TTLs.

mod adhoc;
mod cache;
mod hickory;

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

pub use cache::DnsCache;
pub use hickory::HickoryLookup;

/// The current resolution of one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The A and AAAA addresses of the last successful lookup, sorted and deduplicated.
    pub addrs: Arc<[IpAddr]>,
    /// When the last successful lookup completed.
    pub resolved_at: tokio::time::Instant,
    /// The TTL of the last successful lookup after clamping: the answer is refreshed at `resolved_at + ttl`.
    pub ttl: Duration,
    /// The error of the latest lookup if it failed; `addrs` are then the last good answer.
    pub last_error: Option<String>,
}

/// Answers by normalised name; only names that resolved at least once appear.
pub type Answers = HashMap<String, Answer>;

/// Errors from resolving names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// The system resolver configuration could not be read.
    #[error("reading the system resolver configuration: {0}")]
    SystemConf(String),
    /// The resolver failed (server failure, network error, invalid name...).
    #[error("resolving {name}: {message}")]
    Resolve {
        /// The name looked up.
        name: String,
        /// What the resolver reported.
        message: String,
    },
    /// The name exists nowhere or has neither A nor AAAA records.
    #[error("resolving {name}: no A or AAAA records")]
    NoAddresses {
        /// The name looked up.
        name: String,
    },
    /// The lookup took longer than [`DnsConfig::lookup_timeout`].
    #[error("resolving {name}: timed out after {after:?}")]
    Timeout {
        /// The name looked up.
        name: String,
        /// The timeout that expired.
        after: Duration,
    },
}

/// One A + AAAA lookup of a name: the addresses and the smallest TTL of the records.
pub trait Lookup: Send + Sync + 'static {
    /// Looks `name` up, returning its addresses (any order, duplicates allowed) and their minimum TTL.
    fn lookup(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<(Vec<IpAddr>, Duration), DnsError>> + Send;
}

/// Timing and sizing of a [`DnsCache`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Shortest refresh interval: TTLs below it (including 0) are raised to it, so a TTL-0 name is not queried in a loop.
    pub min_ttl: Duration,
    /// Longest refresh interval: TTLs above it (and `/etc/hosts` entries, which hickory gives a day) are lowered to it, so changes are noticed.
    pub max_ttl: Duration,
    /// Delay before the first retry after a failed lookup; it doubles with each consecutive failure.
    pub failure_backoff_initial: Duration,
    /// Upper bound of the retry delay after failures.
    pub failure_backoff_max: Duration,
    /// A lookup taking longer than this fails with [`DnsError::Timeout`].
    pub lookup_timeout: Duration,
    /// How many names [`DnsCache::resolve_now`] keeps; beyond it the entries expiring soonest are evicted.
    pub adhoc_cache_size: usize,
}

impl Default for DnsConfig {
    /// Envoy-like defaults: TTLs clamped to 1 s..60 s (60 s is Istio's default
    /// `dnsRefreshRate`), failures retried after 1 s doubling up to 30 s,
    /// lookups bounded to 5 s, 256 ad-hoc names.
    fn default() -> Self {
        Self {
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(60),
            failure_backoff_initial: Duration::from_secs(1),
            failure_backoff_max: Duration::from_secs(30),
            lookup_timeout: Duration::from_secs(5),
            adhoc_cache_size: 256,
        }
    }
}

impl DnsConfig {
    /// The refresh interval for a record TTL: `ttl` clamped to `min_ttl..=max_ttl`.
    pub fn refresh_interval(&self, ttl: Duration) -> Duration {
        // `max` then `min` rather than `clamp`, which panics on a misconfigured min > max.
        ttl.max(self.min_ttl).min(self.max_ttl)
    }

    /// The retry delay after `failures` consecutive failures (1 for the first).
    pub fn failure_backoff(&self, failures: u32) -> Duration {
        let factor = 2u32.saturating_pow(failures.saturating_sub(1));
        self.failure_backoff_initial
            .saturating_mul(factor)
            .min(self.failure_backoff_max)
    }
}

/// The form names are kept in: lowercase, without a trailing dot.
pub fn normalize_name(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// Sorts and deduplicates addresses so that equal sets compare equal.
fn normalize_addrs(mut addrs: Vec<IpAddr>) -> Arc<[IpAddr]> {
    addrs.sort_unstable();
    addrs.dedup();
    addrs.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_lowercased_without_trailing_dot() {
        assert_eq!(normalize_name("API.Example.COM."), "api.example.com");
        assert_eq!(normalize_name("example.com"), "example.com");
    }

    #[test]
    fn addresses_are_sorted_and_deduplicated() {
        let addrs = normalize_addrs(vec![
            "::1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
        ]);
        let expected: Vec<IpAddr> = vec![
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            "::1".parse().unwrap(),
        ];
        assert_eq!(&*addrs, expected.as_slice());
    }

    #[test]
    fn refresh_interval_is_clamped() {
        let config = DnsConfig::default();
        assert_eq!(config.refresh_interval(Duration::ZERO), config.min_ttl);
        assert_eq!(
            config.refresh_interval(Duration::from_secs(30)),
            Duration::from_secs(30)
        );
        assert_eq!(
            config.refresh_interval(Duration::from_secs(86_400)),
            config.max_ttl
        );
    }

    #[test]
    fn failure_backoff_doubles_up_to_the_max() {
        let config = DnsConfig::default();
        let delays: Vec<u64> = (1..=7)
            .map(|n| config.failure_backoff(n).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(config.failure_backoff(u32::MAX), config.failure_backoff_max);
    }
}

//! The bounded cache behind `DnsCache::resolve_now`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use tokio::time::Instant;

/// Names resolved on demand, each until its (clamped) TTL expires.
#[derive(Debug)]
pub(crate) struct AdhocCache {
    capacity: usize,
    entries: HashMap<String, (Arc<[IpAddr]>, Instant)>,
}

impl AdhocCache {
    /// An empty cache holding at most `capacity` names.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: HashMap::new(),
        }
    }

    /// The addresses of `name` if they have not expired at `now`.
    pub(crate) fn get(&self, name: &str, now: Instant) -> Option<Arc<[IpAddr]>> {
        self.entries
            .get(name)
            .filter(|(_, expires_at)| *expires_at > now)
            .map(|(addrs, _)| addrs.clone())
    }

    /// Stores `addrs` for `name` until `expires_at`, evicting to stay within capacity.
    pub(crate) fn insert(
        &mut self,
        name: String,
        addrs: Arc<[IpAddr]>,
        expires_at: Instant,
        now: Instant,
    ) {
        if self.capacity == 0 {
            return;
        }
        if !self.entries.contains_key(&name) && self.entries.len() >= self.capacity {
            self.entries.retain(|_, (_, expiry)| *expiry > now);
            // Still full of live entries: drop the one that would expire first,
            // it is the least valuable. A linear scan is fine at this size.
            if self.entries.len() >= self.capacity {
                let victim = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, expiry))| *expiry)
                    .map(|(victim, _)| victim.clone());
                if let Some(victim) = victim {
                    self.entries.remove(&victim);
                }
            }
        }
        self.entries.insert(name, (addrs, expires_at));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn addrs(last: u8) -> Arc<[IpAddr]> {
        Arc::from([IpAddr::from([10, 0, 0, last])])
    }

    #[test]
    fn expired_entries_are_not_served() {
        let now = Instant::now();
        let mut cache = AdhocCache::new(4);
        cache.insert("a".into(), addrs(1), now + Duration::from_secs(5), now);
        assert_eq!(cache.get("a", now), Some(addrs(1)));
        assert_eq!(cache.get("a", now + Duration::from_secs(5)), None);
        assert_eq!(cache.get("b", now), None);
    }

    #[test]
    fn a_full_cache_drops_expired_entries_first_then_the_soonest_to_expire() {
        let now = Instant::now();
        let secs = Duration::from_secs;
        let mut cache = AdhocCache::new(2);
        cache.insert("a".into(), addrs(1), now + secs(1), now);
        cache.insert("b".into(), addrs(2), now + secs(10), now);

        let later = now + secs(2);
        cache.insert("c".into(), addrs(3), later + secs(20), later);
        assert_eq!(cache.entries.len(), 2);
        assert_eq!(cache.get("b", later), Some(addrs(2)));
        assert_eq!(cache.get("c", later), Some(addrs(3)));

        cache.insert("d".into(), addrs(4), later + secs(30), later);
        assert_eq!(cache.entries.len(), 2);
        assert_eq!(cache.get("b", later), None);
        assert_eq!(cache.get("c", later), Some(addrs(3)));
        assert_eq!(cache.get("d", later), Some(addrs(4)));
    }

    #[test]
    fn replacing_a_name_does_not_evict_another() {
        let now = Instant::now();
        let mut cache = AdhocCache::new(1);
        cache.insert("a".into(), addrs(1), now + Duration::from_secs(1), now);
        cache.insert("a".into(), addrs(2), now + Duration::from_secs(1), now);
        assert_eq!(cache.get("a", now), Some(addrs(2)));
    }

    #[test]
    fn zero_capacity_caches_nothing() {
        let now = Instant::now();
        let mut cache = AdhocCache::new(0);
        cache.insert("a".into(), addrs(1), now + Duration::from_secs(1), now);
        assert_eq!(cache.get("a", now), None);
    }
}

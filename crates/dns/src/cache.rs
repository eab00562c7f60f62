//! [`DnsCache`]: one refresh task per wanted name, answers published through `ArcSwap`.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::adhoc::AdhocCache;
use crate::{
    Answer, Answers, DnsConfig, DnsError, HickoryLookup, Lookup, normalize_addrs, normalize_name,
};

/// Keeps a set of names resolved in the background, honouring TTLs.
///
/// Readers call [`answers`](Self::answers) (lock-free) and
/// [`subscribe`](Self::subscribe) to learn when an address set changed.
pub struct DnsCache<L: Lookup = HickoryLookup> {
    lookup: L,
    config: DnsConfig,
    answers: ArcSwap<Answers>,
    changes: watch::Sender<u64>,
    /// Serialises every writer of `answers` (refresh tasks and `set_names`) so
    /// that a task cannot publish a name `set_names` just removed.
    refreshers: Mutex<HashMap<String, Refresher>>,
    next_refresher_id: AtomicU64,
    adhoc: Mutex<AdhocCache>,
}

/// The refresh task of one wanted name.
struct Refresher {
    /// Distinguishes this task from an earlier one for the same name, removed and re-added.
    id: u64,
    task: AbortHandle,
}

/// What a refresh task does after publishing a lookup's outcome.
enum Next {
    Sleep(Duration),
    Stop,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded maps are consistent between statements, so a panic elsewhere
    // while holding the lock leaves nothing half-written worth refusing.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<L: Lookup> DnsCache<L> {
    /// A cache resolving with `lookup`; it resolves nothing until [`set_names`](Self::set_names).
    pub fn new(lookup: L, config: DnsConfig) -> Arc<Self> {
        let adhoc = AdhocCache::new(config.adhoc_cache_size);
        Arc::new(Self {
            lookup,
            config,
            answers: ArcSwap::from_pointee(Answers::new()),
            changes: watch::Sender::new(0),
            refreshers: Mutex::new(HashMap::new()),
            next_refresher_id: AtomicU64::new(0),
            adhoc: Mutex::new(adhoc),
        })
    }

    /// Makes `names` the set kept resolved: new names are looked up now, names
    /// no longer listed stop being refreshed and leave [`answers`](Self::answers).
    ///
    /// Names are normalised with [`normalize_name`]; empty names are ignored.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime, when there is a new name to spawn a task for.
    pub fn set_names(self: &Arc<Self>, names: impl IntoIterator<Item = String>) {
        let wanted: HashSet<String> = names
            .into_iter()
            .map(|name| normalize_name(&name))
            .filter(|name| !name.is_empty())
            .collect();
        let mut refreshers = lock(&self.refreshers);

        let mut removed = Vec::new();
        refreshers.retain(|name, refresher| {
            let keep = wanted.contains(name);
            if !keep {
                refresher.task.abort();
                removed.push(name.clone());
            }
            keep
        });
        for name in wanted {
            if refreshers.contains_key(&name) {
                continue;
            }
            let id = self.next_refresher_id.fetch_add(1, Ordering::Relaxed);
            let task = tokio::spawn(refresh(Arc::downgrade(self), name.clone(), id));
            refreshers.insert(
                name,
                Refresher {
                    id,
                    task: task.abort_handle(),
                },
            );
        }

        if !removed.is_empty() {
            tracing::debug!(names = ?removed, "dns: stopped refreshing");
            let current = self.answers.load();
            if removed.iter().any(|name| current.contains_key(name)) {
                let mut next = Answers::clone(&current);
                for name in &removed {
                    next.remove(name);
                }
                self.answers.store(Arc::new(next));
                self.changes.send_modify(|version| *version += 1);
            }
        }
    }

    /// A snapshot of the answers of the wanted names that resolved at least once.
    pub fn answers(&self) -> Arc<Answers> {
        self.answers.load_full()
    }

    /// A receiver whose value is bumped whenever a name's address set changes
    /// (first resolution, new addresses, removal), not on identical refreshes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The addresses of `name` now: from the background answers if the name is
    /// wanted and resolved, else from the ad-hoc cache while its TTL lasts,
    /// else from a lookup (failures are not cached).
    pub async fn resolve_now(&self, name: &str) -> Result<Arc<[IpAddr]>, DnsError> {
        let name = normalize_name(name);
        if let Some(answer) = self.answers.load().get(&name) {
            return Ok(answer.addrs.clone());
        }
        if let Some(addrs) = lock(&self.adhoc).get(&name, Instant::now()) {
            return Ok(addrs);
        }
        let (addrs, ttl) = self.timed_lookup(&name).await?;
        let now = Instant::now();
        let ttl = self.config.refresh_interval(ttl);
        tracing::debug!(name = %name, addrs = ?addrs, ttl = ?ttl, "dns: resolved ad-hoc name");
        lock(&self.adhoc).insert(name, addrs.clone(), now + ttl, now);
        Ok(addrs)
    }

    /// One lookup bounded by the configured timeout, with normalised, non-empty addresses.
    async fn timed_lookup(&self, name: &str) -> Result<(Arc<[IpAddr]>, Duration), DnsError> {
        let after = self.config.lookup_timeout;
        let (addrs, ttl) = tokio::time::timeout(after, self.lookup.lookup(name))
            .await
            .map_err(|_| DnsError::Timeout {
                name: name.to_owned(),
                after,
            })??;
        if addrs.is_empty() {
            return Err(DnsError::NoAddresses {
                name: name.to_owned(),
            });
        }
        Ok((normalize_addrs(addrs), ttl))
    }

    /// Records the outcome of refresh task `id`'s lookup and says when to look up again.
    fn publish(
        &self,
        name: &str,
        id: u64,
        outcome: Result<(Arc<[IpAddr]>, Duration), DnsError>,
        failures: &mut u32,
    ) -> Next {
        let refreshers = lock(&self.refreshers);
        if refreshers
            .get(name)
            .is_none_or(|refresher| refresher.id != id)
        {
            return Next::Stop;
        }
        let current = self.answers.load();
        let previous = current.get(name);
        let (answer, changed, next) = match outcome {
            Ok((addrs, ttl)) => {
                *failures = 0;
                let ttl = self.config.refresh_interval(ttl);
                let changed = previous.is_none_or(|previous| previous.addrs != addrs);
                if changed {
                    tracing::info!(name, addrs = ?addrs, ttl = ?ttl, "dns: addresses changed");
                } else {
                    tracing::debug!(name, ttl = ?ttl, "dns: refreshed, addresses unchanged");
                }
                let answer = Answer {
                    addrs,
                    resolved_at: Instant::now(),
                    ttl,
                    last_error: None,
                };
                (Some(answer), changed, ttl)
            }
            Err(error) => {
                *failures = failures.saturating_add(1);
                let retry_in = self.config.failure_backoff(*failures);
                tracing::warn!(
                    name,
                    error = %error,
                    failures = *failures,
                    retry_in = ?retry_in,
                    keeping_last_good = previous.is_some(),
                    "dns: lookup failed"
                );
                let answer = previous.map(|previous| Answer {
                    last_error: Some(error.to_string()),
                    ..previous.clone()
                });
                (answer, false, retry_in)
            }
        };
        if let Some(answer) = answer {
            let mut next = Answers::clone(&current);
            next.insert(name.to_owned(), answer);
            self.answers.store(Arc::new(next));
        }
        if changed {
            self.changes.send_modify(|version| *version += 1);
        }
        Next::Sleep(next)
    }
}

impl<L: Lookup> Drop for DnsCache<L> {
    fn drop(&mut self) {
        // Tasks only hold a `Weak`, but one may be asleep for up to `max_ttl`:
        // end them now rather than at their next wake-up.
        for refresher in lock(&self.refreshers).values() {
            refresher.task.abort();
        }
    }
}

/// The refresh loop of one name, for as long as the cache lives and wants the name.
async fn refresh<L: Lookup>(cache: Weak<DnsCache<L>>, name: String, id: u64) {
    let mut failures = 0;
    loop {
        // Upgraded only for the lookup, so that a sleeping task does not keep
        // the cache alive.
        let Some(strong) = cache.upgrade() else {
            return;
        };
        let outcome = strong.timed_lookup(&name).await;
        let next = strong.publish(&name, id, outcome, &mut failures);
        drop(strong);
        match next {
            Next::Sleep(delay) => tokio::time::sleep(delay).await,
            Next::Stop => return,
        }
    }
}

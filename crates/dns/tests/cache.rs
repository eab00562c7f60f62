//! `DnsCache` against a scripted `Lookup`, on tokio's paused clock.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis_dns::{DnsCache, DnsConfig, DnsError, Lookup};
use tokio::time::{Instant, sleep, sleep_until, timeout};

/// One scripted reply of the fake resolver.
#[derive(Clone)]
enum Step {
    Reply(Vec<IpAddr>, Duration),
    Fail,
    /// Never answers, so that the cache's timeout fires.
    Hang,
}

#[derive(Default)]
struct Script {
    steps: HashMap<String, VecDeque<Step>>,
    calls: HashMap<String, Vec<Instant>>,
}

/// A `Lookup` replaying steps per name (the last one repeats) and recording when it was called.
#[derive(Clone, Default)]
struct Fake(Arc<Mutex<Script>>);

impl Fake {
    fn script(&self, name: &str, steps: impl IntoIterator<Item = Step>) {
        let mut script = self.0.lock().unwrap();
        script
            .steps
            .entry(name.to_owned())
            .or_default()
            .extend(steps);
    }

    fn calls(&self, name: &str) -> Vec<Instant> {
        let script = self.0.lock().unwrap();
        script.calls.get(name).cloned().unwrap_or_default()
    }

    fn next_step(&self, name: &str) -> Step {
        let mut script = self.0.lock().unwrap();
        script
            .calls
            .entry(name.to_owned())
            .or_default()
            .push(Instant::now());
        let steps = script.steps.get_mut(name).expect("unscripted name");
        if steps.len() > 1 {
            steps.pop_front().unwrap()
        } else {
            steps.front().cloned().expect("empty script")
        }
    }
}

impl Lookup for Fake {
    async fn lookup(&self, name: &str) -> Result<(Vec<IpAddr>, Duration), DnsError> {
        match self.next_step(name) {
            Step::Reply(addrs, ttl) => Ok((addrs, ttl)),
            Step::Fail => Err(DnsError::Resolve {
                name: name.to_owned(),
                message: "SERVFAIL".to_owned(),
            }),
            Step::Hang => std::future::pending().await,
        }
    }
}

fn ip(addr: &str) -> IpAddr {
    addr.parse().unwrap()
}

fn ips(addrs: &[&str]) -> Vec<IpAddr> {
    addrs.iter().map(|addr| ip(addr)).collect()
}

fn reply(addrs: &[&str], ttl_secs: u64) -> Step {
    Step::Reply(ips(addrs), Duration::from_secs(ttl_secs))
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn cache(fake: &Fake) -> Arc<DnsCache<Fake>> {
    DnsCache::new(fake.clone(), DnsConfig::default())
}

/// Lets freshly spawned tasks run without moving the paused clock.
async fn settle() {
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn new_names_resolve_at_once_sorted_and_deduplicated() {
    let fake = Fake::default();
    fake.script(
        "api.example.com",
        [reply(
            &["2001:db8::1", "10.0.0.2", "10.0.0.1", "10.0.0.2"],
            30,
        )],
    );
    let cache = cache(&fake);
    let mut changes = cache.subscribe();
    let start = Instant::now();

    cache.set_names(["API.Example.com.".to_owned()]);
    timeout(secs(1), changes.changed()).await.unwrap().unwrap();

    assert_eq!(fake.calls("api.example.com"), [start]);
    let answers = cache.answers();
    let answer = &answers["api.example.com"];
    assert_eq!(
        &*answer.addrs,
        ips(&["10.0.0.1", "10.0.0.2", "2001:db8::1"])
    );
    assert_eq!(answer.resolved_at, start);
    assert_eq!(answer.ttl, secs(30));
    assert_eq!(answer.last_error, None);
    assert_eq!(*changes.borrow_and_update(), 1);
}

#[tokio::test(start_paused = true)]
async fn refresh_happens_when_the_ttl_expires_not_before() {
    let fake = Fake::default();
    fake.script("a.test", [reply(&["10.0.0.1"], 10)]);
    let cache = cache(&fake);
    let start = Instant::now();
    cache.set_names(["a.test".to_owned()]);

    sleep_until(start + secs(10) - Duration::from_millis(1)).await;
    assert_eq!(fake.calls("a.test"), [start]);

    sleep_until(start + secs(25)).await;
    assert_eq!(
        fake.calls("a.test"),
        [start, start + secs(10), start + secs(20)]
    );
    assert_eq!(cache.answers()["a.test"].resolved_at, start + secs(20));
}

#[tokio::test(start_paused = true)]
async fn ttls_are_clamped_to_the_configured_bounds() {
    let fake = Fake::default();
    fake.script("zero.test", [reply(&["10.0.0.1"], 0)]);
    fake.script("huge.test", [reply(&["10.0.0.2"], 86_400)]);
    let config = DnsConfig {
        min_ttl: secs(2),
        max_ttl: secs(45),
        ..DnsConfig::default()
    };
    let cache = DnsCache::new(fake.clone(), config);
    let start = Instant::now();
    cache.set_names(["zero.test".to_owned(), "huge.test".to_owned()]);

    sleep_until(start + secs(91)).await;
    assert_eq!(
        fake.calls("zero.test"),
        (0..=45).map(|n| start + secs(2 * n)).collect::<Vec<_>>()
    );
    assert_eq!(
        fake.calls("huge.test"),
        [start, start + secs(45), start + secs(90)]
    );
    let answers = cache.answers();
    assert_eq!(answers["zero.test"].ttl, secs(2));
    assert_eq!(answers["huge.test"].ttl, secs(45));
}

#[tokio::test(start_paused = true)]
async fn only_a_changed_address_set_bumps_subscribers() {
    let fake = Fake::default();
    fake.script(
        "a.test",
        [
            reply(&["10.0.0.1", "10.0.0.2"], 5),
            // The same set in another order, with a duplicate: not a change.
            reply(&["10.0.0.2", "10.0.0.1", "10.0.0.2"], 5),
            reply(&["10.0.0.3"], 5),
        ],
    );
    let cache = cache(&fake);
    let mut changes = cache.subscribe();
    let start = Instant::now();
    cache.set_names(["a.test".to_owned()]);
    settle().await;
    assert_eq!(*changes.borrow_and_update(), 1);

    sleep_until(start + secs(6)).await;
    assert_eq!(fake.calls("a.test").len(), 2);
    assert!(!changes.has_changed().unwrap());
    let answer = cache.answers()["a.test"].clone();
    assert_eq!(&*answer.addrs, ips(&["10.0.0.1", "10.0.0.2"]));
    assert_eq!(answer.resolved_at, start + secs(5));

    sleep_until(start + secs(11)).await;
    assert!(changes.has_changed().unwrap());
    assert_eq!(*changes.borrow_and_update(), 2);
    assert_eq!(&*cache.answers()["a.test"].addrs, ips(&["10.0.0.3"]));
}

#[tokio::test(start_paused = true)]
async fn a_failed_refresh_keeps_the_last_answer_and_backs_off_to_the_max() {
    let fake = Fake::default();
    fake.script("a.test", [reply(&["10.0.0.1"], 5)]);
    fake.script("a.test", std::iter::repeat_n(Step::Fail, 7));
    fake.script("a.test", [reply(&["10.0.0.1"], 5)]);
    let config = DnsConfig {
        failure_backoff_initial: secs(1),
        failure_backoff_max: secs(10),
        ..DnsConfig::default()
    };
    let cache = DnsCache::new(fake.clone(), config);
    let mut changes = cache.subscribe();
    let start = Instant::now();
    cache.set_names(["a.test".to_owned()]);
    settle().await;
    assert_eq!(*changes.borrow_and_update(), 1);

    // The first failure at 5 s, then retries after 1, 2, 4, 8, 10, 10 s.
    let failed_at: Vec<Instant> = [5, 6, 8, 12, 20, 30, 40]
        .into_iter()
        .map(|s| start + secs(s))
        .collect();
    sleep_until(start + secs(45)).await;
    let calls = fake.calls("a.test");
    assert_eq!(calls[1..8], failed_at);

    // The eighth lookup, at 50 s, succeeds: the error clears and the TTL schedule resumes.
    assert_eq!(calls.len(), 8);
    let stale = cache.answers()["a.test"].clone();
    assert_eq!(&*stale.addrs, ips(&["10.0.0.1"]));
    assert_eq!(stale.resolved_at, start);
    assert!(stale.last_error.as_deref().unwrap().contains("SERVFAIL"));
    assert!(!changes.has_changed().unwrap());

    sleep_until(start + secs(56)).await;
    assert_eq!(
        fake.calls("a.test")[8..],
        [start + secs(50), start + secs(55)]
    );
    let fresh = cache.answers()["a.test"].clone();
    assert_eq!(fresh.last_error, None);
    assert_eq!(fresh.resolved_at, start + secs(55));
    assert!(!changes.has_changed().unwrap());
}

#[tokio::test(start_paused = true)]
async fn a_name_that_never_resolved_has_no_answer_and_keeps_being_retried() {
    let fake = Fake::default();
    fake.script("down.test", [Step::Fail]);
    fake.script("up.test", [reply(&["10.0.0.1"], 60)]);
    let cache = cache(&fake);
    let changes = cache.subscribe();
    let start = Instant::now();
    cache.set_names(["down.test".to_owned(), "up.test".to_owned()]);

    sleep_until(start + secs(4)).await;
    assert!(!cache.answers().contains_key("down.test"));
    assert!(cache.answers().contains_key("up.test"));
    assert_eq!(
        fake.calls("down.test"),
        [start, start + secs(1), start + secs(3)]
    );
    assert_eq!(*changes.borrow(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_lookup_that_hangs_times_out_as_a_failure() {
    let fake = Fake::default();
    fake.script("slow.test", [Step::Hang]);
    let config = DnsConfig {
        lookup_timeout: secs(3),
        ..DnsConfig::default()
    };
    let cache = DnsCache::new(fake.clone(), config);
    let start = Instant::now();
    cache.set_names(["slow.test".to_owned()]);

    // Times out at 3 s, retried 1 s later, times out at 7 s, retried at 9 s.
    sleep_until(start + secs(10)).await;
    assert_eq!(
        fake.calls("slow.test"),
        [start, start + secs(4), start + secs(9)]
    );
    assert!(cache.answers().is_empty());
    let error = cache.resolve_now("slow.test").await.unwrap_err();
    assert_eq!(
        error,
        DnsError::Timeout {
            name: "slow.test".to_owned(),
            after: secs(3)
        }
    );
}

#[tokio::test(start_paused = true)]
async fn a_removed_name_stops_refreshing_and_leaves_the_answers() {
    let fake = Fake::default();
    fake.script("a.test", [reply(&["10.0.0.1"], 5)]);
    fake.script("b.test", [reply(&["10.0.0.2"], 5)]);
    let cache = cache(&fake);
    let mut changes = cache.subscribe();
    let start = Instant::now();
    cache.set_names(["a.test".to_owned(), "b.test".to_owned()]);
    settle().await;
    assert_eq!(*changes.borrow_and_update(), 2);

    cache.set_names(["b.test".to_owned()]);
    assert!(changes.has_changed().unwrap());
    assert_eq!(*changes.borrow_and_update(), 3);
    assert!(!cache.answers().contains_key("a.test"));

    sleep_until(start + secs(29)).await;
    assert_eq!(fake.calls("a.test"), [start]);
    assert_eq!(fake.calls("b.test").len(), 6);
    assert!(!changes.has_changed().unwrap());

    // Re-adding the name resolves it afresh.
    cache.set_names(["a.test".to_owned(), "b.test".to_owned()]);
    settle().await;
    assert_eq!(fake.calls("a.test"), [start, start + secs(29)]);
    assert!(cache.answers().contains_key("a.test"));
}

#[tokio::test(start_paused = true)]
async fn a_name_removed_during_its_lookup_is_not_published() {
    let fake = Fake::default();
    fake.script("a.test", [Step::Hang]);
    let cache = cache(&fake);
    let changes = cache.subscribe();
    cache.set_names(["a.test".to_owned()]);
    settle().await;
    assert_eq!(fake.calls("a.test").len(), 1);

    cache.set_names([]);
    sleep(secs(60)).await;
    assert_eq!(fake.calls("a.test").len(), 1);
    assert!(cache.answers().is_empty());
    assert_eq!(*changes.borrow(), 0);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_cache_stops_its_refresh_tasks() {
    let fake = Fake::default();
    fake.script("a.test", [reply(&["10.0.0.1"], 5)]);
    let cache = cache(&fake);
    cache.set_names(["a.test".to_owned()]);
    settle().await;
    drop(cache);

    sleep(secs(60)).await;
    assert_eq!(fake.calls("a.test").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn resolve_now_caches_within_the_ttl_and_looks_up_again_after() {
    let fake = Fake::default();
    fake.script(
        "x.wild.test",
        [
            reply(&["10.0.0.2", "10.0.0.1"], 10),
            reply(&["10.0.0.3"], 10),
        ],
    );
    let cache = cache(&fake);
    let start = Instant::now();

    let first = cache.resolve_now("X.wild.test.").await.unwrap();
    assert_eq!(&*first, ips(&["10.0.0.1", "10.0.0.2"]));
    sleep_until(start + secs(10) - Duration::from_millis(1)).await;
    assert_eq!(cache.resolve_now("x.wild.test").await.unwrap(), first);
    assert_eq!(fake.calls("x.wild.test").len(), 1);

    sleep_until(start + secs(10)).await;
    let second = cache.resolve_now("x.wild.test").await.unwrap();
    assert_eq!(&*second, ips(&["10.0.0.3"]));
    assert_eq!(fake.calls("x.wild.test").len(), 2);
    // Ad-hoc names are not background names.
    assert!(cache.answers().is_empty());
}

#[tokio::test(start_paused = true)]
async fn resolve_now_does_not_cache_failures() {
    let fake = Fake::default();
    fake.script(
        "x.wild.test",
        [
            Step::Fail,
            Step::Reply(Vec::new(), secs(10)),
            reply(&["10.0.0.1"], 10),
        ],
    );
    let cache = cache(&fake);

    assert!(matches!(
        cache.resolve_now("x.wild.test").await,
        Err(DnsError::Resolve { .. })
    ));
    assert_eq!(
        cache.resolve_now("x.wild.test").await,
        Err(DnsError::NoAddresses {
            name: "x.wild.test".to_owned()
        })
    );
    assert_eq!(
        &*cache.resolve_now("x.wild.test").await.unwrap(),
        ips(&["10.0.0.1"])
    );
    assert_eq!(fake.calls("x.wild.test").len(), 3);
}

#[tokio::test(start_paused = true)]
async fn resolve_now_serves_background_names_from_their_answers() {
    let fake = Fake::default();
    fake.script("a.test", [reply(&["10.0.0.1"], 30)]);
    let cache = cache(&fake);
    cache.set_names(["a.test".to_owned()]);
    settle().await;

    assert_eq!(
        &*cache.resolve_now("A.test").await.unwrap(),
        ips(&["10.0.0.1"])
    );
    assert_eq!(fake.calls("a.test").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_ad_hoc_cache_is_bounded() {
    let fake = Fake::default();
    for name in ["a.test", "b.test", "c.test"] {
        fake.script(name, [reply(&["10.0.0.1"], 30)]);
    }
    let config = DnsConfig {
        adhoc_cache_size: 2,
        ..DnsConfig::default()
    };
    let cache = DnsCache::new(fake.clone(), config);
    for name in ["a.test", "b.test", "c.test", "c.test", "a.test"] {
        cache.resolve_now(name).await.unwrap();
        sleep(secs(1)).await;
    }
    // "a" expired soonest when "c" came in, so it was evicted and looked up again.
    assert_eq!(fake.calls("a.test").len(), 2);
    assert_eq!(fake.calls("b.test").len(), 1);
    assert_eq!(fake.calls("c.test").len(), 1);
}

//! Load-balancing algorithms and per-endpoint state.
//!
//! Pure: no I/O, no locks, no allocation per pick. A [`Balancer`] is built once per
//! cluster snapshot from endpoint weights and shared [`EndpointState`]s; the states outlive
//! snapshots so that in-flight request counts carry across config reloads.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

mod hash;
pub mod outlier;
mod priority;
mod slow_start;
mod xxhash;

pub use hash::{
    DEFAULT_MAGLEV_TABLE_SIZE, DEFAULT_MAXIMUM_RING_SIZE, DEFAULT_MINIMUM_RING_SIZE, is_prime,
};
pub use priority::{Group, Layout, PreviousPriorities};
pub use slow_start::SlowStart;
pub use xxhash::xxhash64;

use hash::HashTable;
use priority::Layers;

/// A load-balancing algorithm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Policy {
    /// Power of two choices on active requests per weight; Istio's default.
    #[default]
    LeastRequest,
    /// Smooth weighted round robin.
    RoundRobin,
    /// Uniform random over the endpoints, weights ignored, as Envoy's RANDOM.
    Random,
    /// Envoy's ring hash: a request's hash picks the next point on a ring of endpoint keys.
    RingHash {
        /// Fewest points on the ring.
        minimum_ring_size: u64,
        /// Most points on the ring.
        maximum_ring_size: u64,
    },
    /// Envoy's Maglev: a request's hash picks a slot of a table filled by weight.
    Maglev {
        /// Slots in the table (a prime).
        table_size: u64,
    },
}

impl Policy {
    /// Whether the policy picks by a request's hash.
    pub fn is_consistent_hash(self) -> bool {
        matches!(self, Policy::RingHash { .. } | Policy::Maglev { .. })
    }
}

/// One endpoint as a [`Balancer`] is built from it.
#[derive(Debug, Clone)]
pub struct Member {
    /// Load-balancing weight; 0 counts as 1.
    pub weight: u32,
    /// Its live counters.
    pub state: Arc<EndpointState>,
    /// What consistent hashing places it by: Envoy hashes the address as `IP:PORT`
    /// (`[IP]:PORT` for IPv6).
    pub key: String,
}

/// Live counters of one endpoint, shared by every balancer that includes it.
#[derive(Debug)]
pub struct EndpointState {
    active: AtomicU64,
    total: AtomicU64,
    connections: AtomicU32,
    /// When the endpoint joined its cluster: slow start counts its warm-up from here.
    added: Instant,
    /// Outlier detection's view of the endpoint.
    pub outlier: outlier::Outlier,
}

impl Default for EndpointState {
    fn default() -> Self {
        Self::new()
    }
}

impl EndpointState {
    /// A state with no requests, of an endpoint that joins now.
    pub fn new() -> Self {
        Self::added_at(Instant::now())
    }

    /// A state with no requests, of an endpoint that joined its cluster `at`.
    pub fn added_at(at: Instant) -> Self {
        EndpointState {
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            connections: AtomicU32::new(0),
            added: at,
            outlier: outlier::Outlier::default(),
        }
    }

    /// When the endpoint joined its cluster.
    pub fn added(&self) -> Instant {
        self.added
    }

    /// Requests in flight.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Requests ever started.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Upstream connections open to the endpoint, idle ones included.
    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::Acquire)
    }

    /// Counts a connection as open until the guard is dropped.
    pub fn open_connection(self: &Arc<Self>) -> ConnectionGuard {
        self.connections.fetch_add(1, Ordering::AcqRel);
        ConnectionGuard {
            state: Arc::clone(self),
        }
    }

    /// Counts a request as started; it stays active until the guard is dropped.
    pub fn start(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        ActiveGuard {
            state: Arc::clone(self),
        }
    }
}

/// An active request on an endpoint; dropping it ends the request.
#[derive(Debug)]
#[must_use = "the request counts as active only while the guard is alive"]
pub struct ActiveGuard {
    state: Arc<EndpointState>,
}

impl ActiveGuard {
    /// The endpoint the request runs on.
    pub fn state(&self) -> &Arc<EndpointState> {
        &self.state
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.state.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An open upstream connection to an endpoint; dropping it counts the connection closed.
#[derive(Debug)]
#[must_use = "the connection counts as open only while the guard is alive"]
pub struct ConnectionGuard {
    state: Arc<EndpointState>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.state.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Picks endpoints of one cluster by a [`Policy`] and the endpoints' weights.
#[derive(Debug)]
pub struct Balancer {
    policy: Policy,
    weights: Box<[u64]>,
    states: Box<[Arc<EndpointState>]>,
    /// `cumulative[i]` is the sum of the weights of endpoints `0..=i`.
    cumulative: Box<[u64]>,
    total: u64,
    /// Step through the weight space for round robin; coprime with `total`, so one cycle
    /// of `total` picks visits every unit of weight exactly once.
    stride: u64,
    cursor: AtomicU64,
    /// The ring or Maglev table of a consistent-hash policy.
    table: Option<HashTable>,
    /// Priorities and localities, when built by [`Balancer::layered`]: picks go through
    /// them instead of the flat set.
    layers: Option<Box<Layers>>,
    /// Slow start, while some endpoint may still be warming up; out of line, as few
    /// clusters have it and a mesh has a balancer per cluster and locality.
    warmup: Option<Box<Warmup>>,
}

/// A balancer's slow start and the instant its last endpoint is warm.
#[derive(Debug, Clone, Copy)]
struct Warmup {
    slow_start: SlowStart,
    until: Instant,
}

impl Balancer {
    /// A balancer over `endpoints`; a consistent-hash policy builds its ring or table here,
    /// off the data path.
    pub fn new(policy: Policy, endpoints: Vec<Member>) -> Self {
        let weights: Box<[u64]> = endpoints
            .iter()
            .map(|m| u64::from(m.weight.max(1)))
            .collect();
        let keys: Vec<String> = if policy.is_consistent_hash() {
            endpoints.iter().map(|m| m.key.clone()).collect()
        } else {
            Vec::new()
        };
        let table = match policy {
            Policy::RingHash {
                minimum_ring_size,
                maximum_ring_size,
            } => Some(HashTable::ring(
                &keys,
                &weights,
                minimum_ring_size,
                maximum_ring_size,
            )),
            Policy::Maglev { table_size } => Some(HashTable::maglev(&keys, &weights, table_size)),
            _ => None,
        };
        let states: Box<[Arc<EndpointState>]> = endpoints.into_iter().map(|m| m.state).collect();
        let cumulative: Box<[u64]> = weights
            .iter()
            .scan(0u64, |sum, w| {
                *sum += w;
                Some(*sum)
            })
            .collect();
        let total = cumulative.last().copied().unwrap_or(0);
        Balancer {
            policy,
            weights,
            states,
            cumulative,
            total,
            stride: stride(total),
            cursor: AtomicU64::new(0),
            table,
            layers: None,
            warmup: None,
        }
    }

    /// Applies Envoy's slow start to a round robin or least request balancer: an endpoint
    /// younger than the window gets a share of its weight that grows with its age. The
    /// other policies ignore it, as Envoy's do. Nothing changes once the youngest endpoint
    /// is past the window, so the picks of a settled cluster take the plain path.
    pub fn with_slow_start(mut self, slow_start: Option<SlowStart>) -> Self {
        let applies = matches!(self.policy, Policy::RoundRobin | Policy::LeastRequest);
        let youngest = self.states.iter().map(|s| s.added).max();
        self.warmup = slow_start
            .filter(|s| applies && !s.window.is_zero())
            .zip(youngest)
            .and_then(|(slow_start, youngest)| {
                Some(Box::new(Warmup {
                    slow_start,
                    until: youngest.checked_add(slow_start.window)?,
                }))
            });
        self
    }

    /// A balancer over `endpoints` grouped into priorities and localities by `layout`, as
    /// Envoy balances an EDS cluster: each pick chooses a priority by load, then a
    /// locality (when locality-weighted), then an endpoint by `policy`, with `slow_start`
    /// (see [`Balancer::with_slow_start`]).
    pub fn layered(
        policy: Policy,
        endpoints: Vec<Member>,
        layout: Layout,
        slow_start: Option<SlowStart>,
    ) -> Self {
        let layers = Layers::new(policy, &endpoints, layout, slow_start);
        // The flat set serves only the per-endpoint accessors; rings live in the cells.
        let flat_policy = if policy.is_consistent_hash() {
            Policy::Random
        } else {
            policy
        };
        Balancer {
            policy,
            layers: Some(Box::new(layers)),
            ..Balancer::new(flat_policy, endpoints)
        }
    }

    /// Picks an endpoint not in `tried`, a consistent-hash policy by `hash`, the load of
    /// priorities `previous` leaves given to the others; endpoints `healthy` rejects (outlier ejection) count as unhealthy for the priority load and
    /// are avoided unless the healthy share is below `panic_threshold` percent (Envoy's
    /// panic mode; 0 disables it). Endpoints still warming up at `now` weigh less (slow
    /// start). `None` when there is no endpoint or no healthy one may be used (Envoy's
    /// `no healthy upstream`).
    pub fn choose(
        &self,
        hash: Option<u64>,
        (tried, previous): (&[usize], Option<PreviousPriorities<'_>>),
        healthy: Option<&dyn Fn(usize) -> bool>,
        panic_threshold: f64,
        now: Instant,
    ) -> Option<usize> {
        match &self.layers {
            Some(layers) => {
                layers.pick(hash, (tried, previous), healthy, panic_threshold, Some(now))
            }
            None => self.select(hash, tried, Some(now)),
        }
    }

    /// The policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Number of endpoints.
    pub fn len(&self) -> usize {
        self.states.len()
    }

    /// Whether there are no endpoints.
    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// The effective weight of endpoint `index` (at least 1).
    pub fn weight(&self, index: usize) -> Option<u64> {
        self.weights.get(index).copied()
    }

    /// The shared state of endpoint `index`.
    pub fn state(&self, index: usize) -> Option<&Arc<EndpointState>> {
        self.states.get(index)
    }

    /// Picks an endpoint, as after every endpoint's warm-up; the index refers to the list
    /// given to [`Balancer::new`]. A consistent-hash policy without a request hash picks
    /// by a random one, as Envoy.
    pub fn pick(&self) -> Option<usize> {
        if let Some(layers) = &self.layers {
            return layers.pick(None, (&[], None), None, 0.0, None);
        }
        match self.states.len() {
            0 => None,
            1 => Some(0),
            _ => Some(match self.policy {
                Policy::RingHash { .. } | Policy::Maglev { .. } => {
                    self.by_hash(fastrand::u64(..), &[])
                }
                Policy::LeastRequest => {
                    let first = self.draw();
                    let second = self.draw();
                    self.less_loaded(first, second)
                }
                Policy::RoundRobin => self.next_in_turn(),
                Policy::Random => fastrand::usize(..self.states.len()),
            }),
        }
    }

    /// Picks an endpoint not in `excluded` (for a retry on another endpoint), by the same
    /// policy over the remaining endpoints; if every endpoint is excluded, picks any.
    pub fn pick_excluding(&self, excluded: &[usize]) -> Option<usize> {
        self.pick_hashed(None, excluded)
    }

    /// Picks an endpoint not in `excluded`, as after every endpoint's warm-up; a
    /// consistent-hash policy picks by `hash` (a random one when `None`), walking the ring
    /// or table past excluded endpoints as Envoy's retry host predicate makes it. Other
    /// policies ignore `hash`.
    pub fn pick_hashed(&self, hash: Option<u64>, excluded: &[usize]) -> Option<usize> {
        self.select(hash, excluded, None)
    }

    /// Picks an endpoint not in `excluded`, weighing endpoints that are warming up at
    /// `now` by their slow start factor.
    pub(crate) fn select(
        &self,
        hash: Option<u64>,
        excluded: &[usize],
        now: Option<Instant>,
    ) -> Option<usize> {
        if let Some(layers) = &self.layers {
            return layers.pick(hash, (excluded, None), None, 0.0, now);
        }
        if self.states.len() <= 1 {
            return self.pick();
        }
        if let (Some(warmup), Some(now)) = (&self.warmup, now)
            && now < warmup.until
        {
            return Some(self.pick_warming(&warmup.slow_start, excluded, now));
        }
        if excluded.is_empty() {
            return match hash {
                Some(hash) if self.policy.is_consistent_hash() => Some(self.by_hash(hash, &[])),
                _ => self.pick(),
            };
        }
        let remaining = self.remaining_weight(excluded);
        if remaining == 0 {
            return self.pick();
        }
        Some(match self.policy {
            Policy::RingHash { .. } | Policy::Maglev { .. } => {
                self.by_hash(hash.unwrap_or_else(|| fastrand::u64(..)), excluded)
            }
            Policy::LeastRequest => {
                let first = self.draw_excluding(excluded, remaining);
                let second = self.draw_excluding(excluded, remaining);
                self.less_loaded(first, second)
            }
            Policy::RoundRobin => {
                let index = self.next_in_turn();
                if excluded.contains(&index) {
                    self.draw_excluding(excluded, remaining)
                } else {
                    index
                }
            }
            Policy::Random => self.uniform_excluding(excluded),
        })
    }

    /// A uniformly random endpoint outside `excluded`, at least one of which exists. Linear
    /// in the endpoints, which is fine for the rare retry.
    fn uniform_excluding(&self, excluded: &[usize]) -> usize {
        let allowed = |i: &usize| !excluded.contains(i);
        let count = (0..self.states.len()).filter(allowed).count();
        (0..self.states.len())
            .filter(allowed)
            .nth(fastrand::usize(..count.max(1)))
            .unwrap_or(0)
    }

    /// The endpoint `hash` maps to, past `excluded` ones; some endpoint is always usable
    /// when this is called, so the table's walk finds one.
    fn by_hash(&self, hash: u64, excluded: &[usize]) -> usize {
        self.table
            .as_ref()
            .and_then(|t| t.lookup(hash, |i| !excluded.contains(&i)))
            .unwrap_or(0)
    }

    /// Of two candidates, the one with fewer active requests per unit of weight; the
    /// first on a tie, so that without load the first draw's distribution is kept.
    fn less_loaded(&self, first: usize, second: usize) -> usize {
        let load = |i: usize| u128::from(self.states[i].active());
        let weight = |i: usize| u128::from(self.weights[i]);
        if load(second) * weight(first) < load(first) * weight(second) {
            second
        } else {
            first
        }
    }

    /// A pick by the policy over weights scaled by each endpoint's slow start factor at
    /// `now`, outside `excluded` unless that leaves nothing. Round robin draws by those
    /// weights instead of keeping its cycle, whose weights would change under it; least
    /// request compares load per scaled weight, as Envoy's schedule weighs load by it.
    /// Linear in the endpoints, only while some endpoint is warming up.
    fn pick_warming(&self, slow_start: &SlowStart, excluded: &[usize], now: Instant) -> usize {
        let scaled = |i: usize, excluded: &[usize]| {
            if excluded.contains(&i) {
                return 0.0;
            }
            let age = now.saturating_duration_since(self.states[i].added);
            self.weights[i] as f64 * slow_start.factor(age)
        };
        let total_outside = |excluded: &[usize]| -> f64 {
            (0..self.states.len()).map(|i| scaled(i, excluded)).sum()
        };
        let (excluded, total) = match total_outside(excluded) {
            t if t > 0.0 => (excluded, t),
            _ => (&[][..], total_outside(&[])),
        };
        let weight = |i: usize| scaled(i, excluded);
        let draw = || {
            let mut position = fastrand::f64() * total;
            let mut last = 0;
            for i in 0..self.states.len() {
                let w = weight(i);
                if w <= 0.0 {
                    continue;
                }
                if position < w {
                    return i;
                }
                position -= w;
                last = i;
            }
            last
        };
        let first = draw();
        if self.policy != Policy::LeastRequest {
            return first;
        }
        let second = draw();
        let load = |i: usize| self.states[i].active() as f64;
        if load(second) * weight(first) < load(first) * weight(second) {
            second
        } else {
            first
        }
    }

    /// The endpoint owning unit `position` of the weight space.
    fn owner(&self, position: u64) -> usize {
        self.cumulative.partition_point(|&c| c <= position)
    }

    /// A random endpoint, with probability proportional to weight.
    fn draw(&self) -> usize {
        self.owner(fastrand::u64(0..self.total))
    }

    /// Smooth weighted round robin: the n-th pick takes unit `n * stride mod total` of the
    /// weight space, which spreads each endpoint's units over the cycle instead of serving
    /// them back to back.
    fn next_in_turn(&self) -> usize {
        let n = self.cursor.fetch_add(1, Ordering::Relaxed) % self.total;
        let position = (u128::from(n) * u128::from(self.stride) % u128::from(self.total)) as u64;
        self.owner(position)
    }

    fn remaining_weight(&self, excluded: &[usize]) -> u64 {
        (0..self.weights.len())
            .filter(|i| !excluded.contains(i))
            .map(|i| self.weights[i])
            .sum()
    }

    /// A random endpoint outside `excluded`, by weight; `remaining` is their total weight.
    /// Linear in the endpoints, which is fine for the rare retry.
    fn draw_excluding(&self, excluded: &[usize], remaining: u64) -> usize {
        let mut position = fastrand::u64(0..remaining);
        let mut last = 0;
        for (index, &weight) in self.weights.iter().enumerate() {
            if excluded.contains(&index) {
                continue;
            }
            if position < weight {
                return index;
            }
            position -= weight;
            last = index;
        }
        last
    }
}

/// A step near `total / φ` that is coprime with `total`: a golden-ratio sequence spreads
/// the picks evenly, and coprimality makes it a permutation of the weight space.
fn stride(total: u64) -> u64 {
    if total <= 1 {
        return 1;
    }
    let mut step = ((u128::from(total) * 618_034 / 1_000_000) as u64).max(1);
    while gcd(step, total) != 1 {
        step += 1;
    }
    step
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn states(n: usize) -> Vec<Arc<EndpointState>> {
        (0..n).map(|_| Arc::new(EndpointState::new())).collect()
    }

    fn balancer(policy: Policy, weights: &[u32]) -> (Balancer, Vec<Arc<EndpointState>>) {
        let states = states(weights.len());
        let endpoints = weights
            .iter()
            .zip(&states)
            .enumerate()
            .map(|(i, (w, s))| Member {
                weight: *w,
                state: Arc::clone(s),
                key: format!("10.0.0.{}:80", i + 1),
            })
            .collect();
        (Balancer::new(policy, endpoints), states)
    }

    fn counts(
        b: &Balancer,
        picks: usize,
        mut pick: impl FnMut(&Balancer) -> Option<usize>,
    ) -> Vec<usize> {
        let mut counts = vec![0; b.len()];
        for _ in 0..picks {
            counts[pick(b).expect("non-empty balancer picks")] += 1;
        }
        counts
    }

    const RING: Policy = Policy::RingHash {
        minimum_ring_size: DEFAULT_MINIMUM_RING_SIZE,
        maximum_ring_size: DEFAULT_MAXIMUM_RING_SIZE,
    };
    const MAGLEV: Policy = Policy::Maglev {
        table_size: DEFAULT_MAGLEV_TABLE_SIZE,
    };
    /// The policies that spread by weight alone; a hash ring's spread also depends on
    /// where the endpoints' points fall, and RANDOM ignores weights: both tested apart.
    const POLICIES: [Policy; 2] = [Policy::LeastRequest, Policy::RoundRobin];
    const ALL: [Policy; 5] = [
        Policy::LeastRequest,
        Policy::RoundRobin,
        Policy::Random,
        RING,
        MAGLEV,
    ];
    const HASHED: [Policy; 2] = [RING, MAGLEV];

    /// Request hashes of `n` distinct keys from a seeded generator, as a header value
    /// would be hashed.
    fn request_hashes(n: usize) -> Vec<u64> {
        let mut rng = fastrand::Rng::with_seed(11);
        (0..n)
            .map(|_| xxhash64(format!("user-{}", rng.u64(..)).as_bytes(), 0))
            .collect()
    }

    #[test]
    fn consistent_hash_spreads_keys_by_weight() {
        for policy in HASHED {
            let (b, _) = balancer(policy, &[1, 2]);
            let mut c = [0usize; 2];
            for h in request_hashes(30_000) {
                c[b.pick_hashed(Some(h), &[]).expect("picks")] += 1;
            }
            let share = c[1] as f64 / 30_000.0;
            // A 1024-point ring places endpoints within a few percent of their weight.
            assert!((share - 2.0 / 3.0).abs() < 0.05, "{policy:?}: {c:?}");
        }
    }

    #[test]
    fn consistent_hash_is_stable_and_moves_only_removed_keys() {
        let ring = |points_each: u64, n: u64| Policy::RingHash {
            minimum_ring_size: points_each * n,
            maximum_ring_size: DEFAULT_MAXIMUM_RING_SIZE,
        };
        // (policy over five endpoints, over four, keys of staying endpoints that may move):
        // a ring keeps every endpoint's points when each has as many in both, so only the
        // leaving endpoint's keys move; with Envoy's default 1024 points the staying ones
        // get more points each and take some keys from each other; Maglev refills slots.
        let cases = [
            (ring(256, 5), ring(256, 4), 0.0),
            (RING, RING, 0.12),
            (MAGLEV, MAGLEV, 0.05),
        ];
        let hashes = request_hashes(20_000);
        for (five, four, tolerated) in cases {
            let (all, _) = balancer(five, &[1, 1, 1, 1, 1]);
            let before: Vec<usize> = hashes
                .iter()
                .map(|&h| all.pick_hashed(Some(h), &[]).expect("picks"))
                .collect();
            // The same key always lands on the same endpoint, also in a rebuilt balancer.
            let (again, _) = balancer(five, &[1, 1, 1, 1, 1]);
            for (&h, &i) in hashes.iter().zip(&before) {
                assert_eq!(again.pick_hashed(Some(h), &[]), Some(i));
            }
            // Endpoint 10.0.0.5 leaves.
            let (rest, _) = balancer(four, &[1, 1, 1, 1]);
            let (mut moved, mut disturbed) = (0, 0);
            for (&h, &i) in hashes.iter().zip(&before) {
                let now = rest.pick_hashed(Some(h), &[]).expect("picks");
                if i == 4 {
                    moved += 1;
                } else if now != i {
                    disturbed += 1;
                }
            }
            let share = f64::from(moved) / 20_000.0;
            assert!((share - 0.2).abs() < 0.05, "{five:?}: {share}");
            let needless = f64::from(disturbed) / 20_000.0;
            assert!(
                needless <= tolerated,
                "{five:?}: {needless} moved needlessly"
            );
        }
    }

    #[test]
    fn consistent_hash_skips_excluded_endpoints_deterministically() {
        for policy in HASHED {
            let (b, _) = balancer(policy, &[1, 1, 1]);
            for h in request_hashes(500) {
                let first = b.pick_hashed(Some(h), &[]).expect("picks");
                let second = b.pick_hashed(Some(h), &[first]).expect("picks");
                assert_ne!(first, second);
                assert_eq!(b.pick_hashed(Some(h), &[first]), Some(second));
                let third = b.pick_hashed(Some(h), &[first, second]).expect("picks");
                assert!(third != first && third != second);
            }
        }
    }

    #[test]
    fn consistent_hash_without_a_hash_picks_at_random() {
        for policy in HASHED {
            let (b, _) = balancer(policy, &[1, 1]);
            let c = counts(&b, 10_000, Balancer::pick);
            let share = c[0] as f64 / 10_000.0;
            assert!((share - 0.5).abs() < 0.05, "{policy:?}: {c:?}");
        }
    }

    #[test]
    fn other_policies_ignore_the_hash() {
        let (b, _) = balancer(Policy::RoundRobin, &[1, 1]);
        let seq: Vec<usize> = (0..4)
            .filter_map(|_| b.pick_hashed(Some(42), &[]))
            .collect();
        assert_eq!(seq, vec![0, 1, 0, 1]);
    }

    #[test]
    fn open_connections_are_counted_apart_from_requests() {
        let state = Arc::new(EndpointState::new());
        let first = state.open_connection();
        let second = state.open_connection();
        let request = state.start();
        assert_eq!((state.connections(), state.active()), (2, 1));
        drop(first);
        assert_eq!(state.connections(), 1);
        drop((second, request));
        assert_eq!((state.connections(), state.active()), (0, 0));
    }

    #[test]
    fn distribution_follows_weights_for_every_policy() {
        for policy in POLICIES {
            let (b, _) = balancer(policy, &[1, 3]);
            let c = counts(&b, 40_000, Balancer::pick);
            let share = c[1] as f64 / 40_000.0;
            assert!((share - 0.75).abs() < 0.02, "{policy:?}: {c:?}");
        }
    }

    #[test]
    fn distribution_over_many_endpoints() {
        for policy in POLICIES {
            let weights = [5, 1, 1, 3, 10];
            let (b, _) = balancer(policy, &weights);
            let c = counts(&b, 100_000, Balancer::pick);
            for (count, weight) in c.iter().zip(weights) {
                let expected = 100_000.0 * f64::from(weight) / 20.0;
                let got = *count as f64;
                assert!(
                    (got - expected).abs() < expected * 0.08,
                    "{policy:?}: {c:?}"
                );
            }
        }
    }

    #[test]
    fn random_ignores_weights_as_envoys() {
        let (b, _) = balancer(Policy::Random, &[1, 9, 5]);
        let c = counts(&b, 30_000, Balancer::pick);
        for count in &c {
            let share = *count as f64 / 30_000.0;
            assert!((share - 1.0 / 3.0).abs() < 0.02, "{c:?}");
        }
        let c = counts(&b, 20_000, |b| b.pick_excluding(&[1]));
        assert_eq!(c[1], 0);
        let share = c[0] as f64 / 20_000.0;
        assert!((share - 0.5).abs() < 0.02, "{c:?}");
    }

    #[test]
    fn zero_weight_counts_as_one() {
        let (b, _) = balancer(Policy::RoundRobin, &[0, 1]);
        assert_eq!(b.weight(0), Some(1));
        assert_eq!(counts(&b, 1000, Balancer::pick), vec![500, 500]);
    }

    #[test]
    fn round_robin_is_exact_per_cycle_and_smooth() {
        let (b, _) = balancer(Policy::RoundRobin, &[5, 1, 1]);
        let cycle: Vec<usize> = (0..7).filter_map(|_| b.pick()).collect();
        let mut sorted = cycle.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![0, 0, 0, 0, 0, 1, 2]);
        // Never more than three of the heavy endpoint in a row within a cycle.
        assert!(
            !cycle.windows(4).any(|w| w.iter().all(|&i| i == 0)),
            "{cycle:?}"
        );
        // Equal weights alternate.
        let (b, _) = balancer(Policy::RoundRobin, &[1, 1]);
        let seq: Vec<usize> = (0..6).filter_map(|_| b.pick()).collect();
        assert_eq!(seq, vec![0, 1, 0, 1, 0, 1]);
    }

    #[test]
    fn round_robin_with_huge_weights_does_not_overflow() {
        let (b, _) = balancer(Policy::RoundRobin, &[u32::MAX, u32::MAX, 1]);
        for _ in 0..1000 {
            assert!(b.pick().is_some_and(|i| i < 3));
        }
    }

    #[test]
    fn least_request_avoids_busy_endpoint() {
        let (b, states) = balancer(Policy::LeastRequest, &[1, 1]);
        let _busy: Vec<ActiveGuard> = (0..5).map(|_| states[0].start()).collect();
        let c = counts(&b, 10_000, Balancer::pick);
        // Endpoint 0 is chosen only when both draws land on it: about a quarter.
        let share = c[0] as f64 / 10_000.0;
        assert!((share - 0.25).abs() < 0.03, "{c:?}");
    }

    #[test]
    fn least_request_compares_load_per_weight() {
        let (b, states) = balancer(Policy::LeastRequest, &[4, 1]);
        // 3 active on weight 4 is less load than 1 active on weight 1.
        let _a: Vec<ActiveGuard> = (0..3).map(|_| states[0].start()).collect();
        let _b = states[1].start();
        assert_eq!(b.less_loaded(1, 0), 0);
        assert_eq!(b.less_loaded(0, 1), 0);
        // A tie keeps the first draw.
        let (b, _) = balancer(Policy::LeastRequest, &[1, 1]);
        assert_eq!(b.less_loaded(1, 0), 1);
        assert_eq!(b.less_loaded(0, 1), 0);
    }

    #[test]
    fn guard_counts_active_and_total() {
        let state = Arc::new(EndpointState::new());
        let first = state.start();
        let second = state.start();
        assert_eq!((state.active(), state.total()), (2, 2));
        drop(first);
        assert_eq!((state.active(), state.total()), (1, 2));
        assert!(Arc::ptr_eq(second.state(), &state));
        drop(second);
        assert_eq!((state.active(), state.total()), (0, 2));
    }

    #[test]
    fn empty_balancer_picks_nothing() {
        for policy in ALL {
            let b = Balancer::new(policy, Vec::new());
            assert!(b.is_empty());
            assert_eq!(b.len(), 0);
            assert_eq!(b.pick(), None);
            assert_eq!(b.pick_excluding(&[0]), None);
        }
    }

    #[test]
    fn single_endpoint_is_always_picked() {
        for policy in ALL {
            let (b, _) = balancer(policy, &[7]);
            assert_eq!(b.pick(), Some(0));
            assert_eq!(b.pick_excluding(&[0]), Some(0));
        }
    }

    #[test]
    fn pick_excluding_never_returns_excluded_when_another_exists() {
        for policy in ALL {
            let (b, _) = balancer(policy, &[1, 100, 1, 5]);
            for _ in 0..5_000 {
                let i = b.pick_excluding(&[1, 3]).expect("picks");
                assert!(i == 0 || i == 2, "{policy:?} picked {i}");
            }
            let c = counts(&b, 4_000, |b| b.pick_excluding(&[0, 1, 2]));
            assert_eq!(c, vec![0, 0, 0, 4_000]);
        }
    }

    #[test]
    fn pick_excluding_keeps_weights_among_the_rest() {
        for policy in POLICIES {
            let (b, _) = balancer(policy, &[50, 1, 3]);
            let c = counts(&b, 40_000, |b| b.pick_excluding(&[0]));
            let share = c[2] as f64 / (c[1] + c[2]) as f64;
            assert_eq!(c[0], 0);
            assert!((share - 0.75).abs() < 0.03, "{policy:?}: {c:?}");
        }
    }

    #[test]
    fn pick_excluding_everything_falls_back_to_any() {
        for policy in ALL {
            let (b, _) = balancer(policy, &[1, 1]);
            assert!(b.pick_excluding(&[0, 1]).is_some_and(|i| i < 2));
            // Out-of-range indices exclude nothing.
            assert!(b.pick_excluding(&[9]).is_some_and(|i| i < 2));
        }
    }

    /// Two endpoints that joined an hour before a third, balanced by `policy` with a 10 s
    /// slow start, flat or in one priority; with the instant the third joined.
    fn warming(policy: Policy, layered: bool) -> (Balancer, Instant) {
        let long_ago = Instant::now();
        let joined = long_ago + Duration::from_secs(3600);
        let endpoints: Vec<Member> = [long_ago, long_ago, joined]
            .into_iter()
            .enumerate()
            .map(|(i, at)| Member {
                weight: 1,
                state: Arc::new(EndpointState::added_at(at)),
                key: format!("10.0.0.{}:80", i + 1),
            })
            .collect();
        let slow_start = Some(SlowStart::new(Duration::from_secs(10)));
        if layered {
            let layout = Layout {
                groups: vec![Group {
                    priority: 0,
                    weight: 1,
                    hosts: 3,
                    members: vec![0, 1, 2],
                }],
                locality_weighted: false,
            };
            (
                Balancer::layered(policy, endpoints, layout, slow_start),
                joined,
            )
        } else {
            (
                Balancer::new(policy, endpoints).with_slow_start(slow_start),
                joined,
            )
        }
    }

    fn share_of_newest(b: &Balancer, now: Instant, tried: &[usize]) -> f64 {
        let picks = 30_000;
        let newest = (0..picks)
            .filter(|_| b.choose(None, (tried, None), None, 0.0, now) == Some(2))
            .count();
        newest as f64 / f64::from(picks)
    }

    #[test]
    fn a_new_endpoint_ramps_up_from_the_minimum_share_over_the_window() {
        for policy in POLICIES {
            for layered in [false, true] {
                let (b, joined) = warming(policy, layered);
                let at = |secs: u64| joined + Duration::from_secs(secs);
                // Weight 0.1 against 1 + 1, then 0.5, then the full third.
                for (now, expected) in [(at(0), 0.1 / 2.1), (at(5), 0.5 / 2.5), (at(10), 1.0 / 3.0)]
                {
                    let share = share_of_newest(&b, now, &[]);
                    assert!(
                        (share - expected).abs() < 0.015,
                        "{policy:?} layered {layered}: {share} at {:?}",
                        now - joined
                    );
                }
            }
        }
    }

    #[test]
    fn warming_endpoints_keep_retries_away_from_tried_ones() {
        for policy in POLICIES {
            let (b, joined) = warming(policy, false);
            let now = joined + Duration::from_secs(1);
            for _ in 0..2_000 {
                assert_ne!(b.choose(None, (&[0], None), None, 0.0, now), Some(0));
            }
            // With the old ones tried, only the warming one is left.
            assert_eq!(share_of_newest(&b, now, &[0, 1]), 1.0);
            assert!(b.choose(None, (&[0, 1, 2], None), None, 0.0, now).is_some());
        }
    }

    #[test]
    fn least_request_weighs_load_by_the_warming_weight() {
        let (b, joined) = warming(Policy::LeastRequest, false);
        let _old: Vec<ActiveGuard> = (0..2).map(|i| b.states[i].start()).collect();
        let _new = b.states[2].start();
        // One request on a tenth of a weight is more load than one on a whole weight.
        let share = share_of_newest(&b, joined, &[]);
        assert!(share < 0.1 / 2.1, "{share}");
    }

    #[test]
    fn settled_clusters_and_other_policies_are_not_slowed() {
        // Past the window round robin keeps its exact cycle.
        let (b, joined) = warming(Policy::RoundRobin, false);
        let later = joined + Duration::from_secs(11);
        let cycle: Vec<usize> = (0..6)
            .filter_map(|_| b.choose(None, (&[], None), None, 0.0, later))
            .collect();
        let mut sorted = cycle.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![0, 0, 1, 1, 2, 2], "{cycle:?}");
        // RANDOM and the hashes ignore slow start, as Envoy's.
        for policy in [Policy::Random, RING, MAGLEV] {
            let (b, joined) = warming(policy, false);
            let share = share_of_newest(&b, joined, &[]);
            assert!((share - 1.0 / 3.0).abs() < 0.05, "{policy:?}: {share}");
        }
        // A zero window is no slow start.
        let (b, _) = balancer(Policy::RoundRobin, &[1, 1]);
        let b = b.with_slow_start(Some(SlowStart::new(Duration::ZERO)));
        assert!(b.warmup.is_none());
    }

    #[test]
    fn strides_are_coprime() {
        for total in 1..500 {
            assert_eq!(gcd(stride(total), total.max(1)), 1, "total {total}");
        }
    }
}

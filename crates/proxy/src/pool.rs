//! Upstream connection reuse, keyed by endpoint and transport ([`PoolKey`]: the address,
//! and for TLS the context and SNI the connection was made with).
//!
//! HTTP/1.1: a connection goes back to the pool only when the response body it carried
//! has ended, so a pooled connection is always free for the next request. The fast path
//! (`h1.rs`) pools plain sockets, the general path hyper senders. HTTP/2: one shared,
//! multiplexed connection per endpoint; while it is being made, the endpoint's other
//! requests wait for it ([`H2Claim`]) rather than each opening its own, as Envoy's HTTP/2
//! pool gives new streams to a connection still connecting. The locks are held only to
//! push, pop or clone one sender; never across an await, and a reload never takes them.
//!
//! A connection to a cluster's endpoint carries a [`ConnHold`] for as long as it is open,
//! idle in the pool included, as Envoy counts its pools' connections: on the endpoint
//! (`upstream_cx_active`) and, when the cluster limits them, against `max_connections`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hyper::client::conn::http1::SendRequest;
use portcullis_balance::{ConnectionGuard, EndpointState};
use portcullis_envoy::ConnectionLimits;
use portcullis_registry::{ClusterLoad, Slot};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::body::RequestBody;
use crate::error::ProxyError;
use crate::h2_client::{self, Sender};
use crate::origin::{PoolKey, UpstreamIo};

/// The pool's maps: every request looks its endpoint up, and foldhash costs a fraction of
/// SipHash on these keys while still seeded per process.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Idle connections of one kind per endpoint, each with when it went idle; newest last.
struct Idle<T>(Mutex<HashMap<PoolKey, Vec<(T, Instant)>>>);

impl<T> Idle<T> {
    fn new() -> Self {
        Idle(Mutex::new(HashMap::default()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Vec<(T, Instant)>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pop(&self, key: &PoolKey) -> Option<(T, Instant)> {
        let mut idle = self.lock();
        let list = idle.get_mut(key)?;
        let entry = list.pop();
        if list.is_empty() {
            idle.remove(key);
        }
        entry
    }

    fn push(&self, key: PoolKey, connection: T, max: usize, at: Instant) {
        let mut idle = self.lock();
        let list = idle.entry(key).or_default();
        if list.len() < max {
            list.push((connection, at));
        }
    }

    fn count(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }
}

/// What an open upstream connection of a cluster holds: a count on its endpoint and, when
/// the cluster limits its connections, a unit of `max_connections`. Dropped with the
/// connection, it wakes the cluster's requests waiting for one.
#[derive(Debug)]
pub struct ConnHold {
    slot: Option<Slot>,
    endpoint: Option<ConnectionGuard>,
    load: Arc<ClusterLoad>,
}

impl ConnHold {
    /// Holds `slot` (if the cluster limits connections) of `load`'s cluster for a
    /// connection to `endpoint`.
    pub fn new(
        slot: Option<Slot>,
        endpoint: Option<&Arc<EndpointState>>,
        load: &Arc<ClusterLoad>,
    ) -> Self {
        ConnHold {
            slot,
            endpoint: endpoint.map(EndpointState::open_connection),
            load: Arc::clone(load),
        }
    }
}

impl Drop for ConnHold {
    fn drop(&mut self) {
        // Counts first, so that a woken waiter sees the room this connection leaves.
        self.endpoint = None;
        self.slot = None;
        self.load.wake();
    }
}

/// An upstream connection and what it holds against its cluster's limits.
#[derive(Debug)]
pub struct Conn<T> {
    /// The connection.
    pub io: T,
    /// Its count on its endpoint and unit of the cluster's `max_connections`; none to an
    /// original destination.
    pub hold: Option<ConnHold>,
    /// How long and for how many requests it may serve (boxed: one allocation per
    /// connection keeps the response body that carries it small).
    pub life: Box<Life>,
}

/// How long and for how many requests one connection may serve: its cluster's
/// `max_requests_per_connection`, `max_connection_duration` and idle timeout.
#[derive(Debug, Clone, Copy)]
pub struct Life {
    limits: ConnectionLimits,
    born: Instant,
    served: u32,
}

impl Life {
    /// A connection opened now under `limits`.
    pub fn new(limits: ConnectionLimits) -> Box<Life> {
        Box::new(Life {
            limits,
            born: Instant::now(),
            served: 0,
        })
    }

    /// Counts a request it carried to its end; whether it may carry another.
    fn served(&mut self) -> bool {
        self.served += 1;
        self.limits
            .max_requests_per_connection
            .is_none_or(|max| self.served < max)
            && !self.expired()
    }

    /// Whether it has lived its `max_connection_duration`.
    fn expired(&self) -> bool {
        self.limits
            .max_connection_duration
            .is_some_and(|d| self.born.elapsed() >= d)
    }

    /// Whether, idle since `since`, it has passed its idle timeout at `now` (`default`
    /// when the cluster sets none; zero: never) or its lifetime.
    fn stale(&self, since: Instant, now: Instant, default: Duration) -> bool {
        let idle = now.saturating_duration_since(since);
        let idle = match self.limits.idle_timeout {
            Some(t) if t.is_zero() => false,
            Some(t) => idle > t,
            None => idle > default,
        };
        idle || self.expired()
    }
}

impl<T> Conn<T> {
    /// The cluster to wake once the connection is back in the pool, when it is limited.
    fn waiters(&self) -> Option<Arc<ClusterLoad>> {
        self.hold.as_ref().map(|h| Arc::clone(&h.load))
    }
}

/// Idle upstream connections per endpoint.
pub struct Pool {
    idle: Idle<Conn<SendRequest<RequestBody>>>,
    raw: Idle<Conn<UpstreamIo>>,
    h2: Mutex<HashMap<PoolKey, H2Entry>>,
    max_idle_per_endpoint: usize,
    idle_timeout: Duration,
}

/// The HTTP/2 connection of one endpoint: shared, or being made by one request.
enum H2Entry {
    Shared(Shared),
    /// Being made; `room` is how many more requests may wait for it (its
    /// `max_requests_per_connection` less those already given to it; `None`: no limit).
    Connecting {
        progress: watch::Receiver<H2Progress>,
        room: Option<u32>,
    },
}

/// A shared HTTP/2 connection: its sender, its limits, and when it last took a stream.
struct Shared {
    sender: Sender,
    life: Box<Life>,
    used: Instant,
}

/// How the connection an [`H2Claim`] makes is going, as the requests waiting for it see it.
#[derive(Debug)]
pub enum H2Progress {
    /// Still being made.
    Pending,
    /// Shared in the pool, or given up with no fault of the endpoint's (the request that
    /// made it went away): look again.
    Settled,
    /// It could not be made: the waiting requests fail as the one that made it did.
    Failed(ProxyError),
}

/// What a request finds in the HTTP/2 pool for its endpoint.
pub enum H2Slot {
    /// A shared connection with room for one more stream.
    Ready(Sender),
    /// Another request is making the connection: wait for it, then look again.
    Wait(watch::Receiver<H2Progress>),
    /// Nothing: this request makes the connection, and shares it (or its failure) with
    /// the requests that come meanwhile.
    Claimed(H2Claim),
    /// The connection being made has no room left for this request (its cluster's
    /// `max_requests_per_connection`): it makes one of its own, shared with nobody.
    Alone,
}

/// The right to make the one HTTP/2 connection to an endpoint. Dropped without
/// [`H2Claim::publish`] or [`H2Claim::fail`], it frees the endpoint for the next request.
pub struct H2Claim {
    pool: Arc<Pool>,
    key: PoolKey,
    progress: watch::Sender<H2Progress>,
    settled: bool,
}

impl H2Claim {
    /// Shares the new connection with later requests (and the waiting ones), the stream of
    /// the request that made it counted against its limits.
    pub fn publish(mut self, sender: Sender, mut life: Box<Life>) {
        let mut h2 = self.pool.lock_h2();
        if life.served() {
            let shared = Shared {
                sender,
                life,
                used: Instant::now(),
            };
            h2.insert(self.key.clone(), H2Entry::Shared(shared));
        } else {
            h2.remove(&self.key);
        }
        drop(h2);
        self.settle(H2Progress::Settled);
    }

    /// Fails the requests waiting for the connection as `error`, the failure to make it.
    pub fn fail(mut self, error: &ProxyError) {
        self.pool.lock_h2().remove(&self.key);
        self.settle(H2Progress::Failed(error.replicate()));
    }

    fn settle(&mut self, progress: H2Progress) {
        self.settled = true;
        self.progress.send_replace(progress);
    }
}

impl Drop for H2Claim {
    fn drop(&mut self) {
        if !self.settled {
            self.pool.lock_h2().remove(&self.key);
            self.settle(H2Progress::Settled);
        }
    }
}

/// A connection checked out of (or new for) the pool.
pub struct Pooled {
    pool: Arc<Pool>,
    key: PoolKey,
    /// The sender for this connection.
    pub sender: SendRequest<RequestBody>,
    /// What the connection holds against its cluster's limits.
    hold: Option<ConnHold>,
    /// How long and for how many requests it may serve.
    life: Box<Life>,
    /// Whether it was reused from the pool (a stale-connection race is then possible).
    pub reused: bool,
}

impl Pooled {
    /// Returns the connection to the pool for the next request.
    pub fn release(self) {
        let conn = Conn {
            io: self.sender,
            hold: self.hold,
            life: self.life,
        };
        self.pool.put(self.key, conn);
    }
}

impl Pool {
    /// A pool keeping up to `max_idle_per_endpoint` connections for `idle_timeout`.
    pub fn new(max_idle_per_endpoint: usize, idle_timeout: Duration) -> Self {
        Pool {
            idle: Idle::new(),
            raw: Idle::new(),
            h2: Mutex::new(HashMap::default()),
            max_idle_per_endpoint,
            idle_timeout,
        }
    }

    /// Takes an idle connection for `key` that is still open, if any.
    pub async fn checkout(self: &Arc<Self>, key: &PoolKey) -> Option<Pooled> {
        loop {
            let (mut conn, since) = self.idle.pop(key)?;
            if conn.life.stale(since, Instant::now(), self.idle_timeout) || conn.io.is_closed() {
                continue;
            }
            if conn.io.ready().await.is_ok() {
                return Some(Pooled {
                    pool: Arc::clone(self),
                    key: key.clone(),
                    sender: conn.io,
                    hold: conn.hold,
                    life: conn.life,
                    reused: true,
                });
            }
        }
    }

    /// Wraps a freshly connected sender so that it can be released to the pool.
    pub fn fresh(self: &Arc<Self>, key: PoolKey, conn: Conn<SendRequest<RequestBody>>) -> Pooled {
        Pooled {
            pool: Arc::clone(self),
            key,
            sender: conn.io,
            hold: conn.hold,
            life: conn.life,
            reused: false,
        }
    }

    fn put(&self, key: PoolKey, mut conn: Conn<SendRequest<RequestBody>>) {
        if conn.life.served() && !conn.io.is_closed() {
            let waiters = conn.waiters();
            let now = Instant::now();
            self.idle.push(key, conn, self.max_idle_per_endpoint, now);
            if let Some(load) = waiters {
                load.wake();
            }
        }
    }

    fn lock_h2(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, H2Entry>> {
        self.h2.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What a request for `key` finds: a stream on the shared connection, the connection
    /// another request is making, or the claim to make it. A connection carries at most
    /// `max_requests` streams in all.
    pub fn h2_slot(self: &Arc<Self>, key: &PoolKey, max_requests: Option<u32>) -> H2Slot {
        let mut h2 = self.lock_h2();
        if let Some(H2Entry::Connecting { progress, room }) = h2.get_mut(key) {
            return match room {
                Some(0) => H2Slot::Alone,
                Some(n) => {
                    *n -= 1;
                    H2Slot::Wait(progress.clone())
                }
                None => H2Slot::Wait(progress.clone()),
            };
        }
        if let Some(sender) = Self::take_stream(&mut h2, key, self.idle_timeout) {
            return H2Slot::Ready(sender);
        }
        let (progress, waiting) = watch::channel(H2Progress::Pending);
        let entry = H2Entry::Connecting {
            progress: waiting,
            room: max_requests.map(|n| n.saturating_sub(1)),
        };
        h2.insert(key.clone(), entry);
        H2Slot::Claimed(H2Claim {
            pool: Arc::clone(self),
            key: key.clone(),
            progress,
            settled: false,
        })
    }

    /// The shared HTTP/2 connection for `key`, if one is open and within its cluster's
    /// limits; each call is one stream on it. One past its idle timeout or lifetime is
    /// given up (its open streams finish); one that has carried its
    /// `max_requests_per_connection` takes this last stream and no more.
    fn take_stream(
        h2: &mut HashMap<PoolKey, H2Entry>,
        key: &PoolKey,
        idle_timeout: Duration,
    ) -> Option<Sender> {
        let Some(H2Entry::Shared(shared)) = h2.get_mut(key) else {
            return None;
        };
        let now = Instant::now();
        if shared.life.stale(shared.used, now, idle_timeout)
            || h2_client::is_closed(&mut shared.sender)
        {
            h2.remove(key);
            return None;
        }
        shared.used = now;
        let sender = shared.sender.clone();
        if !shared.life.served() {
            h2.remove(key);
        }
        Some(sender)
    }

    /// Takes an idle HTTP/1.1 connection of the fast path for `key` that is still open at
    /// `now`, if any. The fast path passes a time it has read anyway: a clock read per
    /// request is a measurable part of one.
    pub fn checkout_raw(&self, key: &PoolKey, now: Instant) -> Option<Conn<UpstreamIo>> {
        loop {
            let (mut conn, since) = self.raw.pop(key)?;
            if !conn.life.stale(since, now, self.idle_timeout) && conn.io.still_open() {
                return Some(conn);
            }
        }
    }

    /// Keeps an HTTP/1.1 connection of the fast path whose last response ended at `now`
    /// for the next request.
    pub fn put_raw(&self, key: PoolKey, mut conn: Conn<UpstreamIo>, now: Instant) {
        let waiters = conn.waiters();
        if conn.life.served() {
            self.raw.push(key, conn, self.max_idle_per_endpoint, now);
        } else {
            // At its request or time limit: closed, which leaves room to its cluster.
            drop(conn);
        }
        if let Some(load) = waiters {
            load.wake();
        }
    }

    /// Closes one idle connection to `key` of either kind, if there is one: a request of the
    /// other HTTP path waiting at `max_connections` gets the room it leaves.
    pub fn close_idle(&self, key: &PoolKey) -> bool {
        self.raw.pop(key).is_some() || self.idle.pop(key).is_some()
    }

    /// Number of idle connections, for the admin server.
    pub fn idle_count(&self) -> usize {
        self.idle.count() + self.raw.count()
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    fn plain(io: TcpStream) -> Conn<UpstreamIo> {
        limited(io, ConnectionLimits::default())
    }

    fn limited(io: TcpStream, limits: ConnectionLimits) -> Conn<UpstreamIo> {
        Conn {
            io: UpstreamIo::Plain(io),
            hold: None,
            life: Life::new(limits),
        }
    }

    async fn connected(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_handed_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = PoolKey::plain(listener.local_addr().unwrap());
        let pool = Pool::new(4, Duration::from_secs(60));
        let (client, server) = connected(&listener).await;
        pool.put_raw(addr.clone(), plain(client), Instant::now());
        let open = pool
            .checkout_raw(&addr, Instant::now())
            .expect("an open connection");
        pool.put_raw(addr.clone(), open, Instant::now());
        drop(server);
        // Lets the runtime's I/O driver see the FIN.
        tokio::task::yield_now().await;
        assert!(pool.checkout_raw(&addr, Instant::now()).is_none());
        assert_eq!(pool.idle_count(), 0);
    }

    /// An HTTP/2 connection to a server on `listener`, served until the test ends.
    async fn h2_sender(listener: &TcpListener) -> Sender {
        let (client, server) = connected(listener).await;
        tokio::spawn(async move {
            let mut connection = h2::server::handshake(server).await.unwrap();
            while connection.accept().await.is_some() {}
        });
        let (sender, connection) = h2_client::handshake(client).await.unwrap();
        tokio::spawn(connection);
        sender
    }

    fn claimed(slot: H2Slot) -> H2Claim {
        match slot {
            H2Slot::Claimed(claim) => claim,
            _ => panic!("expected the claim"),
        }
    }

    fn waiting(slot: H2Slot) -> watch::Receiver<H2Progress> {
        match slot {
            H2Slot::Wait(progress) => progress,
            _ => panic!("expected to wait"),
        }
    }

    /// A pool, and the key of an endpoint listening on loopback.
    async fn h2_pool() -> (TcpListener, PoolKey, Arc<Pool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let key = PoolKey::plain(listener.local_addr().unwrap());
        (
            listener,
            key,
            Arc::new(Pool::new(4, Duration::from_secs(60))),
        )
    }

    #[tokio::test]
    async fn requests_wait_for_the_http2_connection_another_is_making_and_then_share_it() {
        let (listener, key, pool) = h2_pool().await;
        let claim = claimed(pool.h2_slot(&key, None));
        let mut first = waiting(pool.h2_slot(&key, None));
        let mut second = waiting(pool.h2_slot(&key, None));
        assert!(matches!(*first.borrow(), H2Progress::Pending));

        claim.publish(
            h2_sender(&listener).await,
            Life::new(ConnectionLimits::default()),
        );
        for progress in [&mut first, &mut second] {
            let settled = progress
                .wait_for(|p| !matches!(p, H2Progress::Pending))
                .await;
            assert!(matches!(*settled.unwrap(), H2Progress::Settled));
            assert!(matches!(pool.h2_slot(&key, None), H2Slot::Ready(_)));
        }
    }

    #[tokio::test]
    async fn a_failed_http2_connection_fails_its_waiters_and_an_abandoned_one_frees_the_endpoint() {
        let (_listener, key, pool) = h2_pool().await;

        let claim = claimed(pool.h2_slot(&key, None));
        let progress = waiting(pool.h2_slot(&key, None));
        claim.fail(&ProxyError::ConnectTimeout);
        assert!(matches!(
            *progress.borrow(),
            H2Progress::Failed(ProxyError::ConnectTimeout)
        ));

        // The next request claims it again; when that request goes away, its waiters look
        // again and one of them makes the connection.
        let claim = claimed(pool.h2_slot(&key, None));
        let progress = waiting(pool.h2_slot(&key, None));
        drop(claim);
        assert!(matches!(*progress.borrow(), H2Progress::Settled));
        drop(claimed(pool.h2_slot(&key, None)));
    }

    #[tokio::test]
    async fn a_connecting_http2_connection_takes_no_more_waiters_than_its_request_limit() {
        let (listener, key, pool) = h2_pool().await;
        let claim = claimed(pool.h2_slot(&key, Some(2)));
        let _progress = waiting(pool.h2_slot(&key, Some(2)));
        assert!(matches!(pool.h2_slot(&key, Some(2)), H2Slot::Alone));

        // Shared with its second stream still to come: the waiter takes it, and that is
        // the connection's last.
        let two = ConnectionLimits {
            max_requests_per_connection: Some(2),
            ..ConnectionLimits::default()
        };
        claim.publish(h2_sender(&listener).await, Life::new(two));
        assert!(matches!(pool.h2_slot(&key, Some(2)), H2Slot::Ready(_)));
        drop(claimed(pool.h2_slot(&key, Some(2))));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_expire_and_are_capped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = PoolKey::plain(listener.local_addr().unwrap());
        let pool = Pool::new(2, Duration::from_secs(60));
        let mut servers = Vec::new();
        for _ in 0..3 {
            let (client, server) = connected(&listener).await;
            pool.put_raw(addr.clone(), plain(client), Instant::now());
            servers.push(server);
        }
        assert_eq!(pool.idle_count(), 2);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(pool.checkout_raw(&addr, Instant::now()).is_none());
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_clusters_connection_limits_retire_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = PoolKey::plain(listener.local_addr().unwrap());
        let pool = Pool::new(4, Duration::from_secs(60));
        let (client, _server) = connected(&listener).await;

        // `max_requests_per_connection: 2`: back after the first request, not the second.
        let two = ConnectionLimits {
            max_requests_per_connection: Some(2),
            ..ConnectionLimits::default()
        };
        pool.put_raw(addr.clone(), limited(client, two), Instant::now());
        let again = pool
            .checkout_raw(&addr, Instant::now())
            .expect("one more request");
        pool.put_raw(addr.clone(), again, Instant::now());
        assert_eq!(pool.idle_count(), 0);

        // The cluster's idle timeout replaces the pool's; zero never expires.
        let (client, _server) = connected(&listener).await;
        let short = ConnectionLimits {
            idle_timeout: Some(Duration::from_secs(5)),
            ..ConnectionLimits::default()
        };
        pool.put_raw(addr.clone(), limited(client, short), Instant::now());
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(pool.checkout_raw(&addr, Instant::now()).is_none());
        let (client, _server) = connected(&listener).await;
        let never = ConnectionLimits {
            idle_timeout: Some(Duration::ZERO),
            ..ConnectionLimits::default()
        };
        pool.put_raw(addr.clone(), limited(client, never), Instant::now());
        tokio::time::advance(Duration::from_secs(3600)).await;
        let kept = pool
            .checkout_raw(&addr, Instant::now())
            .expect("no idle timeout");

        // `max_connection_duration`: retired once that old, idle or coming back.
        drop(kept);
        let (client, _server) = connected(&listener).await;
        let brief = ConnectionLimits {
            max_connection_duration: Some(Duration::from_secs(10)),
            ..ConnectionLimits::default()
        };
        pool.put_raw(addr.clone(), limited(client, brief), Instant::now());
        let young = pool
            .checkout_raw(&addr, Instant::now())
            .expect("young enough");
        tokio::time::advance(Duration::from_secs(10)).await;
        pool.put_raw(addr.clone(), young, Instant::now());
        assert_eq!(pool.idle_count(), 0);
    }
}

//! Upstream connection reuse, keyed by endpoint and transport ([`PoolKey`]: the address,
//! and for TLS the context and SNI the connection was made with).
//!
//! HTTP/1.1: a connection goes back to the pool only when the response body it carried
//! has ended, so a pooled connection is always free for the next request. The fast path
//! (`h1.rs`) pools plain sockets, the general path hyper senders. HTTP/2: shared,
//! multiplexed connections per endpoint, each given streams up to its server's
//! `SETTINGS_MAX_CONCURRENT_STREAMS` (and its cluster's `max_concurrent_streams`), another
//! opened beyond them; while one is being made, the endpoint's other requests wait for it
//! ([`H2Claim`]) rather than each opening its own, as Envoy's HTTP/2 pool gives new streams
//! to a connection still connecting. The locks are held only to
//! push, pop or clone one sender; never across an await, and a reload never takes them.
//!
//! A connection to a cluster's endpoint carries a [`ConnHold`] for as long as it is open,
//! idle in the pool included, as Envoy counts its pools' connections: on the endpoint
//! (`upstream_cx_active`) and, when the cluster limits them, against `max_connections`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    h2: Mutex<HashMap<PoolKey, H2Conns>>,
    /// The id the next HTTP/2 connection made gets.
    next_h2: AtomicU64,
    max_idle_per_endpoint: usize,
    idle_timeout: Duration,
}

/// The HTTP/2 connections of one endpoint: those shared, and those being made.
struct H2Conns {
    shared: Vec<Shared>,
    connecting: Vec<Connecting>,
    /// The stream limit the endpoint's server last gave (unlimited until one has): a new
    /// connection takes it as its own until its server's SETTINGS say otherwise, so that a
    /// burst of requests does not pile onto it beyond what the server will take.
    learned: Arc<AtomicUsize>,
}

impl Default for H2Conns {
    fn default() -> Self {
        H2Conns {
            shared: Vec::new(),
            connecting: Vec::new(),
            learned: Arc::new(AtomicUsize::new(usize::MAX)),
        }
    }
}

impl H2Conns {
    /// Shares a new connection; the stream of the request that made it.
    fn share(&mut self, sender: Sender, life: Box<Life>) -> H2Stream {
        let cap = cap(life.limits.max_concurrent_streams);
        let streams = StreamCount {
            open: AtomicUsize::new(0),
            limit: AtomicUsize::new(self.learned.load(Ordering::Relaxed).min(cap)),
            cap,
            endpoint: Arc::clone(&self.learned),
        };
        let now = Instant::now();
        let mut shared = Shared {
            streams: Arc::new(streams),
            sender,
            life,
            used: now,
        };
        let (stream, more) = shared.take(now);
        if more {
            self.shared.push(shared);
        }
        stream
    }

    /// How many requests may wait for a connection being made besides the one making it:
    /// no more than its `max_requests_per_connection` and `max_concurrent_streams`, or the
    /// stream limit its server last gave, allow.
    fn room(&self, limits: &ConnectionLimits) -> Option<u32> {
        let streams = self
            .learned
            .load(Ordering::Relaxed)
            .min(cap(limits.max_concurrent_streams));
        let by_streams =
            (streams != usize::MAX).then(|| u32::try_from(streams).unwrap_or(u32::MAX));
        [limits.max_requests_per_connection, by_streams]
            .into_iter()
            .flatten()
            .min()
            .map(|n| n.saturating_sub(1))
    }

    fn is_empty(&self) -> bool {
        self.shared.is_empty() && self.connecting.is_empty()
    }

    /// A stream on the first shared connection with room. A connection past its idle
    /// timeout or lifetime, or closed (GOAWAY), is given up on the way (its open streams
    /// finish); one that has carried its `max_requests_per_connection` takes this last
    /// stream and no more.
    fn take_stream(&mut self, now: Instant, idle_timeout: Duration) -> Option<H2Stream> {
        let mut i = 0;
        while let Some(shared) = self.shared.get_mut(i) {
            if !shared.streams.has_room() {
                i += 1;
                continue;
            }
            if shared.life.stale(shared.used, now, idle_timeout)
                || h2_client::is_closed(&mut shared.sender)
            {
                self.shared.remove(i);
                continue;
            }
            let (stream, more) = shared.take(now);
            if !more {
                self.shared.remove(i);
            }
            return Some(stream);
        }
        None
    }

    /// A stream on the shared connection with the fewest open, beyond its server's limit.
    fn take_least_busy(&mut self, now: Instant) -> Option<H2Stream> {
        let i = (0..self.shared.len())
            .min_by_key(|&i| self.shared[i].streams.open.load(Ordering::Relaxed))?;
        let (stream, more) = self.shared[i].take(now);
        if !more {
            self.shared.remove(i);
        }
        Some(stream)
    }
}

impl Connecting {
    /// Waiting for this connection, if it has room for one more request.
    fn join(&mut self) -> Option<H2Slot> {
        match &mut self.room {
            Some(0) => return None,
            Some(n) => *n -= 1,
            None => {}
        }
        Some(H2Slot::Wait(self.progress.clone()))
    }
}

/// A cluster's `max_concurrent_streams` as a stream count (`usize::MAX`: none).
fn cap(max_concurrent_streams: Option<u32>) -> usize {
    max_concurrent_streams.map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX))
}

/// An HTTP/2 connection being made by one request, for the requests that wait for it.
struct Connecting {
    id: u64,
    progress: watch::Receiver<H2Progress>,
    /// How many more requests may wait for it: what its `max_requests_per_connection`,
    /// `max_concurrent_streams` or the endpoint's learned stream limit allow, less those
    /// already given to it (`None`: no limit).
    room: Option<u32>,
}

/// A shared HTTP/2 connection: its sender, its streams, its limits, and when it last took
/// a stream.
struct Shared {
    sender: Sender,
    streams: Arc<StreamCount>,
    life: Box<Life>,
    used: Instant,
}

impl Shared {
    /// One more stream on it; whether it may take another after this one.
    fn take(&mut self, now: Instant) -> (H2Stream, bool) {
        self.used = now;
        self.streams.open.fetch_add(1, Ordering::Relaxed);
        let stream = H2Stream {
            sender: self.sender.clone(),
            open: OpenStream(Arc::clone(&self.streams)),
        };
        (stream, self.life.served())
    }
}

/// What the pool knows of one HTTP/2 connection's streams.
#[derive(Debug)]
pub struct StreamCount {
    open: AtomicUsize,
    /// How many streams it may have open: the server's `SETTINGS_MAX_CONCURRENT_STREAMS`
    /// (until its SETTINGS are read, what the endpoint's last connection learned, else
    /// unlimited, as Envoy's pool counts a new connection's capacity), within `cap`.
    limit: AtomicUsize,
    /// The cluster's `max_concurrent_streams` (`usize::MAX`: none).
    cap: usize,
    /// The endpoint's last learned limit, for its next connections.
    endpoint: Arc<AtomicUsize>,
}

impl StreamCount {
    /// Records the server's stream limit, once its SETTINGS are read.
    pub fn learned(&self, limit: usize) {
        self.limit.store(limit.min(self.cap), Ordering::Relaxed);
        self.endpoint.store(limit, Ordering::Relaxed);
    }

    fn has_room(&self) -> bool {
        self.open.load(Ordering::Relaxed) < self.limit.load(Ordering::Relaxed)
    }
}

/// A stream on a pooled HTTP/2 connection: the sender to open it on, and its count on the
/// connection.
pub struct H2Stream {
    /// The connection's sender.
    pub sender: Sender,
    /// Counts the stream as open on its connection until dropped.
    pub open: OpenStream,
}

/// One open stream on an HTTP/2 connection, counted until dropped: the pool gives a
/// connection no stream beyond its server's limit and opens another connection instead,
/// as Envoy's HTTP/2 pool does.
#[derive(Debug)]
pub struct OpenStream(Arc<StreamCount>);

impl OpenStream {
    /// The counts of the stream's connection.
    pub fn connection(&self) -> Arc<StreamCount> {
        Arc::clone(&self.0)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
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
    /// A stream on a shared connection.
    Ready(H2Stream),
    /// Another request is making a connection: wait for it, then look again.
    Wait(watch::Receiver<H2Progress>),
    /// This request makes a new connection, and shares it (or its failure) with the
    /// requests that come meanwhile.
    Claimed(H2Claim),
}

/// The right to make an HTTP/2 connection to an endpoint. Dropped without
/// [`H2Claim::publish`] or [`H2Claim::fail`], it frees the endpoint for the next request.
pub struct H2Claim {
    pool: Arc<Pool>,
    key: PoolKey,
    id: u64,
    progress: watch::Sender<H2Progress>,
    settled: bool,
}

impl H2Claim {
    /// Shares the new connection with later requests (and the waiting ones); the stream of
    /// the request that made it, counted against its limits.
    pub fn publish(mut self, sender: Sender, life: Box<Life>) -> H2Stream {
        let stream = self.leave(|conns| conns.share(sender, life));
        self.settle(H2Progress::Settled);
        stream
    }

    /// Fails the requests waiting for the connection as `error`, the failure to make it.
    pub fn fail(mut self, error: &ProxyError) {
        self.leave(|_| ());
        self.settle(H2Progress::Failed(error.replicate()));
    }

    /// Takes this claim's connection out of those being made, then does `then` with the
    /// endpoint's connections.
    fn leave<T>(&self, then: impl FnOnce(&mut H2Conns) -> T) -> T {
        let mut h2 = self.pool.lock_h2();
        let conns = h2.entry(self.key.clone()).or_default();
        conns.connecting.retain(|c| c.id != self.id);
        let done = then(conns);
        if conns.is_empty() {
            h2.remove(&self.key);
        }
        done
    }

    fn settle(&mut self, progress: H2Progress) {
        self.settled = true;
        self.progress.send_replace(progress);
    }
}

impl Drop for H2Claim {
    fn drop(&mut self) {
        if !self.settled {
            self.leave(|_| ());
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
            next_h2: AtomicU64::new(0),
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

    fn lock_h2(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, H2Conns>> {
        self.h2.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What a request for `key` finds: a stream on a shared connection with room under its
    /// server's stream limit, a connection another request is making, or the claim to make
    /// one. A connection carries at most its cluster's `max_requests_per_connection`
    /// streams in all, and `max_concurrent_streams` at once. When every
    /// connection is at its limit and `may_open` says the cluster has no room for another
    /// (`max_connections`), the stream goes on the least busy one, to open there when one
    /// of its streams ends.
    pub fn h2_slot(
        self: &Arc<Self>,
        key: &PoolKey,
        limits: &ConnectionLimits,
        may_open: impl FnOnce() -> bool,
    ) -> H2Slot {
        let mut h2 = self.lock_h2();
        let conns = h2.entry(key.clone()).or_default();
        let now = Instant::now();
        let stream = match conns.take_stream(now, self.idle_timeout) {
            Some(stream) => Some(stream),
            None => {
                if let Some(wait) = conns.connecting.iter_mut().find_map(Connecting::join) {
                    return wait;
                }
                if conns.shared.is_empty() || may_open() {
                    None
                } else {
                    conns.take_least_busy(now)
                }
            }
        };
        if let Some(stream) = stream {
            if conns.is_empty() {
                h2.remove(key);
            }
            return H2Slot::Ready(stream);
        }
        let (progress, waiting) = watch::channel(H2Progress::Pending);
        let id = self.next_h2.fetch_add(1, Ordering::Relaxed);
        let room = conns.room(limits);
        conns.connecting.push(Connecting {
            id,
            progress: waiting,
            room,
        });
        H2Slot::Claimed(H2Claim {
            pool: Arc::clone(self),
            key: key.clone(),
            id,
            progress,
            settled: false,
        })
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
    use bytes::Bytes;
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

    /// An HTTP/2 connection to a server on `listener` (allowing `max_streams` concurrent
    /// streams), served until the test ends; its SETTINGS are in when it is returned.
    async fn h2_sender(listener: &TcpListener, max_streams: Option<u32>) -> Sender {
        let (client, server) = connected(listener).await;
        tokio::spawn(async move {
            let mut builder = h2::server::Builder::new();
            if let Some(max) = max_streams {
                builder.max_concurrent_streams(max);
            }
            let mut connection = builder.handshake::<_, Bytes>(server).await.unwrap();
            while connection.accept().await.is_some() {}
        });
        let (sender, mut connection) = h2_client::handshake(client).await.unwrap();
        let mut ping = connection.ping_pong().unwrap();
        tokio::spawn(connection);
        // The server's SETTINGS come before its answer to the ping.
        ping.ping(h2::Ping::opaque()).await.unwrap();
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

    fn ready(slot: H2Slot) -> H2Stream {
        match slot {
            H2Slot::Ready(stream) => stream,
            _ => panic!("expected a stream"),
        }
    }

    /// What a request of a cluster without limits finds for `key`.
    fn slot(pool: &Arc<Pool>, key: &PoolKey) -> H2Slot {
        pool.h2_slot(key, &ConnectionLimits::default(), || true)
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

    fn unlimited() -> Box<Life> {
        Life::new(ConnectionLimits::default())
    }

    /// Whether two streams are on the same connection.
    fn same(a: &H2Stream, b: &H2Stream) -> bool {
        Arc::ptr_eq(&a.open.0, &b.open.0)
    }

    /// Shares a connection to the server on `listener` (allowing `max_streams`) under
    /// `claim`, its limit learned as the connection's driver learns it.
    async fn share(claim: H2Claim, listener: &TcpListener, max_streams: u32) -> H2Stream {
        let sender = h2_sender(listener, Some(max_streams)).await;
        let limit = sender.current_max_send_streams();
        let stream = claim.publish(sender, unlimited());
        stream.open.connection().learned(limit);
        stream
    }

    #[tokio::test]
    async fn requests_wait_for_the_http2_connection_another_is_making_and_then_share_it() {
        let (listener, key, pool) = h2_pool().await;
        let claim = claimed(slot(&pool, &key));
        let mut first = waiting(slot(&pool, &key));
        let mut second = waiting(slot(&pool, &key));
        assert!(matches!(*first.borrow(), H2Progress::Pending));

        // Until the server's SETTINGS are read the connection takes any number of streams,
        // as Envoy's pool counts it: both waiters join it though the server takes one.
        let sender = h2_sender(&listener, Some(1)).await;
        let made = claim.publish(sender, unlimited());
        for progress in [&mut first, &mut second] {
            let settled = progress
                .wait_for(|p| !matches!(p, H2Progress::Pending))
                .await;
            assert!(matches!(*settled.unwrap(), H2Progress::Settled));
            let joined = ready(slot(&pool, &key));
            assert!(same(&made, &joined));
        }
        made.open.connection().learned(1);
        drop(claimed(slot(&pool, &key)));
    }

    /// The first connection to `key`, its server taking two streams, and both of them.
    async fn full(pool: &Arc<Pool>, key: &PoolKey, listener: &TcpListener) -> (H2Stream, H2Stream) {
        let first = share(claimed(slot(pool, key)), listener, 2).await;
        let second = ready(slot(pool, key));
        assert!(same(&first, &second));
        (first, second)
    }

    #[tokio::test]
    async fn streams_beyond_the_servers_limit_go_on_another_http2_connection() {
        let (listener, key, pool) = h2_pool().await;
        let (first, second) = full(&pool, &key, &listener).await;

        // At the server's two streams: a new connection, unless the cluster is at its
        // `max_connections`; then the stream waits on the least busy one.
        drop(claimed(slot(&pool, &key)));
        let third = ready(pool.h2_slot(&key, &ConnectionLimits::default(), || false));
        assert!(same(&first, &third));
        let claim = claimed(slot(&pool, &key));
        let other = share(claim, &listener, 2).await;
        assert!(!same(&first, &other));
        let least_busy = ready(slot(&pool, &key));
        assert!(same(&other, &least_busy));

        // A stream that ends leaves room on its connection, which the next one takes.
        drop((second, third));
        let again = ready(slot(&pool, &key));
        assert!(same(&first, &again));
    }

    #[tokio::test]
    async fn a_new_http2_connection_takes_the_stream_limit_its_endpoint_last_gave() {
        let (listener, key, pool) = h2_pool().await;
        let _full = full(&pool, &key, &listener).await;

        // Full: one more request may wait for the next connection, not two.
        let claim = claimed(slot(&pool, &key));
        let _waiter = waiting(slot(&pool, &key));
        let _another = claimed(slot(&pool, &key));

        // Shared before its own SETTINGS are read, it takes two streams.
        let made = claim.publish(h2_sender(&listener, Some(5)).await, unlimited());
        let joined = ready(slot(&pool, &key));
        assert!(same(&made, &joined));
        assert!(matches!(slot(&pool, &key), H2Slot::Wait(_)));
    }

    #[tokio::test]
    async fn a_failed_http2_connection_fails_its_waiters_and_an_abandoned_one_frees_the_endpoint() {
        let (_listener, key, pool) = h2_pool().await;

        let claim = claimed(slot(&pool, &key));
        let progress = waiting(slot(&pool, &key));
        claim.fail(&ProxyError::ConnectTimeout);
        assert!(matches!(
            *progress.borrow(),
            H2Progress::Failed(ProxyError::ConnectTimeout)
        ));

        // The next request claims it again; when that request goes away, its waiters look
        // again and one of them makes the connection.
        let claim = claimed(slot(&pool, &key));
        let progress = waiting(slot(&pool, &key));
        drop(claim);
        assert!(matches!(*progress.borrow(), H2Progress::Settled));
        drop(claimed(slot(&pool, &key)));
        assert!(pool.lock_h2().is_empty());
    }

    #[tokio::test]
    async fn a_connecting_http2_connection_takes_no_more_waiters_than_its_request_limit() {
        let (listener, key, pool) = h2_pool().await;
        let two = ConnectionLimits {
            max_requests_per_connection: Some(2),
            ..ConnectionLimits::default()
        };
        let claim = claimed(pool.h2_slot(&key, &two, || true));
        let _progress = waiting(pool.h2_slot(&key, &two, || true));
        // The third makes a connection of its own, as Envoy's pool opens another.
        let _another = claimed(pool.h2_slot(&key, &two, || true));

        // Shared with its second stream still to come: the waiter takes it, and that is
        // the connection's last.
        let _first = claim.publish(h2_sender(&listener, None).await, Life::new(two));
        let _last = ready(pool.h2_slot(&key, &two, || true));
        assert!(matches!(pool.h2_slot(&key, &two, || true), H2Slot::Wait(_)));
    }

    #[tokio::test]
    async fn a_clusters_max_concurrent_streams_caps_each_http2_connection_below_its_server() {
        let (listener, key, pool) = h2_pool().await;
        let one = ConnectionLimits {
            max_concurrent_streams: Some(1),
            ..ConnectionLimits::default()
        };
        // Nobody waits for a connection that takes one stream at a time.
        let claim = claimed(pool.h2_slot(&key, &one, || true));
        drop(claimed(pool.h2_slot(&key, &one, || true)));

        // Shared, before and after its server (allowing five) is heard: one stream.
        let sender = h2_sender(&listener, Some(5)).await;
        let limit = sender.current_max_send_streams();
        let first = claim.publish(sender, Life::new(one));
        drop(claimed(pool.h2_slot(&key, &one, || true)));
        first.open.connection().learned(limit);
        drop(claimed(pool.h2_slot(&key, &one, || true)));
        drop(first);
        drop(ready(pool.h2_slot(&key, &one, || true)));
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

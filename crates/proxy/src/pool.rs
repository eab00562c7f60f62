//! Upstream connection reuse, keyed by endpoint address.
//!
//! HTTP/1.1: a connection goes back to the pool only when the response body it carried
//! has ended, so a pooled connection is always free for the next request. The fast path
//! (`h1.rs`) pools plain sockets, the general path hyper senders. HTTP/2: one shared,
//! multiplexed connection per endpoint. The locks are held only to push, pop or clone one
//! sender; never across an await, and a reload never takes them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hyper::client::conn::{http1::SendRequest, http2};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::RequestBody;

/// Idle connections of one kind per endpoint, each with when it went idle; newest last.
struct Idle<T>(Mutex<HashMap<SocketAddr, Vec<(T, Instant)>>>);

impl<T> Idle<T> {
    fn new() -> Self {
        Idle(Mutex::new(HashMap::new()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Vec<(T, Instant)>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pop(&self, key: SocketAddr) -> Option<(T, Instant)> {
        let mut idle = self.lock();
        let list = idle.get_mut(&key)?;
        let entry = list.pop();
        if list.is_empty() {
            idle.remove(&key);
        }
        entry
    }

    fn push(&self, key: SocketAddr, connection: T, max: usize) {
        let mut idle = self.lock();
        let list = idle.entry(key).or_default();
        if list.len() < max {
            list.push((connection, Instant::now()));
        }
    }

    fn count(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }
}

/// Idle upstream connections per endpoint.
pub struct Pool {
    idle: Idle<SendRequest<RequestBody>>,
    raw: Idle<TcpStream>,
    h2: Mutex<HashMap<SocketAddr, http2::SendRequest<RequestBody>>>,
    max_idle_per_endpoint: usize,
    idle_timeout: Duration,
}

/// A connection checked out of (or new for) the pool.
pub struct Pooled {
    pool: Arc<Pool>,
    key: SocketAddr,
    /// The sender for this connection.
    pub sender: SendRequest<RequestBody>,
    /// Whether it was reused from the pool (a stale-connection race is then possible).
    pub reused: bool,
}

impl Pooled {
    /// Returns the connection to the pool for the next request.
    pub fn release(self) {
        self.pool.put(self.key, self.sender);
    }
}

impl Pool {
    /// A pool keeping up to `max_idle_per_endpoint` connections for `idle_timeout`.
    pub fn new(max_idle_per_endpoint: usize, idle_timeout: Duration) -> Self {
        Pool {
            idle: Idle::new(),
            raw: Idle::new(),
            h2: Mutex::new(HashMap::new()),
            max_idle_per_endpoint,
            idle_timeout,
        }
    }

    /// Takes an idle connection to `key` that is still open, if any.
    pub async fn checkout(self: &Arc<Self>, key: SocketAddr) -> Option<Pooled> {
        loop {
            let (mut sender, since) = self.idle.pop(key)?;
            if since.elapsed() > self.idle_timeout || sender.is_closed() {
                continue;
            }
            if sender.ready().await.is_ok() {
                return Some(Pooled {
                    pool: Arc::clone(self),
                    key,
                    sender,
                    reused: true,
                });
            }
        }
    }

    /// Wraps a freshly connected sender so that it can be released to the pool.
    pub fn fresh(self: &Arc<Self>, key: SocketAddr, sender: SendRequest<RequestBody>) -> Pooled {
        Pooled {
            pool: Arc::clone(self),
            key,
            sender,
            reused: false,
        }
    }

    fn put(&self, key: SocketAddr, sender: SendRequest<RequestBody>) {
        if !sender.is_closed() {
            self.idle.push(key, sender, self.max_idle_per_endpoint);
        }
    }

    /// The shared HTTP/2 connection to `key`, if one is open.
    pub fn h2(&self, key: SocketAddr) -> Option<http2::SendRequest<RequestBody>> {
        let mut h2 = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
        match h2.get(&key) {
            Some(sender) if !sender.is_closed() => Some(sender.clone()),
            Some(_) => {
                h2.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Shares a new HTTP/2 connection to `key` with later requests.
    pub fn put_h2(&self, key: SocketAddr, sender: http2::SendRequest<RequestBody>) {
        self.h2
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, sender);
    }

    /// Takes an idle plain HTTP/1.1 connection to `key` that is still open, if any.
    pub fn checkout_raw(&self, key: SocketAddr) -> Option<TcpStream> {
        loop {
            let (stream, since) = self.raw.pop(key)?;
            if since.elapsed() <= self.idle_timeout && still_open(&stream) {
                return Some(stream);
            }
        }
    }

    /// Keeps a plain HTTP/1.1 connection whose last response has ended for the next request.
    pub fn put_raw(&self, key: SocketAddr, stream: TcpStream) {
        self.raw.push(key, stream, self.max_idle_per_endpoint);
    }

    /// Number of idle connections, for the admin server.
    pub fn idle_count(&self) -> usize {
        self.idle.count() + self.raw.count()
    }
}

/// Whether an idle connection can still carry a request. The runtime has already seen any
/// FIN or reset as read readiness, so the common case costs no system call; an idle
/// HTTP/1.1 connection with something to read is closing or out of step, and unusable.
fn still_open(stream: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    match stream.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            let mut byte = [0u8; 1];
            matches!(stream.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    async fn connected(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_handed_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = Pool::new(4, Duration::from_secs(60));
        let (client, server) = connected(&listener).await;
        pool.put_raw(addr, client);
        let open = pool.checkout_raw(addr).expect("an open connection");
        pool.put_raw(addr, open);
        drop(server);
        // Lets the runtime's I/O driver see the FIN.
        tokio::task::yield_now().await;
        assert!(pool.checkout_raw(addr).is_none());
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_expire_and_are_capped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = Pool::new(2, Duration::from_secs(60));
        let mut servers = Vec::new();
        for _ in 0..3 {
            let (client, server) = connected(&listener).await;
            pool.put_raw(addr, client);
            servers.push(server);
        }
        assert_eq!(pool.idle_count(), 2);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(pool.checkout_raw(addr).is_none());
        assert_eq!(pool.idle_count(), 0);
    }
}

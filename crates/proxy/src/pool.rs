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

type Idle = Vec<(SendRequest<RequestBody>, Instant)>;

/// Idle upstream connections per endpoint.
pub struct Pool {
    idle: Mutex<HashMap<SocketAddr, Idle>>,
    raw: Mutex<HashMap<SocketAddr, Vec<(TcpStream, Instant)>>>,
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
            idle: Mutex::new(HashMap::new()),
            raw: Mutex::new(HashMap::new()),
            h2: Mutex::new(HashMap::new()),
            max_idle_per_endpoint,
            idle_timeout,
        }
    }

    /// Takes an idle connection to `key` that is still open, if any.
    pub async fn checkout(self: &Arc<Self>, key: SocketAddr) -> Option<Pooled> {
        loop {
            let (mut sender, since) = {
                let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
                let list = idle.get_mut(&key)?;
                let entry = list.pop();
                if list.is_empty() {
                    idle.remove(&key);
                }
                entry?
            };
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
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.entry(key).or_default();
        if list.len() < self.max_idle_per_endpoint {
            list.push((sender, Instant::now()));
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
            let (stream, since) = {
                let mut raw = self.raw.lock().unwrap_or_else(PoisonError::into_inner);
                let list = raw.get_mut(&key)?;
                let entry = list.pop();
                if list.is_empty() {
                    raw.remove(&key);
                }
                entry?
            };
            if since.elapsed() <= self.idle_timeout && still_open(&stream) {
                return Some(stream);
            }
        }
    }

    /// Keeps a plain HTTP/1.1 connection whose last response has ended for the next request.
    pub fn put_raw(&self, key: SocketAddr, stream: TcpStream) {
        let mut raw = self.raw.lock().unwrap_or_else(PoisonError::into_inner);
        let list = raw.entry(key).or_default();
        if list.len() < self.max_idle_per_endpoint {
            list.push((stream, Instant::now()));
        }
    }

    /// Number of idle connections, for the admin server.
    pub fn idle_count(&self) -> usize {
        let hyper: usize = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(Vec::len)
            .sum();
        let raw: usize = self
            .raw
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(Vec::len)
            .sum();
        hyper + raw
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

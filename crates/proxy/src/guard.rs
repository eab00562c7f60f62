//! Connection-level timeouts enforced in the I/O layer: an idle timeout (no bytes either
//! way) and a deadline for a request head once its first byte has arrived, so a slow
//! client cannot hold a connection open by trickling a request. For the HTTP/1.1 fast
//! path, the same timer also enforces the connection manager's per-stream timeouts
//! (`stream_idle_timeout`, `request_timeout`): HTTP/1.1 has one stream at a time, so the
//! connection's activity is the stream's.
//!
//! One timer per connection, re-armed in place: no task and no allocation per read.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::metrics::Metrics;

/// An HTTP connection manager's per-stream timeouts; `None` disables either.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamTimeouts {
    /// `stream_idle_timeout`: a stream with no activity this long ends.
    pub idle: Option<Duration>,
    /// `request_timeout`: the whole request must arrive within this from its first byte.
    pub request: Option<Duration>,
}

impl StreamTimeouts {
    /// Envoy's defaults: 5 min stream idle timeout, no request timeout.
    pub const ENVOY_DEFAULT: StreamTimeouts = StreamTimeouts {
        idle: Some(Duration::from_secs(300)),
        request: None,
    };
}

/// One stream's clock on the general path, where streams (HTTP/2's several at once) are
/// timed one by one: when the request began, when its body last moved, whether it is whole.
#[derive(Debug)]
pub struct StreamClock {
    began: Instant,
    /// Nanoseconds from `began` to the last request body frame.
    last: AtomicU64,
    received: AtomicBool,
}

impl StreamClock {
    /// A stream starting now; `received` when its request has no body.
    pub fn new(received: bool) -> Self {
        StreamClock {
            began: Instant::now(),
            last: AtomicU64::new(0),
            received: AtomicBool::new(received),
        }
    }

    /// A request body frame went by; `end` when it was the last.
    pub fn activity(&self, end: bool) {
        let nanos = u64::try_from(self.began.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(nanos, Ordering::Release);
        if end {
            self.received.store(true, Ordering::Release);
        }
    }

    /// Whether the whole request has been received.
    pub fn received(&self) -> bool {
        self.received.load(Ordering::Acquire)
    }

    /// The next stream deadline under `timeouts`, and which it is; `None` when none
    /// applies (both disabled, or only `request_timeout` and the request is whole).
    pub fn deadline(&self, timeouts: StreamTimeouts) -> Option<(Instant, Expired)> {
        let last = self.began + Duration::from_nanos(self.last.load(Ordering::Acquire));
        let idle = timeouts.idle.map(|t| (last + t, Expired::StreamIdle));
        let request = timeouts
            .request
            .filter(|_| !self.received())
            .map(|t| (self.began + t, Expired::Request));
        match (idle, request) {
            (Some(i), Some(r)) => Some(if r.0 <= i.0 { r } else { i }),
            (i, r) => i.or(r),
        }
    }

    /// Waits until a stream deadline under `timeouts` passes, following the body's
    /// activity; pending forever when none applies.
    pub async fn expired(&self, timeouts: StreamTimeouts) -> Expired {
        loop {
            let Some((at, why)) = self.deadline(timeouts) else {
                // The request became whole and only `request_timeout` was set.
                return std::future::pending().await;
            };
            if at <= Instant::now() {
                return why;
            }
            // Deadlines only move later (body activity) or go (the request became whole):
            // wake at the one known now and look again.
            tokio::time::sleep_until(at).await;
        }
    }
}

/// Requests on a connection, maintained by the HTTP handler: while none is in flight, bytes
/// from the client start a new request head and its deadline, which ends when the handler
/// sees the head (the count of started requests moves on).
#[derive(Debug, Default)]
pub struct InFlight {
    active: AtomicU32,
    started: AtomicU64,
    /// Requests received whole, for `request_timeout`.
    received: AtomicU64,
    /// The stream timeouts the guard enforces, while `guarded` says it does.
    streams: Option<StreamTimeouts>,
    guarded: AtomicBool,
}

impl InFlight {
    /// Requests on a connection whose guard also enforces `streams` (the HTTP/1.1 fast
    /// path), until [`InFlight::release_streams`].
    pub fn with_streams(streams: StreamTimeouts) -> Self {
        InFlight {
            streams: Some(streams),
            guarded: AtomicBool::new(true),
            ..InFlight::default()
        }
    }

    /// A request's head has been read: its deadline no longer applies.
    pub fn start(self: &Arc<Self>) -> InFlightGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.started.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(Arc::clone(self))
    }

    /// The current request has been received whole: `request_timeout` no longer applies.
    pub fn received(&self) {
        self.received.fetch_add(1, Ordering::AcqRel);
    }

    /// The stream timeouts stop being the guard's job: the general path, which keeps its
    /// own per request, takes the connection over.
    pub fn release_streams(&self) {
        self.guarded.store(false, Ordering::Release);
    }

    fn idle(&self) -> bool {
        self.active.load(Ordering::Acquire) == 0
    }

    fn started(&self) -> u64 {
        self.started.load(Ordering::Acquire)
    }

    fn received_count(&self) -> u64 {
        self.received.load(Ordering::Acquire)
    }

    fn guarded_streams(&self) -> Option<StreamTimeouts> {
        self.streams
            .filter(|_| self.guarded.load(Ordering::Acquire))
    }
}

/// Ends one in-flight request when dropped.
pub struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a guarded connection was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// No bytes in either direction for the idle timeout.
    Idle,
    /// A request head was not complete within the request-headers timeout.
    RequestHeaders,
    /// The current stream saw no bytes for `stream_idle_timeout`; the connection itself
    /// may go on once the handler has answered.
    StreamIdle,
    /// The current request was not received whole within `request_timeout`.
    Request,
    /// The connection reached the `tcp_proxy`'s `max_downstream_connection_duration`.
    MaxDuration,
}

impl std::fmt::Display for Expired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Expired::Idle => "idle timeout",
            Expired::RequestHeaders => "request headers timeout",
            Expired::StreamIdle => "stream idle timeout",
            Expired::Request => "request timeout",
            Expired::MaxDuration => "max connection duration reached",
        })
    }
}

impl std::error::Error for Expired {}

impl Expired {
    /// The timeout an I/O error of a guarded connection reports, if any.
    pub fn of(e: &io::Error) -> Option<Expired> {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<Expired>())
            .copied()
    }

    /// The stream timeout an I/O error of a guarded connection reports, if any.
    pub fn of_stream(e: &io::Error) -> Option<Expired> {
        Expired::of(e).filter(|why| matches!(why, Expired::StreamIdle | Expired::Request))
    }
}

/// `inner` with an idle timeout and, when `in_flight` is given, a request-head deadline.
pub struct GuardedIo<T> {
    inner: T,
    idle_timeout: Duration,
    headers_timeout: Duration,
    in_flight: Option<Arc<InFlight>>,
    /// When the current head must be complete, and the started-request count then.
    head_deadline: Option<(Instant, u64)>,
    /// When the current request's first byte arrived, and the received-request count
    /// then: `request_timeout` runs until that count moves on.
    request_began: Option<(Instant, u64)>,
    /// A stream timeout was reported, with the started-request count then: none again for
    /// that request (a pipelined one that follows has its own).
    stream_reported: Option<u64>,
    idle_deadline: Instant,
    /// When the connection was accepted, which a maximum duration counts from.
    accepted: Instant,
    /// When the connection is closed however busy (`max_downstream_connection_duration`).
    max_deadline: Option<Instant>,
    /// Made when a read first has to wait: a connection answered without waiting on its
    /// client (one request, then closed) needs none.
    timer: Option<Pin<Box<Sleep>>>,
    expired: Option<Expired>,
    metrics: Option<Arc<Metrics>>,
}

impl<T> GuardedIo<T> {
    /// Guards `inner`; `in_flight` enables the request-head deadline (HTTP only).
    pub fn new(
        inner: T,
        idle_timeout: Duration,
        headers_timeout: Duration,
        in_flight: Option<Arc<InFlight>>,
    ) -> Self {
        let accepted = Instant::now();
        let idle_deadline = accepted + idle_timeout;
        GuardedIo {
            inner,
            idle_timeout,
            headers_timeout,
            in_flight,
            head_deadline: None,
            request_began: None,
            stream_reported: None,
            idle_deadline,
            accepted,
            max_deadline: None,
            timer: None,
            expired: None,
            metrics: None,
        }
    }

    /// Counts expiries in `metrics` (HTTP idle and header timeouts, or TCP idle).
    pub fn count_in(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Starts enforcing request-head deadlines: the connection turned out to be HTTP and
    /// the bytes read so far begin its first request.
    pub fn watch_requests(&mut self, in_flight: Arc<InFlight>) {
        let now = Instant::now();
        self.head_deadline = Some((now + self.headers_timeout, in_flight.started()));
        self.request_began = Some((now, in_flight.received_count()));
        self.stream_reported = None;
        self.in_flight = Some(in_flight);
    }

    fn expire(&mut self, why: Expired) -> io::Error {
        if matches!(why, Expired::StreamIdle | Expired::Request) {
            // The handler answers (and counts) it; the connection may serve more requests.
            self.stream_reported = self.in_flight.as_ref().map(|f| f.started());
            return timed_out(why);
        }
        if self.expired.is_none()
            && let Some(m) = &self.metrics
        {
            match (why, self.in_flight.is_some()) {
                (Expired::RequestHeaders, _) => m.header_timeout.inc(),
                (Expired::Idle, true) => m.http_idle_timeout.inc(),
                (Expired::Idle, false) => m.tcp_idle_timeout.inc(),
                (Expired::MaxDuration, _) => m.tcp_max_duration.inc(),
                (Expired::StreamIdle | Expired::Request, _) => 0,
            };
        }
        self.expired = Some(why);
        timed_out(why)
    }

    /// The guarded stream, for I/O that bypasses the guard (`splice::relay`, which keeps
    /// its own idle deadline).
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The guarded stream, mutably: `splice::relay` registers it with the reactor.
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// How long the connection may go with no bytes either way.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// Changes the idle timeout, counted from now: the filter chain that takes the
    /// connection has its own.
    pub fn set_idle_timeout(&mut self, idle_timeout: Duration) {
        self.idle_timeout = idle_timeout;
        self.activity();
    }

    /// Closes the connection this long after it was accepted, however busy; `None` never.
    pub fn set_max_duration(&mut self, max: Option<Duration>) {
        self.max_deadline = max.map(|d| self.accepted + d);
    }

    /// When the connection reaches its maximum duration, if it has one.
    pub fn max_deadline(&self) -> Option<Instant> {
        self.max_deadline
    }

    /// Records that the connection went idle for too long, or reached its maximum
    /// duration, as the guard itself would have.
    pub fn expire_relay(&mut self, why: Expired) -> io::Error {
        self.expire(why)
    }

    /// What closed the connection, if a timeout did.
    #[cfg(test)]
    pub fn expired(&self) -> Option<Expired> {
        self.expired
    }

    /// When bytes last moved either way: a caller that needs the time just after its own
    /// read or write has it without reading the clock again.
    pub fn last_activity(&self) -> Instant {
        self.idle_deadline - self.idle_timeout
    }

    fn activity(&mut self) {
        self.idle_deadline = Instant::now() + self.idle_timeout;
    }

    fn deadline(&self) -> Instant {
        let mut deadline = match self.head_deadline {
            Some((head, _)) => head.min(self.idle_deadline),
            None => self.idle_deadline,
        };
        if let Some((stream, _)) = self.stream_deadline() {
            deadline = deadline.min(stream);
        }
        if let Some(max) = self.max_deadline {
            deadline = deadline.min(max);
        }
        deadline
    }

    /// The earliest stream deadline of the request in progress on the HTTP/1.1 fast path,
    /// and which one it is.
    fn stream_deadline(&self) -> Option<(Instant, Expired)> {
        let in_flight = self.in_flight.as_ref()?;
        if self.stream_reported == Some(in_flight.started()) {
            return None;
        }
        let timeouts = in_flight.guarded_streams()?;
        // A stream exists from a request's first byte until its response is done.
        if self.head_deadline.is_none() && in_flight.idle() {
            return None;
        }
        let idle = timeouts.idle.map(|t| {
            (
                self.idle_deadline - self.idle_timeout + t,
                Expired::StreamIdle,
            )
        });
        let request = match (timeouts.request, self.request_began) {
            (Some(t), Some((began, received))) if in_flight.received_count() == received => {
                Some((began + t, Expired::Request))
            }
            _ => None,
        };
        match (idle, request) {
            (Some(i), Some(r)) => Some(if r.0 <= i.0 { r } else { i }),
            (i, r) => i.or(r),
        }
    }

    /// Drops the head deadline once the handler has seen a new request start.
    fn settle_head(&mut self) {
        if let (Some((_, armed_at)), Some(in_flight)) = (self.head_deadline, &self.in_flight)
            && in_flight.started() != armed_at
        {
            self.head_deadline = None;
        }
    }

    /// Polls the timer; `Some` once a deadline has passed.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Option<Expired> {
        if self.expired.is_some() {
            return self.expired;
        }
        self.settle_head();
        loop {
            // Only an earlier deadline re-arms the timer at once. Activity moves the idle
            // deadline later on every read and write; the armed timer then fires early and
            // is re-armed below, so a busy connection does not touch the timer wheel per
            // request.
            let deadline = self.deadline();
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if deadline < timer.deadline() {
                timer.as_mut().reset(deadline);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return None;
            }
            let now = Instant::now();
            let why = if self.max_deadline.is_some_and(|d| d <= now) {
                Some(Expired::MaxDuration)
            } else if let Some((_, why)) = self.stream_deadline().filter(|(d, _)| *d <= now) {
                Some(why)
            } else if self.head_deadline.is_some_and(|(d, _)| d <= now) {
                Some(Expired::RequestHeaders)
            } else if self.idle_deadline <= now {
                Some(Expired::Idle)
            } else {
                None
            };
            if let Some(why) = why {
                self.expire(why);
                return Some(why);
            }
            let later = self.deadline();
            if let Some(timer) = self.timer.as_mut() {
                timer.as_mut().reset(later);
            }
        }
    }
}

fn timed_out(why: Expired) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, why)
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(why) = this.expired {
            return Poll::Ready(Err(timed_out(why)));
        }
        this.settle_head();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                // A client that always has a byte ready never lets the read pend, so the
                // deadlines are also checked when bytes arrive, not only when the timer
                // fires. One clock read serves the check and the activity; a read that
                // pends or ends reads none (a clock read is a measurable part of a
                // request, and an idle keep-alive connection polls its read once more
                // after each one).
                let now = Instant::now();
                if this.max_deadline.is_some_and(|d| d <= now) {
                    return Poll::Ready(Err(this.expire(Expired::MaxDuration)));
                }
                if let Some((_, why)) = this.stream_deadline().filter(|(d, _)| *d <= now) {
                    return Poll::Ready(Err(this.expire(why)));
                }
                if this.head_deadline.is_some_and(|(d, _)| d <= now) {
                    return Poll::Ready(Err(this.expire(Expired::RequestHeaders)));
                }
                this.idle_deadline = now + this.idle_timeout;
                if this.head_deadline.is_none()
                    && let Some(in_flight) = this.in_flight.as_ref().filter(|f| f.idle())
                {
                    this.head_deadline = Some((now + this.headers_timeout, in_flight.started()));
                    this.request_began = Some((now, in_flight.received_count()));
                    this.stream_reported = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(result) => Poll::Ready(result),
            Poll::Pending => match this.poll_expired(cx) {
                Some(why) => Poll::Ready(Err(timed_out(why))),
                None => Poll::Pending,
            },
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            this.activity();
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            this.activity();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const IDLE: Duration = Duration::from_secs(60);
    const HEADERS: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn idle_connection_times_out_and_activity_defers_it() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut io = GuardedIo::new(server, IDLE, HEADERS, None);
        let mut buf = [0u8; 8];
        client.write_all(b"x").await.unwrap();
        tokio::time::advance(Duration::from_secs(50)).await;
        assert_eq!(io.read(&mut buf).await.unwrap(), 1);
        // 50 s after the last byte: still open.
        let read = tokio::time::timeout(Duration::from_secs(50), io.read(&mut buf)).await;
        assert!(read.is_err(), "must still be waiting");
        // Past 60 s of silence: closed as idle.
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(io.expired(), Some(Expired::Idle));
    }

    #[tokio::test(start_paused = true)]
    async fn a_filter_chains_idle_timeout_replaces_the_proxys() {
        let (_client, server) = tokio::io::duplex(64);
        let mut io = GuardedIo::new(server, IDLE, HEADERS, None);
        let mut buf = [0u8; 8];
        let start = Instant::now();
        io.set_idle_timeout(Duration::from_secs(5));
        assert_eq!(io.idle_timeout(), Duration::from_secs(5));
        // Shorter than the deadline already armed: it fires at 5 s, not 60 s.
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        // A longer one (a chain without an idle timeout gets a century) outlasts the
        // proxy's own.
        let (_client, server) = tokio::io::duplex(64);
        let mut io = GuardedIo::new(server, IDLE, HEADERS, None);
        io.set_idle_timeout(crate::NEVER);
        let read = tokio::time::timeout(Duration::from_secs(7200), io.read(&mut buf)).await;
        assert!(read.is_err(), "must still be waiting after two hours");
        assert_eq!(io.expired(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_connection_ends_at_its_max_duration_counted_from_the_accept() {
        let (mut client, server) = tokio::io::duplex(64);
        let start = Instant::now();
        let mut io = GuardedIo::new(server, IDLE, HEADERS, None);
        tokio::time::advance(Duration::from_secs(2)).await;
        io.set_max_duration(Some(Duration::from_secs(10)));
        let mut buf = [0u8; 8];
        // A byte always waiting: the read never pends, the deadline is still seen.
        let mut reads = 0;
        let err = loop {
            client.write_all(b"x").await.unwrap();
            match io.read(&mut buf).await {
                Ok(_) => reads += 1,
                Err(e) => break e,
            }
            assert!(reads < 100, "still open after {reads} reads");
            tokio::time::advance(Duration::from_millis(500)).await;
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(Expired::of(&err), Some(Expired::MaxDuration));
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        assert_eq!(reads, 16);
        // A quiet one: the timer fires at the deadline.
        let (_client, server) = tokio::io::duplex(64);
        let start = Instant::now();
        let mut io = GuardedIo::new(server, IDLE, HEADERS, None);
        io.set_max_duration(Some(Duration::from_secs(3)));
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        assert_eq!(io.expired(), Some(Expired::MaxDuration));
        assert_eq!(Expired::of_stream(&err), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickled_request_head_hits_the_headers_deadline() {
        let (mut client, server) = tokio::io::duplex(64);
        let in_flight = Arc::new(InFlight::default());
        let mut io = GuardedIo::new(server, IDLE, HEADERS, Some(Arc::clone(&in_flight)));
        let mut buf = [0u8; 8];
        let start = Instant::now();
        // One byte every 3 s keeps the connection active but never finishes the head.
        let err = loop {
            client.write_all(b"G").await.unwrap();
            match io.read(&mut buf).await {
                Ok(_) => tokio::time::advance(Duration::from_secs(3)).await,
                Err(e) => break e,
            }
            if start.elapsed() > Duration::from_secs(30) {
                panic!("deadline never fired");
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(io.expired(), Some(Expired::RequestHeaders));
        assert!(start.elapsed() >= HEADERS && start.elapsed() < HEADERS + Duration::from_secs(4));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_has_no_head_deadline() {
        let (mut client, server) = tokio::io::duplex(64);
        let in_flight = Arc::new(InFlight::default());
        let mut io = GuardedIo::new(server, IDLE, HEADERS, Some(Arc::clone(&in_flight)));
        let mut buf = [0u8; 64];
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 18);
        let request = in_flight.start();
        // A slow request body while the request is being handled: only idle applies.
        for _ in 0..10 {
            tokio::time::advance(Duration::from_secs(5)).await;
            client.write_all(b"b").await.unwrap();
            assert_eq!(io.read(&mut buf).await.unwrap(), 1);
        }
        drop(request);
        assert_eq!(io.expired(), None);
        // Idle between requests: no leftover head deadline fires, only idle does, later.
        let read = tokio::time::timeout(Duration::from_secs(55), io.read(&mut buf)).await;
        assert!(read.is_err(), "must still be waiting");
        assert_eq!(io.expired(), None);
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(io.expired(), Some(Expired::Idle));
    }

    const STREAMS: StreamTimeouts = StreamTimeouts {
        idle: Some(Duration::from_secs(5)),
        request: Some(Duration::from_secs(8)),
    };

    /// A guard enforcing `streams` on the fast path, with a request head already read.
    async fn streaming(
        streams: StreamTimeouts,
    ) -> (
        tokio::io::DuplexStream,
        GuardedIo<tokio::io::DuplexStream>,
        Arc<InFlight>,
    ) {
        let (mut client, server) = tokio::io::duplex(64);
        let in_flight = Arc::new(InFlight::with_streams(streams));
        let mut io = GuardedIo::new(server, IDLE, HEADERS, Some(Arc::clone(&in_flight)));
        let mut buf = [0u8; 64];
        client.write_all(b"POST / HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 19);
        (client, io, in_flight)
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_response_is_a_stream_idle_timeout_and_the_connection_goes_on() {
        let (mut client, mut io, in_flight) = streaming(STREAMS).await;
        let request = in_flight.start();
        in_flight.received();
        let start = Instant::now();
        let mut buf = [0u8; 8];
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(Expired::of_stream(&err), Some(Expired::StreamIdle));
        // Idle for `stream_idle_timeout`; the request timeout no longer applies.
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        // Reported once: the handler answers, the connection itself is not expired.
        io.write_all(b"HTTP/1.1 504").await.unwrap();
        drop(request);
        assert_eq!(io.expired(), None);
        let read = tokio::time::timeout(Duration::from_secs(30), io.read(&mut buf)).await;
        assert!(read.is_err(), "no stream, no stream timeout");
        client.write_all(b"G").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pipelined_request_has_its_own_stream_idle_timeout() {
        let (_client, mut io, in_flight) = streaming(STREAMS).await;
        let request = in_flight.start();
        in_flight.received();
        let mut buf = [0u8; 8];
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(Expired::of_stream(&err), Some(Expired::StreamIdle));
        io.write_all(b"HTTP/1.1 504").await.unwrap();
        drop(request);
        // The next request was read along with the first: no new byte arrives for it.
        let start = Instant::now();
        let _next = in_flight.start();
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(Expired::of_stream(&err), Some(Expired::StreamIdle));
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn activity_defers_the_stream_idle_timeout_but_not_the_request_timeout() {
        let (mut client, mut io, in_flight) = streaming(STREAMS).await;
        let _request = in_flight.start();
        let start = Instant::now();
        let mut buf = [0u8; 8];
        // A body byte every 3 s: never idle for 5 s, yet not whole after 8 s.
        let err = loop {
            tokio::time::advance(Duration::from_secs(3)).await;
            client.write_all(b"b").await.unwrap();
            match io.read(&mut buf).await {
                Ok(_) => assert!(start.elapsed() < Duration::from_secs(20), "never fired"),
                Err(e) => break e,
            }
        };
        assert_eq!(Expired::of_stream(&err), Some(Expired::Request));
        assert_eq!(start.elapsed(), Duration::from_secs(9));
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_head_hits_the_stream_idle_timeout() {
        let (mut client, server) = tokio::io::duplex(64);
        let in_flight = Arc::new(InFlight::with_streams(StreamTimeouts {
            idle: Some(Duration::from_secs(2)),
            request: None,
        }));
        let mut io = GuardedIo::new(server, IDLE, HEADERS, Some(Arc::clone(&in_flight)));
        let mut buf = [0u8; 64];
        client.write_all(b"GET / HT").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 8);
        let start = Instant::now();
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(Expired::of_stream(&err), Some(Expired::StreamIdle));
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn released_streams_leave_the_connection_timeouts_alone() {
        let (_client, mut io, in_flight) = streaming(STREAMS).await;
        let _request = in_flight.start();
        in_flight.release_streams();
        let start = Instant::now();
        let mut buf = [0u8; 8];
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(Expired::of_stream(&err), None);
        assert_eq!(io.expired(), Some(Expired::Idle));
        assert_eq!(start.elapsed(), IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_clock_follows_its_body() {
        let clock = StreamClock::new(false);
        let start = Instant::now();
        assert_eq!(
            clock.deadline(STREAMS),
            Some((start + Duration::from_secs(5), Expired::StreamIdle))
        );
        tokio::time::advance(Duration::from_secs(4)).await;
        clock.activity(false);
        // Idle would now end at 9 s: the request timeout, at 8 s, comes first.
        assert_eq!(
            clock.deadline(STREAMS),
            Some((start + Duration::from_secs(8), Expired::Request))
        );
        clock.activity(true);
        assert!(clock.received());
        assert_eq!(
            clock.deadline(STREAMS),
            Some((start + Duration::from_secs(9), Expired::StreamIdle))
        );
        assert_eq!(clock.expired(STREAMS).await, Expired::StreamIdle);
        assert_eq!(start.elapsed(), Duration::from_secs(9));
        // Only a request timeout, and the request is whole: nothing ever fires.
        let only_request = StreamTimeouts {
            idle: None,
            request: Some(Duration::from_secs(1)),
        };
        assert_eq!(clock.deadline(only_request), None);
        let waited =
            tokio::time::timeout(Duration::from_secs(60), clock.expired(only_request)).await;
        assert!(waited.is_err());
    }
}

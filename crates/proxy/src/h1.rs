//! HTTP/1.1 forwarding for the common request, without hyper: the head is parsed in place
//! and rewritten once, sent with its body in one write on a pooled upstream socket, and the
//! response head is rewritten and sent with the first body bytes in one write, the rest
//! streamed with its own framing. An idle connection holds no buffer at all.
//!
//! Anything out of the ordinary (CONNECT, upgrades, `Expect`, chunked or large request
//! bodies, HTTP/1.0, an HTTP/2 upstream, a head this parser does not fully accept) hands
//! the connection, with every byte not yet consumed, to the general path in `http.rs`, so
//! those requests behave exactly as they do there.

use std::borrow::Cow;
use std::io;
use std::mem::MaybeUninit;
use std::num::NonZeroU32;
use std::ops::Range;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Response, StatusCode, Version};
use portcullis_registry::{Headers, Resource};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Proxy;
use crate::accept::ClientStream;
use crate::attempt::{Answer, Attempt, Attempts, Failure};
use crate::body::ProxyBody;
use crate::boxed::boxed;
use crate::error::ProxyError;
use crate::guard::{Expired, GuardedIo, InFlight};
use crate::http::{
    ATTEMPT_COUNT, Downstream, EXPECTED_TIMEOUT, LogLine, REQUEST_ID, REQUEST_ID_LEN, RequestLog,
    RouteInput, Routed, SNIFFED_HTTP1, request_id, timeout_ms,
};
use crate::io::{PrefixedIo, read_some};
use crate::log::{LogText, LoggedHeaders};
use crate::metrics::Metrics;
use crate::origin::{PoolKey, Transport, UpstreamIo};
use crate::pool::{Conn, Life};
use crate::upstream::{Acquired, RetryPolicy, Target};

/// Header fields parsed per head; a request with more goes to the general path.
const MAX_HEADERS: usize = 128;
/// Request bodies up to this size are read whole and sent with the head; larger ones are
/// streamed by the general path.
const MAX_BODY: usize = 64 * 1024;
/// Read size for response bodies that do not arrive with their head.
const READ_CHUNK: usize = 16 * 1024;
/// First read size for a response: room for a usual head and a small body, and small
/// enough for the allocator's per-thread cache (glibc's tcache holds chunks up to about
/// 1 KiB). Larger per-request buffers were freed into the heap top, trimmed and faulted
/// back in, about one page fault per ten requests under load; only a body that needs
/// more reads gets `READ_CHUNK`.
const HEAD_CHUNK: usize = 1024;
/// Largest response head accepted from an upstream.
const MAX_RESPONSE_HEAD: usize = 96 * 1024;
/// How long a client the reactor does not watch yet is left alone while its first response
/// is awaited (see `client_gone`).
const UNWATCHED: std::time::Duration = std::time::Duration::from_millis(100);
/// Pipelined bytes read while a response is awaited (to notice the client leaving).
const MAX_PIPELINED: usize = 64 * 1024;
/// Connection-listed header names dropped per message; more goes to the general path.
const MAX_LISTED: usize = 8;

/// What a connection does after one request.
enum Next {
    KeepAlive,
    Close,
    /// The general path takes over the connection, starting with the buffer.
    General,
}

/// Serves HTTP/1.x on `io`, whose first bytes (already read) are `initial`, until the
/// client closes or `shutdown` asks to drain. A connection is ended by dropping `io`, so
/// it must not hold back bytes (a TLS stream's `close_notify`).
pub(crate) async fn serve(
    proxy: Arc<Proxy>,
    downstream: Arc<Downstream>,
    mut io: GuardedIo<ClientStream>,
    initial: BytesMut,
    shutdown: CancellationToken,
) {
    let mut buf = initial;
    // One wait for the drain for the whole connection: made afresh for each idle spell, it
    // joined and left the token's list of waiters (a lock each) on every request. It
    // borrows the token: a clone takes (and its drop takes again) the token's lock, per
    // connection.
    let mut drained = std::pin::pin!(shutdown.cancelled());
    loop {
        let read_now = buf.is_empty();
        if read_now {
            // Idle: the buffer goes until the next request's first bytes arrive.
            buf = BytesMut::new();
            let read = tokio::select! {
                biased;
                read = read_some(&mut io, &mut buf) => read,
                () = &mut drained => return,
            };
            if !matches!(read, Ok(n) if n > 0) {
                return;
            }
        }
        // Boxed: the idle connection's future stays small, a request's state lives only
        // while the request does.
        let next = boxed(|| {
            exchange(
                &proxy,
                &downstream,
                (&mut io, &mut buf, read_now),
                &shutdown,
            )
        })
        .await;
        match next {
            Next::KeepAlive => {}
            // Dropped, not shut down: closing a plain socket sends the FIN a shutdown would,
            // with one system call fewer.
            Next::Close => return,
            Next::General => {
                // The general path times each of its requests itself.
                if let Some(in_flight) = &downstream.in_flight {
                    in_flight.release_streams();
                }
                let io = PrefixedIo::new(buf, io);
                // Boxed, as the exchange is: an idle keep-alive connection's future stays
                // the size of its read, not of hyper's connection.
                boxed(|| crate::http::serve(proxy, downstream, io, shutdown.clone())).await;
                return;
            }
        }
    }
}

/// Resolves when the client closes (or fails) while a response is awaited, or with the
/// stream timeout the connection's guard reports meanwhile; pipelined bytes it sends are
/// kept for the next request.
///
/// A connection the reactor does not watch yet (its first request came with it) is left
/// alone for [`UNWATCHED`] first: most responses come sooner, and the connection is then
/// answered (and, asked to, closed) without a registration. A client that leaves sooner
/// is noticed that much later, or, if its response comes first, not at all: it is
/// written to the closed connection and logged as delivered.
async fn client_gone(
    io: &mut GuardedIo<ClientStream>,
    buf: &mut BytesMut,
    since: Instant,
) -> Option<Expired> {
    if !io.get_ref().is_registered() {
        tokio::time::sleep_until(since + UNWATCHED).await;
    }
    while buf.len() < MAX_PIPELINED {
        match read_some(io, buf).await {
            Ok(n) if n > 0 => {}
            Ok(_) => return None,
            Err(e) => return Expired::of_stream(&e),
        }
    }
    std::future::pending().await
}

/// Resolves with the stream timeout the guard reports while a response body is relayed.
/// Pipelined bytes are kept; a client that closes or fails is left for the writes to
/// notice, as before.
async fn body_stalled<I: AsyncRead + Unpin>(io: &mut I, buf: &mut BytesMut) -> Expired {
    while buf.len() < MAX_PIPELINED {
        match read_some(io, buf).await {
            Ok(n) if n > 0 => {}
            Ok(_) => break,
            Err(e) => match Expired::of_stream(&e) {
                Some(why) => return why,
                None => break,
            },
        }
    }
    std::future::pending().await
}

/// Reads more of a response body from the upstream, unless the stream times out first:
/// Envoy then ends the stream, which on HTTP/1.1 closes the connection (`SI`).
async fn read_body<I: AsyncRead + Unpin>(
    upstream: &mut UpstreamIo,
    into: &mut BytesMut,
    (io, pipelined): (&mut I, &mut BytesMut),
    metrics: &Metrics,
) -> Result<usize, Cut> {
    tokio::select! {
        read = upstream.read_buf(into) => read.map_err(|_| Cut::Upstream),
        _ = body_stalled(io, pipelined) => {
            metrics.rq_idle_timeout.inc();
            tracing::debug!("stream idle timeout while relaying a response body; connection closed");
            Err(Cut::Idle)
        }
    }
}

/// Why a response body was not relayed to its end, as Envoy flags it in the access log.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// The client went away (`DC`).
    Downstream,
    /// The upstream closed or failed mid-body (`UC`).
    Upstream,
    /// The stream idle timeout passed (`SI`).
    Idle,
    /// The upstream's body framing was broken (`UPE`).
    Protocol,
}

impl Cut {
    fn flag(self) -> &'static str {
        match self {
            Cut::Downstream => "DC",
            Cut::Upstream => "UC",
            Cut::Idle => "SI",
            Cut::Protocol => "UPE",
        }
    }
}

/// The error a stream timeout reported by the guard is answered with, from the request
/// still being received.
fn stream_error(why: Expired, request_complete: bool) -> ProxyError {
    match why {
        Expired::Request => ProxyError::RequestTimeout,
        _ => ProxyError::StreamIdle { request_complete },
    }
}

/// Answers a stream timeout that fired before the request head was whole: Envoy's 408,
/// logged with no request line, and the connection closes.
async fn reply_headless<I: AsyncWrite + Unpin>(
    proxy: &Arc<Proxy>,
    downstream: &Arc<Downstream>,
    io: &mut I,
    why: Expired,
) -> Next {
    let line = LogLine::wanted(proxy).then(|| LogLine {
        method: Method::from_bytes(b"-").unwrap_or_default(),
        path: LogText::from("-"),
        protocol: "HTTP/1.1",
        authority: LogText::from("-"),
        headers: LoggedHeaders::default(),
    });
    let mut log = RequestLog::new(proxy, downstream, line, Instant::now());
    reply_error(io, &mut log, &stream_error(why, false), false, true).await
}

/// One request on the connection: parse, route, forward, respond. `read_now` when the
/// buffer's bytes were read just before, not left over from the request before.
async fn exchange(
    proxy: &Arc<Proxy>,
    downstream: &Arc<Downstream>,
    (io, buf, read_now): (&mut GuardedIo<ClientStream>, &mut BytesMut, bool),
    shutdown: &CancellationToken,
) -> Next {
    let explicit = downstream.original_dst.is_none();
    // Whether the request's last bytes came in a read of this exchange (or just before
    // it): the guard's time of that read is then when the request arrived.
    let mut arrived = read_now;
    let head = loop {
        let limits = (proxy.config.max_request_headers, proxy.config.route_timeout);
        match parse_request(buf, explicit, limits) {
            Parsed::Complete(head) => break head,
            Parsed::Partial if buf.len() < proxy.config.max_request_headers_bytes => {
                match read_some(io, buf).await {
                    Ok(n) if n > 0 => arrived = true,
                    Ok(_) => return Next::Close,
                    Err(e) => match Expired::of_stream(&e) {
                        Some(why) => return reply_headless(proxy, downstream, io, why).await,
                        None => return Next::Close,
                    },
                }
            }
            Parsed::Partial | Parsed::Other => return Next::General,
        }
    };
    if head.len > proxy.config.max_request_headers_bytes || head.body > MAX_BODY {
        return Next::General;
    }
    let _in_flight = downstream.in_flight.as_ref().map(InFlight::start);
    let mut timed_out = None;
    while buf.len() < head.len + head.body {
        match read_some(io, buf).await {
            Ok(n) if n > 0 => arrived = true,
            Ok(_) => return Next::Close,
            Err(e) => match Expired::of_stream(&e) {
                Some(why) => {
                    timed_out = Some(why);
                    break;
                }
                None => return Next::Close,
            },
        }
    }
    if let Some(why) = timed_out {
        // The connection closes: what arrived of the request is not needed after this.
        let request = buf.split().freeze();
        let max = proxy.config.max_request_headers;
        let line = LogLine::wanted(proxy).then(|| head.log_line(&request, max));
        let mut log = RequestLog::new(proxy, downstream, line, Instant::now());
        // Envoy routed the head before the body stalled: its log names route and cluster.
        let authority = std::str::from_utf8(&request[head.authority.clone()]).ok();
        let _ = route_head(proxy, downstream, (&head, authority), &request, &mut log).await;
        return reply_error(
            io,
            &mut log,
            &stream_error(why, false),
            head.head_method,
            true,
        )
        .await;
    }
    if let Some(in_flight) = &downstream.in_flight {
        in_flight.received();
    }
    // The request leaves the buffer; what follows it is the next one. A buffer that holds
    // just the request is taken whole: splitting it would allocate to share it.
    let request = if buf.len() == head.len + head.body {
        std::mem::take(buf).freeze()
    } else {
        buf.split_to(head.len + head.body).freeze()
    };
    let max = proxy.config.max_request_headers;
    let line = LogLine::wanted(proxy).then(|| head.log_line(&request, max));
    let start = if arrived {
        io.last_activity()
    } else {
        Instant::now()
    };
    let mut log = RequestLog::new(proxy, downstream, line, start);
    log.outcome.request_bytes = head.body as u64;
    log.outcome.request_head_bytes = head.head_bytes;
    // Envoy answers some errors from the head alone, with the body still unread: the
    // connection then closes, as Envoy's does.
    let closes = |e: &ProxyError| {
        head.close || shutdown.is_cancelled() || (head.body > 0 && e.before_upstream())
    };
    // The authority routed on, and the upstream's Host, which `auto_sni` sends as SNI.
    let authority = std::str::from_utf8(&request[head.authority.clone()]).ok();
    let routed = match route_head(proxy, downstream, (&head, authority), &request, &mut log).await {
        Ok(routed) => routed,
        Err(e) => {
            let close = closes(&e);
            return reply_error(io, &mut log, &e, head.head_method, close).await;
        }
    };
    let policy = crate::upstream::retry_policy(log.outcome.matched.as_deref());
    let rewrites = log.outcome.matched.as_deref().is_some_and(|r| {
        r.rewrites()
            || r.fault.is_some()
            || !r.mirrors().is_empty()
            || r.request_buffer_limit.is_some()
            || crate::http::route_timeout(Some(r), proxy.config.route_timeout)
                != proxy.config.route_timeout
            || r.forward().is_some_and(|f| !f.hash_policy.is_empty())
    });
    if rewrites
        || crate::http::upstream_h2(&routed.decision, Version::HTTP_11)
        || attempt_digit(policy.attempts()).is_none()
    {
        // The general path speaks HTTP/2 upstream, applies a route's rewrites, faults,
        // mirrors, timeout, hash policy and buffer limit, and writes attempt counts of any
        // length: give it
        // the request back, and the logging of it.
        log.hand_over();
        let mut whole = BytesMut::from(&request[..]);
        whole.extend_from_slice(buf);
        *buf = whole;
        return Next::General;
    }
    let mut out = head.out;
    out.extend_from_slice(&request[head.len..]);
    let attempt_at = head.attempt_at;
    let start = log.start;
    let forwarded = tokio::select! {
        forwarded = forward(proxy, (&routed, authority), (&mut out, attempt_at), policy, head.head_method, &mut log) => forwarded,
        gone = client_gone(io, buf, start) => match gone {
            // No response within the stream idle timeout: the attempt is abandoned and
            // the client gets Envoy's 504.
            Some(why) => Err(stream_error(why, true)),
            // The client left before the response: logged as DC when `log` is dropped.
            None => return Next::Close,
        },
    };
    let (upstream, response) = match forwarded {
        Ok(answer) => answer,
        Err(e) => {
            let close = closes(&e);
            return reply_error(io, &mut log, &e, head.head_method, close).await;
        }
    };
    proxy
        .metrics
        .count_upstream_request(Some(log.series()), &log.outcome.cluster);
    log.outcome.status = response.status;
    log.outcome.response_head_bytes = crate::metrics::response_head_bytes(response.fields);
    // Bodies of other framings are not counted on this path.
    if let Framing::Length(n) = response.framing {
        log.outcome.response_bytes = n;
    }
    let close = head.close || shutdown.is_cancelled();
    let Upstream {
        conn: Conn {
            io: stream,
            hold,
            life,
        },
        key,
        buffered,
        guard,
    } = upstream;
    let done = relay(
        (io, buf),
        stream,
        buffered,
        response,
        (log.start, close),
        &proxy.metrics,
    )
    .await;
    drop(guard);
    // Logged when the body has been relayed, or cut short, as Envoy logs at stream end.
    match done {
        Ok((stream, reusable)) => {
            // The relay's last write to the client ended the request.
            let end = log.write_ended(io.last_activity());
            if reusable {
                let conn = Conn {
                    io: stream,
                    hold,
                    life,
                };
                proxy.pool.put_raw(key, conn, end);
            }
            if close { Next::Close } else { Next::KeepAlive }
        }
        Err(cut) => {
            log.outcome.flags = cut.flag();
            log.write();
            Next::Close
        }
    }
}

/// Routes a request by its parsed head, recording the route in `log`.
async fn route_head<'r>(
    proxy: &Arc<Proxy>,
    downstream: &Arc<Downstream>,
    (head, authority): (&Head, Option<&'r str>),
    request: &'r [u8],
    log: &mut RequestLog,
) -> Result<Routed<'r>, ProxyError> {
    let path = std::str::from_utf8(&request[head.path.clone()]).unwrap_or_default();
    let path = if head.slash {
        Cow::Owned(format!("/{path}"))
    } else {
        Cow::Borrowed(path)
    };
    let input = RouteInput {
        path: &path,
        method: std::str::from_utf8(&request[head.method.clone()]).unwrap_or_default(),
        headers: &RawHeaders {
            head: &request[..head.len],
            max: proxy.config.max_request_headers,
        },
        sniffed: SNIFFED_HTTP1,
    };
    crate::http::route(
        proxy,
        downstream,
        authority,
        false,
        &input,
        &mut log.outcome,
    )
    .await
}

/// An upstream connection with a response head read from it.
struct Upstream {
    conn: Conn<UpstreamIo>,
    key: PoolKey,
    /// Bytes read after the response head: the start of the body.
    buffered: BytesMut,
    /// Counts the request as active on its endpoint until the body ends.
    guard: crate::upstream::Hold,
}

/// Sends `out` (head and body) to an upstream of `routed` through the attempt engine,
/// and reads the response head; the attempt number goes into `out` at its offset. The
/// whole request is in `out`, so every attempt can send it again.
async fn forward(
    proxy: &Arc<Proxy>,
    (routed, authority): (&Routed<'_>, Option<&str>),
    (out, attempt_at): (&mut [u8], usize),
    policy: RetryPolicy,
    head_method: bool,
    log: &mut RequestLog,
) -> Result<(Upstream, ResponseHead), ProxyError> {
    let cluster = Arc::clone(&log.outcome.cluster);
    let mut attempts = Attempts::new(
        proxy,
        (&routed.decision, routed.original),
        &cluster,
        policy,
        Some(Resource::Requests),
    )
    .with_timeout(proxy.config.route_timeout)
    .since(log.start);
    loop {
        let Attempt { number, pick } = attempts.start().await?;
        log.outcome.upstream = Some(pick.addr);
        log.outcome.destination.reached(pick.index);
        if let (Some(digit), Some(count)) = (out.get_mut(attempt_at), attempt_digit(number)) {
            *digit = count;
        }
        let transport = Transport::new(pick.addr, pick.tls.as_ref(), authority);
        // The first attempt's pooled connections are checked against the request's start;
        // a retry comes after a backoff, so it reads the clock.
        let now = if number == 1 {
            log.start
        } else {
            Instant::now()
        };
        let sent = attempts
            .send(attempt_once(
                proxy,
                attempts.target(&pick, &transport),
                (out, now),
                head_method,
            ))
            .await;
        match sent {
            Ok((conn, buffered, head)) => {
                match attempts.answered((head.status, &ResponseHeaders(&head.head)), None, || {
                    Some(())
                }) {
                    // The response and its connection are dropped, never reused with a body
                    // left unread; the whole request is still in `out`.
                    Answer::Retry(()) => drop((conn, buffered, pick)),
                    Answer::Deliver(flag) => {
                        if let Some(flag) = flag {
                            log.outcome.flags = flag;
                        }
                        let upstream = Upstream {
                            conn,
                            key: transport.key,
                            buffered,
                            guard: pick.guard,
                        };
                        return Ok((upstream, head));
                    }
                }
            }
            Err(failure) => attempts.failed(failure, Some(()))?,
        }
    }
}

async fn attempt_once(
    proxy: &Arc<Proxy>,
    target: Target<'_>,
    (out, now): (&[u8], Instant),
    head_method: bool,
) -> Result<(Conn<UpstreamIo>, BytesMut, ResponseHead), Failure> {
    let idle = || std::future::ready(proxy.pool.checkout_raw(&target.transport.key, now));
    let mut conn = match proxy
        .connection(&target, idle)
        .await
        .map_err(Failure::Unsent)?
    {
        Acquired::Idle(conn) => conn,
        Acquired::New { hold, pending } => {
            // Boxed: a new upstream connection is rare next to a pooled one.
            let io = boxed(|| proxy.connect_upstream(&target))
                .await
                .map_err(Failure::Unsent)?;
            drop(pending);
            Conn {
                io,
                hold,
                life: Life::new(target.connection_limits()),
            }
        }
    };
    if let Err(e) = conn.io.write_all(out).await {
        return Err(Failure::Unsent(ProxyError::UpstreamClosed(e)));
    }
    let mut buffered = BytesMut::with_capacity(HEAD_CHUNK);
    loop {
        match conn.io.read_buf(&mut buffered).await {
            Ok(0) => {
                let closed = io::Error::from(io::ErrorKind::UnexpectedEof);
                return Err(Failure::Sent(ProxyError::UpstreamClosed(closed)));
            }
            Ok(_) => {}
            Err(e) => return Err(Failure::Sent(ProxyError::UpstreamClosed(e))),
        }
        // Interim responses (100, 103) are not passed on, as hyper's client does not.
        loop {
            match parse_response(&buffered, head_method) {
                Ok(Some(head)) if head.interim => buffered.advance(head.len),
                Ok(Some(head)) => {
                    buffered.advance(head.len);
                    return Ok((conn, buffered, head));
                }
                Ok(None) => break,
                Err(e) => return Err(Failure::Sent(ProxyError::UpstreamProtocol(e))),
            }
        }
        if buffered.len() > MAX_RESPONSE_HEAD {
            return Err(Failure::Sent(ProxyError::UpstreamProtocol(
                "response head too large",
            )));
        }
        if buffered.capacity() == buffered.len() {
            buffered.reserve(buffered.capacity());
        }
    }
}

/// Answers the client with the response Envoy would send for `e`.
async fn reply_error<I: AsyncWrite + Unpin>(
    io: &mut I,
    log: &mut RequestLog,
    e: &ProxyError,
    head_method: bool,
    close: bool,
) -> Next {
    let response = e.to_response();
    log.outcome.flags = e.flag();
    log.outcome.local_reply = true;
    log.metrics().count_error(e);
    log.outcome.status = response.status().as_u16();
    log.outcome.response_head_bytes =
        crate::metrics::response_head_bytes(crate::metrics::header_fields(response.headers()));
    log.outcome.response_bytes = hyper::body::Body::size_hint(response.body())
        .exact()
        .unwrap_or(0);
    log.write();
    let bytes = local_reply(response, head_method, close);
    if io.write_all(&bytes).await.is_err() || close {
        return Next::Close;
    }
    Next::KeepAlive
}

/// A locally generated response, serialized as hyper's server writes one.
fn local_reply(response: Response<ProxyBody>, head_method: bool, close: bool) -> Vec<u8> {
    let (parts, body) = response.into_parts();
    let mut out = Vec::with_capacity(256);
    status_line(&mut out, parts.status, None);
    for (name, value) in &parts.headers {
        header(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    header(&mut out, b"date", &date());
    if close && !parts.headers.contains_key(http::header::CONNECTION) {
        header(&mut out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    if let ProxyBody::Full(Some(bytes)) = body
        && !head_method
    {
        out.extend_from_slice(&bytes);
    }
    out
}

fn status_line(out: &mut Vec<u8>, status: StatusCode, reason: Option<&[u8]>) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    match status.canonical_reason() {
        Some(canonical) => out.extend_from_slice(canonical.as_bytes()),
        None => out.extend_from_slice(reason.unwrap_or_default()),
    }
    out.extend_from_slice(b"\r\n");
}

fn header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes a field of the head in `buf` with its name lowercase, as hyper (and Envoy) send
/// names: the line is copied whole when it arrived as `name: value\r\n`, as nearly every
/// one does, in one copy rather than four.
fn field_lowercase(out: &mut Vec<u8>, buf: &[u8], name: &[u8], value: &[u8]) {
    let at = out.len();
    match received_line(buf, name, value) {
        Some(line) => out.extend_from_slice(line),
        None => header(out, name, value),
    }
    if let Some(name) = out.get_mut(at..at + name.len()) {
        lowercase(name);
    }
}

/// Eight bytes with 0x20 set in each that is `A`..=`Z`: the adds see only the low seven
/// bits of a byte, so they never carry into the next one.
fn lowercase_word(x: u64) -> u64 {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    let low = x & (0x7f * ONES);
    let from_a = low + (0x80 - u64::from(b'A')) * ONES;
    let past_z = low + (0x80 - u64::from(b'Z') - 1) * ONES;
    let upper = from_a & !past_z & !x & (0x80 * ONES);
    x | (upper >> 2)
}

/// Whether `name` is `known` (lowercase) in any case, eight bytes at a time.
fn eq_lowercase(name: &[u8], known: &[u8]) -> bool {
    let len = name.len();
    if len != known.len() {
        return false;
    }
    if len < 8 {
        return name.eq_ignore_ascii_case(known);
    }
    let word = |bytes: &[u8], at: usize| {
        bytes
            .get(at..at + 8)
            .and_then(|w| <[u8; 8]>::try_from(w).ok())
            .map(u64::from_ne_bytes)
    };
    // The last eight bytes overlap the others when the length is no multiple of eight.
    (0..len / 8)
        .map(|i| i * 8)
        .chain([len - 8])
        .all(|at| word(name, at).map(lowercase_word) == word(known, at))
}

/// `make_ascii_lowercase`, eight bytes at a time: byte by byte it was about seven
/// instructions a byte (`callgrind`), on every field of every response.
fn lowercase(bytes: &mut [u8]) {
    let apply = |chunk: &mut [u8]| {
        if let Ok(eight) = <[u8; 8]>::try_from(&*chunk) {
            chunk.copy_from_slice(&lowercase_word(u64::from_ne_bytes(eight)).to_ne_bytes());
        }
    };
    let len = bytes.len();
    if len < 8 {
        bytes.make_ascii_lowercase();
        return;
    }
    for chunk in bytes.chunks_exact_mut(8) {
        apply(chunk);
    }
    // The last eight bytes again, overlapping: lowercasing twice changes nothing.
    apply(&mut bytes[len - 8..]);
}

/// The line of `buf` that holds the field `name` (a slice of `buf`) and its `value`, when it
/// is exactly `name: value\r\n`.
fn received_line<'a>(buf: &'a [u8], name: &[u8], value: &[u8]) -> Option<&'a [u8]> {
    let start = (name.as_ptr() as usize).checked_sub(buf.as_ptr() as usize)?;
    let value_at = start + name.len() + ": ".len();
    let line = buf.get(start..value_at + value.len() + "\r\n".len())?;
    let plain = value.as_ptr() as usize == buf.as_ptr() as usize + value_at
        && line[name.len()..].starts_with(b": ")
        && line.ends_with(b"\r\n");
    plain.then_some(line)
}

/// The `date` header's value, formatted once per second per thread.
fn date() -> [u8; 29] {
    use std::cell::Cell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHED: Cell<(u64, [u8; 29])> = const { Cell::new((0, [0; 29])) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with(|cached| {
        let (at, value) = cached.get();
        if at == secs {
            return value;
        }
        let mut value = [0u8; 29];
        let text = httpdate::fmt_http_date(now);
        let n = text.len().min(29);
        value[..n].copy_from_slice(&text.as_bytes()[..n]);
        cached.set((secs, value));
        value
    })
}

/// Streams the response to the client: head and first body bytes in one write, then the
/// rest. Returns the upstream connection when the body ended cleanly (and whether it can be
/// reused), else why it was cut short.
async fn relay<I: AsyncRead + AsyncWrite + Unpin>(
    (io, pipelined): (&mut I, &mut BytesMut),
    mut stream: UpstreamIo,
    mut buffered: BytesMut,
    mut response: ResponseHead,
    (start, close): (Instant, bool),
    metrics: &Metrics,
) -> Result<(UpstreamIo, bool), Cut> {
    let mut out = response.client_head(start, close, buffered.len());
    match response.framing {
        Framing::Empty => {
            io.write_all(&out).await.map_err(|_| Cut::Downstream)?;
            Ok((stream, response.reusable && buffered.is_empty()))
        }
        Framing::Length(mut left) => {
            let now = left.min(buffered.len() as u64) as usize;
            out.extend_from_slice(&buffered[..now]);
            buffered.advance(now);
            left -= now as u64;
            io.write_all(&out).await.map_err(|_| Cut::Downstream)?;
            drop(out);
            let extra = !buffered.is_empty();
            while left > 0 {
                buffered.clear();
                buffered.reserve(READ_CHUNK);
                let n = read_body(&mut stream, &mut buffered, (io, pipelined), metrics).await?;
                if n == 0 {
                    return Err(Cut::Upstream);
                }
                let take = left.min(n as u64) as usize;
                io.write_all(&buffered[..take])
                    .await
                    .map_err(|_| Cut::Downstream)?;
                left -= take as u64;
                if take < n {
                    return Ok((stream, false));
                }
            }
            Ok((stream, response.reusable && !extra))
        }
        Framing::Chunked => {
            let mut chunks = ChunkScanner::default();
            let mut first = true;
            loop {
                let used = chunks.scan(&buffered).map_err(|e| {
                    tracing::debug!(error = e, "bad chunked body from upstream");
                    Cut::Protocol
                })?;
                if first {
                    out.extend_from_slice(&buffered[..used]);
                    io.write_all(&out).await.map_err(|_| Cut::Downstream)?;
                    first = false;
                } else if used > 0 {
                    io.write_all(&buffered[..used])
                        .await
                        .map_err(|_| Cut::Downstream)?;
                }
                if chunks.done() {
                    return Ok((stream, response.reusable && used == buffered.len()));
                }
                buffered.clear();
                buffered.reserve(READ_CHUNK);
                if read_body(&mut stream, &mut buffered, (io, pipelined), metrics).await? == 0 {
                    return Err(Cut::Upstream);
                }
            }
        }
        Framing::Close => {
            // Until the upstream closes, re-framed as chunks so the client connection
            // stays usable.
            if !buffered.is_empty() {
                chunk(&mut out, &buffered);
            }
            io.write_all(&out).await.map_err(|_| Cut::Downstream)?;
            loop {
                buffered.clear();
                buffered.reserve(READ_CHUNK);
                let n = read_body(&mut stream, &mut buffered, (io, pipelined), metrics).await?;
                if n == 0 {
                    io.write_all(b"0\r\n\r\n")
                        .await
                        .map_err(|_| Cut::Downstream)?;
                    return Ok((stream, false));
                }
                let mut framed = Vec::with_capacity(n + 16);
                chunk(&mut framed, &buffered);
                io.write_all(&framed).await.map_err(|_| Cut::Downstream)?;
            }
        }
    }
}

fn chunk(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// A response head as [`ResponseHead::head`] keeps it (a status line, then `name: value`
/// lines with lower-case names), read only when a retry policy matches on headers.
struct ResponseHeaders<'a>(&'a [u8]);

impl Headers for ResponseHeaders<'_> {
    fn get(&self, name: &str) -> Option<Cow<'_, str>> {
        let mut values = self
            .0
            .split(|b| *b == b'\n')
            .skip(1)
            .filter_map(|line| {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let (field, value) = line.split_at(line.iter().position(|b| *b == b':')?);
                (field == name.as_bytes()).then(|| value[1..].trim_ascii())
            })
            .filter_map(|v| std::str::from_utf8(v).ok());
        let first = values.next()?;
        let Some(second) = values.next() else {
            return Some(Cow::Borrowed(first));
        };
        let mut joined = format!("{first},{second}");
        for v in values {
            joined.push(',');
            joined.push_str(v);
        }
        Some(Cow::Owned(joined))
    }
}

/// The client's request head, parsed again only when a route matches on headers.
struct RawHeaders<'a> {
    head: &'a [u8],
    max: usize,
}

impl Headers for RawHeaders<'_> {
    fn get(&self, name: &str) -> Option<Cow<'_, str>> {
        let mut fields = vec![httparse::EMPTY_HEADER; self.max];
        let mut req = httparse::Request::new(&mut fields);
        req.parse(self.head).ok()?;
        let mut values = req
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok());
        let mut joined = values.next()?.to_string();
        for v in values {
            joined.push(',');
            joined.push_str(v);
        }
        Some(Cow::Owned(joined))
    }
}

/// A request head the fast path takes, with the head the upstream gets.
struct Head {
    /// Length of the client's head in the buffer.
    len: usize,
    /// `content-length` of the body (0 without one).
    body: usize,
    /// The client asked to close after this request.
    close: bool,
    /// A HEAD request: the response has no body whatever its headers say.
    head_method: bool,
    /// The absolute-form authority or the Host header, as a range of the buffer.
    authority: Range<usize>,
    /// Method and path as ranges of the buffer, for the access log.
    method: Range<usize>,
    path: Range<usize>,
    /// The path is empty or only a query: `/` goes in front of it.
    slash: bool,
    /// The rewritten head for the upstream.
    out: Vec<u8>,
    /// Where the digit of `x-envoy-attempt-count` is in `out`.
    attempt_at: usize,
    /// The head's size as Envoy's header map gives it (Istio's request size counts it).
    head_bytes: u64,
    /// Where the headers the access log shows are in the buffer.
    logged: LoggedRanges,
    /// Where the id the proxy generated starts in `out`, when the client sent none: the
    /// access log shows it, as Envoy logs the id it generates. Never 0 (the request line
    /// comes first), and 32 bits, so that the head is no larger to move than without it.
    generated_id: Option<NonZeroU32>,
}

/// The values of `user-agent`, `x-request-id` and `x-forwarded-for` as ranges of the
/// buffer, noted while the head is parsed so that the access log need not parse it again.
#[derive(Debug, Default)]
struct LoggedRanges {
    user_agent: Option<Range<usize>>,
    request_id: Option<Range<usize>>,
    forwarded_for: Option<Range<usize>>,
    /// One of them came more than once: its values are joined by parsing the head again.
    repeated: bool,
}

impl LoggedRanges {
    /// Notes the header `field` with `value` (a part of `buf`) if the log shows it.
    fn note(&mut self, buf: &[u8], field: Field, value: &[u8]) {
        let slot = match field {
            Field::UserAgent => &mut self.user_agent,
            Field::RequestId => &mut self.request_id,
            Field::ForwardedFor => &mut self.forwarded_for,
            _ => return,
        };
        self.repeated |= slot.replace(range_in(buf, value)).is_some();
    }
}

impl Head {
    /// The access log's view of the request; a head with one of the logged headers more
    /// than once is parsed again (at most `max` fields) to join their values.
    fn log_line(&self, request: &Bytes, max: usize) -> LogLine {
        let shared = |r: Range<usize>| LogText::Shared(request.slice(r));
        let mut headers = if self.logged.repeated {
            logged_headers(&request[..self.len], max)
        } else {
            let value = |r: &Option<Range<usize>>| r.clone().map(shared);
            LoggedHeaders {
                user_agent: value(&self.logged.user_agent),
                request_id: value(&self.logged.request_id),
                forwarded_for: value(&self.logged.forwarded_for),
            }
        };
        let generated = self.generated_id.and_then(|at| {
            let at = usize::try_from(at.get()).ok()?;
            self.out.get(at..at + REQUEST_ID_LEN)?.try_into().ok()
        });
        if let Some(id) = generated {
            headers.request_id = Some(LogText::Id(id));
        }
        LogLine {
            method: Method::from_bytes(&request[self.method.clone()]).unwrap_or_default(),
            path: if self.slash {
                LogText::from(format!(
                    "/{}",
                    String::from_utf8_lossy(&request[self.path.clone()])
                ))
            } else {
                shared(self.path.clone())
            },
            protocol: "HTTP/1.1",
            authority: shared(self.authority.clone()),
            headers,
        }
    }
}

/// The headers of `head` the access log shows, repeated ones joined with `,`.
fn logged_headers(head: &[u8], max: usize) -> LoggedHeaders {
    let mut fields = vec![httparse::EMPTY_HEADER; max];
    let mut req = httparse::Request::new(&mut fields);
    if req.parse(head).is_err() {
        return LoggedHeaders::default();
    }
    let mut values: [Option<Vec<u8>>; 3] = Default::default();
    for h in req.headers.iter() {
        let Some(at) = ["user-agent", "x-request-id", "x-forwarded-for"]
            .iter()
            .position(|n| h.name.eq_ignore_ascii_case(n))
        else {
            continue;
        };
        match &mut values[at] {
            Some(v) => {
                v.push(b',');
                v.extend_from_slice(h.value);
            }
            slot @ None => *slot = Some(h.value.to_vec()),
        }
    }
    let [user_agent, request_id, forwarded_for] =
        values.map(|v| v.map(|v| LogText::Shared(Bytes::from(v))));
    LoggedHeaders {
        user_agent,
        request_id,
        forwarded_for,
    }
}

enum Parsed {
    Complete(Head),
    Partial,
    /// Valid or not, not for the fast path: the general path decides.
    Other,
}

/// The fields the fast path reads, rewrites or drops, by name; `Other` for the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Host,
    ContentLength,
    ContentType,
    TransferEncoding,
    Expect,
    Upgrade,
    Connection,
    KeepAlive,
    ProxyConnection,
    ProxyAuthorization,
    ProxyAuthenticate,
    Te,
    ForwardedProto,
    ForwardedFor,
    UserAgent,
    RequestId,
    AttemptCount,
    ExpectedTimeout,
    Date,
    Server,
    Other,
}

impl Field {
    /// The field `name` names, in any case: told by its length first, so that most names
    /// are known after one comparison, not one per field of interest (`callgrind`).
    fn of(name: &[u8]) -> Field {
        let is = |known: &str| eq_lowercase(name, known.as_bytes());
        match name.len() {
            2 if is("te") => Field::Te,
            4 if is("host") => Field::Host,
            4 if is("date") => Field::Date,
            6 if is("expect") => Field::Expect,
            6 if is("server") => Field::Server,
            7 if is("upgrade") => Field::Upgrade,
            10 if is("connection") => Field::Connection,
            10 if is("keep-alive") => Field::KeepAlive,
            10 if is("user-agent") => Field::UserAgent,
            12 if is("content-type") => Field::ContentType,
            12 if is(REQUEST_ID) => Field::RequestId,
            14 if is("content-length") => Field::ContentLength,
            15 if is("x-forwarded-for") => Field::ForwardedFor,
            16 if is("proxy-connection") => Field::ProxyConnection,
            17 if is("transfer-encoding") => Field::TransferEncoding,
            17 if is("x-forwarded-proto") => Field::ForwardedProto,
            18 if is("proxy-authenticate") => Field::ProxyAuthenticate,
            19 if is("proxy-authorization") => Field::ProxyAuthorization,
            21 if is(ATTEMPT_COUNT) => Field::AttemptCount,
            30 if is(EXPECTED_TIMEOUT) => Field::ExpectedTimeout,
            _ => Field::Other,
        }
    }

    /// Hop-by-hop (RFC 9110 7.6.1): never forwarded. `te` is left to the caller, which keeps
    /// it when it is only `trailers`.
    fn hop_by_hop(self) -> bool {
        matches!(
            self,
            Field::Connection
                | Field::KeepAlive
                | Field::ProxyConnection
                | Field::ProxyAuthorization
                | Field::TransferEncoding
        )
    }
}

/// Names listed in `Connection` values, and whether `close` (or `keep-alive`) was among
/// them.
#[derive(Default)]
struct Listed<'a> {
    names: [&'a [u8]; MAX_LISTED],
    count: usize,
    close: bool,
    keep_alive: bool,
}

impl<'a> Listed<'a> {
    /// Adds one `Connection` value; `false` when it lists more names than are kept.
    fn add(&mut self, value: &'a [u8]) -> bool {
        for token in value.split(|b| *b == b',') {
            let token = token.trim_ascii();
            if token.is_empty() {
                continue;
            }
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if end_to_end(token) {
                // Framing and routing stay whatever a sender nominates: dropping them would
                // let the next hop read the body, or the authority, differently from us.
                continue;
            } else if self.count == MAX_LISTED {
                return false;
            } else {
                self.names[self.count] = token;
                self.count += 1;
            }
        }
        true
    }

    fn contains(&self, name: &[u8]) -> bool {
        self.names[..self.count]
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name))
    }
}

/// Fields a `Connection` option never removes: the authority routed on and the body's
/// length.
pub(crate) fn end_to_end(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"host") || name.eq_ignore_ascii_case(b"content-length")
}

/// Offset of `part` (a slice of `whole`) in `whole`.
fn range_in(whole: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - whole.as_ptr() as usize;
    start..start + part.len()
}

/// Splits a request target into the authority of its absolute-form and the path, for the
/// targets hyper (its `Uri`) accepts, so that both paths read a request alike: origin-form
/// and `http://` with a plain host and port. Anything else, or a target `Uri` would refuse,
/// is `None`, and [`any_target`] decides. `Uri` would copy the target to parse it, a
/// measurable part of a request; every byte is already known to be visible ASCII other
/// than `#`.
fn plain_target(target: &[u8]) -> Option<(Option<&[u8]>, &[u8])> {
    // `Uri`'s longest target.
    const MAX_LEN: usize = u16::MAX as usize - 1;
    if target.len() > MAX_LEN {
        return None;
    }
    let (absolute, path) = if target.first() == Some(&b'/') {
        (None, target)
    } else {
        let rest = target.strip_prefix(b"http://")?;
        let end = rest
            .iter()
            .position(|b| matches!(b, b'/' | b'?'))
            .unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        let (host, port) = match authority.iter().position(|b| *b == b':') {
            Some(colon) => (&authority[..colon], Some(&authority[colon + 1..])),
            None => (authority, None),
        };
        let plain_host = !host.is_empty()
            && host
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'));
        let plain_port =
            port.is_none_or(|p| (1..=5).contains(&p.len()) && p.iter().all(u8::is_ascii_digit));
        if !(plain_host && plain_port) {
            return None;
        }
        (Some(authority), path)
    };
    // `Uri`'s path and query characters, of visible ASCII.
    let (before, query) = match path.iter().position(|b| *b == b'?') {
        Some(at) => path.split_at(at),
        None => (path, &[][..]),
    };
    let plain = !before.iter().any(|b| matches!(b, b'<' | b'>' | b'`'))
        && !query.iter().any(|b| matches!(b, b'<' | b'>' | b'"'));
    plain.then_some((absolute, path))
}

/// [`plain_target`] for any target: `Uri` parses it.
fn any_target(target: &[u8]) -> Option<(Option<&[u8]>, &[u8])> {
    let uri = http::Uri::try_from(target).ok()?;
    match (uri.scheme(), uri.authority()) {
        (None, None) if target.starts_with(b"/") => Some((None, target)),
        (Some(scheme), Some(authority)) if *scheme == http::uri::Scheme::HTTP => {
            let start = "http://".len();
            let end = start + authority.as_str().len();
            let authority = &target[start..end];
            (!authority.contains(&b'@')).then_some((Some(authority), &target[end..]))
        }
        _ => None,
    }
}

fn single_length(current: Option<usize>, value: &[u8]) -> Result<usize, ()> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) || value.len() > 12 {
        return Err(());
    }
    let n = value
        .iter()
        .fold(0usize, |n, d| n * 10 + usize::from(d - b'0'));
    match current {
        Some(c) if c != n => Err(()),
        _ => Ok(n),
    }
}

/// `x-envoy-attempt-count` of attempt `number` (1 for the first) as the one digit this
/// path writes in place; `None` from the tenth on.
fn attempt_digit(number: usize) -> Option<u8> {
    u8::try_from(number)
        .ok()
        .filter(|n| *n <= 9)
        .map(|n| b'0' + n)
}

/// Parses one request head at the start of `buf`, at most `max_headers` fields, for a route
/// with `timeout`.
fn parse_request(
    buf: &[u8],
    explicit: bool,
    (max_headers, timeout): (usize, Option<std::time::Duration>),
) -> Parsed {
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut storage) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Other;
    };
    if method == "CONNECT" || req.headers.len() > max_headers {
        return Parsed::Other;
    }
    let target = target.as_bytes();
    if target
        .iter()
        .any(|b| !(0x21..=0x7e).contains(b) || *b == b'#')
    {
        return Parsed::Other;
    }
    // Origin-form keeps the target; absolute-form (http:// only) is split into the
    // authority routed on and the path sent upstream.
    let Some((absolute, path)) = plain_target(target).or_else(|| any_target(target)) else {
        return Parsed::Other;
    };
    let mut host = None;
    let mut length = None;
    let mut listed = Listed::default();
    let mut forwarded_proto = false;
    let mut te_trailers_only = true;
    let mut fields = 0;
    let mut logged = LoggedRanges::default();
    // Each field's name is told once, for both passes.
    let mut kinds = [Field::Other; MAX_HEADERS];
    for (h, kind) in req.headers.iter().zip(&mut kinds) {
        let name = h.name.as_bytes();
        fields += name.len() + h.value.len();
        let field = Field::of(name);
        *kind = field;
        logged.note(buf, field, h.value);
        match field {
            Field::Host => {
                let visible = h
                    .value
                    .iter()
                    .all(|b| (0x20..0x7f).contains(b) || *b == b'\t');
                if host.is_some() || !visible {
                    return Parsed::Other;
                }
                host = Some(h.value.trim_ascii());
            }
            Field::ContentLength => match single_length(length, h.value.trim_ascii()) {
                Ok(n) => length = Some(n),
                Err(()) => return Parsed::Other,
            },
            Field::TransferEncoding | Field::Expect | Field::Upgrade => return Parsed::Other,
            // gRPC is counted as such, and its local replies are gRPC ones, on the general
            // path alone.
            Field::ContentType if crate::error::is_grpc_content_type(h.value) => {
                return Parsed::Other;
            }
            Field::Connection if !listed.add(h.value) => return Parsed::Other,
            Field::Te => te_trailers_only &= h.value.eq_ignore_ascii_case(b"trailers"),
            Field::ForwardedProto => forwarded_proto = true,
            _ => {}
        }
    }
    // A request without a Host is answered by the general path, the one place for it.
    let Some(authority) = absolute.or(host) else {
        return Parsed::Other;
    };
    // Room for what is added below (a Host for absolute-form, x-forwarded-proto, a request
    // id, the expected timeout and the attempt count), so that the head is never grown.
    let added = 160 + absolute.map_or(0, <[u8]>::len);
    let mut out = Vec::with_capacity(len + added);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    let slash = path.first().is_none_or(|b| *b == b'?');
    if slash {
        out.push(b'/');
    }
    out.extend_from_slice(path);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if let (Some(authority), None) = (absolute, host) {
        header(&mut out, b"host", authority);
    }
    let mut length_sent = false;
    for (h, &field) in req.headers.iter().zip(&kinds) {
        let name = h.name.as_bytes();
        let dropped = match field {
            // The proxy's own headers are set below, whatever the client sent.
            Field::AttemptCount | Field::ExpectedTimeout => true,
            Field::Te => !te_trailers_only,
            Field::ProxyAuthenticate => explicit,
            other => other.hop_by_hop(),
        };
        if dropped || listed.contains(name) {
            continue;
        }
        // Repeats of one length are accepted, as hyper does, but the length is sent once, in
        // its plain form: some servers (nginx) refuse a repeated Content-Length.
        if field == Field::ContentLength {
            if !std::mem::replace(&mut length_sent, true) {
                let mut n = itoa::Buffer::new();
                header(
                    &mut out,
                    b"content-length",
                    n.format(length.unwrap_or(0)).as_bytes(),
                );
            }
            continue;
        }
        // The name that was routed on is the one the upstream sees.
        match absolute {
            Some(authority) if field == Field::Host => {
                header(&mut out, b"host", authority);
            }
            _ => field_lowercase(&mut out, buf, name, h.value),
        }
    }
    if !forwarded_proto {
        out.extend_from_slice(b"x-forwarded-proto: http\r\n");
    }
    // The log's note of the client's request id is also whether there is one to keep.
    let generated_id = if logged.request_id.is_none() {
        let at = out.len() + REQUEST_ID.len() + ": ".len();
        header(&mut out, REQUEST_ID.as_bytes(), &request_id());
        u32::try_from(at).ok().and_then(NonZeroU32::new)
    } else {
        None
    };
    if let Some(timeout) = timeout {
        let mut ms = itoa::Buffer::new();
        let ms = ms.format(timeout_ms(timeout));
        header(&mut out, EXPECTED_TIMEOUT.as_bytes(), ms.as_bytes());
    }
    header(&mut out, ATTEMPT_COUNT.as_bytes(), b"1");
    let attempt_at = out.len() - 3;
    out.extend_from_slice(b"\r\n");
    Parsed::Complete(Head {
        len,
        body: length.unwrap_or(0),
        close: listed.close,
        head_method: method == "HEAD",
        authority: range_in(buf, authority),
        method: range_in(buf, method.as_bytes()),
        path: range_in(buf, path),
        slash,
        out,
        attempt_at,
        head_bytes: crate::metrics::request_head_bytes(
            method.len(),
            path.len() + usize::from(slash),
            authority.len(),
            fields - host.map_or(0, |h| "host".len() + h.len()),
        ),
        logged,
        generated_id,
    })
}

/// A request head as the fast path forwards it; for the fuzzer, which checks it against
/// hyper's reading of the same bytes.
#[derive(Debug)]
pub struct Rewritten {
    /// Length of the client's head.
    pub head_len: usize,
    /// Body length the fast path reads after the head.
    pub body: usize,
    /// The authority the request is routed on.
    pub authority: Option<String>,
    /// The head sent upstream.
    pub upstream_head: Vec<u8>,
}

/// What the fast path makes of the request head at the start of `buf`: `None` when it needs
/// more bytes or leaves the request to the general path.
pub fn rewrite_request(buf: &[u8], explicit: bool, max_headers: usize) -> Option<Rewritten> {
    let Parsed::Complete(head) = parse_request(buf, explicit, (max_headers, None)) else {
        return None;
    };
    Some(Rewritten {
        head_len: head.len,
        body: head.body,
        authority: Some(String::from_utf8_lossy(&buf[head.authority]).into_owned()),
        upstream_head: head.out,
    })
}

/// The client's head for the response head at the start of `buf`, and the upstream head's
/// length; `Ok(None)` until it is complete. For the fuzzer.
pub fn rewrite_response(
    buf: &[u8],
    head_method: bool,
) -> Result<Option<(usize, Vec<u8>)>, &'static str> {
    Ok(parse_response(buf, head_method)?
        .map(|mut r| (r.len, r.client_head(Instant::now(), false, 0))))
}

/// Where a chunked body at the start of `data` ends; `Ok(None)` when it does not end in
/// `data`. For the fuzzer.
pub fn chunked_body_len(data: &[u8]) -> Result<Option<usize>, &'static str> {
    let mut scanner = ChunkScanner::default();
    let used = scanner.scan(data)?;
    Ok(scanner.done().then_some(used))
}

/// How a response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes.
    Close,
}

/// A parsed response head, with what the client's head needs.
struct ResponseHead {
    len: usize,
    status: u16,
    /// 1xx other than 101: skipped.
    interim: bool,
    framing: Framing,
    /// The upstream connection can carry another request after this response.
    reusable: bool,
    /// The client's head without the proxy's own headers and the final blank line.
    head: Vec<u8>,
    /// The names' and values' bytes of the upstream's fields the client gets.
    fields: usize,
    has_date: bool,
    /// The client is told `transfer-encoding: chunked` (also on a HEAD response, where
    /// the upstream said so).
    chunked: bool,
}

impl ResponseHead {
    /// The head for the client, with room for `body` bytes sent in the same write: the
    /// upstream's fields already written, in the buffer they were written to (sized for
    /// this when parsed), so the response head is allocated once.
    fn client_head(&mut self, start: Instant, close: bool, body: usize) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.head);
        out.reserve(192 + body);
        out.extend_from_slice(b"server: envoy\r\n");
        let mut ms = itoa::Buffer::new();
        let elapsed = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        header(
            &mut out,
            b"x-envoy-upstream-service-time",
            ms.format(elapsed).as_bytes(),
        );
        if !self.has_date {
            header(&mut out, b"date", &date());
        }
        if self.chunked {
            header(&mut out, b"transfer-encoding", b"chunked");
        }
        if close {
            header(&mut out, b"connection", b"close");
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// Parses a response head at the start of `buf`; `Ok(None)` until it is complete.
fn parse_response(buf: &[u8], head_method: bool) -> Result<Option<ResponseHead>, &'static str> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut storage);
    let len = match res.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("invalid response head"),
    };
    let (Some(version), Some(code)) = (res.version, res.code) else {
        return Err("invalid response head");
    };
    let status = StatusCode::from_u16(code).map_err(|_| "invalid status")?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err("101 to a request that did not ask to upgrade");
    }
    let interim = status.is_informational();
    let mut listed = Listed::default();
    let mut length = None;
    let mut chunked = None;
    let mut has_date = false;
    let mut kinds = [Field::Other; MAX_HEADERS];
    for (h, kind) in res.headers.iter().zip(&mut kinds) {
        *kind = Field::of(h.name.as_bytes());
        match *kind {
            Field::Connection if !listed.add(h.value) => {
                return Err("too many connection options");
            }
            Field::ContentLength => {
                length = Some(
                    single_length(length, h.value.trim_ascii())
                        .map_err(|()| "invalid content-length")?,
                );
            }
            Field::TransferEncoding => {
                // Only the last coding says whether the body is chunked (RFC 9112 6.3).
                let last = h.value.rsplit(|b| *b == b',').next().unwrap_or_default();
                chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            }
            Field::Date => has_date = true,
            _ => {}
        }
    }
    let no_body = interim || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let framing = match (no_body || head_method, chunked, length) {
        (true, _, _) => Framing::Empty,
        (false, Some(true), _) => Framing::Chunked,
        (false, Some(false), _) => Framing::Close,
        (false, None, Some(n)) => Framing::Length(n as u64),
        (false, None, None) => Framing::Close,
    };
    let reusable = if version == 1 {
        !listed.close
    } else {
        listed.keep_alive && !listed.close
    };
    // Room for the proxy's own headers and the body bytes read with the head, which go to
    // the client in the same write (`ResponseHead::client_head`).
    let mut head = Vec::with_capacity(buf.len() + 192);
    status_line(&mut head, status, res.reason.map(str::as_bytes));
    let mut fields = 0;
    for (h, &field) in res.headers.iter().zip(&kinds) {
        let name = h.name.as_bytes();
        let dropped = match field {
            Field::Te | Field::Server => true,
            Field::ContentLength => chunked.is_some(),
            other => other.hop_by_hop(),
        };
        if dropped || listed.contains(name) {
            continue;
        }
        fields += name.len() + h.value.len();
        field_lowercase(&mut head, buf, name, h.value);
    }
    Ok(Some(ResponseHead {
        len,
        fields,
        status: code,
        interim,
        framing,
        reusable,
        head,
        has_date,
        chunked: matches!(framing, Framing::Chunked | Framing::Close)
            || (head_method && chunked == Some(true)),
    }))
}

/// Finds where a chunked body ends, without decoding it: the bytes go through unchanged.
#[derive(Debug, Default)]
struct ChunkScanner {
    state: Chunk,
    size: u64,
    digits: u8,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    #[default]
    Size,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// Start of a trailer line, or of the final empty line.
    Trailer,
    TrailerLine,
    FinalLf,
    Done,
}

impl ChunkScanner {
    fn done(&self) -> bool {
        self.state == Chunk::Done
    }

    /// Consumes `data` up to the end of the body; returns how many bytes belong to it.
    fn scan(&mut self, data: &[u8]) -> Result<usize, &'static str> {
        let mut i = 0;
        while i < data.len() && self.state != Chunk::Done {
            let b = data[i];
            match self.state {
                Chunk::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let digit = u64::from(char::from(b).to_digit(16).unwrap_or(0));
                        self.size = self
                            .size
                            .checked_mul(16)
                            .and_then(|s| s.checked_add(digit))
                            .ok_or("chunk size overflow")?;
                        self.digits = self.digits.saturating_add(1);
                    }
                    b';' | b' ' | b'\t' if self.digits > 0 => self.state = Chunk::Extension,
                    b'\r' if self.digits > 0 => self.state = Chunk::SizeLf,
                    b'\n' if self.digits > 0 => self.end_size_line(),
                    _ => return Err("invalid chunk size"),
                },
                Chunk::Extension => match b {
                    b'\r' => self.state = Chunk::SizeLf,
                    b'\n' => self.end_size_line(),
                    _ => {}
                },
                Chunk::SizeLf => {
                    if b != b'\n' {
                        return Err("invalid chunk size line");
                    }
                    self.end_size_line();
                }
                Chunk::Data => {
                    let take = self.size.min((data.len() - i) as u64);
                    self.size -= take;
                    i += take as usize;
                    if self.size == 0 {
                        self.state = Chunk::DataCr;
                    }
                    continue;
                }
                Chunk::DataCr => match b {
                    b'\r' => self.state = Chunk::DataLf,
                    b'\n' => self.next_chunk(),
                    _ => return Err("chunk data too long"),
                },
                Chunk::DataLf => {
                    if b != b'\n' {
                        return Err("invalid chunk end");
                    }
                    self.next_chunk();
                }
                Chunk::Trailer => match b {
                    b'\r' => self.state = Chunk::FinalLf,
                    b'\n' => self.state = Chunk::Done,
                    _ => self.state = Chunk::TrailerLine,
                },
                Chunk::TrailerLine => {
                    if b == b'\n' {
                        self.state = Chunk::Trailer;
                    }
                }
                Chunk::FinalLf => {
                    if b != b'\n' {
                        return Err("invalid end of chunked body");
                    }
                    self.state = Chunk::Done;
                }
                Chunk::Done => {}
            }
            i += 1;
        }
        Ok(i)
    }

    fn end_size_line(&mut self) {
        self.state = if self.size == 0 {
            Chunk::Trailer
        } else {
            Chunk::Data
        };
    }

    fn next_chunk(&mut self) {
        self.state = Chunk::Size;
        self.size = 0;
        self.digits = 0;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A target the fast split takes is one `Uri` takes, split the same way.
    fn agrees(target: &[u8]) {
        if let Some(split) = plain_target(target) {
            assert_eq!(
                Some(split),
                any_target(target),
                "{}",
                String::from_utf8_lossy(target)
            );
        }
    }

    #[test]
    fn the_fast_target_split_agrees_with_uri_on_every_visible_byte() {
        let templates = [
            "/a{}b",
            "/{}",
            "/p?q{}r",
            "/p?{}",
            "/{}?q",
            "http://h{}st/p",
            "http://{}host:80/p",
            "http://host:8{}0/p",
            "http://host:{}/p",
            "http://host{}",
            "http://host:80{}",
            "http://host/{}",
            "http://host?{}",
            "http://host:80?q{}",
            "{}/p",
            "http:/{}/host/",
        ];
        let visible = (0x21u8..=0x7e).filter(|b| *b != b'#');
        for byte in visible {
            for template in templates {
                let target = template.replace("{}", &char::from(byte).to_string());
                agrees(target.as_bytes());
            }
        }
        // The common targets take the fast split.
        assert_eq!(plain_target(b"/"), Some((None, &b"/"[..])));
        assert_eq!(
            plain_target(b"http://app.bench:18090/x?y=1"),
            Some((Some(&b"app.bench:18090"[..]), &b"/x?y=1"[..]))
        );
        assert_eq!(
            plain_target(b"http://a-b.example"),
            Some((Some(&b"a-b.example"[..]), &b""[..]))
        );
        // Userinfo goes to the general path, as before.
        assert_eq!(plain_target(b"http://u@host/"), None);
        assert_eq!(any_target(b"http://u@host/"), None);
    }

    proptest! {
        #[test]
        fn the_fast_target_split_agrees_with_uri(target in r#"(/|http://|HTTP://|x)[a-z0-9.:/?@<>`"{}%\[\]-]{0,12}"#) {
            agrees(target.as_bytes());
        }
    }

    #[test]
    fn a_response_heads_headers_are_read_by_lower_case_name_and_joined() {
        let raw =
            b"HTTP/1.1 200 OK\r\nX-Busy: yes\r\nVia: a\r\ncontent-length: 0\r\nvia:  b \r\n\r\n";
        let head = parse_response(raw, false).unwrap().unwrap();
        let headers = ResponseHeaders(&head.head);
        assert_eq!(headers.get("x-busy").as_deref(), Some("yes"));
        assert_eq!(headers.get("via").as_deref(), Some("a,b"));
        assert_eq!(headers.get("content-length").as_deref(), Some("0"));
        assert_eq!(headers.get("x-other"), None);
        // The status line is no header.
        assert_eq!(headers.get("http/1.1 200 ok"), None);
    }

    /// The head the fast path takes, and the head it sends without the proxy's own
    /// `x-request-id` and `x-envoy-attempt-count` lines (checked by their own test).
    fn complete(raw: &str, explicit: bool) -> (Head, String) {
        match parse_request(raw.as_bytes(), explicit, (100, None)) {
            Parsed::Complete(head) => {
                let out = String::from_utf8(head.out.clone()).unwrap();
                let own = |l: &&str| {
                    l.starts_with("x-request-id: ") || l.starts_with("x-envoy-attempt-count: ")
                };
                let out = out.split_inclusive("\r\n").filter(|l| !own(l)).collect();
                (head, out)
            }
            Parsed::Partial => panic!("partial: {raw:?}"),
            Parsed::Other => panic!("not for the fast path: {raw:?}"),
        }
    }

    fn is_other(raw: &str) -> bool {
        matches!(
            parse_request(raw.as_bytes(), true, (100, None)),
            Parsed::Other
        )
    }

    #[test]
    fn origin_form_keeps_host_and_drops_hop_by_hop_headers() {
        let raw = "GET /a?b=1 HTTP/1.1\r\nHost: Up.Example:8080\r\nConnection: close, X-Hop\r\n\
                   X-Hop: 1\r\nKeep-Alive: 5\r\nProxy-Authorization: x\r\nTE: gzip\r\n\
                   Accept: */*\r\n\r\nnext";
        let (head, out) = complete(raw, false);
        assert_eq!(
            out,
            "GET /a?b=1 HTTP/1.1\r\nhost: Up.Example:8080\r\naccept: */*\r\n\
             x-forwarded-proto: http\r\n\r\n"
        );
        assert_eq!(head.len, raw.len() - 4);
        assert!(head.close);
        assert_eq!(head.body, 0);
        assert_eq!(&raw[head.authority], "Up.Example:8080");
    }

    #[test]
    fn the_upstream_gets_envoys_request_id_attempt_count_and_expected_timeout() {
        let id_of = |out: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix("x-request-id: "))
                .map(str::to_owned)
        };
        let raw = "GET / HTTP/1.1\r\nHost: up\r\nX-Envoy-Attempt-Count: 7\r\n\
                   x-envoy-expected-rq-timeout-ms: 9\r\n\r\n";
        let Parsed::Complete(head) = parse_request(raw.as_bytes(), false, (100, None)) else {
            panic!("not taken");
        };
        let out = String::from_utf8(head.out.clone()).unwrap();
        let id = id_of(&out).expect("a generated x-request-id");
        // A UUID version 4, variant 10.
        let groups: Vec<&str> = id.split('-').collect();
        assert_eq!(
            groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(
            id.bytes()
                .all(|b| b == b'-' || b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert!(groups[2].starts_with('4'), "{id}");
        assert!(
            matches!(groups[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'),
            "{id}"
        );
        // The client's attempt count and expected timeout are replaced, not passed on.
        assert!(!out.contains("-timeout-ms"), "{out}");
        assert_eq!(out.matches("x-envoy-attempt-count: ").count(), 1, "{out}");
        assert_eq!(head.out[head.attempt_at], b'1');
        assert!(out.ends_with("x-envoy-attempt-count: 1\r\n\r\n"), "{out}");
        // Every request gets its own id.
        let Parsed::Complete(again) = parse_request(raw.as_bytes(), false, (100, None)) else {
            panic!("not taken");
        };
        assert_ne!(id_of(std::str::from_utf8(&again.out).unwrap()), Some(id));

        // The client's id is kept; a route timeout is announced in milliseconds.
        let raw = "GET / HTTP/1.1\r\nHost: up\r\nX-Request-Id: mine\r\n\r\n";
        let timeout = Some(std::time::Duration::from_millis(1500));
        let Parsed::Complete(head) = parse_request(raw.as_bytes(), false, (100, timeout)) else {
            panic!("not taken");
        };
        let out = String::from_utf8(head.out).unwrap();
        assert_eq!(
            out,
            "GET / HTTP/1.1\r\nhost: up\r\nx-request-id: mine\r\nx-forwarded-proto: http\r\n\
             x-envoy-expected-rq-timeout-ms: 1500\r\nx-envoy-attempt-count: 1\r\n\r\n"
        );
    }

    #[test]
    fn host_and_one_plain_content_length_always_reach_the_upstream() {
        let raw = "POST /p HTTP/1.1\r\nHost: up\r\nConnection: Host, content-length, X\r\n\
                   X: 1\r\nContent-Length: 02\r\ncontent-length: 2\r\n\r\nab";
        let (head, out) = complete(raw, false);
        assert_eq!(
            out,
            "POST /p HTTP/1.1\r\nhost: up\r\ncontent-length: 2\r\n\
             x-forwarded-proto: http\r\n\r\n"
        );
        assert_eq!(head.body, 2);
        let mut r = response(
            "HTTP/1.1 200 OK\r\nDate: x\r\nConnection: Content-Length\r\n\
             Content-Length: 2\r\n\r\n",
            false,
        );
        let head = String::from_utf8(r.client_head(Instant::now(), false, 0)).unwrap();
        assert!(head.contains("\r\ncontent-length: 2\r\n"), "{head}");
    }

    #[test]
    fn absolute_form_routes_on_the_uri_and_rewrites_host() {
        let (head, out) = complete(
            "GET http://up.example:81?x HTTP/1.1\r\nHost: other\r\nTE: trailers\r\n\
             X-Forwarded-Proto: https\r\nProxy-Authenticate: y\r\n\r\n",
            true,
        );
        assert_eq!(
            out,
            "GET /?x HTTP/1.1\r\nhost: up.example:81\r\nte: trailers\r\n\
             x-forwarded-proto: https\r\n\r\n"
        );
        assert!(!head.close);
        let raw = "POST http://up.example/p HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc";
        let (head, out) = complete(raw, true);
        assert_eq!(
            out,
            "POST /p HTTP/1.1\r\nhost: up.example\r\ncontent-length: 3\r\n\
             x-forwarded-proto: http\r\n\r\n"
        );
        assert_eq!(head.body, 3);
        let line = head.log_line(&Bytes::from(raw), 100);
        assert_eq!(
            (line.path.bytes(), line.authority.bytes()),
            (&b"/p"[..], &b"up.example"[..])
        );
    }

    #[test]
    fn the_log_shows_the_request_id_the_upstream_gets() {
        let id_sent = |head: &Head| {
            let out = std::str::from_utf8(&head.out).unwrap();
            out.lines()
                .find_map(|l| l.strip_prefix("x-request-id: "))
                .map(str::to_owned)
        };
        // Without one from the client: the generated id, also when another logged header
        // repeats and the head is parsed again for the line.
        for raw in [
            "GET / HTTP/1.1\r\nHost: up\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: up\r\nUser-Agent: a\r\nUser-Agent: b\r\n\r\n",
        ] {
            let (head, _) = complete(raw, false);
            let line = head.log_line(&Bytes::from(raw), 100);
            let sent = id_sent(&head).expect("a generated id");
            assert_eq!(sent.len(), 36, "{sent}");
            assert_eq!(shown(&line.headers.request_id), Some(sent), "{raw:?}");
        }
        // The client's, verbatim; repeated, joined as the log joins any repeated header.
        for (raw, logged) in [
            (
                "GET / HTTP/1.1\r\nHost: up\r\nX-Request-Id: Mine\r\n\r\n",
                "Mine",
            ),
            (
                "GET / HTTP/1.1\r\nHost: up\r\nx-request-id: a\r\nx-request-id: b\r\n\r\n",
                "a,b",
            ),
        ] {
            let (head, _) = complete(raw, false);
            assert_eq!(head.generated_id, None, "{raw:?}");
            let line = head.log_line(&Bytes::from(raw), 100);
            assert_eq!(
                shown(&line.headers.request_id).as_deref(),
                Some(logged),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn the_logged_headers_come_from_the_one_parse_and_repeats_are_joined() {
        let raw = "GET / HTTP/1.1\r\nHost: up\r\nUser-Agent: curl/8\r\n\
                   X-Request-Id: abc\r\n\r\n";
        let (head, _) = complete(raw, false);
        let line = head.log_line(&Bytes::from(raw), 100);
        let h = &line.headers;
        assert_eq!(
            (
                shown(&h.user_agent).as_deref(),
                shown(&h.request_id).as_deref(),
                shown(&h.forwarded_for).as_deref()
            ),
            (Some("curl/8"), Some("abc"), None)
        );
        let raw = "GET / HTTP/1.1\r\nHost: up\r\nX-Forwarded-For: 10.0.0.1\r\n\
                   x-forwarded-for: 10.0.0.2\r\n\r\n";
        let (head, _) = complete(raw, false);
        let line = head.log_line(&Bytes::from(raw), 100);
        assert_eq!(
            shown(&line.headers.forwarded_for).as_deref(),
            Some("10.0.0.1,10.0.0.2")
        );
    }

    /// What the line shows of a logged value.
    fn shown(value: &Option<LogText>) -> Option<String> {
        value
            .as_ref()
            .map(|v| String::from_utf8_lossy(v.bytes()).into_owned())
    }

    #[test]
    fn anything_unusual_goes_to_the_general_path() {
        for raw in [
            "CONNECT up:443 HTTP/1.1\r\nHost: up:443\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: up\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: up\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: up\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: up\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: up\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: up\r\nContent-Length: -1\r\n\r\n",
            "GET https://up/ HTTP/1.1\r\n\r\n",
            "GET http://user@up/ HTTP/1.1\r\n\r\n",
            "GET * HTTP/1.1\r\nHost: up\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET /a#frag HTTP/1.1\r\nHost: up\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: up\r\nConnection: a,b,c,d,e,f,g,h,i\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
        ] {
            assert!(is_other(raw), "{raw:?}");
        }
        let many: String = (0..101).map(|i| format!("x-{i}: v\r\n")).collect();
        assert!(is_other(&format!(
            "GET / HTTP/1.1\r\nHost: up\r\n{many}\r\n"
        )));
        assert!(matches!(
            parse_request(b"GET / HTTP/1.1\r\nHost: up\r\n", false, (100, None)),
            Parsed::Partial
        ));
    }

    fn response(raw: &str, head_method: bool) -> ResponseHead {
        parse_response(raw.as_bytes(), head_method)
            .unwrap()
            .expect("complete")
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let r = response("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false);
        assert_eq!(
            (r.framing, r.reusable, r.chunked),
            (Framing::Length(5), true, false)
        );
        let r = response(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            false,
        );
        assert_eq!((r.framing, r.chunked), (Framing::Chunked, true));
        assert!(!String::from_utf8_lossy(&r.head).contains("content-length"));
        let r = response("HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!((r.framing, r.chunked), (Framing::Close, true));
        let r = response(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            true,
        );
        assert_eq!((r.framing, r.chunked), (Framing::Empty, true));
        let r = response(
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            false,
        );
        assert_eq!(r.framing, Framing::Empty);
        let r = response("HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", false);
        assert!(r.interim);
        let r = response("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false);
        assert!(!r.reusable);
        let r = response(
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
            false,
        );
        assert!(r.reusable);
        let r = response("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", false);
        assert!(!r.reusable);
        for bad in [
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
        ] {
            assert!(parse_response(bad.as_bytes(), false).is_err(), "{bad:?}");
        }
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\n", false),
            Ok(None)
        ));
    }

    #[test]
    fn client_response_head_is_rewritten_as_envoy_does() {
        let mut r = response(
            "HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: x\r\nConnection: keep-alive, X-Hop\r\n\
             X-Hop: 1\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n",
            false,
        );
        let head = String::from_utf8(r.client_head(Instant::now(), true, 0)).unwrap();
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\ndate: x\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\
             server: envoy\r\nx-envoy-upstream-service-time: 0\r\nconnection: close\r\n\r\n"
        );
        let mut r = response("HTTP/1.1 599 Odd\r\n\r\n", true);
        let head = String::from_utf8(r.client_head(Instant::now(), false, 0)).unwrap();
        assert!(head.starts_with("HTTP/1.1 599 Odd\r\n"), "{head}");
        assert!(head.contains("\r\ndate: "), "{head}");
    }

    #[test]
    fn fields_are_copied_whole_only_when_they_arrived_plain() {
        // Whatever the spacing, line ending or case, a field goes out as `name: value\r\n`.
        let head = "HTTP/1.1 200 OK\r\nX-Plain: a b\r\nX-Tight:v\r\nX-Wide:  w  \r\n\
                    X-Bare: n\nX-Empty: \r\nX-Last: l\r\n\r\n";
        let mut r = response(head, false);
        let out = String::from_utf8(r.client_head(Instant::now(), false, 0)).unwrap();
        assert!(
            out.starts_with(
                "HTTP/1.1 200 OK\r\nx-plain: a b\r\nx-tight: v\r\nx-wide: w\r\nx-bare: n\r\n\
                 x-empty: \r\nx-last: l\r\n"
            ),
            "{out}"
        );
        // A name and value from elsewhere than the head are written, not looked up.
        let mut out = Vec::new();
        field_lowercase(&mut out, b"Name: value\r\n", b"Name", b"value");
        field_lowercase(&mut out, b"short", b"Other", b"v");
        assert_eq!(out, b"name: value\r\nother: v\r\n");
    }

    #[test]
    fn lowercase_and_comparison_by_words_agree_with_bytewise_ones() {
        for len in 0..20 {
            for b in 0..=255u8 {
                for at in 0..len {
                    let mut bytes: Vec<u8> = (0..len).map(|i| b"aZ@[`{\xc1\xdaM"[i % 9]).collect();
                    bytes[at] = b;
                    let mut expected = bytes.clone();
                    expected.make_ascii_lowercase();
                    let mut other = expected.clone();
                    other[at] ^= 0x01;
                    for known in [&expected, &other] {
                        let same = bytes.eq_ignore_ascii_case(known);
                        assert_eq!(eq_lowercase(&bytes, known), same, "{bytes:?} {known:?}");
                    }
                    lowercase(&mut bytes);
                    assert_eq!(bytes, expected, "len {len} byte {b} at {at}");
                }
            }
        }
    }

    #[test]
    fn fields_are_told_by_name_in_any_case() {
        for (name, field) in [
            ("te", Field::Te),
            ("Host", Field::Host),
            ("DATE", Field::Date),
            ("expect", Field::Expect),
            ("Server", Field::Server),
            ("upgrade", Field::Upgrade),
            ("Connection", Field::Connection),
            ("keep-alive", Field::KeepAlive),
            ("User-Agent", Field::UserAgent),
            ("content-type", Field::ContentType),
            ("X-Request-Id", Field::RequestId),
            ("Content-Length", Field::ContentLength),
            ("x-forwarded-for", Field::ForwardedFor),
            ("Proxy-Connection", Field::ProxyConnection),
            ("Transfer-Encoding", Field::TransferEncoding),
            ("X-Forwarded-Proto", Field::ForwardedProto),
            ("proxy-authenticate", Field::ProxyAuthenticate),
            ("proxy-authorization", Field::ProxyAuthorization),
            (ATTEMPT_COUNT, Field::AttemptCount),
            (EXPECTED_TIMEOUT, Field::ExpectedTimeout),
            ("hosts", Field::Other),
            ("hast", Field::Other),
            ("x-request-ie", Field::Other),
            ("", Field::Other),
        ] {
            assert_eq!(Field::of(name.as_bytes()), field, "{name}");
        }
    }

    #[test]
    fn local_replies_match_the_general_path() {
        let reply = local_reply(ProxyError::NoHealthyUpstream.to_response(), false, true);
        let text = String::from_utf8(reply).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{text}"
        );
        assert!(text.contains("content-length: 19\r\n"), "{text}");
        assert!(text.contains("server: envoy\r\n"), "{text}");
        assert!(text.contains("connection: close\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nno healthy upstream"), "{text}");
        let head_only = local_reply(ProxyError::NoHealthyUpstream.to_response(), true, false);
        assert!(String::from_utf8(head_only).unwrap().ends_with("\r\n\r\n"));
    }

    const BODY: &[u8] = b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nTrailer: t\r\n\r\n";

    #[test]
    fn chunk_scanner_finds_the_end_of_the_body() {
        let mut scanner = ChunkScanner::default();
        let mut data = BODY.to_vec();
        data.extend_from_slice(b"EXTRA");
        assert_eq!(scanner.scan(&data), Ok(BODY.len()));
        assert!(scanner.done());
        let mut scanner = ChunkScanner::default();
        assert_eq!(scanner.scan(b"0\r\n\r\n"), Ok(5));
        assert!(scanner.done());
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"3\r\nabcd\r\n",
            b"ffffffffffffffffff\r\n",
        ] {
            assert!(ChunkScanner::default().scan(bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn chunk_scanner_is_independent_of_how_bytes_arrive(cuts in proptest::collection::vec(0..BODY.len(), 0..8)) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            cuts.push(BODY.len());
            let mut scanner = ChunkScanner::default();
            let mut from = 0;
            let mut total = 0;
            for cut in cuts {
                total += scanner.scan(&BODY[from..cut]).unwrap();
                from = cut;
            }
            prop_assert!(scanner.done());
            prop_assert_eq!(total, BODY.len());
        }

        #[test]
        fn request_parser_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_request(&data, true, (100, None));
            let _ = parse_response(&data, false);
            let _ = ChunkScanner::default().scan(&data);
        }
    }
}

//! HTTP/2 to upstreams on the `h2` crate itself.
//!
//! hyper's HTTP/2 client puts a dispatcher between a request and its stream: the request
//! goes through a channel to a task that opens the stream and hands the executor a future
//! per request to wait for the response, which comes back through a oneshot. Measured on
//! the h2c case that machinery was about a tenth of the sidecar's CPU per request. Here
//! the request's own future opens its stream on a clone of the connection's sender and
//! awaits the response itself; only a request body that is not complete when the stream
//! opens gets a task of its own to stream it. The settings, the header rules and the body's
//! end-of-stream semantics are hyper's, so the upstream sees the same frames as before.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};

use bytes::Bytes;
use h2::client::{Connection, ResponseFuture, SendRequest};
use h2::{Reason, RecvStream, SendStream};
use http::header::{self, HeaderMap, HeaderName};
use http::{Method, Request, Response};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

use crate::body::{BodyError, RequestBody};
use crate::pool::{H2Stream, OpenStream, StreamCount};

/// The sending side of an upstream HTTP/2 connection; each request sends on a clone.
pub(crate) type Sender = SendRequest<Bytes>;

/// Opens HTTP/2 on `io` with hyper's client settings (2 MiB stream and 5 MiB connection
/// windows, 100 streams until the server's SETTINGS say otherwise, 16 KiB frames and header
/// lists, no server push). The connection must be polled for anything to move; it ends
/// once its streams are done and every [`Sender`] is dropped.
pub(crate) async fn handshake<T>(io: T) -> Result<(Sender, Connection<T, Bytes>), h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    h2::client::Builder::new()
        .initial_max_send_streams(100)
        .initial_window_size(2 * 1024 * 1024)
        .initial_connection_window_size(5 * 1024 * 1024)
        .max_frame_size(16 * 1024)
        .max_header_list_size(16 * 1024)
        .max_send_buffer_size(1024 * 1024)
        .max_local_error_reset_streams(Some(1024))
        .enable_push(false)
        .handshake(io)
        .await
}

/// Drives `conn` until it ends, telling `streams` the server's stream limit once its
/// SETTINGS are read: the answer to a PING sent after the preface comes after them.
pub(crate) async fn drive<T>(
    mut conn: Connection<T, Bytes>,
    streams: Arc<StreamCount>,
) -> Result<(), h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut pong = conn
        .ping_pong()
        .map(|mut ping| Box::pin(async move { ping.ping(h2::Ping::opaque()).await }));
    poll_fn(|cx| {
        // The ping first: its frame then goes out before the first request's, and its
        // answer comes before the first response.
        if let Some(answer) = pong.as_mut()
            && let Poll::Ready(answered) = answer.as_mut().poll(cx)
        {
            if answered.is_ok() {
                streams.learned(conn.max_concurrent_send_streams());
            }
            pong = None;
        }
        Pin::new(&mut conn).poll(cx)
    })
    .await
}

/// Whether the connection behind `sender` can take no new stream: it failed, or the server
/// sent GOAWAY.
pub(crate) fn is_closed(sender: &mut Sender) -> bool {
    // A sender that never sent is never pending; the poll only reads the connection's error.
    let mut cx = Context::from_waker(Waker::noop());
    matches!(sender.poll_ready(&mut cx), Poll::Ready(Err(_)))
}

/// How sending a request failed.
pub(crate) enum SendError {
    /// Nothing left: the connection could not take a stream. The request comes back.
    Unsent(h2::Error, Box<Request<RequestBody>>),
    /// The stream was opened (the request may have been seen) and no response head came;
    /// with the part of the body it had not taken when the upstream ended the stream, if any.
    Sent(h2::Error, Option<RequestBody>),
}

/// Sends `req` on `stream` of a pooled connection and waits for the response head.
pub(crate) async fn send(
    stream: H2Stream,
    req: Request<RequestBody>,
) -> Result<Response<H2Body>, SendError> {
    let H2Stream { mut sender, open } = stream;
    if let Err(e) = poll_fn(|cx| sender.poll_ready(cx)).await {
        return Err(SendError::Unsent(e, Box::new(req)));
    }
    let (mut head, body) = req.into_parts();
    strip_connection_headers(&mut head.headers);
    if let Some(len) = body.size_hint().exact()
        && (len != 0 || has_payload_semantics(&head.method))
    {
        head.headers
            .entry(header::CONTENT_LENGTH)
            .or_insert_with(|| len.into());
    }
    let eos = body.is_end_stream();
    let (response, stream) = match sender.send_request(Request::from_parts(head, ()), eos) {
        Ok(opened) => opened,
        Err(e) => return Err(SendError::Sent(e, Some(body))),
    };
    let mut cancel = None;
    let mut rest = Rest::None;
    if !eos {
        let mut pipe = Pipe {
            body,
            stream,
            held: None,
            cancel: None,
            cut: None,
        };
        // A body already complete (a small one that came with its head) is sent now;
        // only one still arriving gets a task.
        match poll_fn(|cx| Poll::Ready(Pin::new(&mut pipe).poll(cx))).await {
            Poll::Ready(Cut::Upstream) => {
                rest = Rest::Here(std::mem::replace(&mut pipe.body, RequestBody::Empty));
            }
            Poll::Ready(Cut::No) => {}
            Poll::Pending => {
                let (tx, rx) = oneshot::channel();
                pipe.cancel = Some(rx);
                cancel = Some(tx);
                // Only a copied body can go again: only its rest is worth handing back.
                if matches!(
                    pipe.body,
                    RequestBody::Copying(..) | RequestBody::Resumed(..)
                ) {
                    let (back, returned) = oneshot::channel();
                    pipe.cut = Some(back);
                    rest = Rest::Coming(returned);
                }
                tokio::spawn(pipe);
            }
        }
    }
    let response = match (Waiting { response, cancel }).await {
        Ok(response) => response,
        Err(e) => {
            let rest = match rest {
                Rest::None => None,
                Rest::Here(body) => Some(body),
                // The body's task was told to hand it back (`Waiting`); it has, or has ended.
                Rest::Coming(returned) => returned.await.ok(),
            };
            return Err(SendError::Sent(e, rest));
        }
    };
    let length = content_length(response.headers());
    Ok(response.map(|recv| H2Body {
        recv,
        data_done: false,
        remaining: length,
        _open: open,
    }))
}

/// The response future, and the request body's task to stop if the response is no longer
/// awaited (the attempt timed out or the client went away) or will not come.
struct Waiting {
    response: ResponseFuture,
    cancel: Option<oneshot::Sender<Stop>>,
}

/// Why a request body's task is told to stop.
enum Stop {
    /// The response is no longer awaited: the stream is reset.
    Cancel,
    /// The stream failed before its response: the body's rest goes back to the request.
    HandBack,
}

impl Future for Waiting {
    type Output = Result<Response<RecvStream>, h2::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let polled = Pin::new(&mut self.response).poll(cx);
        match &polled {
            // Answered: the body streams on, whatever happens to the response.
            Poll::Ready(Ok(_)) => self.cancel = None,
            // Told at once rather than left to see the stream's end on its own: the request
            // waits for what it hands back.
            Poll::Ready(Err(_)) => {
                if let Some(cancel) = self.cancel.take() {
                    let _ = cancel.send(Stop::HandBack);
                }
            }
            Poll::Pending => {}
        }
        polled
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(cancel) = self.cancel.take() {
            let _ = cancel.send(Stop::Cancel);
        }
    }
}

/// Where the part of a request body its attempt did not send is, if it is wanted back.
enum Rest {
    /// Not wanted (nothing to send again), or the body went whole.
    None,
    /// Still here: the stream ended before the body's first poll was done with.
    Here(RequestBody),
    /// With the body's task, which hands it back if the upstream ends the stream first.
    Coming(oneshot::Receiver<RequestBody>),
}

/// How a request body's pipe ended.
enum Cut {
    /// Sent whole, or ended by the client or a cancel.
    No,
    /// The upstream's stream ended first: the body's rest is still in the pipe.
    Upstream,
}

/// Streams a request body into its HTTP/2 stream within the stream's flow-control window.
struct Pipe {
    body: RequestBody,
    stream: SendStream<Bytes>,
    /// A chunk waiting for window, and whether it ends the body.
    held: Option<(Bytes, bool)>,
    /// Fires when the response is no longer awaited or will not come.
    cancel: Option<oneshot::Receiver<Stop>>,
    /// Takes the body's rest back to the request if the upstream ends the stream first.
    cut: Option<oneshot::Sender<RequestBody>>,
}

impl Future for Pipe {
    type Output = Cut;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Cut> {
        let me = &mut *self;
        if let Some(cancel) = &mut me.cancel {
            match Pin::new(cancel).poll(cx) {
                Poll::Ready(Ok(Stop::Cancel)) => {
                    me.stream.send_reset(Reason::CANCEL);
                    return Poll::Ready(Cut::No);
                }
                Poll::Ready(Ok(Stop::HandBack)) => {
                    if let Some(back) = me.cut.take() {
                        let _ = back.send(std::mem::replace(&mut me.body, RequestBody::Empty));
                    }
                    return Poll::Ready(Cut::Upstream);
                }
                // Answered: nothing will cancel any more.
                Poll::Ready(Err(_)) => me.cancel = None,
                Poll::Pending => {}
            }
        }
        match me.pump(cx) {
            Poll::Ready(Err((e, cut))) => {
                tracing::debug!(error = %e, "upstream HTTP/2 request body not sent whole");
                if let (Cut::Upstream, Some(back)) = (&cut, me.cut.take()) {
                    let _ = back.send(std::mem::replace(&mut me.body, RequestBody::Empty));
                }
                Poll::Ready(cut)
            }
            Poll::Ready(Ok(())) => Poll::Ready(Cut::No),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Pipe {
    /// Sends the body; a failure says whether the upstream's stream ended first.
    fn pump(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), (BodyError, Cut)>> {
        let upstream = |e: h2::Error| (BodyError::from(e), Cut::Upstream);
        loop {
            if let Poll::Ready(reason) = self.stream.poll_reset(cx).map_err(upstream)? {
                return Poll::Ready(Err(upstream(h2::Error::from(reason))));
            }
            if let Some((chunk, eos)) = self.held.take() {
                if self.stream.capacity() == 0 {
                    match self.stream.poll_capacity(cx) {
                        Poll::Pending => {
                            self.held = Some((chunk, eos));
                            return Poll::Pending;
                        }
                        Poll::Ready(Some(Ok(_))) => {
                            self.held = Some((chunk, eos));
                            continue;
                        }
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(upstream(e))),
                        Poll::Ready(None) => {
                            let e = "the stream's capacity closed".into();
                            return Poll::Ready(Err((e, Cut::Upstream)));
                        }
                    }
                }
                self.stream.send_data(chunk, eos).map_err(upstream)?;
                if eos {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(chunk) => {
                        let eos = self.body.is_end_stream();
                        if chunk.is_empty() {
                            self.stream.send_data(chunk, eos).map_err(upstream)?;
                            if eos {
                                return Poll::Ready(Ok(()));
                            }
                        } else {
                            // h2 may send a part of the chunk per window it gets.
                            self.stream.reserve_capacity(chunk.len());
                            self.held = Some((chunk, eos));
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.stream.reserve_capacity(0);
                            self.stream.send_trailers(trailers).map_err(upstream)?;
                            return Poll::Ready(Ok(()));
                        }
                    }
                },
                Some(Err(e)) => {
                    // The client's stream failed: the upstream's is reset with its reason.
                    self.stream.send_reset(reset_reason(&e));
                    return Poll::Ready(Err((e.into(), Cut::No)));
                }
                None => {
                    self.stream
                        .send_data(Bytes::new(), true)
                        .map_err(upstream)?;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

/// The reason an HTTP/2 reset carried somewhere in `e`'s causes, else `INTERNAL_ERROR`.
fn reset_reason(e: &(dyn std::error::Error + 'static)) -> Reason {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if let Some(reason) = e.downcast_ref::<h2::Error>().and_then(h2::Error::reason) {
            return reason;
        }
        cause = e.source();
    }
    Reason::INTERNAL_ERROR
}

/// A response body streamed from an upstream HTTP/2 stream. Each chunk's window goes back
/// to the upstream as it is taken; a `RST_STREAM` with `NO_ERROR` ends the body without
/// failing it (RFC 9113, 8.1: the server answered before reading the whole request).
pub struct H2Body {
    recv: RecvStream,
    data_done: bool,
    /// What `content-length` says is still to come.
    remaining: Option<u64>,
    /// The stream's count on its connection, until the response is done with.
    _open: OpenStream,
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let me = &mut *self;
        if !me.data_done {
            match ready!(me.recv.poll_data(cx)) {
                Some(Ok(chunk)) => {
                    let _ = me.recv.flow_control().release_capacity(chunk.len());
                    if let Some(remaining) = &mut me.remaining {
                        *remaining = remaining.saturating_sub(chunk.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => return Poll::Ready(None),
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                None => me.data_done = true,
            }
        }
        match ready!(me.recv.poll_trailers(cx)) {
            Ok(trailers) => Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t)))),
            Err(e) if e.reason() == Some(Reason::NO_ERROR) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e.into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.remaining
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// The length `content-length` gives: every value the same number, else none.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let first = values.next()?;
    let parse = |v: &http::HeaderValue| v.to_str().ok()?.trim().parse::<u64>().ok();
    let len = parse(first)?;
    values.all(|v| parse(v) == Some(len)).then_some(len)
}

/// Methods whose request may carry a body, for which an empty one still gets
/// `content-length: 0` (hyper's rule).
fn has_payload_semantics(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT
    )
}

/// Removes what HTTP/2 forbids in a request (RFC 9113, 8.2.2), as hyper's client does:
/// connection-specific fields, those the `connection` header names, and `te` other than
/// `trailers`.
fn strip_connection_headers(headers: &mut HeaderMap) {
    for name in [
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    if headers.get(header::TE).is_some_and(|te| te != "trailers") {
        headers.remove(header::TE);
    }
    if let Some(connection) = headers.remove(header::CONNECTION)
        && let Ok(listed) = connection.to_str()
    {
        for name in listed.split(',') {
            headers.remove(name.trim());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_is_one_agreed_number() {
        let mut headers = HeaderMap::new();
        assert_eq!(content_length(&headers), None);
        headers.append(header::CONTENT_LENGTH, "10".parse().unwrap());
        assert_eq!(content_length(&headers), Some(10));
        headers.append(header::CONTENT_LENGTH, " 10".parse().unwrap());
        assert_eq!(content_length(&headers), Some(10));
        headers.append(header::CONTENT_LENGTH, "11".parse().unwrap());
        assert_eq!(content_length(&headers), None);
        headers.insert(header::CONTENT_LENGTH, "ten".parse().unwrap());
        assert_eq!(content_length(&headers), None);
    }

    #[test]
    fn connection_specific_fields_are_stripped() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "x-hop, keep-alive".parse().unwrap());
        headers.insert("x-hop", "1".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert(header::TE, "trailers".parse().unwrap());
        headers.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        headers.insert("x-kept", "1".parse().unwrap());
        strip_connection_headers(&mut headers);
        let names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["te", "x-kept"]);
        headers.insert(header::TE, "gzip".parse().unwrap());
        strip_connection_headers(&mut headers);
        assert!(headers.get(header::TE).is_none());
    }

    #[test]
    fn a_reset_keeps_the_reason_it_was_given() {
        let e: BodyError = Box::new(h2::Error::from(Reason::CANCEL));
        assert_eq!(reset_reason(&*e), Reason::CANCEL);
        let e: BodyError = "the client went away".into();
        assert_eq!(reset_reason(&*e), Reason::INTERNAL_ERROR);
    }
}

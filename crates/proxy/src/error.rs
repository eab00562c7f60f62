//! Errors of the data path, each carrying the Envoy response flag it maps to, and the one
//! place where an error becomes what the client sees.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use portcullis_envoy::AbortError;
use portcullis_registry::{DirectResponse, Overflow};
use thiserror::Error;

use crate::attempt::Condition;
use crate::body::ProxyBody;

/// Why a request or connection was not forwarded (or not completed).
#[derive(Debug, Error)]
pub enum ProxyError {
    /// Unregistered destination under REGISTRY_ONLY (Envoy's `block_all` route).
    #[error("destination is not registered")]
    Blocked,
    /// The cluster has no endpoint to send to.
    #[error("no healthy upstream")]
    NoHealthyUpstream,
    /// Connecting to the upstream failed.
    #[error("upstream connect error: {0}")]
    ConnectFailure(#[source] std::io::Error),
    /// The TLS handshake with the upstream failed, for Envoy's transport failure reason.
    #[error("upstream TLS handshake failed: {0}")]
    TlsHandshake(Arc<str>),
    /// Connecting to the upstream took longer than the connect timeout.
    #[error("upstream connect timeout")]
    ConnectTimeout,
    /// The upstream closed or reset before a response.
    #[error("upstream reset before response: {0}")]
    UpstreamReset(#[source] crate::body::BodyError),
    /// The upstream connection failed or closed before a complete response head.
    #[error("upstream connection closed before response: {0}")]
    UpstreamClosed(#[source] std::io::Error),
    /// The upstream's response was not valid HTTP/1.1.
    #[error("upstream protocol error: {0}")]
    UpstreamProtocol(&'static str),
    /// No response headers within the route timeout.
    #[error("upstream request timeout")]
    UpstreamTimeout,
    /// No response headers within the retry policy's `per_try_timeout` of one attempt.
    #[error("upstream per-try timeout")]
    PerTryTimeout,
    /// The stream saw no activity for the connection manager's `stream_idle_timeout`;
    /// `request_complete` tells whether the client had sent its whole request.
    #[error("stream idle timeout")]
    StreamIdle {
        /// Whether the request had been received whole (then 504, else 408).
        request_complete: bool,
    },
    /// The request was not received whole within the connection manager's
    /// `request_timeout`.
    #[error("request timeout")]
    RequestTimeout,
    /// Resolving a DNS endpoint failed.
    #[error("DNS resolution of {host} failed")]
    DnsFailure {
        /// The host that did not resolve.
        host: String,
    },
    /// The request cannot be routed as sent (e.g. two Host headers).
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// The destination is the proxy itself.
    #[error("request loops back to the proxy")]
    Loop,
    /// An HTTP/1.0 request where HTTP/1.0 is not accepted.
    #[error("HTTP/1.0 is not accepted")]
    Http10,
    /// An HTTP/1.x request with no Host to route on.
    #[error("missing Host header")]
    MissingHost,
    /// No route matches the request (Envoy's 404, flag `NR`), or no filter chain takes the
    /// connection (closed, flag `NR`).
    #[error("no route")]
    NoRoute,
    /// The route or filter chain names a cluster that does not exist.
    #[error("cluster {0} not found")]
    NoCluster(Arc<str>),
    /// The route's fault injection aborted the request with this status (`FI`).
    #[error("fault injected: abort with {0:?}")]
    FaultAbort(AbortError),
    /// The route answers directly (`direct_response`, redirect).
    #[error("direct response {}", .0.status)]
    Direct(Arc<DirectResponse>),
    /// The endpoint needs a transport portcullis cannot originate; it gets no plaintext.
    #[error("upstream transport unavailable: {0}")]
    TransportRefused(Arc<str>),
    /// A circuit breaker of the cluster is at its threshold (Envoy's overflow, `UO`).
    #[error("upstream overflow: {0}")]
    Overflow(#[source] Overflow),
    /// A retry was due and the cluster's `max_retries` forbade it: the inner error (of the
    /// attempt before) is the answer, flagged `UO` as well, as Envoy's router does.
    #[error("retry overflow after: {0}")]
    RetryOverflow(Box<ProxyError>),
    /// Retries were made and the last attempt failed with the inner error.
    #[error("retries exhausted: {0}")]
    Retried(Box<ProxyError>),
}

/// How an HTTP/2 upstream ended a stream (Envoy's remote reset reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RemoteReset {
    /// `REFUSED_STREAM`, or above the last stream id of its GOAWAY: never processed.
    Refused,
    /// Any other `RST_STREAM` it sent.
    Reset,
}

impl ProxyError {
    /// Envoy's response flag for the access log (`-` when Envoy sets none).
    pub fn flag(&self) -> &'static str {
        match self {
            // Istio's block_all is a direct response on a matched route: Envoy sets no flag.
            ProxyError::Blocked => "-",
            ProxyError::NoHealthyUpstream => "UH",
            ProxyError::ConnectFailure(_)
            | ProxyError::TlsHandshake(_)
            | ProxyError::ConnectTimeout
            | ProxyError::UpstreamReset(_)
            | ProxyError::UpstreamClosed(_) => self.upstream_failure().unwrap_or("UC"),
            ProxyError::UpstreamProtocol(_) => "UPE",
            ProxyError::UpstreamTimeout | ProxyError::PerTryTimeout => "UT",
            ProxyError::StreamIdle { .. } => "SI",
            // Envoy 1.40 logs its 408 with no flag, details `request_overall_timeout`.
            ProxyError::RequestTimeout => "-",
            ProxyError::DnsFailure { .. } => "DF",
            ProxyError::BadRequest(_) | ProxyError::Http10 => "DPE",
            // Envoy's codec answers the request without a Host as a complete one: no flag.
            ProxyError::MissingHost => "-",
            ProxyError::Loop | ProxyError::NoRoute => "NR",
            ProxyError::NoCluster(_) => "NC",
            ProxyError::Direct(_) => "-",
            ProxyError::FaultAbort(_) => "FI",
            ProxyError::TransportRefused(_) => "UF",
            ProxyError::Overflow(_) => "UO",
            // Envoy 1.40 prints `UO` first (checked against it for `UO,UF`).
            ProxyError::RetryOverflow(last) => match &**last {
                ProxyError::Retried(inner) => match inner.upstream_failure() {
                    Some("UF") => "UO,URX,UF",
                    Some("UR") => "UO,URX,UR",
                    Some(_) => "UO,URX,UC",
                    None => last.flag(),
                },
                other => match other.upstream_failure() {
                    Some("UF") => "UO,UF",
                    Some("UR") => "UO,UR",
                    Some(_) => "UO,UC",
                    None => other.flag(),
                },
            },
            ProxyError::Retried(last) => match last.upstream_failure() {
                Some("UF") => "URX,UF",
                Some("UR") => "URX,UR",
                Some(_) => "URX,UC",
                // The retry limit is noted before the last attempt's timeout ends the request.
                None if matches!(**last, ProxyError::PerTryTimeout) => "URX,UT",
                None => last.flag(),
            },
        }
    }

    /// The flag of a failed connection or a stream the upstream ended: `UF` (the connection
    /// could not be made), `UR` (an HTTP/2 upstream reset or refused the stream: Envoy's
    /// remote reset) or `UC` (the connection ended); `None` for any other error.
    fn upstream_failure(&self) -> Option<&'static str> {
        match self {
            ProxyError::ConnectFailure(_)
            | ProxyError::TlsHandshake(_)
            | ProxyError::ConnectTimeout => Some("UF"),
            ProxyError::UpstreamReset(_) if self.remote_reset().is_some() => Some("UR"),
            ProxyError::UpstreamReset(_) | ProxyError::UpstreamClosed(_) => Some("UC"),
            _ => None,
        }
    }

    /// Whether Envoy answers this before any upstream is tried, from the request's headers
    /// alone: a request body is then still unread, and an HTTP/1 connection has to close.
    pub fn before_upstream(&self) -> bool {
        matches!(
            self,
            ProxyError::Blocked
                | ProxyError::Direct(_)
                | ProxyError::FaultAbort(_)
                | ProxyError::NoRoute
                | ProxyError::NoCluster(_)
                | ProxyError::TransportRefused(_)
                | ProxyError::NoHealthyUpstream
                | ProxyError::Loop
                | ProxyError::BadRequest(_)
                | ProxyError::Http10
                | ProxyError::MissingHost
        )
    }

    /// Whether the answer to this error ends an HTTP/1 connection (`connection: close`).
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            ProxyError::Http10
                | ProxyError::MissingHost
                | ProxyError::RequestTimeout
                | ProxyError::StreamIdle {
                    request_complete: false
                }
        )
    }

    /// Whether an HTTP/2 upstream refused the stream: reset it with `REFUSED_STREAM`, or sent
    /// GOAWAY with a last stream id below it (h2 fails exactly those streams, and streams
    /// opened after it, with the remote's GOAWAY). Either way it never processed the request
    /// (RFC 9113, 6.8 and 8.7); Envoy's codec closes a stream above a GOAWAY as refused too.
    pub fn refused_stream(&self) -> bool {
        self.remote_reset() == Some(RemoteReset::Refused)
    }

    /// How an HTTP/2 upstream ended the stream itself, if it did.
    fn remote_reset(&self) -> Option<RemoteReset> {
        let ProxyError::UpstreamReset(e) = self else {
            return None;
        };
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&**e);
        while let Some(cause) = source {
            if let Some(h2) = cause.downcast_ref::<h2::Error>() {
                return if h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                    || (h2.is_go_away() && h2.is_remote())
                {
                    Some(RemoteReset::Refused)
                } else if h2.is_reset() && h2.is_remote() {
                    Some(RemoteReset::Reset)
                } else {
                    None
                };
            }
            source = cause.source();
        }
        None
    }

    /// The same failure for another request: the requests that waited for an HTTP/2
    /// connection another request was making fail as it did (Envoy fails the streams
    /// pending on a connection that could not be made with that connection's failure).
    pub(crate) fn replicate(&self) -> ProxyError {
        let copy = |e: &std::io::Error| std::io::Error::new(e.kind(), e.to_string());
        match self {
            ProxyError::ConnectFailure(e) => ProxyError::ConnectFailure(copy(e)),
            ProxyError::UpstreamClosed(e) => ProxyError::UpstreamClosed(copy(e)),
            ProxyError::TlsHandshake(why) => ProxyError::TlsHandshake(Arc::clone(why)),
            ProxyError::TransportRefused(why) => ProxyError::TransportRefused(Arc::clone(why)),
            ProxyError::ConnectTimeout => ProxyError::ConnectTimeout,
            other => ProxyError::UpstreamClosed(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                other.to_string(),
            )),
        }
    }

    /// The retry condition of Envoy's `retry_on` that covers an attempt failed with this
    /// error; `None` when no condition retries it (overflow, protocol errors, the route
    /// timeout).
    pub(crate) fn retry_condition(&self) -> Option<Condition> {
        match self {
            ProxyError::ConnectFailure(_)
            | ProxyError::TlsHandshake(_)
            | ProxyError::ConnectTimeout => Some(Condition::ConnectFailure),
            ProxyError::UpstreamReset(_) if self.refused_stream() => Some(Condition::RefusedStream),
            ProxyError::UpstreamReset(_)
            | ProxyError::UpstreamClosed(_)
            | ProxyError::PerTryTimeout => Some(Condition::Reset),
            _ => None,
        }
    }

    /// Envoy's wording for why the upstream connection ended, where it has one.
    fn reset_reason(&self) -> Option<&'static str> {
        match self {
            ProxyError::ConnectFailure(_)
            | ProxyError::TlsHandshake(_)
            | ProxyError::TransportRefused(_) => Some("remote connection failure"),
            ProxyError::ConnectTimeout => Some("connection timeout"),
            ProxyError::UpstreamReset(_) | ProxyError::UpstreamClosed(_) => {
                Some(match self.remote_reset() {
                    Some(RemoteReset::Refused) => "remote refused stream reset",
                    Some(RemoteReset::Reset) => "remote reset",
                    None => "connection termination",
                })
            }
            ProxyError::UpstreamProtocol(_) => Some("protocol error"),
            ProxyError::Overflow(_) => Some("overflow"),
            _ => None,
        }
    }

    /// The gRPC status this error's local reply carries whatever its HTTP status maps to.
    pub(crate) fn grpc_status(&self) -> Option<u32> {
        match self {
            ProxyError::FaultAbort(AbortError::GrpcStatus(code)) => Some(*code),
            _ => None,
        }
    }

    /// Envoy's response flag when this error ends an opaque TCP connection.
    pub fn tcp_flag(&self) -> &'static str {
        match self {
            // A TCP connection sent to BlackHoleCluster finds no host in it.
            ProxyError::Blocked => "UH",
            // tcp_proxy sets the failure before the retry limit; the router the other way.
            ProxyError::Retried(last)
                if matches!(
                    **last,
                    ProxyError::ConnectFailure(_)
                        | ProxyError::TlsHandshake(_)
                        | ProxyError::ConnectTimeout
                ) =>
            {
                "UF,URX"
            }
            other => other.flag(),
        }
    }

    /// The HTTP response Envoy would send for this error.
    pub fn to_response(&self) -> Response<ProxyBody> {
        if let Some(reason) = self.reset_reason() {
            // Envoy 1.40 keeps a transport failure reason (TLS) for its access log only.
            let body = format!(
                "upstream connect error or disconnect/reset before headers. reset reason: {reason}"
            );
            let mut response = synthetic(StatusCode::SERVICE_UNAVAILABLE, Bytes::from(body));
            if matches!(self, ProxyError::Overflow(_)) {
                // Envoy's router marks every answer it gives for an overflow so.
                response.headers_mut().insert(
                    header::HeaderName::from_static("x-envoy-overloaded"),
                    HeaderValue::from_static("true"),
                );
            }
            return response;
        }
        if let ProxyError::RetryOverflow(last) = self {
            return last.to_response();
        }
        if let ProxyError::Retried(last) = self {
            return match last.reset_reason() {
                Some(reason) => {
                    let body = format!(
                        "upstream connect error or disconnect/reset before headers. retried and the latest reset reason: {reason}"
                    );
                    synthetic(StatusCode::SERVICE_UNAVAILABLE, Bytes::from(body))
                }
                None => last.to_response(),
            };
        }
        if let ProxyError::Direct(d) = self {
            return direct(d);
        }
        if let ProxyError::FaultAbort(error) = *self {
            // Envoy's fault filter answers with its own local reply; one with only a gRPC
            // status is a 200 to a request that is not gRPC.
            let status = match error {
                AbortError::HttpStatus(status) => {
                    StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
                }
                AbortError::GrpcStatus(_) => StatusCode::OK,
            };
            return synthetic(status, Bytes::from_static(b"fault filter abort"));
        }
        let (status, body): (StatusCode, &'static str) = match self {
            ProxyError::NoRoute => (StatusCode::NOT_FOUND, ""),
            ProxyError::NoCluster(_) => (StatusCode::SERVICE_UNAVAILABLE, ""),
            ProxyError::NoHealthyUpstream => {
                (StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream")
            }
            ProxyError::UpstreamTimeout | ProxyError::PerTryTimeout => {
                (StatusCode::GATEWAY_TIMEOUT, "upstream request timeout")
            }
            ProxyError::StreamIdle {
                request_complete: true,
            } => (StatusCode::GATEWAY_TIMEOUT, "stream timeout"),
            ProxyError::StreamIdle {
                request_complete: false,
            } => (StatusCode::REQUEST_TIMEOUT, "stream timeout"),
            ProxyError::RequestTimeout => (StatusCode::REQUEST_TIMEOUT, "request timeout"),
            ProxyError::DnsFailure { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error or disconnect/reset before headers. reset reason: DNS resolution failure",
            ),
            ProxyError::BadRequest(_) => (StatusCode::BAD_REQUEST, "Bad Request"),
            ProxyError::Http10 => (StatusCode::UPGRADE_REQUIRED, "Upgrade Required"),
            ProxyError::MissingHost => (StatusCode::BAD_REQUEST, ""),
            _ => (StatusCode::BAD_GATEWAY, ""),
        };
        let mut response = synthetic(status, Bytes::from_static(body.as_bytes()));
        if self.closes_connection() {
            // Envoy's HTTP/1 codec rejects the connection along with the request; a 408
            // leaves the rest of the request unread, so the connection cannot go on.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// `flags` of a request the fault filter delayed first: Envoy lists its flags in the order
/// they were set, and the delay (`DI`) comes before anything else happens to the request.
pub(crate) fn after_delay(flags: &'static str) -> &'static str {
    match flags {
        "FI" => "DI,FI",
        "DC" => "DI,DC",
        "SI" => "DI,SI",
        "UH" => "DI,UH",
        "UF" => "DI,UF",
        "UC" => "DI,UC",
        "UT" => "DI,UT",
        "UO" => "DI,UO",
        "DF" => "DI,DF",
        "NC" => "DI,NC",
        "UPE" => "DI,UPE",
        "URX" => "DI,URX",
        "URX,UF" => "DI,URX,UF",
        "URX,UC" => "DI,URX,UC",
        "URX,UT" => "DI,URX,UT",
        "UO,UF" => "DI,UO,UF",
        "UO,UC" => "DI,UO,UC",
        "UO,URX,UF" => "DI,UO,URX,UF",
        "UO,URX,UC" => "DI,UO,URX,UC",
        // Nothing else set: the delay alone.
        _ => "DI",
    }
}

/// A route's direct response or redirect.
fn direct(d: &DirectResponse) -> Response<ProxyBody> {
    let status = StatusCode::from_u16(d.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let body = d
        .body
        .as_deref()
        .map(Bytes::copy_from_slice)
        .unwrap_or_default();
    let mut response = synthetic(status, body);
    if let Some(location) = d
        .location
        .as_deref()
        .and_then(|l| HeaderValue::from_str(l).ok())
    {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

/// Envoy's `Grpc::Utility::httpToGrpcStatus`.
pub(crate) fn http_to_grpc(status: u16) -> u32 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// Whether a request's `content-type` makes it gRPC to Envoy's local replies
/// (`application/grpc`, `application/grpc+proto`; not gRPC-Web).
pub(crate) fn is_grpc_content_type(value: &[u8]) -> bool {
    value
        .strip_prefix(b"application/grpc")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(b"+"))
}

/// A local reply to a gRPC request, as Envoy's `sendLocalReply` makes it: trailers-only
/// (HTTP 200, no body) with `grpc-status` (`grpc_status`, else the one the HTTP status
/// maps to) and the body as `grpc-message`, percent-encoded as gRPC encodes it.
pub(crate) fn grpc_local_reply(
    response: Response<ProxyBody>,
    grpc_status: Option<u32>,
) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    let code = grpc_status.unwrap_or_else(|| http_to_grpc(parts.status.as_u16()));
    let message = match &body {
        ProxyBody::Full(Some(bytes)) if !bytes.is_empty() => Some(percent_encode(bytes)),
        _ => None,
    };
    parts.status = StatusCode::OK;
    let headers = &mut parts.headers;
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(code));
    if let Some(message) = message.and_then(|m| HeaderValue::from_str(&m).ok()) {
        headers.insert("grpc-message", message);
    }
    Response::from_parts(parts, ProxyBody::full(Bytes::new()))
}

/// gRPC's `grpc-message` encoding: bytes outside printable ASCII, and `%`, as `%XX`.
fn percent_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A response generated by the proxy itself, shaped as Envoy's local replies.
pub fn synthetic(status: StatusCode, body: Bytes) -> Response<ProxyBody> {
    let len = body.len();
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if len > 0 {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    headers.insert(header::SERVER, HeaderValue::from_static("envoy"));
    response
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    #[test]
    fn grpc_is_application_grpc_and_its_subtypes_not_grpc_web() {
        for (value, grpc) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("application/grpc-web", false),
            ("application/grpc-web+proto", false),
            ("application/json", false),
        ] {
            assert_eq!(is_grpc_content_type(value.as_bytes()), grpc, "{value}");
        }
        assert_eq!(percent_encode(b"50% off\n\xff"), "50%25 off%0A%FF");
    }

    async fn answer(e: &ProxyError) -> (u16, String, String) {
        let response = e.to_response();
        let status = response.status().as_u16();
        let server = response.headers()[header::SERVER]
            .to_str()
            .unwrap()
            .to_string();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, server, String::from_utf8(body.to_vec()).unwrap())
    }

    fn refused() -> ProxyError {
        ProxyError::ConnectFailure(std::io::ErrorKind::ConnectionRefused.into())
    }

    #[tokio::test]
    async fn every_error_answers_as_envoy_does() {
        assert_eq!(
            answer(&ProxyError::Blocked).await,
            (502, "envoy".into(), String::new())
        );
        assert_eq!(ProxyError::Blocked.flag(), "-");
        assert_eq!(ProxyError::Blocked.tcp_flag(), "UH");
        assert_eq!(
            answer(&ProxyError::NoHealthyUpstream).await,
            (503, "envoy".into(), "no healthy upstream".into())
        );
        assert_eq!(ProxyError::NoHealthyUpstream.flag(), "UH");
        let (status, _, body) = answer(&refused()).await;
        assert_eq!(status, 503);
        assert_eq!(
            body,
            "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure"
        );
        assert_eq!(refused().flag(), "UF");
        assert_eq!(ProxyError::ConnectTimeout.flag(), "UF");
        let (status, _, body) = answer(&ProxyError::UpstreamTimeout).await;
        assert_eq!((status, body.as_str()), (504, "upstream request timeout"));
        assert_eq!(ProxyError::UpstreamTimeout.flag(), "UT");
        assert_eq!(answer(&ProxyError::BadRequest("x")).await.0, 400);
        assert_eq!(answer(&ProxyError::Loop).await.0, 502);
        let (status, _, body) = answer(&ProxyError::Http10).await;
        assert_eq!((status, body.as_str()), (426, "Upgrade Required"));
        assert_eq!(ProxyError::Http10.flag(), "DPE");
        // As Envoy 1.40: an empty 400 and the connection closed.
        let response = ProxyError::MissingHost.to_response();
        assert_eq!(response.headers()[header::CONNECTION], "close");
        let (status, _, body) = answer(&ProxyError::MissingHost).await;
        assert_eq!((status, body.as_str()), (400, ""));
        assert_eq!(ProxyError::MissingHost.flag(), "-");
    }

    #[tokio::test]
    async fn stream_and_request_timeouts_answer_as_envoy_1_40_does() {
        // Measured against Envoy 1.40: a complete request without a response in time.
        let idle = ProxyError::StreamIdle {
            request_complete: true,
        };
        assert_eq!(
            answer(&idle).await,
            (504, "envoy".into(), "stream timeout".into())
        );
        assert_eq!(idle.flag(), "SI");
        assert!(
            !idle
                .to_response()
                .headers()
                .contains_key(header::CONNECTION)
        );
        // Part of the request still to come: 408, and the connection closes.
        let partial = ProxyError::StreamIdle {
            request_complete: false,
        };
        assert_eq!(
            answer(&partial).await,
            (408, "envoy".into(), "stream timeout".into())
        );
        assert_eq!(partial.flag(), "SI");
        assert_eq!(partial.to_response().headers()[header::CONNECTION], "close");
        let request = ProxyError::RequestTimeout;
        assert_eq!(
            answer(&request).await,
            (408, "envoy".into(), "request timeout".into())
        );
        assert_eq!(request.flag(), "-");
        assert_eq!(request.to_response().headers()[header::CONNECTION], "close");
    }

    #[tokio::test]
    async fn an_overflow_answers_as_envoys_router_does() {
        let e = ProxyError::Overflow(portcullis_registry::Overflow(
            portcullis_registry::Resource::Requests,
        ));
        assert_eq!((e.flag(), e.tcp_flag()), ("UO", "UO"));
        let response = e.to_response();
        assert_eq!(response.headers()["x-envoy-overloaded"], "true");
        let (status, server, body) = answer(&e).await;
        assert_eq!((status, server.as_str()), (503, "envoy"));
        assert_eq!(
            body,
            "upstream connect error or disconnect/reset before headers. reset reason: overflow"
        );
    }

    #[tokio::test]
    async fn retried_failures_say_so() {
        let e = ProxyError::Retried(Box::new(refused()));
        assert_eq!(e.flag(), "URX,UF");
        let (status, _, body) = answer(&e).await;
        assert_eq!(status, 503);
        assert_eq!(
            body,
            "upstream connect error or disconnect/reset before headers. retried and the latest reset reason: remote connection failure"
        );
        assert_eq!(e.tcp_flag(), "UF,URX");
        let e = ProxyError::RetryOverflow(Box::new(refused()));
        assert_eq!(e.flag(), "UO,UF");
        assert_eq!(answer(&e).await.2, answer(&refused()).await.2);
        let e = ProxyError::Retried(Box::new(ProxyError::NoHealthyUpstream));
        assert_eq!(e.flag(), "UH");
        assert_eq!(answer(&e).await.2, "no healthy upstream");
    }

    #[tokio::test]
    async fn a_failed_tls_handshake_answers_as_a_failed_connect_as_envoy_1_40_does() {
        let e = ProxyError::TlsHandshake("TLS_error:|268435581:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:TLS_error_end".into());
        assert_eq!(e.flag(), "UF");
        // The reason is not in the body (checked against Envoy 1.40).
        assert_eq!(answer(&e).await, answer(&refused()).await);
        let e = ProxyError::Retried(Box::new(e));
        assert_eq!(e.flag(), "URX,UF");
        assert_eq!(e.tcp_flag(), "UF,URX");
        assert_eq!(
            answer(&e).await.2,
            "upstream connect error or disconnect/reset before headers. retried and the latest reset reason: remote connection failure"
        );
    }
}

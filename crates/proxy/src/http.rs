//! HTTP/1.x: route each request by Host (or absolute-form authority) and forward it over a
//! pooled upstream connection, streaming bodies both ways.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use portcullis_audit::Observation;
use portcullis_envoy::{AppendAction, FractionalPercent, HttpFault};
use portcullis_registry::{
    ClusterHeaders, Connection, Decision, HeaderMutation, Headers, Mirror, Protocol,
    Request as RouteRequest, Resource, Route, split_host_port,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Proxy;
use crate::attempt::{Answer, Attempt, Attempts, Failure};
use crate::body::{BodyIdle, BodyTap, Copied, ProxyBody, RequestBody, StreamEnd, UpstreamBody};
use crate::boxed::boxed;
use crate::error::{ProxyError, grpc_local_reply, is_grpc_content_type};
use crate::guard::{Expired, InFlight, InFlightGuard, StreamClock, StreamTimeouts};
use crate::h1;
use crate::h2_client::{self, SendError};
use crate::hash::{HashInput, RequestHash, request_hash};
use crate::log::{HttpLog, LogText, LoggedHeaders};
use crate::metrics::{
    Destination, LastSeries, Measured, Metrics, RequestKey, header_fields, request_head_bytes,
    response_head_bytes,
};
use crate::origin::{Transport, UpstreamIo};
use crate::pool::{Conn, H2Progress, H2Slot, Life};
use crate::streams::Driver;
use crate::upstream::{Acquired, Original, RetryPolicy, Target};

/// The downstream connection a request arrived on.
pub(crate) struct Downstream {
    /// Marks requests in flight for the connection's request-head deadline.
    pub in_flight: Option<Arc<InFlight>>,
    /// `SO_ORIGINAL_DST` for intercepted connections; `None` on the explicit proxy.
    pub original_dst: Option<SocketAddr>,
    /// The client.
    pub peer: SocketAddr,
    /// The connection manager's stream timeouts.
    pub streams: StreamTimeouts,
    /// The series the connection's last request was counted in.
    pub series: LastSeries,
}

/// Serves HTTP/1.x on `io` until the client closes or `shutdown` asks to drain.
pub(crate) async fn serve<I>(
    proxy: Arc<Proxy>,
    downstream: Arc<Downstream>,
    io: I,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let metrics = Arc::clone(&proxy.metrics);
    let mut builder = hyper::server::conn::http1::Builder::new();
    // A head beyond either limit gets hyper's 431 (Envoy's answer too).
    builder
        .max_buf_size(proxy.config.max_request_headers_bytes.max(8192))
        .max_header_size(proxy.config.max_request_headers_bytes)
        .max_headers(proxy.config.max_request_headers);
    let service = service_fn(move |req| {
        let proxy = Arc::clone(&proxy);
        let downstream = Arc::clone(&downstream);
        async move { Ok::<_, Infallible>(handle(proxy, downstream, req).await) }
    });
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                if e.is_parse() || e.is_parse_too_large() {
                    metrics.protocol_error.inc();
                }
                tracing::debug!(error = %e, "downstream HTTP connection ended with an error");
            }
        }
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Serves HTTP/2 with prior knowledge (h2c) on `io`.
pub(crate) async fn serve_h2<I>(
    proxy: Arc<Proxy>,
    downstream: Arc<Downstream>,
    io: I,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let max_header_list = u32::try_from(proxy.config.max_request_headers_bytes).unwrap_or(u32::MAX);
    let service = service_fn(move |req| {
        let proxy = Arc::clone(&proxy);
        let downstream = Arc::clone(&downstream);
        async move { Ok::<_, Infallible>(handle(proxy, downstream, req).await) }
    });
    let mut streams = Driver::default();
    let conn = hyper::server::conn::http2::Builder::new(streams.executor())
        .max_header_list_size(max_header_list)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        result = streams.run(conn.as_mut()) => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "downstream HTTP/2 connection ended with an error");
            }
        }
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = streams.run(conn.as_mut()).await;
        }
    }
    streams.finish().await;
}

// Shared placeholders: a request that never gets routed allocates nothing for them.
static DASH: LazyLock<Arc<str>> = LazyLock::new(|| "-".into());
static UNKNOWN: LazyLock<Arc<str>> = LazyLock::new(|| "unknown".into());

/// What the access log and metrics need once the request is gone.
pub(crate) struct Outcome {
    pub status: u16,
    pub flags: &'static str,
    pub cluster: Arc<str>,
    /// Where the request went, as the metrics label it.
    pub destination: Destination,
    pub upstream: Option<SocketAddr>,
    pub route: &'static str,
    /// The route of the model that matched, whose name the log shows instead of `route`.
    pub matched: Option<Arc<Route>>,
    /// The header changes of the weighted cluster the route chose, if it has any.
    pub cluster_headers: Option<Arc<ClusterHeaders>>,
    /// Whether the route's fault injection delayed the request (`DI` before other flags).
    pub delayed: bool,
    /// The status is the proxy's own answer to an error, not an upstream's.
    pub local_reply: bool,
    /// A gRPC request (`content-type: application/grpc...`).
    pub grpc: bool,
    /// The `grpc-status` of the response's trailers, else of its headers.
    pub grpc_status: Option<u32>,
    /// The request body's size: its `content-length`, as far as it is declared.
    pub request_bytes: u64,
    /// Response body bytes sent to the client.
    pub response_bytes: u64,
    /// The request head's size as Envoy's header map gives it, which Istio's request size
    /// counts besides the body.
    pub request_head_bytes: u64,
    /// The response head's and trailers' sizes, as Envoy's header maps give them.
    pub response_head_bytes: u64,
}

impl Default for Outcome {
    fn default() -> Self {
        Outcome {
            status: 0,
            flags: "-",
            cluster: Arc::clone(&DASH),
            destination: Destination::named(Arc::clone(&UNKNOWN)),
            upstream: None,
            route: "-",
            matched: None,
            cluster_headers: None,
            delayed: false,
            local_reply: false,
            grpc: false,
            grpc_status: None,
            request_bytes: 0,
            response_bytes: 0,
            request_head_bytes: 0,
            response_head_bytes: 0,
        }
    }
}

/// The request as the access log line shows it; captured only when access logs are on.
pub(crate) struct LogLine {
    pub method: Method,
    pub path: LogText,
    pub protocol: &'static str,
    pub authority: LogText,
    pub headers: LoggedHeaders,
}

impl LogLine {
    /// Whether access log lines are wanted at all: nothing is captured otherwise.
    pub fn wanted(proxy: &Proxy) -> bool {
        proxy.config.access_log.enabled()
    }

    fn of(req: &Request<Incoming>) -> LogLine {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or("-");
        LogLine {
            method: req.method().clone(),
            path: LogText::from(
                req.uri()
                    .path_and_query()
                    .map_or("/", PathAndQuery::as_str)
                    .to_owned(),
            ),
            protocol: version_str(req.version()),
            authority: LogText::from(authority.to_owned()),
            headers: {
                let get = |name: &HeaderName| {
                    req.headers()
                        .get(name)
                        .map(|v| LogText::Shared(bytes::Bytes::copy_from_slice(v.as_bytes())))
                };
                LoggedHeaders {
                    user_agent: get(&header::USER_AGENT),
                    request_id: get(&REQUEST_ID_NAME),
                    forwarded_for: get(&FORWARDED_FOR),
                }
            },
        }
    }
}

/// One request's log record. It is written when the stream ends: with a local reply or a
/// response without a body, when the response is ready; else when its body ends (see
/// `ProxyBody`). If the client goes away first, the record is written on drop with Envoy's
/// `DC` (downstream connection termination).
pub(crate) struct RequestLog {
    proxy: Arc<Proxy>,
    downstream: Arc<Downstream>,
    line: Option<LogLine>,
    pub start: Instant,
    pub outcome: Outcome,
    written: bool,
}

impl RequestLog {
    /// A record for a request that started at `start`.
    pub fn new(
        proxy: &Arc<Proxy>,
        downstream: &Arc<Downstream>,
        line: Option<LogLine>,
        start: Instant,
    ) -> Self {
        RequestLog {
            proxy: Arc::clone(proxy),
            downstream: Arc::clone(downstream),
            line,
            start,
            outcome: Outcome::default(),
            written: false,
        }
    }

    /// The proxy's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.proxy.metrics
    }

    /// The series the connection's last request was counted in.
    pub fn series(&self) -> &LastSeries {
        &self.downstream.series
    }

    /// Gives the request an `x-request-id` when the client sent none, where Envoy's
    /// connection manager does (past the checks of the head, before routing): the upstream,
    /// and this record's line whatever the answer, get that one id.
    pub fn identify(&mut self, headers: &mut HeaderMap) {
        if headers.contains_key(&REQUEST_ID_NAME) {
            return;
        }
        let id = request_id();
        if let Some(line) = &mut self.line {
            line.headers.request_id = Some(LogText::Id(id));
        }
        if let Some(id) = request_id_value(&id) {
            headers.insert(REQUEST_ID_NAME, id);
        }
    }

    /// The request goes to another handler, which logs and counts it: this record is
    /// dropped unwritten, so the request is not logged twice.
    pub fn hand_over(mut self) {
        self.written = true;
    }

    /// Counts the request and writes its access log line, with `status` as answered;
    /// returns when the request ended, for whatever else the caller times from it.
    pub fn write(&mut self) -> Instant {
        self.write_ended(Instant::now())
    }

    /// [`RequestLog::write`] for a request that ended at `end`, a time the caller has.
    pub fn write_ended(&mut self, end: Instant) -> Instant {
        self.written = true;
        let outcome = &self.outcome;
        let duration = end.saturating_duration_since(self.start);
        let flags = if outcome.delayed {
            crate::error::after_delay(outcome.flags)
        } else {
            outcome.flags
        };
        let metrics = &self.proxy.metrics;
        let key = RequestKey {
            destination: outcome.destination.clone(),
            grpc: outcome.grpc,
            status: outcome.status,
            grpc_status: outcome.grpc_status,
            flags,
        };
        metrics.record_request(
            &self.downstream.series,
            key,
            Measured {
                duration,
                request_bytes: outcome.request_head_bytes + outcome.request_bytes,
                response_bytes: outcome.response_head_bytes + outcome.response_bytes,
            },
        );
        // Envoy's router charges the endpoint's cluster with the code of an upstream's
        // answer, also one whose body was then cut (`UC`, `DC`), and with the 503 it answers
        // for an upstream that ended the stream first (`UC`, `UR`).
        let answered_upstream = outcome.upstream.is_some()
            && outcome.status != 0
            && matches!(flags, "-" | "UC" | "UR" | "DC");
        if answered_upstream {
            metrics.count_upstream_response(
                &self.downstream.series,
                &outcome.cluster,
                outcome.status,
            );
        }
        let Some(line) = &self.line else {
            return end;
        };
        let route = outcome.matched.as_ref().map_or(outcome.route, |r| &r.name);
        HttpLog {
            method: line.method.as_str(),
            path: line.path.bytes(),
            protocol: line.protocol,
            authority: line.authority.bytes(),
            headers: &line.headers,
            status: outcome.status,
            flags,
            details: if answered_upstream && !outcome.local_reply {
                Some("via_upstream")
            } else if route == "block_all" {
                Some("direct_response")
            } else {
                None
            },
            cluster: &outcome.cluster,
            upstream: outcome.upstream,
            route,
            original_dst: self.downstream.original_dst,
            downstream: self.downstream.peer,
            received: outcome.request_bytes,
            sent: outcome.response_bytes,
            duration,
            ended: end,
        }
        .emit(&self.proxy.config.access_log);
        end
    }
}

impl Drop for RequestLog {
    /// The client went away first: before the response (status 0), or while its body
    /// streamed (the status it had).
    fn drop(&mut self) {
        if !self.written {
            self.outcome.flags = "DC";
            self.write();
        }
    }
}

async fn handle(
    proxy: Arc<Proxy>,
    downstream: Arc<Downstream>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let _in_flight = downstream.in_flight.as_ref().map(InFlight::start);
    let line = LogLine::wanted(&proxy).then(|| LogLine::of(&req));
    let mut log = RequestLog::new(&proxy, &downstream, line, Instant::now());
    log.outcome.grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    log.outcome.request_bytes = req.body().size_hint().exact().unwrap_or(0);
    log.outcome.request_head_bytes = {
        let uri = req.uri();
        let host = req.headers().get(header::HOST);
        let authority = uri
            .authority()
            .map(|a| a.as_str().len())
            .or(host.map(HeaderValue::len))
            .unwrap_or(0);
        let host_field = host.map_or(0, |h| "host".len() + h.len());
        request_head_bytes(
            req.method().as_str().len(),
            uri.path_and_query().map_or(1, |p| p.as_str().len()),
            authority,
            header_fields(req.headers()) - host_field,
        )
    };
    let start = log.start;
    let version = req.version();
    let with_body = !req.body().is_end_stream();
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| is_grpc_content_type(v.as_bytes()));
    let streams = downstream.streams;
    let timed = streams.idle.is_some() || (with_body && streams.request.is_some());
    let forwarded = if timed {
        // The body's frames move the clock as the upstream connection sends them.
        let clock = Arc::new(StreamClock::new(!with_body));
        let timed = Some(Arc::clone(&clock));
        let forwarding = route_and_forward(&proxy, &downstream, req, timed, start, &mut log);
        tokio::select! {
            forwarded = forwarding => forwarded,
            why = clock.expired(streams) => Err(match why {
                Expired::Request => ProxyError::RequestTimeout,
                _ => ProxyError::StreamIdle { request_complete: clock.received() },
            }),
        }
    } else {
        route_and_forward(&proxy, &downstream, req, None, start, &mut log).await
    };
    let response = match forwarded {
        Ok(response) => response,
        Err(err) => {
            log.outcome.flags = err.flag();
            log.outcome.local_reply = true;
            proxy.metrics.count_error(&err);
            local_reply(&err, version, with_body, grpc)
        }
    };
    log.outcome.status = response.status().as_u16();
    log.outcome.response_head_bytes = response_head_bytes(header_fields(response.headers()));
    if log.outcome.grpc {
        log.outcome.grpc_status = grpc_status(response.headers());
    }
    let mut response = response;
    match response.body_mut() {
        // Logged when the body ends, as Envoy logs at the end of the stream.
        ProxyBody::Upstream { body, end, .. } if !body.is_end_stream() => {
            let idle = streams
                .idle
                .map(|timeout| BodyIdle::new(timeout, Arc::clone(&proxy.metrics)));
            *end = Some(StreamEnd::new(idle, log));
        }
        body => {
            log.outcome.response_bytes = body.size_hint().exact().unwrap_or(0);
            log.write();
        }
    }
    response
}

/// The `grpc-status` of a response head or trailers.
pub(crate) fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get(&GRPC_STATUS)?.to_str().ok()?.parse().ok()
}

/// The response Envoy sends for `err` on a downstream speaking `version`, to a request
/// that had a body (`with_body`) and was gRPC (`grpc`).
fn local_reply(
    err: &ProxyError,
    version: Version,
    with_body: bool,
    grpc: bool,
) -> Response<ProxyBody> {
    let mut response = err.to_response();
    if grpc {
        response = grpc_local_reply(response, err.grpc_status());
    }
    if version == Version::HTTP_2 {
        // Envoy's HTTP/2 codec sends an empty local reply as headers alone.
        if response.body().is_end_stream() {
            response.headers_mut().remove(header::CONTENT_LENGTH);
        }
        // HTTP/2 has no connection-level header: the stream alone ends.
        response.headers_mut().remove(header::CONNECTION);
    } else if with_body && err.before_upstream() {
        // Answered with the body unread: Envoy's HTTP/1 codec cannot find the next request,
        // so it closes the connection.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

pub(crate) fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// The authority a request is for: the absolute-form URI's, else the single Host header.
fn authority(req: &Request<Incoming>) -> Result<Option<String>, ProxyError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("multiple Host headers"));
    }
    if let Some(a) = req.uri().authority() {
        // HTTP/2 carries both :authority and possibly Host; two names for one request is
        // how a Host check gets bypassed, so they must agree (RFC 9113 8.3.1). In HTTP/1.1
        // absolute-form the URI wins and Host is rewritten to match (RFC 9112 3.2.2).
        if req.version() == Version::HTTP_2
            && let Some(h) = host
            && !h.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes())
        {
            return Err(ProxyError::BadRequest(":authority and host differ"));
        }
        return Ok(Some(a.as_str().to_string()));
    }
    match host {
        None => Ok(None),
        Some(h) => h
            .to_str()
            .map(|s| Some(s.to_string()))
            .map_err(|_| ProxyError::BadRequest("invalid Host header")),
    }
}

fn route_name(decision: &Decision) -> &'static str {
    match decision {
        Decision::BlackHole => "block_all",
        Decision::Passthrough => "allow_any",
        Decision::Cluster(_) => "default",
        Decision::Direct(_)
        | Decision::NoRoute
        | Decision::NoCluster(_)
        | Decision::NoFilterChain => "-",
    }
}

/// What route matching reads of a request besides its authority.
pub(crate) struct RouteInput<'a> {
    /// `:path`, with the query.
    pub path: &'a str,
    /// `:method`.
    pub method: &'a str,
    /// The headers.
    pub headers: &'a dyn Headers,
    /// The protocol the HTTP inspector would name: `http/1.1` or `h2c`.
    pub sniffed: &'static [&'static str],
}

/// A request's headers in hyper's map, as route matching reads them.
pub(crate) struct MapHeaders<'a>(pub &'a HeaderMap);

impl Headers for MapHeaders<'_> {
    fn get(&self, name: &str) -> Option<Cow<'_, str>> {
        let mut values = self.0.get_all(name).iter().filter_map(|v| v.to_str().ok());
        let first = values.next()?;
        match values.next() {
            None => Some(Cow::Borrowed(first)),
            Some(second) => {
                let mut joined = format!("{first},{second}");
                for v in values {
                    joined.push(',');
                    joined.push_str(v);
                }
                Some(Cow::Owned(joined))
            }
        }
    }
}

/// What the HTTP inspector names an HTTP/1 connection.
pub(crate) const SNIFFED_HTTP1: &[&str] = &["http/1.1"];
/// What the HTTP inspector names an HTTP/2 prior-knowledge connection.
const SNIFFED_H2C: &[&str] = &["h2c"];

/// Where a request goes: the registry's decision and the destination the client meant.
pub(crate) struct Routed<'a> {
    pub decision: Decision,
    pub original: Original<'a>,
}

/// Routes a request for `authority` (absolute-form URI or Host) with the registry current
/// now, and records the route in `outcome`.
pub(crate) async fn route<'a>(
    proxy: &Proxy,
    downstream: &Downstream,
    authority: Option<&'a str>,
    connect: bool,
    input: &RouteInput<'_>,
    outcome: &mut Outcome,
) -> Result<Routed<'a>, ProxyError> {
    let parsed = authority.map(split_host_port);
    let (host, host_port) = match parsed {
        Some(Ok((h, p))) => (Some(h), p),
        Some(Err(_)) => return Err(ProxyError::BadRequest("invalid authority")),
        None => (None, None),
    };
    let port = match (downstream.original_dst, host_port) {
        (Some(dst), _) => dst.port(),
        (None, Some(p)) => p,
        (None, None) if connect => {
            return Err(ProxyError::BadRequest("CONNECT needs host:port"));
        }
        (None, None) => 80,
    };
    // Each request routes with the registry current when it starts (as Envoy applies
    // route and membership updates to new requests on open connections); a request in
    // flight keeps the version, and the endpoints, it started with.
    let snapshot = &proxy.registry.load_full();
    let decision = match (connect, host) {
        // A CONNECT target: a registered name, a VIP or pod, or an address in a registered
        // range when the target is an IP literal.
        (true, Some(h)) => snapshot.route_name_or_address(Some(h), h.parse().ok(), port),
        (false, Some(_)) => {
            let conn = Connection {
                destination: downstream.original_dst.map(|d| d.ip()),
                port,
                application_protocols: input.sniffed,
                source: Some(downstream.peer.ip()),
                ..Connection::default()
            };
            let request = RouteRequest {
                authority: authority.unwrap_or_default(),
                path: input.path,
                method: input.method,
                scheme: "http",
                headers: input.headers,
            };
            let routed = match (downstream.original_dst, host) {
                (None, Some(h)) => snapshot.route_explicit(h, &conn, &request),
                _ => snapshot.route_request(&conn, &request),
            };
            outcome.matched = routed.route;
            outcome.cluster_headers = routed.cluster_headers;
            routed.decision
        }
        // No authority at all: nothing to match a registered name against.
        (_, None) => match downstream.original_dst {
            Some(_) => snapshot.unmatched(),
            None => Decision::BlackHole,
        },
    };
    let decision = match downstream.original_dst {
        Some(dst) => proxy.confine_none(snapshot, decision, dst, host).await,
        None => decision,
    };
    // istiod's REGISTRY_ONLY catch-all is a route answering 502 itself: as much a refusal
    // of the registry as BlackHoleCluster.
    let refusal = matches!(&decision, Decision::Direct(_))
        && outcome
            .matched
            .as_ref()
            .is_some_and(|r| &*r.name == "block_all");
    let seen = Observation {
        host,
        destination: downstream.original_dst,
        port,
        protocol: if connect {
            portcullis_audit::Protocol::Connect
        } else {
            portcullis_audit::Protocol::Http
        },
        listener: if downstream.original_dst.is_some() {
            crate::VIRTUAL_OUTBOUND
        } else {
            "http_proxy"
        },
    };
    let refused = refusal || matches!(decision, Decision::BlackHole);
    let decision = if refused {
        match proxy.gate(snapshot, Decision::BlackHole, seen) {
            // Enforced: istiod's route answers as it would have.
            Decision::BlackHole if refusal => decision,
            gated => gated,
        }
    } else {
        decision
    };
    // A destination the route's cluster may not reach is refused as unregistered traffic:
    // logged as the policy's route, not the one that matched; a refusal forwarded in audit
    // mode is logged as ALLOW_ANY's.
    if refused && !matches!(decision, Decision::Direct(_)) {
        outcome.matched = None;
        outcome.cluster_headers = None;
    }
    outcome.route = route_name(&decision);
    // Istio's telemetry names the service of its catch-all routes by their clusters, also
    // for block_all's direct response, which has no upstream cluster.
    let catch_all = match outcome.matched.as_ref().map(|r| &*r.name) {
        Some("block_all") => Some(portcullis_registry::BLACKHOLE_CLUSTER),
        Some("allow_any") => Some(portcullis_registry::PASSTHROUGH_CLUSTER),
        _ => None,
    };
    outcome.destination = match (&decision, catch_all) {
        (_, Some(cluster)) => Destination::named(cluster.into()),
        (Decision::Cluster(c), None) => Destination::of_cluster(c),
        (other, None) => Destination::named(other.cluster_name().into()),
    };
    // A direct response (block_all's among them) and a refusal have no upstream cluster:
    // Envoy logs none.
    outcome.cluster = match &decision {
        Decision::Cluster(c) => Arc::clone(&c.name),
        Decision::BlackHole => Outcome::default().cluster,
        other => other.cluster_name().into(),
    };
    let original = match (downstream.original_dst, host) {
        (Some(dst), _) => Original::Address(dst),
        (None, Some(h)) => Original::Name(h, port),
        (None, None) => return Err(ProxyError::Blocked),
    };
    Ok(Routed { decision, original })
}

async fn route_and_forward(
    proxy: &Arc<Proxy>,
    downstream: &Downstream,
    mut req: Request<Incoming>,
    // The stream's timeouts, which the request body's frames move as they are sent.
    clock: Option<Arc<StreamClock>>,
    start: Instant,
    log: &mut RequestLog,
) -> Result<Response<ProxyBody>, ProxyError> {
    let authority = authority(&req)?;
    // As Envoy's HTTP/1 codec: HTTP/1.0 is refused unless accepted, and an HTTP/1.x request
    // needs a Host to be routed on, never forwarded without one.
    if req.version() == Version::HTTP_10 && !proxy.config.accept_http10 {
        return Err(ProxyError::Http10);
    }
    if matches!(req.version(), Version::HTTP_10 | Version::HTTP_11) && authority.is_none() {
        return Err(ProxyError::MissingHost);
    }
    let explicit = downstream.original_dst.is_none();
    if req
        .uri()
        .scheme()
        .is_some_and(|s| *s != http::uri::Scheme::HTTP)
    {
        // The proxy does not originate TLS: clients reach https:// origins with CONNECT.
        return Err(ProxyError::BadRequest(
            "absolute-form must be http://; use CONNECT",
        ));
    }
    log.identify(req.headers_mut());
    let outcome = &mut log.outcome;
    let connect = req.method() == Method::CONNECT;
    let input = RouteInput {
        path: input_path(&req),
        method: req.method().as_str(),
        headers: &MapHeaders(req.headers()),
        sniffed: if req.version() == Version::HTTP_2 {
            SNIFFED_H2C
        } else {
            SNIFFED_HTTP1
        },
    };
    let Routed { decision, original } = route(
        proxy,
        downstream,
        authority.as_deref(),
        connect,
        &input,
        outcome,
    )
    .await?;
    if let Some(route) = outcome.matched.clone()
        && let Some(fault) = &route.fault
    {
        inject_fault(proxy, fault, outcome).await?;
    }
    if req.method() == Method::CONNECT {
        let (response, upstream) = boxed(|| {
            crate::tunnel::open(
                proxy,
                downstream,
                &decision,
                original,
                req,
                &outcome.cluster,
            )
        })
        .await?;
        outcome.upstream = Some(upstream);
        return Ok(response);
    }
    let downstream_version = req.version();
    let h2 = upstream_h2(&decision, downstream_version);
    let matched = outcome.matched.clone();
    let matched = matched.as_deref();
    let timeout = route_timeout(matched, proxy.config.route_timeout);
    if let Some(path) = matched.and_then(|r| r.rewrite_path(input_path(&req)))
        && let Ok(path) = PathAndQuery::try_from(path)
    {
        // Envoy's router keeps the path it rewrote in `x-envoy-original-path`.
        if let Ok(original) = HeaderValue::from_str(input_path(&req)) {
            req.headers_mut().insert(ORIGINAL_PATH, original);
        }
        let mut parts = req.uri().clone().into_parts();
        parts.path_and_query = Some(path);
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
    let host_rewrite = matched
        .and_then(|r| r.forward())
        .and_then(|f| f.host_rewrite_literal.as_deref());
    // Envoy keeps the authority it rewrote in `x-envoy-original-host`.
    if host_rewrite.is_some()
        && let Some(original) = authority
            .as_deref()
            .and_then(|a| HeaderValue::from_str(a).ok())
    {
        req.headers_mut().insert(ORIGINAL_HOST, original);
    }
    let hashed = consistent_hash(&decision, matched, downstream, &req);
    // An HTTP/1.1 upgrade (WebSocket): both sides switch protocols after a 101.
    let client_upgrade = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
    prepare_request(
        &mut req,
        (
            host_rewrite.or(authority.as_deref()),
            host_rewrite.is_some(),
        ),
        explicit,
        h2,
        client_upgrade.is_some(),
        timeout,
    );
    // Envoy applies a weighted cluster's changes before its route's.
    if let Some(cluster) = &outcome.cluster_headers {
        mutate_headers(req.headers_mut(), &cluster.request);
    }
    if let Some(route) = matched {
        mutate_headers(req.headers_mut(), route.request_headers());
    }
    let policy = crate::upstream::retry_policy(matched);
    let upgrade = client_upgrade.is_some();
    let bodiless = req.body().is_end_stream();
    // Where the policy resends after a reset or for a status, or the request goes to an
    // HTTP/2 upstream (which may refuse its stream: resent once whatever the policy, see
    // `Attempts::failed`), or the route mirrors, the request may go again: its head is
    // kept, and its body copied up to Envoy's buffer limit as it streams.
    let resends = policy.reset || h2 || policy.retries_statuses();
    let mirrors: Vec<&Mirror> = matched.map_or_else(Vec::new, |r| {
        r.mirrors()
            .iter()
            .filter(|m| m.fraction.is_none_or(sampled))
            .collect()
    });
    let head = ((resends || !mirrors.is_empty()) && !upgrade).then(|| {
        Arc::new((
            req.method().clone(),
            req.uri().clone(),
            req.version(),
            req.headers().clone(),
        ))
    });
    let mut req = match clock {
        Some(clock) => req.map(|body| RequestBody::Timed(body, clock)),
        None => req.map(RequestBody::Client),
    };
    let copy = (head.is_some() && !bodiless).then(|| {
        let (tap, copy) = BodyTap::new(request_buffer_limit(matched));
        req = std::mem::replace(&mut req, Request::new(RequestBody::Empty))
            .map(|body| RequestBody::Copying(Box::new(body), Box::new(tap)));
        copy
    });
    for mirror in mirrors {
        if let (Some(head), Decision::Cluster(_)) = (&head, &mirror.decision) {
            let body = copy.clone();
            let proxy = Arc::clone(proxy);
            let (decision, head) = (mirror.decision.clone(), Arc::clone(head));
            let h2 = upstream_h2(&decision, downstream_version);
            tokio::spawn(async move { mirrored(&proxy, decision, head, body, h2).await });
        }
    }
    // The request made again from its kept head: with the whole body from its copy, or
    // with the rest of a body an attempt cut short (`rest`) after what was copied of it.
    let remake = |rest: Option<RequestBody>| {
        if !resends {
            return None;
        }
        let (method, uri, version, headers) = head.as_deref()?;
        let body = match &copy {
            None => RequestBody::Empty,
            Some(copy) => {
                let copied = copy.borrow().clone();
                match (copied, rest) {
                    (Some(Copied::Whole(bytes)), _) => RequestBody::Replay(Some(bytes)),
                    (None, Some(rest)) => rest.resumed()?,
                    _ => return None,
                }
            }
        };
        let mut again = Request::new(body);
        *again.method_mut() = method.clone();
        *again.uri_mut() = uri.clone();
        *again.version_mut() = *version;
        *again.headers_mut() = headers.clone();
        Some(again)
    };
    let mut attempts = Attempts::new(
        proxy,
        (&decision, original),
        &outcome.cluster,
        policy,
        Some(Resource::Requests),
    )
    .with_timeout(timeout)
    .with_hash(hashed.hash);
    loop {
        let Attempt { number, pick } = attempts.start().await?;
        outcome.upstream = Some(pick.addr);
        outcome.destination.reached(pick.index);
        req.headers_mut().insert(
            ATTEMPT_COUNT_NAME,
            decimal(u64::try_from(number).unwrap_or(u64::MAX)),
        );
        let transport = Transport::new(pick.addr, pick.tls.as_ref(), upstream_authority(&req));
        let target = attempts.target(&pick, &transport);
        let sending = async {
            if h2 {
                send_h2(proxy, target, req).await
            } else {
                send_h1(proxy, target, req).await
            }
        };
        let (mut response, pooled) = match attempts.send(sending).await {
            Ok(sent) => sent,
            Err(Failed(failure, left)) => {
                let again = match left {
                    Left::Unsent(unsent) => Some(*unsent),
                    Left::Rest(rest) => remake(Some(rest)),
                    Left::Nothing => remake(None),
                };
                req = attempts.failed(failure, again)?;
                continue;
            }
        };
        proxy
            .metrics
            .count_upstream_request(Some(&downstream.series), &outcome.cluster);
        let grpc_status = grpc_status(response.headers());
        let head = (
            response.status().as_u16(),
            &MapHeaders(response.headers()) as &dyn Headers,
        );
        match attempts.answered(head, grpc_status, || remake(None)) {
            // The response and its connection are dropped, never reused with a body left
            // unread; the request goes again as Envoy's router does.
            Answer::Retry(next) => {
                drop((response, pooled, pick));
                req = next;
                continue;
            }
            Answer::Deliver(flag) => {
                if let Some(flag) = flag {
                    outcome.flags = flag;
                }
            }
        }
        let guard = pick.guard;
        let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        let response = match (client_upgrade, switching) {
            (Some(client), true) => {
                let upstream = hyper::upgrade::on(&mut response);
                // The upgraded stream is a request in flight for as long as it lives: no
                // request-head deadline applies to its bytes.
                let held = (
                    guard,
                    pooled,
                    downstream.in_flight.as_ref().map(InFlight::start),
                );
                tokio::spawn(relay_upgraded(client, upstream, held));
                upgraded_response(response, downstream_version, start)
            }
            _ => prepare_response(response, pooled, guard, downstream_version, start),
        };
        let mut response = response;
        if let Some(cluster) = &outcome.cluster_headers {
            mutate_headers(response.headers_mut(), &cluster.response);
        }
        if let Some(route) = matched {
            mutate_headers(response.headers_mut(), route.response_headers());
        }
        if let Some(cookie) = hashed.set_cookie {
            response.headers_mut().append(header::SET_COOKIE, cookie);
        }
        return Ok(response);
    }
}

/// Envoy's fault filter on a route: the delay, then the abort, each for its share of
/// requests.
async fn inject_fault(
    proxy: &Proxy,
    fault: &HttpFault,
    outcome: &mut Outcome,
) -> Result<(), ProxyError> {
    if let Some(delay) = &fault.delay
        && sampled(delay.percentage)
    {
        outcome.delayed = true;
        proxy.metrics.fault_delays.inc();
        tokio::time::sleep(delay.fixed_delay).await;
    }
    if let Some(abort) = &fault.abort
        && sampled(abort.percentage)
    {
        proxy.metrics.fault_aborts.inc();
        return Err(ProxyError::FaultAbort(abort.error));
    }
    Ok(())
}

/// The request head a retry or a mirror sends again.
type Head = (Method, Uri, Version, HeaderMap);

/// Envoy's default buffer limit of a connection, which bounds the copy of a request body
/// kept for retries and mirrors (`per_request_buffer_limit_bytes`) when the route sets none.
const REQUEST_BUFFER_LIMIT: usize = 1 << 20;

/// How much of a request body is kept for retries and mirrors: the route's limit, Envoy's
/// deprecated `per_request_buffer_limit_bytes` within the connection's.
fn request_buffer_limit(route: Option<&Route>) -> usize {
    route
        .and_then(|r| r.request_buffer_limit)
        .map_or(REQUEST_BUFFER_LIMIT, |limit| {
            let connection = REQUEST_BUFFER_LIMIT as u64;
            usize::try_from(limit.bytes(connection)).unwrap_or(usize::MAX)
        })
}

/// Sends a copy of a request to a mirror `decision`, as Envoy's shadowing does: the
/// authority gets `-shadow` (before its port), the body is the copy (none when it was lost),
/// no retries, over HTTP/2 when `h2`; the response is dropped and nothing is logged.
async fn mirrored(
    proxy: &Arc<Proxy>,
    decision: Decision,
    head: Arc<Head>,
    body: Option<tokio::sync::watch::Receiver<Option<Copied>>>,
    h2: bool,
) {
    let body = match body {
        None => RequestBody::Empty,
        Some(mut copy) => match copy.wait_for(Option::is_some).await.as_deref() {
            Ok(Some(Copied::Whole(bytes))) => RequestBody::Replay(Some(bytes.clone())),
            _ => {
                tracing::debug!("request body not copied whole; no mirror sent");
                return;
            }
        },
    };
    let (method, uri, _, headers) = &*head;
    let mut req = Request::new(body);
    *req.method_mut() = method.clone();
    *req.version_mut() = if h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    *req.headers_mut() = headers.clone();
    let shadow = |authority: &str| {
        let shadowed = match split_host_port(authority) {
            Ok((host, Some(port))) => format!("{host}-shadow:{port}"),
            _ => format!("{authority}-shadow"),
        };
        HeaderValue::from_str(&shadowed).ok()
    };
    if let Some(host) = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(shadow)
    {
        req.headers_mut().insert(header::HOST, host);
    }
    let mut parts = uri.clone().into_parts();
    if let Some(authority) = parts
        .authority
        .as_ref()
        .and_then(|a| shadow(a.as_str()))
        .and_then(|a| a.to_str().ok()?.parse().ok())
    {
        parts.authority = Some(authority);
    }
    *req.uri_mut() = Uri::from_parts(parts).unwrap_or_else(|_| uri.clone());
    let Decision::Cluster(cluster) = &decision else {
        return;
    };
    let name = Arc::clone(&cluster.name);
    let original = Original::Name("", 0);
    let mut attempts = Attempts::new(
        proxy,
        (&decision, original),
        &name,
        RetryPolicy::NONE,
        Some(Resource::Requests),
    );
    let Ok(Attempt { pick, .. }) = attempts.start().await else {
        return;
    };
    let transport = Transport::new(pick.addr, pick.tls.as_ref(), upstream_authority(&req));
    let target = attempts.target(&pick, &transport);
    let sent = if h2 {
        send_h2(proxy, target, req).await
    } else {
        send_h1(proxy, target, req).await
    };
    proxy.metrics.count_upstream_request(None, &name);
    if let Ok((response, pooled)) = sent {
        // Read to its end, so that the connection can serve again.
        let body = prepare_response(
            response,
            pooled,
            pick.guard,
            Version::HTTP_11,
            Instant::now(),
        );
        let _ = http_body_util::BodyExt::collect(body.into_body()).await;
    }
}

/// Whether this request falls in the share `p`, drawn as Envoy's fault filter does.
fn sampled(p: FractionalPercent) -> bool {
    p.numerator > 0 && fastrand::u32(0..p.denominator.value()) < p.numerator
}

/// The request's hash under the route's hash policy, when the cluster balances by one.
fn consistent_hash<B>(
    decision: &Decision,
    route: Option<&Route>,
    downstream: &Downstream,
    req: &Request<B>,
) -> RequestHash {
    let policies = route
        .and_then(|r| r.forward())
        .map_or(&[][..], |f| &f.hash_policy[..]);
    match decision {
        Decision::Cluster(c)
            if !policies.is_empty() && c.balancer.policy().is_consistent_hash() =>
        {
            request_hash(
                policies,
                &HashInput {
                    headers: req.headers(),
                    path: input_path(req),
                    peer: downstream.peer,
                    local: downstream.original_dst,
                },
            )
        }
        _ => RequestHash::default(),
    }
}

/// The path and query of a request, as routing saw it.
fn input_path<B>(req: &Request<B>) -> &str {
    req.uri().path_and_query().map_or("/", |p| p.as_str())
}

/// The route timeout: the matched route's when it sets one, else the proxy's own. Istio
/// writes `0s` (none) on every route without a VirtualService timeout, so zero leaves the
/// proxy's setting in force, which is none unless the operator configured one.
pub(crate) fn route_timeout(route: Option<&Route>, default: Option<Duration>) -> Option<Duration> {
    match route.and_then(|r| r.forward()).and_then(|f| f.timeout) {
        Some(t) if !t.is_zero() => Some(t),
        _ => default,
    }
}

/// Applies a route's header changes in order; names or values HTTP cannot carry, and the
/// Host, which only a host rewrite changes, are skipped as Envoy rejects them.
fn mutate_headers(headers: &mut HeaderMap, mutations: &[HeaderMutation]) {
    for m in mutations {
        match m {
            HeaderMutation::Remove(name) => {
                if let Ok(name) = HeaderName::try_from(name.as_str())
                    && name != header::HOST
                {
                    headers.remove(name);
                }
            }
            HeaderMutation::Add(h) => {
                let (Ok(name), Ok(value)) = (
                    HeaderName::try_from(h.name.as_str()),
                    HeaderValue::try_from(h.value.as_str()),
                ) else {
                    continue;
                };
                if name == header::HOST {
                    continue;
                }
                match h.append {
                    AppendAction::AppendIfExistsOrAdd => {
                        headers.append(name, value);
                    }
                    AppendAction::AddIfAbsent => {
                        headers.entry(name).or_insert(value);
                    }
                    AppendAction::OverwriteIfExistsOrAdd => {
                        headers.insert(name, value);
                    }
                    AppendAction::OverwriteIfExists => {
                        if headers.contains_key(&name) {
                            headers.insert(name, value);
                        }
                    }
                }
            }
        }
    }
}

/// A failed attempt, and what it leaves to send again.
struct Failed(Failure, Left);

/// What a failed attempt leaves of its request.
enum Left {
    /// Nothing: the request goes again from its kept head and body copy, if at all.
    Nothing,
    /// The request itself, which never left: it can go again as it is.
    Unsent(Box<Request<RequestBody>>),
    /// The part of its body the upstream did not take before it ended the stream (see
    /// `RequestBody::resumed`).
    Rest(RequestBody),
}

impl From<Failure> for Failed {
    fn from(failure: Failure) -> Self {
        Failed(failure, Left::Nothing)
    }
}

type Sent = (Response<UpstreamBody>, Option<crate::pool::Pooled>);

// A new upstream connection is rare next to a pooled one; its connect and handshake are
// boxed where they start so that their futures do not size every request's, which is
// copied whole as a task is spawned and polled.
/// Connects for `target` and makes it an HTTP/1.1 client connection.
async fn open_h1(
    proxy: &Proxy,
    target: &Target<'_>,
) -> Result<
    (
        hyper::client::conn::http1::SendRequest<RequestBody>,
        hyper::client::conn::http1::Connection<TokioIo<UpstreamIo>, RequestBody>,
    ),
    ProxyError,
> {
    let stream = proxy.connect_upstream(target).await?;
    hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ProxyError::UpstreamReset(e.into()))
}

/// Connects for `target` and makes it an HTTP/2 client connection.
async fn open_h2(
    proxy: &Proxy,
    target: &Target<'_>,
) -> Result<(h2_client::Sender, h2::client::Connection<UpstreamIo, Bytes>), ProxyError> {
    let stream = proxy.connect_upstream(target).await?;
    h2_client::handshake(stream)
        .await
        .map_err(|e| ProxyError::UpstreamReset(e.into()))
}

async fn send_h1(
    proxy: &Arc<Proxy>,
    target: Target<'_>,
    req: Request<RequestBody>,
) -> Result<Sent, Failed> {
    let idle = || proxy.pool.checkout(&target.transport.key);
    let acquired = match proxy.connection(&target, idle).await {
        Ok(acquired) => acquired,
        Err(e) => return Err(Failed(Failure::Unsent(e), Left::Nothing)),
    };
    let mut pooled = match acquired {
        Acquired::Idle(pooled) => pooled,
        Acquired::New { hold, pending } => {
            let (sender, conn) = match boxed(|| open_h1(proxy, &target)).await {
                Ok(opened) => opened,
                Err(e) => return Err(Failed(Failure::Unsent(e), Left::Unsent(Box::new(req)))),
            };
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = %e, "upstream HTTP connection ended with an error");
                }
            });
            drop(pending);
            let key = target.transport.key.clone();
            let life = Life::new(target.connection_limits());
            proxy.pool.fresh(
                key,
                Conn {
                    io: sender,
                    hold,
                    life,
                },
            )
        }
    };
    match pooled.sender.try_send_request(req).await {
        Ok(response) => Ok((response.map(UpstreamBody::H1), Some(pooled))),
        Err(mut e) => match e.take_message() {
            Some(unsent) => Err(Failed(
                Failure::Unsent(ProxyError::UpstreamReset(e.into_error().into())),
                Left::Unsent(Box::new(unsent)),
            )),
            None => Err(Failed(
                Failure::Sent(ProxyError::UpstreamReset(e.into_error().into())),
                Left::Nothing,
            )),
        },
    }
}

async fn send_h2(
    proxy: &Arc<Proxy>,
    target: Target<'_>,
    req: Request<RequestBody>,
) -> Result<Sent, Failed> {
    let limits = target.connection_limits();
    let stream = loop {
        let slot = proxy
            .pool
            .h2_slot(&target.transport.key, &limits, || may_open(target.decision));
        let claim = match slot {
            H2Slot::Ready(stream) => break stream,
            H2Slot::Wait(progress) => match wait_for_h2(proxy, &target, progress).await {
                Ok(()) => continue,
                Err(e) => return Err(Failed(Failure::Unsent(e), Left::Unsent(Box::new(req)))),
            },
            H2Slot::Claimed(claim) => claim,
        };
        // The pool hands out no stream on the connection while the claim is held.
        let nothing_idle = || std::future::ready(None::<Infallible>);
        let (hold, pending) = match proxy.connection(&target, nothing_idle).await {
            Ok(Acquired::New { hold, pending }) => (hold, pending),
            Ok(Acquired::Idle(never)) => match never {},
            Err(e) => return Err(Failed(Failure::Unsent(e), Left::Nothing)),
        };
        let (sender, conn) = match boxed(|| open_h2(proxy, &target)).await {
            Ok(opened) => opened,
            Err(e) => {
                claim.fail(&e);
                return Err(Failed(Failure::Unsent(e), Left::Unsent(Box::new(req))));
            }
        };
        let stream = claim.publish(sender, Life::new(limits));
        let streams = stream.open.connection();
        drop(pending);
        tokio::spawn(async move {
            let _hold = hold;
            if let Err(e) = h2_client::drive(conn, streams).await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
            }
        });
        break stream;
    };
    match h2_client::send(stream, req).await {
        Ok(response) => Ok((response.map(UpstreamBody::H2), None)),
        Err(SendError::Unsent(e, unsent)) => Err(Failed(
            Failure::Unsent(ProxyError::UpstreamReset(e.into())),
            Left::Unsent(unsent),
        )),
        Err(SendError::Sent(e, rest)) => Err(Failed(
            Failure::Sent(ProxyError::UpstreamReset(e.into())),
            rest.map_or(Left::Nothing, Left::Rest),
        )),
    }
}

/// Whether `decision`'s cluster may open one more connection without waiting: under its
/// `max_connections`, or not limited (an original destination is not).
fn may_open(decision: &Decision) -> bool {
    match decision {
        Decision::Cluster(c) => c.breakers.has_room(Resource::Connections),
        _ => true,
    }
}

/// Waits, as one of the cluster's pending requests, for the HTTP/2 connection another
/// request is making to the endpoint; that request's failure to make it, if it failed.
async fn wait_for_h2(
    proxy: &Proxy,
    target: &Target<'_>,
    mut progress: watch::Receiver<H2Progress>,
) -> Result<(), ProxyError> {
    let _pending = proxy.admit(target.decision, Resource::PendingRequests)?;
    match progress
        .wait_for(|p| !matches!(p, H2Progress::Pending))
        .await
        .as_deref()
    {
        Ok(H2Progress::Failed(e)) => Err(e.replicate()),
        _ => Ok(()),
    }
}

/// The authority the upstream gets (after any rewrite): what Envoy's `auto_sni` sends.
fn upstream_authority<B>(req: &Request<B>) -> Option<&str> {
    req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
    })
}

/// HTTP/2 upstream for ports declared HTTP2/GRPC; HTTP/1.1 for ports declared HTTP; the
/// client's own protocol where nothing is declared (Istio's sniffed ports do the same).
pub(crate) fn upstream_h2(decision: &Decision, downstream: Version) -> bool {
    match decision {
        Decision::Cluster(c) => match c.protocol {
            Protocol::Http2 => true,
            Protocol::Http => false,
            Protocol::Tls | Protocol::Tcp | Protocol::Auto => downstream == Version::HTTP_2,
        },
        _ => downstream == Version::HTTP_2,
    }
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// What an upgraded stream keeps alive: its endpoint's active count, the upstream
/// connection (which never returns to the pool: after a 101 it speaks another protocol),
/// and the downstream's in-flight mark.
type Held = (
    crate::upstream::Hold,
    Option<crate::pool::Pooled>,
    Option<InFlightGuard>,
);

async fn relay_upgraded(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    held: Held,
) {
    let _held = held;
    match tokio::try_join!(client, upstream) {
        Ok((client, upstream)) => {
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            if let Err(e) = crate::io::copy_both(&mut client, &mut upstream).await {
                tracing::debug!(error = %e, "upgraded connection ended with an error");
            }
        }
        Err(e) => tracing::debug!(error = %e, "protocol upgrade failed"),
    }
}

fn upgraded_response(
    response: Response<UpstreamBody>,
    version: Version,
    start: Instant,
) -> Response<ProxyBody> {
    let (mut parts, _) = response.into_parts();
    parts.version = version;
    parts
        .headers
        .insert(header::SERVER, HeaderValue::from_static("envoy"));
    parts.headers.insert(SERVICE_TIME, service_time(start));
    Response::from_parts(parts, ProxyBody::Full(None))
}

/// Hop-by-hop headers (RFC 9110 7.6.1), never forwarded. `Upgrade` and `TE: trailers` are
/// handled separately: an upgrade keeps its headers, gRPC needs `TE: trailers`.
const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One look at the names, comparing without hashing: most messages carry none of these
    // (an HTTP/2 one cannot), and removing each absent name hashed it (about a hundred
    // instructions apiece, `callgrind`).
    if !headers
        .keys()
        .any(|name| *name == header::TE || HOP_BY_HOP.contains(name))
    {
        return;
    }
    // Headers named in Connection are hop-by-hop too.
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|name| !h1::end_to_end(name.as_bytes()))
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    for name in listed.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    let trailers_only = headers
        .get_all(header::TE)
        .iter()
        .all(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !trailers_only {
        headers.remove(header::TE);
    }
}

/// `x-envoy-upstream-service-time`, from a table for the common small values so that most
/// responses need no allocation for it.
fn service_time(start: Instant) -> HeaderValue {
    decimal(u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX))
}

/// The decimal text of every number below 1,000, each at three times its value, so that a
/// header carrying one (service time, attempt count, timeout) shares this static text: a
/// number formatted for each request took two allocations (the text and its share).
static DECIMALS: [u8; 3000] = {
    let mut table = [0u8; 3000];
    let mut n = 0;
    while n < 1000 {
        // Digits of `n` as u8: `n` is below 1,000.
        let (hundreds, tens, ones) = ((n / 100) as u8, (n / 10 % 10) as u8, (n % 10) as u8);
        let at = 3 * n;
        if n >= 100 {
            table[at] = b'0' + hundreds;
            table[at + 1] = b'0' + tens;
            table[at + 2] = b'0' + ones;
        } else if n >= 10 {
            table[at] = b'0' + tens;
            table[at + 1] = b'0' + ones;
        } else {
            table[at] = b'0' + ones;
        }
        n += 1;
    }
    table
};

/// `n` in decimal as a header value, without allocating below 1,000.
fn decimal(n: u64) -> HeaderValue {
    let small = usize::try_from(n).ok().filter(|&i| i < 1000).and_then(|i| {
        let len = 1 + usize::from(i >= 10) + usize::from(i >= 100);
        std::str::from_utf8(DECIMALS.get(3 * i..3 * i + len)?).ok()
    });
    small.map_or_else(|| HeaderValue::from(n), HeaderValue::from_static)
}

/// `x-request-id`: kept when the client sent one, else generated (Envoy's UUID request
/// id extension, as istiod configures it for outbound sidecar listeners).
pub(crate) const REQUEST_ID: &str = "x-request-id";
/// `x-envoy-attempt-count`: the attempt number, 1 for the first (Istio sets
/// `include_request_attempt_count` on every virtual host).
pub(crate) const ATTEMPT_COUNT: &str = "x-envoy-attempt-count";
// The names the general path sets or looks up on every request, built at compile time: a
// `&str` name is parsed and checked on each use (`callgrind`).
const REQUEST_ID_NAME: HeaderName = HeaderName::from_static(REQUEST_ID);
const ATTEMPT_COUNT_NAME: HeaderName = HeaderName::from_static(ATTEMPT_COUNT);
const EXPECTED_TIMEOUT_NAME: HeaderName = HeaderName::from_static(EXPECTED_TIMEOUT);
const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const SERVICE_TIME: HeaderName = HeaderName::from_static("x-envoy-upstream-service-time");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// The path before a route rewrote it.
const ORIGINAL_PATH: &str = "x-envoy-original-path";
/// The authority before a route rewrote it.
const ORIGINAL_HOST: &str = "x-envoy-original-host";
/// `x-envoy-expected-rq-timeout-ms`: the route timeout when one applies; never passed on
/// from the client.
pub(crate) const EXPECTED_TIMEOUT: &str = "x-envoy-expected-rq-timeout-ms";

/// A generated request id as a header value that HTTP/2 sends as a literal never indexed:
/// an id no later request repeats would take room in HPACK's dynamic table and evict the
/// entries that do repeat (authority, user agent, ...), which would then go as literals
/// again, on every request.
fn request_id_value(id: &[u8; REQUEST_ID_LEN]) -> Option<HeaderValue> {
    let mut value = HeaderValue::from_bytes(id).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// The length of a generated request id.
pub(crate) const REQUEST_ID_LEN: usize = 36;

/// A random UUID version 4, as Envoy generates request ids: from the thread's own fast
/// generator, formatted on the stack, so that no request pays a syscall or a lock for it.
pub(crate) fn request_id() -> [u8; REQUEST_ID_LEN] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    /// Where each byte's two digits go, around the dashes of the 8-4-4-4-12 groups: fixed,
    /// so that the loop unrolls into plain stores.
    const AT: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];
    let mut bytes = fastrand::u128(..).to_be_bytes();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let mut out = [b'-'; REQUEST_ID_LEN];
    for (b, at) in bytes.into_iter().zip(AT) {
        out[at] = HEX[usize::from(b >> 4)];
        out[at + 1] = HEX[usize::from(b & 0x0f)];
    }
    out
}

/// The route timeout in milliseconds, as `x-envoy-expected-rq-timeout-ms` carries it.
pub(crate) fn timeout_ms(timeout: Duration) -> u64 {
    u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)
}

/// The request's path and query, `/` when it has none (authority-form).
fn origin_path<B>(req: &Request<B>) -> PathAndQuery {
    req.uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"))
}

fn prepare_request(
    req: &mut Request<Incoming>,
    (authority, rewritten): (Option<&str>, bool),
    explicit: bool,
    h2: bool,
    upgrade: bool,
    route_timeout: Option<Duration>,
) {
    // Read before the hop-by-hop headers go: `Connection: upgrade` names it.
    let upgrade_to = upgrade
        .then(|| req.headers().get(header::UPGRADE).cloned())
        .flatten();
    // Absolute-form (or HTTP/2): the URI's authority was routed on, not a Host header.
    let absolute = req.uri().authority().is_some();
    let headers = req.headers_mut();
    strip_hop_by_hop(headers);
    // Which of the names below the request has, in one pass that compares names without
    // hashing them: looking each one up (or removing it when absent) hashed it.
    let (mut has_upgrade, mut expect, mut has_proto, mut has_timeout) =
        (false, false, false, false);
    let (mut host, mut authenticate) = (false, false);
    for name in headers.keys() {
        if *name == header::UPGRADE {
            has_upgrade = true;
        } else if *name == header::EXPECT {
            expect = true;
        } else if *name == FORWARDED_PROTO {
            has_proto = true;
        } else if *name == EXPECTED_TIMEOUT_NAME {
            has_timeout = true;
        } else if *name == header::HOST {
            host = true;
        } else if *name == header::PROXY_AUTHENTICATE {
            authenticate = true;
        }
    }
    if has_upgrade {
        headers.remove(header::UPGRADE);
    }
    if explicit && authenticate {
        headers.remove(header::PROXY_AUTHENTICATE);
    }
    // Like Envoy, answer `Expect: 100-continue` here (hyper sends the 100 when the body is
    // first read) rather than passing it on.
    if expect
        && headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
    {
        headers.remove(header::EXPECT);
    }
    if !has_proto {
        headers.insert(FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    if has_timeout {
        headers.remove(&EXPECTED_TIMEOUT_NAME);
    }
    if let Some(timeout) = route_timeout {
        headers.insert(EXPECTED_TIMEOUT_NAME, decimal(timeout_ms(timeout)));
    }
    if h2 {
        // HTTP/2 carries the name in :authority, taken from the URI.
        if host {
            headers.remove(header::HOST);
        }
        // A request that came over HTTP/2 and was not rewritten already holds the URI the
        // upstream gets: kept whole, it is not copied and parsed again for every request.
        let uri = req.uri();
        let unchanged = uri.scheme() == Some(&http::uri::Scheme::HTTP)
            && uri.authority().map(Authority::as_str) == authority
            && uri.path_and_query().is_some();
        if !unchanged {
            let path = origin_path(req);
            let uri = authority.and_then(|a| {
                Uri::builder()
                    .scheme("http")
                    .authority(a)
                    .path_and_query(path.clone())
                    .build()
                    .ok()
            });
            *req.uri_mut() = uri.unwrap_or_else(|| Uri::from(path));
        }
        *req.version_mut() = Version::HTTP_2;
        return;
    }
    // The name that was routed on (or the route's rewrite of it) is the one the upstream
    // sees. With origin-form and no rewrite that is the Host header already there.
    if (absolute || rewritten)
        && let Some(value) = authority.and_then(|a| HeaderValue::from_str(a).ok())
    {
        headers.insert(header::HOST, value);
    }
    let path = origin_path(req);
    let headers = req.headers_mut();
    if let Some(to) = upgrade_to {
        headers.insert(header::UPGRADE, to);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    *req.uri_mut() = Uri::from(path);
    *req.version_mut() = Version::HTTP_11;
}

fn prepare_response(
    response: Response<UpstreamBody>,
    connection: Option<crate::pool::Pooled>,
    guard: crate::upstream::Hold,
    version: Version,
    start: Instant,
) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    // The client gets its own HTTP version back, whatever the upstream spoke.
    parts.version = if version == Version::HTTP_2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    strip_hop_by_hop(&mut parts.headers);
    // Envoy overwrites the server header on responses it proxies.
    parts
        .headers
        .insert(header::SERVER, HeaderValue::from_static("envoy"));
    parts.headers.insert(SERVICE_TIME, service_time(start));
    if body.is_end_stream() {
        // hyper never polls an empty body (HEAD, 204, content-length: 0), so the body
        // cannot hand the connection back: do it now.
        if let Some(connection) = connection {
            connection.release();
        }
        return Response::from_parts(parts, ProxyBody::Full(None));
    }
    Response::from_parts(
        parts,
        ProxyBody::Upstream {
            body,
            connection,
            guard,
            end: None,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_in_headers_read_as_their_decimal_text() {
        for n in (0..1_100).chain([9_999, 15_000, u64::MAX]) {
            assert_eq!(decimal(n).as_bytes(), n.to_string().as_bytes(), "{n}");
        }
    }

    #[test]
    fn a_fault_hits_its_share_of_requests() {
        fastrand::seed(11);
        let share = |numerator, denominator| {
            let p = FractionalPercent {
                numerator,
                denominator,
            };
            (0..20_000).filter(|_| sampled(p)).count()
        };
        use portcullis_envoy::Denominator::{Hundred, Million, TenThousand};
        assert_eq!(share(0, Hundred), 0);
        assert_eq!(share(100, Hundred), 20_000);
        assert_eq!(share(1_000_000, Million), 20_000);
        // 25% of 20,000 is 5,000; four standard deviations are about 245.
        assert!((4_755..=5_245).contains(&share(2_500, TenThousand)));
        assert!((4_755..=5_245).contains(&share(250_000, Million)));
    }

    #[test]
    fn generated_request_ids_are_random_uuids_version_4() {
        let id = request_id();
        let text = std::str::from_utf8(&id).unwrap();
        let groups: Vec<&str> = text.split('-').collect();
        assert_eq!(
            groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12],
            "{text}"
        );
        assert!(
            groups
                .concat()
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{text}"
        );
        assert!(groups[2].starts_with('4'), "{text}");
        assert!(groups[3].starts_with(['8', '9', 'a', 'b']), "{text}");
        assert_ne!(request_id(), id);
    }

    #[test]
    fn generated_request_ids_stay_out_of_hpacks_table() {
        let id = request_id();
        let value = request_id_value(&id).expect("a valid header value");
        assert!(value.is_sensitive());
        assert_eq!(value.as_bytes(), &id[..]);
    }

    #[test]
    fn local_replies_are_framed_as_envoys_codecs_frame_them() {
        let blocked = ProxyError::Blocked;
        let h2 = local_reply(&blocked, Version::HTTP_2, true, false);
        assert!(!h2.headers().contains_key(header::CONTENT_LENGTH));
        assert!(!h2.headers().contains_key(header::CONNECTION));
        let unavailable = local_reply(
            &ProxyError::NoHealthyUpstream,
            Version::HTTP_2,
            false,
            false,
        );
        assert_eq!(unavailable.headers()[header::CONTENT_LENGTH], "19");
        let h1 = local_reply(&blocked, Version::HTTP_11, false, false);
        assert_eq!(h1.headers()[header::CONTENT_LENGTH], "0");
        assert!(!h1.headers().contains_key(header::CONNECTION));
        let unread = local_reply(&blocked, Version::HTTP_11, true, false);
        assert_eq!(unread.headers()[header::CONNECTION], "close");
        // After an upstream attempt the body has been sent on: the connection stays.
        let refused = ProxyError::ConnectFailure(std::io::ErrorKind::ConnectionRefused.into());
        let sent = local_reply(&refused, Version::HTTP_11, true, false);
        assert!(!sent.headers().contains_key(header::CONNECTION));
    }

    #[test]
    fn local_replies_to_grpc_requests_are_trailers_only_grpc_answers() {
        let unavailable = local_reply(&ProxyError::NoHealthyUpstream, Version::HTTP_2, false, true);
        assert_eq!(unavailable.status(), StatusCode::OK);
        assert!(unavailable.body().is_end_stream());
        // HTTP/2 sends the headers alone; HTTP/1.1 says the body is empty.
        assert!(!unavailable.headers().contains_key(header::CONTENT_LENGTH));
        let fields = |r: &Response<ProxyBody>| {
            ["content-type", "grpc-status", "grpc-message"].map(|name| {
                r.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            })
        };
        assert_eq!(
            fields(&unavailable),
            [
                Some("application/grpc".into()),
                Some("14".into()),
                Some("no healthy upstream".into())
            ]
        );
        let no_route = local_reply(&ProxyError::NoRoute, Version::HTTP_11, false, true);
        assert_eq!(no_route.headers()[header::CONTENT_LENGTH], "0");
        assert_eq!(
            fields(&no_route),
            [Some("application/grpc".into()), Some("12".into()), None]
        );
        let abort = ProxyError::FaultAbort(portcullis_envoy::AbortError::GrpcStatus(3));
        assert_eq!(
            fields(&local_reply(&abort, Version::HTTP_2, false, true))[1].as_deref(),
            Some("3")
        );
        let plain = local_reply(&abort, Version::HTTP_2, false, false);
        assert_eq!(plain.status(), StatusCode::OK);
        assert_eq!(plain.headers()[header::CONTENT_LENGTH], "18");
    }

    #[test]
    fn connection_listed_fields_go_but_host_and_content_length_stay() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "close, X-Hop, Host"),
            ("connection", "content-length"),
            ("x-hop", "1"),
            ("host", "up"),
            ("content-length", "2"),
            ("keep-alive", "5"),
            ("te", "gzip"),
            ("accept", "*/*"),
        ] {
            headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept", "content-length", "host"]);
    }
}

/// hyper's HTTP/2 server as a client sees it through `serve_h2`.
#[cfg(test)]
mod h2c {
    use std::future::poll_fn;
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use h2::{Reason, RecvStream};
    use http::{Request, Response, StatusCode, header};
    use portcullis_registry::BuildOptions;
    use tokio::net::TcpListener;
    use tokio_util::sync::CancellationToken;

    use super::{Downstream, serve_h2};
    use crate::Proxy;
    use crate::guard::StreamTimeouts;
    use crate::metrics::LastSeries;

    /// A sidecar letting anything through to where the client meant (`ALLOW_ANY`).
    fn allow_any() -> Arc<Proxy> {
        let yaml = "---
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    outboundTrafficPolicy:
      mode: ALLOW_ANY
";
        let loaded = portcullis_model::load_str(yaml, &Arc::new(PathBuf::from("t.yaml")));
        let snapshot =
            portcullis_registry::build(&loaded.resources, &BuildOptions::default(), None, 1);
        Proxy::for_tests_unmetered(snapshot)
    }

    /// An h2c client of a connection served for a client that meant `dst`, and the drain
    /// switch of the serving task.
    async fn client(
        dst: SocketAddr,
    ) -> (
        h2::client::SendRequest<Bytes>,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let (near, far) = tokio::io::duplex(64 * 1024);
        let downstream = Arc::new(Downstream {
            in_flight: None,
            original_dst: Some(dst),
            peer: "127.0.0.1:40000".parse().unwrap(),
            streams: StreamTimeouts::ENVOY_DEFAULT,
            series: LastSeries::default(),
        });
        let shutdown = CancellationToken::new();
        let serving = tokio::spawn(serve_h2(allow_any(), downstream, far, shutdown.clone()));
        let (sender, connection) = h2::client::handshake(near).await.unwrap();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        (sender, shutdown, serving)
    }

    /// An HTTP/2 upstream (a passthrough of h2c speaks h2c) that answers each request `hi`
    /// once `release` lets it, telling `seen` of each request (`None`) and of each reset
    /// of a stream it had not answered (`Some` of the reason).
    async fn upstream(
        release: Arc<tokio::sync::Semaphore>,
        seen: tokio::sync::mpsc::UnboundedSender<Option<Reason>>,
    ) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let release = Arc::clone(&release);
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(stream).await else {
                        return;
                    };
                    while let Some(Ok((_, mut respond))) = conn.accept().await {
                        let release = Arc::clone(&release);
                        let seen = seen.clone();
                        let _ = seen.send(None);
                        tokio::spawn(async move {
                            let _permit = tokio::select! {
                                permit = release.acquire() => permit.unwrap(),
                                reset = poll_fn(|cx| respond.poll_reset(cx)) => {
                                    let _ = seen.send(reset.ok());
                                    return;
                                }
                            };
                            let head = Response::builder()
                                .header(header::CONTENT_LENGTH, "2")
                                .body(())
                                .unwrap();
                            if let Ok(mut send) = respond.send_response(head, false) {
                                let _ = send.send_data(Bytes::from_static(b"hi"), true);
                            }
                        });
                    }
                });
            }
        });
        addr
    }

    async fn body(mut recv: RecvStream) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.unwrap();
            let _ = recv.flow_control().release_capacity(chunk.len());
            out.extend_from_slice(&chunk);
        }
        out
    }

    fn get(authority: &str) -> Request<()> {
        Request::get(format!("http://{authority}/"))
            .body(())
            .unwrap()
    }

    #[tokio::test]
    async fn a_request_is_answered_with_hyper_s_head_rules() {
        let (seen, _) = tokio::sync::mpsc::unbounded_channel();
        let dst = upstream(Arc::new(tokio::sync::Semaphore::new(100)), seen).await;
        let (mut sender, _shutdown, _serving) = client(dst).await;
        let (response, _) = sender.send_request(get(&dst.to_string()), true).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let headers = response.headers();
        assert!(headers.contains_key(header::DATE), "{headers:?}");
        assert_eq!(headers[header::CONTENT_LENGTH], "2");
        assert_eq!(body(response.into_body()).await, b"hi");
    }

    #[tokio::test]
    async fn a_drain_sends_goaway_and_lets_open_streams_finish() {
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let (seen, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
        let dst = upstream(Arc::clone(&release), seen).await;
        let (mut sender, shutdown, serving) = client(dst).await;
        let (waiting, _) = sender.send_request(get(&dst.to_string()), true).unwrap();
        // The drain starts once the request is at the upstream, which holds its answer.
        tokio::time::timeout(Duration::from_secs(10), arrivals.recv())
            .await
            .unwrap();
        shutdown.cancel();
        // The client hears of the drain: new streams are refused once GOAWAY arrives (each
        // one opened before it is dropped, so reset, at once).
        let refused = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match sender.send_request(get(&dst.to_string()), true) {
                    Err(e) => break e,
                    Ok(_) => tokio::task::yield_now().await,
                }
            }
        })
        .await
        .unwrap();
        assert!(refused.is_go_away() || refused.is_remote(), "{refused:?}");
        release.add_permits(10);
        let response = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(body(response.into_body()).await, b"hi");
        tokio::time::timeout(Duration::from_secs(10), serving)
            .await
            .expect("the connection ends once its streams are done")
            .unwrap();
    }

    #[tokio::test]
    async fn a_stream_the_client_resets_is_reset_upstream() {
        let (seen, mut events) = tokio::sync::mpsc::unbounded_channel();
        let dst = upstream(Arc::new(tokio::sync::Semaphore::new(0)), seen).await;
        let (mut sender, _shutdown, _serving) = client(dst).await;
        // Sent whole, so only the stream's reset (not its body's) can tell the proxy.
        let (_waiting, mut request) = sender.send_request(get(&dst.to_string()), true).unwrap();
        let next = Duration::from_secs(10);
        let arrived = tokio::time::timeout(next, events.recv()).await.unwrap();
        assert_eq!(arrived, Some(None));
        request.send_reset(Reason::CANCEL);
        assert_eq!(
            tokio::time::timeout(next, events.recv()).await.unwrap(),
            Some(Some(Reason::CANCEL)),
            "the upstream's stream is reset"
        );
    }

    #[tokio::test]
    async fn connect_relays_the_stream_s_bytes_both_ways() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let (mut read, mut write) = stream.split();
            let _ = tokio::io::copy(&mut read, &mut write).await;
        });
        let (mut sender, _shutdown, _serving) = client(dst).await;
        let connect = Request::connect(dst.to_string()).body(()).unwrap();
        let (response, mut send) = sender.send_request(connect, false).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(!response.headers().contains_key(header::CONTENT_LENGTH));
        send.send_data(Bytes::from_static(b"ping"), false).unwrap();
        let mut recv = response.into_body();
        let echoed = tokio::time::timeout(Duration::from_secs(10), recv.data())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(&echoed[..], b"ping");
        let _ = recv.flow_control().release_capacity(echoed.len());
        // The client's end of stream reaches the echo server, whose close ends ours.
        send.send_data(Bytes::new(), true).unwrap();
        let rest = tokio::time::timeout(Duration::from_secs(10), body(recv))
            .await
            .unwrap();
        assert!(rest.is_empty());
    }
}

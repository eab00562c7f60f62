//! One access log line per request or TCP connection, in the spirit of Istio's default
//! text format, with the same values as structured fields.

use std::net::SocketAddr;
use std::time::Duration;

/// What is logged for an HTTP request.
pub struct HttpLog<'a> {
    /// Request method.
    pub method: &'a str,
    /// Path and query.
    pub path: &'a str,
    /// `HTTP/1.1` etc.
    pub protocol: &'a str,
    /// Host/authority as requested.
    pub authority: &'a str,
    /// Response status.
    pub status: u16,
    /// Envoy response flags.
    pub flags: &'static str,
    /// Upstream cluster name.
    pub cluster: &'a str,
    /// Upstream host, if one was chosen.
    pub upstream: Option<SocketAddr>,
    /// Route name (`block_all` for a blocked request, `allow_any` for passthrough).
    pub route: &'a str,
    /// The original destination, when intercepted.
    pub original_dst: Option<SocketAddr>,
    /// Client address.
    pub downstream: SocketAddr,
    /// From the request to the end of the stream.
    pub duration: Duration,
}

impl HttpLog<'_> {
    /// Emits the line at INFO on the `access` target.
    pub fn emit(&self) {
        let upstream = self
            .upstream
            .map_or_else(|| "-".to_string(), |u| u.to_string());
        let original = self
            .original_dst
            .map_or_else(|| "-".to_string(), |u| u.to_string());
        tracing::info!(
            target: "access",
            method = self.method,
            path = self.path,
            authority = self.authority,
            status = self.status,
            response_flags = self.flags,
            upstream_cluster = self.cluster,
            upstream_host = %upstream,
            route_name = self.route,
            original_dst = %original,
            downstream = %self.downstream,
            duration_ms = self.duration.as_millis() as u64,
            "\"{} {} {}\" {} {} \"{}\" \"{}\" {} {} {}",
            self.method,
            self.path,
            self.protocol,
            self.status,
            self.flags,
            self.authority,
            upstream,
            self.cluster,
            original,
            self.route,
        );
    }
}

/// What is logged for an opaque TCP connection.
pub struct TcpLog<'a> {
    /// Envoy response flags.
    pub flags: &'static str,
    /// Upstream cluster name.
    pub cluster: &'a str,
    /// Upstream host, if connected.
    pub upstream: Option<SocketAddr>,
    /// The original destination.
    pub original_dst: SocketAddr,
    /// The TLS SNI, when the connection was routed by it.
    pub sni: Option<&'a str>,
    /// Client address.
    pub downstream: SocketAddr,
    /// Bytes client to upstream.
    pub sent: u64,
    /// Bytes upstream to client.
    pub received: u64,
    /// Connection lifetime.
    pub duration: Duration,
}

impl TcpLog<'_> {
    /// Emits the line at INFO on the `access` target.
    pub fn emit(&self) {
        let upstream = self
            .upstream
            .map_or_else(|| "-".to_string(), |u| u.to_string());
        tracing::info!(
            target: "access",
            response_flags = self.flags,
            upstream_cluster = self.cluster,
            upstream_host = %upstream,
            original_dst = %self.original_dst,
            requested_server_name = self.sni.unwrap_or("-"),
            downstream = %self.downstream,
            bytes_sent = self.sent,
            bytes_received = self.received,
            duration_ms = self.duration.as_millis() as u64,
            "\"- - -\" 0 {} {} {} \"{}\" {} {} {}",
            self.flags,
            self.received,
            self.sent,
            upstream,
            self.cluster,
            self.original_dst,
            self.sni.unwrap_or("-"),
        );
    }
}

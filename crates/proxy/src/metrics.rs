//! Prometheus metrics under the names Istio and Envoy users already graph.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A shared string label value (cluster and service names are already `Arc<str>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Label(pub Arc<str>);

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

impl From<&str> for Label {
    fn from(s: &str) -> Self {
        Label(s.into())
    }
}

/// Labels of `istio_requests_total` and `istio_request_duration_milliseconds`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// Always `source`: the sidecar reports as the client side.
    pub reporter: &'static str,
    /// Destination service host, or the cluster name when unregistered.
    pub destination_service: Label,
    /// HTTP status.
    pub response_code: u16,
    /// Envoy response flags.
    pub response_flags: &'static str,
    /// `http`.
    pub request_protocol: &'static str,
}

/// Labels of the TCP metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TcpLabels {
    /// Always `source`.
    pub reporter: &'static str,
    /// Destination service host, or the cluster name.
    pub destination_service: Label,
    /// Envoy response flags.
    pub response_flags: &'static str,
}

/// Labels keyed by Envoy cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ClusterLabels {
    /// Envoy cluster name.
    pub cluster_name: Label,
}

fn duration_histogram() -> Histogram {
    Histogram::new([
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
    ])
}

/// Every metric the data path records.
pub struct Metrics {
    /// `istio_requests_total`.
    pub requests: Family<RequestLabels, Counter>,
    /// `istio_request_duration_milliseconds`.
    pub request_duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    /// `istio_tcp_connections_opened_total`.
    pub tcp_opened: Family<TcpLabels, Counter>,
    /// `istio_tcp_connections_closed_total`.
    pub tcp_closed: Family<TcpLabels, Counter>,
    /// `istio_tcp_sent_bytes_total` (client to upstream).
    pub tcp_sent: Family<TcpLabels, Counter>,
    /// `istio_tcp_received_bytes_total` (upstream to client).
    pub tcp_received: Family<TcpLabels, Counter>,
    /// `envoy_cluster_upstream_rq_total`.
    pub upstream_rq: Family<ClusterLabels, Counter>,
    /// `envoy_cluster_upstream_cx_connect_fail`.
    pub connect_fail: Family<ClusterLabels, Counter>,
    /// `envoy_cluster_upstream_cx_connect_timeout`.
    pub connect_timeout: Family<ClusterLabels, Counter>,
    /// `envoy_cluster_upstream_cx_overflow`: connections refused by `max_connections`.
    pub upstream_cx_overflow: Family<ClusterLabels, Counter>,
    /// `envoy_cluster_upstream_rq_pending_overflow`: requests refused by `max_requests` or
    /// `max_pending_requests`.
    pub upstream_rq_pending_overflow: Family<ClusterLabels, Counter>,
    /// `envoy_cluster_upstream_rq_retry_overflow`: retries not made for `max_retries`.
    pub upstream_rq_retry_overflow: Family<ClusterLabels, Counter>,
    /// `envoy_cluster_outlier_detection_ejections_enforced_total`: endpoints ejected.
    pub ejections_enforced_total: Family<ClusterLabels, Counter>,
    /// `envoy_cluster_outlier_detection_ejections_enforced_consecutive_5xx`.
    pub ejections_consecutive_5xx: Family<ClusterLabels, Counter>,
    /// `envoy_cluster_outlier_detection_ejections_enforced_consecutive_gateway_failure`.
    pub ejections_consecutive_gateway: Family<ClusterLabels, Counter>,
    /// `envoy_cluster_outlier_detection_ejections_enforced_consecutive_local_origin_failure`.
    pub ejections_consecutive_local_origin: Family<ClusterLabels, Counter>,
    /// `envoy_listener_downstream_cx_overflow`: connections refused at the limit.
    pub cx_overflow: Counter,
    /// `envoy_http_downstream_cx_idle_timeout`.
    pub http_idle_timeout: Counter,
    /// `envoy_http_downstream_rq_header_timeout`.
    pub header_timeout: Counter,
    /// `envoy_http_fault_delays_injected`: requests the fault filter delayed.
    pub fault_delays: Counter,
    /// `envoy_http_fault_aborts_injected`: requests the fault filter aborted.
    pub fault_aborts: Counter,
    /// `envoy_http_downstream_rq_idle_timeout`: streams ended by `stream_idle_timeout`.
    pub rq_idle_timeout: Counter,
    /// `envoy_http_downstream_rq_timeout`: requests not received whole within
    /// `request_timeout`.
    pub rq_timeout: Counter,
    /// `envoy_http_downstream_cx_protocol_error` (malformed requests, 400 and 431).
    pub protocol_error: Counter,
    /// `envoy_tcp_idle_timeout`.
    pub tcp_idle_timeout: Counter,
    /// `envoy_tcp_max_downstream_connection_duration`: connections closed at the
    /// `tcp_proxy`'s maximum duration.
    pub tcp_max_duration: Counter,
}

impl Metrics {
    /// Counts an error answered to a client in the connection manager's stats that
    /// Envoy keeps for it (the stream and request timeouts).
    pub fn count_error(&self, e: &crate::ProxyError) {
        match e {
            crate::ProxyError::StreamIdle { .. } => self.rq_idle_timeout.inc(),
            crate::ProxyError::RequestTimeout => self.rq_timeout.inc(),
            _ => 0,
        };
    }

    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_sent: Family::default(),
            tcp_received: Family::default(),
            upstream_rq: Family::default(),
            connect_fail: Family::default(),
            connect_timeout: Family::default(),
            upstream_cx_overflow: Family::default(),
            upstream_rq_pending_overflow: Family::default(),
            upstream_rq_retry_overflow: Family::default(),
            ejections_enforced_total: Family::default(),
            ejections_consecutive_5xx: Family::default(),
            ejections_consecutive_gateway: Family::default(),
            ejections_consecutive_local_origin: Family::default(),
            cx_overflow: Counter::default(),
            http_idle_timeout: Counter::default(),
            header_timeout: Counter::default(),
            fault_delays: Counter::default(),
            fault_aborts: Counter::default(),
            rq_idle_timeout: Counter::default(),
            rq_timeout: Counter::default(),
            protocol_error: Counter::default(),
            tcp_idle_timeout: Counter::default(),
            tcp_max_duration: Counter::default(),
        };
        registry.register("istio_requests", "Requests handled", m.requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration",
            m.request_duration.clone(),
        );
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            m.tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            m.tcp_closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent upstream",
            m.tcp_sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from upstream",
            m.tcp_received.clone(),
        );
        registry.register(
            "envoy_cluster_upstream_rq",
            "Upstream requests per cluster",
            m.upstream_rq.clone(),
        );
        registry.register(
            "envoy_cluster_upstream_cx_connect_fail",
            "Upstream connection failures per cluster",
            m.connect_fail.clone(),
        );
        registry.register(
            "envoy_cluster_upstream_cx_connect_timeout",
            "Upstream connect timeouts per cluster",
            m.connect_timeout.clone(),
        );
        registry.register(
            "envoy_cluster_upstream_cx_overflow",
            "Upstream connections refused by the cluster's max_connections",
            m.upstream_cx_overflow.clone(),
        );
        registry.register(
            "envoy_cluster_upstream_rq_pending_overflow",
            "Requests refused by the cluster's max_requests or max_pending_requests",
            m.upstream_rq_pending_overflow.clone(),
        );
        registry.register(
            "envoy_cluster_upstream_rq_retry_overflow",
            "Retries not made for the cluster's max_retries",
            m.upstream_rq_retry_overflow.clone(),
        );
        registry.register(
            "envoy_cluster_outlier_detection_ejections_enforced",
            "Endpoints ejected by outlier detection",
            m.ejections_enforced_total.clone(),
        );
        registry.register(
            "envoy_cluster_outlier_detection_ejections_enforced_consecutive_5xx",
            "Ejections for consecutive 5xx",
            m.ejections_consecutive_5xx.clone(),
        );
        registry.register(
            "envoy_cluster_outlier_detection_ejections_enforced_consecutive_gateway_failure",
            "Ejections for consecutive gateway failures",
            m.ejections_consecutive_gateway.clone(),
        );
        registry.register(
            "envoy_cluster_outlier_detection_ejections_enforced_consecutive_local_origin_failure",
            "Ejections for consecutive local-origin failures",
            m.ejections_consecutive_local_origin.clone(),
        );
        registry.register(
            "envoy_listener_downstream_cx_overflow",
            "Connections refused at the connection limit",
            m.cx_overflow.clone(),
        );
        registry.register(
            "envoy_http_downstream_cx_idle_timeout",
            "HTTP connections closed idle",
            m.http_idle_timeout.clone(),
        );
        registry.register(
            "envoy_http_downstream_rq_header_timeout",
            "Requests whose head did not arrive in time",
            m.header_timeout.clone(),
        );
        registry.register(
            "envoy_http_fault_delays_injected",
            "Requests delayed by fault injection",
            m.fault_delays.clone(),
        );
        registry.register(
            "envoy_http_fault_aborts_injected",
            "Requests aborted by fault injection",
            m.fault_aborts.clone(),
        );
        registry.register(
            "envoy_http_downstream_rq_idle_timeout",
            "Streams ended by the stream idle timeout",
            m.rq_idle_timeout.clone(),
        );
        registry.register(
            "envoy_http_downstream_rq_timeout",
            "Requests not received whole within the request timeout",
            m.rq_timeout.clone(),
        );
        registry.register(
            "envoy_http_downstream_cx_protocol_error",
            "Malformed requests (400, 431)",
            m.protocol_error.clone(),
        );
        registry.register(
            "envoy_tcp_idle_timeout",
            "TCP connections closed idle",
            m.tcp_idle_timeout.clone(),
        );
        registry.register(
            "envoy_tcp_max_downstream_connection_duration",
            "TCP connections closed at their maximum duration",
            m.tcp_max_duration.clone(),
        );
        m
    }
}

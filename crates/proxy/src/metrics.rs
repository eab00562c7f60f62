//! Prometheus metrics under the names Istio and Envoy users already graph.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, TryLockError};

use portcullis_registry::Cluster;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelSetEncoder,
    LabelValueEncoder, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::{MetricType, TypedMetric};
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

/// A label value: a constant, or a name shared with the snapshot; equal and hashed by its
/// text, whichever it is.
#[derive(Debug, Clone)]
pub enum Value {
    /// A constant such as `unknown`.
    Static(&'static str),
    /// A name from the snapshot or the node.
    Shared(Arc<str>),
}

impl Value {
    /// The text.
    pub fn as_str(&self) -> &str {
        match self {
            Value::Static(s) => s,
            Value::Shared(s) => s,
        }
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Value {}

impl std::hash::Hash for Value {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl EncodeLabelValue for Value {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Shared(s.into())
    }
}

/// What Istio's stats filter says of a peer it knows nothing about.
pub const UNKNOWN: Value = Value::Static("unknown");

/// The `source_*` labels of a client-side report: the workload this sidecar serves, fixed
/// for the process.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SourceLabels {
    /// The workload's name (node metadata `WORKLOAD_NAME`, else the pod's name).
    pub source_workload: Value,
    /// `service.istio.io/canonical-name`, else `app.kubernetes.io/name`, else `app`,
    /// else the workload's name.
    pub source_canonical_service: Value,
    /// `service.istio.io/canonical-revision`, else `app.kubernetes.io/version`, else
    /// `version`, else `latest`.
    pub source_canonical_revision: Value,
    /// The pod's namespace.
    pub source_workload_namespace: Value,
    /// The `app` label.
    pub source_app: Value,
    /// The `version` label.
    pub source_version: Value,
    /// The mesh cluster id (`ISTIO_META_CLUSTER_ID`).
    pub source_cluster: Value,
}

impl Default for SourceLabels {
    fn default() -> Self {
        SourceLabels {
            source_workload: UNKNOWN,
            source_canonical_service: UNKNOWN,
            source_canonical_revision: Value::Static("latest"),
            source_workload_namespace: UNKNOWN,
            source_app: UNKNOWN,
            source_version: UNKNOWN,
            source_cluster: UNKNOWN,
        }
    }
}

impl SourceLabels {
    /// The labels of the workload `name` in `namespace` with pod `labels`, in mesh
    /// cluster `cluster`, derived as Istio derives them.
    pub fn new(
        name: Option<&str>,
        namespace: Option<&str>,
        labels: &std::collections::BTreeMap<String, String>,
        cluster: Option<&str>,
    ) -> Self {
        let known = |v: Option<&str>| v.filter(|v| !v.is_empty()).map_or(UNKNOWN, Value::from);
        let label = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| labels.get(*k))
                .filter(|v| !v.is_empty())
        };
        let workload = known(name);
        SourceLabels {
            source_canonical_service: label(&[
                "service.istio.io/canonical-name",
                "app.kubernetes.io/name",
                "app",
            ])
            .map_or_else(|| workload.clone(), |v| Value::from(v.as_str())),
            source_canonical_revision: label(&[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ])
            .map_or(Value::Static("latest"), |v| Value::from(v.as_str())),
            source_workload: workload,
            source_workload_namespace: known(namespace),
            source_app: known(label(&["app"]).map(String::as_str)),
            source_version: known(label(&["version"]).map(String::as_str)),
            source_cluster: known(cluster),
        }
    }
}

/// The `source_*` labels, shared by every series rather than copied into each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source(pub Arc<SourceLabels>);

/// Hashes nothing: every series of a process has the same source, so hashing its seven
/// values on each request would tell the series apart no better.
impl std::hash::Hash for Source {
    fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
}

impl EncodeLabelSet for Source {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }
}

/// The `destination_*` labels, from what the snapshot knows of the service and of the
/// endpoint's workload; `unknown` where it knows nothing, as Istio reports a destination
/// without peer metadata.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DestinationLabels {
    /// The destination workload.
    pub destination_workload: Value,
    /// Its namespace.
    pub destination_workload_namespace: Value,
    /// Its identity (a SPIFFE ID), known only from a peer certificate.
    pub destination_principal: Value,
    /// Its `app` label.
    pub destination_app: Value,
    /// Its `version` label.
    pub destination_version: Value,
    /// The service host (`BlackHoleCluster` or `PassthroughCluster` when unregistered).
    pub destination_service: Value,
    /// The workload's canonical service.
    pub destination_canonical_service: Value,
    /// The workload's canonical revision.
    pub destination_canonical_revision: Value,
    /// The service's short name (a Kubernetes service's name, else the host).
    pub destination_service_name: Value,
    /// The namespace of the resource that declared the service.
    pub destination_service_namespace: Value,
    /// The mesh cluster of the destination.
    pub destination_cluster: Value,
}

/// Nothing known of the destination yet: every label `unknown`.
impl Default for DestinationLabels {
    fn default() -> Self {
        DestinationLabels {
            destination_workload: UNKNOWN,
            destination_workload_namespace: UNKNOWN,
            destination_principal: UNKNOWN,
            destination_app: UNKNOWN,
            destination_version: UNKNOWN,
            destination_service: UNKNOWN,
            destination_canonical_service: UNKNOWN,
            destination_canonical_revision: UNKNOWN,
            destination_service_name: UNKNOWN,
            destination_service_namespace: UNKNOWN,
            destination_cluster: UNKNOWN,
        }
    }
}

/// Where a request or connection went, as the metrics label it: a cluster of the snapshot
/// with the endpoint last picked, or only a name. The labels are built from it when a
/// series is first looked up, not on every request.
#[derive(Debug, Clone)]
pub enum Destination {
    /// Known only by a name: an unregistered destination's cluster, a catch-all route's.
    Named(Arc<str>),
    /// A cluster of the snapshot, and the endpoint of the last attempt once one is picked.
    Cluster {
        /// The cluster.
        cluster: Arc<Cluster>,
        /// The index of the endpoint in the cluster.
        endpoint: Option<usize>,
    },
}

impl Destination {
    /// A destination known only by `service` (an unregistered one is named by its cluster).
    pub fn named(service: Arc<str>) -> Self {
        Destination::Named(service)
    }

    /// The destination `cluster` of the snapshot, labelled as the snapshot compiled it.
    pub fn of_cluster(cluster: &Arc<Cluster>) -> Self {
        Destination::Cluster {
            cluster: Arc::clone(cluster),
            endpoint: None,
        }
    }

    /// The endpoint `index` of the cluster was picked for an attempt (none: an original
    /// destination, which the cluster does not list).
    pub fn reached(&mut self, index: Option<usize>) {
        if let (Destination::Cluster { endpoint, .. }, Some(i)) = (self, index) {
            *endpoint = Some(i);
        }
    }

    /// Whether the upstream speaks Istio mutual TLS.
    pub fn mutual_tls(&self) -> bool {
        matches!(self, Destination::Cluster { cluster, .. } if cluster.istio_mutual)
    }

    /// Istio's `connection_security_policy` of a client-side report.
    pub fn security_policy(&self) -> &'static str {
        if self.mutual_tls() {
            "mutual_tls"
        } else {
            "unknown"
        }
    }

    /// The same destination: the same cluster object and endpoint, or the same name.
    fn same(&self, other: &Destination) -> bool {
        match (self, other) {
            (Destination::Named(a), Destination::Named(b)) => Arc::ptr_eq(a, b) || a == b,
            (
                Destination::Cluster {
                    cluster: a,
                    endpoint: i,
                },
                Destination::Cluster {
                    cluster: b,
                    endpoint: j,
                },
            ) => Arc::ptr_eq(a, b) && i == j,
            _ => false,
        }
    }

    /// The `destination_*` labels. A cluster names its service as the snapshot compiled
    /// it; the endpoint's workload comes from the metadata istiod puts on it
    /// (`filter_metadata.istio.workload`), as Istio's stats filter reads it on the client
    /// side: an empty part is `unknown` (the revision `latest`); app and version are not
    /// in it and stay `unknown`.
    pub fn labels(&self) -> DestinationLabels {
        let (cluster, endpoint) = match self {
            Destination::Named(service) => {
                return DestinationLabels {
                    destination_service_name: Value::Shared(Arc::clone(service)),
                    destination_service: Value::Shared(Arc::clone(service)),
                    ..DestinationLabels::default()
                };
            }
            Destination::Cluster { cluster, endpoint } => (cluster, endpoint),
        };
        let mut l = DestinationLabels {
            destination_service: Value::Shared(Arc::clone(&cluster.host)),
            destination_service_name: Value::Shared(Arc::clone(&cluster.service_name)),
            ..DestinationLabels::default()
        };
        if let Some(ns) = &cluster.service_namespace {
            l.destination_service_namespace = Value::Shared(Arc::clone(ns));
        }
        let workload = endpoint
            .and_then(|i| cluster.endpoints.get(i))
            .and_then(|e| e.workload.as_ref());
        if let Some(w) = workload {
            let part = |v: &Arc<str>, empty: &'static str| {
                if v.is_empty() {
                    Value::Static(empty)
                } else {
                    Value::Shared(Arc::clone(v))
                }
            };
            l.destination_workload = part(&w.name, "unknown");
            l.destination_workload_namespace = part(&w.namespace, "unknown");
            l.destination_canonical_service = part(&w.canonical_service, "unknown");
            l.destination_canonical_revision = part(&w.canonical_revision, "latest");
            l.destination_cluster = part(&w.cluster, "unknown");
        }
        l
    }
}

/// What a request's series depends on besides the process's own labels: compared
/// instead of the 25 labels it stands for.
#[derive(Debug, Clone)]
pub struct RequestKey {
    /// Where the request went.
    pub destination: Destination,
    /// A gRPC request.
    pub grpc: bool,
    /// The status sent to the client (0: none).
    pub status: u16,
    /// The response's `grpc-status`.
    pub grpc_status: Option<u32>,
    /// Envoy's response flags.
    pub flags: &'static str,
}

impl RequestKey {
    /// Whether `self` and `other` are recorded in the same series.
    fn same(&self, other: &RequestKey) -> bool {
        self.status == other.status
            && self.grpc == other.grpc
            && self.grpc_status == other.grpc_status
            && self.flags == other.flags
            && self.destination.same(&other.destination)
    }
}

/// The series of a connection's last request and its last upstream counters. The next
/// request on a keep-alive connection mostly goes to the same place and gets the same
/// answer; it then finds its series here without building, hashing or looking up labels.
#[derive(Debug, Default)]
pub struct LastSeries(Mutex<Cached>);

/// What [`LastSeries`] holds.
#[derive(Debug, Default)]
struct Cached {
    request: Option<(RequestKey, Arc<RequestSeries>)>,
    upstream_rq: Option<(Arc<str>, Counter)>,
    response: Option<(Arc<str>, u16, Arc<ResponseCounters>)>,
}

/// The series the last request and the last TCP connection on this thread went to, in
/// one [`Metrics`] (`id`). The keys hold their cluster objects, so no other cluster can
/// take a cached one's address; one stays alive past a config change until the next miss.
#[derive(Default)]
struct ThreadCached {
    metrics: u64,
    cached: Cached,
    tcp: Option<(Destination, &'static str, Arc<TcpSeries>)>,
}

thread_local! {
    /// What a connection finds when its own cache is empty: with a new connection per
    /// request, each request would otherwise build, hash and compare its 25 labels, as the
    /// first on a connection always does.
    static THREAD_LAST: RefCell<ThreadCached> = const {
        RefCell::new(ThreadCached {
            metrics: 0,
            cached: Cached {
                request: None,
                upstream_rq: None,
                response: None,
            },
            tcp: None,
        })
    };
}

/// What `find` finds in this thread's cache of `metrics`' series.
fn thread_cached<T>(metrics: u64, find: impl FnOnce(&ThreadCached) -> Option<T>) -> Option<T> {
    // `try_with`: a thread being torn down has no cache, and the data path never panics.
    THREAD_LAST
        .try_with(|last| {
            let last = last.try_borrow().ok()?;
            if last.metrics == metrics {
                find(&last)
            } else {
                None
            }
        })
        .ok()
        .flatten()
}

/// Keeps a series in this thread's cache of `metrics`' series.
fn thread_remember(metrics: u64, keep: impl FnOnce(&mut ThreadCached)) {
    let _ = THREAD_LAST.try_with(|last| {
        if let Ok(mut last) = last.try_borrow_mut() {
            if last.metrics != metrics {
                *last = ThreadCached {
                    metrics,
                    ..ThreadCached::default()
                };
            }
            keep(&mut last);
        }
    });
}

/// Each [`Metrics`] its own number, so that a thread's cache never hands one a series
/// of another (tests run several in a process).
static METRICS_IDS: AtomicU64 = AtomicU64::new(1);

impl LastSeries {
    /// The cache, unless another stream of the connection holds it: then the caller
    /// looks its series up as if nothing were cached, rather than wait.
    fn get(&self) -> Option<MutexGuard<'_, Cached>> {
        match self.0.try_lock() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }
}

/// The same cluster name: the same shared text, or equal text.
fn same_name(a: &Arc<str>, b: &Arc<str>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

/// Labels of `istio_requests_total` and the request histograms, as Istio's stats filter
/// names them for a client-side (`reporter="source"`) sidecar.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// Always `source`: the sidecar reports as the client side.
    pub reporter: &'static str,
    /// The workload this sidecar serves.
    #[prometheus(flatten)]
    pub source: Source,
    /// The workload's SPIFFE ID when the upstream is Istio mutual TLS, else `unknown`.
    pub source_principal: Value,
    /// Where the request went.
    #[prometheus(flatten)]
    pub destination: DestinationLabels,
    /// `http`, `grpc` (a `application/grpc` request).
    pub request_protocol: &'static str,
    /// HTTP status (0 when the client went away before one).
    pub response_code: u16,
    /// The `grpc-status` of a gRPC response, else empty.
    pub grpc_response_status: Value,
    /// Envoy response flags.
    pub response_flags: &'static str,
    /// `mutual_tls` or `unknown`.
    pub connection_security_policy: &'static str,
}

/// Labels of the TCP metrics: the request labels without response code and gRPC status.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TcpLabels {
    /// Always `source`.
    pub reporter: &'static str,
    /// The workload this sidecar serves.
    #[prometheus(flatten)]
    pub source: Source,
    /// The workload's SPIFFE ID when the upstream is Istio mutual TLS, else `unknown`.
    pub source_principal: Value,
    /// Where the connection went.
    #[prometheus(flatten)]
    pub destination: DestinationLabels,
    /// `tcp`.
    pub request_protocol: &'static str,
    /// Envoy response flags.
    pub response_flags: &'static str,
    /// `mutual_tls` or `unknown`.
    pub connection_security_policy: &'static str,
}

/// Labels keyed by Envoy cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ClusterLabels {
    /// Envoy cluster name.
    pub cluster_name: Label,
}

/// A counter family per Envoy cluster, listed (`# TYPE`) even before it counts: Envoy
/// shows every cluster's counters from the cluster's creation on, so the admin port fills
/// in a zero for each cluster of the snapshot without a series yet.
#[derive(Debug, Clone, Default)]
pub struct ClusterCounter(Family<ClusterLabels, Counter>);

impl std::ops::Deref for ClusterCounter {
    type Target = Family<ClusterLabels, Counter>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl EncodeMetric for ClusterCounter {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// A metric under one of Envoy's counter names that end in `_total`
/// (`envoy_cluster_upstream_rq_total`, Istio's `istio_requests_total`), which
/// prometheus-client's registry refuses (it appends `_total` to every counter): it is
/// registered as a collector instead, and the admin port takes off the `_total` the
/// encoder appends to Envoy's and Istio's counters.
#[derive(Debug)]
struct EnvoyNamed<M> {
    name: &'static str,
    help: &'static str,
    metric: M,
}

impl<M: EncodeMetric + std::fmt::Debug + Send + Sync + 'static> Collector for EnvoyNamed<M> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if self.metric.is_empty() {
            return Ok(());
        }
        let metric =
            encoder.encode_descriptor(self.name, self.help, None, self.metric.metric_type())?;
        self.metric.encode(metric)
    }
}

/// Registers `metric` under Envoy's `name`, which ends in `_total`.
fn register_total(
    registry: &mut Registry,
    name: &'static str,
    help: &'static str,
    metric: impl EncodeMetric + std::fmt::Debug + Send + Sync + 'static,
) {
    registry.register_collector(Box::new(EnvoyNamed { name, help, metric }));
}

/// Labels of `envoy_cluster_upstream_rq` (per status) and `envoy_cluster_upstream_rq_xx`
/// (per class), in the order Envoy prints them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CodeLabels {
    /// `200`, or `2xx` for the class counter.
    pub response_code: Value,
    /// Envoy cluster name.
    pub cluster_name: Label,
}

/// `response_code_class`-labelled cluster counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ClassLabels {
    /// `2xx`.
    pub response_code_class: &'static str,
    /// Envoy cluster name.
    pub cluster_name: Label,
}

/// The bucket bounds Envoy gives every histogram when none are configured, which Istio's
/// histograms keep (milliseconds for durations, bytes for sizes).
const ENVOY_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// A histogram with Envoy's default bounds that takes no lock: a request records three
/// observations, and prometheus-client's `Histogram` locks for each. Clones share the
/// counts.
#[derive(Debug, Clone, Default)]
pub struct EnvoyHistogram(Arc<HistogramCounts>);

#[derive(Debug, Default)]
struct HistogramCounts {
    /// Observations per bucket (not cumulative), the last past every bound.
    buckets: [AtomicU64; ENVOY_BUCKETS.len() + 1],
    /// The sum of the observations, as `f64` bits.
    sum: AtomicU64,
}

impl EnvoyHistogram {
    /// Records `v` in the first bucket whose bound is at least `v`.
    pub fn observe(&self, v: f64) {
        let bucket = if v.is_nan() {
            ENVOY_BUCKETS.len()
        } else {
            ENVOY_BUCKETS.partition_point(|bound| *bound < v)
        };
        self.0.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        // Never fails: the closure always gives a value.
        let _ = self
            .0
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
    }
}

impl TypedMetric for EnvoyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for EnvoyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = ENVOY_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.0.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        // The count is the buckets' sum, so that it always equals the `+Inf` bucket.
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = f64::from_bits(self.0.sum.load(Ordering::Relaxed));
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Series handles found by a fast hash of their labels.
///
/// prometheus-client's `Family` hashes a label set with SipHash under its lock on every
/// lookup, and a request's label set has 25 labels, looked up in four families. A handle
/// is a clone of a family's series (the same storage), found here once per request with
/// foldhash; the families stay what the admin port encodes.
struct Handles<K, H> {
    map: RwLock<HashMap<K, H, foldhash::fast::RandomState>>,
}

impl<K, H> Default for Handles<K, H> {
    fn default() -> Self {
        Handles {
            map: RwLock::new(HashMap::default()),
        }
    }
}

impl<K: Eq + Hash + Clone, H> Handles<K, H> {
    /// Calls `f` with the handles of `key`, made by `make` from the families the first time.
    fn with<R>(&self, key: &K, make: impl FnOnce(&K) -> H, f: impl FnOnce(&H) -> R) -> R {
        if let Some(handles) = self
            .map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
        {
            return f(handles);
        }
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        f(map.entry(key.clone()).or_insert_with(|| make(key)))
    }
}

/// The series one request is recorded in.
#[derive(Debug)]
struct RequestSeries {
    requests: Counter,
    duration: EnvoyHistogram,
    request_bytes: EnvoyHistogram,
    response_bytes: EnvoyHistogram,
}

/// The series one TCP connection is counted in.
#[derive(Debug)]
pub struct TcpSeries {
    /// `istio_tcp_connections_opened_total`.
    pub opened: Counter,
    /// `istio_tcp_connections_closed_total`.
    pub closed: Counter,
    /// `istio_tcp_sent_bytes_total`.
    pub sent: Counter,
    /// `istio_tcp_received_bytes_total`.
    pub received: Counter,
}

/// An upstream response's counters: its status class's and its status's.
#[derive(Debug)]
struct ResponseCounters {
    class: Counter,
    code: Counter,
}

/// What one request measured, recorded in the series of its labels.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    /// From the request's first byte to its stream's end.
    pub duration: std::time::Duration,
    /// Request headers and body.
    pub request_bytes: u64,
    /// Response headers, body and trailers.
    pub response_bytes: u64,
}

/// The size Envoy's header map gives a request head (`byteSize`, which Istio adds to the
/// body in `istio_request_bytes`): names and values without separators, pseudo-headers
/// included; `fields` is that sum over the header fields other than Host, which becomes
/// `:authority`.
pub fn request_head_bytes(method: usize, path: usize, authority: usize, fields: usize) -> u64 {
    let pseudo = ":method".len() + ":path".len() + ":authority".len() + ":scheme".len();
    (pseudo + method + path + authority + "http".len() + fields) as u64
}

/// The size Envoy's header map gives a response head with `fields` bytes of names and values.
pub fn response_head_bytes(fields: usize) -> u64 {
    (":status".len() + 3 + fields) as u64
}

/// The names and values of `headers`, without separators.
pub fn header_fields(headers: &http::HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum()
}

/// The `grpc_response_status` of a gRPC request, found as Envoy's `getGrpcStatus` finds it:
/// the trailers' `grpc-status`, else the headers', else the one the HTTP status maps to.
pub fn grpc_status_label(grpc_status: Option<u32>, http_status: u16) -> Value {
    const CODES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    let code = grpc_status.or((http_status != 0).then(|| crate::error::http_to_grpc(http_status)));
    match code {
        None => Value::Static(""),
        Some(code) => usize::try_from(code)
            .ok()
            .and_then(|c| CODES.get(c))
            .map_or_else(
                || Value::Shared(code.to_string().into()),
                |c| Value::Static(c),
            ),
    }
}

/// Every metric the data path records.
pub struct Metrics {
    /// `istio_requests_total`.
    pub requests: Family<RequestLabels, Counter>,
    /// `istio_request_duration_milliseconds`.
    pub request_duration: Family<RequestLabels, EnvoyHistogram>,
    /// `istio_request_bytes`: the request body's size.
    pub request_bytes: Family<RequestLabels, EnvoyHistogram>,
    /// `istio_response_bytes`: the response body's size.
    pub response_bytes: Family<RequestLabels, EnvoyHistogram>,
    /// `istio_tcp_connections_opened_total`.
    pub tcp_opened: Family<TcpLabels, Counter>,
    /// `istio_tcp_connections_closed_total`.
    pub tcp_closed: Family<TcpLabels, Counter>,
    /// `istio_tcp_sent_bytes_total` (client to upstream).
    pub tcp_sent: Family<TcpLabels, Counter>,
    /// `istio_tcp_received_bytes_total` (upstream to client).
    pub tcp_received: Family<TcpLabels, Counter>,
    /// `envoy_cluster_upstream_rq_total`.
    pub upstream_rq: ClusterCounter,
    /// `envoy_cluster_upstream_rq`: upstream responses per status code.
    pub upstream_rq_code: Family<CodeLabels, Counter>,
    /// `envoy_cluster_upstream_rq_xx`: upstream responses per status class.
    pub upstream_rq_class: Family<ClassLabels, Counter>,
    /// `envoy_cluster_upstream_cx_total`: upstream connections opened.
    pub upstream_cx_total: ClusterCounter,
    /// `envoy_cluster_upstream_cx_connect_fail`.
    pub connect_fail: ClusterCounter,
    /// `envoy_cluster_upstream_cx_connect_timeout`.
    pub connect_timeout: ClusterCounter,
    /// `envoy_cluster_upstream_cx_overflow`: connections refused by `max_connections`.
    pub upstream_cx_overflow: ClusterCounter,
    /// `envoy_cluster_upstream_rq_pending_overflow`: requests refused by `max_requests` or
    /// `max_pending_requests`.
    pub upstream_rq_pending_overflow: ClusterCounter,
    /// `envoy_cluster_upstream_rq_retry_overflow`: retries not made for `max_retries`.
    pub upstream_rq_retry_overflow: ClusterCounter,
    /// `envoy_cluster_upstream_rq_retry`: retries of the route's retry policy made.
    pub upstream_rq_retry: ClusterCounter,
    /// `envoy_cluster_upstream_rq_retry_success`: retries whose outcome the policy did not
    /// retry again.
    pub upstream_rq_retry_success: ClusterCounter,
    /// `envoy_cluster_upstream_rq_retry_limit_exceeded`: retries due past the policy's
    /// attempts.
    pub upstream_rq_retry_limit_exceeded: ClusterCounter,
    /// `envoy_cluster_outlier_detection_ejections_enforced_total`: endpoints ejected.
    pub ejections_enforced_total: ClusterCounter,
    /// `envoy_cluster_outlier_detection_ejections_enforced_consecutive_5xx`.
    pub ejections_consecutive_5xx: ClusterCounter,
    /// `envoy_cluster_outlier_detection_ejections_enforced_consecutive_gateway_failure`.
    pub ejections_consecutive_gateway: ClusterCounter,
    /// `envoy_cluster_outlier_detection_ejections_enforced_consecutive_local_origin_failure`.
    pub ejections_consecutive_local_origin: ClusterCounter,
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
    /// `portcullis_access_log_dropped_total`: access log lines dropped because the writer
    /// fell behind (the data path never waits for it).
    pub access_log_dropped: Counter,
    /// The `source_*` labels of every report.
    pub source: Source,
    /// The workload's SPIFFE ID, its `source_principal` over Istio mutual TLS.
    principal: Value,
    /// The request series of each label set.
    request_series: Handles<RequestLabels, Arc<RequestSeries>>,
    /// `upstream_rq` of each cluster.
    upstream_rq_series: Handles<Label, Counter>,
    /// The per-class and per-code counters of each cluster and status.
    response_series: Handles<(Label, u16), Arc<ResponseCounters>>,
    /// The TCP series of each label set.
    tcp_series: Handles<TcpLabels, Arc<TcpSeries>>,
    /// This instance's number in threads' caches.
    id: u64,
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
            request_duration: Family::default(),
            request_bytes: Family::default(),
            response_bytes: Family::default(),
            upstream_rq_code: Family::default(),
            upstream_rq_class: Family::default(),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_sent: Family::default(),
            tcp_received: Family::default(),
            upstream_rq: ClusterCounter::default(),
            upstream_cx_total: ClusterCounter::default(),
            connect_fail: ClusterCounter::default(),
            connect_timeout: ClusterCounter::default(),
            upstream_cx_overflow: ClusterCounter::default(),
            upstream_rq_pending_overflow: ClusterCounter::default(),
            upstream_rq_retry_overflow: ClusterCounter::default(),
            upstream_rq_retry: ClusterCounter::default(),
            upstream_rq_retry_success: ClusterCounter::default(),
            upstream_rq_retry_limit_exceeded: ClusterCounter::default(),
            ejections_enforced_total: ClusterCounter::default(),
            ejections_consecutive_5xx: ClusterCounter::default(),
            ejections_consecutive_gateway: ClusterCounter::default(),
            ejections_consecutive_local_origin: ClusterCounter::default(),
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
            access_log_dropped: Counter::default(),
            source: Source(Arc::default()),
            principal: UNKNOWN,
            request_series: Handles::default(),
            upstream_rq_series: Handles::default(),
            response_series: Handles::default(),
            tcp_series: Handles::default(),
            id: METRICS_IDS.fetch_add(1, Ordering::Relaxed),
        };
        register_total(
            registry,
            "istio_requests_total",
            "Requests handled",
            m.requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration",
            m.request_duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes",
            m.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes",
            m.response_bytes.clone(),
        );
        register_total(
            registry,
            "istio_tcp_connections_opened_total",
            "TCP connections opened",
            m.tcp_opened.clone(),
        );
        register_total(
            registry,
            "istio_tcp_connections_closed_total",
            "TCP connections closed",
            m.tcp_closed.clone(),
        );
        register_total(
            registry,
            "istio_tcp_sent_bytes_total",
            "Bytes sent upstream",
            m.tcp_sent.clone(),
        );
        register_total(
            registry,
            "istio_tcp_received_bytes_total",
            "Bytes received from upstream",
            m.tcp_received.clone(),
        );
        register_total(
            registry,
            "envoy_cluster_upstream_rq_total",
            "Upstream requests per cluster",
            m.upstream_rq.clone(),
        );
        registry.register(
            "envoy_cluster_upstream_rq",
            "Upstream responses per cluster and status",
            m.upstream_rq_code.clone(),
        );
        registry.register(
            "envoy_cluster_upstream_rq_xx",
            "Upstream responses per cluster and status class",
            m.upstream_rq_class.clone(),
        );
        register_total(
            registry,
            "envoy_cluster_upstream_cx_total",
            "Upstream connections opened per cluster",
            m.upstream_cx_total.clone(),
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
            "envoy_cluster_upstream_rq_retry",
            "Retries of the route's retry policy made",
            m.upstream_rq_retry.clone(),
        );
        registry.register(
            "envoy_cluster_upstream_rq_retry_success",
            "Retries whose outcome was not retried again",
            m.upstream_rq_retry_success.clone(),
        );
        registry.register(
            "envoy_cluster_upstream_rq_retry_limit_exceeded",
            "Retries not made because the retry policy's attempts were spent",
            m.upstream_rq_retry_limit_exceeded.clone(),
        );
        register_total(
            registry,
            "envoy_cluster_outlier_detection_ejections_enforced_total",
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
        registry.register(
            "portcullis_access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            m.access_log_dropped.clone(),
        );
        m
    }

    /// The same metrics reporting as the workload `source`, whose SPIFFE ID is
    /// `principal` when known.
    pub fn with_source(mut self, source: SourceLabels, principal: Option<&str>) -> Self {
        self.source = Source(Arc::new(source));
        self.principal = principal.map_or(UNKNOWN, Value::from);
        self
    }

    /// The `source_principal` of a report for `destination`: the client side knows its
    /// own identity as a peer only when it presents it, over Istio mutual TLS.
    pub fn source_principal(&self, destination: &Destination) -> Value {
        if destination.mutual_tls() {
            self.principal.clone()
        } else {
            UNKNOWN
        }
    }

    /// The labels of a TCP connection to `destination` that ended with `flags`.
    pub fn tcp_labels(&self, destination: &Destination, flags: &'static str) -> TcpLabels {
        TcpLabels {
            reporter: "source",
            source: self.source.clone(),
            source_principal: self.source_principal(destination),
            connection_security_policy: destination.security_policy(),
            destination: destination.labels(),
            request_protocol: "tcp",
            response_flags: flags,
        }
    }

    /// The labels of `key`'s request series.
    pub fn request_labels(&self, key: &RequestKey) -> RequestLabels {
        RequestLabels {
            reporter: "source",
            source: self.source.clone(),
            source_principal: self.source_principal(&key.destination),
            destination: key.destination.labels(),
            request_protocol: if key.grpc { "grpc" } else { "http" },
            response_code: key.status,
            grpc_response_status: if key.grpc {
                grpc_status_label(key.grpc_status, key.status)
            } else {
                Value::Static("")
            },
            response_flags: key.flags,
            connection_security_policy: key.destination.security_policy(),
        }
    }

    /// Records a request in Istio's request metrics, in the series of `key`'s labels;
    /// `last` is the connection's cache of the series its last request went to.
    pub fn record_request(&self, last: &LastSeries, key: RequestKey, measured: Measured) {
        let observe = |series: &RequestSeries| {
            series.requests.inc();
            series
                .duration
                .observe(measured.duration.as_secs_f64() * 1000.0);
            series.request_bytes.observe(measured.request_bytes as f64);
            series
                .response_bytes
                .observe(measured.response_bytes as f64);
        };
        let mut cached = last.get();
        if let Some((k, series)) = cached.as_ref().and_then(|c| c.request.as_ref())
            && k.same(&key)
        {
            return observe(series);
        }
        let make = |labels: &RequestLabels| {
            Arc::new(RequestSeries {
                requests: self.requests.get_or_create(labels).clone(),
                duration: self.request_duration.get_or_create(labels).clone(),
                request_bytes: self.request_bytes.get_or_create(labels).clone(),
                response_bytes: self.response_bytes.get_or_create(labels).clone(),
            })
        };
        let on_thread = |c: &ThreadCached| {
            let (k, series) = c.cached.request.as_ref()?;
            k.same(&key).then(|| Arc::clone(series))
        };
        let series = thread_cached(self.id, on_thread).unwrap_or_else(|| {
            let series = self
                .request_series
                .with(&self.request_labels(&key), make, Arc::clone);
            thread_remember(self.id, |c| {
                c.cached.request = Some((key.clone(), Arc::clone(&series)));
            });
            series
        });
        observe(&series);
        if let Some(c) = cached.as_mut() {
            c.request = Some((key, series));
        }
    }

    /// The TCP series of `labels`: one fast lookup for a connection's four counters, where
    /// each family would hash the whole label set with SipHash under its lock.
    pub fn tcp_series(&self, labels: &TcpLabels) -> Arc<TcpSeries> {
        let make = |labels: &TcpLabels| {
            Arc::new(TcpSeries {
                opened: self.tcp_opened.get_or_create(labels).clone(),
                closed: self.tcp_closed.get_or_create(labels).clone(),
                sent: self.tcp_sent.get_or_create(labels).clone(),
                received: self.tcp_received.get_or_create(labels).clone(),
            })
        };
        self.tcp_series.with(labels, make, Arc::clone)
    }

    /// The TCP series of a connection to `destination` with `flags`: this thread's last,
    /// when its last connection went to the same place and ended the same way, which
    /// spares building, hashing and comparing the labels per connection.
    pub fn tcp_series_to(&self, destination: &Destination, flags: &'static str) -> Arc<TcpSeries> {
        let on_thread = |c: &ThreadCached| {
            let (to, with, series) = c.tcp.as_ref()?;
            (*with == flags && to.same(destination)).then(|| Arc::clone(series))
        };
        thread_cached(self.id, on_thread).unwrap_or_else(|| {
            let series = self.tcp_series(&self.tcp_labels(destination, flags));
            thread_remember(self.id, |c| {
                c.tcp = Some((destination.clone(), flags, Arc::clone(&series)));
            });
            series
        })
    }

    /// Counts a request sent upstream (an attempt) in `cluster`'s `upstream_rq_total`;
    /// `last` is the connection's cache, if the caller has one.
    pub fn count_upstream_request(&self, last: Option<&LastSeries>, cluster: &Arc<str>) {
        let mut cached = last.and_then(LastSeries::get);
        if let Some((name, counter)) = cached.as_ref().and_then(|c| c.upstream_rq.as_ref())
            && same_name(name, cluster)
        {
            counter.inc();
            return;
        }
        let make = |label: &Label| {
            self.upstream_rq
                .get_or_create(&ClusterLabels {
                    cluster_name: label.clone(),
                })
                .clone()
        };
        let on_thread = |c: &ThreadCached| {
            let (name, counter) = c.cached.upstream_rq.as_ref()?;
            same_name(name, cluster).then(|| counter.clone())
        };
        let counter = thread_cached(self.id, on_thread).unwrap_or_else(|| {
            let counter =
                self.upstream_rq_series
                    .with(&Label(Arc::clone(cluster)), make, Counter::clone);
            thread_remember(self.id, |c| {
                c.cached.upstream_rq = Some((Arc::clone(cluster), counter.clone()));
            });
            counter
        });
        counter.inc();
        if let Some(c) = cached.as_mut() {
            c.upstream_rq = Some((Arc::clone(cluster), counter));
        }
    }

    /// Counts an upstream's response with `status` in `cluster`'s per-code counters;
    /// `last` is the connection's cache.
    pub fn count_upstream_response(&self, last: &LastSeries, cluster: &Arc<str>, status: u16) {
        let count = |counters: &ResponseCounters| {
            counters.class.inc();
            counters.code.inc();
        };
        let mut cached = last.get();
        if let Some((name, code, counters)) = cached.as_ref().and_then(|c| c.response.as_ref())
            && *code == status
            && same_name(name, cluster)
        {
            return count(counters);
        }
        let make = |(cluster_name, status): &(Label, u16)| {
            let class = match status / 100 {
                1 => "1xx",
                2 => "2xx",
                3 => "3xx",
                4 => "4xx",
                _ => "5xx",
            };
            Arc::new(ResponseCounters {
                class: self
                    .upstream_rq_class
                    .get_or_create(&ClassLabels {
                        response_code_class: class,
                        cluster_name: cluster_name.clone(),
                    })
                    .clone(),
                code: self
                    .upstream_rq_code
                    .get_or_create(&CodeLabels {
                        response_code: Value::Shared(status.to_string().into()),
                        cluster_name: cluster_name.clone(),
                    })
                    .clone(),
            })
        };
        let on_thread = |c: &ThreadCached| {
            let (name, code, counters) = c.cached.response.as_ref()?;
            (*code == status && same_name(name, cluster)).then(|| Arc::clone(counters))
        };
        let counters = thread_cached(self.id, on_thread).unwrap_or_else(|| {
            let counters =
                self.response_series
                    .with(&(Label(Arc::clone(cluster)), status), make, Arc::clone);
            thread_remember(self.id, |c| {
                c.cached.response = Some((Arc::clone(cluster), status, Arc::clone(&counters)));
            });
            counters
        });
        count(&counters);
        if let Some(c) = cached.as_mut() {
            c.response = Some((Arc::clone(cluster), status, counters));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cluster `api` of a snapshot: endpoint 0 runs workload `api-v1`, endpoint 1 has no
    /// workload metadata.
    fn api_cluster() -> Arc<Cluster> {
        use portcullis_envoy::{self as envoy, Discovery, Resources};
        let endpoint = |port: u16, workload: Option<&str>| {
            let mut e = envoy::LbEndpoint::new(envoy::EndpointAddress::Socket(
                std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            ));
            e.workload = workload
                .and_then(envoy::WorkloadMetadata::parse)
                .map(Arc::new);
            e
        };
        let mut c = envoy::Cluster::new("outbound|80||api.ns.svc.cluster.local", Discovery::Static);
        c.load_assignment = Some(envoy::ClusterLoadAssignment {
            cluster_name: c.name.clone(),
            endpoints: vec![envoy::LocalityLbEndpoints {
                lb_endpoints: vec![
                    endpoint(9001, Some("api-v1;ns;api;v1;Kubernetes")),
                    endpoint(9002, None),
                ],
                ..Default::default()
            }],
        });
        let mut r = Resources::default();
        r.clusters.insert(c.name.clone(), Arc::new(c));
        let snapshot = portcullis_registry::Snapshot::index(&r, &|_| None, None, 1);
        Arc::clone(
            snapshot
                .cluster("outbound|80||api.ns.svc.cluster.local")
                .unwrap(),
        )
    }

    /// An HTTP request's key to `cluster`'s `endpoint`, answered with `status`.
    fn http_key(cluster: &Arc<Cluster>, endpoint: Option<usize>, status: u16) -> RequestKey {
        let mut destination = Destination::of_cluster(cluster);
        destination.reached(endpoint);
        RequestKey {
            destination,
            grpc: false,
            status,
            grpc_status: None,
            flags: "-",
        }
    }

    /// What every test request measured.
    const MEASURED: Measured = Measured {
        duration: std::time::Duration::from_millis(2),
        request_bytes: 10,
        response_bytes: 20,
    };

    #[test]
    fn a_tcp_connections_series_are_its_families_own_found_by_its_labels() {
        let metrics = Metrics::new(&mut Registry::default());
        let cluster = api_cluster();
        let mut destination = Destination::of_cluster(&cluster);
        destination.reached(Some(0));
        let labels = |flags| metrics.tcp_labels(&destination, flags);
        let first = metrics.tcp_series(&labels("-"));
        assert!(Arc::ptr_eq(&first, &metrics.tcp_series(&labels("-"))));
        first.opened.inc();
        first.sent.inc_by(7);
        metrics.tcp_series(&labels("-")).received.inc_by(9);
        let timed_out = metrics.tcp_series(&labels("DT"));
        assert!(!Arc::ptr_eq(&first, &timed_out));
        timed_out.closed.inc();
        let (clean, dt) = (labels("-"), labels("DT"));
        assert_eq!(metrics.tcp_opened.get_or_create(&clean).get(), 1);
        assert_eq!(metrics.tcp_sent.get_or_create(&clean).get(), 7);
        assert_eq!(metrics.tcp_received.get_or_create(&clean).get(), 9);
        assert_eq!(metrics.tcp_closed.get_or_create(&clean).get(), 0);
        assert_eq!(metrics.tcp_closed.get_or_create(&dt).get(), 1);
    }

    #[test]
    fn tcp_connections_on_a_thread_share_its_last_series_only_to_the_same_place_and_end() {
        let (first, second) = (
            Metrics::new(&mut Registry::default()),
            Metrics::new(&mut Registry::default()),
        );
        let cluster = api_cluster();
        let to = |endpoint| {
            let mut destination = Destination::of_cluster(&cluster);
            destination.reached(Some(endpoint));
            destination
        };
        for (metrics, endpoint, flags) in [
            (&first, 0, "-"),
            (&first, 0, "-"),
            (&first, 0, "DT"),
            (&first, 1, "DT"),
            (&second, 1, "DT"),
            (&first, 1, "DT"),
            (&first, 0, "-"),
        ] {
            metrics.tcp_series_to(&to(endpoint), flags).opened.inc();
        }
        let opened = |metrics: &Metrics, endpoint, flags| {
            let labels = metrics.tcp_labels(&to(endpoint), flags);
            metrics.tcp_opened.get_or_create(&labels).get()
        };
        assert_eq!(opened(&first, 0, "-"), 3);
        assert_eq!(opened(&first, 0, "DT"), 1);
        assert_eq!(opened(&first, 1, "DT"), 2);
        assert_eq!(opened(&second, 1, "DT"), 1);
        assert_eq!(opened(&second, 0, "-"), 0);
    }

    #[test]
    fn a_connections_requests_land_in_the_series_of_their_own_labels() {
        let metrics = Metrics::new(&mut Registry::default());
        let last = LastSeries::default();
        let cluster = api_cluster();
        let key = |endpoint: Option<usize>, status: u16| http_key(&cluster, endpoint, status);
        let measured = MEASURED;
        // The second and fourth requests find the cached series of the one before; the
        // third and fifth differ from it (status, endpoint) and must not.
        for (endpoint, status) in [(0, 200), (0, 200), (0, 503), (0, 503), (1, 503)] {
            metrics.record_request(&last, key(Some(endpoint), status), measured);
        }
        let count = |endpoint: usize, status: u16| {
            let labels = metrics.request_labels(&key(Some(endpoint), status));
            metrics.requests.get_or_create(&labels).get()
        };
        assert_eq!((count(0, 200), count(0, 503), count(1, 503)), (2, 2, 1));
        let v1 = metrics.request_labels(&key(Some(0), 200)).destination;
        assert_eq!(v1.destination_workload.as_str(), "api-v1");
        assert_eq!(v1.destination_canonical_revision.as_str(), "v1");
        assert_eq!(v1.destination_service.as_str(), "api.ns.svc.cluster.local");
        let bare = metrics.request_labels(&key(Some(1), 503)).destination;
        assert_eq!(bare.destination_workload.as_str(), "unknown");
        assert_eq!(bare, metrics.request_labels(&key(None, 503)).destination);
        // The per-cluster counters likewise, a cluster named by equal text included.
        let name: Arc<str> = cluster.name.clone();
        let same_text: Arc<str> = name.to_string().into();
        for (cluster_name, status) in [(&name, 200), (&same_text, 200), (&name, 503)] {
            metrics.count_upstream_request(Some(&last), cluster_name);
            metrics.count_upstream_response(&last, cluster_name, status);
        }
        let cluster_label = || ClusterLabels {
            cluster_name: Label(Arc::clone(&name)),
        };
        assert_eq!(metrics.upstream_rq.get_or_create(&cluster_label()).get(), 3);
        let code = |status: &str| CodeLabels {
            response_code: Value::Shared(status.into()),
            cluster_name: Label(Arc::clone(&name)),
        };
        assert_eq!(
            metrics.upstream_rq_code.get_or_create(&code("200")).get(),
            2
        );
        assert_eq!(
            metrics.upstream_rq_code.get_or_create(&code("503")).get(),
            1
        );
    }

    #[test]
    fn new_connections_on_a_thread_find_its_last_series_in_their_own_metrics_only() {
        let (first, second) = (
            Metrics::new(&mut Registry::default()),
            Metrics::new(&mut Registry::default()),
        );
        let cluster = api_cluster();
        let key = |status: u16| http_key(&cluster, Some(0), status);
        let measured = MEASURED;
        let name: Arc<str> = cluster.name.clone();
        // Each request on a connection of its own, the two metrics interleaved: each
        // counts only its own, whatever the thread's cache last held.
        for (metrics, status) in [
            (&first, 200),
            (&first, 200),
            (&second, 200),
            (&first, 200),
            (&first, 503),
            (&second, 503),
        ] {
            let connection = LastSeries::default();
            metrics.record_request(&connection, key(status), measured);
            metrics.count_upstream_request(Some(&connection), &name);
            metrics.count_upstream_response(&connection, &name, status);
        }
        let requests = |metrics: &Metrics, status| {
            let labels = metrics.request_labels(&key(status));
            metrics.requests.get_or_create(&labels).get()
        };
        assert_eq!((requests(&first, 200), requests(&first, 503)), (3, 1));
        assert_eq!((requests(&second, 200), requests(&second, 503)), (1, 1));
        let cluster_label = ClusterLabels {
            cluster_name: Label(Arc::clone(&name)),
        };
        assert_eq!(first.upstream_rq.get_or_create(&cluster_label).get(), 4);
        assert_eq!(second.upstream_rq.get_or_create(&cluster_label).get(), 2);
        let class = |metrics: &Metrics, class| {
            let labels = ClassLabels {
                response_code_class: class,
                cluster_name: Label(Arc::clone(&name)),
            };
            metrics.upstream_rq_class.get_or_create(&labels).get()
        };
        assert_eq!((class(&first, "2xx"), class(&first, "5xx")), (3, 1));
        assert_eq!((class(&second, "2xx"), class(&second, "5xx")), (1, 1));
        // The last series is the thread's: the next connection's first request finds it.
        let kept = thread_cached(second.id, |c| {
            c.cached.request.as_ref().map(|(_, s)| Arc::clone(s))
        });
        let labels = second.request_labels(&key(503));
        let series =
            second
                .request_series
                .with(&labels, |_| unreachable!("the series exists"), Arc::clone);
        assert!(kept.is_some_and(|kept| Arc::ptr_eq(&kept, &series)));
        assert!(thread_cached(first.id, |_| Some(())).is_none());
    }

    #[test]
    fn source_labels_fall_back_as_istios_do() {
        let labels = std::collections::BTreeMap::from([
            ("app".to_owned(), "reviews".to_owned()),
            ("version".to_owned(), "v2".to_owned()),
            (
                "service.istio.io/canonical-name".to_owned(),
                "reviews-canonical".to_owned(),
            ),
        ]);
        let s = SourceLabels::new(Some("reviews-v2"), Some("shop"), &labels, None);
        assert_eq!(s.source_workload.as_str(), "reviews-v2");
        assert_eq!(s.source_workload_namespace.as_str(), "shop");
        assert_eq!(s.source_app.as_str(), "reviews");
        assert_eq!(s.source_version.as_str(), "v2");
        assert_eq!(s.source_canonical_service.as_str(), "reviews-canonical");
        assert_eq!(s.source_canonical_revision.as_str(), "v2");
        assert_eq!(s.source_cluster.as_str(), "unknown");
        let bare = SourceLabels::new(Some("job"), None, &Default::default(), Some("east"));
        assert_eq!(bare.source_canonical_service.as_str(), "job");
        assert_eq!(bare.source_canonical_revision.as_str(), "latest");
        assert_eq!(bare.source_app.as_str(), "unknown");
        assert_eq!(bare.source_workload_namespace.as_str(), "unknown");
        assert_eq!(bare.source_cluster.as_str(), "east");
    }

    #[test]
    fn grpc_status_comes_from_the_response_else_from_the_http_status() {
        let label = |grpc, http| grpc_status_label(grpc, http).as_str().to_owned();
        assert_eq!(label(Some(0), 200), "0");
        assert_eq!(label(Some(14), 200), "14");
        assert_eq!(label(Some(99), 200), "99");
        assert_eq!(label(None, 503), "14");
        assert_eq!(label(None, 404), "12");
        assert_eq!(label(None, 200), "2");
        assert_eq!(label(None, 0), "");
    }

    #[test]
    fn head_sizes_count_names_and_values_as_envoys_header_map() {
        let mut headers = http::HeaderMap::new();
        headers.insert("accept", http::HeaderValue::from_static("*/*"));
        assert_eq!(header_fields(&headers), 9);
        // :method GET :path /a :authority h :scheme http accept */*
        assert_eq!(
            request_head_bytes(3, 2, 1, 9),
            7 + 3 + 5 + 2 + 10 + 1 + 7 + 4 + 9
        );
        assert_eq!(response_head_bytes(9), 19);
    }

    #[test]
    fn envoy_histograms_encode_as_prometheus_clients_do() {
        let ours = EnvoyHistogram::default();
        let theirs = prometheus_client::metrics::histogram::Histogram::new(ENVOY_BUCKETS);
        for v in [0.2, 0.5, 3.0, 10.0, 7_000.0, 4_000_000.0] {
            ours.observe(v);
            theirs.observe(v);
        }
        let text = |metric: Box<dyn Fn(&mut Registry)>| {
            let mut registry = Registry::default();
            metric(&mut registry);
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, &registry).unwrap_or_default();
            out
        };
        let ours = text(Box::new(move |r| r.register("h", "h", ours.clone())));
        let theirs = text(Box::new(move |r| r.register("h", "h", theirs.clone())));
        assert!(ours.contains("h_count 6\n") && ours.contains("h_bucket{le=\"+Inf\"} 6\n"));
        assert!(ours.contains("h_bucket{le=\"0.5\"} 2\n"));
        assert_eq!(ours, theirs);
    }

    #[test]
    fn label_values_compare_by_text_whichever_kind() {
        let hash = |v: &Value| {
            use std::hash::{BuildHasher, RandomState};
            static STATE: std::sync::LazyLock<RandomState> =
                std::sync::LazyLock::new(RandomState::new);
            STATE.hash_one(v)
        };
        let a = Value::Static("unknown");
        let b = Value::Shared("unknown".into());
        assert_eq!(a, b);
        assert_eq!(hash(&a), hash(&b));
        assert_ne!(a, Value::from("known"));
    }
}

//! Compiles Istio and Kubernetes resources into one immutable, indexed [`Snapshot`] that the
//! data path reads without locks, and routes hosts and addresses against it.

mod bootstrap;
mod build;
mod cluster;
mod explain;
mod host;
mod index;
mod limits;
mod listener;
mod order;
mod retry;
mod route;
mod snapshot;
mod ssrf;
#[cfg(test)]
mod tests;
mod tls;

pub use bootstrap::{ADMIN, CompileError, Format, Rendered, compile_bootstrap};
pub use build::{
    BuildOptions, Compiled, DEFAULT_CLUSTER_ID, DnsAnswers, HTTP_PROXY_ROUTES, MODE_METADATA,
    OUTBOUND_PORT, build, build_with_dns, compile, locality,
};
pub use portcullis_envoy::WorkloadMetadata;
pub use portcullis_model::{OutboundMode, Resolution};

pub use cluster::Target;
pub use explain::{Reason, Refused};
pub use host::{HostError, normalize_host, split_host_port};
pub use limits::{CircuitBreakers, ClusterLoad, Overflow, Resource, Slot, UNLIMITED};
pub use listener::{Candidates, Chain, ChainFilter, Connection, HttpChain};
pub use retry::{RetriableHeaders, RetryPolicy, StatusSet};
pub use route::{
    Action, ClusterHeaders, DirectResponse, HeaderMutation, Headers, HttpRoute, Mirror, Request,
    Route, RouteTable, VirtualHost,
};
pub use snapshot::{
    BLACKHOLE_CLUSTER, Cluster, ClusterMap, Decision, Endpoint, EndpointTransport, Enforcement,
    OpaqueNames, Outliers, PASSTHROUGH_CLUSTER, Protocol, Snapshot,
};
pub use ssrf::{RejectedAnswer, non_public};
pub use tls::{
    IstioPeer, TlsConfigError, TlsOrigin, WorkloadIdentity, compile as compile_tls, failure_reason,
};

/// The registry's hash map: foldhash is several times faster than SipHash for the short
/// keys routed on, and still seeded per process so lookup keys sent by clients cannot be
/// crafted to collide.
pub(crate) type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

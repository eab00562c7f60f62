//! Compiles Istio and Kubernetes resources into one immutable, indexed [`Snapshot`] that the
//! data path reads without locks, and routes hosts and addresses against it.

mod build;
mod host;
mod snapshot;
#[cfg(test)]
mod tests;

pub use build::{BuildOptions, DnsAnswers, build, build_with_dns};
pub use portcullis_model::{OutboundMode, Resolution};

pub use host::{HostError, normalize_host, split_host_port};
pub use snapshot::{
    BLACKHOLE_CLUSTER, Cluster, Decision, Endpoint, PASSTHROUGH_CLUSTER, Protocol, Snapshot,
};

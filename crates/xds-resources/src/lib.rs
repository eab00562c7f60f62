//! Envoy's xDS resources in: `Listener`, `RouteConfiguration`, `Cluster` and
//! `ClusterLoadAssignment` protos converted into the model with Envoy's semantics and
//! defaults, validated (what portcullis cannot honour safely is rejected with the field
//! and the reason, for the client's NACK), and kept as Envoy keeps them: per resource,
//! with versions, warming and the last rejected update.

mod cluster;
mod common;
mod listener;
mod route;
mod state;
#[cfg(test)]
mod tests;

pub use cluster::{cluster, load_assignment};
pub use common::Invalid;
pub use listener::listener;
pub use route::route_configuration;
pub use state::{Applied, INITIAL_FETCH_TIMEOUT, Rejected, ResourceType, XdsState};

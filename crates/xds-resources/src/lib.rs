//! Envoy's xDS resources in: `Listener`, `RouteConfiguration`, `Cluster` and
//! `ClusterLoadAssignment` protos converted into the model with Envoy's semantics and
//! defaults, validated (what portcullis cannot honour safely is rejected with the field
//! and the reason, for the client's NACK), and kept as Envoy keeps them: per resource,
//! with versions, warming and the last rejected update.
//!
//! The ADS client hands each response to [`XdsState::apply_sotw`] or
//! [`XdsState::apply_delta`], NACKs when [`Applied::rejected`] is not empty, and subscribes
//! to [`Applied::routes_needed`] and [`Applied::endpoints_needed`]. Whoever drives it calls
//! [`XdsState::promote`] at [`XdsState::next_warming_deadline`], publishes
//! [`XdsState::active`] to the data path after each change, shows [`XdsState::state`] in
//! `/config_dump`, and turns readiness on once [`XdsState::initial_set_complete`].

mod cluster;
mod common;
mod listener;
mod route;
mod state;
#[cfg(test)]
mod tests;
mod tls;

pub use cluster::{cluster, load_assignment};
pub use common::Invalid;
pub use listener::listener;
pub use route::route_configuration;
pub use state::{Applied, INITIAL_FETCH_TIMEOUT, Rejected, ResourceType, XdsState};

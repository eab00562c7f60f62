//! ADS client for Envoy's v3 xDS protocol, as a sidecar speaks it to istiod.
//!
//! The client owns the protocol: the stream (Delta or State of the World), versions,
//! nonces, ACK and NACK, subscriptions and reconnects. It never looks inside a Listener or a
//! Cluster: each resource reaches a [`Sink`] as an `Any`, and the sink says which ones it
//! rejected and which EDS and RDS names it needs next.

mod backoff;
pub mod ca;
mod client;
mod node;
mod stats;

pub use backoff::Backoff;
pub use client::{Client, ClientConfig, ClientError, DEFAULT_TOKEN_FILE, Protocol};
pub use envoy_types::pb::google::protobuf::Any;
pub use node::{NodeIdentity, NodeOverrides, parse_downward_api};
pub use stats::{SubscriptionStats, XdsStats};

use std::collections::BTreeMap;

use prost::Message;

/// The four v3 type URLs a sidecar subscribes to over ADS.
pub mod type_url {
    /// LDS.
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    /// RDS.
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    /// CDS.
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    /// EDS.
    pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    /// The wrapper a State-of-the-World response may carry a named resource in.
    pub const RESOURCE_WRAPPER: &str = "type.googleapis.com/envoy.service.discovery.v3.Resource";

    /// Every type, in the order Envoy's ADS first requests them.
    pub const ALL: [&str; 4] = [CLUSTER, LISTENER, ENDPOINT, ROUTE];

    /// Whether the type is subscribed as a wildcard (CDS, LDS) rather than by name (EDS, RDS).
    pub fn is_wildcard(type_url: &str) -> bool {
        type_url == CLUSTER || type_url == LISTENER
    }

    /// The noun Envoy's NACK messages use for the type.
    pub fn noun(type_url: &str) -> &'static str {
        match type_url {
            LISTENER => "listener",
            ROUTE => "route configuration",
            CLUSTER => "cluster",
            ENDPOINT => "cluster load assignment",
            _ => "resource",
        }
    }
}

/// One resource of an update, still encoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    /// The resource's name (a ClusterLoadAssignment's `cluster_name`).
    pub name: String,
    /// Its version: Delta's per-resource version, or the SotW response's `version_info`.
    pub version: String,
    /// The resource itself.
    pub any: Any,
}

/// What one accepted-for-processing response asks the sink to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// Which of [`type_url`]'s types this is.
    pub type_url: String,
    /// Delta's `system_version_info` or SotW's `version_info`.
    pub version: String,
    /// Resources added or changed.
    pub resources: Vec<Resource>,
    /// Names to drop: Delta's `removed_resources`, or for a SotW LDS/CDS response the
    /// accepted names it no longer lists.
    pub removed: Vec<String>,
    /// A SotW LDS/CDS response: `resources` is the complete set of the type.
    pub state_of_the_world: bool,
}

/// A resource the sink refused, and why (the NACK names both).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// The resource's name.
    pub name: String,
    /// Why, in words an operator can act on.
    pub reason: String,
}

/// The sink's answer to an [`Update`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Resources not applied; the rest of the update was. Any rejection NACKs the response.
    pub rejected: Vec<Rejected>,
    /// EDS and RDS names the sink needs now, by type URL; a type left out keeps its names.
    pub wants: BTreeMap<String, Names>,
}

/// Resource names, in a persistent set: a mesh's EDS subscription is copied and compared
/// in the time its changes take, not its size.
pub type Names = imbl::OrdSet<String>;

/// The config side: applies what the control plane sends. Called from the client's task only.
pub trait Sink: Send {
    /// Applies an update (all of it but the rejected resources) and says what to subscribe to.
    fn apply(&mut self, update: Update) -> Applied;
    /// The stream ended; what was applied stays in use until the next update.
    fn disconnected(&mut self) {}
}

/// The first field of Listener, RouteConfiguration, Cluster and ClusterLoadAssignment is the
/// resource's name, so one message reads it from any of them without decoding the rest.
#[derive(Clone, PartialEq, Message)]
struct Named {
    #[prost(string, tag = "1")]
    name: String,
}

/// Why a response's envelope cannot be processed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// A resource's Any is of another type than the response.
    #[error("resource {index} has type {found}, expected {expected}")]
    TypeMismatch {
        /// Position in the response.
        index: usize,
        /// The Any's type URL.
        found: String,
        /// The response's type URL.
        expected: String,
    },
    /// The bytes do not decode as the type's message.
    #[error("resource {index} does not decode: {reason}")]
    Undecodable {
        /// Position in the response.
        index: usize,
        /// The decoder's message.
        reason: String,
    },
    /// A resource without a name.
    #[error("resource {index} has no name")]
    Nameless {
        /// Position in the response.
        index: usize,
    },
    /// Two resources of one response share a name.
    #[error("duplicate resource {0}")]
    Duplicate(String),
}

/// The name of a resource of one of the four types, read from its encoding.
pub fn resource_name(any: &Any) -> Result<String, prost::DecodeError> {
    Ok(Named::decode(any.value.as_slice())?.name)
}

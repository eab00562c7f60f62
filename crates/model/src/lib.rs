//! Typed Istio and Kubernetes resources, loaded from multi-document YAML or JSON,
//! with findings that name the file, line, column and resource.
//!
//! [`load_str`] reads one file, [`validate`] applies Istio's rules to each resource, and
//! [`ConfigSet`] keeps every file's last good content across reloads from [`scan`].

pub mod load;
pub mod resources;
mod schema;
mod shape;
pub mod source;
pub mod validate;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

pub use load::{FileLoad, load_str};
pub use resources::*;
pub use source::{ConfigSet, scan};

/// Where a resource came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The file it was read from.
    pub file: Arc<PathBuf>,
    /// 1-based line where its document starts.
    pub line: u64,
    /// Where its `metadata.name` is written, which a finding about the resource as a whole
    /// (a duplicate) points at.
    pub name: Position,
}

/// A 1-based line and column in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    /// Line.
    pub line: u64,
    /// Column, counted in characters.
    pub column: u64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// A resource of kind `S` with its metadata and origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object<S> {
    /// Metadata, namespace filled in (`default` when absent).
    pub meta: ObjectMeta,
    /// The resource's spec.
    pub spec: S,
    /// Where it was defined.
    pub origin: Origin,
}

/// A Kubernetes Pod: labels from metadata, spec and status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pod {
    /// Pod spec.
    pub spec: PodSpec,
    /// Pod status.
    pub status: PodStatus,
}

/// A Kubernetes Node. Only its labels count: istiod takes the locality of a pod without
/// one of its own from the topology labels of the node it runs on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KubeNode;

/// An Istio WorkloadEntry: spec and status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadEntry {
    /// WorkloadEntry spec.
    pub spec: WorkloadEntrySpec,
    /// WorkloadEntry status.
    pub status: WorkloadEntryStatus,
}

/// A Kubernetes Secret: its type and its data, decoded. `Debug` leaves the data out.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret {
    /// `type`, e.g. `kubernetes.io/tls` or `Opaque`.
    pub kind: String,
    /// The data by key, `stringData` merged in.
    pub data: std::collections::BTreeMap<String, Vec<u8>>,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret")
            .field("kind", &self.kind)
            .field("keys", &self.data.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Every resource kind portcullis understands.
#[derive(Debug, Clone, PartialEq)]
pub enum Resource {
    /// `networking.istio.io` ServiceEntry.
    ServiceEntry(Object<ServiceEntrySpec>),
    /// `networking.istio.io` WorkloadEntry.
    WorkloadEntry(Object<WorkloadEntry>),
    /// `networking.istio.io` DestinationRule. Boxed, as the mesh config: the two largest
    /// kinds would otherwise set the size of every resource a file holds.
    DestinationRule(Box<Object<DestinationRuleSpec>>),
    /// `networking.istio.io` VirtualService.
    VirtualService(Object<VirtualServiceSpec>),
    /// `networking.istio.io` Sidecar.
    Sidecar(Object<SidecarSpec>),
    /// `security.istio.io` PeerAuthentication.
    PeerAuthentication(Object<PeerAuthenticationSpec>),
    /// Kubernetes `v1` Pod.
    Pod(Object<Pod>),
    /// Kubernetes `v1` Service.
    Service(Object<KubeServiceSpec>),
    /// Kubernetes `v1` Node (cluster-scoped: its namespace is empty).
    Node(Object<KubeNode>),
    /// Kubernetes `v1` Secret (certificates a DestinationRule's `credentialName` names).
    Secret(Object<Secret>),
    /// Istio's mesh config, from the `istio` ConfigMap's `data.mesh`.
    MeshConfig(Box<Object<MeshConfig>>),
}

impl Resource {
    /// The resource's kind as written in YAML.
    pub fn kind(&self) -> &'static str {
        match self {
            Resource::ServiceEntry(_) => "ServiceEntry",
            Resource::WorkloadEntry(_) => "WorkloadEntry",
            Resource::DestinationRule(_) => "DestinationRule",
            Resource::VirtualService(_) => "VirtualService",
            Resource::Sidecar(_) => "Sidecar",
            Resource::PeerAuthentication(_) => "PeerAuthentication",
            Resource::Pod(_) => "Pod",
            Resource::Service(_) => "Service",
            Resource::Node(_) => "Node",
            Resource::Secret(_) => "Secret",
            Resource::MeshConfig(_) => "ConfigMap",
        }
    }

    /// The resource's metadata.
    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Resource::ServiceEntry(o) => &o.meta,
            Resource::WorkloadEntry(o) => &o.meta,
            Resource::DestinationRule(o) => &o.meta,
            Resource::VirtualService(o) => &o.meta,
            Resource::Sidecar(o) => &o.meta,
            Resource::PeerAuthentication(o) => &o.meta,
            Resource::Pod(o) => &o.meta,
            Resource::Service(o) => &o.meta,
            Resource::Node(o) => &o.meta,
            Resource::Secret(o) => &o.meta,
            Resource::MeshConfig(o) => &o.meta,
        }
    }

    /// Where the resource was defined.
    pub fn origin(&self) -> &Origin {
        match self {
            Resource::ServiceEntry(o) => &o.origin,
            Resource::WorkloadEntry(o) => &o.origin,
            Resource::DestinationRule(o) => &o.origin,
            Resource::VirtualService(o) => &o.origin,
            Resource::Sidecar(o) => &o.origin,
            Resource::PeerAuthentication(o) => &o.origin,
            Resource::Pod(o) => &o.origin,
            Resource::Service(o) => &o.origin,
            Resource::Node(o) => &o.origin,
            Resource::Secret(o) => &o.origin,
            Resource::MeshConfig(o) => &o.origin,
        }
    }
}

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The resource (and so its file) is rejected.
    Error,
    /// Accepted, but probably not what the author meant.
    Warning,
}

/// A problem found while loading or validating, printed as
/// `Error [CODE] (kind namespace/name file:line:column) message` (`file:line` when the
/// column is not known).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Error or warning.
    pub severity: Severity,
    /// Stable short code, e.g. `YAML` or `INVALID_HOST`.
    pub code: &'static str,
    /// Resource kind, empty when the document could not be read that far.
    pub kind: String,
    /// `namespace/name`, empty when unknown.
    pub resource: String,
    /// The file.
    pub file: Arc<PathBuf>,
    /// 1-based line.
    pub line: u64,
    /// 1-based column of the field the finding is about, when it points at one.
    pub column: Option<u64>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Error => "Error",
            Severity::Warning => "Warning",
        };
        write!(f, "{severity} [{}] (", self.code)?;
        if !self.kind.is_empty() {
            write!(f, "{} ", self.kind)?;
        }
        if !self.resource.is_empty() {
            write!(f, "{} ", self.resource)?;
        }
        write!(f, "{}:{}", self.file.display(), self.line)?;
        if let Some(column) = self.column {
            write!(f, ":{column}")?;
        }
        write!(f, ") {}", self.message)
    }
}

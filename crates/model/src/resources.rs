//! Serde types for the Istio and Kubernetes resources portcullis reads.
//!
//! Only the fields portcullis acts on are modelled. serde skips the others; which of them
//! are fields of the real schema and which are misspellings is decided by the loader
//! against the schema's field lists (`schema.rs`).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

/// A list without spare capacity. Parsed resources live as long as their file's content
/// does, and a list grown by doubling while parsed keeps room for four entries where
/// there is usually one (a ServiceEntry's single endpoint or port).
fn exact<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    let mut list = Vec::deserialize(deserializer)?;
    list.shrink_to_fit();
    Ok(list)
}

/// Kubernetes object metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// Object name.
    #[serde(default)]
    pub name: String,
    /// Namespace; empty in the file means `default`, filled in by the loader.
    #[serde(default)]
    pub namespace: String,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Annotations, e.g. `proxy.istio.io/health-checks-enabled`.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// `creationTimestamp` as written (RFC 3339); Istio orders conflicting services by it.
    #[serde(default)]
    pub creation_timestamp: Option<String>,
}

/// Label selector used by `workloadSelector` and Kubernetes `selector`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Labels a workload must carry (all of them) to be selected.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Where a ServiceEntry's service lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    /// Outside the mesh (Istio's default).
    #[default]
    MeshExternal,
    /// Part of the mesh.
    MeshInternal,
}

/// How a ServiceEntry's endpoints are found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    /// Forward to the original destination address.
    #[default]
    None,
    /// Use the endpoints' addresses as given.
    Static,
    /// Resolve endpoint hostnames (or the hosts) with DNS; every address is an endpoint.
    Dns,
    /// Resolve with DNS and use one address at a time.
    DnsRoundRobin,
}

/// A port of a ServiceEntry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// Port number the service is reached on.
    pub number: u32,
    /// Protocol: HTTP, HTTPS, HTTP2, GRPC, TLS, TCP, MONGO, ...
    #[serde(default)]
    pub protocol: Option<String>,
    /// Port name, used to look up endpoint port overrides.
    #[serde(default)]
    pub name: String,
    /// Port on the endpoints, when it differs from `number`.
    #[serde(default)]
    pub target_port: Option<u32>,
}

/// The spec of a WorkloadEntry, also used inline as ServiceEntry endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntrySpec {
    /// IP address or hostname of the workload.
    #[serde(default)]
    pub address: String,
    /// Port overrides keyed by the service port's name.
    #[serde(default)]
    pub ports: BTreeMap<String, u32>,
    /// Labels, matched by `workloadSelector`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Network the workload is on.
    #[serde(default)]
    pub network: String,
    /// Locality, `region/zone/subzone`.
    #[serde(default)]
    pub locality: String,
    /// Load-balancing weight; absent means 1.
    #[serde(default)]
    pub weight: Option<u32>,
    /// Service account the workload runs as.
    #[serde(default)]
    pub service_account: String,
}

/// A WorkloadEntry's status, written by istiod's health checks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntryStatus {
    /// Conditions; `Healthy` counts when health checks are enabled by annotation.
    #[serde(default, deserialize_with = "exact")]
    pub conditions: Vec<PodCondition>,
}

/// The spec of a ServiceEntry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntrySpec {
    /// Hostnames, possibly with a `*.` wildcard prefix.
    #[serde(default, deserialize_with = "exact")]
    pub hosts: Vec<String>,
    /// Virtual IPs or CIDR ranges of the service.
    #[serde(default, deserialize_with = "exact")]
    pub addresses: Vec<String>,
    /// Ports the service is reached on.
    #[serde(default, deserialize_with = "exact")]
    pub ports: Vec<ServicePort>,
    /// Inside or outside the mesh.
    #[serde(default)]
    pub location: Location,
    /// How endpoints are found.
    #[serde(default)]
    pub resolution: Resolution,
    /// Inline endpoints.
    #[serde(default, deserialize_with = "exact")]
    pub endpoints: Vec<WorkloadEntrySpec>,
    /// Selects WorkloadEntries and Pods in the same namespace as endpoints.
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelector>,
    /// Namespaces the entry is visible to (`*` all, `.` own); empty means all.
    #[serde(default, deserialize_with = "exact")]
    pub export_to: Vec<String>,
    /// Expected server identities.
    #[serde(default, deserialize_with = "exact")]
    pub subject_alt_names: Vec<String>,
}

/// Load-balancing algorithm named by a DestinationRule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SimpleLb {
    /// Istio's default: least requests (power of two choices).
    #[default]
    Unspecified,
    /// Least requests.
    LeastRequest,
    /// Least connections (an alias of least requests in Envoy).
    LeastConn,
    /// Round robin.
    RoundRobin,
    /// Uniform random.
    Random,
    /// Forward to the original destination.
    Passthrough,
}

/// `trafficPolicy.loadBalancer`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerSettings {
    /// The simple algorithm.
    #[serde(default)]
    pub simple: Option<SimpleLb>,
}

/// `trafficPolicy` of a DestinationRule or one of its subsets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicy {
    /// Load balancer settings.
    #[serde(default)]
    pub load_balancer: Option<LoadBalancerSettings>,
}

/// A named subset of a DestinationRule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    /// Subset name.
    pub name: String,
    /// Endpoint labels that define the subset.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Policy overriding the rule's for this subset.
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
}

/// The spec of a DestinationRule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    /// Host the rule applies to.
    #[serde(default)]
    pub host: String,
    /// Policy for all of the host's traffic.
    #[serde(default)]
    pub traffic_policy: Option<TrafficPolicy>,
    /// Subsets.
    #[serde(default, deserialize_with = "exact")]
    pub subsets: Vec<Subset>,
    /// Namespaces the rule is visible to.
    #[serde(default, deserialize_with = "exact")]
    pub export_to: Vec<String>,
}

/// The spec of a VirtualService; kept as raw data until routing rules are implemented.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    /// Hosts the routes apply to.
    #[serde(default, deserialize_with = "exact")]
    pub hosts: Vec<String>,
}

/// Outbound traffic policy mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboundMode {
    /// Only registered destinations are reachable.
    RegistryOnly,
    /// Unregistered destinations are passed through.
    AllowAny,
}

impl<'de> Deserialize<'de> for OutboundMode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        const SUPPORTED: &str = "supported modes: REGISTRY_ONLY, ALLOW_ANY";
        let mode = String::deserialize(deserializer)?;
        match mode.as_str() {
            "REGISTRY_ONLY" => Ok(OutboundMode::RegistryOnly),
            "ALLOW_ANY" => Ok(OutboundMode::AllowAny),
            // Istio's newer mode sends unregistered HTTP to the Host header's DNS answer
            // through Envoy's dynamic forward proxy, a data path portcullis does not have.
            "ALLOW_ANY_DYNAMIC_DNS" => Err(serde::de::Error::custom(format!(
                "outbound traffic policy mode ALLOW_ANY_DYNAMIC_DNS (Istio's dynamic forward \
                 proxy for unregistered HTTP hosts) is not supported by portcullis; {SUPPORTED}"
            ))),
            other => Err(serde::de::Error::custom(format!(
                "unknown outbound traffic policy mode `{other}`; {SUPPORTED}"
            ))),
        }
    }
}

/// `outboundTrafficPolicy` in a Sidecar or in the mesh config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboundTrafficPolicy {
    /// The mode; absent means "not set here".
    #[serde(default)]
    pub mode: Option<OutboundMode>,
}

/// The port of a Sidecar egress listener.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarPort {
    /// Port number the listener takes traffic on.
    #[serde(default)]
    pub number: u32,
    /// Protocol; `HTTP_PROXY` makes the listener an explicit proxy that matches no port.
    #[serde(default)]
    pub protocol: Option<String>,
    /// Port name.
    #[serde(default)]
    pub name: String,
}

/// One `egress` listener of a Sidecar.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarEgress {
    /// The port the listener is for; absent means every port no other listener names.
    #[serde(default)]
    pub port: Option<SidecarPort>,
    /// `namespace/host` patterns the workload may reach.
    #[serde(default, deserialize_with = "exact")]
    pub hosts: Vec<String>,
}

/// The spec of a Sidecar.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    /// Workloads the Sidecar applies to; absent means the whole namespace.
    #[serde(default)]
    pub workload_selector: Option<WorkloadSelector>,
    /// Outbound policy for the selected workloads.
    #[serde(default)]
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
    /// Egress listeners.
    #[serde(default, deserialize_with = "exact")]
    pub egress: Vec<SidecarEgress>,
}

/// A container port of a Pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    /// Port number.
    pub container_port: u32,
    /// Port name.
    #[serde(default)]
    pub name: String,
    /// TCP, UDP or SCTP.
    #[serde(default)]
    pub protocol: Option<String>,
}

/// A container of a Pod.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    /// Container name.
    #[serde(default)]
    pub name: String,
    /// Declared ports.
    #[serde(default, deserialize_with = "exact")]
    pub ports: Vec<ContainerPort>,
}

/// A Pod's spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    /// Containers.
    #[serde(default, deserialize_with = "exact")]
    pub containers: Vec<Container>,
}

/// A Pod condition such as `Ready`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodCondition {
    /// Condition type, e.g. `Ready`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
}

/// One of a Pod's IPs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct PodIp {
    /// The address.
    pub ip: String,
}

/// A Pod's status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    /// Primary pod IP.
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    /// All pod IPs (dual stack).
    #[serde(default, deserialize_with = "exact", rename = "podIPs")]
    pub pod_ips: Vec<PodIp>,
    /// `Pending`, `Running`, `Succeeded`, `Failed`, `Unknown`.
    #[serde(default)]
    pub phase: Option<String>,
    /// Conditions; a `Ready` condition set to `False` takes the pod out of load balancing.
    #[serde(default, deserialize_with = "exact")]
    pub conditions: Vec<PodCondition>,
}

/// A Kubernetes Service port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KubePort {
    /// Port name.
    #[serde(default)]
    pub name: String,
    /// Port the service is reached on.
    pub port: u32,
    /// Port on the pods: a number or a container port name.
    #[serde(default)]
    pub target_port: Option<TargetPort>,
    /// TCP, UDP or SCTP.
    #[serde(default)]
    pub protocol: Option<String>,
    /// Application protocol, e.g. `http`.
    #[serde(default)]
    pub app_protocol: Option<String>,
}

/// A Service `targetPort`: a number or a named container port.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum TargetPort {
    /// A port number.
    Number(u32),
    /// A container port name.
    Name(String),
}

/// A Kubernetes Service's spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeServiceSpec {
    /// Cluster IP, or `None` for a headless service.
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    /// All cluster IPs (dual stack).
    #[serde(default, deserialize_with = "exact", rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    /// Ports.
    #[serde(default, deserialize_with = "exact")]
    pub ports: Vec<KubePort>,
    /// Pod selector; absent means endpoints are managed elsewhere.
    #[serde(default)]
    pub selector: Option<BTreeMap<String, String>>,
    /// `ClusterIP`, `NodePort`, `LoadBalancer`, `ExternalName`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Target of an `ExternalName` service.
    #[serde(default)]
    pub external_name: Option<String>,
}

/// The parts of Istio's `MeshConfig` portcullis uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfig {
    /// Mesh-wide outbound traffic policy.
    #[serde(default)]
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
    /// Root namespace for mesh-wide resources (default `istio-system`).
    #[serde(default)]
    pub root_namespace: Option<String>,
    /// Where services without `exportTo` are visible; empty means everywhere (`*`).
    #[serde(default, deserialize_with = "exact")]
    pub default_service_export_to: Vec<String>,
}

//! The addresses, pages and Istio/Kubernetes documents of the egress lock-down scenario.

/// The "external host" outside the cluster (nginx).
pub const EXTERNAL_IP: &str = "10.50.0.1";
/// The client pod where portcullis runs beside curl.
pub const POD_IP: &str = "10.50.1.1";
/// The in-cluster pod (nginx) that step 4 adds as a second endpoint.
pub const IN_CLUSTER_IP: &str = "10.50.2.1";
/// An unregistered host used to prove spoofed requests never reach it.
pub const ROGUE_IP: &str = "10.50.3.3";
/// What `app.internal.com` resolves to inside the pod: an address where nothing listens, like
/// the VIP Istio's DNS proxy auto-allocates, so only the redirect to portcullis can answer.
pub const APP_VIP: &str = "10.50.200.1";
/// Prefix length of the lab's one flat subnet.
pub const PREFIX: u8 = 16;

/// The external host's IPv6 address (the lab is dual-stack on one /64).
pub const EXTERNAL_IP6: &str = "fd00:50::1";
/// The client pod's IPv6 address.
pub const POD_IP6: &str = "fd00:50::11";
/// The in-cluster pod's IPv6 address.
pub const IN_CLUSTER_IP6: &str = "fd00:50::21";
/// The rogue host's IPv6 address.
pub const ROGUE_IP6: &str = "fd00:50::33";
/// Prefix length of the lab's IPv6 subnet.
pub const PREFIX6: u8 = 64;

/// The registered hostname.
pub const APP_HOST: &str = "app.internal.com";

/// The external host's page.
pub const EXTERNAL_PAGE: &str = "Welcome to the external host\n";
/// A phrase that identifies the external host's page.
pub const EXTERNAL_MARK: &str = "external host";
/// The in-cluster pod's page.
pub const IN_CLUSTER_PAGE: &str = "This is an Nginx Pod\n";
/// A phrase that identifies the in-cluster pod's page.
pub const IN_CLUSTER_MARK: &str = "This is an Nginx Pod";

/// Istio's mesh ConfigMap with the given `outboundTrafficPolicy.mode`.
pub fn mesh_config(mode: &str) -> String {
    format!(
        "apiVersion: v1
kind: ConfigMap
metadata:
  name: istio
  namespace: istio-system
data:
  mesh: |-
    outboundTrafficPolicy:
      mode: {mode}
"
    )
}

/// Step 3: the external host as a workload of the mesh.
pub const WORKLOAD_ENTRY: &str = "apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: external-host
  namespace: default
spec:
  address: 10.50.0.1
  labels:
    app: external
";

/// Step 3: the hostname, served by every workload labelled `app: external`.
pub const SERVICE_ENTRY: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: app-internal
  namespace: default
spec:
  hosts:
  - app.internal.com
  location: MESH_INTERNAL
  ports:
  - number: 80
    name: http
    protocol: HTTP
  resolution: STATIC
  workloadSelector:
    labels:
      app: external
";

/// Step 4: the in-cluster nginx pod, running and ready, with the same label.
pub const POD: &str = "apiVersion: v1
kind: Pod
metadata:
  name: nginx
  namespace: default
  labels:
    app: external
spec:
  containers:
  - name: nginx
    image: nginx
    ports:
    - containerPort: 80
status:
  phase: Running
  podIP: 10.50.2.1
  podIPs:
  - ip: 10.50.2.1
  conditions:
  - type: Ready
    status: \"True\"
";

/// A file that is not valid YAML at all (an unclosed flow sequence).
pub const MALFORMED_YAML: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: broken
  namespace: default
spec:
  hosts: [broken.internal.com
  ports:
";

/// The in-cluster pod while it is still starting: running but not ready.
pub fn pod_not_ready() -> String {
    POD.replace("status: \"True\"", "status: \"False\"")
}

/// `spec` lines that select the workloads labelled `app: external` (the WorkloadEntry of
/// [`WORKLOAD_ENTRY`] at 10.50.0.1).
pub const SELECT_EXTERNAL: &str = "  workloadSelector:\n    labels:\n      app: external\n";

/// A ServiceEntry `name` for `hosts` on one `port` with `protocol` and `resolution`; `tail` is
/// appended to `spec` (say [`SELECT_EXTERNAL`], or nothing).
pub fn service_entry(
    name: &str,
    hosts: &[&str],
    port: u16,
    protocol: &str,
    resolution: &str,
    tail: &str,
) -> String {
    let hosts: String = hosts.iter().map(|h| format!("  - \"{h}\"\n")).collect();
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: {name}
  namespace: default
spec:
  hosts:
{hosts}  location: MESH_EXTERNAL
  ports:
  - number: {port}
    name: {proto_lower}-{port}
    protocol: {protocol}
  resolution: {resolution}
{tail}",
        proto_lower = protocol.to_ascii_lowercase()
    )
}

/// A STATIC ServiceEntry `name` for `hosts` on `port`, served by the external host's
/// WorkloadEntry ([`WORKLOAD_ENTRY`]).
pub fn external_service(name: &str, hosts: &[&str], port: u16, protocol: &str) -> String {
    service_entry(name, hosts, port, protocol, "STATIC", SELECT_EXTERNAL)
}

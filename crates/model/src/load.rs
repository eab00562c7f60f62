//! Multi-document YAML/JSON loading.
//!
//! A file is split into documents at `---` lines so that every finding can name the line
//! its document starts on; each document is read once for its header (apiVersion, kind,
//! metadata) and once into the typed resource the header names.

use std::collections::BTreeMap;
use std::hash::Hasher;
use std::io::{self, BufRead};
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::{
    DestinationRuleSpec, Finding, KubeServiceSpec, MeshConfig, Object, ObjectMeta, Origin, Pod,
    PodSpec, PodStatus, Resource, ServiceEntrySpec, Severity, SidecarSpec, VirtualServiceSpec,
    WorkloadEntrySpec, validate,
};

/// What one file contributed: its resources and the findings about them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileLoad {
    /// Resources that loaded and validated.
    pub resources: Vec<Resource>,
    /// Errors and warnings, in file order.
    pub findings: Vec<Finding>,
}

impl FileLoad {
    /// Whether any finding is an error, which makes the file as a whole unusable.
    pub fn has_errors(&self) -> bool {
        self.findings.iter().any(|f| f.severity == Severity::Error)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: ObjectMeta,
}

#[derive(Deserialize)]
struct WithSpec<S> {
    #[serde(default = "Option::default")]
    spec: Option<S>,
}

#[derive(Deserialize)]
struct PodDoc {
    #[serde(default)]
    spec: PodSpec,
    #[serde(default)]
    status: PodStatus,
}

#[derive(Deserialize)]
struct ConfigMapDoc {
    #[serde(default)]
    data: BTreeMap<String, String>,
}

const ISTIO_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

/// Loads every document of `text`, read from `file`, validating each resource.
pub fn load_str(text: &str, file: &Arc<PathBuf>) -> FileLoad {
    let mut out = FileLoad::default();
    let mut documents = Documents::default();
    for line in text.split_inclusive('\n') {
        documents.push(line, |doc| load_document(doc, file, &mut out));
    }
    documents.finish(|doc| load_document(doc, file, &mut out));
    out
}

/// [`load_str`] for a file read a line at a time, each line also fed to `digest`: only one
/// document is in memory at once, however large the file.
pub(crate) fn load_lines(
    mut reader: impl BufRead,
    file: &Arc<PathBuf>,
    digest: &mut impl Hasher,
) -> io::Result<FileLoad> {
    let mut out = FileLoad::default();
    let mut documents = Documents::default();
    let mut line = String::new();
    while reader.read_line(&mut line)? > 0 {
        digest.write(line.as_bytes());
        documents.push(&line, |doc| load_document(doc, file, &mut out));
        line.clear();
    }
    documents.finish(|doc| load_document(doc, file, &mut out));
    Ok(out)
}

/// One document of a multi-document file.
struct Document<'a> {
    /// The document's text, including its leading `---` marker if it has one.
    text: &'a str,
    /// 1-based line of `text`'s first line, which parser locations are relative to.
    start_line: u64,
    /// 1-based line of the first line with content, the line findings point at.
    first_line: u64,
}

/// Splits a file into documents at document markers, fed a line at a time.
struct Documents {
    /// The current document's lines so far.
    text: String,
    /// Lines fed so far.
    lines: u64,
    /// Line number of the current document's first line (its marker, if it has one).
    start_line: u64,
    /// Its first line with content; a document without any is skipped.
    first_line: Option<u64>,
}

impl Default for Documents {
    fn default() -> Self {
        Documents {
            text: String::new(),
            lines: 0,
            start_line: 1,
            first_line: None,
        }
    }
}

impl Documents {
    /// Takes the next line, with its line ending; a marker ends the current document, which
    /// goes to `done` if it has content.
    fn push(&mut self, line: &str, done: impl FnOnce(&Document<'_>)) {
        self.lines += 1;
        let trimmed = line.trim_end();
        let is_marker = trimmed == "---"
            || trimmed == "..."
            || trimmed.starts_with("--- ")
            || trimmed.starts_with("---\t");
        if is_marker {
            self.end(done);
            self.text.clear();
            self.start_line = self.lines;
        }
        if self.first_line.is_none() && has_content(trimmed) {
            self.first_line = Some(self.lines);
        }
        self.text.push_str(line);
    }

    /// Ends the input: the last document goes to `done` if it has content.
    fn finish(mut self, done: impl FnOnce(&Document<'_>)) {
        self.end(done);
    }

    fn end(&mut self, done: impl FnOnce(&Document<'_>)) {
        if let Some(first_line) = self.first_line.take() {
            done(&Document {
                text: &self.text,
                start_line: self.start_line,
                first_line,
            });
        }
    }
}

/// Whether a line holds YAML content rather than blank space, a comment or a bare marker.
fn has_content(line: &str) -> bool {
    let rest = line
        .strip_prefix("---")
        .or_else(|| line.strip_prefix("..."))
        .unwrap_or(line)
        .trim();
    !rest.is_empty() && !rest.starts_with('#')
}

fn finding(origin: &Origin, code: &'static str, severity: Severity, message: String) -> Finding {
    Finding {
        severity,
        code,
        kind: String::new(),
        resource: String::new(),
        file: Arc::clone(&origin.file),
        line: origin.line,
        message,
    }
}

fn yaml_error(doc: &Document<'_>, origin: &Origin, err: &serde_saphyr::Error) -> Finding {
    let mut f = finding(origin, "YAML", Severity::Error, err.to_string());
    if let Some(loc) = err.location() {
        // Locations are 1-based within the document's text.
        f.line = doc.start_line + loc.line().saturating_sub(1);
    }
    f
}

fn load_document(doc: &Document<'_>, file: &Arc<PathBuf>, out: &mut FileLoad) {
    let origin = Origin {
        file: Arc::clone(file),
        line: doc.first_line,
    };
    let header: Header = match serde_saphyr::from_str(doc.text) {
        Ok(h) => h,
        Err(e) => {
            out.findings.push(yaml_error(doc, &origin, &e));
            return;
        }
    };
    let mut meta = header.metadata;
    if meta.namespace.is_empty() {
        meta.namespace = "default".to_string();
    }
    let resource_name = format!("{}/{}", meta.namespace, meta.name);
    let mut findings = Vec::new();
    let resource = typed(
        doc,
        &header.api_version,
        &header.kind,
        meta,
        &origin,
        &mut findings,
    );
    for mut f in findings {
        f.kind.clone_from(&header.kind);
        f.resource.clone_from(&resource_name);
        out.findings.push(f);
    }
    if let Some(resource) = resource {
        let mut findings = validate::resource(&resource);
        for f in &mut findings {
            f.kind = resource.kind().to_string();
            f.resource.clone_from(&resource_name);
        }
        let ok = !findings.iter().any(|f| f.severity == Severity::Error);
        out.findings.extend(findings);
        if ok {
            out.resources.push(resource);
        }
    }
}

fn spec<S: DeserializeOwned + Default>(
    doc: &Document<'_>,
    origin: &Origin,
    findings: &mut Vec<Finding>,
) -> Option<S> {
    match serde_saphyr::from_str::<WithSpec<S>>(doc.text) {
        Ok(w) => Some(w.spec.unwrap_or_default()),
        Err(e) => {
            findings.push(yaml_error(doc, origin, &e));
            None
        }
    }
}

fn object<S>(meta: ObjectMeta, spec: S, origin: &Origin) -> Object<S> {
    Object {
        meta,
        spec,
        origin: origin.clone(),
    }
}

fn typed(
    doc: &Document<'_>,
    api_version: &str,
    kind: &str,
    meta: ObjectMeta,
    origin: &Origin,
    findings: &mut Vec<Finding>,
) -> Option<Resource> {
    let istio = ISTIO_VERSIONS.contains(&api_version);
    let core = api_version == "v1";
    let skipped = |findings: &mut Vec<Finding>, why: String| {
        findings.push(finding(origin, "SKIPPED", Severity::Warning, why));
        None
    };
    if kind.is_empty() {
        return skipped(findings, "document has no kind, skipped".to_string());
    }
    if meta.name.is_empty() {
        findings.push(finding(
            origin,
            "NO_NAME",
            Severity::Error,
            "metadata.name is required".to_string(),
        ));
        return None;
    }
    match (kind, istio, core) {
        ("ServiceEntry", true, _) => spec::<ServiceEntrySpec>(doc, origin, findings)
            .map(|s| Resource::ServiceEntry(object(meta, s, origin))),
        ("WorkloadEntry", true, _) => spec::<WorkloadEntrySpec>(doc, origin, findings)
            .map(|s| Resource::WorkloadEntry(object(meta, s, origin))),
        ("DestinationRule", true, _) => spec::<DestinationRuleSpec>(doc, origin, findings)
            .map(|s| Resource::DestinationRule(object(meta, s, origin))),
        ("VirtualService", true, _) => spec::<VirtualServiceSpec>(doc, origin, findings)
            .map(|s| Resource::VirtualService(object(meta, s, origin))),
        ("Sidecar", true, _) => spec::<SidecarSpec>(doc, origin, findings)
            .map(|s| Resource::Sidecar(object(meta, s, origin))),
        ("Pod", _, true) => match serde_saphyr::from_str::<PodDoc>(doc.text) {
            Ok(p) => Some(Resource::Pod(object(
                meta,
                Pod {
                    spec: p.spec,
                    status: p.status,
                },
                origin,
            ))),
            Err(e) => {
                findings.push(yaml_error(doc, origin, &e));
                None
            }
        },
        ("Service", _, true) => spec::<KubeServiceSpec>(doc, origin, findings)
            .map(|s| Resource::Service(object(meta, s, origin))),
        ("ConfigMap", _, true) => mesh_config(doc, meta, origin, findings),
        _ => skipped(
            findings,
            format!("{api_version} {kind} is not a kind portcullis reads, skipped"),
        ),
    }
}

fn mesh_config(
    doc: &Document<'_>,
    meta: ObjectMeta,
    origin: &Origin,
    findings: &mut Vec<Finding>,
) -> Option<Resource> {
    if meta.name != "istio" || meta.namespace != "istio-system" {
        findings.push(finding(
            origin,
            "SKIPPED",
            Severity::Warning,
            "ConfigMap is not Istio's mesh config (istio in istio-system), skipped".to_string(),
        ));
        return None;
    }
    let data = match serde_saphyr::from_str::<ConfigMapDoc>(doc.text) {
        Ok(d) => d.data,
        Err(e) => {
            findings.push(yaml_error(doc, origin, &e));
            return None;
        }
    };
    let Some(mesh) = data.get("mesh") else {
        return Some(Resource::MeshConfig(object(
            meta,
            MeshConfig::default(),
            origin,
        )));
    };
    match serde_saphyr::from_str::<Option<MeshConfig>>(mesh) {
        Ok(m) => Some(Resource::MeshConfig(object(
            meta,
            m.unwrap_or_default(),
            origin,
        ))),
        Err(e) => {
            let mut f = finding(origin, "MESH_CONFIG", Severity::Error, String::new());
            f.message = format!("data.mesh: {e}");
            findings.push(f);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Location, OutboundMode, Resolution, SimpleLb, TargetPort};
    use std::path::Path;

    fn load(text: &str) -> FileLoad {
        load_str(text, &Arc::new(PathBuf::from("cfg/test.yaml")))
    }

    fn codes(load: &FileLoad) -> Vec<(Severity, &'static str)> {
        load.findings.iter().map(|f| (f.severity, f.code)).collect()
    }

    fn only<T>(load: &FileLoad, pick: impl Fn(&Resource) -> Option<&T>) -> T
    where
        T: Clone,
    {
        assert_eq!(load.resources.len(), 1, "{:#?}", load.findings);
        pick(&load.resources[0])
            .cloned()
            .expect("resource of the expected kind")
    }

    #[test]
    fn service_entry_with_endpoints_every_field() {
        let l = load(
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: external-svc
  namespace: egress
  creationTimestamp: "2020-01-01T00:00:00Z"
  labels:
    team: payments
spec:
  hosts:
  - api.example.com
  - "*.api.example.com"
  addresses:
  - 240.0.0.1
  - 10.1.0.0/16
  ports:
  - number: 443
    name: https
    protocol: HTTPS
  - number: 8080
    name: http-alt
    protocol: http
    targetPort: 9090
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints:
  - address: 10.1.2.3
    ports:
      https: 8443
    labels:
      version: v1
    network: net-a
    locality: us-east1/us-east1-b/rack1
    weight: 3
    serviceAccount: payments-sa
  - address: 10.1.2.4
  exportTo:
  - "."
  - istio-system
  subjectAltNames:
  - spiffe://cluster.local/ns/egress/sa/payments
"#,
        );
        assert_eq!(codes(&l), vec![]);
        let Resource::ServiceEntry(o) = &l.resources[0] else {
            panic!("not a ServiceEntry: {l:?}");
        };
        assert_eq!(o.meta.name, "external-svc");
        assert_eq!(o.meta.namespace, "egress");
        assert_eq!(o.meta.labels["team"], "payments");
        assert_eq!(
            o.meta.creation_timestamp.as_deref(),
            Some("2020-01-01T00:00:00Z")
        );
        assert_eq!(o.origin.line, 2);
        assert_eq!(o.origin.file.as_path(), Path::new("cfg/test.yaml"));
        let s = &o.spec;
        assert_eq!(s.hosts, ["api.example.com", "*.api.example.com"]);
        assert_eq!(s.addresses, ["240.0.0.1", "10.1.0.0/16"]);
        assert_eq!(s.ports.len(), 2);
        assert_eq!(s.ports[0].number, 443);
        assert_eq!(s.ports[0].name, "https");
        assert_eq!(s.ports[0].protocol.as_deref(), Some("HTTPS"));
        assert_eq!(s.ports[0].target_port, None);
        assert_eq!(s.ports[1].protocol.as_deref(), Some("http"));
        assert_eq!(s.ports[1].target_port, Some(9090));
        assert_eq!(s.location, Location::MeshInternal);
        assert_eq!(s.resolution, Resolution::Static);
        assert_eq!(s.workload_selector, None);
        let e = &s.endpoints[0];
        assert_eq!(e.address, "10.1.2.3");
        assert_eq!(e.ports["https"], 8443);
        assert_eq!(e.labels["version"], "v1");
        assert_eq!(e.network, "net-a");
        assert_eq!(e.locality, "us-east1/us-east1-b/rack1");
        assert_eq!(e.weight, Some(3));
        assert_eq!(e.service_account, "payments-sa");
        assert_eq!(s.endpoints[1].weight, None);
        assert_eq!(s.export_to, [".", "istio-system"]);
        assert_eq!(
            s.subject_alt_names,
            ["spiffe://cluster.local/ns/egress/sa/payments"]
        );
    }

    #[test]
    fn service_entry_defaults_and_selector() {
        let l = load(
            "apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: vms}
spec:
  hosts: [vms.internal.example.com]
  addresses: [10.9.0.1]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  workloadSelector:
    labels: {app: vm}
",
        );
        assert_eq!(codes(&l), vec![]);
        let Resource::ServiceEntry(o) = &l.resources[0] else {
            panic!("{l:?}");
        };
        assert_eq!(o.meta.namespace, "default");
        assert_eq!(o.spec.location, Location::MeshExternal);
        assert_eq!(
            o.spec
                .workload_selector
                .as_ref()
                .map(|w| w.labels["app"].as_str()),
            Some("vm")
        );
        assert!(o.spec.endpoints.is_empty() && o.spec.export_to.is_empty());

        let l = load(
            "apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: bare}
spec:
  hosts: [example.com]
  ports: [{number: 443, name: https, protocol: TLS}]
",
        );
        let Resource::ServiceEntry(o) = &l.resources[0] else {
            panic!("{l:?}");
        };
        assert_eq!(o.spec.resolution, Resolution::None);
        assert_eq!(o.spec.location, Location::MeshExternal);
    }

    #[test]
    fn resolutions_parse() {
        for (text, want) in [
            ("NONE", Resolution::None),
            ("STATIC", Resolution::Static),
            ("DNS", Resolution::Dns),
            ("DNS_ROUND_ROBIN", Resolution::DnsRoundRobin),
        ] {
            let l = load(&format!(
                "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: r}}
spec:
  hosts: [example.com]
  addresses: [1.2.3.4]
  ports: [{{number: 443, name: tls, protocol: TLS}}]
  resolution: {text}
"
            ));
            let Some(Resource::ServiceEntry(o)) = l.resources.first() else {
                panic!("{text}: {l:?}");
            };
            assert_eq!(o.spec.resolution, want);
        }
    }

    #[test]
    fn workload_entry_every_field() {
        let l = load(
            "apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: vm-1
  namespace: vms
spec:
  address: 10.0.0.7
  ports:
    http: 8080
  labels:
    app: vm
  network: vpc-1
  locality: eu-west1/a
  weight: 2
  serviceAccount: vm-sa
",
        );
        let we = only(&l, |r| match r {
            Resource::WorkloadEntry(o) => Some(o),
            _ => None,
        });
        assert_eq!(we.meta.namespace, "vms");
        assert_eq!(we.spec.address, "10.0.0.7");
        assert_eq!(we.spec.ports["http"], 8080);
        assert_eq!(we.spec.labels["app"], "vm");
        assert_eq!(we.spec.network, "vpc-1");
        assert_eq!(we.spec.locality, "eu-west1/a");
        assert_eq!(we.spec.weight, Some(2));
        assert_eq!(we.spec.service_account, "vm-sa");
    }

    #[test]
    fn destination_rule_every_field() {
        let l = load(
            "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews.prod.svc.cluster.local
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
    connectionPool:
      tcp: {maxConnections: 100}
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
    trafficPolicy:
      loadBalancer:
        simple: RANDOM
  exportTo: ['*']
",
        );
        let dr = only(&l, |r| match r {
            Resource::DestinationRule(o) => Some(o),
            _ => None,
        });
        assert_eq!(dr.spec.host, "reviews.prod.svc.cluster.local");
        let lb = |p: &Option<crate::TrafficPolicy>| {
            p.as_ref()
                .and_then(|p| p.load_balancer.as_ref())
                .and_then(|l| l.simple)
        };
        assert_eq!(lb(&dr.spec.traffic_policy), Some(SimpleLb::RoundRobin));
        assert_eq!(dr.spec.subsets.len(), 2);
        assert_eq!(dr.spec.subsets[0].name, "v1");
        assert_eq!(dr.spec.subsets[0].labels["version"], "v1");
        assert_eq!(lb(&dr.spec.subsets[0].traffic_policy), None);
        assert_eq!(
            lb(&dr.spec.subsets[1].traffic_policy),
            Some(SimpleLb::Random)
        );
        assert_eq!(dr.spec.export_to, ["*"]);
        for (text, want) in [
            ("UNSPECIFIED", SimpleLb::Unspecified),
            ("LEAST_REQUEST", SimpleLb::LeastRequest),
            ("LEAST_CONN", SimpleLb::LeastConn),
            ("PASSTHROUGH", SimpleLb::Passthrough),
        ] {
            let l = load(&format!(
                "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: d}}
spec:
  host: d.example.com
  trafficPolicy: {{loadBalancer: {{simple: {text}}}}}
"
            ));
            let Some(Resource::DestinationRule(o)) = l.resources.first() else {
                panic!("{text}: {l:?}");
            };
            assert_eq!(lb(&o.spec.traffic_policy), Some(want));
        }
    }

    #[test]
    fn virtual_service_and_sidecar() {
        let l = load(
            "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs, namespace: web}
spec:
  hosts: [api.example.com]
  http:
  - route:
    - destination: {host: api.example.com}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: web}
spec:
  workloadSelector:
    labels: {app: web}
  outboundTrafficPolicy:
    mode: ALLOW_ANY
  egress:
  - hosts: ['./*', 'istio-system/*', '*/api.example.com']
",
        );
        assert_eq!(codes(&l), vec![]);
        let Resource::VirtualService(vs) = &l.resources[0] else {
            panic!("{l:?}");
        };
        assert_eq!(vs.spec.hosts, ["api.example.com"]);
        let Resource::Sidecar(sc) = &l.resources[1] else {
            panic!("{l:?}");
        };
        assert_eq!(sc.origin.line, 10);
        assert_eq!(
            sc.spec
                .workload_selector
                .as_ref()
                .map(|w| w.labels["app"].as_str()),
            Some("web")
        );
        assert_eq!(
            sc.spec
                .outbound_traffic_policy
                .as_ref()
                .and_then(|p| p.mode),
            Some(OutboundMode::AllowAny)
        );
        assert_eq!(
            sc.spec.egress[0].hosts,
            ["./*", "istio-system/*", "*/api.example.com"]
        );
    }

    #[test]
    fn pod_every_field() {
        let l = load(
            "apiVersion: v1
kind: Pod
metadata:
  name: web-7d4b9
  namespace: shop
  labels: {app: web, version: v2}
spec:
  containers:
  - name: app
    image: nginx
    ports:
    - containerPort: 8080
      name: http
      protocol: TCP
status:
  phase: Running
  podIP: 10.244.1.5
  podIPs:
  - ip: 10.244.1.5
  - ip: fd00::5
  conditions:
  - type: Ready
    status: 'True'
",
        );
        let pod = only(&l, |r| match r {
            Resource::Pod(o) => Some(o),
            _ => None,
        });
        assert_eq!(pod.meta.labels["version"], "v2");
        let c = &pod.spec.spec.containers[0];
        assert_eq!(c.name, "app");
        assert_eq!(c.ports[0].container_port, 8080);
        assert_eq!(c.ports[0].name, "http");
        assert_eq!(c.ports[0].protocol.as_deref(), Some("TCP"));
        let st = &pod.spec.status;
        assert_eq!(st.phase.as_deref(), Some("Running"));
        assert_eq!(st.pod_ip.as_deref(), Some("10.244.1.5"));
        assert_eq!(st.pod_ips[1].ip, "fd00::5");
        assert_eq!(st.conditions[0].kind, "Ready");
        assert_eq!(st.conditions[0].status, "True");
    }

    #[test]
    fn service_every_field() {
        let l = load(
            "apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: ClusterIP
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, 'fd00::a']
  selector: {app: web}
  ports:
  - name: http
    port: 80
    targetPort: 8080
    protocol: TCP
    appProtocol: http
  - name: grpc
    port: 9090
    targetPort: grpc-port
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: shop}
spec:
  type: ExternalName
  externalName: db.example.com
",
        );
        assert_eq!(codes(&l), vec![]);
        let Resource::Service(s) = &l.resources[0] else {
            panic!("{l:?}");
        };
        let s = &s.spec;
        assert_eq!(s.kind.as_deref(), Some("ClusterIP"));
        assert_eq!(s.cluster_ip.as_deref(), Some("10.96.0.10"));
        assert_eq!(s.cluster_ips, ["10.96.0.10", "fd00::a"]);
        assert_eq!(s.selector.as_ref().map(|m| m["app"].as_str()), Some("web"));
        assert_eq!(s.ports[0].name, "http");
        assert_eq!(s.ports[0].port, 80);
        assert_eq!(s.ports[0].target_port, Some(TargetPort::Number(8080)));
        assert_eq!(s.ports[0].protocol.as_deref(), Some("TCP"));
        assert_eq!(s.ports[0].app_protocol.as_deref(), Some("http"));
        assert_eq!(
            s.ports[1].target_port,
            Some(TargetPort::Name("grpc-port".into()))
        );
        let Resource::Service(e) = &l.resources[1] else {
            panic!("{l:?}");
        };
        assert_eq!(e.spec.external_name.as_deref(), Some("db.example.com"));
        assert_eq!(e.spec.selector, None);
    }

    #[test]
    fn mesh_config_map() {
        let l = load(
            "apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |-
    rootNamespace: istio-config
    outboundTrafficPolicy:
      mode: REGISTRY_ONLY
    accessLogFile: /dev/stdout
  meshNetworks: 'networks: {}'
",
        );
        let m = only(&l, |r| match r {
            Resource::MeshConfig(o) => Some(o),
            _ => None,
        });
        assert_eq!(m.spec.root_namespace.as_deref(), Some("istio-config"));
        assert_eq!(
            m.spec.outbound_traffic_policy.and_then(|p| p.mode),
            Some(OutboundMode::RegistryOnly)
        );
        assert_eq!(l.resources[0].kind(), "ConfigMap");

        for text in [
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\n",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\ndata:\n  mesh: ''\n",
        ] {
            let m = only(&load(text), |r| match r {
                Resource::MeshConfig(o) => Some(o),
                _ => None,
            });
            assert_eq!(m.spec, MeshConfig::default());
        }
    }

    #[test]
    fn bad_mesh_config_is_an_error() {
        let l = load(
            "apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    outboundTrafficPolicy:
      mode: SOMETIMES
",
        );
        assert!(l.resources.is_empty());
        assert_eq!(codes(&l), vec![(Severity::Error, "MESH_CONFIG")]);
        assert!(
            l.findings[0].message.contains("data.mesh"),
            "{}",
            l.findings[0]
        );
        assert_eq!(l.findings[0].kind, "ConfigMap");
        assert_eq!(l.findings[0].resource, "istio-system/istio");
    }

    #[test]
    fn other_config_maps_are_skipped() {
        for meta in ["{name: app-config}", "{name: istio, namespace: default}"] {
            let l = load(&format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {meta}\ndata: {{mesh: 'x: 1'}}\n"
            ));
            assert!(l.resources.is_empty());
            assert_eq!(codes(&l), vec![(Severity::Warning, "SKIPPED")]);
            assert!(!l.has_errors());
        }
    }

    #[test]
    fn bad_yaml_names_file_and_line() {
        let l = load(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ok}
spec:
  hosts: [a.example.com]
  addresses: [1.2.3.4]
  ports: [{number: 80, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: broken}
spec:
  hosts: [b.example.com
  ports: []
",
        );
        assert_eq!(l.resources.len(), 1);
        assert_eq!(codes(&l), vec![(Severity::Error, "YAML")]);
        let f = &l.findings[0];
        assert!((13..=15).contains(&f.line), "line {} of {f}", f.line);
        assert_eq!(f.file.as_path(), Path::new("cfg/test.yaml"));
        assert!(l.has_errors());
    }

    #[test]
    fn tab_indentation_is_a_yaml_error() {
        let l = load("apiVersion: v1\nkind: Service\nmetadata:\n\tname: x\n");
        assert_eq!(codes(&l), vec![(Severity::Error, "YAML")]);
    }

    #[test]
    fn wrong_type_for_a_field() {
        let l = load(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: typed}
spec:
  hosts: [example.com]
  ports:
  - number: eighty
    name: http
",
        );
        assert!(l.resources.is_empty());
        assert_eq!(codes(&l), vec![(Severity::Error, "YAML")]);
        let f = &l.findings[0];
        assert_eq!(f.kind, "ServiceEntry");
        assert_eq!(f.resource, "default/typed");
        assert_eq!(f.line, 7, "{f}");

        let l = load(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: t}\nspec:\n  hosts: example.com\n",
        );
        assert_eq!(codes(&l), vec![(Severity::Error, "YAML")]);
        let l = load(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: t}\nspec:\n  hosts: [a.com]\n  ports: [{number: 70000000000, name: x}]\n",
        );
        assert_eq!(codes(&l), vec![(Severity::Error, "YAML")]);
        let l = load(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: t}\nspec:\n  hosts: [a.com]\n  ports: [{name: x}]\n",
        );
        assert_eq!(
            codes(&l),
            vec![(Severity::Error, "YAML")],
            "missing port number"
        );
    }

    #[test]
    fn unknown_enum_value() {
        let l = load(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: e}
spec:
  hosts: [example.com]
  resolution: FOO
",
        );
        assert!(l.resources.is_empty());
        assert_eq!(codes(&l), vec![(Severity::Error, "YAML")]);
        assert!(l.findings[0].message.contains("FOO"), "{}", l.findings[0]);
        assert_eq!(l.findings[0].line, 6);
    }

    #[test]
    fn missing_name() {
        let l = load(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {namespace: x}\nspec: {hosts: [a.com]}\n",
        );
        assert!(l.resources.is_empty());
        assert_eq!(codes(&l), vec![(Severity::Error, "NO_NAME")]);
        assert_eq!(l.findings[0].kind, "ServiceEntry");
    }

    #[test]
    fn unknown_kind_and_wrong_api_version_are_skipped() {
        let l = load(
            "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec: {}
---
apiVersion: networking.istio.io/v2
kind: ServiceEntry
metadata: {name: future}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
---
apiVersion: networking.istio.io/v1
kind: Pod
metadata: {name: confused}
---
metadata: {name: kindless}
",
        );
        assert!(l.resources.is_empty());
        assert!(!l.has_errors());
        assert_eq!(codes(&l), vec![(Severity::Warning, "SKIPPED"); 5]);
        let lines: Vec<u64> = l.findings.iter().map(|f| f.line).collect();
        assert_eq!(lines, [1, 6, 10, 14, 18]);
        assert!(l.findings[1].message.contains("networking.istio.io/v2"));
    }

    #[test]
    fn documents_with_comments_and_empty_documents() {
        let l = load(
            "# leading comment
---
# only a comment
---
---
apiVersion: networking.istio.io/v1   # trailing comment
kind: WorkloadEntry
metadata: {name: a}
spec: {address: 10.0.0.1}
...
---

---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: b}
spec:
  # a comment inside
  address: 10.0.0.2
---
",
        );
        assert_eq!(codes(&l), vec![]);
        let lines: Vec<u64> = l.resources.iter().map(|r| r.origin().line).collect();
        assert_eq!(lines, [6, 14]);
        assert_eq!(l.resources[1].meta().name, "b");
    }

    #[test]
    fn read_a_line_at_a_time_as_from_a_string() {
        use std::hash::DefaultHasher;
        let text = "# comment\r\n---\r\napiVersion: networking.istio.io/v1\r\nkind: WorkloadEntry
metadata: {name: a}
spec: {address: 10.0.0.1}
...
--- # marker with a comment
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: b}
spec: {address: 'not an ip'}
---
kind: [
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: c}
spec: {address: 10.0.0.3}";
        let file = Arc::new(PathBuf::from("cfg/test.yaml"));
        let whole = load_str(text, &file);
        assert_eq!(whole.resources.len(), 2);
        assert_eq!(codes(&whole).len(), 2);
        let mut digest = DefaultHasher::new();
        let lines = load_lines(text.as_bytes(), &file, &mut digest).expect("read");
        assert_eq!(lines, whole);
        let bad = load_lines(&b"kind: \xff\n"[..], &file, &mut digest);
        assert_eq!(bad.map_err(|e| e.kind()), Err(io::ErrorKind::InvalidData));
    }

    #[test]
    fn empty_file() {
        assert_eq!(load(""), FileLoad::default());
        assert_eq!(load("# nothing\n---\n"), FileLoad::default());
    }

    #[test]
    fn spec_may_be_missing_or_null() {
        let l = load(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: n}\nspec:\n",
        );
        assert!(l.resources.is_empty());
        assert!(
            codes(&l).contains(&(Severity::Error, "NO_HOSTS")),
            "{:?}",
            codes(&l)
        );
    }

    #[test]
    fn json_input() {
        let l = load(
            r#"{
  "apiVersion": "networking.istio.io/v1",
  "kind": "ServiceEntry",
  "metadata": {"name": "json-se", "namespace": "j"},
  "spec": {
    "hosts": ["json.example.com"],
    "ports": [{"number": 443, "name": "https", "protocol": "HTTPS"}],
    "resolution": "DNS"
  }
}"#,
        );
        let se = only(&l, |r| match r {
            Resource::ServiceEntry(o) => Some(o),
            _ => None,
        });
        assert_eq!(se.meta.namespace, "j");
        assert_eq!(se.spec.resolution, Resolution::Dns);
        assert_eq!(se.spec.ports[0].number, 443);

        let l = load(
            r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"ports": [{"port": "http"}]}}"#,
        );
        assert_eq!(codes(&l), vec![(Severity::Error, "YAML")]);
    }

    #[test]
    fn invalid_resource_is_dropped_but_others_load() {
        let l = load(
            "apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: good}
spec: {address: 10.0.0.1}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: bad}
spec: {address: 'not an address'}
",
        );
        assert_eq!(l.resources.len(), 1);
        assert_eq!(codes(&l), vec![(Severity::Error, "INVALID_ADDRESS")]);
        let f = &l.findings[0];
        assert_eq!(
            (f.kind.as_str(), f.resource.as_str(), f.line),
            ("WorkloadEntry", "default/bad", 6)
        );
        assert_eq!(
            f.to_string(),
            "Error [INVALID_ADDRESS] (WorkloadEntry default/bad cfg/test.yaml:6) address \"not an address\" is not an IP address, DNS name or unix:// path"
        );
    }

    #[test]
    fn display_without_kind_or_resource() {
        let l = load("key: [unclosed\n");
        let text = l.findings[0].to_string();
        assert!(text.starts_with("Error [YAML] (cfg/test.yaml:"), "{text}");
        let l = load("metadata: {name: kindless}\n");
        assert_eq!(
            l.findings[0].to_string(),
            "Warning [SKIPPED] (default/kindless cfg/test.yaml:1) document has no kind, skipped"
        );
    }
}

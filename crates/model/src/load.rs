//! Multi-document YAML/JSON loading.
//!
//! A file is split into documents at `---` lines so that every finding can name the line
//! its document starts on; each document is read once for its header (apiVersion, kind,
//! metadata) and once into the typed resource the header names.

use std::collections::BTreeMap;
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
    for (line, doc) in split_documents(text) {
        let origin = Origin {
            file: Arc::clone(file),
            line,
        };
        load_document(doc, origin, &mut out);
    }
    out
}

/// Splits at document markers, yielding each non-empty document with its 1-based start line.
fn split_documents(text: &str) -> Vec<(u64, &str)> {
    let mut docs = Vec::new();
    let mut start = 0usize;
    let mut start_line = 1u64;
    let mut offset = 0usize;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let trimmed = line.trim_end();
        let is_marker = trimmed == "---"
            || trimmed == "..."
            || trimmed.starts_with("--- ")
            || trimmed.starts_with("---\t");
        if is_marker {
            docs.push((start_line, &text[start..offset]));
            start = offset;
            start_line = index as u64 + 1;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start..]));
    docs.retain(|(_, doc)| !is_blank(doc));
    docs
}

fn is_blank(doc: &str) -> bool {
    doc.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#') || t == "---" || t == "..."
    })
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

fn yaml_error(origin: &Origin, err: &serde_saphyr::Error) -> Finding {
    let mut f = finding(origin, "YAML", Severity::Error, err.to_string());
    if let Some(loc) = err.location() {
        // Locations are 1-based within the document, which starts at `origin.line`.
        f.line = origin.line + loc.line().saturating_sub(1);
    }
    f
}

fn load_document(doc: &str, origin: Origin, out: &mut FileLoad) {
    let header: Header = match serde_saphyr::from_str(doc) {
        Ok(h) => h,
        Err(e) => {
            out.findings.push(yaml_error(&origin, &e));
            return;
        }
    };
    let mut meta = header.metadata;
    if meta.namespace.is_empty() {
        meta.namespace = "default".to_string();
    }
    let resource_name = format!("{}/{}", meta.namespace, meta.name);
    let mut findings = Vec::new();
    let resource = typed(doc, &header.api_version, &header.kind, meta, &origin, &mut findings);
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
    doc: &str,
    origin: &Origin,
    findings: &mut Vec<Finding>,
) -> Option<S> {
    match serde_saphyr::from_str::<WithSpec<S>>(doc) {
        Ok(w) => Some(w.spec.unwrap_or_default()),
        Err(e) => {
            findings.push(yaml_error(origin, &e));
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
    doc: &str,
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
        ("Pod", _, true) => match serde_saphyr::from_str::<PodDoc>(doc) {
            Ok(p) => Some(Resource::Pod(object(
                meta,
                Pod {
                    spec: p.spec,
                    status: p.status,
                },
                origin,
            ))),
            Err(e) => {
                findings.push(yaml_error(origin, &e));
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
    doc: &str,
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
    let data = match serde_saphyr::from_str::<ConfigMapDoc>(doc) {
        Ok(d) => d.data,
        Err(e) => {
            findings.push(yaml_error(origin, &e));
            return None;
        }
    };
    let Some(mesh) = data.get("mesh") else {
        return Some(Resource::MeshConfig(object(meta, MeshConfig::default(), origin)));
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

//! Multi-document YAML/JSON loading.
//!
//! A file is split into documents at `---` lines so that every finding can name the line
//! its document starts on; each document is read once for its header (apiVersion, kind,
//! metadata), once for its shape (where each field is written, checked against the real
//! schema's field names) and once into the typed resource the header names. A `kind: List`
//! document is read as its items, each a document of its own.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hasher;
use std::io::{self, BufRead};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use serde_saphyr::{DefaultMessageFormatter, MessageFormatter};

use crate::shape::{self, Node, Pos, Value};
use crate::{
    DestinationRuleSpec, Finding, KubeNode, KubeServiceSpec, MeshConfig, Object, ObjectMeta,
    Origin, PeerAuthenticationSpec, Pod, PodSpec, PodStatus, Position, Resource, Secret,
    ServiceEntrySpec, Severity, SidecarSpec, VirtualServiceSpec, WorkloadEntry, WorkloadEntrySpec,
    WorkloadEntryStatus, schema, validate,
};

/// What one file contributed: its resources and the findings about them.
#[derive(Debug, Clone, Default, PartialEq)]
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

/// A document whose status matters too (Pod, WorkloadEntry).
#[derive(Deserialize)]
struct WithStatus<S, T> {
    #[serde(default)]
    spec: S,
    #[serde(default)]
    status: T,
}

#[derive(Deserialize)]
struct SecretDoc {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    data: BTreeMap<String, String>,
    #[serde(default, rename = "stringData")]
    string_data: BTreeMap<String, String>,
}

/// A Secret's type and data, `data` decoded from base64 and `stringData` taken as written
/// (winning over `data`, as the API server merges them).
fn secret(
    doc: &Document<'_>,
    shape: &Node,
    origin: &Origin,
    findings: &mut Vec<Finding>,
) -> Option<Secret> {
    let parsed = match serde_saphyr::from_str::<SecretDoc>(doc.text) {
        Ok(parsed) => parsed,
        Err(e) => {
            findings.push(yaml_error(doc, origin, &e));
            return None;
        }
    };
    let mut data = BTreeMap::new();
    for (key, encoded) in parsed.data {
        let Some(bytes) = base64_decode(&encoded) else {
            let at = shape
                .find("data")
                .and_then(|d| d.key_at(&key))
                .unwrap_or(shape.at);
            findings.push(field_finding(
                doc,
                origin,
                at,
                "BAD_SECRET_DATA",
                format!("data.{key} is not base64"),
            ));
            return None;
        };
        data.insert(key, bytes);
    }
    for (key, text) in parsed.string_data {
        data.insert(key, text.into_bytes());
    }
    Some(Secret {
        kind: parsed.kind.unwrap_or_else(|| "Opaque".into()),
        data,
    })
}

/// Standard base64 (RFC 4648, padding optional, whitespace ignored), as Kubernetes
/// writes a Secret's `data`.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        }))
    };
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let digits = digits
        .strip_suffix(b"==")
        .or_else(|| digits.strip_suffix(b"="))
        .unwrap_or(&digits);
    if digits.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

#[derive(Deserialize)]
struct ConfigMapDoc {
    #[serde(default)]
    data: BTreeMap<String, String>,
}

/// Loads every document of `text`, read from `file`, validating each resource.
pub fn load_str(text: &str, file: &Arc<PathBuf>) -> FileLoad {
    let mut out = FileLoad::default();
    let mut documents = Documents::default();
    for line in text.split_inclusive('\n') {
        documents.push(line, |doc| load_document(doc, file, &mut out, false));
    }
    documents.finish(|doc| load_document(doc, file, &mut out, false));
    reject_duplicates(&mut out);
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
        documents.push(&line, |doc| load_document(doc, file, &mut out, false));
        line.clear();
    }
    documents.finish(|doc| load_document(doc, file, &mut out, false));
    reject_duplicates(&mut out);
    // The list, grown by doubling, is kept for as long as the file does not change.
    out.resources.shrink_to_fit();
    Ok(out)
}

/// A resource's identity: two resources with the same kind, namespace and name are one
/// too many.
pub(crate) fn identity(r: &Resource) -> (&'static str, &str, &str) {
    let meta = r.meta();
    (r.kind(), &meta.namespace, &meta.name)
}

/// The finding for `again`, which has the identity of a resource defined at `first` in
/// `file`.
pub(crate) fn duplicate(again: &Resource, file: &Path, first: Position) -> Finding {
    let (kind, namespace, name) = identity(again);
    let origin = again.origin();
    Finding {
        severity: Severity::Error,
        code: "DUPLICATE",
        kind: kind.to_string(),
        resource: format!("{namespace}/{name}"),
        file: Arc::clone(&origin.file),
        line: origin.name.line,
        column: Some(origin.name.column),
        message: format!(
            "{kind} {namespace}/{name} is already defined at {}:{first}",
            file.display()
        ),
    }
}

/// Drops every resource that repeats an earlier one of the file, with an error naming both.
fn reject_duplicates(out: &mut FileLoad) {
    let mut seen: HashMap<_, usize> = HashMap::with_capacity(out.resources.len());
    let mut repeated = Vec::new();
    for (i, r) in out.resources.iter().enumerate() {
        if let Some(&first) = seen.get(&identity(r)) {
            let first = out.resources[first].origin();
            repeated.push((i, duplicate(r, &first.file, first.name)));
        } else {
            seen.insert(identity(r), i);
        }
    }
    drop(seen);
    if repeated.is_empty() {
        return;
    }
    for (i, finding) in repeated.into_iter().rev() {
        out.resources.remove(i);
        out.findings.push(finding);
    }
    // Findings stay in file order; each document's own are in one stretch of lines.
    out.findings.sort_by_key(|f| f.line);
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
        column: None,
        message,
    }
}

/// A finding about the field at `at` (a position in `doc`).
fn field_finding(
    doc: &Document<'_>,
    origin: &Origin,
    at: Pos,
    code: &'static str,
    message: String,
) -> Finding {
    let at = doc.position(at);
    Finding {
        line: at.line,
        column: Some(at.column),
        ..finding(origin, code, Severity::Error, message)
    }
}

/// A parser error's message without the parser's own location and source excerpt, which
/// count lines from the document's start: the finding carries the position in the file.
fn parser_message(err: &serde_saphyr::Error) -> String {
    let message = DefaultMessageFormatter.format_message(err.without_snippet());
    // Parts of it come from the input: no control character reaches a terminal or log.
    message
        .chars()
        .flat_map(|c| {
            let escaped = c.is_control().then(|| c.escape_default());
            escaped
                .into_iter()
                .flatten()
                .chain((!c.is_control()).then_some(c))
        })
        .collect()
}

fn yaml_error(doc: &Document<'_>, origin: &Origin, err: &serde_saphyr::Error) -> Finding {
    let mut f = finding(origin, "YAML", Severity::Error, parser_message(err));
    if let Some(loc) = err.location().filter(|l| l.line() > 0) {
        let at = doc.position(Pos {
            line: loc.line(),
            column: loc.column(),
        });
        f.line = at.line;
        f.column = Some(at.column);
    }
    f
}

impl Document<'_> {
    /// The file position of `at`, a position in the document's text.
    fn position(&self, at: Pos) -> Position {
        Position {
            line: self.start_line + at.line.saturating_sub(1),
            column: at.column.max(1),
        }
    }
}

/// The API group portcullis reads Istio resources from, and its versions.
const ISTIO_GROUP: &str = "networking.istio.io";
const ISTIO_GROUP_VERSIONS: [&str; 3] = ["v1", "v1beta1", "v1alpha3"];
/// Kinds of `networking.istio.io` portcullis reads.
const ISTIO_KINDS: [&str; 5] = [
    "ServiceEntry",
    "WorkloadEntry",
    "DestinationRule",
    "VirtualService",
    "Sidecar",
];
/// Kinds of `networking.istio.io` that exist but do not concern an egress sidecar.
const ISTIO_OTHER_KINDS: [&str; 4] = ["Gateway", "EnvoyFilter", "WorkloadGroup", "ProxyConfig"];
/// Kinds of the core `v1` group portcullis reads.
const CORE_KINDS: [&str; 6] = ["Pod", "Service", "ConfigMap", "Secret", "Node", "List"];
/// Kinds of the core `v1` group that do not concern an egress sidecar.
const CORE_OTHER_KINDS: [&str; 12] = [
    "Namespace",
    "Endpoints",
    "ServiceAccount",
    "PersistentVolumeClaim",
    "PersistentVolume",
    "Event",
    "LimitRange",
    "ResourceQuota",
    "ReplicationController",
    "PodTemplate",
    "ComponentStatus",
    "Binding",
];

/// What the loader does with a document, by its apiVersion and kind.
enum Class {
    /// A kind portcullis reads.
    Read,
    /// Not for portcullis: skipped with a note.
    Skip(String),
    /// A misspelt kind or apiVersion in a group portcullis reads.
    Error(&'static str, String),
}

fn classify(api_version: &str, kind: &str) -> Class {
    // The one `security.istio.io` kind a client sidecar needs: it decides auto mTLS.
    if kind == "PeerAuthentication"
        && matches!(
            api_version,
            "security.istio.io/v1" | "security.istio.io/v1beta1"
        )
    {
        return Class::Read;
    }
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let istio = group == ISTIO_GROUP;
    let core = api_version == "v1";
    let own = |k: &str| {
        if ISTIO_KINDS.contains(&k) {
            format!("; {k} is apiVersion {ISTIO_GROUP}/v1")
        } else if CORE_KINDS.contains(&k) {
            format!("; {k} is apiVersion v1")
        } else {
            String::new()
        }
    };
    if istio && !ISTIO_GROUP_VERSIONS.contains(&version) {
        return Class::Error(
            "UNKNOWN_API_VERSION",
            format!(
                "{api_version} is not a version portcullis reads ({})",
                ISTIO_GROUP_VERSIONS
                    .map(|v| format!("{ISTIO_GROUP}/{v}"))
                    .join(", ")
            ),
        );
    }
    if !istio && !group.is_empty() && schema::closest(group, [ISTIO_GROUP].into_iter()).is_some() {
        return Class::Error(
            "UNKNOWN_API_VERSION",
            format!("unknown API group {group} (did you mean {ISTIO_GROUP}/{version}?)"),
        );
    }
    let (read, other): (&[&str], &[&str]) = match (istio, core) {
        (true, _) => (&ISTIO_KINDS, &ISTIO_OTHER_KINDS),
        (_, true) => (&CORE_KINDS, &CORE_OTHER_KINDS),
        _ => {
            return Class::Skip(format!(
                "{api_version} {kind} is not a kind portcullis reads, skipped"
            ));
        }
    };
    if read.contains(&kind) {
        Class::Read
    } else if other.contains(&kind) || kind.strip_suffix("List").is_some_and(|k| read.contains(&k))
    {
        Class::Skip(format!(
            "{api_version} {kind} is not a kind portcullis reads, skipped"
        ))
    } else {
        let hint = match schema::closest(kind, read.iter().chain(other).copied()) {
            Some(close) => format!(" (did you mean {close}?)"),
            None => own(kind),
        };
        Class::Error(
            "UNKNOWN_KIND",
            format!("{api_version} has no kind {kind}{hint}"),
        )
    }
}

fn load_document(doc: &Document<'_>, file: &Arc<PathBuf>, out: &mut FileLoad, in_list: bool) {
    let mut origin = Origin {
        file: Arc::clone(file),
        line: doc.first_line,
        name: Position {
            line: doc.first_line,
            column: 1,
        },
    };
    let header = serde_saphyr::from_str::<Header>(doc.text);
    let shape = match (shape::parse(doc.text), header) {
        (Ok(Some(shape)), Ok(header)) => (shape, header),
        (_, Err(e)) => {
            out.findings.push(yaml_error(doc, &origin, &e));
            return;
        }
        (Err(e), Ok(_)) => {
            let marker = e.marker();
            let at = Pos {
                line: marker.line() as u64,
                column: marker.col() as u64 + 1,
            };
            let message = e.kind().to_string();
            out.findings
                .push(field_finding(doc, &origin, at, "YAML", message));
            return;
        }
        (Ok(None), Ok(_)) => return,
    };
    let (shape, header) = shape;
    if let Some(name) = shape.find("metadata.name") {
        origin.name = doc.position(name.at);
    }
    let mut meta = header.metadata;
    // A Node belongs to no namespace, as Kubernetes ignores one written on it.
    let cluster_scoped = header.kind == "Node" && header.api_version == "v1";
    if cluster_scoped {
        meta.namespace.clear();
    } else if meta.namespace.is_empty() {
        meta.namespace = "default".to_string();
    }
    let resource_name = if cluster_scoped {
        meta.name.clone()
    } else {
        format!("{}/{}", meta.namespace, meta.name)
    };
    let kind = header.kind.as_str();
    let mut findings = Vec::new();
    let resource = match classify(&header.api_version, kind) {
        _ if kind.is_empty() => {
            findings.push(finding(
                &origin,
                "SKIPPED",
                Severity::Warning,
                "document has no kind, skipped".to_string(),
            ));
            None
        }
        Class::Skip(why) => {
            findings.push(finding(&origin, "SKIPPED", Severity::Warning, why));
            None
        }
        Class::Error(code, message) => {
            let field = if code == "UNKNOWN_KIND" {
                "kind"
            } else {
                "apiVersion"
            };
            let at = shape.get(field).map_or(shape.at, |n| n.at);
            findings.push(field_finding(doc, &origin, at, code, message));
            None
        }
        Class::Read if kind == "List" => {
            list(doc, &shape, file, &origin, out, in_list);
            None
        }
        Class::Read => {
            if let Some(schema) = schema::document(kind) {
                for unknown in schema::unknown_fields(&shape, schema) {
                    findings.push(unknown_field(doc, &origin, &unknown));
                }
            }
            typed(doc, &shape, kind, meta, &origin, &mut findings)
        }
    };
    let ok = !findings.iter().any(|f| f.severity == Severity::Error);
    for mut f in findings {
        f.kind = header.kind.clone();
        f.resource.clone_from(&resource_name);
        out.findings.push(f);
    }
    if let Some(resource) = resource {
        // A field that is not written (a missing `spec.hosts`) is pointed at through the
        // nearest part of its path that is.
        let locate = |path: &str| {
            let mut path = path;
            loop {
                if let Some(at) = shape.field_at(path) {
                    return Some(doc.position(at));
                }
                path = &path[..path.rfind(['.', '['])?];
            }
        };
        let mut findings = validate::resource(&resource, &locate);
        for f in &mut findings {
            f.kind = resource.kind().to_string();
            f.resource.clone_from(&resource_name);
        }
        let valid = !findings.iter().any(|f| f.severity == Severity::Error);
        out.findings.extend(findings);
        if ok && valid {
            out.resources.push(resource);
        }
    }
}

fn unknown_field(doc: &Document<'_>, origin: &Origin, unknown: &schema::Unknown) -> Finding {
    let within = if unknown.path.is_empty() {
        String::new()
    } else {
        format!(" in {}", unknown.path)
    };
    let hint = unknown
        .suggestion
        .map(|s| format!(" (did you mean `{s}`?)"))
        .unwrap_or_default();
    field_finding(
        doc,
        origin,
        unknown.at,
        "UNKNOWN_FIELD",
        format!("unknown field `{}`{within}{hint}", unknown.key),
    )
}

/// Reads a `kind: List` (what `kubectl get -o yaml` prints) as its items, each one a
/// document of its own that starts where the item does.
fn list(
    doc: &Document<'_>,
    shape: &Node,
    file: &Arc<PathBuf>,
    origin: &Origin,
    out: &mut FileLoad,
    in_list: bool,
) {
    let mut findings = Vec::new();
    if let Some(schema) = schema::document("List") {
        for unknown in schema::unknown_fields(shape, schema) {
            findings.push(unknown_field(doc, origin, &unknown));
        }
    }
    if in_list {
        findings.push(field_finding(
            doc,
            origin,
            shape.at,
            "NESTED_LIST",
            "a List inside a List is not read".to_string(),
        ));
    }
    let items = match shape.get("items").map(|n| &n.value) {
        Some(Value::Seq(items)) if !in_list => items.as_slice(),
        _ => &[],
    };
    for mut f in findings {
        f.kind = "List".to_string();
        out.findings.push(f);
    }
    for item in items {
        let (start, end) = item.bytes;
        let Some(body) = doc.text.get(start..end) else {
            continue;
        };
        // Spaces in place of what precedes the item on its first line (`- `, `[`), so that
        // columns, and the indentation of the item's later lines, stay as in the file.
        let indent = usize::try_from(item.at.column.saturating_sub(1)).unwrap_or(0);
        let text = format!("{}{body}\n", " ".repeat(indent));
        let line = doc.position(item.at).line;
        let item_doc = Document {
            text: &text,
            start_line: line,
            first_line: line,
        };
        load_document(&item_doc, file, out, true);
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

fn with_status<S: DeserializeOwned + Default, T: DeserializeOwned + Default>(
    doc: &Document<'_>,
    origin: &Origin,
    findings: &mut Vec<Finding>,
) -> Option<(S, T)> {
    match serde_saphyr::from_str::<WithStatus<S, T>>(doc.text) {
        Ok(w) => Some((w.spec, w.status)),
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

/// The typed resource of a kind portcullis reads.
fn typed(
    doc: &Document<'_>,
    shape: &Node,
    kind: &str,
    meta: ObjectMeta,
    origin: &Origin,
    findings: &mut Vec<Finding>,
) -> Option<Resource> {
    if meta.name.is_empty() {
        let at = ["metadata.name", "metadata"]
            .into_iter()
            .find_map(|field| shape.field_at(field))
            .unwrap_or(shape.at);
        findings.push(field_finding(
            doc,
            origin,
            at,
            "NO_NAME",
            "metadata.name is required".to_string(),
        ));
        return None;
    }
    match kind {
        "ServiceEntry" => spec::<ServiceEntrySpec>(doc, origin, findings)
            .map(|s| Resource::ServiceEntry(object(meta, s, origin))),
        "WorkloadEntry" => with_status::<WorkloadEntrySpec, WorkloadEntryStatus>(
            doc, origin, findings,
        )
        .map(|(spec, status)| {
            Resource::WorkloadEntry(object(meta, WorkloadEntry { spec, status }, origin))
        }),
        "DestinationRule" => spec::<DestinationRuleSpec>(doc, origin, findings)
            .map(|s| Resource::DestinationRule(Box::new(object(meta, s, origin)))),
        "VirtualService" => spec::<VirtualServiceSpec>(doc, origin, findings)
            .map(|s| Resource::VirtualService(object(meta, s, origin))),
        "Sidecar" => spec::<SidecarSpec>(doc, origin, findings)
            .map(|s| Resource::Sidecar(object(meta, s, origin))),
        "PeerAuthentication" => spec::<PeerAuthenticationSpec>(doc, origin, findings)
            .map(|s| Resource::PeerAuthentication(object(meta, s, origin))),
        "Pod" => with_status::<PodSpec, PodStatus>(doc, origin, findings)
            .map(|(spec, status)| Resource::Pod(object(meta, Pod { spec, status }, origin))),
        "Service" => spec::<KubeServiceSpec>(doc, origin, findings)
            .map(|s| Resource::Service(object(meta, s, origin))),
        "Node" => Some(Resource::Node(object(meta, KubeNode, origin))),
        "Secret" => {
            secret(doc, shape, origin, findings).map(|s| Resource::Secret(object(meta, s, origin)))
        }
        _ => mesh_config(doc, shape, meta, origin, findings),
    }
}

/// Where a parser error in the mesh config, YAML inside the `data.mesh` string, is in the
/// file. In a literal block (`mesh: |`), the usual way to write it, each line of the string
/// is a line of the file, indented; otherwise the finding points at the `mesh` key and
/// says where within the string.
fn mesh_position(doc: &Document<'_>, shape: &Node, err: &serde_saphyr::Error) -> (Pos, String) {
    let key = shape
        .find("data")
        .and_then(|d| d.key_at("mesh"))
        .unwrap_or(shape.at);
    let Some(loc) = err.location().filter(|l| l.line() > 0) else {
        return (key, String::new());
    };
    let literal = shape.find("data.mesh").filter(|value| {
        // The value of a literal block starts on the line after the key's `mesh: |`.
        let key_line = usize::try_from(key.line.saturating_sub(1)).unwrap_or(usize::MAX);
        value.at.line > key.line
            && doc.text.lines().nth(key_line).is_some_and(|l| {
                l.split_once(':')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('|'))
            })
    });
    let literal = literal.map(|value| Pos {
        line: value.at.line + loc.line() - 1,
        column: value.at.column - 1 + loc.column(),
    });
    match literal {
        Some(at) => (at, String::new()),
        None => (
            key,
            format!(" (line {} column {} of it)", loc.line(), loc.column()),
        ),
    }
}

fn mesh_config(
    doc: &Document<'_>,
    shape: &Node,
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
        return Some(Resource::MeshConfig(Box::new(object(
            meta,
            MeshConfig::default(),
            origin,
        ))));
    };
    match serde_saphyr::from_str::<Option<MeshConfig>>(mesh) {
        Ok(m) => Some(Resource::MeshConfig(Box::new(object(
            meta,
            m.unwrap_or_default(),
            origin,
        )))),
        Err(e) => {
            let (at, within) = mesh_position(doc, shape, &e);
            findings.push(field_finding(
                doc,
                origin,
                at,
                "MESH_CONFIG",
                format!("data.mesh{within}: {}", parser_message(&e)),
            ));
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
  annotations: {proxy.istio.io/health-checks-enabled: 'true'}
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
status:
  conditions:
  - {type: Healthy, status: 'False'}
",
        );
        let o = only(&l, |r| match r {
            Resource::WorkloadEntry(o) => Some(o),
            _ => None,
        });
        assert_eq!(o.meta.namespace, "vms");
        assert_eq!(
            o.meta.annotations["proxy.istio.io/health-checks-enabled"],
            "true"
        );
        assert_eq!(o.spec.status.conditions[0].kind, "Healthy");
        assert_eq!(o.spec.status.conditions[0].status, "False");
        let we = &o.spec;
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
        assert_eq!(vs.spec.http[0].route[0].destination.host, "api.example.com");
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
    defaultServiceExportTo: ['.']
  meshNetworks: 'networks: {}'
",
        );
        let m = only(&l, |r| match r {
            Resource::MeshConfig(o) => Some(o),
            _ => None,
        });
        assert_eq!(m.spec.root_namespace.as_deref(), Some("istio-config"));
        assert_eq!(m.spec.default_service_export_to, ["."]);
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
        for (mode, why) in [
            (
                "SOMETIMES",
                "unknown outbound traffic policy mode `SOMETIMES`",
            ),
            (
                "ALLOW_ANY_DYNAMIC_DNS",
                "mode ALLOW_ANY_DYNAMIC_DNS (Istio's dynamic forward proxy",
            ),
        ] {
            let l = load(&format!(
                "apiVersion: v1
kind: ConfigMap
metadata: {{name: istio, namespace: istio-system}}
data:
  mesh: |
    outboundTrafficPolicy:
      mode: {mode}
"
            ));
            assert!(l.resources.is_empty());
            assert_eq!(codes(&l), vec![(Severity::Error, "MESH_CONFIG")]);
            let f = &l.findings[0];
            assert_eq!((f.line, f.column), (7, Some(13)), "the mode's value");
            for part in [
                "data.mesh: ",
                why,
                "; supported modes: REGISTRY_ONLY, ALLOW_ANY",
            ] {
                assert!(f.message.contains(part), "{part:?} in {f}");
            }
            assert_eq!(f.kind, "ConfigMap");
            assert_eq!(f.resource, "istio-system/istio");
        }
        let quoted = load(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\ndata: {mesh: 'rootNamespace: [x'}\n",
        );
        let f = &quoted.findings[0];
        assert_eq!(
            (f.code, f.line, f.column),
            ("MESH_CONFIG", 4, Some(8)),
            "the `mesh` key"
        );
        assert!(f.message.starts_with("data.mesh (line 1 column "), "{f}");
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
    fn yaml_errors_are_file_relative_without_the_parser_excerpt() {
        let l = load(
            "apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ok}
spec: {address: 10.0.0.1}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: broken}
spec:
  hosts: [b.example.com
  ports: []
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: typed}
spec:
  hosts: [c.example.com]
  resolution: STATIK
",
        );
        let shown: Vec<String> = l.findings.iter().map(ToString::to_string).collect();
        assert_eq!(shown.len(), 2, "{shown:?}");
        assert!(
            shown[0].starts_with("Error [YAML] (cfg/test.yaml:11:8) "),
            "{}",
            shown[0]
        );
        assert_eq!(
            shown[1],
            "Error [YAML] (ServiceEntry default/typed cfg/test.yaml:18:15) unknown variant `STATIK`, expected one of NONE, STATIC, DNS, DNS_ROUND_ROBIN"
        );
        for line in &shown {
            assert!(!line.contains("<input>") && !line.contains('\n'), "{line}");
        }
    }

    #[test]
    fn unknown_fields_are_errors_at_their_own_position() {
        let l = load(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: data}
spec:
  hosts: [db.example.com]
  adresses: [10.9.0.0/16]
  locaton: MESH_INTERNAL
  ports: [{number: 5432, name: tcp, protocol: TCP}]
",
        );
        assert!(
            l.resources.is_empty(),
            "a misspelt field rejects the resource"
        );
        let shown: Vec<String> = l.findings.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown[..2],
            [
                "Error [UNKNOWN_FIELD] (ServiceEntry data/db cfg/test.yaml:6:3) unknown field `adresses` in spec (did you mean `addresses`?)",
                "Error [UNKNOWN_FIELD] (ServiceEntry data/db cfg/test.yaml:7:3) unknown field `locaton` in spec (did you mean `location`?)",
            ]
        );
    }

    #[test]
    fn kubectl_list_is_read_as_its_items() {
        let l = load(
            "# kubectl get pods,services -o yaml
apiVersion: v1
kind: List
metadata:
  resourceVersion: \"\"
items:
- apiVersion: v1
  kind: Pod
  metadata:
    name: web-1
    labels: {app: web}
  spec:
    containers: [{name: app, image: nginx}]
  status:
    podIP: 10.244.0.5
- apiVersion: v1
  kind: Service
  metadata: {name: web}
  spec:
    clusterIP: 10.96.0.10
    selector: {app: web}
    ports: [{port: 80, targetPort: 8080}]
- {apiVersion: networking.istio.io/v1, kind: WorkloadEntry, metadata: {name: w}, spec: {address: 10.0.0.1, wieght: 2}}
- apiVersion: v1
  kind: ServiceAccount
  metadata: {name: s}
",
        );
        let kinds: Vec<&str> = l.resources.iter().map(Resource::kind).collect();
        assert_eq!(kinds, ["Pod", "Service"]);
        let lines: Vec<u64> = l.resources.iter().map(|r| r.origin().line).collect();
        assert_eq!(lines, [7, 16]);
        assert_eq!(
            l.resources[0].origin().name,
            Position {
                line: 10,
                column: 11
            }
        );
        let shown: Vec<String> = l.findings.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "Error [UNKNOWN_FIELD] (WorkloadEntry default/w cfg/test.yaml:23:108) unknown field `wieght` in spec (did you mean `weight`?)",
                "Warning [SKIPPED] (ServiceAccount default/s cfg/test.yaml:24) v1 ServiceAccount is not a kind portcullis reads, skipped",
            ]
        );

        let json = load(
            r#"{"apiVersion": "v1", "kind": "List", "items": [
  {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}, "spec": {"ports": [{"port": 80}]}},
  {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "b"}, "spec": {"ports": [{"port": 81}]}}
]}"#,
        );
        assert_eq!(codes(&json), vec![]);
        let names: Vec<&str> = json
            .resources
            .iter()
            .map(|r| r.meta().name.as_str())
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(json.resources[1].origin().line, 3);

        let nested =
            load("apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: List, items: []}\n");
        assert_eq!(codes(&nested), vec![(Severity::Error, "NESTED_LIST")]);
        assert_eq!(nested.findings[0].line, 4);
    }

    #[test]
    fn a_repeated_resource_is_an_error_naming_both_places() {
        let text = format!(
            "{}---\n{}---\n{}",
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w}\nspec: {address: 10.0.0.1}\n",
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w, namespace: other}\nspec: {address: 10.0.0.1}\n",
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: w\nspec: {address: 10.0.0.2}\n",
        );
        let l = load(&text);
        assert!(l.has_errors());
        let namespaces: Vec<&str> = l
            .resources
            .iter()
            .map(|r| r.meta().namespace.as_str())
            .collect();
        assert_eq!(namespaces, ["default", "other"]);
        let shown: Vec<String> = l.findings.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "Error [DUPLICATE] (WorkloadEntry default/w cfg/test.yaml:14:9) WorkloadEntry default/w is already defined at cfg/test.yaml:3:18"
            ]
        );
    }

    #[test]
    fn allow_any_dynamic_dns_is_rejected_in_a_sidecar_too() {
        let sidecar = load(
            "apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default}
spec:
  outboundTrafficPolicy: {mode: ALLOW_ANY_DYNAMIC_DNS}
",
        );
        let f = &sidecar.findings[0];
        assert_eq!((f.code, f.line), ("YAML", 5));
        assert!(
            f.message
                .contains("supported modes: REGISTRY_ONLY, ALLOW_ANY"),
            "{f}"
        );
        let other = load(
            "apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default}
spec:
  outboundTrafficPolicy: {mode: REGISTRY_ONLY_PLEASE}
",
        );
        assert!(
            other.findings[0].message.contains(
                "unknown outbound traffic policy mode `REGISTRY_ONLY_PLEASE`; supported modes"
            ),
            "{}",
            other.findings[0]
        );
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
        assert_eq!((l.findings[0].line, l.findings[0].column), (3, Some(1)));
    }

    #[test]
    fn secrets_are_read_with_data_decoded_and_string_data_merged() {
        let l = load(
            "apiVersion: v1
kind: Secret
metadata: {name: client, namespace: egress}
type: kubernetes.io/tls
data:
  tls.crt: Q0VSVA==
  tls.key: |
    S0VZ
    Cg==
stringData:
  ca.crt: CA
---
apiVersion: v1
kind: Secret
metadata: {name: broken}
data: {ca.crt: 'not base64!'}
",
        );
        assert_eq!(l.resources.len(), 1);
        let Resource::Secret(s) = &l.resources[0] else {
            panic!("not a Secret: {:?}", l.resources[0]);
        };
        assert_eq!(s.spec.kind, "kubernetes.io/tls");
        assert_eq!(s.spec.data["tls.crt"], b"CERT");
        assert_eq!(s.spec.data["tls.key"], b"KEY\n");
        assert_eq!(s.spec.data["ca.crt"], b"CA");
        // Key material never shows in debug output.
        assert!(!format!("{s:?}").contains("CERT"));
        assert_eq!(codes(&l), vec![(Severity::Error, "BAD_SECRET_DATA")]);
        assert_eq!(l.findings[0].line, 16);
        assert_eq!(base64_decode("YWJjZA"), Some(b"abcd".to_vec()));
        assert_eq!(base64_decode("YWJjZGU="), Some(b"abcde".to_vec()));
        assert_eq!(base64_decode("Y"), None);
    }

    #[test]
    fn nodes_are_read_without_a_namespace_and_pods_name_theirs() {
        let l = load(
            "apiVersion: v1
kind: Node
metadata:
  name: node-a
  namespace: ignored
  labels: {topology.kubernetes.io/zone: us-east-1a}
spec: {podCIDR: 10.244.0.0/24}
status: {capacity: {cpu: '2'}}
---
apiVersion: v1
kind: Node
metadata: {name: node-b, labelz: {}}
---
apiVersion: v1
kind: Pod
metadata: {name: web}
spec: {nodeName: node-a, containers: []}
",
        );
        let Resource::Node(node) = &l.resources[0] else {
            panic!("not a Node: {:?}", l.resources);
        };
        assert_eq!(
            (node.meta.name.as_str(), node.meta.namespace.as_str()),
            ("node-a", "")
        );
        assert_eq!(
            node.meta.labels["topology.kubernetes.io/zone"],
            "us-east-1a"
        );
        let Resource::Pod(pod) = &l.resources[1] else {
            panic!("not a Pod: {:?}", l.resources);
        };
        assert_eq!(pod.spec.spec.node_name.as_deref(), Some("node-a"));
        let shown: Vec<String> = l.findings.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "Error [UNKNOWN_FIELD] (Node node-b cfg/test.yaml:12:26) unknown field `labelz` in metadata (did you mean `labels`?)"
            ]
        );
    }

    #[test]
    fn kinds_of_other_groups_are_skipped() {
        let l = load(
            "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec: {}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: s}
---
apiVersion: v1
kind: PodList
metadata: {name: s}
---
metadata: {name: kindless}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: np}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a}
",
        );
        assert!(l.resources.is_empty());
        assert!(!l.has_errors(), "{:?}", l.findings);
        assert_eq!(codes(&l), vec![(Severity::Warning, "SKIPPED"); 8]);
        let lines: Vec<u64> = l.findings.iter().map(|f| f.line).collect();
        assert_eq!(lines, [1, 6, 10, 14, 18, 20, 24, 28]);
        assert!(l.findings[1].message.contains("apps/v1 Deployment"));
    }

    #[test]
    fn misspelt_kinds_and_versions_of_groups_portcullis_reads_are_errors() {
        let l = load(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntyr
metadata: {name: typo}
spec: {hosts: [a.example.com]}
---
apiVersion: networking.istio.io/v2
kind: ServiceEntry
metadata: {name: future}
---
apiVersion: networking.istio.io/v1
kind: Pod
metadata: {name: confused}
---
apiVersion: v1
kind: Servce
metadata: {name: web}
---
apiVersion: networking.istoi.io/v1
kind: ServiceEntry
metadata: {name: group}
",
        );
        assert!(l.resources.is_empty());
        let shown: Vec<String> = l.findings.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "Error [UNKNOWN_KIND] (ServiceEntyr default/typo cfg/test.yaml:2:7) networking.istio.io/v1 has no kind ServiceEntyr (did you mean ServiceEntry?)",
                "Error [UNKNOWN_API_VERSION] (ServiceEntry default/future cfg/test.yaml:6:13) networking.istio.io/v2 is not a version portcullis reads (networking.istio.io/v1, networking.istio.io/v1beta1, networking.istio.io/v1alpha3)",
                "Error [UNKNOWN_KIND] (Pod default/confused cfg/test.yaml:11:7) networking.istio.io/v1 has no kind Pod; Pod is apiVersion v1",
                "Error [UNKNOWN_KIND] (Servce default/web cfg/test.yaml:15:7) v1 has no kind Servce (did you mean Service?)",
                "Error [UNKNOWN_API_VERSION] (ServiceEntry default/group cfg/test.yaml:18:13) unknown API group networking.istoi.io (did you mean networking.istio.io/v1?)",
            ]
        );
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
            ("WorkloadEntry", "default/bad", 9)
        );
        assert_eq!(
            f.to_string(),
            "Error [INVALID_ADDRESS] (WorkloadEntry default/bad cfg/test.yaml:9:8) address \"not an address\" is not an IP address, DNS name or unix:// path"
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

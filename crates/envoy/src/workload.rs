//! The workload behind an endpoint as istiod describes it for telemetry: one string under
//! the endpoint's `filter_metadata.istio.workload`,
//! `NAME;NAMESPACE;CANONICAL_SERVICE;CANONICAL_REVISION;CLUSTER_ID`.

use std::fmt;
use std::sync::Arc;

/// The `filter_metadata` namespace istiod writes the workload under.
pub const ISTIO_METADATA: &str = "istio";
/// The key of the workload string in [`ISTIO_METADATA`].
pub const WORKLOAD_KEY: &str = "workload";

/// Istio's telemetry metadata of the workload behind an endpoint. An empty part is one
/// istiod did not know (a canonical revision of `latest` is sent empty).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkloadMetadata {
    /// The workload's name (a pod's Deployment, a WorkloadEntry's name).
    pub name: Arc<str>,
    /// Its namespace.
    pub namespace: Arc<str>,
    /// Its canonical service (`service.istio.io/canonical-name` and its fallbacks).
    pub canonical_service: Arc<str>,
    /// Its canonical revision (`service.istio.io/canonical-revision` and its fallbacks).
    pub canonical_revision: Arc<str>,
    /// The id of the cluster it runs in.
    pub cluster: Arc<str>,
}

impl WorkloadMetadata {
    /// Reads istiod's string as Istio's stats filter does: the first five `;`-separated
    /// parts, anything after them ignored; fewer than five is no metadata at all.
    pub fn parse(value: &str) -> Option<WorkloadMetadata> {
        let mut parts = value.split(';').map(Arc::<str>::from);
        Some(WorkloadMetadata {
            name: parts.next()?,
            namespace: parts.next()?,
            canonical_service: parts.next()?,
            canonical_revision: parts.next()?,
            cluster: parts.next()?,
        })
    }
}

/// istiod's encoding, which [`WorkloadMetadata::parse`] reads back.
impl fmt::Display for WorkloadMetadata {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{};{};{};{};{}",
            self.name,
            self.namespace,
            self.canonical_service,
            self.canonical_revision,
            self.cluster
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(w: &WorkloadMetadata) -> [&str; 5] {
        [
            &w.name,
            &w.namespace,
            &w.canonical_service,
            &w.canonical_revision,
            &w.cluster,
        ]
    }

    #[test]
    fn istiod_strings_read_back_part_by_part_and_encode_unchanged() {
        for (text, want) in [
            (
                "reviews-v1;bookinfo;reviews;v1;Kubernetes",
                ["reviews-v1", "bookinfo", "reviews", "v1", "Kubernetes"],
            ),
            // istiod's "miss pod label" and "miss workload name" cases.
            (
                "workload;default;workload;;cluster",
                ["workload", "default", "workload", "", "cluster"],
            ),
            (";;;;cluster", ["", "", "", "", "cluster"]),
        ] {
            let w = WorkloadMetadata::parse(text).expect(text);
            assert_eq!(parts(&w), want, "{text}");
            assert_eq!(w.to_string(), text);
        }
    }

    #[test]
    fn fewer_than_five_parts_is_no_metadata_and_more_are_ignored() {
        for text in ["", "a", "a;b;c;d"] {
            assert_eq!(WorkloadMetadata::parse(text), None, "{text:?}");
        }
        let w = WorkloadMetadata::parse("a;b;c;d;e;f;g").unwrap();
        assert_eq!(parts(&w), ["a", "b", "c", "d", "e"]);
    }
}

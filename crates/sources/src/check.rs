//! `portcullis check`: every finding of a config path and what it compiles to.

use std::path::Path;

use portcullis_model::{ConfigSet, Finding, Severity, scan};
use portcullis_registry::{BuildOptions, build};

/// What `portcullis check` reports about a config path.
#[derive(Debug, Clone)]
pub struct Report {
    /// The loader's and validator's findings: the path's, then each file's in path order.
    pub findings: Vec<Finding>,
    /// The registry's warnings about what the resources compile to.
    pub registry_warnings: Vec<String>,
    /// Resources accepted.
    pub resources: usize,
    /// Clusters of services they compile to.
    pub clusters: usize,
}

impl Report {
    /// Findings that are errors.
    pub fn errors(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .count()
    }

    /// Findings that are warnings, and the registry's warnings.
    pub fn warnings(&self) -> usize {
        self.findings.len() - self.errors() + self.registry_warnings.len()
    }
}

/// Loads and compiles the config at `path` as a proxy with default options would.
pub fn check(path: &Path) -> Report {
    let mut set = ConfigSet::new();
    set.update(scan(path));
    let snapshot = build(set.resources(), &BuildOptions::default(), None, 1);
    Report {
        findings: set.findings().cloned().collect(),
        clusters: snapshot.services().count(),
        registry_warnings: snapshot.warnings,
        resources: set.resources().len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::service_entry;

    #[test]
    fn findings_and_summary_of_a_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("app.yaml"),
            service_entry("app", "app.internal.com"),
        )
        .unwrap();
        std::fs::write(dir.path().join("broken.yaml"), "kind: [").unwrap();
        let report = check(dir.path());
        assert_eq!((report.resources, report.clusters), (1, 1));
        assert_eq!(report.errors(), 1);
        assert_eq!(report.findings.len(), 1);
        assert_eq!(report.findings[0].code, "YAML");
        assert!(report.findings[0].file.ends_with("broken.yaml"));
        assert_eq!(report.warnings(), report.registry_warnings.len());
    }

    #[test]
    fn an_unreadable_path_is_one_error() {
        let dir = tempfile::tempdir().unwrap();
        let report = check(&dir.path().join("missing"));
        assert_eq!(report.errors(), 1);
        assert_eq!(report.findings[0].code, "UNREADABLE_PATH");
        assert_eq!((report.resources, report.clusters), (0, 0));
    }
}

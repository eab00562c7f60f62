//! `portcullis check`: load the config path and print every finding.

use std::io::{self, Write};
use std::process::ExitCode;

use portcullis_model::{ConfigSet, Finding, Severity, scan};
use portcullis_registry::{BuildOptions, build};
use serde_json::{Value, json};

use crate::CheckArgs;

/// How `check` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// `Error|Warning [CODE] (kind namespace/name file:line:column) message` lines, then a
    /// summary line.
    Text,
    /// One JSON object: `findings` and `summary`.
    Json,
}

/// Prints findings for the config at `args.config`, all of it to standard output so that
/// the summary stays with the findings it counts; failure when any is an error.
pub fn run(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let mut set = ConfigSet::new();
    set.update(scan(&args.config));
    let resources = set.resources();
    let snapshot = build(resources, &BuildOptions::default(), None, 1);
    let errors = set
        .findings()
        .filter(|f| f.severity == Severity::Error)
        .count();
    let warnings = set.findings().count() - errors + snapshot.warnings.len();
    let mut out = io::stdout().lock();
    match args.output {
        Output::Text => {
            for finding in set.findings() {
                writeln!(out, "{finding}")?;
            }
            for warning in &snapshot.warnings {
                writeln!(out, "Warning [REGISTRY] {warning}")?;
            }
            writeln!(
                out,
                "{} resources, {} clusters, {errors} errors, {warnings} warnings",
                resources.len(),
                snapshot.clusters.len()
            )?;
        }
        Output::Json => {
            let findings: Vec<Value> = set
                .findings()
                .map(finding_json)
                .chain(snapshot.warnings.iter().map(|warning| {
                    json!({"severity": "warning", "code": "REGISTRY", "message": warning})
                }))
                .collect();
            let report = json!({
                "findings": findings,
                "summary": {
                    "resources": resources.len(),
                    "clusters": snapshot.clusters.len(),
                    "errors": errors,
                    "warnings": warnings,
                },
            });
            writeln!(out, "{report:#}")?;
        }
    }
    out.flush()?;
    Ok(if errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn finding_json(f: &Finding) -> Value {
    json!({
        "severity": match f.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        },
        "code": f.code,
        "kind": f.kind,
        "resource": f.resource,
        "file": f.file.display().to_string(),
        "line": f.line,
        "column": f.column,
        "message": f.message,
    })
}

//! `portcullis check`: load the config path and print every finding.

use std::io::{self, Write};
use std::process::ExitCode;

use portcullis_model::{Finding, Severity};
use portcullis_sources::check;
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
    let report = check(&args.config);
    let errors = report.errors();
    let warnings = report.warnings();
    let mut out = io::stdout().lock();
    match args.output {
        Output::Text => {
            for finding in &report.findings {
                writeln!(out, "{finding}")?;
            }
            for warning in &report.registry_warnings {
                writeln!(out, "Warning [REGISTRY] {warning}")?;
            }
            writeln!(
                out,
                "{} resources, {} clusters, {errors} errors, {warnings} warnings",
                report.resources, report.clusters
            )?;
        }
        Output::Json => {
            let findings: Vec<Value> = report
                .findings
                .iter()
                .map(finding_json)
                .chain(report.registry_warnings.iter().map(|warning| {
                    json!({"severity": "warning", "code": "REGISTRY", "message": warning})
                }))
                .collect();
            let summary = json!({
                "findings": findings,
                "summary": {
                    "resources": report.resources,
                    "clusters": report.clusters,
                    "errors": errors,
                    "warnings": warnings,
                },
            });
            writeln!(out, "{summary:#}")?;
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

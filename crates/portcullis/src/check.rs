//! `portcullis check`: load the config path and print every finding.

use std::process::ExitCode;

use portcullis_model::Severity;
use portcullis_model::{ConfigSet, scan};
use portcullis_registry::{BuildOptions, build};

use crate::CheckArgs;

/// Prints findings for the config at `args.config`; failure when any is an error.
pub fn run(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let mut set = ConfigSet::new();
    set.update(scan(&args.config));
    let mut errors = 0usize;
    for finding in set.findings() {
        if finding.severity == Severity::Error {
            errors += 1;
        }
        println!("{finding}");
    }
    let resources = set.resources();
    let snapshot = build(resources, &BuildOptions::default(), None, 1);
    for warning in &snapshot.warnings {
        println!("Warning [REGISTRY] {warning}");
    }
    eprintln!(
        "{} resources, {} clusters, {errors} errors",
        resources.len(),
        snapshot.clusters.len()
    );
    Ok(if errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

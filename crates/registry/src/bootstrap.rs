//! `portcullis compile`: a config folder compiled and written as an Envoy bootstrap that
//! real Envoy loads, the way istiod would configure this sidecar's outbound side.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use portcullis_envoy::bootstrap::{BootstrapError, bootstrap};
use portcullis_model::{ConfigSet, Severity, scan};

use crate::{BuildOptions, compile};

/// The admin address of Istio's sidecar, which the bootstrap gives Envoy.
pub const ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);

/// How the bootstrap is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// YAML, as Envoy's docs write bootstraps.
    Yaml,
    /// JSON.
    Json,
}

/// Why a config folder gives no bootstrap.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// The config has errors; each is one finding as `portcullis check` prints it.
    #[error("the config has errors:\n{}", .0.join("\n"))]
    Config(Vec<String>),
    /// The compiled resources cannot be written as a bootstrap.
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    /// Serialising failed.
    #[error("cannot write the bootstrap: {0}")]
    Write(String),
}

/// A written bootstrap, and the warnings compiling gave.
#[derive(Debug)]
pub struct Rendered {
    /// The bootstrap text.
    pub text: String,
    /// Warnings from loading and compiling, one a line as `portcullis check` prints them.
    pub warnings: Vec<String>,
}

/// Loads the config at `path`, compiles it for the workload `options` describe, and
/// writes it as a bootstrap in `format`. DNS is not consulted: Envoy resolves DNS clusters
/// itself, and the allowed destinations of resolution NONE are portcullis's alone.
pub fn compile_bootstrap(
    path: &Path,
    options: &BuildOptions,
    format: Format,
) -> Result<Rendered, CompileError> {
    let mut set = ConfigSet::new();
    set.update(scan(path));
    let (errors, mut warnings): (Vec<String>, Vec<String>) = {
        let (e, w): (Vec<_>, Vec<_>) = set.findings().partition(|f| f.severity == Severity::Error);
        (
            e.iter().map(ToString::to_string).collect(),
            w.iter().map(ToString::to_string).collect(),
        )
    };
    if !errors.is_empty() {
        return Err(CompileError::Config(errors));
    }
    let compiled = compile(set.resources(), options, &|_| None);
    warnings.extend(
        compiled
            .warnings
            .iter()
            .map(|w| format!("Warning [REGISTRY] {w}")),
    );
    let value = bootstrap(&compiled.resources, ADMIN)?;
    let text = match format {
        Format::Json => serde_json::to_string_pretty(&value)
            .map(|t| t + "\n")
            .map_err(|e| e.to_string()),
        Format::Yaml => serde_saphyr::to_string(&value).map_err(|e| e.to_string()),
    }
    .map_err(CompileError::Write)?;
    Ok(Rendered { text, warnings })
}

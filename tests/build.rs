//! Compiles the Envoy protos that the differential lab's resources use into one
//! FileDescriptorSet (`$OUT_DIR/envoy_descriptors.bin`), so that `src/envoy/any.rs` can turn
//! the Envoy JSON istiod sends into protobuf `Any`s without a generated type per extension.
//! The .proto files come from the `envoy-types` crate's source (its `proto/` folder), found
//! through `cargo metadata`: nothing is vendored here and nothing is fetched.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// The resources and every extension their `typed_config`s name.
const FILES: &[&str] = &[
    "envoy/config/listener/v3/listener.proto",
    "envoy/config/route/v3/route.proto",
    "envoy/config/cluster/v3/cluster.proto",
    "envoy/config/endpoint/v3/endpoint.proto",
    "envoy/extensions/filters/network/http_connection_manager/v3/http_connection_manager.proto",
    "envoy/extensions/filters/network/tcp_proxy/v3/tcp_proxy.proto",
    "envoy/extensions/access_loggers/file/v3/file.proto",
    "envoy/extensions/filters/http/router/v3/router.proto",
    "envoy/extensions/filters/http/fault/v3/fault.proto",
    "envoy/extensions/filters/http/cors/v3/cors.proto",
    "envoy/extensions/filters/http/grpc_stats/v3/config.proto",
    "envoy/extensions/filters/listener/http_inspector/v3/http_inspector.proto",
    "envoy/extensions/filters/listener/tls_inspector/v3/tls_inspector.proto",
    "envoy/extensions/filters/listener/original_dst/v3/original_dst.proto",
    "envoy/extensions/request_id/uuid/v3/uuid.proto",
    "envoy/extensions/retry/host/previous_hosts/v3/previous_hosts.proto",
    "envoy/extensions/retry/priority/previous_priorities/v3/previous_priorities_config.proto",
    "envoy/extensions/upstreams/http/v3/http_protocol_options.proto",
    "envoy/extensions/transport_sockets/tls/v3/tls.proto",
];

/// Folders of `envoy-types/proto` that hold import roots.
const INCLUDES: &[&str] = &[
    "data-plane-api",
    "googleapis",
    "xds",
    "protoc-gen-validate",
    "cel-spec/proto",
    "opentelemetry-proto",
    "client_model",
];

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=build.rs");
    let proto = envoy_types_dir()?.join("proto");
    let includes: Vec<PathBuf> = INCLUDES.iter().map(|dir| proto.join(dir)).collect();
    let set = protox::compile(FILES, &includes)
        .with_context(|| format!("compiling Envoy's protos under {}", proto.display()))?;
    let out = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR is not set")?);
    std::fs::write(
        out.join("envoy_descriptors.bin"),
        prost::Message::encode_to_vec(&set),
    )?;
    Ok(())
}

/// The source folder of the `envoy-types` package this workspace resolves.
fn envoy_types_dir() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest_dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").context("no CARGO_MANIFEST_DIR")?);
    let target = std::env::var("TARGET").context("TARGET is not set")?;
    // Only this target's packages: the others (Windows crates) may not be downloaded, and
    // a build script must not fetch anything.
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline"])
        .args(["--filter-platform", &target, "--manifest-path"])
        .arg(manifest_dir.join("Cargo.toml"))
        .output()
        .context("running cargo metadata")?;
    if !output.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let manifest = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "envoy-types")
        .and_then(|p| p["manifest_path"].as_str())
        .context("cargo metadata lists no envoy-types package")?;
    Path::new(manifest)
        .parent()
        .map(Path::to_path_buf)
        .context("envoy-types' manifest has no folder")
}

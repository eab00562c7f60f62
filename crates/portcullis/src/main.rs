//! portcullis: an Envoy-compatible, registry-only egress sidecar.

mod check;
mod iptables;
mod learn;
mod run;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// jemalloc instead of glibc's malloc. An HTTP/2 stream allocates about 40 times, some
/// blocks above the size glibc's per-thread cache takes (the stream with its service
/// future, hyper's response future); each of those went to glibc's arena, which first
/// consolidated the small blocks freed since, and the allocator was 18 % of the sidecar's
/// CPU per h2c request. jemalloc serves those sizes from its thread cache as well. The
/// README's issue 13 section has the measurements, memory included.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Command line of the portcullis binary.
#[derive(Parser, Debug)]
#[command(
    name = "portcullis",
    version,
    about = "Registry-only egress sidecar, Envoy-compatible"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy.
    Run(Box<RunArgs>),
    /// Validate configuration and print findings; exits 1 on any error.
    Check(CheckArgs),
    /// Print (or apply) the iptables rules that redirect outbound TCP to the proxy.
    Iptables(iptables::IptablesArgs),
    /// Print the config compiled as istiod would, as an Envoy bootstrap real Envoy loads.
    Compile(CompileArgs),
    /// Print the ServiceEntries that would allow what a running proxy refused, or would
    /// have in audit mode (its `GET /learned`).
    Learn(learn::LearnArgs),
}

/// Flags of `portcullis run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Config file or folder of *.yaml, *.yml, *.json (with or without --xds-address).
    #[arg(
        long,
        env = "PORTCULLIS_CONFIG",
        required_unless_present = "xds_address"
    )]
    pub config: Option<PathBuf>,
    /// The control plane, and the node this proxy presents to it.
    #[command(flatten)]
    pub xds: XdsArgs,
    /// Transparent outbound listener.
    #[arg(long, env = "PORTCULLIS_OUTBOUND", default_value = "0.0.0.0:15001")]
    pub outbound: SocketAddr,
    /// Admin server.
    #[arg(long, env = "PORTCULLIS_ADMIN", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Explicit forward proxy (absolute-form HTTP and CONNECT); off unless given.
    #[arg(long, env = "PORTCULLIS_HTTP_PROXY")]
    pub http_proxy: Option<SocketAddr>,
    /// Prometheus scrape endpoint.
    #[arg(long, env = "PORTCULLIS_METRICS", default_value = "0.0.0.0:15090")]
    pub metrics: SocketAddr,
    /// Readiness endpoint for the kubelet.
    #[arg(long, env = "PORTCULLIS_HEALTH", default_value = "0.0.0.0:15021")]
    pub health: SocketAddr,
    /// Namespace of the workload this sidecar serves (exportTo, short names, Sidecar).
    #[arg(long, env = "PORTCULLIS_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Labels of the workload, `k=v,k2=v2`, matched against Sidecar workloadSelector.
    #[arg(long, env = "PORTCULLIS_WORKLOAD_LABELS", default_value = "")]
    pub workload_labels: String,
    /// The workload's locality, `region/zone/subzone` (Istio's `ISTIO_LOCALITY`): what a
    /// DestinationRule's `localityLbSetting` measures endpoints against.
    #[arg(long, env = "ISTIO_LOCALITY", default_value = "")]
    pub locality: String,
    /// Worker threads (Envoy's --concurrency; Istio's sidecar default is 2).
    #[arg(long, env = "PORTCULLIS_CONCURRENCY", default_value_t = 2)]
    pub concurrency: usize,
    /// How long in-flight connections may finish after SIGTERM.
    #[arg(long, env = "PORTCULLIS_DRAIN_TIMEOUT", default_value = "5s")]
    pub drain_timeout: humantime::Duration,
    /// How long to wait for a client's first bytes before treating it as opaque TCP.
    #[arg(
        long,
        env = "PORTCULLIS_PROTOCOL_DETECTION_TIMEOUT",
        default_value = "100ms"
    )]
    pub protocol_detection_timeout: humantime::Duration,
    /// Upstream connect timeout to original destinations; a cluster's own connect timeout
    /// (Istio's default 10s) wins for it.
    #[arg(long, env = "PORTCULLIS_CONNECT_TIMEOUT", default_value = "10s")]
    pub connect_timeout: humantime::Duration,
    /// Close client connections with no bytes either way for this long (Envoy: 1h).
    #[arg(long, env = "PORTCULLIS_IDLE_TIMEOUT", default_value = "1h")]
    pub idle_timeout: humantime::Duration,
    /// A request head must arrive within this time of its first byte, else the
    /// connection is closed.
    #[arg(
        long,
        env = "PORTCULLIS_REQUEST_HEADERS_TIMEOUT",
        default_value = "10s"
    )]
    pub request_headers_timeout: humantime::Duration,
    /// Time from sending a request upstream to its response headers before a 504 (UT);
    /// 0 waits forever, Istio's default.
    #[arg(long, env = "PORTCULLIS_ROUTE_TIMEOUT", default_value = "0s")]
    pub route_timeout: humantime::Duration,
    /// Client connections open at once; more are closed as they arrive.
    #[arg(long, env = "PORTCULLIS_MAX_CONNECTIONS", default_value_t = 65_536)]
    pub max_connections: usize,
    /// Periodic re-scan of the config path, a backstop for missed file events.
    #[arg(long, env = "PORTCULLIS_RESCAN_INTERVAL", default_value = "5s")]
    pub rescan_interval: humantime::Duration,
    /// Let resolution NONE forward to any original destination, as Istio does, instead of
    /// only to the service's addresses and its host's DNS answers. Re-opens Host/SNI
    /// spoofing; for exact Envoy parity only.
    #[arg(long, env = "PORTCULLIS_PERMISSIVE_NONE_RESOLUTION")]
    pub permissive_none_resolution: bool,
    /// The SSRF guard, `on` or `off`: a `MESH_EXTERNAL` ServiceEntry's DNS answers that are
    /// not public addresses (loopback, link-local and cloud metadata, private, CGNAT, ULA...)
    /// are not used unless its `addresses` or endpoints name them. `off` uses them, as Istio.
    #[arg(
        long,
        env = "PORTCULLIS_SSRF_GUARD",
        default_value = "on",
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new(),
    )]
    pub ssrf_guard: bool,
    /// Serve HTTP/1.0 requests (a Host header is then required), as Istio does for a pod
    /// annotated with `ISTIO_META_HTTP10=1`; by default they get `426 Upgrade Required`.
    #[arg(long = "accept-http10", env = "PORTCULLIS_ACCEPT_HTTP10")]
    pub accept_http10: bool,
    /// Folder of the workload's Istio certificates as istio-agent writes them with
    /// `OUTPUT_CERTS` (`cert-chain.pem`, `key.pem`, `root-cert.pem`), for Istio mutual TLS
    /// (DestinationRule `ISTIO_MUTUAL`, istiod's auto mTLS); re-read every 10 s, so a
    /// rotation is picked up. Without it such endpoints are refused.
    #[arg(long, env = "PORTCULLIS_ISTIO_CERTS", conflicts_with = "ca_address")]
    pub istio_certs: Option<PathBuf>,
    /// `enforce` refuses unregistered destinations; `audit` forwards them as ALLOW_ANY
    /// would and records each as a would-deny (`GET /denials`). The pod annotation
    /// `portcullis.io/mode`, the mesh config's `defaultConfig.proxyMetadata.PORTCULLIS_MODE`
    /// and `POST /mode?value=` on the admin port switch it at run time.
    #[arg(long, env = "PORTCULLIS_MODE", value_parser = parse_mode, default_value = "enforce")]
    pub mode: portcullis_registry::Enforcement,
    /// The pod's annotations as the downward API writes them (Istio's injector mounts
    /// them here), read again every few seconds for `portcullis.io/mode`; a missing file
    /// sets nothing.
    #[arg(
        long,
        env = "PORTCULLIS_POD_ANNOTATIONS",
        default_value = "/etc/istio/pod/annotations"
    )]
    pub pod_annotations: PathBuf,
    /// Log filter (tracing EnvFilter syntax) of portcullis' own log.
    #[arg(long, env = "PORTCULLIS_LOG", default_value = "info")]
    pub log: String,
    /// Where the access log goes (Istio's `accessLogFile`): a file appended to, or
    /// `/dev/stdout`; `off` writes none.
    #[arg(long, env = "PORTCULLIS_ACCESS_LOG", default_value = "/dev/stdout")]
    pub access_log: String,
    /// The access log's encoding (Istio's `accessLogEncoding`): `text`, Istio's default
    /// format, or `json`, its default JSON keys.
    #[arg(
        long,
        env = "PORTCULLIS_ACCESS_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub access_log_format: AccessLogEncoding,
}

/// `--access-log-format`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum AccessLogEncoding {
    /// Istio's default text format.
    Text,
    /// Istio's default JSON keys, one object a line.
    Json,
}

fn parse_mode(text: &str) -> Result<portcullis_registry::Enforcement, String> {
    portcullis_registry::Enforcement::parse(text)
        .ok_or_else(|| format!("{text:?} is neither enforce nor audit"))
}

/// How `portcullis run` reaches the control plane and who it says it is (istio-agent's
/// node, from the env vars Istio's injector sets; each flag wins over its variable).
#[derive(Args, Debug)]
pub struct XdsArgs {
    /// The control plane: `http://HOST:PORT` (plaintext, istiod's 15010) or
    /// `https://HOST:PORT` (TLS verified with --xds-root-cert, istiod's 15012).
    #[arg(long, env = "PORTCULLIS_XDS_ADDRESS")]
    pub xds_address: Option<String>,
    /// PEM roots that verify an `https` control plane (the `istio-ca-root-cert` ConfigMap).
    #[arg(long, env = "PORTCULLIS_XDS_ROOT_CERT")]
    pub xds_root_cert: Option<PathBuf>,
    /// The projected service-account token, sent as `authorization: Bearer`.
    #[arg(long, env = "PORTCULLIS_XDS_TOKEN_FILE", default_value = portcullis_xds::DEFAULT_TOKEN_FILE)]
    pub xds_token_file: PathBuf,
    /// `delta` (istiod's preferred) or `sotw` (State of the World).
    #[arg(
        long,
        env = "PORTCULLIS_XDS_PROTOCOL",
        value_parser = ["delta", "sotw"],
        default_value = "delta"
    )]
    pub xds_protocol: String,
    /// How long a listener or cluster waits for its routes or endpoints before it is used
    /// anyway, when its config source sets no `initial_fetch_timeout` (Envoy's 15 s).
    #[arg(
        long,
        env = "PORTCULLIS_XDS_INITIAL_FETCH_TIMEOUT",
        default_value = "15s"
    )]
    pub xds_initial_fetch_timeout: humantime::Duration,
    /// The pod's name (env POD_NAME).
    #[arg(long)]
    pub pod_name: Option<String>,
    /// The pod's namespace (env POD_NAMESPACE).
    #[arg(long)]
    pub pod_namespace: Option<String>,
    /// The pod's IP (env INSTANCE_IP).
    #[arg(long)]
    pub instance_ip: Option<String>,
    /// The pod's service account (env SERVICE_ACCOUNT).
    #[arg(long)]
    pub service_account: Option<String>,
    /// The cluster's id in the mesh (env ISTIO_META_CLUSTER_ID).
    #[arg(long)]
    pub cluster_id: Option<String>,
    /// The mesh's id (env ISTIO_META_MESH_ID).
    #[arg(long)]
    pub mesh_id: Option<String>,
    /// Istio's CA (istio-agent's `CA_ADDR`, istiod's `https://istiod.istio-system.svc:15012`):
    /// the workload's certificate for Istio mutual TLS is requested from it with the
    /// service-account token (--xds-token-file) and renewed at half its lifetime. Readiness
    /// waits for the first one.
    #[arg(long, env = "CA_ADDR")]
    pub ca_address: Option<String>,
    /// PEM roots that verify the CA (istio-agent's mesh root).
    #[arg(long, env = "PORTCULLIS_CA_ROOT_CERT", default_value = portcullis_xds::ca::DEFAULT_ROOT_CERT)]
    pub ca_root_cert: PathBuf,
    /// The trust domain of the workload's SPIFFE ID.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The lifetime asked of the CA (istio-agent's `SECRET_TTL`).
    #[arg(long, env = "SECRET_TTL", default_value = "24h")]
    pub secret_ttl: humantime::Duration,
}

/// Flags of `portcullis check`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Config file or folder.
    #[arg(long, env = "PORTCULLIS_CONFIG")]
    pub config: PathBuf,
    /// `text`: one finding a line, then a summary line; `json`: one JSON object, for CI.
    #[arg(long, value_enum, default_value = "text")]
    pub output: check::Output,
}

/// Flags of `portcullis compile`.
#[derive(Args, Debug)]
pub struct CompileArgs {
    /// Config file or folder.
    #[arg(long, env = "PORTCULLIS_CONFIG")]
    pub config: PathBuf,
    /// Namespace of the workload the bootstrap is for.
    #[arg(long, env = "PORTCULLIS_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// `yaml` or `json`.
    #[arg(long, value_parser = ["yaml", "json"], default_value = "yaml")]
    pub format: String,
}

/// Prints the bootstrap on standard output and the warnings on standard error.
fn compile(args: &CompileArgs) -> anyhow::Result<ExitCode> {
    use portcullis_registry::{BuildOptions, Format, compile_bootstrap};
    let options = BuildOptions {
        namespace: args.namespace.clone(),
        ..BuildOptions::default()
    };
    let format = if args.format == "json" {
        Format::Json
    } else {
        Format::Yaml
    };
    let rendered = compile_bootstrap(&args.config, &options, format)?;
    for warning in &rendered.warnings {
        eprintln!("{warning}");
    }
    print!("{}", rendered.text);
    Ok(ExitCode::SUCCESS)
}

/// Installs the log subscriber; the returned function changes the filter at run time.
fn logging(filter: &str) -> anyhow::Result<portcullis_admin::SetLogLevel> {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, reload};
    let filter = EnvFilter::try_new(filter)?;
    let (filter, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_target(true)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())),
        )
        .try_init()?;
    Ok(Box::new(move |level: &str| {
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    }))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => match logging(&args.log) {
            Ok(set_level) => run::run(*args, set_level),
            Err(e) => Err(e),
        },
        Command::Check(args) => check::run(&args),
        Command::Iptables(args) => iptables::run(&args),
        Command::Compile(args) => compile(&args),
        Command::Learn(args) => learn::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("portcullis: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Command};

    fn ssrf_guard(flags: &[&str]) -> Result<bool, clap::Error> {
        let args = ["portcullis", "run", "--config", "c"].iter().chain(flags);
        match Cli::try_parse_from(args)?.command {
            Command::Run(run) => Ok(run.ssrf_guard),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn the_ssrf_guard_is_on_unless_switched_off() {
        assert!(ssrf_guard(&[]).unwrap());
        assert!(ssrf_guard(&["--ssrf-guard", "on"]).unwrap());
        assert!(!ssrf_guard(&["--ssrf-guard", "off"]).unwrap());
        assert!(!ssrf_guard(&["--ssrf-guard=false"]).unwrap());
        assert!(ssrf_guard(&["--ssrf-guard", "maybe"]).is_err());
    }
}

//! portcullis: an Envoy-compatible, registry-only egress sidecar.

mod check;
mod iptables;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Command line of the portcullis binary.
#[derive(Parser, Debug)]
#[command(name = "portcullis", version, about = "Registry-only egress sidecar, Envoy-compatible")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy.
    Run(RunArgs),
    /// Validate configuration and print findings; exits 1 on any error.
    Check(CheckArgs),
    /// Print (or apply) the iptables rules that redirect outbound TCP to the proxy.
    Iptables(iptables::IptablesArgs),
}

/// Flags of `portcullis run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Config file or folder of *.yaml, *.yml, *.json.
    #[arg(long, env = "PORTCULLIS_CONFIG")]
    pub config: PathBuf,
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
}

/// Flags of `portcullis check`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Config file or folder.
    #[arg(long, env = "PORTCULLIS_CONFIG")]
    pub config: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => {
            let _ = args;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(args) => check::run(&args),
        Command::Iptables(args) => iptables::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("portcullis: {err:#}");
            ExitCode::FAILURE
        }
    }
}

//! `portcullis learn`: the ServiceEntries a running proxy learned from what it refused.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

/// Flags of `portcullis learn`.
#[derive(Args, Debug)]
pub struct LearnArgs {
    /// The admin port of the running proxy.
    #[arg(long, env = "PORTCULLIS_ADMIN", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Forget the proxy's records once they are printed (`POST /denials/reset`), so that
    /// the next run learns only what is still refused.
    #[arg(long)]
    pub reset: bool,
}

/// One request to the admin port; the body of a 200 answer.
fn admin(addr: SocketAddr, method: &str, path: &str) -> anyhow::Result<String> {
    let timeout = Duration::from_secs(10);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("cannot reach the admin port {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .with_context(|| format!("reading {path} from {addr}"))?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("{path} from {addr}: no HTTP answer"))?;
    let status = head.split(' ').nth(1).unwrap_or_default();
    if status != "200" {
        bail!("{path} from {addr}: status {status}: {body}");
    }
    Ok(body.to_string())
}

/// Prints the learned YAML (and with `--reset` clears the records).
pub fn run(args: &LearnArgs) -> anyhow::Result<ExitCode> {
    let yaml = admin(args.admin, "GET", "/learned")?;
    print!("{yaml}");
    if args.reset {
        admin(args.admin, "POST", "/denials/reset")?;
    }
    Ok(ExitCode::SUCCESS)
}

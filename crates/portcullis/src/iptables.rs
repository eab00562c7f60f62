//! `portcullis iptables`: the nat rules Istio's init container installs for outbound capture.
//!
//! The rule set follows what `istio-iptables` generates for outbound traffic, minus the
//! inbound-only parts (the `127.0.0.6` passthrough source and `ISTIO_IN_REDIRECT`), because
//! portcullis has no inbound listener:
//!
//! ```text
//! *nat
//! :ISTIO_OUTPUT - [0:0]
//! :ISTIO_REDIRECT - [0:0]
//! -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
//! -A ISTIO_OUTPUT -p tcp --dport <excluded port> -j RETURN
//! -A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
//! -A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
//! -A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
//! -A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
//! -A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
//! -A ISTIO_OUTPUT -d <excluded CIDR> -j RETURN
//! -A ISTIO_OUTPUT -j ISTIO_REDIRECT
//! -A OUTPUT -p tcp -j ISTIO_OUTPUT
//! COMMIT
//! ```
//!
//! The same set with `::1/128` goes to ip6tables. The set is meant for
//! `iptables-restore --noflush`, printed or (with `--apply`) fed to it: declaring a chain
//! (`:NAME - [0:0]`) creates or flushes it, so re-applying replaces the ISTIO chains instead of
//! duplicating them. A built-in chain cannot be flushed that way without taking other rules
//! with it, and the restore format has no "add if missing", so the `OUTPUT` jump is written
//! for the table as it is: the set deletes every copy of the jump that `iptables -t nat -S
//! OUTPUT` lists and appends one (`-D`s then `-A`, one transaction). Printed and applied in
//! the same network namespace, the set therefore never leaves a second jump (and removes
//! extra ones an older set left), and a set printed with the jump present stays safe to apply
//! any number of times.
//!
//! IPv6: on by default, because an uncaptured IPv6 path is an egress hole. When the kernel has
//! no IPv6 at all (no `/proc/net/if_inet6`) there is nothing to capture and the IPv6 rules are
//! skipped with a note on stderr; when IPv6 is up but ip6tables cannot install the rules, the
//! command fails. `--no-ipv6` never touches ip6tables.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{Context, bail};
use clap::Args;

/// Flags of `portcullis iptables`.
#[derive(Args, Debug)]
pub struct IptablesArgs {
    /// Install the rules (iptables-restore --noflush) instead of only printing them.
    #[arg(long)]
    pub apply: bool,
    /// User id the proxy runs as; its traffic is never redirected.
    #[arg(long, env = "PORTCULLIS_PROXY_UID", default_value_t = 1337)]
    pub proxy_uid: u32,
    /// Group id the proxy runs as; its traffic is never redirected. Defaults to the uid.
    #[arg(long, env = "PORTCULLIS_PROXY_GID")]
    pub proxy_gid: Option<u32>,
    /// Port of the transparent outbound listener that captured traffic is redirected to.
    #[arg(long, env = "PORTCULLIS_OUTBOUND_PORT", default_value_t = 15001)]
    pub outbound_port: u16,
    /// Destination ports that are never redirected (comma-separated).
    #[arg(long, env = "PORTCULLIS_EXCLUDE_OUTBOUND_PORTS", value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Destination addresses or CIDRs that are never redirected (comma-separated, IPv4 and IPv6).
    #[arg(long, env = "PORTCULLIS_EXCLUDE_OUTBOUND_IPS", value_delimiter = ',', value_parser = parse_cidr)]
    pub exclude_outbound_ips: Vec<Cidr>,
    /// Leave IPv6 alone: print and install only the IPv4 rules.
    #[arg(long, env = "PORTCULLIS_NO_IPV6")]
    pub no_ipv6: bool,
}

/// An address with a prefix length, as iptables' `-d` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Parses `ADDR` or `ADDR/PREFIX`; a bare address means the single host.
fn parse_cidr(text: &str) -> Result<Cidr, String> {
    let text = text.trim();
    let (addr, prefix) = match text.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (text, None),
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("`{text}` is not an IP address or CIDR"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("`{text}` has a prefix length outside 0..={max}"))?,
        None => max,
    };
    Ok(Cidr { addr, prefix })
}

/// Which iptables family a rule set is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }

    fn matches(self, cidr: &Cidr) -> bool {
        match self {
            Family::V4 => cidr.addr.is_ipv4(),
            Family::V6 => cidr.addr.is_ipv6(),
        }
    }
}

/// The jump from the built-in OUTPUT chain; kept apart so that it is never added twice.
const OUTPUT_JUMP: [&str; 4] = ["-p", "tcp", "-j", "ISTIO_OUTPUT"];

/// The iptables-restore input for one family; `installed_jumps` copies of the OUTPUT jump are
/// deleted before the one is appended.
fn rules(args: &IptablesArgs, family: Family, installed_jumps: usize) -> String {
    let uid = args.proxy_uid;
    let gid = args.proxy_gid.unwrap_or(uid);
    let mut out = String::new();
    // Writing to a String cannot fail, so the results of writeln! are ignored.
    let mut line = |text: String| {
        let _ = writeln!(out, "{text}");
    };
    line("*nat".into());
    line(":ISTIO_OUTPUT - [0:0]".into());
    line(":ISTIO_REDIRECT - [0:0]".into());
    line(format!(
        "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {}",
        args.outbound_port
    ));
    for port in &args.exclude_outbound_ports {
        line(format!("-A ISTIO_OUTPUT -p tcp --dport {port} -j RETURN"));
    }
    // Traffic that leaves through lo from anyone but the proxy is the pod talking to itself
    // (its own pod IP), which is not egress; the proxy's own traffic is never captured, or
    // every forwarded connection would loop back into the proxy.
    line(format!(
        "-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner {uid} -j RETURN"
    ));
    line(format!(
        "-A ISTIO_OUTPUT -m owner --uid-owner {uid} -j RETURN"
    ));
    line(format!(
        "-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner {gid} -j RETURN"
    ));
    line(format!(
        "-A ISTIO_OUTPUT -m owner --gid-owner {gid} -j RETURN"
    ));
    line(format!(
        "-A ISTIO_OUTPUT -d {} -j RETURN",
        family.loopback()
    ));
    for cidr in args
        .exclude_outbound_ips
        .iter()
        .filter(|c| family.matches(c))
    {
        line(format!("-A ISTIO_OUTPUT -d {cidr} -j RETURN"));
    }
    line("-A ISTIO_OUTPUT -j ISTIO_REDIRECT".into());
    let jump = OUTPUT_JUMP.join(" ");
    for _ in 0..installed_jumps {
        line(format!("-D OUTPUT {jump}"));
    }
    line(format!("-A OUTPUT {jump}"));
    line("COMMIT".into());
    out
}

/// The families to handle: IPv6 unless switched off or absent from the kernel.
fn families(args: &IptablesArgs) -> Vec<Family> {
    if args.no_ipv6 {
        return vec![Family::V4];
    }
    if !Path::new("/proc/net/if_inet6").exists() {
        eprintln!("portcullis iptables: the kernel has no IPv6; skipping the ip6tables rules");
        return vec![Family::V4];
    }
    vec![Family::V4, Family::V6]
}

/// How many copies of the OUTPUT jump this family's nat table holds; 0 when iptables cannot
/// tell (not installed, no permission), where the rules are only printed or the restore
/// fails with iptables' own message.
fn output_jumps(family: Family) -> usize {
    let Ok(out) = Command::new(family.iptables())
        .args(["-w", "-t", "nat", "-S", "OUTPUT"])
        .stderr(Stdio::null())
        .output()
    else {
        return 0;
    };
    let jump = format!("-A OUTPUT {}", OUTPUT_JUMP.join(" "));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.trim_end() == jump)
        .count()
}

/// Feeds `input` to `<family>-restore --noflush`.
fn restore(family: Family, input: &str) -> anyhow::Result<()> {
    let program = format!("{}-restore", family.iptables());
    let mut child = Command::new(&program)
        .args(["-w", "--noflush"])
        .stdin(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{program}` (is iptables installed?)"))?;
    child
        .stdin
        .take()
        .context("stdin of iptables-restore")?
        .write_all(input.as_bytes())
        .with_context(|| format!("writing rules to `{program}`"))?;
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{program}`"))?;
    if !status.success() {
        bail!("`{program} --noflush` failed ({status}) on:\n{input}");
    }
    Ok(())
}

/// Prints or applies the rules.
pub fn run(args: &IptablesArgs) -> anyhow::Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    for family in families(args) {
        let input = rules(args, family, output_jumps(family));
        if args.apply {
            restore(family, &input)?;
        }
        writeln!(stdout, "# {}-restore --noflush", family.iptables())?;
        stdout.write_all(input.as_bytes())?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: IptablesArgs,
    }

    fn args(flags: &[&str]) -> IptablesArgs {
        Cli::try_parse_from(std::iter::once("iptables").chain(flags.iter().copied()))
            .expect("flags parse")
            .args
    }

    #[test]
    fn defaults_match_istio_outbound_capture() {
        let got = rules(&args(&[]), Family::V4, 0);
        let want = "\
*nat
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A OUTPUT -p tcp -j ISTIO_OUTPUT
COMMIT
";
        assert_eq!(got, want);
    }

    #[test]
    fn ipv6_uses_ipv6_loopback() {
        let got = rules(&args(&[]), Family::V6, 0);
        assert!(got.contains("-A ISTIO_OUTPUT -d ::1/128 -j RETURN\n"));
        assert!(!got.contains("127.0.0.1"));
    }

    #[test]
    fn uid_gid_and_port_flags() {
        let got = rules(
            &args(&[
                "--proxy-uid",
                "1000",
                "--proxy-gid",
                "2000",
                "--outbound-port",
                "16001",
            ]),
            Family::V4,
            0,
        );
        assert!(got.contains("-A ISTIO_OUTPUT -m owner --uid-owner 1000 -j RETURN\n"));
        assert!(got.contains("-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1000 -j RETURN\n"));
        assert!(got.contains("-A ISTIO_OUTPUT -m owner --gid-owner 2000 -j RETURN\n"));
        assert!(got.contains("-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 2000 -j RETURN\n"));
        assert!(got.contains("-j REDIRECT --to-ports 16001\n"));
    }

    #[test]
    fn gid_defaults_to_uid() {
        let got = rules(&args(&["--proxy-uid", "42"]), Family::V4, 0);
        assert!(got.contains("--gid-owner 42 -j RETURN\n"));
    }

    #[test]
    fn excluded_ports_return_before_the_owner_rules() {
        let got = rules(
            &args(&["--exclude-outbound-ports", "22,443"]),
            Family::V4,
            0,
        );
        let lines: Vec<&str> = got.lines().collect();
        let p22 = lines
            .iter()
            .position(|l| *l == "-A ISTIO_OUTPUT -p tcp --dport 22 -j RETURN")
            .expect("port 22 rule");
        let p443 = lines
            .iter()
            .position(|l| *l == "-A ISTIO_OUTPUT -p tcp --dport 443 -j RETURN")
            .expect("port 443 rule");
        let owner = lines
            .iter()
            .position(|l| l.contains("--uid-owner"))
            .expect("uid rule");
        assert!(p22 < p443 && p443 < owner);
    }

    #[test]
    fn excluded_ips_split_by_family_and_precede_the_redirect() {
        let a = args(&["--exclude-outbound-ips", "10.0.0.0/8,192.168.1.1,fd00::/8"]);
        let v4 = rules(&a, Family::V4, 0);
        let v6 = rules(&a, Family::V6, 0);
        assert!(v4.contains("-A ISTIO_OUTPUT -d 10.0.0.0/8 -j RETURN\n"));
        assert!(v4.contains("-A ISTIO_OUTPUT -d 192.168.1.1/32 -j RETURN\n"));
        assert!(!v4.contains("fd00"));
        assert!(v6.contains("-A ISTIO_OUTPUT -d fd00::/8 -j RETURN\n"));
        assert!(!v6.contains("10.0.0.0"));
        let pos = |s: &str, needle: &str| s.find(needle).expect(needle);
        assert!(
            pos(&v4, "-d 127.0.0.1/32") < pos(&v4, "-d 10.0.0.0/8")
                && pos(&v4, "-d 192.168.1.1/32") < pos(&v4, "-j ISTIO_REDIRECT\n")
        );
    }

    #[test]
    fn redirect_is_the_last_rule_of_istio_output() {
        let got = rules(
            &args(&["--exclude-outbound-ips", "1.2.3.0/24"]),
            Family::V4,
            0,
        );
        let last = got
            .lines()
            .rfind(|l| l.starts_with("-A ISTIO_OUTPUT"))
            .expect("ISTIO_OUTPUT rules");
        assert_eq!(last, "-A ISTIO_OUTPUT -j ISTIO_REDIRECT");
    }

    #[test]
    fn installed_output_jumps_are_replaced_by_one() {
        let got = rules(&args(&[]), Family::V4, 2);
        assert!(got.ends_with(
            "-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n\
             -D OUTPUT -p tcp -j ISTIO_OUTPUT\n\
             -D OUTPUT -p tcp -j ISTIO_OUTPUT\n\
             -A OUTPUT -p tcp -j ISTIO_OUTPUT\nCOMMIT\n"
        ));
        assert_eq!(got.matches("-A OUTPUT").count(), 1);
    }

    #[test]
    fn chains_are_declared_not_created() {
        // `-N` fails on re-apply when the chain exists; a declaration flushes it instead.
        let got = rules(&args(&[]), Family::V4, 0);
        assert!(!got.contains("-N "));
        assert!(got.starts_with("*nat\n:ISTIO_OUTPUT - [0:0]\n:ISTIO_REDIRECT - [0:0]\n"));
    }

    #[test]
    fn no_ipv6_means_ipv4_only() {
        assert_eq!(families(&args(&["--no-ipv6"])), vec![Family::V4]);
    }

    #[test]
    fn bad_cidrs_are_rejected() {
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("fd00::/129").is_err());
        assert!(parse_cidr("not-an-ip").is_err());
        assert!(parse_cidr("10.0.0.0/x").is_err());
        assert_eq!(
            parse_cidr(" ::1 ").map(|c| c.to_string()),
            Ok("::1/128".into())
        );
        let cli = Cli::try_parse_from(["iptables", "--exclude-outbound-ips", "1.2.3.4/40"]);
        assert!(cli.is_err());
    }

    #[test]
    fn bad_ports_are_rejected() {
        let cli = Cli::try_parse_from(["iptables", "--exclude-outbound-ports", "22,70000"]);
        assert!(cli.is_err());
    }
}

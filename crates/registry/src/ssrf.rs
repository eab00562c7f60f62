//! The SSRF guard: DNS answers of an external service that are not public addresses
//! (loopback, link-local with the cloud metadata address, private ranges...) are not used as
//! its endpoints, so a name an outsider controls cannot point the proxy into the pod, the node
//! or the cluster network. The address ranges are smokescreen's default deny list.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::IpNet;

/// The cloud instance metadata address (AWS, GCP, Azure, OpenStack), named in denials since it
/// is the usual target.
const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// A DNS answer the guard did not use as an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedAnswer {
    /// The name resolved.
    pub host: Arc<str>,
    /// The address it resolved to.
    pub address: IpAddr,
    /// Why the address is not public, e.g. `link-local (cloud metadata)`.
    pub reason: &'static str,
}

impl std::fmt::Display for RejectedAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DNS answer {} for {:?} is {} (SSRF guard)",
            self.address, self.host, self.reason
        )
    }
}

/// Why `ip` is not a public unicast address, or `None` when it is. IPv4-mapped and NAT64
/// IPv6 addresses are judged by the IPv4 address they carry.
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => non_public_v6(v6),
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    let reason = match (a, b, c) {
        _ if ip == METADATA => "link-local (cloud metadata)",
        _ if ip.is_broadcast() => "broadcast",
        (0, _, _) => "unspecified (0.0.0.0/8)",
        (127, _, _) => "loopback",
        (169, 254, _) => "link-local",
        (10, _, _) | (192, 168, _) => "private (RFC 1918)",
        (172, 16..=31, _) => "private (RFC 1918)",
        (100, 64..=127, _) => "shared address space (CGNAT, RFC 6598)",
        (192, 0, 0) => "reserved (IETF protocol assignments)",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (198, 18..=19, _) => "reserved (benchmarking)",
        (224..=239, _, _) => "multicast",
        (240..=255, _, _) => "reserved (240.0.0.0/4)",
        _ => return None,
    };
    Some(reason)
}

fn non_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return non_public_v4(v4);
    }
    let segments = ip.segments();
    let reason = match segments {
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_loopback() => "loopback",
        // NAT64 (64:ff9b::/96) reaches the IPv4 address in its last 32 bits.
        [0x64, 0xff9b, 0, 0, 0, 0, ..] => {
            let [.., hi, lo] = segments;
            let v4 = (u32::from(hi) << 16) | u32::from(lo);
            return non_public_v4(Ipv4Addr::from(v4));
        }
        [0, 0, 0, 0, 0, 0, ..] => "reserved (IPv4-compatible)",
        [first, ..] if first & 0xffc0 == 0xfe80 => "link-local",
        [first, ..] if first & 0xffc0 == 0xfec0 => "site-local",
        [first, ..] if first & 0xfe00 == 0xfc00 => "unique local (fc00::/7)",
        [first, ..] if first & 0xff00 == 0xff00 => "multicast",
        [0x2001, 0x0db8, ..] => "documentation",
        [0x0100, 0, 0, 0, ..] => "reserved (discard-only)",
        _ => return None,
    };
    Some(reason)
}

/// Splits `answer` for `host` into the addresses a guarded cluster uses (public ones and those
/// inside `allowed`) and the rejected rest.
pub(crate) fn filter(
    host: &Arc<str>,
    answer: &[IpAddr],
    allowed: &[IpNet],
) -> (Vec<IpAddr>, Vec<RejectedAnswer>) {
    let mut used = Vec::with_capacity(answer.len());
    let mut rejected = Vec::new();
    for &address in answer {
        match non_public(address) {
            Some(reason) if !allowed.iter().any(|net| net.contains(&address)) => {
                rejected.push(RejectedAnswer {
                    host: Arc::clone(host),
                    address,
                    reason,
                });
            }
            _ => used.push(address),
        }
    }
    (used, rejected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(ip: &str) -> Option<&'static str> {
        non_public(ip.parse().unwrap())
    }

    #[test]
    fn smokescreens_ranges_are_not_public() {
        for (ip, want) in [
            ("127.0.0.1", "loopback"),
            ("127.3.4.5", "loopback"),
            ("169.254.169.254", "link-local (cloud metadata)"),
            ("169.254.1.1", "link-local"),
            ("10.1.2.3", "private (RFC 1918)"),
            ("172.16.0.1", "private (RFC 1918)"),
            ("172.31.255.255", "private (RFC 1918)"),
            ("192.168.1.1", "private (RFC 1918)"),
            ("100.64.0.1", "shared address space (CGNAT, RFC 6598)"),
            ("100.127.255.255", "shared address space (CGNAT, RFC 6598)"),
            ("0.0.0.0", "unspecified (0.0.0.0/8)"),
            ("0.1.2.3", "unspecified (0.0.0.0/8)"),
            ("255.255.255.255", "broadcast"),
            ("224.0.0.1", "multicast"),
            ("240.0.0.1", "reserved (240.0.0.0/4)"),
            ("192.0.2.1", "documentation"),
            ("198.51.100.7", "documentation"),
            ("203.0.113.9", "documentation"),
            ("198.18.0.1", "reserved (benchmarking)"),
            ("192.0.0.8", "reserved (IETF protocol assignments)"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("fec0::1", "site-local"),
            ("fc00::1", "unique local (fc00::/7)"),
            ("fd12:3456::1", "unique local (fc00::/7)"),
            ("ff02::1", "multicast"),
            ("2001:db8::1", "documentation"),
            ("100::1", "reserved (discard-only)"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "link-local (cloud metadata)"),
            ("::ffff:10.0.0.1", "private (RFC 1918)"),
            ("64:ff9b::a9fe:a9fe", "link-local (cloud metadata)"),
            ("::7f00:1", "reserved (IPv4-compatible)"),
        ] {
            assert_eq!(reason(ip), Some(want), "{ip}");
        }
    }

    #[test]
    fn public_addresses_pass() {
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "172.15.255.255",
            "172.32.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "169.253.0.1",
            "198.20.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert_eq!(reason(ip), None, "{ip}");
        }
    }

    #[test]
    fn allowed_ranges_let_non_public_answers_through() {
        let host: Arc<str> = "db.example.com".into();
        let answer: Vec<IpAddr> = ["10.0.0.5", "127.0.0.1", "8.8.8.8"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let allowed = ["10.0.0.0/24".parse().unwrap()];
        let (used, rejected) = filter(&host, &answer, &allowed);
        assert_eq!(used, [answer[0], answer[2]]);
        assert_eq!(rejected.len(), 1);
        assert_eq!(
            rejected[0].to_string(),
            r#"DNS answer 127.0.0.1 for "db.example.com" is loopback (SSRF guard)"#
        );
    }
}

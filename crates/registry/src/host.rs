//! Host and authority normalisation shared by routing and the registry build.

use std::borrow::Cow;
use std::net::IpAddr;

use thiserror::Error;

/// Why a Host/authority could not be used for routing.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HostError {
    /// Empty host.
    #[error("empty host")]
    Empty,
    /// A label of the name is empty.
    #[error("empty label in host")]
    EmptyLabel,
    /// A character no hostname may contain.
    #[error("invalid character in host")]
    InvalidChar,
    /// The port part is not a number in 1..=65535.
    #[error("invalid port in host")]
    InvalidPort,
}

/// Splits `host[:port]` or `[v6]:port`, validating the port.
pub fn split_host_port(authority: &str) -> Result<(&str, Option<u16>), HostError> {
    if let Some(rest) = authority.strip_prefix('[') {
        let end = rest.find(']').ok_or(HostError::InvalidChar)?;
        let host = &rest[..end];
        // Brackets hold an IPv6 literal and nothing else (RFC 3986 3.2.2).
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(HostError::InvalidChar);
        }
        let tail = &rest[end + 1..];
        return match tail {
            "" => Ok((host, None)),
            _ => match tail.strip_prefix(':') {
                Some(port) => Ok((host, Some(parse_port(port)?))),
                None => Err(HostError::InvalidChar),
            },
        };
    }
    // Bytes, not chars: every request's authority comes through here, and `:` is ASCII.
    let bytes = authority.as_bytes();
    let Some(colon) = bytes.iter().rposition(|&b| b == b':') else {
        return Ok((authority, None));
    };
    match (authority.get(..colon), authority.get(colon + 1..)) {
        (Some(host), Some(port)) if !host.as_bytes().contains(&b':') => {
            Ok((host, Some(parse_port(port)?)))
        }
        // More than one colon without brackets: a bare IPv6 literal, no port.
        _ => Ok((authority, None)),
    }
}

fn parse_port(port: &str) -> Result<u16, HostError> {
    if port.is_empty() || port.len() > 5 {
        return Err(HostError::InvalidPort);
    }
    let mut value = 0u32;
    for b in port.bytes() {
        if !b.is_ascii_digit() {
            return Err(HostError::InvalidPort);
        }
        value = value * 10 + u32::from(b - b'0');
    }
    match u16::try_from(value) {
        Ok(0) | Err(_) => Err(HostError::InvalidPort),
        Ok(p) => Ok(p),
    }
}

/// Lower-cases a hostname and drops one trailing dot; IP literals come back in canonical form.
///
/// Rejects anything that is not a plausible DNS name or IP literal, so that odd spellings
/// cannot match a registered name by accident.
pub fn normalize_host(host: &str) -> Result<String, HostError> {
    normalized(host).map(|n| n.text.into_owned())
}

/// A host in the form routing compares.
#[derive(Debug)]
pub(crate) struct Normalized<'a> {
    /// The name, or the canonical spelling of the IP literal.
    pub(crate) text: Cow<'a, str>,
    /// How many dots `text` holds, for the wildcard lookup.
    pub(crate) dots: usize,
    /// The address, when the host is an IP literal.
    pub(crate) ip: Option<IpAddr>,
}

impl Normalized<'_> {
    /// Whether the host is an IPv6 literal: bracketed when a port follows it, as in the
    /// Host header and in domains.
    pub(crate) fn is_v6(&self) -> bool {
        matches!(self.ip, Some(IpAddr::V6(_)))
    }
}

/// Bits of [`CLASS`]: what a byte is, or rules out.
const DOT: u8 = 1;
const NOT_NAME: u8 = 2;
const NOT_IP: u8 = 4;
const UPPER: u8 = 8;

/// Every byte's class, so that the routing path checks a byte with one load.
static CLASS: [u8; 256] = {
    let mut class = [NOT_NAME | NOT_IP; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'*' | b'.') {
            class[b] &= !NOT_NAME;
        }
        if c.is_ascii_hexdigit() || matches!(c, b':' | b'.') {
            class[b] &= !NOT_IP;
        }
        if c.is_ascii_uppercase() {
            class[b] |= UPPER;
        }
        if c == b'.' {
            class[b] |= DOT;
        }
        b += 1;
    }
    class
};

/// [`normalize_host`] without an allocation when the name is already in normal form, as
/// nearly every Host header is: the routing path's version. An IP literal also comes back
/// parsed, so that routing does not parse it again.
// Inlined into each routing entry point: the call, and the result it returns through memory,
// measured a few per cent of a lookup.
#[inline(always)]
pub(crate) fn normalized(host: &str) -> Result<Normalized<'_>, HostError> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return Err(HostError::Empty);
    }
    // One pass over the bytes for every check, a table load and a few bit operations a
    // byte: this runs on every request. `doubled` catches two dots in a row.
    let (mut seen, mut doubled, mut previous, mut dots) = (0, 0, 0, 0);
    for &b in host.as_bytes() {
        let class = CLASS[usize::from(b)];
        seen |= class;
        doubled |= class & previous;
        previous = class;
        dots += usize::from(class & DOT);
    }
    // Only something spelled like an IP literal is worth parsing as one.
    if seen & NOT_IP == 0
        && let Ok(ip) = host.parse::<IpAddr>()
    {
        // An IPv4-mapped IPv6 literal names the IPv4 address it carries.
        let ip = ip.to_canonical();
        let text = ip.to_string();
        return Ok(Normalized {
            dots: text.bytes().filter(|&b| b == b'.').count(),
            text: Cow::Owned(text),
            ip: Some(ip),
        });
    }
    // An empty label (`.a.com`, `a..com`, `a.com..`) is no DNS name.
    if doubled & DOT != 0 || host.starts_with('.') || host.ends_with('.') {
        return Err(HostError::EmptyLabel);
    }
    if seen & NOT_NAME != 0 {
        return Err(HostError::InvalidChar);
    }
    let text = if seen & UPPER != 0 {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    };
    Ok(Normalized {
        text,
        dots,
        ip: None,
    })
}

/// Calls `f` with `host:port`, the host in brackets when `bracketed` (an IPv6 literal), written
/// on the stack when it fits: the routing key of every request, put together without the
/// formatting machinery (`core::fmt` was about 360 instructions a request, `callgrind`).
pub(crate) fn with_host_port<R>(
    host: &str,
    bracketed: bool,
    port: u16,
    f: impl FnOnce(&str) -> R,
) -> R {
    let mut digits = itoa::Buffer::new();
    let (open, close) = if bracketed { ("[", "]:") } else { ("", ":") };
    let parts = [open, host, close, digits.format(port)];
    let mut buf = [0u8; 320];
    let mut len = 0;
    for part in parts {
        let Some(to) = buf.get_mut(len..len + part.len()) else {
            return f(&parts.concat());
        };
        to.copy_from_slice(part.as_bytes());
        len += part.len();
    }
    // Whole `str`s were copied in, so this always holds.
    match buf.get(..len).map(std::str::from_utf8) {
        Some(Ok(key)) => f(key),
        _ => f(&parts.concat()),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn splits_ports() {
        assert_eq!(split_host_port("a.com"), Ok(("a.com", None)));
        assert_eq!(split_host_port("a.com:80"), Ok(("a.com", Some(80))));
        assert_eq!(split_host_port("[::1]:8080"), Ok(("::1", Some(8080))));
        assert_eq!(split_host_port("[::1]"), Ok(("::1", None)));
        assert_eq!(split_host_port("::1"), Ok(("::1", None)));
        assert_eq!(split_host_port("a.com:0"), Err(HostError::InvalidPort));
        assert_eq!(split_host_port("a.com:+80"), Err(HostError::InvalidPort));
        assert_eq!(split_host_port("a.com:65536"), Err(HostError::InvalidPort));
        assert_eq!(split_host_port("a.com:"), Err(HostError::InvalidPort));
        assert_eq!(split_host_port("[::1]x"), Err(HostError::InvalidChar));
        assert_eq!(
            split_host_port("[app.internal.com]:80"),
            Err(HostError::InvalidChar)
        );
        assert_eq!(split_host_port("[10.0.0.1]"), Err(HostError::InvalidChar));
    }

    #[test]
    fn normalizes_case_dots_and_ips() {
        assert_eq!(
            normalize_host("App.Internal.COM."),
            Ok("app.internal.com".into())
        );
        assert_eq!(normalize_host("10.0.0.1"), Ok("10.0.0.1".into()));
        assert_eq!(normalize_host("::FFFF:10.0.0.1"), Ok("10.0.0.1".into()));
        assert_eq!(normalize_host("::1"), Ok("::1".into()));
        assert_eq!(normalize_host(""), Err(HostError::Empty));
        assert_eq!(normalize_host("."), Err(HostError::Empty));
        assert_eq!(normalize_host("a b"), Err(HostError::InvalidChar));
        assert_eq!(normalize_host("user@a.com"), Err(HostError::InvalidChar));
    }

    #[test]
    fn host_port_keys_are_written_as_formatted() {
        let key =
            |host: &str, bracketed, port| with_host_port(host, bracketed, port, str::to_owned);
        assert_eq!(key("api.example.com", false, 8080), "api.example.com:8080");
        assert_eq!(key("::1", true, 443), "[::1]:443");
        assert_eq!(key("a", false, 65535), "a:65535");
        let name = "a.".repeat(200);
        assert_eq!(key(&name, false, 80), format!("{name}:80"));
    }

    #[test]
    fn normalized_counts_dots_and_parses_ip_literals() {
        let name = normalized("A.b.Example.COM.").unwrap();
        assert_eq!(
            (&*name.text, name.dots, name.ip),
            ("a.b.example.com", 3, None)
        );
        assert!(matches!(
            normalized("a.b.c").unwrap().text,
            Cow::Borrowed(_)
        ));
        let mapped = normalized("::FFFF:10.0.0.1").unwrap();
        let v4 = "10.0.0.1".parse().ok();
        assert_eq!((&*mapped.text, mapped.dots, mapped.ip), ("10.0.0.1", 3, v4));
        // Spelled like a literal, but a name.
        let hex = normalized("cafe.de").unwrap();
        assert_eq!((&*hex.text, hex.dots, hex.ip), ("cafe.de", 1, None));
        assert_eq!(normalize_host("a.b:c"), Err(HostError::InvalidChar));
        assert_eq!(normalize_host("a..b c"), Err(HostError::EmptyLabel));
    }

    /// The checks one at a time, as `normalized` made them before it did them in one pass.
    fn one_check_at_a_time(host: &str) -> Result<String, HostError> {
        let host = host.strip_suffix('.').unwrap_or(host);
        if host.is_empty() {
            return Err(HostError::Empty);
        }
        let first = host.as_bytes()[0];
        if (first.is_ascii_hexdigit() || first == b':')
            && let Ok(ip) = host.parse::<IpAddr>()
        {
            return Ok(ip.to_canonical().to_string());
        }
        if host.starts_with('.') || host.ends_with('.') || host.contains("..") {
            return Err(HostError::EmptyLabel);
        }
        if !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._*".contains(&b))
        {
            return Err(HostError::InvalidChar);
        }
        Ok(host.to_ascii_lowercase())
    }

    proptest! {
        #[test]
        fn normalize_host_agrees_with_one_check_at_a_time(
            host in "\\PC{0,24}|[a-fA-F0-9gG.:*_\\- \u{e9}]{0,24}",
        ) {
            let n = normalized(&host);
            prop_assert_eq!(
                n.as_ref().map(|n| n.text.to_string()).map_err(Clone::clone),
                one_check_at_a_time(&host)
            );
            if let Ok(n) = n {
                prop_assert_eq!(n.dots, n.text.matches('.').count());
                prop_assert_eq!(n.ip, n.text.parse::<IpAddr>().ok());
            }
        }
    }
}

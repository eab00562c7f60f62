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
    match authority.rfind(':') {
        Some(i) if !authority[..i].contains(':') => {
            Ok((&authority[..i], Some(parse_port(&authority[i + 1..])?)))
        }
        // More than one colon without brackets: a bare IPv6 literal, no port.
        Some(_) => Ok((authority, None)),
        None => Ok((authority, None)),
    }
}

fn parse_port(port: &str) -> Result<u16, HostError> {
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HostError::InvalidPort);
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(HostError::InvalidPort),
        Ok(p) => Ok(p),
    }
}

/// Lower-cases a hostname and drops one trailing dot; IP literals come back in canonical form.
///
/// Rejects anything that is not a plausible DNS name or IP literal, so that odd spellings
/// cannot match a registered name by accident.
pub fn normalize_host(host: &str) -> Result<String, HostError> {
    normalized(host).map(Cow::into_owned)
}

/// [`normalize_host`] without an allocation when the name is already in normal form, as
/// nearly every Host header is: the routing path's version.
pub(crate) fn normalized(host: &str) -> Result<Cow<'_, str>, HostError> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return Err(HostError::Empty);
    }
    // Only something starting like an IP literal is worth parsing as one.
    let first = host.as_bytes()[0];
    if (first.is_ascii_hexdigit() || first == b':')
        && let Ok(ip) = host.parse::<IpAddr>()
    {
        // An IPv4-mapped IPv6 literal names the IPv4 address it carries.
        return Ok(Cow::Owned(ip.to_canonical().to_string()));
    }
    // An empty label (`.a.com`, `a..com`, `a.com..`) is no DNS name.
    if host.starts_with('.') || host.ends_with('.') || host.contains("..") {
        return Err(HostError::EmptyLabel);
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_' || b == b'*')
    {
        return Err(HostError::InvalidChar);
    }
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Ok(Cow::Owned(host.to_ascii_lowercase()))
    } else {
        Ok(Cow::Borrowed(host))
    }
}

#[cfg(test)]
mod tests {
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
}

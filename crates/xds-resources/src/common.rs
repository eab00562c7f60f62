//! Pieces every resource type shares: the error with its field path, `Any` unpacking,
//! durations, addresses, header options and string matchers.

use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf::{self as pb, Any};
use ipnet::IpNet;
use portcullis_envoy::{AppendAction, HeaderValueOption, StringMatcher, StringPattern};
use prost::{Message, Name};

/// Why a resource is rejected: the field (a path from the resource's root, e.g.
/// `filter_chains[0].filters[1].typed_config.cluster`) and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{reason}", if field.is_empty() { String::new() } else { format!("{field}: ") })]
pub struct Invalid {
    /// Path of the offending field.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl Invalid {
    pub(crate) fn new(field: impl Into<String>, reason: impl Into<String>) -> Invalid {
        Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn within(mut self, segment: impl Display) -> Invalid {
        self.field = if self.field.is_empty() {
            segment.to_string()
        } else if self.field.starts_with('[') {
            format!("{segment}{}", self.field)
        } else {
            format!("{segment}.{}", self.field)
        };
        self
    }
}

/// Prefixes the field path of an error with the field it happened under.
pub(crate) trait At<T> {
    fn at(self, segment: impl Display) -> Result<T, Invalid>;
}

impl<T> At<T> for Result<T, Invalid> {
    fn at(self, segment: impl Display) -> Result<T, Invalid> {
        self.map_err(|e| e.within(segment))
    }
}

/// Converts each element, naming the failing one by its index.
pub(crate) fn each<S, T>(
    field: &str,
    items: &[S],
    mut f: impl FnMut(&S) -> Result<T, Invalid>,
) -> Result<Vec<T>, Invalid> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| f(item).at(format_args!("{field}[{i}]")))
        .collect()
}

/// Decodes an `Any` as `T`, checking its type URL first.
pub(crate) fn unpack<T: Message + Name + Default>(any: &Any) -> Result<T, Invalid> {
    let expected = T::type_url();
    if any.type_url != expected {
        return Err(Invalid::new(
            "",
            format!("type URL {} where {expected} is expected", any.type_url),
        ));
    }
    T::decode(any.value.as_slice())
        .map_err(|e| Invalid::new("", format!("cannot decode {}: {e}", T::full_name())))
}

/// A proto duration; negative ones are invalid, as Envoy's validation says.
pub(crate) fn duration(field: &str, d: &pb::Duration) -> Result<Duration, Invalid> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(Invalid::new(
            field,
            format!("invalid duration {}s {}ns", d.seconds, d.nanos),
        ));
    }
    Ok(Duration::new(
        d.seconds.unsigned_abs(),
        d.nanos.unsigned_abs(),
    ))
}

/// An optional duration where unset takes `default` and zero disables (`None`).
pub(crate) fn timeout_or(
    field: &str,
    d: Option<&pb::Duration>,
    default: Option<Duration>,
) -> Result<Option<Duration>, Invalid> {
    match d {
        None => Ok(default),
        Some(d) => {
            let d = duration(field, d)?;
            Ok((!d.is_zero()).then_some(d))
        }
    }
}

pub(crate) fn ip(field: &str, s: &str) -> Result<IpAddr, Invalid> {
    s.parse()
        .map_err(|_| Invalid::new(field, format!("malformed IP address: {s}")))
}

pub(crate) fn port(field: &str, p: u32) -> Result<u16, Invalid> {
    u16::try_from(p).map_err(|_| Invalid::new(field, format!("port {p} is out of range")))
}

/// The socket address of an `Address`: its address as given (an IP, or a DNS name for DNS
/// clusters) and its port.
pub(crate) fn socket_address(a: Option<&core::Address>) -> Result<(String, u16), Invalid> {
    let Some(core::address::Address::SocketAddress(sa)) = a.and_then(|a| a.address.as_ref()) else {
        return Err(Invalid::new(
            "",
            "a socket address is required (pipes and internal addresses are not supported)",
        ));
    };
    if sa.protocol != core::socket_address::Protocol::Tcp as i32 {
        return Err(Invalid::new(
            "socket_address.protocol",
            "only TCP is supported",
        ));
    }
    let port = match &sa.port_specifier {
        Some(core::socket_address::PortSpecifier::PortValue(p)) => {
            port("socket_address.port_value", *p)?
        }
        Some(core::socket_address::PortSpecifier::NamedPort(_)) => {
            return Err(Invalid::new(
                "socket_address.named_port",
                "named ports are not supported",
            ));
        }
        None => 0,
    };
    Ok((sa.address.clone(), port))
}

/// An IP socket address.
pub(crate) fn ip_socket_address(a: Option<&core::Address>) -> Result<SocketAddr, Invalid> {
    let (host, port) = socket_address(a)?;
    Ok(SocketAddr::new(ip("socket_address.address", &host)?, port))
}

/// A CIDR range, normalised to its network address as Envoy matches it. Envoy 1.40 takes
/// any length up to 128 and clamps it to the address's width.
pub(crate) fn cidr(c: &core::CidrRange) -> Result<IpNet, Invalid> {
    let addr = ip("address_prefix", &c.address_prefix)?;
    let len = c.prefix_len.map_or(0, |l| l.value);
    if len > 128 {
        return Err(Invalid::new(
            "prefix_len",
            format!("prefix length {len} is above 128"),
        ));
    }
    let width = if addr.is_ipv4() { 32 } else { 128 };
    let len = u8::try_from(len.min(width)).unwrap_or(0);
    Ok(IpNet::new(addr, len).map_or_else(|_| IpNet::from(addr), |n| n.trunc()))
}

/// Envoy refuses to add or remove pseudo-headers and `host` by header manipulation.
fn mutable_header(field: &str, name: &str) -> Result<String, Invalid> {
    let lower = name.to_ascii_lowercase();
    if lower.is_empty() || lower.starts_with(':') || lower == "host" {
        return Err(Invalid::new(
            field,
            format!("header {name:?} may not be modified"),
        ));
    }
    Ok(lower)
}

#[allow(deprecated)]
pub(crate) fn headers_to_add(
    field: &str,
    options: &[core::HeaderValueOption],
) -> Result<Vec<HeaderValueOption>, Invalid> {
    each(field, options, |o| {
        let h = o
            .header
            .as_ref()
            .ok_or_else(|| Invalid::new("header", "required"))?;
        let name = mutable_header("header.key", &h.key)?;
        let value = if h.raw_value.is_empty() {
            h.value.clone()
        } else {
            String::from_utf8_lossy(&h.raw_value).into_owned()
        };
        use core::header_value_option::HeaderAppendAction as A;
        let action = A::try_from(o.append_action)
            .map_err(|_| Invalid::new("append_action", "unknown action"))?;
        let append = match (o.append.map(|a| a.value), action) {
            (Some(_), a) if a != A::AppendIfExistsOrAdd => {
                return Err(Invalid::new(
                    "append",
                    "append and append_action are both set",
                ));
            }
            (Some(true), _) => AppendAction::AppendIfExistsOrAdd,
            (Some(false), _) => AppendAction::OverwriteIfExistsOrAdd,
            (None, A::AppendIfExistsOrAdd) => AppendAction::AppendIfExistsOrAdd,
            (None, A::AddIfAbsent) => AppendAction::AddIfAbsent,
            (None, A::OverwriteIfExistsOrAdd) => AppendAction::OverwriteIfExistsOrAdd,
            (None, A::OverwriteIfExists) => AppendAction::OverwriteIfExists,
        };
        Ok(HeaderValueOption {
            name,
            value,
            append,
        })
    })
}

pub(crate) fn headers_to_remove(field: &str, names: &[String]) -> Result<Vec<String>, Invalid> {
    each(field, names, |n| mutable_header("", n))
}

/// Checks that an RE2 pattern compiles, anchored as Envoy matches it.
pub(crate) fn regex(field: &str, re: &matcher::RegexMatcher) -> Result<String, Invalid> {
    if re.regex.is_empty() {
        return Err(Invalid::new(field, "the regex must not be empty"));
    }
    regex::Regex::new(&format!("^(?:{})$", re.regex))
        .map_err(|e| Invalid::new(field, format!("invalid regex {:?}: {e}", re.regex)))?;
    Ok(re.regex.clone())
}

pub(crate) fn string_matcher(m: &matcher::StringMatcher) -> Result<StringMatcher, Invalid> {
    use matcher::string_matcher::MatchPattern as P;
    let pattern = match &m.match_pattern {
        Some(P::Exact(v)) => StringPattern::Exact(v.clone()),
        Some(P::Prefix(v)) => StringPattern::Prefix(v.clone()),
        Some(P::Suffix(v)) => StringPattern::Suffix(v.clone()),
        Some(P::Contains(v)) => StringPattern::Contains(v.clone()),
        Some(P::SafeRegex(re)) => StringPattern::Regex(regex("safe_regex", re)?),
        Some(P::Custom(c)) => {
            return Err(Invalid::new(
                "custom",
                format!("custom string matcher {} is not supported", c.name),
            ));
        }
        None => return Err(Invalid::new("match_pattern", "required")),
    };
    let non_empty = match &pattern {
        StringPattern::Prefix(v) | StringPattern::Suffix(v) | StringPattern::Contains(v) => {
            !v.is_empty()
        }
        StringPattern::Exact(_) | StringPattern::Regex(_) => true,
    };
    if !non_empty {
        return Err(Invalid::new("match_pattern", "must not be empty"));
    }
    Ok(StringMatcher {
        pattern,
        ignore_case: m.ignore_case,
    })
}

/// A `Struct` value as text: strings as they are, other scalars in their JSON form.
pub(crate) fn struct_text(v: &pb::Value) -> String {
    use pb::value::Kind;
    match &v.kind {
        Some(Kind::StringValue(s)) => s.clone(),
        Some(Kind::NumberValue(n)) => n.to_string(),
        Some(Kind::BoolValue(b)) => b.to_string(),
        Some(Kind::NullValue(_)) | None => String::new(),
        Some(Kind::StructValue(_)) | Some(Kind::ListValue(_)) => String::from("<nested>"),
    }
}

/// The string entries of one `filter_metadata` namespace.
pub(crate) fn filter_metadata(
    m: Option<&core::Metadata>,
    namespace: &str,
) -> std::collections::BTreeMap<String, String> {
    m.and_then(|m| m.filter_metadata.get(namespace))
        .map(|s| {
            s.fields
                .iter()
                .map(|(k, v)| (k.clone(), struct_text(v)))
                .collect()
        })
        .unwrap_or_default()
}

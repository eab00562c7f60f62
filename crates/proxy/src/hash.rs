//! A request's hash under a route's `hash_policy`, computed as Envoy's `HashPolicyImpl`:
//! each policy that yields a value is xxHash64ed and folded into the hash, a terminal one
//! that yielded stops the rest. A cookie policy with a ttl and no cookie in the request
//! makes the cookie up, and the response carries it back in `set-cookie`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use http::header::COOKIE;
use http::{HeaderMap, HeaderValue};
use portcullis_balance::xxhash64;
use portcullis_envoy::{CookieAttribute, HashKey, HashPolicy};

/// What a request hashes to.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct RequestHash {
    /// The hash; `None` when no policy yielded one (the balancer then picks at random).
    pub hash: Option<u64>,
    /// A cookie made up for the request, for the response's `set-cookie`.
    pub set_cookie: Option<HeaderValue>,
}

/// The request as hash policies read it.
pub(crate) struct HashInput<'a> {
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// Path with query string.
    pub path: &'a str,
    /// The client's address.
    pub peer: SocketAddr,
    /// The connection's local address as Envoy sees it (the original destination).
    pub local: Option<SocketAddr>,
}

/// The hash of `input` under `policies`.
pub(crate) fn request_hash(policies: &[HashPolicy], input: &HashInput<'_>) -> RequestHash {
    let mut out = RequestHash::default();
    for policy in policies {
        if let Some(value) = evaluate(&policy.key, input, &mut out.set_cookie) {
            // Rotating the previous value keeps two equal policies from cancelling out.
            let previous = out.hash.map_or(0, |h| h.rotate_left(1));
            out.hash = Some(previous ^ value);
        }
        if policy.terminal && out.hash.is_some() {
            break;
        }
    }
    out
}

fn evaluate(
    key: &HashKey,
    input: &HashInput<'_>,
    set_cookie: &mut Option<HeaderValue>,
) -> Option<u64> {
    match key {
        HashKey::Header(name) => {
            let mut values: Vec<&[u8]> = input
                .headers
                .get_all(name.as_str())
                .iter()
                .map(HeaderValue::as_bytes)
                .collect();
            if values.is_empty() {
                return None;
            }
            // The same values hash alike in any order.
            values.sort_unstable();
            Some(xxhash64(&values.concat(), 0))
        }
        HashKey::Cookie {
            name,
            path,
            ttl,
            attributes,
        } => match cookie(input.headers, name) {
            Some(value) => Some(xxhash64(value.as_bytes(), 0)),
            None => {
                let ttl = (*ttl)?;
                let value = generated_cookie(input);
                *set_cookie = set_cookie_value(name, &value, (path.as_deref(), attributes), ttl);
                Some(xxhash64(value.as_bytes(), 0))
            }
        },
        HashKey::SourceIp => Some(xxhash64(input.peer.ip().to_string().as_bytes(), 0)),
        HashKey::QueryParameter(name) => {
            let query = input.path.split_once('?')?.1;
            let query = query.split_once('#').map_or(query, |(q, _)| q);
            query
                .split('&')
                .find_map(|pair| match pair.split_once('=') {
                    Some((k, v)) if k == name => Some(v),
                    None if pair == name => Some(""),
                    _ => None,
                })
                .map(|v| xxhash64(v.as_bytes(), 0))
        }
    }
}

/// The first value of cookie `name` among the request's `cookie` headers, quotes removed;
/// an empty value counts as absent, as Envoy's.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then(|| {
                v.strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(v)
            })
        })
        .filter(|v| !v.is_empty())
}

/// Envoy's made-up cookie: the hex xxHash64 of the connection's remote and local
/// addresses, the same for every request of a connection so that racing requests get one
/// cookie.
fn generated_cookie(input: &HashInput<'_>) -> String {
    let mut addresses = input.peer.to_string();
    if let Some(local) = input.local {
        let _ = write!(addresses, "{local}");
    }
    format!("{:016x}", xxhash64(addresses.as_bytes(), 0))
}

/// `name="value"; Max-Age=N; Path=P; A=V; HttpOnly` as Envoy writes it; no `Max-Age` for
/// a zero ttl, which makes a session cookie.
fn set_cookie_value(
    name: &str,
    value: &str,
    (path, attributes): (Option<&str>, &[CookieAttribute]),
    ttl: Duration,
) -> Option<HeaderValue> {
    let mut cookie = format!("{name}=\"{value}\"");
    if !ttl.is_zero() {
        let _ = write!(cookie, "; Max-Age={}", ttl.as_secs());
    }
    if let Some(path) = path {
        let _ = write!(cookie, "; Path={path}");
    }
    for a in attributes {
        let _ = write!(cookie, "; {}", a.name);
        if !a.value.is_empty() {
            let _ = write!(cookie, "={}", a.value);
        }
    }
    cookie.push_str("; HttpOnly");
    HeaderValue::from_str(&cookie).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(key: HashKey, terminal: bool) -> HashPolicy {
        HashPolicy { key, terminal }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        map
    }

    fn hash_of(policies: &[HashPolicy], headers: &HeaderMap, path: &str) -> RequestHash {
        request_hash(
            policies,
            &HashInput {
                headers,
                path,
                peer: "10.0.0.9:40000".parse().expect("addr"),
                local: Some("10.1.0.1:80".parse().expect("addr")),
            },
        )
    }

    #[test]
    fn header_hash_is_the_values_xxhash_in_any_order() {
        let by_user = [policy(HashKey::Header("x-user".into()), false)];
        let one = hash_of(&by_user, &headers(&[("x-user", "alice")]), "/");
        assert_eq!(one.hash, Some(xxhash64(b"alice", 0)));
        let a = hash_of(&by_user, &headers(&[("x-user", "a"), ("x-user", "b")]), "/");
        let b = hash_of(&by_user, &headers(&[("x-user", "b"), ("x-user", "a")]), "/");
        assert_eq!(a.hash, b.hash);
        assert_eq!(hash_of(&by_user, &headers(&[]), "/").hash, None);
    }

    #[test]
    fn policies_fold_and_terminal_stops() {
        let h = headers(&[("a", "1"), ("b", "2")]);
        let (ha, hb) = (xxhash64(b"1", 0), xxhash64(b"2", 0));
        let both = [
            policy(HashKey::Header("a".into()), false),
            policy(HashKey::Header("b".into()), false),
        ];
        assert_eq!(hash_of(&both, &h, "/").hash, Some(ha.rotate_left(1) ^ hb));
        let first_only = [
            policy(HashKey::Header("a".into()), true),
            policy(HashKey::Header("b".into()), false),
        ];
        assert_eq!(hash_of(&first_only, &h, "/").hash, Some(ha));
        // A terminal policy that yields nothing does not stop the next.
        let missing_first = [
            policy(HashKey::Header("z".into()), true),
            policy(HashKey::Header("b".into()), false),
        ];
        assert_eq!(hash_of(&missing_first, &h, "/").hash, Some(hb));
    }

    #[test]
    fn cookie_is_read_or_made_up_with_a_ttl() {
        let by_cookie = |ttl| {
            [policy(
                HashKey::Cookie {
                    name: "session".into(),
                    path: Some("/".into()),
                    ttl,
                    attributes: Vec::new(),
                },
                false,
            )]
        };
        let sent = headers(&[("cookie", "other=1; session=\"abc\"")]);
        let read = hash_of(&by_cookie(Some(Duration::from_secs(60))), &sent, "/");
        assert_eq!(read.hash, Some(xxhash64(b"abc", 0)));
        assert_eq!(read.set_cookie, None);
        // Without a ttl, no cookie and no hash.
        assert_eq!(
            hash_of(&by_cookie(None), &headers(&[]), "/"),
            RequestHash::default()
        );
        let made = hash_of(
            &by_cookie(Some(Duration::from_secs(60))),
            &headers(&[]),
            "/",
        );
        let value = format!("{:016x}", xxhash64(b"10.0.0.9:4000010.1.0.1:80", 0));
        assert_eq!(made.hash, Some(xxhash64(value.as_bytes(), 0)));
        assert_eq!(
            made.set_cookie.as_ref().and_then(|v| v.to_str().ok()),
            Some(format!("session=\"{value}\"; Max-Age=60; Path=/; HttpOnly").as_str())
        );
        // The made-up cookie, sent back, lands where the first request did.
        let back = headers(&[("cookie", &format!("session=\"{value}\""))]);
        assert_eq!(
            hash_of(&by_cookie(Some(Duration::from_secs(60))), &back, "/").hash,
            made.hash
        );
        let session = hash_of(&by_cookie(Some(Duration::ZERO)), &headers(&[]), "/");
        assert_eq!(
            session.set_cookie.as_ref().and_then(|v| v.to_str().ok()),
            Some(format!("session=\"{value}\"; Path=/; HttpOnly").as_str())
        );
        // Attributes follow the path, a flag without `=`.
        let attributes = [policy(
            HashKey::Cookie {
                name: "session".into(),
                path: None,
                ttl: Some(Duration::from_secs(5)),
                attributes: vec![
                    CookieAttribute {
                        name: "SameSite".into(),
                        value: "Lax".into(),
                    },
                    CookieAttribute {
                        name: "Secure".into(),
                        value: String::new(),
                    },
                ],
            },
            false,
        )];
        let made = hash_of(&attributes, &headers(&[]), "/");
        assert_eq!(
            made.set_cookie.as_ref().and_then(|v| v.to_str().ok()),
            Some(
                format!("session=\"{value}\"; Max-Age=5; SameSite=Lax; Secure; HttpOnly").as_str()
            )
        );
    }

    #[test]
    fn source_ip_and_query_parameter() {
        let by_ip = [policy(HashKey::SourceIp, false)];
        assert_eq!(
            hash_of(&by_ip, &headers(&[]), "/").hash,
            Some(xxhash64(b"10.0.0.9", 0))
        );
        let by_query = [policy(HashKey::QueryParameter("user".into()), false)];
        let hash = |path| hash_of(&by_query, &headers(&[]), path).hash;
        assert_eq!(hash("/p?x=1&user=bob&user=eve"), Some(xxhash64(b"bob", 0)));
        assert_eq!(hash("/p?user=bob#frag"), Some(xxhash64(b"bob", 0)));
        assert_eq!(hash("/p?username=bob"), None);
        assert_eq!(hash("/p"), None);
    }
}

//! The HTTP/1.1 fast path's own parser (`portcullis_proxy::h1`), checked against hyper's
//! reading of the same bytes, which the general path and every other target rely on.
//!
//! Never panics; a head the fast path takes is one hyper takes too, with the same authority
//! (two readings of one request are how a Host check gets bypassed); the head it sends
//! upstream is valid HTTP/1.1 carrying that authority as its only Host and no hop-by-hop
//! field, and the Content-Length of the body it forwards; a rewritten response head is valid,
//! says `server: envoy` once and keeps a length-delimited body's length; where a chunked
//! body ends does not depend on how its bytes arrive.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_fuzz::hyper_model::{self, MAX_HEADERS};
use portcullis_proxy::h1::{chunked_body_len, rewrite_request, rewrite_response};

const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "transfer-encoding",
    "upgrade",
];

fn check_request(data: &[u8], explicit: bool) {
    let Some(fast) = rewrite_request(data, explicit, MAX_HEADERS) else {
        return;
    };
    let head = &data[..fast.head_len];
    let model = hyper_model::parse(head).expect("the fast path took a head hyper rejects");
    let authority =
        hyper_model::authority(&model).expect("the fast path took a request hyper answers 400");
    assert_eq!(fast.authority, authority, "two readings of the authority");
    assert_ne!(model.method, http::Method::CONNECT);

    // Room for the fields the proxy adds: Host, x-forwarded-proto, x-request-id and
    // x-envoy-attempt-count.
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS + 4];
    let mut upstream = httparse::Request::new(&mut headers);
    let status = upstream
        .parse(&fast.upstream_head)
        .expect("the upstream head is not valid HTTP/1.1");
    assert_eq!(status, httparse::Status::Complete(fast.upstream_head.len()));
    assert_eq!(upstream.method, Some(model.method.as_str()));
    assert_eq!(upstream.version, Some(1));
    let path = upstream.path.unwrap_or_default();
    assert!(path.starts_with('/'), "upstream target {path:?}");
    let hosts = values(upstream.headers, "host");
    match &authority {
        Some(a) => assert_eq!(hosts, [a.as_bytes()], "upstream Host"),
        None => assert!(hosts.is_empty()),
    }
    // The body the fast path forwards is the body the upstream reads: anything else lets a
    // request be smuggled behind it.
    let lengths = values(upstream.headers, "content-length");
    if fast.body > 0 || !lengths.is_empty() {
        assert_eq!(
            lengths,
            [fast.body.to_string().as_bytes()],
            "upstream Content-Length"
        );
    }
    for h in upstream.headers.iter() {
        assert!(
            !HOP_BY_HOP.iter().any(|n| h.name.eq_ignore_ascii_case(n)),
            "hop-by-hop {} forwarded",
            h.name
        );
    }
}

fn check_response(data: &[u8], head_method: bool) {
    let Ok(Some((_, client))) = rewrite_response(data, head_method) else {
        return;
    };
    let mut headers = [httparse::EMPTY_HEADER; 140];
    let mut response = httparse::Response::new(&mut headers);
    let status = response
        .parse(&client)
        .expect("the client's head is not valid HTTP/1.1");
    assert_eq!(status, httparse::Status::Complete(client.len()));
    assert_eq!(values(response.headers, "server"), [&b"envoy"[..]]);
    // A length-delimited body keeps its length on the way to the client.
    let mut headers = [httparse::EMPTY_HEADER; 140];
    let mut upstream = httparse::Response::new(&mut headers);
    if upstream.parse(data).is_ok_and(|s| s.is_complete())
        && values(upstream.headers, "transfer-encoding").is_empty()
    {
        let length = |headers| {
            values(headers, "content-length")
                .first()
                .map(|v| v.trim_ascii())
        };
        if let Some(upstream_length) = length(upstream.headers) {
            assert_eq!(
                length(response.headers),
                Some(upstream_length),
                "client Content-Length"
            );
        }
    }
}

/// The values of every `name` field, in order.
fn values<'a>(headers: &[httparse::Header<'a>], name: &str) -> Vec<&'a [u8]> {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
        .collect()
}

fn check_chunks(data: &[u8]) {
    let Ok(whole) = chunked_body_len(data) else {
        return;
    };
    // The same bytes arriving in two reads end the body at the same place.
    for cut in [1, data.len() / 2, data.len().saturating_sub(1)] {
        if cut == 0 || cut >= data.len() {
            continue;
        }
        if let Ok(Some(end)) = chunked_body_len(&data[..cut]) {
            assert_eq!(whole, Some(end), "ended early at a cut of {cut}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check_request(data, false);
    check_request(data, true);
    check_response(data, false);
    check_response(data, true);
    check_chunks(data);
});

//! How hyper's HTTP/1 server reads a request head, up to the authority the proxy routes on:
//! the model both request targets check the proxy against.

use http::{HeaderValue, Method, Uri};

/// The proxy's limit on request header fields (`max_request_headers`).
pub const MAX_HEADERS: usize = 100;

/// The proxy answers the request 400.
#[derive(Debug)]
pub struct BadRequest;

/// What the routing step sees of a request.
pub struct Head {
    /// The request method.
    pub method: Method,
    /// The request target.
    pub uri: Uri,
    /// Every Host header's value, as the proxy reads it with `to_str`.
    pub hosts: Vec<Option<String>>,
}

/// Parses as hyper's HTTP/1 server does; `None` where hyper answers 400 or waits for more.
pub fn parse(data: &[u8]) -> Option<Head> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(_) = req.parse(data).ok()? else {
        return None;
    };
    let method = Method::from_bytes(req.method?.as_bytes()).ok()?;
    let uri = Uri::try_from(req.path?).ok()?;
    let mut hosts = Vec::new();
    for header in req.headers.iter() {
        if header.name.eq_ignore_ascii_case("host") {
            let value = HeaderValue::from_bytes(header.value).ok();
            hosts.push(value.and_then(|v| v.to_str().ok().map(str::to_owned)));
        }
    }
    Some(Head { method, uri, hosts })
}

/// The proxy's `authority()`: the absolute-form URI's authority, else the single Host;
/// `Err` for a request the proxy answers 400.
pub fn authority(head: &Head) -> Result<Option<String>, BadRequest> {
    if head.hosts.len() > 1 {
        return Err(BadRequest);
    }
    if let Some(a) = head.uri.authority() {
        return Ok(Some(a.as_str().to_owned()));
    }
    match head.hosts.first() {
        None => Ok(None),
        Some(Some(h)) => Ok(Some(h.clone())),
        Some(None) => Err(BadRequest),
    }
}

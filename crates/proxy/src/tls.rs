//! Peeking a TLS ClientHello without terminating TLS, to route by SNI.
//!
//! The parser is pure and restartable: it is handed every byte the client has sent so far and
//! says "need more", "here is the hello" or "this is not one". Bytes are never consumed, so the
//! caller replays them to the upstream untouched.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest ClientHello handshake message accepted, its 4-byte header included (as Envoy's
/// `tls_inspector`, whose `TLS_MAX_CLIENT_HELLO` is 64 KiB).
pub const MAX_CLIENT_HELLO: usize = 64 * 1024;

/// Most bytes of TLS records read while looking for the ClientHello: a maximal hello cut into
/// records of 5 payload bytes or more fits, and a client fragmenting more finely cannot make us
/// buffer without bound.
pub const MAX_PEEK: usize = 2 * MAX_CLIENT_HELLO;

const RECORD_HEADER: usize = 5;
/// RFC 8446 §5.1: a plaintext record's payload is at most 2^14 bytes.
const MAX_RECORD_PAYLOAD: usize = 1 << 14;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const HANDSHAKE_HEADER: usize = 4;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
const NAME_TYPE_HOST_NAME: u8 = 0;
/// BoringSSL's `TLSEXT_MAXLEN_host_name`.
const MAX_HOST_NAME: usize = 255;
/// How much buffer to offer each read; a typical ClientHello fits in one.
const READ_CHUNK: usize = 4096;

/// What the proxy needs from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The `host_name` of the server_name extension, lowercased and without a trailing dot;
    /// `None` when the extension is absent or names an IP literal (forbidden by RFC 6066).
    pub sni: Option<String>,
    /// ALPN protocol names in the client's order (non-UTF-8 bytes replaced), empty when absent.
    pub alpn: Vec<String>,
    /// The `legacy_version` field (0x0303 for TLS 1.2 and 1.3 clients).
    pub legacy_version: u16,
    /// The supported_versions extension in the client's order, GREASE values included; empty
    /// when absent.
    pub supported_versions: Vec<u16>,
}

/// Why no ClientHello could be peeked.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The first bytes are not a TLS handshake record (SSLv2-compatible hellos included).
    #[error("not a TLS handshake")]
    NotTls,
    /// A record of another content type arrived before the ClientHello was complete.
    #[error("TLS record of content type {0} before the ClientHello was complete")]
    UnexpectedRecord(u8),
    /// The first handshake message is of another type.
    #[error("first TLS handshake message has type {0}, not ClientHello")]
    NotClientHello(u8),
    /// The records or the ClientHello break the TLS encoding rules.
    #[error("malformed TLS ClientHello: {0}")]
    Malformed(&'static str),
    /// The ClientHello exceeds [`MAX_CLIENT_HELLO`], or its records [`MAX_PEEK`].
    #[error("TLS ClientHello too large")]
    TooLarge,
    /// The ClientHello was not complete within the timeout.
    #[error("timed out waiting for the TLS ClientHello")]
    Timeout,
    /// The client closed before the ClientHello was complete.
    #[error("client closed before the TLS ClientHello was complete")]
    Eof,
    /// Reading from the client failed.
    #[error("reading the TLS ClientHello: {0}")]
    Io(#[from] std::io::Error),
}

/// Parses the ClientHello at the start of `buf`, the bytes the client has sent so far.
///
/// `Ok(None)`: a valid prefix, more bytes are needed. Bytes after the records carrying the hello
/// (a change_cipher_spec, early data) are ignored. Errors are decided as early as the bytes
/// allow, so a non-TLS client is recognised from its first byte.
pub fn parse_client_hello(buf: &[u8]) -> Result<Option<ClientHello>, TlsError> {
    let mut message: Vec<u8> = Vec::new();
    let mut offset = 0usize;
    loop {
        let first = offset == 0;
        if offset + RECORD_HEADER > MAX_PEEK {
            return Err(TlsError::TooLarge);
        }
        let rest = buf.get(offset..).unwrap_or_default();
        check_record_prefix(rest, first)?;
        let Some(&[_, _, _, hi, lo]) = rest.get(..RECORD_HEADER) else {
            return Ok(None);
        };
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        if len == 0 {
            // RFC 8446 §5.1: zero-length handshake fragments are forbidden.
            return Err(TlsError::Malformed("empty handshake record"));
        }
        if len > MAX_RECORD_PAYLOAD {
            return Err(TlsError::Malformed("record longer than 2^14 bytes"));
        }
        if offset + RECORD_HEADER + len > MAX_PEEK {
            return Err(TlsError::TooLarge);
        }
        let payload = rest.get(RECORD_HEADER..).unwrap_or_default();
        let (fragment, complete) = match payload.get(..len) {
            Some(fragment) => (fragment, true),
            None => (payload, false),
        };
        let declared_end = message.len() + len;
        message.extend_from_slice(fragment);
        if let Some(needed) = check_handshake_header(&message)? {
            // The client's first flight ends with the ClientHello, and the record carrying its
            // end must end with it too; anything else in that record could be read differently
            // by the upstream.
            if declared_end > needed {
                return Err(TlsError::Malformed(
                    "data after the ClientHello in its record",
                ));
            }
            if declared_end == needed && complete {
                let body = message.get(HANDSHAKE_HEADER..).unwrap_or_default();
                return parse_body(body).map(Some);
            }
        }
        if !complete {
            return Ok(None);
        }
        offset += RECORD_HEADER + len;
    }
}

/// Checks as much of a record header as `rest` holds.
fn check_record_prefix(rest: &[u8], first: bool) -> Result<(), TlsError> {
    let bad_version = if first {
        TlsError::NotTls
    } else {
        TlsError::Malformed("record version")
    };
    if let Some(&content_type) = rest.first().filter(|&&t| t != CONTENT_HANDSHAKE) {
        return Err(if first {
            TlsError::NotTls
        } else {
            TlsError::UnexpectedRecord(content_type)
        });
    }
    // Record versions 0x0300 (SSL 3.0) to 0x0304: clients send 0x0301 or 0x0303.
    if rest.get(1).is_some_and(|&major| major != 3) || rest.get(2).is_some_and(|&minor| minor > 4) {
        return Err(bad_version);
    }
    Ok(())
}

/// Checks the handshake header once enough of it has arrived; returns the message's total
/// length when known.
fn check_handshake_header(message: &[u8]) -> Result<Option<usize>, TlsError> {
    if let Some(&kind) = message.first().filter(|&&k| k != HANDSHAKE_CLIENT_HELLO) {
        return Err(TlsError::NotClientHello(kind));
    }
    let Some(&[_, a, b, c]) = message.get(..HANDSHAKE_HEADER) else {
        return Ok(None);
    };
    let length = u32::from_be_bytes([0, a, b, c]);
    let total = HANDSHAKE_HEADER.saturating_add(usize::try_from(length).unwrap_or(usize::MAX));
    if total > MAX_CLIENT_HELLO {
        return Err(TlsError::TooLarge);
    }
    Ok(Some(total))
}

/// Parses a ClientHello body (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2).
fn parse_body(body: &[u8]) -> Result<ClientHello, TlsError> {
    let mut r = Reader(body);
    let legacy_version = r.u16("legacy_version")?;
    r.take(32, "random")?;
    if r.vec8("legacy_session_id")?.0.len() > 32 {
        return Err(TlsError::Malformed(
            "legacy_session_id longer than 32 bytes",
        ));
    }
    let suites = r.vec16("cipher_suites")?.0;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(TlsError::Malformed("cipher_suites"));
    }
    if r.vec8("legacy_compression_methods")?.0.is_empty() {
        return Err(TlsError::Malformed("legacy_compression_methods is empty"));
    }
    let mut hello = ClientHello {
        sni: None,
        alpn: Vec::new(),
        legacy_version,
        supported_versions: Vec::new(),
    };
    // Before TLS 1.3 the extensions block may be absent altogether.
    if r.is_empty() {
        return Ok(hello);
    }
    let mut extensions = r.vec16("extensions")?;
    if !r.is_empty() {
        return Err(TlsError::Malformed("data after the extensions"));
    }
    // Checked once all are read, sorted: a hash set (SipHash and its growth) cost a TLS
    // connection about 3,100 instructions more, for the usual dozen or two extensions.
    let mut kinds = Vec::with_capacity(32);
    while !extensions.is_empty() {
        let kind = extensions.u16("extension type")?;
        let data = extensions.vec16("extension")?;
        kinds.push(kind);
        match kind {
            EXT_SERVER_NAME => hello.sni = parse_server_name(data)?,
            EXT_ALPN => hello.alpn = parse_alpn(data)?,
            EXT_SUPPORTED_VERSIONS => hello.supported_versions = parse_versions(data)?,
            _ => {}
        }
    }
    kinds.sort_unstable();
    if kinds.windows(2).any(|pair| pair[0] == pair[1]) {
        // RFC 8446 §4.2: at most one extension of each type.
        return Err(TlsError::Malformed("duplicate extension"));
    }
    Ok(hello)
}

/// RFC 6066 §3, read as BoringSSL (Envoy) does: exactly one name, of type `host_name`.
fn parse_server_name(mut data: Reader<'_>) -> Result<Option<String>, TlsError> {
    let mut list = data.vec16("server_name list")?;
    if !data.is_empty() {
        return Err(TlsError::Malformed("data after the server_name list"));
    }
    let name_type = list.u8("server_name type")?;
    let name = list.vec16("server_name")?.0;
    if !list.is_empty() {
        return Err(TlsError::Malformed("more than one server_name"));
    }
    if name_type != NAME_TYPE_HOST_NAME {
        return Err(TlsError::Malformed("server_name is not a host_name"));
    }
    host_name(name)
}

/// Validates and normalises an SNI host name; `None` for an IP literal.
fn host_name(raw: &[u8]) -> Result<Option<String>, TlsError> {
    if raw.is_empty() || raw.len() > MAX_HOST_NAME {
        return Err(TlsError::Malformed("server_name length"));
    }
    if !raw
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err(TlsError::Malformed("server_name is not a hostname"));
    }
    let raw = raw.strip_suffix(b".").unwrap_or(raw);
    let name = String::from_utf8_lossy(raw).to_ascii_lowercase();
    if name.split('.').any(str::is_empty) {
        return Err(TlsError::Malformed("server_name has an empty label"));
    }
    // An IPv4 literal in any of the forms resolvers accept (dotted, decimal, octal, hex) ends
    // in a numeric label, as the WHATWG URL standard puts it; no DNS name does. RFC 6066 forbids
    // literals here, so they name no server: such a hello is routed as one without SNI.
    if ends_in_number(&name) {
        return Ok(None);
    }
    Ok(Some(name))
}

/// WHATWG URL "ends in a number": the last label is decimal digits or `0x` and hex digits.
fn ends_in_number(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    if let Some(hex) = last.strip_prefix("0x") {
        return hex.bytes().all(|b| b.is_ascii_hexdigit());
    }
    !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit())
}

/// RFC 7301 §3.1: a non-empty list of non-empty protocol names.
fn parse_alpn(mut data: Reader<'_>) -> Result<Vec<String>, TlsError> {
    let mut list = data.vec16("ALPN list")?;
    if !data.is_empty() {
        return Err(TlsError::Malformed("data after the ALPN list"));
    }
    if list.is_empty() {
        return Err(TlsError::Malformed("empty ALPN list"));
    }
    let mut protocols = Vec::new();
    while !list.is_empty() {
        let name = list.vec8("ALPN protocol")?.0;
        if name.is_empty() {
            return Err(TlsError::Malformed("empty ALPN protocol"));
        }
        protocols.push(String::from_utf8_lossy(name).into_owned());
    }
    Ok(protocols)
}

/// RFC 8446 §4.2.1, ClientHello form: a non-empty list of versions.
fn parse_versions(mut data: Reader<'_>) -> Result<Vec<u16>, TlsError> {
    let mut list = data.vec8("supported_versions list")?;
    if !data.is_empty() {
        return Err(TlsError::Malformed(
            "data after the supported_versions list",
        ));
    }
    if list.is_empty() {
        return Err(TlsError::Malformed("empty supported_versions"));
    }
    let mut versions = Vec::new();
    while !list.is_empty() {
        versions.push(list.u16("supported_versions")?);
    }
    Ok(versions)
}

/// A cursor over TLS presentation-language data; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], TlsError> {
        let (head, tail) = self
            .0
            .split_at_checked(n)
            .ok_or(TlsError::Malformed(what))?;
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, TlsError> {
        match self.take(1, what)? {
            &[b] => Ok(b),
            _ => Err(TlsError::Malformed(what)),
        }
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, TlsError> {
        match self.take(2, what)? {
            &[hi, lo] => Ok(u16::from_be_bytes([hi, lo])),
            _ => Err(TlsError::Malformed(what)),
        }
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self, what: &'static str) -> Result<Reader<'a>, TlsError> {
        let len = self.u8(what)?;
        self.take(usize::from(len), what).map(Reader)
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self, what: &'static str) -> Result<Reader<'a>, TlsError> {
        let len = self.u16(what)?;
        self.take(usize::from(len), what).map(Reader)
    }
}

/// Reads from `stream` into `buf` until it holds a complete ClientHello, which is returned.
///
/// `buf` may already hold the client's first bytes; everything read is left in it (possibly
/// more than the hello) so the caller can replay it upstream. Fails on anything but a
/// ClientHello, on EOF, past [`MAX_PEEK`] bytes, or when `timeout` elapses (tokio time).
pub async fn peek_client_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    timeout: Duration,
) -> Result<ClientHello, TlsError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(hello) = parse_client_hello(buf)? {
            return Ok(hello);
        }
        // The parser decides before MAX_PEEK bytes, so `room` is positive here; the limit keeps
        // a read from pulling in more than the parser would look at.
        let room = MAX_PEEK.saturating_sub(buf.len());
        buf.reserve(READ_CHUNK.min(room));
        let mut limited = (&mut *stream).take(u64::try_from(room).unwrap_or(u64::MAX));
        match tokio::time::timeout_at(deadline, limited.read_buf(buf)).await {
            Err(_) => return Err(TlsError::Timeout),
            Ok(Ok(0)) => return Err(TlsError::Eof),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(TlsError::Io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v8(data: &[u8]) -> Vec<u8> {
        let mut out = vec![u8::try_from(data.len()).unwrap()];
        out.extend_from_slice(data);
        out
    }

    fn v16(data: &[u8]) -> Vec<u8> {
        let mut out = u16::try_from(data.len()).unwrap().to_be_bytes().to_vec();
        out.extend_from_slice(data);
        out
    }

    fn ext(kind: u16, data: &[u8]) -> (u16, Vec<u8>) {
        (kind, data.to_vec())
    }

    fn sni_ext(name: &[u8]) -> (u16, Vec<u8>) {
        let mut entry = vec![NAME_TYPE_HOST_NAME];
        entry.extend(v16(name));
        ext(EXT_SERVER_NAME, &v16(&entry))
    }

    fn alpn_ext(protocols: &[&str]) -> (u16, Vec<u8>) {
        let list: Vec<u8> = protocols.iter().flat_map(|p| v8(p.as_bytes())).collect();
        ext(EXT_ALPN, &v16(&list))
    }

    fn versions_ext(versions: &[u16]) -> (u16, Vec<u8>) {
        let list: Vec<u8> = versions.iter().flat_map(|v| v.to_be_bytes()).collect();
        ext(EXT_SUPPORTED_VERSIONS, &v8(&list))
    }

    /// A ClientHello body: TLS 1.2 legacy version, a 32-byte session id, two suites.
    fn body_with(extensions: Option<&[(u16, Vec<u8>)]>) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.extend(v8(&[9u8; 32]));
        body.extend(v16(&[0x13, 0x01, 0x13, 0x02]));
        body.extend(v8(&[0]));
        if let Some(extensions) = extensions {
            let block: Vec<u8> = extensions
                .iter()
                .flat_map(|(kind, data)| {
                    let mut e = kind.to_be_bytes().to_vec();
                    e.extend(v16(data));
                    e
                })
                .collect();
            body.extend(v16(&block));
        }
        body
    }

    /// Wraps a body in a handshake header.
    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let len = u32::try_from(body.len()).unwrap().to_be_bytes();
        let mut out = vec![kind, len[1], len[2], len[3]];
        out.extend_from_slice(body);
        out
    }

    fn record(content_type: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![content_type, 3, 1];
        out.extend(v16(payload));
        out
    }

    /// Cuts `msg` into handshake records of `size` bytes (the last may be shorter).
    fn records(msg: &[u8], size: usize) -> Vec<u8> {
        msg.chunks(size)
            .flat_map(|c| record(CONTENT_HANDSHAKE, c))
            .collect()
    }

    fn standard_extensions() -> Vec<(u16, Vec<u8>)> {
        vec![
            sni_ext(b"Api.Example.COM."),
            alpn_ext(&["h2", "http/1.1"]),
            versions_ext(&[0x0a0a, 0x0304, 0x0303]),
            // GREASE and padding: unknown, skipped.
            ext(0x1a1a, &[]),
            ext(21, &[0; 40]),
        ]
    }

    fn standard_hello() -> Vec<u8> {
        let msg = message(
            HANDSHAKE_CLIENT_HELLO,
            &body_with(Some(&standard_extensions())),
        );
        records(&msg, MAX_RECORD_PAYLOAD)
    }

    fn hello_with(extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
        records(
            &message(HANDSHAKE_CLIENT_HELLO, &body_with(Some(extensions))),
            MAX_RECORD_PAYLOAD,
        )
    }

    fn parse(buf: &[u8]) -> ClientHello {
        parse_client_hello(buf).unwrap().unwrap()
    }

    fn malformed(buf: &[u8]) -> &'static str {
        match parse_client_hello(buf) {
            Err(TlsError::Malformed(what)) => what,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    fn sni_of(name: &[u8]) -> Result<Option<ClientHello>, TlsError> {
        parse_client_hello(&hello_with(&[sni_ext(name)]))
    }

    #[test]
    fn parses_every_field() {
        let hello = parse(&standard_hello());
        assert_eq!(
            hello,
            ClientHello {
                sni: Some("api.example.com".into()),
                alpn: vec!["h2".into(), "http/1.1".into()],
                legacy_version: 0x0303,
                supported_versions: vec![0x0a0a, 0x0304, 0x0303],
            }
        );
    }

    #[test]
    fn every_prefix_needs_more_bytes() {
        let wire = standard_hello();
        for cut in 0..wire.len() {
            assert!(
                matches!(parse_client_hello(&wire[..cut]), Ok(None)),
                "prefix of {cut} bytes"
            );
        }
        assert!(parse_client_hello(&wire).unwrap().is_some());
    }

    #[test]
    fn handshake_split_over_records() {
        let msg = message(
            HANDSHAKE_CLIENT_HELLO,
            &body_with(Some(&standard_extensions())),
        );
        let expected = parse(&standard_hello());
        let half = msg.len().div_ceil(2);
        let third = msg.len().div_ceil(3);
        // 1..=3: the handshake header itself is split across records.
        for size in [half, third, 1, 2, 3, 7, 100] {
            let wire = records(&msg, size);
            assert_eq!(parse(&wire), expected, "records of {size} bytes");
            for cut in 0..wire.len() {
                assert!(matches!(parse_client_hello(&wire[..cut]), Ok(None)));
            }
        }
    }

    #[test]
    fn record_versions_ssl3_to_tls13_accepted() {
        for minor in 0..=4 {
            let mut wire = standard_hello();
            wire[2] = minor;
            assert!(parse_client_hello(&wire).unwrap().is_some(), "3.{minor}");
        }
        let mut wire = standard_hello();
        wire[2] = 5;
        assert!(matches!(parse_client_hello(&wire), Err(TlsError::NotTls)));
        // A later record with a bad version is no longer "not TLS" but malformed.
        let msg = message(HANDSHAKE_CLIENT_HELLO, &body_with(None));
        let mut wire = records(&msg, 10);
        wire[16] = 2;
        assert_eq!(malformed(&wire), "record version");
    }

    /// Heap's algorithm.
    fn permutations<T: Clone>(items: &mut [T], k: usize, out: &mut Vec<Vec<T>>) {
        if k <= 1 {
            out.push(items.to_vec());
            return;
        }
        for i in 0..k {
            permutations(items, k - 1, out);
            items.swap(if k % 2 == 1 { 0 } else { i }, k - 1);
        }
    }

    #[test]
    fn every_extension_order() {
        let expected = parse(&standard_hello());
        let mut orders = Vec::new();
        permutations(&mut standard_extensions(), 5, &mut orders);
        assert_eq!(orders.len(), 120);
        for order in orders {
            assert_eq!(parse(&hello_with(&order)), expected);
        }
    }

    #[test]
    fn inner_truncation_at_every_length_never_panics() {
        // Consistent outer lengths around a body cut short: parse or reject, never panic.
        let body = body_with(Some(&standard_extensions()));
        let mut parsed = 0;
        for cut in 0..body.len() {
            let wire = records(&message(HANDSHAKE_CLIENT_HELLO, &body[..cut]), 1000);
            if let Ok(Some(_)) = parse_client_hello(&wire) {
                parsed += 1;
            }
        }
        // Only the cut right after the compression methods: a hello without extensions.
        assert_eq!(parsed, 1);
    }

    #[test]
    fn no_extensions_and_no_sni() {
        let wire = records(&message(HANDSHAKE_CLIENT_HELLO, &body_with(None)), 1000);
        let hello = parse(&wire);
        assert_eq!(hello.sni, None);
        assert!(hello.alpn.is_empty() && hello.supported_versions.is_empty());
        let hello = parse(&hello_with(&[alpn_ext(&["h2"])]));
        assert_eq!(hello.sni, None);
        assert_eq!(hello.alpn, ["h2"]);
    }

    #[test]
    fn sni_is_normalised() {
        let sni = |name: &[u8]| sni_of(name).unwrap().unwrap().sni;
        assert_eq!(sni(b"WWW.Example.Com."), Some("www.example.com".into()));
        assert_eq!(sni(b"a_b-c.internal"), Some("a_b-c.internal".into()));
        assert_eq!(sni(b"localhost"), Some("localhost".into()));
        assert_eq!(sni(b"1password.com"), Some("1password.com".into()));
        assert_eq!(
            sni(b"0xdeadbeef.example"),
            Some("0xdeadbeef.example".into())
        );
    }

    #[test]
    fn ip_literal_sni_counts_as_none() {
        for literal in [
            &b"127.0.0.1"[..],
            b"10.1.2.3.",
            b"2130706433",
            b"0177.0.0.1",
            b"0x7f.1",
            b"0X7F000001",
            b"foo.0x",
        ] {
            assert_eq!(sni_of(literal).unwrap().unwrap().sni, None, "{literal:?}");
        }
    }

    #[test]
    fn sni_that_is_not_a_hostname_is_rejected() {
        let long = vec![b'a'; 256];
        for bad in [
            "exämple.com".as_bytes(),
            b"[::1]",
            b"::1",
            b"a b.com",
            b"evil.com\0.good.com",
            b"",
            b".",
            b"a..b",
            b".a",
            b"a.b..",
            &long,
        ] {
            assert!(
                matches!(sni_of(bad), Err(TlsError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert!(sni_of(&long[..255]).unwrap().is_some());
    }

    #[test]
    fn server_name_list_must_hold_one_host_name() {
        let entry = |kind: u8, name: &[u8]| {
            let mut e = vec![kind];
            e.extend(v16(name));
            e
        };
        let two = [entry(0, b"a.com"), entry(0, b"b.com")].concat();
        assert_eq!(
            malformed(&hello_with(&[ext(EXT_SERVER_NAME, &v16(&two))])),
            "more than one server_name"
        );
        let other = entry(1, b"a.com");
        assert_eq!(
            malformed(&hello_with(&[ext(EXT_SERVER_NAME, &v16(&other))])),
            "server_name is not a host_name"
        );
        assert_eq!(
            malformed(&hello_with(&[ext(EXT_SERVER_NAME, &v16(&[]))])),
            "server_name type"
        );
        assert_eq!(
            malformed(&hello_with(&[ext(EXT_SERVER_NAME, &[])])),
            "server_name list"
        );
    }

    #[test]
    fn bad_alpn_and_versions_are_rejected() {
        assert_eq!(malformed(&hello_with(&[alpn_ext(&[])])), "empty ALPN list");
        assert_eq!(
            malformed(&hello_with(&[alpn_ext(&["h2", ""])])),
            "empty ALPN protocol"
        );
        assert_eq!(
            malformed(&hello_with(&[versions_ext(&[])])),
            "empty supported_versions"
        );
        assert_eq!(
            malformed(&hello_with(&[ext(EXT_SUPPORTED_VERSIONS, &v8(&[3, 4, 3]))])),
            "supported_versions"
        );
    }

    #[test]
    fn duplicate_extensions_are_rejected() {
        let sni = sni_ext(b"a.com");
        assert_eq!(
            malformed(&hello_with(&[sni.clone(), alpn_ext(&["h2"]), sni])),
            "duplicate extension"
        );
        let unknown = ext(0x7777, &[1]);
        assert_eq!(
            malformed(&hello_with(&[unknown.clone(), unknown])),
            "duplicate extension"
        );
    }

    #[test]
    fn garbage_and_sslv2_are_not_tls() {
        for garbage in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PRI * HTTP/2.0",
            b"\x00",
            b"SSH-2.0-OpenSSH",
            // SSLv2-compatible ClientHello: two-byte length with the high bit, msg type 1.
            b"\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10",
            b"\x16\x02",
            b"\x16\x03\x05",
        ] {
            assert!(
                matches!(parse_client_hello(garbage), Err(TlsError::NotTls)),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn wrong_content_type() {
        // An alert first is not a TLS client opening a connection.
        assert!(matches!(
            parse_client_hello(&record(21, &[2, 40])),
            Err(TlsError::NotTls)
        ));
        // A change_cipher_spec between two fragments of the hello.
        let msg = message(
            HANDSHAKE_CLIENT_HELLO,
            &body_with(Some(&standard_extensions())),
        );
        let (a, b) = msg.split_at(50);
        let wire = [
            record(CONTENT_HANDSHAKE, a),
            record(20, &[1]),
            record(CONTENT_HANDSHAKE, b),
        ]
        .concat();
        assert!(matches!(
            parse_client_hello(&wire),
            Err(TlsError::UnexpectedRecord(20))
        ));
        // Decided from the content type byte alone.
        let cut = record(CONTENT_HANDSHAKE, a).len() + 1;
        assert!(matches!(
            parse_client_hello(&wire[..cut]),
            Err(TlsError::UnexpectedRecord(20))
        ));
    }

    #[test]
    fn records_after_the_hello_are_ignored() {
        let mut wire = standard_hello();
        wire.extend(record(20, &[1]));
        wire.extend(record(23, b"early data"));
        wire.extend(b"\xff\xff garbage");
        assert_eq!(parse(&wire), parse(&standard_hello()));
    }

    #[test]
    fn data_after_the_hello_in_its_record_is_rejected() {
        let mut msg = message(HANDSHAKE_CLIENT_HELLO, &body_with(None));
        msg.extend(message(HANDSHAKE_CLIENT_HELLO, &body_with(None)));
        let wire = record(CONTENT_HANDSHAKE, &msg);
        assert_eq!(malformed(&wire), "data after the ClientHello in its record");
        // Decided from the headers, without waiting for the record's end.
        assert_eq!(
            malformed(&wire[..10]),
            "data after the ClientHello in its record"
        );
    }

    #[test]
    fn empty_and_overlong_records_are_rejected() {
        assert_eq!(
            malformed(&record(CONTENT_HANDSHAKE, &[])),
            "empty handshake record"
        );
        let msg = message(HANDSHAKE_CLIENT_HELLO, &body_with(None));
        let wire = [
            record(CONTENT_HANDSHAKE, &msg[..10]),
            record(CONTENT_HANDSHAKE, &[]),
            record(CONTENT_HANDSHAKE, &msg[10..]),
        ]
        .concat();
        assert_eq!(malformed(&wire), "empty handshake record");
        assert_eq!(
            malformed(b"\x16\x03\x01\x40\x01"),
            "record longer than 2^14 bytes"
        );
    }

    #[test]
    fn not_a_client_hello() {
        // A ServerHello, decided from the first payload byte.
        let wire = record(CONTENT_HANDSHAKE, &message(2, &body_with(None)));
        assert!(matches!(
            parse_client_hello(&wire[..6]),
            Err(TlsError::NotClientHello(2))
        ));
    }

    #[test]
    fn oversized_hello_is_rejected() {
        // Declared too large: rejected from the header, before any body arrives.
        let limit = u32::try_from(MAX_CLIENT_HELLO - HANDSHAKE_HEADER + 1).unwrap();
        let len = limit.to_be_bytes();
        let head = [22, 3, 1, 0x40, 0, 1, len[1], len[2], len[3]];
        assert!(matches!(parse_client_hello(&head), Err(TlsError::TooLarge)));
        // Exactly at the limit, with a padding extension, is accepted.
        let base = body_with(Some(&[sni_ext(b"big.example"), ext(21, &[])])).len();
        let padding = MAX_CLIENT_HELLO - HANDSHAKE_HEADER - base;
        let body = body_with(Some(&[sni_ext(b"big.example"), ext(21, &vec![0; padding])]));
        let msg = message(HANDSHAKE_CLIENT_HELLO, &body);
        assert_eq!(msg.len(), MAX_CLIENT_HELLO);
        let hello = parse(&records(&msg, MAX_RECORD_PAYLOAD));
        assert_eq!(hello.sni.as_deref(), Some("big.example"));
        // Within the message limit but cut so finely that the records exceed MAX_PEEK.
        let wire = records(&msg, 4);
        assert!(matches!(parse_client_hello(&wire), Err(TlsError::TooLarge)));
        assert!(matches!(
            parse_client_hello(&wire[..MAX_PEEK]),
            Err(TlsError::TooLarge)
        ));
    }

    fn hostname() -> impl Strategy<Value = String> {
        "[a-z0-9_-]{1,20}(\\.[a-z0-9-]{1,20}){0,3}\\.[a-z]{1,10}"
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_client_hello(&bytes);
            // Behind a valid record header too, so the handshake parser sees them.
            let _ = parse_client_hello(&record(CONTENT_HANDSHAKE, &bytes));
            let _ = parse_client_hello(&records(&message(1, &bytes), 50));
        }

        #[test]
        fn mutated_hello_never_panics(index in any::<prop::sample::Index>(), value in any::<u8>()) {
            let mut wire = standard_hello();
            let i = index.index(wire.len());
            wire[i] = value;
            for cut in [i, i + 1, wire.len()] {
                let _ = parse_client_hello(&wire[..cut]);
            }
        }

        #[test]
        fn any_fragmentation_gives_the_same_sni(
            name in hostname(),
            sizes in proptest::collection::vec(1usize..300, 1..40),
        ) {
            let msg = message(
                HANDSHAKE_CLIENT_HELLO,
                &body_with(Some(&[alpn_ext(&["h2"]), sni_ext(name.as_bytes())])),
            );
            let mut wire = Vec::new();
            let mut rest = &msg[..];
            for size in sizes.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (fragment, tail) = rest.split_at((*size).min(rest.len()));
                wire.extend(record(CONTENT_HANDSHAKE, fragment));
                rest = tail;
            }
            prop_assert!(matches!(parse_client_hello(&wire[..wire.len() - 1]), Ok(None)));
            let hello = parse_client_hello(&wire).unwrap().unwrap();
            prop_assert_eq!(hello.sni, Some(name));
        }
    }

    #[tokio::test]
    async fn peek_reads_a_hello_arriving_in_pieces() {
        let wire = records(
            &message(
                HANDSHAKE_CLIENT_HELLO,
                &body_with(Some(&standard_extensions())),
            ),
            60,
        );
        let (mut client, mut server) = tokio::io::duplex(64);
        let sent = wire.clone();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for piece in sent[3..].chunks(17) {
                client.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            client.write_all(b"after").await.unwrap();
            client
        });
        // Protocol detection already read the first three bytes.
        let mut buf = BytesMut::from(&wire[..3]);
        let hello = peek_client_hello(&mut server, &mut buf, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(hello.sni.as_deref(), Some("api.example.com"));
        // Everything read is kept for replay, untouched.
        assert!(buf.starts_with(&wire));
        drop(writer.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn peek_times_out_on_a_silent_client() {
        let (_client, mut server) = tokio::io::duplex(64);
        let mut buf = BytesMut::from(&b"\x16\x03\x01"[..]);
        let started = tokio::time::Instant::now();
        let err = peek_client_hello(&mut server, &mut buf, Duration::from_secs(3))
            .await
            .unwrap_err();
        assert!(matches!(err, TlsError::Timeout), "{err:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        assert_eq!(&buf[..], b"\x16\x03\x01");
    }

    #[tokio::test]
    async fn peek_fails_on_eof_and_garbage() {
        let wire = standard_hello();
        let (client, mut server) = tokio::io::duplex(1 << 16);
        drop(client);
        let mut buf = BytesMut::from(&wire[..wire.len() - 1]);
        let err = peek_client_hello(&mut server, &mut buf, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, TlsError::Eof), "{err:?}");

        // Garbage already buffered is refused without reading (the client is never closed).
        let (_client, mut server) = tokio::io::duplex(64);
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        let err = peek_client_hello(&mut server, &mut buf, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, TlsError::NotTls), "{err:?}");
    }
}

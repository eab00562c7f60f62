//! Protocol detection on the first bytes a client sends.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncRead;

use crate::io::read_some;

/// What the first bytes look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// An HTTP/1.x request line.
    Http1,
    /// The HTTP/2 connection preface (prior knowledge, h2c).
    Http2,
    /// A TLS handshake record: route by the ClientHello's SNI.
    Tls,
    /// Anything else (including nothing within the timeout): opaque TCP.
    Opaque,
}

/// Bytes that are always enough to decide. Detection takes whatever a read brings (a
/// request head, a ClientHello), so that the first read is usually the only one.
pub const MAX_DETECT_BYTES: usize = 16;

const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];

/// The start of the HTTP/2 client connection preface, as much as detection reads.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// Classifies `buf`: `Some` when decided, `None` when more bytes could change the answer.
pub fn classify(buf: &[u8]) -> Option<Detected> {
    // The TLS record type for handshakes; the ClientHello parser judges the rest.
    if buf.first() == Some(&0x16) {
        return Some(Detected::Tls);
    }
    if buf.starts_with(H2_PREFACE) {
        return Some(Detected::Http2);
    }
    let mut undecided = H2_PREFACE.starts_with(buf);
    for m in METHODS {
        if buf.starts_with(m) {
            return Some(Detected::Http1);
        }
        if m.starts_with(buf) {
            undecided = true;
        }
    }
    (!undecided).then_some(Detected::Opaque)
}

/// Reads until the protocol is known or `timeout` passes. Returns everything the reads
/// brought, to be parsed or replayed by whoever handles the connection; nothing is
/// allocated until bytes arrive.
pub async fn detect<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> std::io::Result<(Detected, BytesMut)> {
    let mut buf = BytesMut::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(d) = classify(&buf) {
            return Ok((d, buf));
        }
        let read = tokio::time::timeout_at(deadline, read_some(stream, &mut buf)).await;
        match read {
            // Timed out, or the client half-closed: decide on what we have.
            Err(_) | Ok(Ok(0)) => return Ok((classify(&buf).unwrap_or(Detected::Opaque), buf)),
            Ok(Ok(_)) => {
                if buf.len() >= MAX_DETECT_BYTES {
                    return Ok((classify(&buf).unwrap_or(Detected::Opaque), buf));
                }
            }
            Ok(Err(e)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_methods_and_garbage() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"CONNECT a:443 HTTP/1.1"), Some(Detected::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"\x16\x03\x01"), Some(Detected::Tls));
        assert_eq!(classify(b"\x16"), Some(Detected::Tls));
        assert_eq!(classify(b"SSH-2.0"), Some(Detected::Opaque));
        assert_eq!(classify(b"GETX"), Some(Detected::Opaque));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM"), Some(Detected::Http2));
        assert_eq!(classify(b"PRI * HTT"), None);
        assert_eq!(classify(b"PRI * HTTP/1.1"), Some(Detected::Opaque));
    }

    #[tokio::test(start_paused = true)]
    async fn times_out_to_opaque_on_silence() {
        // The client stays connected and silent, as a server-first protocol's client does.
        let (_client, mut server) = tokio::io::duplex(64);
        let task =
            tokio::spawn(async move { detect(&mut server, Duration::from_millis(100)).await });
        tokio::time::sleep(Duration::from_millis(90)).await;
        assert!(!task.is_finished());
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (d, buf) = task.await.unwrap().unwrap();
        assert_eq!(d, Detected::Opaque);
        assert!(buf.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_split_method() {
        use tokio::io::AsyncWriteExt;
        let (mut client, mut server) = tokio::io::duplex(64);
        let task = tokio::spawn(async move { detect(&mut server, Duration::from_secs(1)).await });
        client.write_all(b"PO").await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        client.write_all(b"ST /x HTTP/1.1\r\n").await.unwrap();
        let (d, buf) = task.await.unwrap().unwrap();
        assert_eq!(d, Detected::Http1);
        assert!(buf.starts_with(b"POST"));
    }

    #[tokio::test]
    async fn keeps_all_the_first_read_brought() {
        use tokio::io::AsyncWriteExt;
        // A whole request head in one read: the HTTP/1.1 server parses it without reading
        // again, as a ClientHello in one read is parsed without a second.
        let head = b"GET /a/long/path HTTP/1.1\r\nhost: example.com\r\naccept: */*\r\n\r\n";
        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(head).await.unwrap();
        let (d, buf) = detect(&mut server, Duration::from_secs(1)).await.unwrap();
        assert_eq!(d, Detected::Http1);
        assert_eq!(&buf[..], &head[..]);
    }
}

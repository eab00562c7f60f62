//! The original destination of a redirected connection (`SO_ORIGINAL_DST`).
//!
//! socket2 wraps the `getsockopt` call safely, so this crate needs no unsafe code.

use std::net::SocketAddr;

use crate::accept::ClientStream;

/// Where the client meant to connect before iptables redirected it to us; `peer`, the
/// address `accept` gave, names the socket's family, so the common case makes one system
/// call (a connection's local address is only read when there was no redirect).
///
/// Without a redirect (a direct connection, or no conntrack entry) this is the listener's
/// own address, which the loop guard then refuses.
pub(crate) fn original_dst(stream: &ClientStream, peer: SocketAddr) -> std::io::Result<SocketAddr> {
    let sock = stream.socket()?;
    let found = match peer {
        SocketAddr::V4(_) => sock.original_dst_v4(),
        SocketAddr::V6(_) => sock.original_dst_v6(),
    };
    match found {
        Ok(addr) => match addr.as_socket() {
            Some(addr) => Ok(addr),
            None => local_addr(&sock),
        },
        // ENOENT: no NAT entry, the client connected to us directly.
        Err(e) if e.raw_os_error() == Some(2) => local_addr(&sock),
        Err(e) => Err(e),
    }
}

fn local_addr(sock: &socket2::SockRef<'_>) -> std::io::Result<SocketAddr> {
    sock.local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("not an IP socket"))
}

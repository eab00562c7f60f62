//! The proxy's listening sockets.

use std::io;
use std::net::SocketAddr;

use socket2::SockRef;
use tokio::net::{TcpListener, TcpStream};

/// A listening socket whose connections come with `TCP_NODELAY` set.
///
/// Linux copies the option from a listener to every socket it accepts, so it is set once
/// here rather than with a system call per connection, as a proxy that writes whole
/// messages wants it (Envoy sets it on every connection).
#[derive(Debug)]
pub struct Listener(TcpListener);

impl TryFrom<TcpListener> for Listener {
    type Error = io::Error;

    fn try_from(listener: TcpListener) -> io::Result<Self> {
        SockRef::from(&listener).set_tcp_nodelay(true)?;
        Ok(Listener(listener))
    }
}

impl Listener {
    /// The next connection and its peer's address.
    pub(crate) async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        self.0.accept().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = Listener::try_from(listener).unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let client = client.unwrap();
        let (accepted, peer) = accepted.unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        assert!(accepted.nodelay().unwrap());
        assert!(!client.nodelay().unwrap());
    }
}

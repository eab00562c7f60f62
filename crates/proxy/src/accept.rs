//! The proxy's listening sockets and the client connections they accept.

use std::io::{self, Write};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use rustix::net::{RecvFlags, SocketFlags};
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// A listening socket whose connections come with `TCP_NODELAY` set, accepted without
/// registering them with the runtime's reactor (see [`ClientStream`]).
///
/// Linux copies the option from a listener to every socket it accepts, so it is set once
/// here rather than with a system call per connection, as a proxy that writes whole
/// messages wants it (Envoy sets it on every connection).
#[derive(Debug)]
pub struct Listener {
    /// The listening socket, held as a stream only so that Tokio watches its readiness:
    /// its listener type accepts into registered streams and offers no readiness of its
    /// own. Nothing is read from or written to it.
    socket: TcpStream,
}

impl TryFrom<TcpListener> for Listener {
    type Error = io::Error;

    fn try_from(listener: TcpListener) -> io::Result<Self> {
        SockRef::from(&listener).set_tcp_nodelay(true)?;
        let fd = OwnedFd::from(listener.into_std()?);
        let socket = TcpStream::from_std(std::net::TcpStream::from(fd))?;
        Ok(Listener { socket })
    }
}

impl Listener {
    /// The next connection and its peer's address.
    pub(crate) async fn accept(&self) -> io::Result<(ClientStream, SocketAddr)> {
        self.socket
            .async_io(Interest::READABLE, || {
                let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
                let (fd, from) = rustix::net::acceptfrom_with(&self.socket, flags)?;
                let peer = from
                    .and_then(|from| SocketAddr::try_from(from).ok())
                    .ok_or_else(|| io::Error::other("accepted a connection with no IP peer"))?;
                Ok((ClientStream::accepted(fd), peer))
            })
            .await
    }
}

/// A client's connection, registered with the runtime's reactor only when an operation on
/// it first has to wait.
///
/// A connection that brings its request with it and is answered and closed without ever
/// waiting on its socket (one request, then `Connection: close`) costs no registration:
/// two `epoll_ctl` calls, and the failed read that leads to the first, fewer per
/// connection, as HAProxy's new connections cost none.
#[derive(Debug)]
pub(crate) struct ClientStream(State);

#[derive(Debug)]
enum State {
    /// Not yet registered: reads and writes are plain non-blocking system calls.
    Direct(std::net::TcpStream),
    Registered(TcpStream),
    /// Registration failed; the socket is closed.
    Closed,
}

impl ClientStream {
    fn accepted(fd: OwnedFd) -> Self {
        ClientStream(State::Direct(std::net::TcpStream::from(fd)))
    }

    /// Whether the reactor watches the socket, so a wait on it costs no registration.
    pub(crate) fn is_registered(&self) -> bool {
        !matches!(self.0, State::Direct(_))
    }

    /// The socket as a registered Tokio stream, registering it now if it is not yet.
    pub(crate) fn registered(&mut self) -> io::Result<&TcpStream> {
        if let State::Direct(_) = self.0 {
            // Closed until the registration succeeds: a failed one has dropped the socket.
            self.0 = match std::mem::replace(&mut self.0, State::Closed) {
                State::Direct(socket) => State::Registered(TcpStream::from_std(socket)?),
                other => other,
            };
        }
        match &self.0 {
            State::Registered(stream) => Ok(stream),
            _ => Err(closed()),
        }
    }

    /// Registers the socket and polls `op` on it: a direct operation would have blocked.
    fn poll_registered<T>(
        &mut self,
        cx: &mut Context<'_>,
        op: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        self.registered()?;
        match &mut self.0 {
            State::Registered(stream) => op(Pin::new(stream), cx),
            _ => Poll::Ready(Err(closed())),
        }
    }

    /// A write: `direct` while the socket is not registered, `registered` once it is (and
    /// after registering it, when `direct` would block).
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        mut direct: impl FnMut(&mut std::net::TcpStream) -> io::Result<usize>,
        registered: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match &mut self.0 {
            State::Direct(socket) => {
                let written = retrying(|| direct(socket));
                if !would_block(&written) {
                    return Poll::Ready(written);
                }
            }
            State::Registered(stream) => return registered(Pin::new(stream), cx),
            State::Closed => return Poll::Ready(Err(closed())),
        }
        self.poll_registered(cx, registered)
    }

    /// The socket, for its options.
    pub(crate) fn socket(&self) -> io::Result<SockRef<'_>> {
        match &self.0 {
            State::Direct(socket) => Ok(SockRef::from(socket)),
            State::Registered(stream) => Ok(SockRef::from(stream)),
            State::Closed => Err(closed()),
        }
    }

    /// Makes the close a reset (`SO_LINGER` of zero).
    pub(crate) fn set_zero_linger(&self) -> io::Result<()> {
        self.socket()?.set_linger(Some(std::time::Duration::ZERO))
    }
}

/// The most a read on a socket not yet registered takes at once: the HTTP/1.1 server's
/// reads are of 4 KiB.
const DIRECT_READ: usize = 4096;

fn closed() -> io::Error {
    io::Error::from(io::ErrorKind::NotConnected)
}

impl From<TcpStream> for ClientStream {
    fn from(stream: TcpStream) -> Self {
        ClientStream(State::Registered(stream))
    }
}

/// Retries a direct system call that a signal interrupted.
fn retrying<T>(mut call: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match call() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            done => return done,
        }
    }
}

fn would_block<T>(result: &io::Result<T>) -> bool {
    matches!(result, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.0 {
            State::Direct(socket) => {
                // Read into a buffer of our own left uninitialized, then copied: `buf`'s
                // unfilled part must be zeroed to be read into (`initialize_unfilled`), 4 KiB
                // from `read_some` for the tens of bytes a request or a ClientHello is.
                let mut stack = [MaybeUninit::<u8>::uninit(); DIRECT_READ];
                let room = buf.remaining().min(DIRECT_READ);
                let read = retrying(|| {
                    let ((filled, _), _) =
                        rustix::net::recv(&*socket, &mut stack[..room], RecvFlags::empty())?;
                    buf.put_slice(filled);
                    Ok(filled.len())
                });
                if would_block(&read) {
                    return this.poll_registered(cx, |s, cx| s.poll_read(cx, buf));
                }
                read?;
                Poll::Ready(Ok(()))
            }
            State::Registered(stream) => Pin::new(stream).poll_read(cx, buf),
            State::Closed => Poll::Ready(Err(closed())),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_send(
            cx,
            |socket| crate::io::send(&*socket, buf),
            |stream, cx| crate::io::poll_send(&stream, cx, buf),
        )
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_send(
            cx,
            |socket| socket.write_vectored(bufs),
            |stream, cx| stream.poll_write_vectored(cx, bufs),
        )
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().0 {
            State::Direct(socket) => Poll::Ready(socket.shutdown(std::net::Shutdown::Write)),
            State::Registered(stream) => Pin::new(stream).poll_shutdown(cx),
            State::Closed => Poll::Ready(Err(closed())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::mem::MaybeUninit;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn accepted() -> (TcpStream, ClientStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = Listener::try_from(listener).unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let client = client.unwrap();
        let (accepted, peer) = accepted.unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        (client, accepted)
    }

    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        let (client, accepted) = accepted().await;
        assert!(accepted.socket().unwrap().tcp_nodelay().unwrap());
        assert!(!client.nodelay().unwrap());
    }

    #[tokio::test]
    async fn a_connection_is_registered_only_once_it_must_wait() {
        let (mut client, mut accepted) = accepted().await;
        client.write_all(b"ping").await.unwrap();
        // Once the bytes have arrived, they are read and answered with no wait.
        let mut peeked = [MaybeUninit::uninit(); 4];
        while accepted.socket().unwrap().peek(&mut peeked).unwrap_or(0) < 4 {
            tokio::task::yield_now().await;
        }
        let mut buf = [0; 4];
        accepted.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        accepted.write_all(b"pong").await.unwrap();
        assert!(!accepted.is_registered());
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");

        // Nothing more to read: the read registers the socket and waits for the bytes.
        let mut again = [0; 5];
        let mut read = std::pin::pin!(accepted.read_exact(&mut again));
        let first = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await;
        assert!(first.is_pending());
        client.write_all(b"again").await.unwrap();
        read.await.unwrap();
        assert_eq!(&again, b"again");
        assert!(accepted.is_registered());
    }
}

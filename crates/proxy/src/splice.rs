//! Opaque TCP relayed with `splice(2)`: bytes go socket → pipe → socket inside the kernel
//! and never through user space, so a bulk transfer costs the proxy two system calls per
//! pipe-full instead of two copies of every byte.
//!
//! A direction starts by copying through its thread's buffer, and turns to a pipe of its
//! own once a read fills that buffer. A TLS handshake or an exchange of small messages
//! never does, and never pays for a pipe: made, registered and closed per direction, that
//! was a third of a short connection's system calls. An idle connection holds no pipe and
//! no buffer.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use rustix::pipe::{PipeFlags, SpliceFlags, pipe_with, splice};
use socket2::SockRef;
use tokio::io::{AsyncWriteExt, Interest, Ready};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::accept::ClientStream;
use crate::guard::{Expired, GuardedIo};

/// A read of this much (one TLS record) marks a bulk transfer: the direction moves to a
/// pipe. Smaller reads are copied through user space.
const COPY: usize = 16 * 1024;

/// A new pipe's capacity (Linux's default, 16 pages).
const PIPE: usize = 64 * 1024;

/// What a pipe grows to once a transfer fills it: bulk transfers then take a quarter of the
/// system calls (about 20% less proxy CPU per byte measured here). Pipes start small
/// because every pipe counts against the user's pipe allowance
/// (`/proc/sys/fs/pipe-user-pages-soft`); past it, new pipes get two pages.
const BULK_PIPE: usize = 256 * 1024;

/// Bytes moved each way, and how the relay ended.
#[derive(Debug)]
pub(crate) struct Relayed {
    /// Client to upstream, `prefix` included.
    pub sent: u64,
    /// Upstream to client.
    pub received: u64,
    /// `Ok` once both directions have ended cleanly.
    pub result: io::Result<()>,
}

/// Sends `prefix` (bytes the proxy already read from the client), then relays both ways
/// until both directions end, passing half-closes on, until nothing moves either way for
/// the client's idle timeout, or until the client's connection reaches its maximum
/// duration.
pub(crate) async fn relay(
    client: &mut GuardedIo<ClientStream>,
    prefix: &[u8],
    upstream: &mut TcpStream,
) -> Relayed {
    // Atomics only because the future must be `Send`; one task touches them.
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let last = Activity::new();
    let idle = client.idle_timeout();
    let max = client.max_deadline();
    let relayed = async {
        upstream.write_all(prefix).await?;
        sent.store(prefix.len() as u64, Relaxed);
        last.touch();
        // Spliced bytes move when the kernel says they can: the socket is watched from here.
        let (client, upstream) = (client.get_mut().registered()?, &*upstream);
        tokio::try_join!(
            one_way(client, upstream, &sent, &last),
            one_way(upstream, client, &received, &last),
        )
        .map(|_| ())
    };
    // Activity moves the idle deadline later; the sleep is only re-armed when it fires.
    // Nothing has been idle yet when the relay starts, so the first sleep is armed without
    // a clock read (a maximum duration already past ends it at its first poll).
    let watchdog = async {
        let mut idle_deadline = last.at() + idle;
        loop {
            let deadline = max.map_or(idle_deadline, |max| max.min(idle_deadline));
            tokio::time::sleep_until(deadline).await;
            idle_deadline = last.at() + idle;
            let now = Instant::now();
            if max.is_some_and(|max| max <= now) {
                break Expired::MaxDuration;
            }
            if idle_deadline <= now {
                break Expired::Idle;
            }
        }
    };
    let result = tokio::select! {
        result = relayed => result,
        why = watchdog => Err(client.expire_relay(why)),
    };
    Relayed {
        sent: sent.into_inner(),
        received: received.into_inner(),
        result,
    }
}

/// When bytes last moved either way.
struct Activity {
    start: Instant,
    nanos: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            nanos: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let nanos = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.nanos.store(nanos, Relaxed);
    }

    fn at(&self) -> Instant {
        self.start + Duration::from_nanos(self.nanos.load(Relaxed))
    }
}

/// Moves bytes from `from` to `to` until `from` ends, then ends `to`'s sending side.
async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    moved: &AtomicU64,
    last: &Activity,
) -> io::Result<()> {
    loop {
        if sender_ended(from).await? {
            return pass_end(to);
        }
        let (read, rest) = match copy_once(from, to) {
            Ok(Copied::End) => return pass_end(to),
            Ok(Copied::Moved { read, rest }) => (read, rest),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        last.touch();
        moved.fetch_add((read - rest.len()) as u64, Relaxed);
        let mut sent = 0;
        while sent < rest.len() {
            to.writable().await?;
            match crate::io::try_send(to, &rest[sent..]) {
                Ok(n) => {
                    sent += n;
                    moved.fetch_add(n as u64, Relaxed);
                    last.touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if read == COPY {
            break;
        }
    }
    let mut pipe: Option<(OwnedFd, OwnedFd)> = None;
    let mut capacity = PIPE;
    loop {
        if sender_ended(from).await? {
            return pass_end(to);
        }
        let (pipe_out, pipe_in) = match &pipe {
            Some(p) => p,
            None => pipe.insert(pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?),
        };
        // The pipe is empty here, so a would-block can only come from the socket, and
        // clearing the socket's readiness is right.
        let filled = from.try_io(Interest::READABLE, || {
            Ok(splice(from, None, pipe_in, None, capacity, flags())?)
        });
        let mut held = match filled {
            Ok(0) => return pass_end(to),
            Ok(n) => {
                if n == PIPE && capacity == PIPE {
                    // Refused past the allowance: the pipe keeps its size.
                    capacity = rustix::pipe::fcntl_setpipe_size(pipe_in, BULK_PIPE).unwrap_or(PIPE);
                }
                n
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        last.touch();
        while held > 0 {
            to.writable().await?;
            // Likewise the pipe holds bytes, so only the socket can be full.
            match to.try_io(Interest::WRITABLE, || {
                Ok(splice(pipe_out, None, to, None, held, flags())?)
            }) {
                Ok(n) => {
                    held -= n;
                    moved.fetch_add(n as u64, Relaxed);
                    last.touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// What one read of the copy phase did.
enum Copied {
    /// The sender ended its stream.
    End,
    /// `read` bytes arrived; `rest` is what the receiver did not take yet.
    Moved { read: usize, rest: Vec<u8> },
}

thread_local! {
    /// The copy phase's read buffer, one per thread and zeroed once: a buffer on each
    /// call's stack was zeroed, all 16 KiB of it, before every read (about five a short TLS
    /// connection).
    static COPY_BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; COPY].into_boxed_slice());
}

/// Reads what is there (up to `COPY`) and writes what the receiver takes now. The buffer
/// is the thread's, never in the relay's future: only a remainder the receiver could not
/// take is kept, on the heap, until it is written.
fn copy_once(from: &TcpStream, to: &TcpStream) -> io::Result<Copied> {
    COPY_BUFFER.with_borrow_mut(|buf| {
        let read = read_draining(from, buf)?;
        if read == 0 {
            return Ok(Copied::End);
        }
        let mut written = 0;
        while written < read {
            match crate::io::try_send(to, &buf[written..read]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(Copied::Moved {
            read,
            rest: buf[written..read].to_vec(),
        })
    })
}

/// Reads what `from` holds into `buf`. A read that comes back short has drained the
/// socket: its readiness is cleared now, as tokio's own `poll_read` does on Linux, rather
/// than by one more read that would block (two of a short TLS connection's reads were
/// such). Tokio keeps a socket's closed readiness when it clears, so an end that came
/// with the bytes is still seen by the next `readable`.
fn read_draining(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut read = None;
    let cleared = from.try_io(Interest::READABLE, || {
        let n = crate::io::recv(from, buf)?;
        read = Some(n);
        if 0 < n && n < buf.len() {
            // How `try_io` is told to clear the readiness it found.
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match read {
        Some(n) => Ok(n),
        None => cleared,
    }
}

/// Waits until `from` can be read; `true` when it is known to have ended without a read.
///
/// Tokio keeps a socket's closed readiness (epoll's `EPOLLRDHUP`: the peer's FIN has
/// arrived) when a read clears its readable readiness, and clears that only after a read
/// that drained the socket. Closed and no longer readable is a sender that ended before the
/// last read emptied the socket: the read that would return 0 is skipped (one of a short TLS
/// connection's system calls). An error (a reset) is left for the read to report, except
/// when it comes alone (see [`Next::TakeError`]).
async fn sender_ended(from: &TcpStream) -> io::Result<bool> {
    loop {
        let ready = from.ready(Interest::READABLE | Interest::ERROR).await?;
        match next(ready) {
            Next::Ended => return Ok(true),
            Next::Read => return Ok(false),
            Next::TakeError => {
                if let Some(error) = from.take_error()? {
                    return Err(error);
                }
                // Nothing pending: forget the readiness, or it would be found again at once.
                let _ = from.try_io(Interest::ERROR, || {
                    Err::<(), _>(io::ErrorKind::WouldBlock.into())
                });
            }
        }
    }
}

/// What a direction does with its sender's readiness.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// The sender ended and nothing is left to read.
    Ended,
    /// Read: bytes, the end, or an error that the read reports.
    Read,
    /// An error without readable or closed readiness. Tokio does not attempt a read on
    /// that (its readable interest does not cover errors), so the read found "would block"
    /// without a system call while the readiness kept answering at once: a loop that never
    /// returned, holding its worker thread and every connection on it. The error is taken
    /// from the socket instead. Seen with the proxy and its clients on different CPUs,
    /// when clients reset connections mid-handshake (wrk stopping its TLS connections).
    TakeError,
}

fn next(ready: Ready) -> Next {
    if ready.is_error() && !ready.is_readable() {
        return Next::TakeError;
    }
    let readable = (ready - Ready::READ_CLOSED).is_readable();
    if ready.is_read_closed() && !readable && !ready.is_error() {
        Next::Ended
    } else {
        Next::Read
    }
}

/// The sender's end of the stream: passed on, the other way kept open.
fn pass_end(to: &TcpStream) -> io::Result<()> {
    match SockRef::from(to).shutdown(Shutdown::Write) {
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
        _ => Ok(()),
    }
}

fn flags() -> SpliceFlags {
    SpliceFlags::MOVE | SpliceFlags::NONBLOCK
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use prometheus_client::registry::Registry;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;
    use crate::guard::Expired;
    use crate::metrics::Metrics;

    /// A connected pair of sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// The proxy's two sockets, and the far ends of each: the client's and the upstream's.
    async fn lab(idle: Duration) -> (GuardedIo<ClientStream>, TcpStream, TcpStream, TcpStream) {
        let (client, client_side) = pair().await;
        let (upstream_side, upstream) = pair().await;
        let guarded = GuardedIo::new(ClientStream::from(client_side), idle, idle, None);
        (guarded, upstream_side, client, upstream)
    }

    #[tokio::test]
    async fn an_end_that_came_with_the_last_bytes_needs_no_read_of_its_own() {
        use tokio::io::AsyncWriteExt;
        let (mut peer, ours) = pair().await;
        let mut buf = [0u8; 64];
        // Bytes that arrive after a read emptied the socket are read, an end with them or not.
        peer.write_all(b"abc").await.unwrap();
        ours.readable().await.unwrap();
        assert_eq!(read_draining(&ours, &mut buf).unwrap(), 3);
        peer.write_all(b"de").await.unwrap();
        peer.shutdown().await.unwrap();
        assert!(!sender_ended(&ours).await.unwrap());
        assert_eq!(read_draining(&ours, &mut buf).unwrap(), 2);

        // Bytes and the end both there when the socket is first polled: the end was there
        // when the read emptied the socket.
        let (mut peer, ours) = std_pair();
        std::io::Write::write_all(&mut peer, b"abc").unwrap();
        peer.shutdown(Shutdown::Write).unwrap();
        let ours = TcpStream::from_std(ours).unwrap();
        assert!(!sender_ended(&ours).await.unwrap());
        assert_eq!(read_draining(&ours, &mut buf).unwrap(), 3);
        assert!(sender_ended(&ours).await.unwrap());
    }

    #[tokio::test]
    async fn a_reset_is_left_for_the_read_to_report() {
        use tokio::io::AsyncWriteExt;
        let (mut peer, ours) = pair().await;
        ours.try_write(b"unread by the peer").unwrap();
        peer.write_all(b"abc").await.unwrap();
        ours.readable().await.unwrap();
        assert_eq!(read_draining(&ours, &mut [0u8; 64]).unwrap(), 3);
        // Closed with bytes it never read, the peer resets the connection.
        peer.readable().await.unwrap();
        drop(peer);
        assert!(!sender_ended(&ours).await.unwrap());
        let reset = read_draining(&ours, &mut [0u8; 64]).unwrap_err();
        assert_eq!(reset.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn bulk_both_ways_with_half_closes_and_counts() {
        let (mut guarded, mut proxy_up, mut client, mut upstream) =
            lab(Duration::from_secs(60)).await;
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let expected = big.clone();
        let relay = tokio::spawn(async move {
            let relayed = relay(&mut guarded, b"hello ", &mut proxy_up).await;
            (relayed.sent, relayed.received, relayed.result.is_ok())
        });
        let upstream_side = tokio::spawn(async move {
            let mut got = Vec::new();
            upstream.read_to_end(&mut got).await.unwrap();
            // The client's half-close arrived; the other way is still open.
            upstream.write_all(b"bye").await.unwrap();
            upstream.shutdown().await.unwrap();
            got
        });
        client.write_all(&big).await.unwrap();
        client.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        let got = upstream_side.await.unwrap();
        assert_eq!(&got[..6], b"hello ");
        assert!(got[6..] == expected[..], "bytes changed on the way");
        assert_eq!(back, b"bye");
        assert_eq!(
            relay.await.unwrap(),
            (3_000_006, 3, true),
            "sent, received, clean end"
        );
    }

    #[tokio::test]
    async fn small_exchanges_then_a_bulk_transfer_to_a_slow_reader_arrive_whole() {
        let (mut guarded, mut proxy_up, mut client, mut upstream) =
            lab(Duration::from_secs(60)).await;
        let relay = tokio::spawn(async move {
            let relayed = relay(&mut guarded, b"", &mut proxy_up).await;
            (relayed.sent, relayed.received, relayed.result.is_ok())
        });
        // Request and answer, each smaller than a read: the copy phase both ways.
        for i in 0..5u8 {
            client.write_all(&[b'q', i]).await.unwrap();
            let mut got = [0u8; 2];
            upstream.read_exact(&mut got).await.unwrap();
            assert_eq!(got, [b'q', i]);
            upstream.write_all(&[b'a', i]).await.unwrap();
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(got, [b'a', i]);
        }
        // Then more than the sockets hold, read late: remainders kept, then the pipe.
        let big: Vec<u8> = (0..4_000_000u32).map(|i| (i % 253) as u8).collect();
        let expected = big.clone();
        let sender = tokio::spawn(async move {
            upstream.write_all(&big).await.unwrap();
            upstream.shutdown().await.unwrap();
            upstream
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert!(back == expected, "bytes changed on the way");
        client.shutdown().await.unwrap();
        drop(sender.await.unwrap());
        assert_eq!(
            relay.await.unwrap(),
            (10, 4_000_010, true),
            "sent, received, clean end"
        );
    }

    #[tokio::test]
    async fn a_short_read_clears_the_readiness_it_used() {
        let (mut writer, reader) = pair().await;
        writer.write_all(b"abc").await.unwrap();
        reader.readable().await.unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(read_draining(&reader, &mut buf).unwrap(), 3);
        assert_eq!(&buf[..3], b"abc");
        // With the readiness cleared, tokio does not call the read at all.
        let mut called = false;
        let again = reader.try_io(Interest::READABLE, || {
            called = true;
            Ok(())
        });
        assert!(!called, "a read that would block was left to make");
        assert_eq!(again.unwrap_err().kind(), io::ErrorKind::WouldBlock);
        // New bytes make it readable again.
        writer.write_all(b"d").await.unwrap();
        reader.readable().await.unwrap();
        assert_eq!(read_draining(&reader, &mut buf).unwrap(), 1);
    }

    #[tokio::test]
    async fn bytes_that_arrive_with_the_end_are_relayed_and_the_end_passed_on() {
        let (mut guarded, mut proxy_up, mut client, mut upstream) =
            lab(Duration::from_secs(60)).await;
        // Bytes and the half-close are both there before the relay's first read, which
        // comes back short.
        client.write_all(b"bye").await.unwrap();
        client.shutdown().await.unwrap();
        guarded
            .get_mut()
            .registered()
            .unwrap()
            .readable()
            .await
            .unwrap();
        let relay = tokio::spawn(async move {
            let relayed = relay(&mut guarded, b"", &mut proxy_up).await;
            (relayed.sent, relayed.received, relayed.result.is_ok())
        });
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye");
        upstream.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert!(back.is_empty());
        assert_eq!(
            relay.await.unwrap(),
            (3, 0, true),
            "sent, received, clean end"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_moving_for_the_idle_timeout_ends_the_relay() {
        let (guarded, mut proxy_up, mut client, _upstream) = lab(Duration::from_secs(30)).await;
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let mut guarded = guarded.count_in(Arc::clone(&metrics));
        client.write_all(b"x").await.unwrap();
        let start = Instant::now();
        let relayed = relay(&mut guarded, b"", &mut proxy_up).await;
        let error = relayed.result.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(30));
        assert_eq!(guarded.expired(), Some(Expired::Idle));
        assert_eq!(metrics.tcp_idle_timeout.get(), 1);
        assert_eq!((relayed.sent, relayed.received), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_either_way_keep_the_relay_open() {
        let (mut guarded, mut proxy_up, mut client, mut upstream) =
            lab(Duration::from_secs(30)).await;
        let start = Instant::now();
        let relay = tokio::spawn(async move { relay(&mut guarded, b"", &mut proxy_up).await });
        // A byte every 20 s, alternating directions, for twice the idle timeout.
        for round in 0..3 {
            tokio::time::sleep(Duration::from_secs(20)).await;
            let (from, to) = if round % 2 == 0 {
                (&mut client, &mut upstream)
            } else {
                (&mut upstream, &mut client)
            };
            from.write_all(b"x").await.unwrap();
            let mut byte = [0];
            to.read_exact(&mut byte).await.unwrap();
        }
        let relayed = relay.await.unwrap();
        assert_eq!(relayed.result.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(90));
        assert_eq!((relayed.sent, relayed.received), (2, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_relay_ends_at_the_max_connection_duration() {
        let (guarded, mut proxy_up, mut client, mut upstream) = lab(Duration::from_secs(30)).await;
        let metrics = Arc::new(Metrics::new(&mut Registry::default()));
        let mut guarded = guarded.count_in(Arc::clone(&metrics));
        // Counted from the accept: time spent before the relay starts counts.
        tokio::time::sleep(Duration::from_secs(1)).await;
        guarded.set_max_duration(Some(Duration::from_secs(10)));
        let accepted = Instant::now() - Duration::from_secs(1);
        let relay = tokio::spawn(async move {
            let relayed = relay(&mut guarded, b"", &mut proxy_up).await;
            (relayed, guarded.expired())
        });
        // A byte a second, well inside the idle timeout, until the relay ends.
        let mut moved = 0;
        while client.write_all(b"x").await.is_ok() && moved < 20 {
            let mut byte = [0];
            if upstream.read_exact(&mut byte).await.is_err() {
                break;
            }
            moved += 1;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let (relayed, expired) = relay.await.unwrap();
        assert_eq!(relayed.result.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert_eq!(expired, Some(Expired::MaxDuration));
        assert_eq!(accepted.elapsed(), Duration::from_secs(10));
        assert_eq!(metrics.tcp_max_duration.get(), 1);
        assert_eq!(metrics.tcp_idle_timeout.get(), 0);
    }

    #[test]
    fn an_error_without_readable_readiness_is_taken_not_read() {
        assert_eq!(next(Ready::ERROR), Next::TakeError);
        // EPOLLOUT with EPOLLERR: mio reports the write side closed too.
        assert_eq!(next(Ready::ERROR | Ready::WRITE_CLOSED), Next::TakeError);
        assert_eq!(next(Ready::ERROR | Ready::READABLE), Next::Read);
        assert_eq!(next(Ready::ERROR | Ready::READ_CLOSED), Next::Read);
        assert_eq!(next(Ready::READABLE), Next::Read);
        assert_eq!(next(Ready::READABLE | Ready::READ_CLOSED), Next::Read);
        assert_eq!(next(Ready::READ_CLOSED), Next::Ended);
        assert_eq!(next(Ready::READ_CLOSED | Ready::WRITABLE), Next::Ended);
    }

    /// A connected pair of non-blocking sockets, not yet registered with any runtime.
    fn std_pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let b = listener.accept().unwrap().0;
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn an_error_readiness_with_nothing_pending_neither_wedges_nor_spins_the_relay() {
        use nix::sys::socket::{TimestampingFlag, setsockopt, sockopt::Timestamping};
        let (client, client_side) = std_pair();
        let (upstream_side, upstream) = std_pair();
        // Send timestamps go to the socket's error queue: epoll reports EPOLLERR after each
        // write to the client, with no error for a read or `SO_ERROR` to return.
        let flags = TimestampingFlag::SOF_TIMESTAMPING_SOFTWARE
            | TimestampingFlag::SOF_TIMESTAMPING_TX_SOFTWARE;
        setsockopt(&client_side, Timestamping, &flags).unwrap();
        let polls = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&polls);
        let (done, finished) = std::sync::mpsc::channel();
        // A thread and runtime of its own: a relay that never returns from a poll holds
        // that thread, and the test still sees the bytes stop.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let idle = Duration::from_secs(60);
                let client_side = ClientStream::from(TcpStream::from_std(client_side).unwrap());
                let mut guarded = GuardedIo::new(client_side, idle, idle, None);
                let mut proxy_up = TcpStream::from_std(upstream_side).unwrap();
                let mut relaying = std::pin::pin!(relay(&mut guarded, b"", &mut proxy_up));
                let relayed = std::future::poll_fn(|cx| {
                    counted.fetch_add(1, Relaxed);
                    relaying.as_mut().poll(cx)
                })
                .await;
                let _ = done.send((relayed.sent, relayed.received, relayed.result.is_ok()));
            });
        });
        let (mut client, mut upstream) = (
            TcpStream::from_std(client).unwrap(),
            TcpStream::from_std(upstream).unwrap(),
        );
        let exchange = async {
            upstream.write_all(b"answer").await.unwrap();
            let mut got = [0u8; 6];
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"answer");
            tokio::time::sleep(Duration::from_millis(20)).await;
            let idle_from = polls.load(Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
            let idle_polls = polls.load(Relaxed) - idle_from;
            assert!(
                idle_polls < 10,
                "polled {idle_polls} times with nothing to move"
            );
            client.write_all(b"more").await.unwrap();
            client.shutdown().await.unwrap();
            let mut sent = Vec::new();
            upstream.read_to_end(&mut sent).await.unwrap();
            assert_eq!(sent, b"more");
            upstream.shutdown().await.unwrap();
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .expect("the relay stopped moving bytes");
        let relayed =
            tokio::task::spawn_blocking(move || finished.recv_timeout(Duration::from_secs(10)))
                .await
                .unwrap()
                .expect("the relay did not end");
        assert_eq!(relayed, (4, 6, true), "sent, received, clean end");
    }

    #[tokio::test]
    async fn a_reset_upstream_ends_the_relay_with_the_bytes_counted() {
        let (mut guarded, mut proxy_up, mut client, upstream) = lab(Duration::from_secs(60)).await;
        client.write_all(b"abc").await.unwrap();
        let relay = tokio::spawn(async move { relay(&mut guarded, b"", &mut proxy_up).await });
        let mut upstream = upstream;
        let mut got = [0; 3];
        upstream.read_exact(&mut got).await.unwrap();
        SockRef::from(&upstream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(upstream);
        let relayed = relay.await.unwrap();
        assert!(relayed.result.is_err(), "{relayed:?}");
        assert_eq!(relayed.sent, 3);
        let mut rest = Vec::new();
        let _ = client.read_to_end(&mut rest).await;
        assert!(rest.is_empty());
    }
}

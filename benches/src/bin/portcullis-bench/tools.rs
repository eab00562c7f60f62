//! Small helpers the harness runs as its own subcommands inside the namespaces: a busy loop
//! for the parallelism check, a bulk TCP source and reader, a holder of idle keep-alive
//! connections, and the null relay the HTTP cases' floor is measured with.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Upper bound on what one `source` connection may ask for, so that a typo cannot keep
/// the server streaming for hours.
const MAX_TRANSFER: u64 = 8 << 30;

/// A fixed amount of integer work; prints how long it took in milliseconds.
pub fn spin(iterations: u64) {
    let start = Instant::now();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in 0..iterations {
        x = std::hint::black_box(x.rotate_left(7) ^ i).wrapping_mul(0x2545_F491_4F6C_DD1D);
    }
    std::hint::black_box(x);
    println!("{}", start.elapsed().as_secs_f64() * 1000.0);
}

/// Serves bulk data on every address of `listen`: each connection sends a decimal byte
/// count and a newline, gets that many bytes back, and the server closes. Runs until
/// killed.
pub fn source(listen: &[SocketAddr]) -> anyhow::Result<()> {
    let listeners = listen
        .iter()
        .map(|a| TcpListener::bind(a).with_context(|| format!("binding {a}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    println!("listening {listen:?}");
    let accepting: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    std::thread::spawn(move || {
                        let _ = serve_bulk(stream);
                    });
                }
            })
        })
        .collect();
    for thread in accepting {
        let _ = thread.join();
    }
    Ok(())
}

fn serve_bulk(stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut left = line.trim().parse::<u64>().unwrap_or(0).min(MAX_TRANSFER);
    let chunk = vec![0x5Au8; 256 * 1024];
    let mut out = stream;
    while left > 0 {
        let n = usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
        out.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    out.shutdown(std::net::Shutdown::Write)
}

/// Asks a `source` at `addr` for `bytes` and reads them to the end; prints
/// `bytes=N secs=S` and fails on a short transfer or after `timeout`.
pub fn fetch(addr: SocketAddr, bytes: u64, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    writeln!(stream, "{bytes}")?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        if start.elapsed() > timeout {
            bail!("timed out after {got} of {bytes} bytes");
        }
        match stream.read(&mut buf)? {
            0 => break,
            n => got += n as u64,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if got != bytes {
        bail!("short transfer: {got} of {bytes} bytes");
    }
    println!("bytes={got} secs={secs}");
    Ok(())
}

/// Opens `count` connections to `addr`, makes one keep-alive request with `host` on each
/// and reads its response, then holds them all idle until standard input closes or
/// `hold_for` passes. Prints `held N` once all are open.
pub fn hold(addr: SocketAddr, count: usize, host: &str, hold_for: Duration) -> anyhow::Result<()> {
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connection {i} to {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(request.as_bytes())?;
        read_response(&mut stream).with_context(|| format!("response on connection {i}"))?;
        held.push(stream);
    }
    println!("held {}", held.len());
    std::io::stdout().flush()?;
    // Standard input closing is the harness saying "done"; the deadline covers a harness
    // that died without closing it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(hold_for);
    // Still open at the end means the proxy kept every idle connection.
    let alive = held.iter().filter(|s| still_open(s)).count();
    println!("alive {alive}");
    Ok(())
}

/// Reads one HTTP/1.1 response with a `Content-Length` body.
fn read_response(stream: &mut TcpStream) -> anyhow::Result<()> {
    let mut data = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            bail!("closed before a full response");
        }
        data.extend_from_slice(&buf[..n]);
        let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            bail!("not a 200: {}", head.lines().next().unwrap_or(""));
        }
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .context("no content-length")?;
        if data.len() >= end + 4 + length {
            return Ok(());
        }
    }
}

fn still_open(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    stream.set_nonblocking(true).is_ok()
        && matches!(stream.peek(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// The null relay's read buffer: larger than any request or response of the HTTP cases,
/// so one read takes a whole message.
const RELAY_BUFFER: usize = 16 * 1024;

/// One relayed connection: the client's side and the upstream's, and per side the bytes
/// read from it that the other side's socket buffer had no room for.
struct Pair {
    sides: [mio::net::TcpStream; 2],
    pending: [Vec<u8>; 2],
}

/// The floor any epoll proxy stands on: relays each connection accepted on `listen` to
/// `upstream` byte for byte, on one thread, one `read` and one `write` per message and
/// nothing in between (no parsing, routing, pooling, metrics or task wake-ups). Runs until
/// killed.
pub fn relay(listen: SocketAddr, upstream: SocketAddr) -> anyhow::Result<()> {
    use mio::{Events, Interest, Poll, Token};

    const LISTENER: Token = Token(usize::MAX);
    let mut poll = Poll::new()?;
    let mut listener =
        mio::net::TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    println!("relaying {listen} to {upstream}");
    let mut pairs: Vec<Option<Pair>> = Vec::new();
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; RELAY_BUFFER];
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e.into());
        }
        for event in &events {
            if event.token() == LISTENER {
                accept_pairs(&listener, upstream, &poll, &mut pairs);
                continue;
            }
            // Token 2i is pair i's client side, 2i + 1 its upstream side.
            let (index, side) = (event.token().0 / 2, event.token().0 % 2);
            let Some(Some(pair)) = pairs.get_mut(index) else {
                continue;
            };
            // Linux reports a TCP socket writable with every arrival under edge triggering,
            // so only a side with bytes waiting for this one acts on it.
            let waiting = event.is_writable() && !pair.pending[1 - side].is_empty();
            let mut open = !waiting || flush(pair, 1 - side);
            if open && (event.is_readable() || event.is_read_closed()) {
                open = pump(pair, side, &mut buf, event.is_read_closed());
            }
            // The waiting side's own arrivals were not read meanwhile: read it dry now.
            if open && waiting && pair.pending[1 - side].is_empty() {
                open = pump(pair, 1 - side, &mut buf, true);
            }
            if !open && let Some(mut pair) = pairs[index].take() {
                for s in &mut pair.sides {
                    let _ = poll.registry().deregister(s);
                }
            }
        }
    }
}

/// Accepts every waiting client and dials the upstream for each (a blocking connect: the
/// floor is measured on keep-alive connections, where it happens once).
fn accept_pairs(
    listener: &mio::net::TcpListener,
    upstream: SocketAddr,
    poll: &mio::Poll,
    pairs: &mut Vec<Option<Pair>>,
) {
    use mio::{Interest, Token};

    while let Ok((client, _)) = listener.accept() {
        let Ok(up) = TcpStream::connect(upstream) else {
            continue;
        };
        if up.set_nonblocking(true).is_err() {
            continue;
        }
        let _ = client.set_nodelay(true);
        let _ = up.set_nodelay(true);
        let index = pairs.iter().position(Option::is_none).unwrap_or_else(|| {
            pairs.push(None);
            pairs.len() - 1
        });
        let mut pair = Pair {
            sides: [client, mio::net::TcpStream::from_std(up)],
            pending: [Vec::new(), Vec::new()],
        };
        let both = Interest::READABLE | Interest::WRITABLE;
        let registered = pair.sides.iter_mut().enumerate().all(|(side, s)| {
            poll.registry()
                .register(s, Token(index * 2 + side), both)
                .is_ok()
        });
        if registered {
            pairs[index] = Some(pair);
        }
    }
}

/// Reads what `side` has and writes it straight to the other side, until the other
/// side's buffer is full or `side` is empty: a short read is taken to mean empty unless
/// `dry` (the peer closed, or arrivals went unread), which reads on to `WouldBlock`.
/// False once the pair is done.
fn pump(pair: &mut Pair, side: usize, buf: &mut [u8], dry: bool) -> bool {
    if !pair.pending[side].is_empty() {
        return true;
    }
    let Pair { sides, pending } = pair;
    let [a, b] = sides;
    let (from, to) = if side == 0 { (a, b) } else { (b, a) };
    loop {
        match from.read(buf) {
            Ok(0) => return false,
            Ok(n) => {
                let Some(written) = write_some(to, &buf[..n]) else {
                    return false;
                };
                if written < n {
                    pending[side].extend_from_slice(&buf[written..n]);
                    return true;
                }
                if n < buf.len() && !dry {
                    return true;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// Writes the bytes read from `side` that waited to the other side; false on an error.
fn flush(pair: &mut Pair, side: usize) -> bool {
    let to = &mut pair.sides[1 - side];
    let Some(written) = write_some(to, &pair.pending[side]) else {
        return false;
    };
    pair.pending[side].drain(..written);
    true
}

/// Writes as much of `bytes` as the socket takes now; `None` on an error.
fn write_some(to: &mut mio::net::TcpStream, bytes: &[u8]) -> Option<usize> {
    let mut written = 0;
    while written < bytes.len() {
        match to.write(&bytes[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    Some(written)
}

//! Small helpers the harness runs as its own subcommands inside the namespaces: a busy loop
//! for the parallelism check, a bulk TCP source and reader, and a holder of idle
//! keep-alive connections.

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

/// Serves bulk data: each connection sends a decimal byte count and a newline, gets that
/// many bytes back, and the server closes. Runs until killed.
pub fn source(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    println!("listening {listen}");
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        std::thread::spawn(move || {
            let _ = serve_bulk(stream);
        });
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

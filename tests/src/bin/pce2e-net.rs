//! A minimal TCP listener and client for the end-to-end lab, so the tests need no netcat.
//!
//! `pce2e-net listen ADDR LOG` accepts connections on ADDR and appends one line per event to
//! LOG: `listening` once bound, `accept PEER` per connection and `bytes PEER N` when the peer
//! is done; after the first bytes arrive it answers with a small HTTP response saying `sink`,
//! so a test can also tell from the client side that a connection reached it.
//!
//! `pce2e-net connect ADDR PAYLOAD SECONDS` connects, sends PAYLOAD (bytes given as hex
//! digits when it starts with `hex:`), reads until the peer closes or SECONDS pass, and prints
//! one line:
//! `connected=1 received=N end=eof|reset|timeout data=...` or `connected=0 error=...`.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Appends a line to the event log, flushing it at once so the test sees it while we run.
fn log_line(log: &Mutex<std::fs::File>, line: &str) {
    let mut file = log.lock().unwrap_or_else(|e| e.into_inner());
    let _ = writeln!(file, "{line}");
    let _ = file.flush();
}

fn listen(addr: &str, log_path: &str) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    let log = Arc::new(Mutex::new(
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)?,
    ));
    log_line(&log, "listening");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let log = Arc::clone(&log);
        std::thread::spawn(move || {
            let peer = stream
                .peer_addr()
                .map_or_else(|_| "?".to_owned(), |p| p.to_string());
            log_line(&log, &format!("accept {peer}"));
            let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
            let mut total = 0usize;
            let mut answered = false;
            let mut buf = [0u8; 4096];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        total += n;
                        if !answered {
                            answered = true;
                            let reply = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nsink\n";
                            let _ = stream.write_all(reply.as_bytes());
                            let _ = stream.shutdown(Shutdown::Write);
                        }
                    }
                }
            }
            log_line(&log, &format!("bytes {peer} {total}"));
        });
    }
    Ok(())
}

/// PAYLOAD as bytes: `hex:` followed by hex digits, else the text itself.
fn payload_bytes(payload: &str) -> Result<Vec<u8>, String> {
    let Some(hex) = payload.strip_prefix("hex:") else {
        return Ok(payload.as_bytes().to_vec());
    };
    if hex.len() % 2 != 0 {
        return Err("odd number of hex digits".to_owned());
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|e| e.to_string()))
        .collect()
}

fn connect(addr: &str, payload: &str, seconds: u64) -> String {
    let payload = match payload_bytes(payload) {
        Ok(bytes) => bytes,
        Err(e) => return format!("connected=0 error=bad-payload:{e}"),
    };
    let timeout = Duration::from_secs(seconds);
    let target = match addr.parse() {
        Ok(target) => target,
        Err(e) => return format!("connected=0 error=bad-address:{e}"),
    };
    let mut stream = match TcpStream::connect_timeout(&target, timeout) {
        Ok(stream) => stream,
        Err(e) => return format!("connected=0 error={:?}", e.kind()),
    };
    let deadline = Instant::now() + timeout;
    // A write can fail when the peer already closed; what we read back is what matters.
    let _ = stream.write_all(&payload);
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break "timeout";
        }
        let _ = stream.set_read_timeout(Some(left));
        match stream.read(&mut buf) {
            Ok(0) => break "eof",
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break "timeout";
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break "reset",
        }
    };
    let text = String::from_utf8_lossy(&data).replace(['\r', '\n'], " ");
    format!("connected=1 received={} end={end} data={text}", data.len())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["listen", addr, log] => match listen(addr, log) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pce2e-net listen {addr}: {e}");
                ExitCode::FAILURE
            }
        },
        ["connect", addr, payload, seconds] => {
            let Ok(seconds) = seconds.parse() else {
                eprintln!("pce2e-net connect: SECONDS must be a number");
                return ExitCode::FAILURE;
            };
            println!("{}", connect(addr, payload, seconds));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: pce2e-net listen ADDR LOG | pce2e-net connect ADDR PAYLOAD SECONDS");
            ExitCode::FAILURE
        }
    }
}

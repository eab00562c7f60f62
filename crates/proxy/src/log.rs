//! The access log: one line per HTTP request (when its stream ends) or TCP connection (when
//! it closes), in Istio's default text format or with the keys of Istio's default JSON
//! format. Lines are appended to one pending buffer that a writer thread swaps out every
//! [`FLUSH_INTERVAL`] and writes in one go: a request wakes no thread, makes no system call
//! and allocates nothing for its text line (it is formatted straight into the pending
//! buffer, under a lock held for that line or the writer's swap). When the buffer is full a
//! line is dropped and counted, so the data path never waits for the disk.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;

use crate::http::REQUEST_ID_LEN;

/// Bytes pending before new lines are dropped: about 16,000 lines, 320,000 lines a second
/// at [`FLUSH_INTERVAL`].
const PENDING: usize = 4 * 1024 * 1024;

/// How long lines wait to be written, at most.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);

/// Pending bytes that wake the writer before its interval ends.
const BATCH: usize = 256 * 1024;

/// How access log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Istio's default text format (`meshConfig.accessLogEncoding: TEXT`).
    Text,
    /// Istio's default JSON keys (`meshConfig.accessLogEncoding: JSON`), one object a line.
    Json,
}

/// What waits for the writer.
#[derive(Default)]
struct Pending {
    /// Lines not yet taken by the writer (UTF-8: request bytes that are not are written
    /// as the lossy conversion shows them).
    lines: Vec<u8>,
    /// Callers waiting for what is pending now to reach the file.
    flushes: Vec<SyncSender<()>>,
    /// The log is gone: the writer writes what is pending and ends.
    closed: bool,
}

/// The pending lines and the writer that takes them.
struct Writer {
    pending: Arc<Mutex<Pending>>,
    /// The writer thread, woken early when lines pend faster than it takes them.
    thread: std::thread::Thread,
}

impl Writer {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        lock(&self.pending)
    }
}

/// A poisoned lock still holds whole lines: a panic never happens while one is copied.
fn lock(pending: &Mutex<Pending>) -> MutexGuard<'_, Pending> {
    pending.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where access log lines go: nowhere, or to one writer thread's file.
pub struct AccessLog {
    writer: Option<Writer>,
    format: Format,
    dropped: Counter,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("enabled", &self.enabled())
            .field("format", &self.format)
            .finish()
    }
}

impl AccessLog {
    /// No access log.
    pub fn off() -> Self {
        AccessLog {
            writer: None,
            format: Format::Text,
            dropped: Counter::default(),
        }
    }

    /// Appends lines in `format` to `path` (created if missing), counting lines dropped
    /// under overload in `dropped`. `/dev/stdout` and `/dev/stderr` are the process's own
    /// streams, which a proxy running as another user than its parent could not reopen.
    pub fn open(path: &Path, format: Format, dropped: Counter) -> std::io::Result<Self> {
        let file: Box<dyn std::io::Write + Send> = match path.to_str() {
            Some("/dev/stdout") => Box::new(std::io::stdout()),
            Some("/dev/stderr") => Box::new(std::io::stderr()),
            _ => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let pending = Arc::new(Mutex::new(Pending::default()));
        let taken = Arc::clone(&pending);
        let thread = std::thread::Builder::new()
            .name("portcullis-access-log".into())
            .spawn(move || write_lines(&taken, file))?;
        Ok(AccessLog {
            writer: Some(Writer {
                pending,
                thread: thread.thread().clone(),
            }),
            format,
            dropped,
        })
    }

    /// Whether lines are written at all: nothing is captured for them otherwise.
    pub fn enabled(&self) -> bool {
        self.writer.is_some()
    }

    /// Adds the line of `entry` to the pending lines, or drops it when the writer is behind.
    /// A text line is formatted in place, under the lock: that costs less than formatting
    /// it apart and copying it in, and takes about as long as the copy would. A JSON line,
    /// which builds a value first, is formatted before the lock is taken.
    pub(crate) fn write(&self, entry: &Entry<'_>) {
        let Some(writer) = &self.writer else {
            return;
        };
        let json = (self.format == Format::Json).then(|| {
            let mut line = Vec::new();
            entry.json(&mut line);
            line
        });
        let mut pending = writer.pending();
        let before = pending.lines.len();
        match &json {
            Some(line) => pending.lines.extend_from_slice(line),
            None => entry.text(&mut pending.lines),
        }
        let after = pending.lines.len();
        if after > PENDING {
            pending.lines.truncate(before);
            drop(pending);
            self.dropped.inc();
            return;
        }
        drop(pending);
        if before < BATCH && after >= BATCH {
            writer.thread.unpark();
        }
    }

    /// Waits up to `timeout` for every line pending so far to reach the file (at shutdown,
    /// off the data path); `false` if it did not.
    pub fn flush(&self, timeout: Duration) -> bool {
        let Some(writer) = &self.writer else {
            return true;
        };
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        writer.pending().flushes.push(done);
        writer.thread.unpark();
        wait.recv_timeout(timeout).is_ok()
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        if let Some(writer) = &self.writer {
            writer.pending().closed = true;
            writer.thread.unpark();
        }
    }
}

/// The writer thread: every [`FLUSH_INTERVAL`] (or when woken by filling lines or a flush)
/// swaps the pending lines for its own emptied buffer and writes them in one go. It ends
/// once the log is dropped and what was pending is written.
fn write_lines(pending: &Mutex<Pending>, mut file: Box<dyn std::io::Write + Send>) {
    let mut batch = Vec::new();
    let mut acks = Vec::new();
    loop {
        std::thread::park_timeout(FLUSH_INTERVAL);
        let closed = {
            let mut p = lock(pending);
            std::mem::swap(&mut p.lines, &mut batch);
            std::mem::swap(&mut p.flushes, &mut acks);
            p.closed
        };
        write_batch(&mut file, &mut batch);
        // A burst's buffer is not kept for the quiet that follows.
        if batch.capacity() > 2 * BATCH {
            batch.shrink_to(BATCH);
        }
        for ack in acks.drain(..) {
            let _ = ack.try_send(());
        }
        if closed {
            return;
        }
    }
}

/// Writes out and empties `batch`.
fn write_batch(file: &mut Box<dyn std::io::Write + Send>, batch: &mut Vec<u8>) {
    if batch.is_empty() {
        return;
    }
    if let Err(error) = file.write_all(batch).and_then(|()| file.flush()) {
        tracing::warn!(%error, bytes = batch.len(), "cannot write the access log");
    }
    batch.clear();
}

/// What one line says, in Istio's terms (the command operators of its default format).
pub(crate) struct Entry<'a> {
    /// `%START_TIME%`, since the Unix epoch.
    pub start: Duration,
    /// `%REQ(:METHOD)%`.
    pub method: Option<&'a str>,
    /// `%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%`, as the request sent it.
    pub path: Option<&'a [u8]>,
    /// `%PROTOCOL%`.
    pub protocol: Option<&'a str>,
    /// `%RESPONSE_CODE%` (0 for TCP and for no response).
    pub response_code: u16,
    /// `%RESPONSE_FLAGS%`.
    pub response_flags: &'a str,
    /// `%RESPONSE_CODE_DETAILS%`.
    pub details: Option<&'a str>,
    /// `%BYTES_RECEIVED%`.
    pub bytes_received: u64,
    /// `%BYTES_SENT%`.
    pub bytes_sent: u64,
    /// `%DURATION%`.
    pub duration: Duration,
    /// `%REQ(X-FORWARDED-FOR)%`, as the request sent it.
    pub forwarded_for: Option<&'a [u8]>,
    /// `%REQ(USER-AGENT)%`, as the request sent it.
    pub user_agent: Option<&'a [u8]>,
    /// `%REQ(X-REQUEST-ID)%`, as the request sent it.
    pub request_id: Option<&'a [u8]>,
    /// `%REQ(:AUTHORITY)%`, as the request sent it.
    pub authority: Option<&'a [u8]>,
    /// `%UPSTREAM_HOST%`.
    pub upstream_host: Option<SocketAddr>,
    /// `%UPSTREAM_CLUSTER_RAW%`.
    pub upstream_cluster: Option<&'a str>,
    /// `%DOWNSTREAM_LOCAL_ADDRESS%`.
    pub downstream_local: Option<SocketAddr>,
    /// `%DOWNSTREAM_REMOTE_ADDRESS%`.
    pub downstream_remote: SocketAddr,
    /// `%REQUESTED_SERVER_NAME%`.
    pub server_name: Option<&'a str>,
    /// `%ROUTE_NAME%`.
    pub route_name: Option<&'a str>,
}

/// The wall-clock time of `at` since the Unix epoch, from a pair of monotonic and
/// wall-clock readings taken at most a second earlier on this thread: a logged request
/// reads the monotonic clock anyway, and a second clock read per line is a measurable part
/// of logging it. A step of the wall clock shows within a second. Kept as a `Duration`: a
/// `SystemTime`'s arithmetic normalizes a `timespec` at every step.
fn wall_clock(at: Instant) -> Duration {
    thread_local! {
        static ANCHOR: std::cell::Cell<Option<(Instant, Duration)>> =
            const { std::cell::Cell::new(None) };
    }
    ANCHOR.with(|anchor| {
        if let Some((mono, wall)) = anchor.get()
            && let Some(since) = at.checked_duration_since(mono)
            && since < Duration::from_secs(1)
        {
            return wall + since;
        }
        let wall = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        anchor.set(Some((at, wall)));
        wall
    })
}

/// Appends the time as Envoy's `%START_TIME%` prints it: RFC 3339 in UTC, milliseconds.
/// The date and time up to the second are formatted once a second (per thread) and reused,
/// as Envoy caches its own: the calendar arithmetic would otherwise run for every line.
fn push_start_time(out: &mut Vec<u8>, since: Duration) {
    thread_local! {
        static SECOND: std::cell::RefCell<(u64, String)> =
            const { std::cell::RefCell::new((0, String::new())) };
    }
    let (secs, millis) = (since.as_secs(), since.subsec_millis());
    SECOND.with_borrow_mut(|(second, text)| {
        if *second != secs || text.is_empty() {
            text.clear();
            let whole = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
            let _ = write!(text, "{}", humantime::format_rfc3339_seconds(whole));
            // Without its `Z`: the milliseconds go before it.
            text.pop();
            *second = secs;
        }
        out.extend_from_slice(text.as_bytes());
    });
    let digit = |d: u32| b'0' + (d % 10) as u8;
    out.extend_from_slice(&[
        b'.',
        digit(millis / 100),
        digit(millis / 10),
        digit(millis),
        b'Z',
    ]);
}

/// The `%START_TIME%` text of `at`, since the Unix epoch.
fn start_time(at: Duration) -> String {
    let mut out = Vec::new();
    push_start_time(&mut out, at);
    String::from_utf8_lossy(&out).into_owned()
}

/// Appends a socket address as Display writes it, an IPv4 one with integer formatting
/// (three addresses a line).
fn push_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    let SocketAddr::V4(v4) = addr else {
        let _ = write!(out, "{addr}");
        return;
    };
    for octet in v4.ip().octets() {
        push_octet(out, octet);
    }
    // The last octet's dot is the port's colon.
    if let Some(last) = out.last_mut() {
        *last = b':';
    }
    push_digits(out, u64::from(v4.port()));
}

/// Each octet's decimal text and a dot, four bytes: one fixed-size copy, cut to its length.
const OCTETS: [[u8; 4]; 256] = {
    let mut table = [[0; 4]; 256];
    let mut n = 0;
    while n < 256 {
        let digits = [
            b'0' + (n / 100) as u8,
            b'0' + (n / 10 % 10) as u8,
            b'0' + (n % 10) as u8,
        ];
        table[n] = match n {
            0..10 => [digits[2], b'.', 0, 0],
            10..100 => [digits[1], digits[2], b'.', 0],
            _ => [digits[0], digits[1], digits[2], b'.'],
        };
        n += 1;
    }
    table
};

/// Appends `octet` in decimal and a dot, as an IPv4 address is written: a fixed four-byte
/// copy then cut back, where a copy of its own length would be a `memcpy` call.
fn push_octet(out: &mut Vec<u8>, octet: u8) {
    let len = 2 + usize::from(octet >= 10) + usize::from(octet >= 100);
    out.extend_from_slice(&OCTETS[usize::from(octet)]);
    out.truncate(out.len() - (4 - len));
}

/// Appends `n` in decimal. `itoa` writes two digits a step into a stack buffer, copied in
/// once: pushing digits one at a time cost about 40 instructions a digit, some 1,200 a line.
fn push_digits(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Appends bytes of the request as text: as they are when ASCII (checked a word at a
/// time), else as the lossy UTF-8 conversion shows them.
fn push_request_text(out: &mut Vec<u8>, text: &[u8]) {
    if text.is_ascii() {
        out.extend_from_slice(text);
    } else {
        out.extend_from_slice(String::from_utf8_lossy(text).as_bytes());
    }
}

impl Entry<'_> {
    /// Istio's `EnvoyTextLogFormat`, appended to `out`: unset values are `-`. Written piece
    /// by piece rather than through `format_args!`, which costs several times as much for
    /// twenty fields and is paid for every request.
    fn text(&self, out: &mut Vec<u8>) {
        fn or(v: Option<&str>) -> &[u8] {
            v.unwrap_or("-").as_bytes()
        }
        let request = |out: &mut Vec<u8>, v: Option<&[u8]>| match v {
            Some(text) => push_request_text(out, text),
            None => out.push(b'-'),
        };
        let addr = |out: &mut Vec<u8>, v: Option<SocketAddr>| match v {
            Some(a) => push_addr(out, a),
            None => out.push(b'-'),
        };
        // The separators are written as literals, one call each: a constant length is
        // copied inline, where a list of pieces made every separator a `memcpy` call. The
        // pending buffer keeps its capacity from batch to batch, so it rarely grows here.
        out.push(b'[');
        push_start_time(out, self.start);
        out.extend_from_slice(b"] \"");
        out.extend_from_slice(or(self.method));
        out.push(b' ');
        request(out, self.path);
        out.push(b' ');
        out.extend_from_slice(or(self.protocol));
        out.extend_from_slice(b"\" ");
        push_digits(out, u64::from(self.response_code));
        out.push(b' ');
        out.extend_from_slice(self.response_flags.as_bytes());
        out.push(b' ');
        out.extend_from_slice(or(self.details));
        out.extend_from_slice(b" - \"-\" ");
        push_digits(out, self.bytes_received);
        out.push(b' ');
        push_digits(out, self.bytes_sent);
        out.push(b' ');
        push_digits(
            out,
            u64::try_from(self.duration.as_millis()).unwrap_or(u64::MAX),
        );
        out.extend_from_slice(b" - \"");
        request(out, self.forwarded_for);
        out.extend_from_slice(b"\" \"");
        request(out, self.user_agent);
        out.extend_from_slice(b"\" \"");
        request(out, self.request_id);
        out.extend_from_slice(b"\" \"");
        request(out, self.authority);
        out.extend_from_slice(b"\" \"");
        addr(out, self.upstream_host);
        out.extend_from_slice(b"\" ");
        out.extend_from_slice(or(self.upstream_cluster));
        out.extend_from_slice(b" - ");
        addr(out, self.downstream_local);
        out.push(b' ');
        push_addr(out, self.downstream_remote);
        out.push(b' ');
        out.extend_from_slice(or(self.server_name));
        out.push(b' ');
        out.extend_from_slice(or(self.route_name));
        out.push(b'\n');
    }

    /// Istio's `EnvoyJSONLogFormatIstio` keys, sorted; numbers as numbers, unset values
    /// `null`, as Envoy's JSON formatter writes them; appended to `out`.
    fn json(&self, out: &mut Vec<u8>) {
        let text = |v: Option<&str>| v.map_or(serde_json::Value::Null, Into::into);
        let request = |v: Option<&[u8]>| {
            v.map_or(serde_json::Value::Null, |b| {
                String::from_utf8_lossy(b).into_owned().into()
            })
        };
        let addr =
            |v: Option<SocketAddr>| v.map_or(serde_json::Value::Null, |a| a.to_string().into());
        let object = serde_json::json!({
            "authority": request(self.authority),
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "connection_termination_details": null,
            "downstream_local_address": addr(self.downstream_local),
            "downstream_remote_address": self.downstream_remote.to_string(),
            "duration": self.duration.as_millis() as u64,
            "method": text(self.method),
            "path": request(self.path),
            "protocol": text(self.protocol),
            "request_id": request(self.request_id),
            "requested_server_name": text(self.server_name),
            "response_code": self.response_code,
            "response_code_details": text(self.details),
            "response_flags": self.response_flags,
            "route_name": text(self.route_name),
            "start_time": start_time(self.start),
            "upstream_cluster": text(self.upstream_cluster),
            "upstream_host": addr(self.upstream_host),
            "upstream_local_address": null,
            "upstream_service_time": null,
            "upstream_transport_failure_reason": null,
            "user_agent": request(self.user_agent),
            "x_forwarded_for": request(self.forwarded_for),
        });
        let _ = writeln!(out, "{object}");
    }
}

/// What is logged for an HTTP request.
pub struct HttpLog<'a> {
    /// Request method.
    pub method: &'a str,
    /// Path and query.
    pub path: &'a [u8],
    /// `HTTP/1.1` etc.
    pub protocol: &'a str,
    /// Host/authority as requested.
    pub authority: &'a [u8],
    /// The request's `user-agent`, `x-request-id` and `x-forwarded-for`.
    pub headers: &'a LoggedHeaders,
    /// Response status.
    pub status: u16,
    /// Envoy response flags.
    pub flags: &'static str,
    /// Envoy's response code details (`via_upstream`, `direct_response`), when known.
    pub details: Option<&'static str>,
    /// Upstream cluster name.
    pub cluster: &'a str,
    /// Upstream host, if one was chosen.
    pub upstream: Option<SocketAddr>,
    /// Route name (`block_all` for a blocked request, `allow_any` for passthrough).
    pub route: &'a str,
    /// The original destination, when intercepted.
    pub original_dst: Option<SocketAddr>,
    /// Client address.
    pub downstream: SocketAddr,
    /// Request body bytes received from the client.
    pub received: u64,
    /// Response body bytes sent to the client.
    pub sent: u64,
    /// From the request to the end of the stream.
    pub duration: Duration,
    /// When the stream ended.
    pub ended: Instant,
}

/// The request headers Istio's default format logs, captured only when logs are on.
#[derive(Debug, Default, Clone)]
pub struct LoggedHeaders {
    /// `user-agent`.
    pub user_agent: Option<LogText>,
    /// `x-request-id`.
    pub request_id: Option<LogText>,
    /// `x-forwarded-for`.
    pub forwarded_for: Option<LogText>,
}

/// A piece of the request a line shows: the request's own bytes, shared with it rather than
/// copied (the line then costs the request no allocation), or the request id the proxy
/// generated. Shown as UTF-8 with invalid bytes replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogText {
    /// Bytes of the request, or of a value joined from its repeated headers.
    Shared(Bytes),
    /// A generated `x-request-id`.
    Id([u8; REQUEST_ID_LEN]),
}

impl LogText {
    /// The bytes the line shows (as text where they are not UTF-8).
    pub fn bytes(&self) -> &[u8] {
        match self {
            LogText::Shared(b) => b,
            LogText::Id(id) => id,
        }
    }
}

impl From<String> for LogText {
    fn from(s: String) -> Self {
        LogText::Shared(Bytes::from(s))
    }
}

impl From<&'static str> for LogText {
    fn from(s: &'static str) -> Self {
        LogText::Shared(Bytes::from_static(s.as_bytes()))
    }
}

impl<'a> HttpLog<'a> {
    /// Writes the line to `log`.
    pub fn emit(&self, log: &AccessLog) {
        fn dash(s: &str) -> Option<&str> {
            (s != "-").then_some(s)
        }
        let h = self.headers;
        let bytes = |v: &'a Option<LogText>| v.as_ref().map(LogText::bytes);
        log.write(&Entry {
            start: wall_clock(self.ended).saturating_sub(self.duration),
            method: Some(self.method),
            path: Some(self.path),
            protocol: Some(self.protocol),
            response_code: self.status,
            response_flags: self.flags,
            details: self.details,
            bytes_received: self.received,
            bytes_sent: self.sent,
            duration: self.duration,
            forwarded_for: bytes(&h.forwarded_for),
            user_agent: bytes(&h.user_agent),
            request_id: bytes(&h.request_id),
            authority: (self.authority != b"-").then_some(self.authority),
            upstream_host: self.upstream,
            upstream_cluster: dash(self.cluster),
            downstream_local: self.original_dst,
            downstream_remote: self.downstream,
            server_name: None,
            route_name: dash(self.route),
        });
    }
}

/// What is logged for an opaque TCP connection.
pub struct TcpLog<'a> {
    /// Envoy response flags.
    pub flags: &'static str,
    /// Upstream cluster name.
    pub cluster: &'a str,
    /// Upstream host, if connected.
    pub upstream: Option<SocketAddr>,
    /// The original destination.
    pub original_dst: SocketAddr,
    /// The TLS SNI, when the connection was routed by it.
    pub sni: Option<&'a str>,
    /// Client address.
    pub downstream: SocketAddr,
    /// Bytes client to upstream.
    pub sent: u64,
    /// Bytes upstream to client.
    pub received: u64,
    /// Connection lifetime.
    pub duration: Duration,
}

impl TcpLog<'_> {
    /// Writes the line to `log`: Envoy's `tcp_proxy` logs bytes from the client as
    /// received and bytes to it as sent.
    pub fn emit(&self, log: &AccessLog) {
        log.write(&Entry {
            start: wall_clock(Instant::now()).saturating_sub(self.duration),
            method: None,
            path: None,
            protocol: None,
            response_code: 0,
            response_flags: self.flags,
            details: None,
            bytes_received: self.sent,
            bytes_sent: self.received,
            duration: self.duration,
            forwarded_for: None,
            user_agent: None,
            request_id: None,
            authority: None,
            upstream_host: self.upstream,
            upstream_cluster: (self.cluster != "-").then_some(self.cluster),
            downstream_local: Some(self.original_dst),
            downstream_remote: self.downstream,
            server_name: self.sni,
            route_name: None,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_addresses_are_written_as_display_writes_them() {
        for n in [0, 7, 10, 99, 100, 255, 65_535, 1_000_000, u64::MAX] {
            let mut out = Vec::new();
            push_digits(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
        for octet in 0..=u8::MAX {
            let mut out = b"x".to_vec();
            push_octet(&mut out, octet);
            assert_eq!(out, format!("x{octet}.").as_bytes());
        }
        // Request bytes that are not UTF-8 show as the lossy conversion does.
        for text in [&b"curl/8"[..], b"caf\xc3\xa9", b"bad \xff byte", b""] {
            let mut out = Vec::new();
            push_request_text(&mut out, text);
            assert_eq!(out, String::from_utf8_lossy(text).as_bytes());
        }
        for addr in [
            "0.0.0.0:0",
            "10.0.100.255:80",
            "255.9.10.1:65535",
            "[::1]:443",
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            let mut out = Vec::new();
            push_addr(&mut out, addr);
            assert_eq!(out, addr.to_string().as_bytes());
        }
    }

    fn entry() -> Entry<'static> {
        Entry {
            start: Duration::from_millis(1_700_000_000_123),
            method: Some("GET"),
            path: Some(b"/x?y=1"),
            protocol: Some("HTTP/1.1"),
            response_code: 200,
            response_flags: "-",
            details: Some("via_upstream"),
            bytes_received: 3,
            bytes_sent: 612,
            duration: Duration::from_millis(7),
            forwarded_for: None,
            user_agent: Some(b"curl/8.5.0"),
            request_id: Some(b"r-1"),
            authority: Some(b"app.internal.com"),
            upstream_host: Some("10.0.0.2:80".parse().expect("an address")),
            upstream_cluster: Some("outbound|80||app.internal.com"),
            downstream_local: Some("10.96.0.10:80".parse().expect("an address")),
            downstream_remote: "10.0.0.1:40000".parse().expect("an address"),
            server_name: None,
            route_name: Some("default"),
        }
    }

    #[test]
    fn times_and_addresses_print_as_envoy_prints_them() {
        let at = |ms: u64| start_time(Duration::from_millis(ms));
        // The same second twice (the cached text), the next one, then an earlier one.
        for (ms, text) in [
            (1_700_000_000_123, "2023-11-14T22:13:20.123Z"),
            (1_700_000_000_007, "2023-11-14T22:13:20.007Z"),
            (1_700_000_001_000, "2023-11-14T22:13:21.000Z"),
            (86_400_999, "1970-01-02T00:00:00.999Z"),
        ] {
            assert_eq!(at(ms), text);
        }
        for addr in ["10.0.0.1:40000", "255.255.255.255:0", "[2001:db8::1]:443"] {
            let addr: SocketAddr = addr.parse().expect("an address");
            let mut text = Vec::new();
            push_addr(&mut text, addr);
            assert_eq!(text, addr.to_string().as_bytes());
        }
    }

    /// The line `format` writes for `entry`.
    fn line<'a>(entry: &Entry<'a>, format: fn(&Entry<'a>, &mut Vec<u8>)) -> String {
        let mut out = Vec::new();
        format(entry, &mut out);
        String::from_utf8(out).expect("UTF-8")
    }

    #[test]
    fn text_follows_istios_default_format_field_by_field() {
        assert_eq!(
            line(&entry(), Entry::text),
            "[2023-11-14T22:13:20.123Z] \"GET /x?y=1 HTTP/1.1\" 200 - via_upstream - \"-\" 3 612 7 - \"-\" \"curl/8.5.0\" \"r-1\" \"app.internal.com\" \"10.0.0.2:80\" outbound|80||app.internal.com - 10.96.0.10:80 10.0.0.1:40000 - default\n"
        );
    }

    #[test]
    fn text_of_a_tcp_connection_dashes_what_it_has_not() {
        let tcp = Entry {
            method: None,
            path: None,
            protocol: None,
            response_code: 0,
            details: None,
            user_agent: None,
            request_id: None,
            authority: None,
            upstream_host: Some("[2001:db8::2]:9000".parse().expect("an address")),
            upstream_cluster: Some("outbound|9000||db.internal.com"),
            downstream_local: None,
            server_name: Some("db.internal.com"),
            route_name: None,
            ..entry()
        };
        assert_eq!(
            line(&tcp, Entry::text),
            "[2023-11-14T22:13:20.123Z] \"- - -\" 0 - - - \"-\" 3 612 7 - \"-\" \"-\" \"-\" \"-\" \"[2001:db8::2]:9000\" outbound|9000||db.internal.com - - 10.0.0.1:40000 db.internal.com -\n"
        );
    }

    #[test]
    fn json_has_istios_keys_numbers_and_nulls() {
        let json = line(&entry(), Entry::json);
        assert!(json.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&json).expect("JSON");
        let keys: Vec<&str> = v
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys.len(), 24, "{keys:?}");
        assert_eq!(v["response_code"], 200);
        assert_eq!(v["bytes_sent"], 612);
        assert_eq!(v["x_forwarded_for"], serde_json::Value::Null);
        assert_eq!(v["upstream_cluster"], "outbound|80||app.internal.com");
        assert_eq!(v["start_time"], "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn json_lines_reach_the_file_whole() {
        let dir = std::env::temp_dir().join(format!("portcullis-json-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let path = dir.join("access.log");
        let log = AccessLog::open(&path, Format::Json, Counter::default()).expect("opened");
        log.write(&entry());
        log.write(&entry());
        assert!(log.flush(Duration::from_secs(10)));
        let text = std::fs::read_to_string(&path).expect("the log");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert!(lines.iter().all(|v| v["response_code"] == 200));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn lines_reach_the_file_and_a_full_buffer_drops_without_waiting() {
        let dir = std::env::temp_dir().join(format!("portcullis-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let path = dir.join("access.log");
        let dropped = Counter::default();
        let log = AccessLog::open(&path, Format::Text, dropped.clone()).expect("opened");
        // Three times what the buffer holds, faster than the writer's interval.
        let fits = PENDING / line(&entry(), Entry::text).len();
        for _ in 0..3 * fits {
            log.write(&entry());
        }
        assert!(log.flush(Duration::from_secs(10)));
        let written = std::fs::read_to_string(&path)
            .expect("the log")
            .lines()
            .count();
        assert_eq!(written as u64 + dropped.get(), 3 * fits as u64);
        assert!(written >= fits, "{written}");
        // Lines after a flush reach the file too, and so does the last line before the log
        // is dropped.
        log.write(&entry());
        assert!(log.flush(Duration::from_secs(10)));
        log.write(&entry());
        drop(log);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&path)
            .expect("the log")
            .lines()
            .count()
            < written + 2
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the last line was lost"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! The access log: one line per HTTP request (when its stream ends) or TCP connection (when
//! it closes), in Istio's default text format or with the keys of Istio's default JSON
//! format. Lines are appended to one pending buffer that a writer thread swaps out every
//! [`FLUSH_INTERVAL`] and writes in one go: a request wakes no thread, makes no system call
//! and allocates nothing for its line (it is formatted in a per-thread buffer and copied in
//! under a lock held for that copy or the writer's swap). When the buffer is full a line is
//! dropped and counted, so the data path never waits for the disk.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;

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
    /// Lines not yet taken by the writer.
    bytes: Vec<u8>,
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
    pub(crate) fn write(&self, entry: &Entry<'_>) {
        thread_local! {
            static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        let Some(writer) = &self.writer else {
            return;
        };
        LINE.with_borrow_mut(|line| {
            line.clear();
            match self.format {
                Format::Text => entry.text(line),
                Format::Json => entry.json(line),
            }
            let mut pending = writer.pending();
            let before = pending.bytes.len();
            if before + line.len() > PENDING {
                drop(pending);
                self.dropped.inc();
                return;
            }
            pending.bytes.extend_from_slice(line.as_bytes());
            let wake = before < BATCH && before + line.len() >= BATCH;
            drop(pending);
            if wake {
                writer.thread.unpark();
            }
        });
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
    let mut batch: Vec<u8> = Vec::new();
    let mut acks = Vec::new();
    loop {
        std::thread::park_timeout(FLUSH_INTERVAL);
        let closed = {
            let mut p = lock(pending);
            std::mem::swap(&mut p.bytes, &mut batch);
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
    /// `%START_TIME%`.
    pub start: SystemTime,
    /// `%REQ(:METHOD)%`.
    pub method: Option<&'a str>,
    /// `%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%`.
    pub path: Option<&'a str>,
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
    /// `%REQ(X-FORWARDED-FOR)%`.
    pub forwarded_for: Option<&'a str>,
    /// `%REQ(USER-AGENT)%`.
    pub user_agent: Option<&'a str>,
    /// `%REQ(X-REQUEST-ID)%`.
    pub request_id: Option<&'a str>,
    /// `%REQ(:AUTHORITY)%`.
    pub authority: Option<&'a str>,
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

/// The time as Envoy's `%START_TIME%` prints it: RFC 3339 in UTC, milliseconds. The date
/// and time up to the second are formatted once a second (per thread) and reused, as
/// Envoy caches its own: the calendar arithmetic would otherwise run for every line.
struct StartTime(SystemTime);

impl std::fmt::Display for StartTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        thread_local! {
            static SECOND: std::cell::RefCell<(u64, String)> =
                const { std::cell::RefCell::new((0, String::new())) };
        }
        let since = self
            .0
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
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
            write!(f, "{text}.{millis:03}Z")
        })
    }
}

/// A socket address as Display writes it, an IPv4 one with integer formatting that skips
/// the formatter's padding logic (three addresses a line).
struct Addr(SocketAddr);

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let SocketAddr::V4(v4) = self.0 else {
            return self.0.fmt(f);
        };
        let [a, b, c, d] = v4.ip().octets();
        let mut n = itoa::Buffer::new();
        for (octet, sep) in [(a, "."), (b, "."), (c, "."), (d, ":")] {
            f.write_str(n.format(octet))?;
            f.write_str(sep)?;
        }
        f.write_str(n.format(v4.port()))
    }
}

impl Entry<'_> {
    /// Istio's `EnvoyTextLogFormat`, appended to `out`: unset values are `-`.
    fn text(&self, out: &mut String) {
        /// `-` for an unset value, as Envoy prints one.
        struct Or<T>(Option<T>);
        impl<T: std::fmt::Display> std::fmt::Display for Or<T> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                match &self.0 {
                    Some(v) => v.fmt(f),
                    None => f.write_str("-"),
                }
            }
        }
        let _ = writeln!(
            out,
            "[{}] \"{} {} {}\" {} {} {} - \"-\" {} {} {} - \"{}\" \"{}\" \"{}\" \"{}\" \"{}\" {} - {} {} {} {}",
            StartTime(self.start),
            self.method.unwrap_or("-"),
            self.path.unwrap_or("-"),
            self.protocol.unwrap_or("-"),
            self.response_code,
            self.response_flags,
            self.details.unwrap_or("-"),
            self.bytes_received,
            self.bytes_sent,
            self.duration.as_millis(),
            self.forwarded_for.unwrap_or("-"),
            self.user_agent.unwrap_or("-"),
            self.request_id.unwrap_or("-"),
            self.authority.unwrap_or("-"),
            Or(self.upstream_host.map(Addr)),
            self.upstream_cluster.unwrap_or("-"),
            Or(self.downstream_local.map(Addr)),
            Addr(self.downstream_remote),
            self.server_name.unwrap_or("-"),
            self.route_name.unwrap_or("-"),
        );
    }

    /// Istio's `EnvoyJSONLogFormatIstio` keys, sorted; numbers as numbers, unset values
    /// `null`, as Envoy's JSON formatter writes them; appended to `out`.
    fn json(&self, out: &mut String) {
        let text = |v: Option<&str>| v.map_or(serde_json::Value::Null, Into::into);
        let addr =
            |v: Option<SocketAddr>| v.map_or(serde_json::Value::Null, |a| a.to_string().into());
        let object = serde_json::json!({
            "authority": text(self.authority),
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "connection_termination_details": null,
            "downstream_local_address": addr(self.downstream_local),
            "downstream_remote_address": self.downstream_remote.to_string(),
            "duration": self.duration.as_millis() as u64,
            "method": text(self.method),
            "path": text(self.path),
            "protocol": text(self.protocol),
            "request_id": text(self.request_id),
            "requested_server_name": text(self.server_name),
            "response_code": self.response_code,
            "response_code_details": text(self.details),
            "response_flags": self.response_flags,
            "route_name": text(self.route_name),
            "start_time": StartTime(self.start).to_string(),
            "upstream_cluster": text(self.upstream_cluster),
            "upstream_host": addr(self.upstream_host),
            "upstream_local_address": null,
            "upstream_service_time": null,
            "upstream_transport_failure_reason": null,
            "user_agent": text(self.user_agent),
            "x_forwarded_for": text(self.forwarded_for),
        });
        let _ = writeln!(out, "{object}");
    }
}

/// What is logged for an HTTP request.
pub struct HttpLog<'a> {
    /// Request method.
    pub method: &'a str,
    /// Path and query.
    pub path: &'a str,
    /// `HTTP/1.1` etc.
    pub protocol: &'a str,
    /// Host/authority as requested.
    pub authority: &'a str,
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
}

/// The request headers Istio's default format logs, captured only when logs are on.
#[derive(Debug, Default, Clone)]
pub struct LoggedHeaders {
    /// `user-agent`.
    pub user_agent: Option<String>,
    /// `x-request-id`.
    pub request_id: Option<String>,
    /// `x-forwarded-for`.
    pub forwarded_for: Option<String>,
}

impl HttpLog<'_> {
    /// Writes the line to `log`.
    pub fn emit(&self, log: &AccessLog) {
        fn dash(s: &str) -> Option<&str> {
            (s != "-").then_some(s)
        }
        log.write(&Entry {
            start: SystemTime::now() - self.duration,
            method: Some(self.method),
            path: Some(self.path),
            protocol: Some(self.protocol),
            response_code: self.status,
            response_flags: self.flags,
            details: self.details,
            bytes_received: self.received,
            bytes_sent: self.sent,
            duration: self.duration,
            forwarded_for: self.headers.forwarded_for.as_deref(),
            user_agent: self.headers.user_agent.as_deref(),
            request_id: self.headers.request_id.as_deref(),
            authority: dash(self.authority),
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
            start: SystemTime::now() - self.duration,
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

    fn entry() -> Entry<'static> {
        Entry {
            start: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            method: Some("GET"),
            path: Some("/x?y=1"),
            protocol: Some("HTTP/1.1"),
            response_code: 200,
            response_flags: "-",
            details: Some("via_upstream"),
            bytes_received: 3,
            bytes_sent: 612,
            duration: Duration::from_millis(7),
            forwarded_for: None,
            user_agent: Some("curl/8.5.0"),
            request_id: Some("r-1"),
            authority: Some("app.internal.com"),
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
        let at = |ms: u64| StartTime(SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
        // The same second twice (the cached text), the next one, then an earlier one.
        for (ms, text) in [
            (1_700_000_000_123, "2023-11-14T22:13:20.123Z"),
            (1_700_000_000_007, "2023-11-14T22:13:20.007Z"),
            (1_700_000_001_000, "2023-11-14T22:13:21.000Z"),
            (86_400_999, "1970-01-02T00:00:00.999Z"),
        ] {
            assert_eq!(at(ms).to_string(), text);
        }
        for addr in ["10.0.0.1:40000", "255.255.255.255:0", "[2001:db8::1]:443"] {
            let addr: SocketAddr = addr.parse().expect("an address");
            assert_eq!(Addr(addr).to_string(), addr.to_string());
        }
    }

    /// The line `format` writes for `entry`.
    fn line<'a>(entry: &Entry<'a>, format: fn(&Entry<'a>, &mut String)) -> String {
        let mut out = String::new();
        format(entry, &mut out);
        out
    }

    #[test]
    fn text_follows_istios_default_format_field_by_field() {
        assert_eq!(
            line(&entry(), Entry::text),
            "[2023-11-14T22:13:20.123Z] \"GET /x?y=1 HTTP/1.1\" 200 - via_upstream - \"-\" 3 612 7 - \"-\" \"curl/8.5.0\" \"r-1\" \"app.internal.com\" \"10.0.0.2:80\" outbound|80||app.internal.com - 10.96.0.10:80 10.0.0.1:40000 - default\n"
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

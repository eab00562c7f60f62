//! TLS origination: the upstream connection to an endpoint whose cluster says
//! `envoy.transport_sockets.tls`, with the rustls configuration the snapshot compiled.
//!
//! Envoy counts the handshake as part of connecting: `connect_timeout` covers both, and a
//! failed handshake is a connect failure (`UF`, retried under `connect-failure`) whose
//! transport failure reason goes into the 503 body as Envoy words it.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use portcullis_registry::{
    EndpointTransport, IstioPeer, TlsOrigin, WorkloadIdentity, failure_reason,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::Proxy;
use crate::error::ProxyError;
use crate::upstream::Target;

/// An upstream connection: a plain socket or TLS over one.
#[derive(Debug)]
pub enum UpstreamIo {
    /// Plaintext (`raw_buffer`).
    Plain(TcpStream),
    /// TLS originated by the proxy.
    Tls(Box<TlsStream<TcpStream>>),
}

/// What pooled upstream connections are told apart by: the endpoint, and for TLS the
/// settings and the SNI the connection was made with. A connection made for one SNI or one
/// trust configuration is never handed to a request that needs another.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The endpoint.
    pub addr: SocketAddr,
    /// For TLS: the context's fingerprint and the SNI sent.
    tls: Option<(u64, Option<Arc<str>>)>,
}

impl PoolKey {
    /// The key of a plaintext connection to `addr`.
    pub fn plain(addr: SocketAddr) -> PoolKey {
        PoolKey { addr, tls: None }
    }
}

/// How one upstream attempt connects: where, and with which TLS if any.
#[derive(Debug, Clone)]
pub struct Transport {
    /// The pool's key for connections made this way.
    pub key: PoolKey,
    tls: Option<(Arc<TlsOrigin>, ServerName<'static>)>,
}

impl Transport {
    /// The transport to `addr` for a request to `host` (the SNI under `auto_sni`).
    pub fn new(addr: SocketAddr, tls: Option<&Arc<TlsOrigin>>, host: Option<&str>) -> Transport {
        let Some(tls) = tls else {
            return Transport {
                key: PoolKey::plain(addr),
                tls: None,
            };
        };
        let sni = tls.server_name(host);
        // Without an SNI rustls is given the address, which it never sends as SNI.
        let name = sni
            .as_deref()
            .and_then(|s| ServerName::try_from(s.to_owned()).ok())
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
        Transport {
            key: PoolKey {
                addr,
                tls: Some((tls.fingerprint, sni)),
            },
            tls: Some((Arc::clone(tls), name)),
        }
    }
}

impl Proxy {
    /// The TLS to originate over `transport`, if any; `Err` why no connection may be made.
    pub(crate) fn origination(
        &self,
        transport: &EndpointTransport,
    ) -> Result<Option<Arc<TlsOrigin>>, Arc<str>> {
        match transport {
            EndpointTransport::Plaintext => Ok(None),
            EndpointTransport::Tls(origin) => Ok(Some(Arc::clone(origin))),
            EndpointTransport::Refused(why) => Err(Arc::clone(why)),
            EndpointTransport::IstioMutual(peer) => {
                let Some(identity) = self.identity.load_full() else {
                    return Err("the endpoint needs Istio mutual TLS and the proxy has no workload certificates (--istio-certs)".into());
                };
                peer.origin(&identity)
                    .map(Some)
                    .map_err(|e| format!("Istio mutual TLS cannot be set up: {e}").into())
            }
        }
    }

    /// Uses `identity` for Istio mutual TLS from now on; connections already open keep
    /// theirs.
    pub fn set_workload_identity(&self, identity: Arc<WorkloadIdentity>) {
        self.identity.store(Some(identity));
    }

    /// Reads the workload's identity from istio-agent's files in `dir` now and every
    /// `every` (istio-agent rotates them before they expire). A set of files that does not
    /// make a usable identity (one written halfway) is skipped until the next reading; the
    /// identity before it stays in use.
    pub async fn watch_workload_identity(self: Arc<Self>, dir: PathBuf, every: Duration) {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let read = match WorkloadIdentity::read(&dir) {
                Ok(read) => read,
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), %error, "cannot read the workload certificates");
                    continue;
                }
            };
            if self.identity.load().as_deref() == Some(&read) {
                continue;
            }
            let read = Arc::new(read);
            let probe = IstioPeer::new(Arc::default());
            match probe.origin(&read) {
                Ok(_) => {
                    tracing::info!(dir = %dir.display(), "workload certificates loaded");
                    self.set_workload_identity(read);
                }
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), %error, "workload certificates unusable; the previous ones stay in use");
                }
            }
        }
    }

    /// Connects for `target`, the TLS handshake included, within the cluster's connect
    /// timeout; counts failures as `connect` does.
    pub(crate) async fn connect_upstream(
        &self,
        target: &Target<'_>,
    ) -> Result<UpstreamIo, ProxyError> {
        let start = Instant::now();
        let stream = self
            .connect(target.addr, target.cluster, target.connect_timeout)
            .await?;
        if let Some(keepalive) = target.connection_limits().tcp_keepalive {
            keep_alive(&stream, keepalive);
        }
        let Some((tls, name)) = &target.transport.tls else {
            return Ok(UpstreamIo::Plain(stream));
        };
        let left = target.connect_timeout.saturating_sub(start.elapsed());
        let handshake = TlsConnector::from(Arc::clone(&tls.config)).connect(name.clone(), stream);
        let error = match tokio::time::timeout(left, handshake).await {
            Ok(Ok(stream)) => return Ok(UpstreamIo::Tls(Box::new(stream))),
            Ok(Err(e)) => ProxyError::TlsHandshake(handshake_failure(&e).into()),
            Err(_) => ProxyError::ConnectTimeout,
        };
        tracing::debug!(cluster = target.cluster, upstream = %target.addr, error = %error, "upstream TLS handshake failed");
        self.count_connect_failure(target.cluster, &error);
        Err(error)
    }
}

/// Turns TCP keepalive on for `stream` with the cluster's settings (the system's for
/// those unset), as Envoy's `upstream_connection_options.tcp_keepalive`.
fn keep_alive(stream: &TcpStream, k: portcullis_envoy::TcpKeepalive) {
    let mut keepalive = socket2::TcpKeepalive::new();
    if let Some(time) = k.time {
        keepalive = keepalive.with_time(time);
    }
    if let Some(interval) = k.interval {
        keepalive = keepalive.with_interval(interval);
    }
    if let Some(probes) = k.probes {
        keepalive = keepalive.with_retries(probes);
    }
    if let Err(error) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(%error, "cannot set TCP keepalive on an upstream connection");
    }
}

/// Envoy's transport failure reason for a handshake that failed with `e`.
fn handshake_failure(e: &io::Error) -> String {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => failure_reason(tls),
        // The upstream closed or reset during the handshake.
        None => format!(
            "TLS_error:|33554536:system library:OPENSSL_internal:{}:TLS_error_end",
            match e.kind() {
                io::ErrorKind::UnexpectedEof => "Connection closed by peer",
                io::ErrorKind::ConnectionReset => "Connection reset by peer",
                _ => "I/O error",
            }
        ),
    }
}

impl UpstreamIo {
    /// Whether an idle HTTP/1.1 connection can still carry a request. The runtime has
    /// already seen any FIN or reset as read readiness, so the common case costs no system
    /// call; an idle connection with something to read is closing or out of step, and
    /// unusable. TLS records that carry no data (a TLS 1.3 session ticket) are consumed.
    pub fn still_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self {
            UpstreamIo::Plain(stream) => match stream.poll_read_ready(&mut cx) {
                Poll::Pending => true,
                Poll::Ready(Err(_)) => false,
                Poll::Ready(Ok(())) => {
                    let mut byte = [0u8; 1];
                    matches!(stream.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
                }
            },
            UpstreamIo::Tls(stream) => {
                if stream.get_ref().0.poll_read_ready(&mut cx).is_pending() {
                    return true;
                }
                let mut byte = [0u8; 1];
                let mut buf = ReadBuf::new(&mut byte);
                Pin::new(stream).poll_read(&mut cx, &mut buf).is_pending()
            }
        }
    }
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => crate::io::poll_send(s, cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use portcullis_envoy as envoy;

    use super::*;

    fn origin(sni: Option<&str>, auto_sni: bool) -> Arc<TlsOrigin> {
        let tls = envoy::UpstreamTls {
            sni: sni.map(str::to_owned),
            auto_sni,
            auto_san_validation: false,
            alpn_protocols: Vec::new(),
            min_version: envoy::TlsVersion::Tls12,
            max_version: envoy::TlsVersion::Tls13,
            client_certificate: None,
            validation: None,
        };
        Arc::new(portcullis_registry::compile_tls(&tls).unwrap())
    }

    /// A workload identity of a fresh CA, as istio-agent's three PEM files.
    fn identity(name: &str) -> [(&'static str, String); 3] {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut leaf = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.subject_alt_names = vec![rcgen::SanType::URI(
            format!("spiffe://cluster.local/ns/default/sa/{name}")
                .try_into()
                .unwrap(),
        )];
        let cert = leaf.signed_by(&key, &issuer).unwrap().pem();
        [
            ("cert-chain.pem", cert),
            ("key.pem", key.serialize_pem()),
            ("root-cert.pem", root),
        ]
    }

    /// A folder that is removed with it.
    struct Folder(PathBuf);

    impl Drop for Folder {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_workload_identity_is_read_again_and_a_half_written_one_skipped() {
        use portcullis_registry::Snapshot;

        let dir = Folder(std::env::temp_dir().join(format!(
            "portcullis-identity-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        )));
        std::fs::create_dir_all(&dir.0).unwrap();
        let write = |files: &[(&str, String)]| {
            for (name, pem) in files {
                std::fs::write(dir.0.join(name), pem).unwrap();
            }
        };
        let proxy =
            Proxy::for_tests_unmetered(Snapshot::index(&Default::default(), &|_| None, None, 1));
        let current = || proxy.identity.load_full().map(|i| i.cert_chain.clone());
        let first = identity("first");
        write(&first);
        let watcher = tokio::spawn(
            Arc::clone(&proxy).watch_workload_identity(dir.0.clone(), Duration::from_secs(10)),
        );
        tokio::task::yield_now().await;
        assert_eq!(current(), Some(first[0].1.clone().into_bytes()));
        // A rotation caught halfway: the new certificate with the old key is not used.
        let second = identity("second");
        write(&second[..1]);
        tokio::time::advance(Duration::from_secs(10)).await;
        tokio::task::yield_now().await;
        assert_eq!(current(), Some(first[0].1.clone().into_bytes()));
        write(&second);
        tokio::time::advance(Duration::from_secs(10)).await;
        tokio::task::yield_now().await;
        assert_eq!(current(), Some(second[0].1.clone().into_bytes()));
        watcher.abort();
    }

    #[test]
    fn pooled_connections_are_told_apart_by_transport_and_sni() {
        let addr: SocketAddr = "192.0.2.1:443".parse().unwrap();
        let auto = origin(None, true);
        let key = |tls: Option<&Arc<TlsOrigin>>, host| Transport::new(addr, tls, host).key;
        let plain = key(None, Some("a.example"));
        assert_eq!(plain, PoolKey::plain(addr));
        let a = key(Some(&auto), Some("a.example"));
        assert_ne!(a, plain);
        assert_eq!(a, key(Some(&auto), Some("A.example:443")));
        assert_ne!(a, key(Some(&auto), Some("b.example")));
        // The same settings compiled again (a reload) keep their connections.
        assert_eq!(a, key(Some(&origin(None, true)), Some("a.example")));
        // A fixed SNI ignores the host; other settings never share.
        let fixed = origin(Some("a.example"), false);
        assert_eq!(key(Some(&fixed), Some("x")), key(Some(&fixed), Some("y")));
        assert_ne!(key(Some(&fixed), Some("a.example")), a);
    }
}

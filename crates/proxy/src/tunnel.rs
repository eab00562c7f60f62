//! CONNECT on the explicit proxy: connect upstream, answer 200, then splice bytes.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use portcullis_registry::Decision;

use crate::Proxy;
use crate::accept::ClientStream;
use crate::attempt::{Attempt, Attempts, Failure};
use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::guard::{GuardedIo, InFlight};
use crate::http::Downstream;
use crate::io::PrefixedIo;
use crate::origin::{Transport, UpstreamIo};
use crate::upstream::{Original, RetryPolicy};

/// Opens the upstream for a CONNECT request; on success the tunnel runs in its own task.
pub(crate) async fn open(
    proxy: &Arc<Proxy>,
    downstream: &Downstream,
    decision: &Decision,
    original: Original<'_>,
    req: Request<Incoming>,
    cluster: &str,
) -> Result<(Response<ProxyBody>, SocketAddr), ProxyError> {
    // Istio's default retries: a failed connect goes to another endpoint.
    let mut attempts = Attempts::new(
        proxy,
        (decision, original),
        cluster,
        RetryPolicy::default(),
        None,
    );
    let (upstream, mut pick) = loop {
        let Attempt { pick, .. } = attempts.start().await?;
        // No request host to send as SNI: CONNECT names an address.
        let transport = Transport::new(pick.addr, pick.tls.as_ref(), None);
        let target = attempts.target(&pick, &transport);
        let connecting = proxy.connect_upstream(&target);
        match attempts
            .send(async { connecting.await.map_err(Failure::Unsent) })
            .await
        {
            Ok(stream) => break (stream, pick),
            Err(failure) => attempts.failed(failure, Some(()))?,
        }
    };
    let addr = pick.addr;
    pick.guard.connected();
    // The tunnel is a request in flight for its whole life: no request-head deadline.
    let in_flight = downstream.in_flight.as_ref().map(InFlight::start);
    tokio::spawn(async move {
        let _held = (pick.guard, in_flight);
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(error = %e, "CONNECT upgrade failed");
                return;
            }
        };
        let mut upstream = match upstream {
            UpstreamIo::Plain(upstream) => upstream,
            // TLS originated here: copied through user space to be encrypted.
            UpstreamIo::Tls(mut upstream) => {
                let mut client = TokioIo::new(upgraded);
                if let Err(e) = crate::io::copy_both(&mut client, &mut upstream).await {
                    tracing::debug!(error = %e, "CONNECT tunnel ended with an error");
                }
                return;
            }
        };
        // An HTTP/1.1 client's socket is spliced in the kernel; a tunnel inside an HTTP/2
        // stream is copied.
        match upgraded.downcast::<TokioIo<PrefixedIo<GuardedIo<ClientStream>>>>() {
            Ok(parts) => {
                // hyper read its buffer from the front of the stream, so its bytes come
                // before what the prefix still holds.
                let (rest, mut client) = parts.io.into_inner().into_parts();
                let mut early = BytesMut::from(parts.read_buf);
                early.extend_from_slice(&rest);
                let relayed = crate::splice::relay(&mut client, &early, &mut upstream).await;
                if let Err(e) = relayed.result {
                    tracing::debug!(error = %e, "CONNECT tunnel ended with an error");
                }
            }
            Err(upgraded) => {
                let mut client = TokioIo::new(upgraded);
                if let Err(e) = crate::io::copy_both(&mut client, &mut upstream).await {
                    tracing::debug!(error = %e, "CONNECT tunnel ended with an error");
                }
            }
        }
    });
    let mut response = Response::new(ProxyBody::Full(None));
    *response.status_mut() = StatusCode::OK;
    Ok((response, addr))
}

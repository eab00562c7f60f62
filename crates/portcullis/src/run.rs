//! `portcullis run`: wire the registry, config reload, listeners, admin and signals.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use portcullis_admin::{AdminState, Endpoints, SetLogLevel};
use portcullis_audit::{Audit, MODE_ANNOTATION, annotation_mode};
use portcullis_dns::{DnsCache, DnsConfig, HickoryLookup};
use portcullis_proxy::metrics::SourceLabels;
use portcullis_proxy::{
    AccessLog, AccessLogFormat, Listener, Metrics, NonePolicy, Proxy, ProxyConfig,
};
use portcullis_registry::{BuildOptions, Enforcement, Snapshot, WorkloadIdentity};
use portcullis_sources::{Folder, Publisher, RegistryCompiler, XdsSource, rebuild_on};
use portcullis_xds::ca::CaConfig;
use portcullis_xds::{Client, ClientConfig, NodeIdentity, NodeOverrides, Protocol, XdsStats};
use prometheus_client::registry::Registry;
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{AccessLogEncoding, RunArgs, XdsArgs};

/// How often the workload's Istio certificates are read again (istio-agent rotates them
/// well before they expire).
const IDENTITY_REREAD: std::time::Duration = std::time::Duration::from_secs(10);

/// How often the pod's annotations are read again (the kubelet rewrites the downward API
/// file within about a minute of a change).
const ANNOTATIONS_REREAD: std::time::Duration = std::time::Duration::from_secs(5);

/// Keeps the audit's annotation layer in step with the pod's `portcullis.io/mode`
/// annotation in `path`, until `stop`. A missing file sets nothing; an unreadable value
/// is logged and leaves the mode as it was.
async fn watch_annotations(path: PathBuf, audit: Arc<Audit>, stop: CancellationToken) {
    let mut last: Option<Result<Option<Enforcement>, String>> = None;
    loop {
        let now = match tokio::fs::read_to_string(&path).await {
            Ok(text) => annotation_mode(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        };
        if last.as_ref() != Some(&now) {
            match &now {
                Ok(mode) => {
                    audit.mode().set_annotation(*mode);
                    tracing::info!(
                        annotation = MODE_ANNOTATION,
                        mode = mode.map_or("unset", Enforcement::as_str),
                        "enforcement mode from the pod annotation"
                    );
                }
                Err(e) => tracing::warn!(error = %e, "pod annotation ignored"),
            }
            last = Some(now);
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(ANNOTATIONS_REREAD) => {}
        }
    }
}

/// Where Istio's injector mounts the pod's labels (downward API).
const POD_LABELS: &str = "/etc/istio/pod/labels";

/// The node istio-agent would present, from the env vars Istio's injector sets and `args`
/// (in `locality` when given).
fn node_identity(
    args: &XdsArgs,
    workload_labels: &BTreeMap<String, String>,
    locality: &str,
) -> anyhow::Result<NodeIdentity> {
    let labels = if workload_labels.is_empty() {
        match std::fs::read_to_string(POD_LABELS) {
            Ok(text) => Some(
                portcullis_xds::parse_downward_api(&text)
                    .map_err(|e| anyhow::anyhow!("{POD_LABELS}: {e}"))?,
            ),
            Err(_) => None,
        }
    } else {
        Some(workload_labels.clone())
    };
    let overrides = NodeOverrides {
        pod_name: args.pod_name.clone(),
        pod_namespace: args.pod_namespace.clone(),
        instance_ip: args.instance_ip.clone(),
        service_account: args.service_account.clone(),
        cluster_id: args.cluster_id.clone(),
        mesh_id: args.mesh_id.clone(),
        labels,
        locality: Some(locality.to_owned()).filter(|l| !l.is_empty()),
    };
    Ok(NodeIdentity::from_env(std::env::vars(), &overrides))
}

/// Who to ask Istio's CA to certify: the namespace, service account and cluster the node
/// presents, in `args`' trust domain.
fn ca_config(args: &XdsArgs, address: &str, node: &NodeIdentity) -> anyhow::Result<CaConfig> {
    let meta = |key: &str| {
        node.metadata
            .get(key)
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    let namespace = meta("NAMESPACE")
        .context("the CA needs the pod's namespace (POD_NAMESPACE or --pod-namespace)")?;
    let service_account = meta("SERVICE_ACCOUNT")
        .context("the CA needs the pod's service account (SERVICE_ACCOUNT or --service-account)")?;
    let mut config = CaConfig::new(address, &args.trust_domain, namespace, service_account);
    config.root_cert = args.ca_root_cert.clone();
    config.token_file = args.xds_token_file.clone();
    config.validity = args.secret_ttl.into();
    if let Some(cluster) = meta("CLUSTER_ID") {
        config.cluster_id = cluster;
    }
    Ok(config)
}

/// The ADS client `args` describe, presenting `node`.
fn xds_client(
    args: &XdsArgs,
    address: &str,
    node: NodeIdentity,
    stats: Arc<XdsStats>,
) -> anyhow::Result<Client> {
    tracing::info!(address, node = %node.id, cluster = %node.cluster, "control plane");
    let config = ClientConfig {
        root_cert: args.xds_root_cert.clone(),
        token_file: args.xds_token_file.clone(),
        protocol: if args.xds_protocol == "sotw" {
            Protocol::StateOfTheWorld
        } else {
            Protocol::Delta
        },
        ..ClientConfig::new(address, node)
    };
    Client::new(config, stats).with_context(|| format!("control plane {address}"))
}

/// Parses `k=v,k2=v2`.
fn parse_labels(labels: &str) -> anyhow::Result<BTreeMap<String, String>> {
    labels
        .split(',')
        .filter(|kv| !kv.trim().is_empty())
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("label {kv:?} is not key=value"))?;
            Ok((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// The IPv6 twin of an IPv4 wildcard listener, so that ip6tables-redirected traffic is
/// caught too; `None` when the host has no IPv6.
fn bind_v6_twin(addr: SocketAddr) -> Option<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    if addr != SocketAddr::from(([0, 0, 0, 0], addr.port())) {
        return None;
    }
    let v6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, addr.port()));
    let bound = (|| -> std::io::Result<TcpListener> {
        let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
        socket.set_only_v6(true)?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&v6.into())?;
        socket.listen(1024)?;
        TcpListener::from_std(socket.into())
    })();
    match bound {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::info!(error = %e, "no IPv6 outbound listener");
            None
        }
    }
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({what})"))
}

/// Raises the soft open-file limit to the hard one, as Go's runtime and nginx's
/// `worker_rlimit_nofile` do: each proxied connection holds two sockets, and a TCP relay two
/// pipes more while bytes move, so the soft 1024 of a login shell would cap a laptop run
/// at a few hundred connections. Returns the limit in force.
fn raise_fd_limit() -> Option<u64> {
    let limit = getrlimit(Resource::Nofile);
    if let (Some(current), Some(maximum)) = (limit.current, limit.maximum)
        && current < maximum
    {
        let raised = Rlimit {
            current: Some(maximum),
            maximum: Some(maximum),
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => return Some(maximum),
            Err(e) => {
                tracing::warn!(error = %e, current, maximum, "cannot raise the open-file limit")
            }
        }
    }
    limit.current
}

/// Runs the proxy until SIGTERM/SIGINT or `POST /quitquitquit`, then drains.
pub fn run(args: RunArgs, set_log_level: SetLogLevel) -> anyhow::Result<ExitCode> {
    let files = raise_fd_limit();
    tracing::debug!(limit = ?files, "open-file limit");
    // One worker: a current-thread runtime, no work stealing to pay for. More: tokio's
    // multi-threaded scheduler with that many workers (Envoy's --concurrency).
    let mut builder = if args.concurrency <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(args.concurrency);
        b
    };
    let runtime = builder
        .thread_name("portcullis-worker")
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(serve(args, set_log_level))
}

async fn serve(args: RunArgs, set_log_level: SetLogLevel) -> anyhow::Result<ExitCode> {
    let workload_labels = parse_labels(&args.workload_labels)?;
    let node = node_identity(&args.xds, &workload_labels, &args.locality)?;
    let options = BuildOptions {
        namespace: args.namespace.clone(),
        workload_labels: workload_labels.clone(),
        locality: portcullis_registry::locality::parse(&args.locality),
        ssrf_guard: args.ssrf_guard,
        cluster_id: node_meta(&node, "CLUSTER_ID")
            .unwrap_or(portcullis_registry::DEFAULT_CLUSTER_ID)
            .to_owned(),
        ..BuildOptions::default()
    };
    let registry = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
    let mut metrics_registry = Registry::default();
    let metrics = Metrics::new(&mut metrics_registry);
    let access_log = open_access_log(&args, metrics.access_log_dropped.clone())?;
    let metrics = Arc::new(metrics.with_source(
        source_labels(&node, &args.namespace),
        spiffe_id(&args.xds, &node).as_deref(),
    ));
    let audit = Arc::new(Audit::new(
        args.mode,
        &args.namespace,
        &mut metrics_registry,
    ));
    let shutdown = CancellationToken::new();
    let drain = CancellationToken::new();
    let admin = Arc::new(AdminState::new(
        Arc::clone(&registry),
        Arc::clone(&audit),
        metrics_registry,
        set_log_level,
        shutdown.clone(),
        drain.clone(),
    ));

    let outbound = bind(args.outbound, "outbound").await?;
    let outbound_v6 = bind_v6_twin(args.outbound);
    let http_proxy = match args.http_proxy {
        Some(addr) => Some(bind(addr, "http proxy").await?),
        None => None,
    };
    let admin_listener = bind(args.admin, "admin").await?;
    let metrics_listener = bind(args.metrics, "metrics").await?;
    let health_listener = bind(args.health, "health").await?;
    let mut own = vec![outbound.local_addr()?, admin_listener.local_addr()?];
    own.push(metrics_listener.local_addr()?);
    own.push(health_listener.local_addr()?);
    for l in http_proxy.iter().chain(outbound_v6.iter()) {
        own.push(l.local_addr()?);
    }

    let config = ProxyConfig {
        detect_timeout: args.protocol_detection_timeout.into(),
        connect_timeout: args.connect_timeout.into(),
        idle_timeout: args.idle_timeout.into(),
        request_headers_timeout: args.request_headers_timeout.into(),
        route_timeout: Some(std::time::Duration::from(args.route_timeout)).filter(|t| !t.is_zero()),
        max_connections: args.max_connections,
        accept_http10: args.accept_http10,
        access_log: Arc::clone(&access_log),
        none_resolution: if args.permissive_none_resolution {
            NonePolicy::Permissive
        } else {
            NonePolicy::Strict
        },
        ..ProxyConfig::default()
    };
    let lookup = HickoryLookup::from_system_conf().context("cannot read the DNS configuration")?;
    let dns = DnsCache::new(lookup, DnsConfig::default());
    let proxy = Proxy::new(
        Arc::clone(&registry),
        config,
        metrics,
        own,
        Arc::clone(&dns),
        Arc::clone(&audit),
    );

    let dns_changes = dns.subscribe();
    let publisher = Publisher::new(RegistryCompiler::new(options, dns), Arc::clone(&admin));
    // Every source registers before any delivers: readiness waits for each one's first
    // complete set.
    let folder = args
        .config
        .as_ref()
        .map(|path| Folder::new(path.clone(), &publisher));
    let xds = match &args.xds.xds_address {
        Some(address) => {
            let stats = Arc::new(XdsStats::default());
            let client = xds_client(&args.xds, address, node.clone(), Arc::clone(&stats))?;
            admin.add_stats(Box::new(move || stats.entries()));
            let timeout = args.xds.xds_initial_fetch_timeout.into();
            Some((XdsSource::new("xds", &publisher, timeout), client))
        }
        None => None,
    };
    let background = CancellationToken::new();
    tokio::spawn(watch_annotations(
        args.pod_annotations.clone(),
        audit,
        background.clone(),
    ));
    if let Some(dir) = &args.istio_certs {
        tokio::spawn(Arc::clone(&proxy).watch_workload_identity(dir.clone(), IDENTITY_REREAD));
    }
    if let Some(address) = &args.xds.ca_address {
        let config = ca_config(&args.xds, address, &node)?;
        tracing::info!(address, identity = %config.spiffe_id(), "workload certificates from Istio's CA");
        admin.await_identity();
        let proxy = Arc::clone(&proxy);
        let admin = Arc::clone(&admin);
        tokio::spawn(portcullis_xds::ca::run(config, move |issued| {
            proxy.set_workload_identity(Arc::new(WorkloadIdentity {
                cert_chain: issued.cert_chain,
                key: issued.key,
                root: issued.root,
            }));
            admin.identity_arrived();
        }));
    }
    if let Some(folder) = folder {
        tokio::spawn(folder.run(args.rescan_interval.into(), background.clone()));
    }
    if let Some((source, client)) = xds {
        // Each update blocks for the build, as Envoy's main thread applies config: the
        // client gets a thread and runtime of its own, away from the data path's workers.
        let stop = background.clone();
        std::thread::Builder::new()
            .name("portcullis-xds".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime.block_on(source.run(client, stop)),
                    Err(e) => tracing::error!(error = %e, "cannot start the xDS runtime"),
                }
            })
            .context("cannot start the xDS thread")?;
    }
    tokio::spawn(rebuild_on(publisher, dns_changes, background.clone()));
    for (listener, endpoints) in [
        (admin_listener, Endpoints::Admin),
        (metrics_listener, Endpoints::Metrics),
        (health_listener, Endpoints::Health),
    ] {
        tokio::spawn(portcullis_admin::serve(
            listener,
            Arc::clone(&admin),
            endpoints,
            background.clone(),
        ));
    }
    let mut listeners = Vec::new();
    tracing::info!(outbound = %args.outbound, admin = %args.admin, http_proxy = ?args.http_proxy, "portcullis listening");
    let proxied =
        |l: TcpListener| Listener::try_from(l).context("cannot set TCP_NODELAY on a listener");
    listeners.push(tokio::spawn(
        Arc::clone(&proxy).run_outbound(proxied(outbound)?, drain.clone()),
    ));
    if let Some(l) = outbound_v6 {
        listeners.push(tokio::spawn(
            Arc::clone(&proxy).run_outbound(proxied(l)?, drain.clone()),
        ));
    }
    if let Some(l) = http_proxy {
        listeners.push(tokio::spawn(
            Arc::clone(&proxy).run_http_proxy(proxied(l)?, drain.clone()),
        ));
    }

    wait_for_stop(&shutdown).await;
    drain.cancel();
    tracing::info!(deadline = ?args.drain_timeout, "draining: no new connections, waiting for open ones");
    for l in listeners {
        let _ = l.await;
    }
    proxy.tasks().close();
    let drained = tokio::time::timeout(args.drain_timeout.into(), proxy.tasks().wait()).await;
    match drained {
        Ok(()) => tracing::info!("drained"),
        Err(_) => tracing::warn!(
            open = proxy.tasks().len(),
            "drain deadline reached; closing the rest"
        ),
    }
    background.cancel();
    if !access_log.flush(std::time::Duration::from_secs(1)) {
        tracing::warn!("the access log's last lines may be lost");
    }
    Ok(ExitCode::SUCCESS)
}

/// The access log `args` ask for, its overflow counted in `dropped`.
fn open_access_log(
    args: &RunArgs,
    dropped: prometheus_client::metrics::counter::Counter,
) -> anyhow::Result<Arc<AccessLog>> {
    if args.access_log == "off" {
        return Ok(Arc::new(AccessLog::off()));
    }
    let format = match args.access_log_format {
        AccessLogEncoding::Text => AccessLogFormat::Text,
        AccessLogEncoding::Json => AccessLogFormat::Json,
    };
    let log = AccessLog::open(std::path::Path::new(&args.access_log), format, dropped)
        .with_context(|| format!("cannot open the access log {}", args.access_log))?;
    Ok(Arc::new(log))
}

/// A node metadata string, when set and not empty.
fn node_meta<'a>(node: &'a NodeIdentity, key: &str) -> Option<&'a str> {
    node.metadata
        .get(key)
        .and_then(|v| v.as_str())
        .filter(|v| !v.is_empty())
}

/// The `source_*` labels of the node: its workload name as istio-agent sends it
/// (`WORKLOAD_NAME`), else the pod's name; its namespace, else `namespace` (the one the
/// registry is compiled for); its labels.
fn source_labels(node: &NodeIdentity, namespace: &str) -> SourceLabels {
    let labels: BTreeMap<String, String> = node
        .metadata
        .get("LABELS")
        .and_then(|v| v.as_object())
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    SourceLabels::new(
        node_meta(node, "WORKLOAD_NAME").or_else(|| node_meta(node, "NAME")),
        node_meta(node, "NAMESPACE").or(Some(namespace)),
        &labels,
        node_meta(node, "CLUSTER_ID"),
    )
}

/// The workload's SPIFFE ID, when its namespace and service account are known.
fn spiffe_id(args: &XdsArgs, node: &NodeIdentity) -> Option<String> {
    let namespace = node_meta(node, "NAMESPACE")?;
    let account = node_meta(node, "SERVICE_ACCOUNT")?;
    Some(format!(
        "spiffe://{}/ns/{namespace}/sa/{account}",
        args.trust_domain
    ))
}

async fn wait_for_stop(shutdown: &CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        shutdown.cancelled().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
        () = shutdown.cancelled() => tracing::info!("shutdown requested on the admin port"),
    }
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
        let before = getrlimit(Resource::Nofile);
        let maximum = before.maximum.expect("a finite hard limit");
        let low = maximum.min(256);
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(low),
                maximum: Some(maximum),
            },
        )
        .unwrap();
        assert_eq!(raise_fd_limit(), Some(maximum));
        assert_eq!(getrlimit(Resource::Nofile).current, Some(maximum));
    }
}

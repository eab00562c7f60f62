//! Requests routed by a snapshot indexed from Envoy's model: route actions (direct
//! responses, redirects, a missing cluster, no route), header changes at route, virtual
//! host and table level, host and prefix rewrites, fault injection, and endpoints that need
//! TLS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis_envoy::{
    self as envoy, AbortError, AppendAction, Denominator, DirectBody, FaultAbort, FaultDelay,
    FractionalPercent, HeaderValueOption, HttpFault, PathMatch, RouteAction, RouteMatch,
    UpstreamTransport,
};
use portcullis_registry::Snapshot;

mod common;

use common::{Harness, Upstream, fetch};

fn cluster(name: &str, endpoint: SocketAddr, transport: UpstreamTransport) -> envoy::Cluster {
    common::static_cluster(name, endpoint, transport)
}

fn route(prefix: &str, action: RouteAction) -> envoy::Route {
    let route_match = RouteMatch {
        path: PathMatch::Prefix(prefix.into()),
        ..RouteMatch::any()
    };
    envoy::Route::new(prefix, route_match, action)
}

/// A route to `app` with the fault filter's `delay` and `abort`.
fn faulty(prefix: &str, delay: Option<FaultDelay>, abort: Option<FaultAbort>) -> envoy::Route {
    let mut r = route(
        prefix,
        RouteAction::Forward(Arc::new(envoy::Forward::to("app"))),
    );
    r.fault = Some(Box::new(HttpFault { delay, abort }));
    r
}

/// Every request, as istiod writes 100%.
fn all() -> FractionalPercent {
    FractionalPercent {
        numerator: 1_000_000,
        denominator: Denominator::Million,
    }
}

/// No request.
fn none() -> FractionalPercent {
    FractionalPercent {
        numerator: 0,
        denominator: Denominator::Million,
    }
}

fn set(name: &str, value: &str, append: AppendAction) -> HeaderValueOption {
    HeaderValueOption {
        name: name.into(),
        value: value.into(),
        append,
    }
}

/// A retry policy on one condition, every attempt free to go to any endpoint.
fn retries(retry_on: &str, num_retries: u32, codes: &[u16]) -> Arc<envoy::RetryPolicy> {
    Arc::new(envoy::RetryPolicy {
        retry_on: vec![retry_on.into()],
        num_retries,
        per_try_timeout: None,
        retriable_status_codes: codes.to_vec(),
        retriable_headers: Vec::new(),
        avoid_previous_hosts: false,
        host_selection_retry_max_attempts: 0,
        previous_priorities: None,
        retry_back_off: None,
    })
}

/// `/flaky-echo` to the app, a 503 retried once.
fn flaky_echo() -> envoy::Route {
    route(
        "/flaky-echo",
        RouteAction::Forward(Arc::new(envoy::Forward {
            retry_policy: Some(retries("retriable-status-codes", 1, &[503])),
            ..envoy::Forward::to("app")
        })),
    )
}

/// `0.0.0.0_80` with an inline table: `app.internal` with every action, `small.internal`
/// keeping at most 4 bytes of a body for retries, `block_all` for the rest.
fn model(app: SocketAddr, refused: SocketAddr) -> Snapshot {
    model_with_shadow(app, refused, refused)
}

/// [`model`] with `/mirrored` copying its requests to `shadow`.
fn model_with_shadow(app: SocketAddr, refused: SocketAddr, shadow: SocketAddr) -> Snapshot {
    let mut rewrite = route(
        "/old",
        RouteAction::Forward(Arc::new(envoy::Forward {
            host_rewrite_literal: Some("backend.internal".into()),
            prefix_rewrite: Some("/new".into()),
            ..envoy::Forward::to("app")
        })),
    );
    rewrite.request_headers_to_remove = vec!["x-drop".into()];
    rewrite.request_headers_to_add =
        vec![set("x-level", "route", AppendAction::AppendIfExistsOrAdd)];
    let app_host = envoy::VirtualHost {
        name: "app.internal:80".into(),
        domains: vec!["app.internal".into()],
        routes: vec![
            rewrite,
            route(
                "/teapot",
                RouteAction::DirectResponse {
                    status: 418,
                    body: Some(DirectBody::String("short and stout".into())),
                },
            ),
            route(
                "/binary",
                RouteAction::DirectResponse {
                    status: 200,
                    body: Some(DirectBody::Bytes(vec![0x00, 0x9f, 0x92, 0x96])),
                },
            ),
            route(
                "/split",
                RouteAction::Forward(Arc::new(envoy::Forward {
                    cluster: envoy::ClusterSpecifier::Weighted(vec![
                        envoy::WeightedCluster {
                            request_headers_to_add: vec![set(
                                "x-dest",
                                "a",
                                AppendAction::OverwriteIfExistsOrAdd,
                            )],
                            response_headers_to_add: vec![set(
                                "x-from",
                                "a",
                                AppendAction::OverwriteIfExistsOrAdd,
                            )],
                            ..envoy::WeightedCluster::new("app".into(), 1)
                        },
                        envoy::WeightedCluster {
                            request_headers_to_add: vec![set(
                                "x-dest",
                                "b",
                                AppendAction::OverwriteIfExistsOrAdd,
                            )],
                            response_headers_to_remove: vec!["x-answered-by".into()],
                            ..envoy::WeightedCluster::new("app-b".into(), 1)
                        },
                    ]),
                    ..envoy::Forward::to("app")
                })),
            ),
            route(
                "/moved",
                RouteAction::Redirect(Box::new(envoy::Redirect {
                    host: Some("elsewhere.example".into()),
                    status: 302,
                    ..Default::default()
                })),
            ),
            route(
                "/gone-cluster",
                RouteAction::Forward(Arc::new(envoy::Forward::to("no-such-cluster"))),
            ),
            route(
                "/mtls",
                RouteAction::Forward(Arc::new(envoy::Forward::to("mtls"))),
            ),
            route(
                "/retried",
                RouteAction::Forward(Arc::new(envoy::Forward {
                    retry_policy: Some(retries("connect-failure", 2, &[])),
                    ..envoy::Forward::to("refused")
                })),
            ),
            route(
                "/once",
                RouteAction::Forward(Arc::new(envoy::Forward::to("refused"))),
            ),
            faulty(
                "/aborted",
                None,
                Some(FaultAbort {
                    error: AbortError::HttpStatus(418),
                    percentage: all(),
                }),
            ),
            faulty(
                "/grpc-aborted",
                None,
                Some(FaultAbort {
                    error: AbortError::GrpcStatus(14),
                    percentage: all(),
                }),
            ),
            faulty(
                "/delayed",
                Some(FaultDelay {
                    fixed_delay: Duration::from_millis(300),
                    percentage: all(),
                }),
                None,
            ),
            faulty(
                "/never",
                Some(FaultDelay {
                    fixed_delay: Duration::from_secs(60),
                    percentage: none(),
                }),
                Some(FaultAbort {
                    error: AbortError::HttpStatus(500),
                    percentage: none(),
                }),
            ),
            flaky_echo(),
            route(
                "/mirrored",
                RouteAction::Forward(Arc::new(envoy::Forward {
                    request_mirror_policies: vec![envoy::RequestMirrorPolicy {
                        cluster: "shadow".into(),
                        runtime_fraction: None,
                    }],
                    ..envoy::Forward::to("app")
                })),
            ),
            route(
                "/",
                RouteAction::Forward(Arc::new(envoy::Forward::to("app"))),
            ),
        ],
        request_headers_to_add: vec![set("x-level", "vhost", AppendAction::AppendIfExistsOrAdd)],
        response_headers_to_add: vec![set(
            "x-answered-by",
            "app",
            AppendAction::OverwriteIfExistsOrAdd,
        )],
        ..Default::default()
    };
    let strict = envoy::VirtualHost {
        name: "strict.internal:80".into(),
        domains: vec!["strict.internal".into()],
        routes: vec![route(
            "/only",
            RouteAction::Forward(Arc::new(envoy::Forward::to("app"))),
        )],
        ..Default::default()
    };
    let block_all = envoy::VirtualHost {
        name: "block_all".into(),
        domains: vec!["*".into()],
        routes: vec![envoy::Route::new(
            "block_all",
            RouteMatch::any(),
            RouteAction::DirectResponse {
                status: 502,
                body: None,
            },
        )],
        ..Default::default()
    };
    let table = envoy::RouteConfiguration {
        name: "80".into(),
        virtual_hosts: vec![
            app_host,
            envoy::VirtualHost {
                name: "small.internal:80".into(),
                domains: vec!["small.internal".into()],
                routes: vec![flaky_echo()],
                request_buffer_limit: Some(envoy::RequestBufferLimit::PerRequest(4)),
                ..Default::default()
            },
            strict,
            block_all,
        ],
        request_headers_to_add: vec![set(
            "x-level",
            "table",
            AppendAction::OverwriteIfExistsOrAdd,
        )],
        ignore_port_in_host_matching: true,
        ..Default::default()
    };
    common::http_model(
        table,
        [
            cluster("app", app, UpstreamTransport::Plaintext),
            cluster("app-b", app, UpstreamTransport::Plaintext),
            cluster(
                "mtls",
                app,
                UpstreamTransport::IstioMutualTls(Default::default()),
            ),
            cluster("refused", refused, UpstreamTransport::Plaintext),
            cluster("shadow", shadow, UpstreamTransport::Plaintext),
        ],
    )
}

#[tokio::test]
async fn route_actions_answer_as_envoy_does() {
    let app = Upstream::start("app").await;
    let refused = SocketAddr::from(([127, 0, 0, 1], common::refused_port().await));
    let harness = Harness::start(model(app.addr, refused)).await;

    let ok = fetch(&harness, "http://app.internal/page", None).await;
    assert_eq!((ok.status.as_u16(), ok.text()), (200, "app"));
    assert_eq!(ok.header("x-answered-by"), Some("app"));

    let teapot = fetch(&harness, "http://app.internal/teapot", None).await;
    assert_eq!(
        (teapot.status.as_u16(), teapot.text()),
        (418, "short and stout")
    );
    assert_eq!(teapot.header("server"), Some("envoy"));

    let binary = fetch(&harness, "http://app.internal/binary", None).await;
    assert_eq!(binary.status.as_u16(), 200);
    assert_eq!(&binary.body[..], [0x00, 0x9f, 0x92, 0x96]);

    let moved = fetch(&harness, "http://app.internal/moved/x?q=1", None).await;
    assert_eq!(moved.status.as_u16(), 302);
    assert_eq!(
        moved.header("location"),
        Some("http://elsewhere.example/moved/x?q=1")
    );

    let blocked = fetch(&harness, "http://unregistered.example/", None).await;
    assert_eq!((blocked.status.as_u16(), blocked.text()), (502, ""));
    assert_eq!(blocked.header("server"), Some("envoy"));
    // Counted as Istio counts its `block_all` route: against BlackHoleCluster.
    assert!(
        harness
            .prometheus()
            .lines()
            .any(|l| l.starts_with("istio_requests_total{")
                && l.contains("\"BlackHoleCluster\"")
                && l.contains("\"502\"")),
        "{}",
        harness.prometheus()
    );

    let no_route = fetch(&harness, "http://strict.internal/other", None).await;
    assert_eq!(no_route.status.as_u16(), 404);

    let no_cluster = fetch(&harness, "http://app.internal/gone-cluster", None).await;
    assert_eq!(no_cluster.status.as_u16(), 503);

    // An endpoint that needs Istio mutual TLS is never sent plaintext.
    let accepts = app.accepts();
    let mtls = fetch(&harness, "http://app.internal/mtls", None).await;
    assert_eq!(mtls.status.as_u16(), 503);
    assert_eq!(app.accepts(), accepts);
}

#[tokio::test]
async fn routes_rewrite_host_path_and_headers_in_envoys_order() {
    let app = Upstream::start("app").await;
    let refused = SocketAddr::from(([127, 0, 0, 1], common::refused_port().await));
    let harness = Harness::start(model(app.addr, refused)).await;
    let mut sender = harness.client().await;
    let req = http::Request::get("http://app.internal/old/page?k=v")
        .header("x-drop", "secret")
        .header("x-level", "client")
        .body(http_body_util::BodyExt::boxed(http_body_util::Full::new(
            bytes::Bytes::new(),
        )))
        .unwrap();
    let answer = common::send(&mut sender, req).await;
    assert_eq!(answer.status.as_u16(), 200);
    let seen = app.requests();
    let last = seen.last().unwrap();
    assert_eq!(last.uri, "/new/page?k=v");
    assert_eq!(last.headers.get("host").unwrap(), "backend.internal");
    assert!(last.headers.get("x-drop").is_none());
    // Route and virtual host append; the table's overwrite comes last and wins.
    let levels: Vec<_> = last.headers.get_all("x-level").iter().collect();
    assert_eq!(levels, ["table"]);
    assert_eq!(answer.header("x-answered-by"), Some("app"));
}

/// Each weighted cluster's header changes go with the requests it gets and the responses
/// they bring, before the route's (here the virtual host's `x-answered-by`, which `app-b`'s
/// removal precedes and so cannot remove).
#[tokio::test]
async fn a_weighted_clusters_headers_go_only_with_its_own_requests() {
    let app = Upstream::start("app").await;
    let refused = SocketAddr::from(([127, 0, 0, 1], common::refused_port().await));
    let harness = Harness::start(model(app.addr, refused)).await;
    let mut seen = std::collections::BTreeSet::new();
    // Two clusters of equal weight: both are drawn in 40 requests but for 1 in 2^39.
    for _ in 0..40 {
        let answer = fetch(&harness, "http://app.internal/split", None).await;
        assert_eq!(answer.status.as_u16(), 200);
        let sent = app.requests().last().unwrap().headers.clone();
        let dest: Vec<_> = sent.get_all("x-dest").iter().collect();
        let from = answer.header("x-from").map(str::to_string);
        assert_eq!(answer.header("x-answered-by"), Some("app"));
        seen.insert((format!("{dest:?}"), from));
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        [
            ("[\"a\"]".to_string(), Some("a".to_string())),
            ("[\"b\"]".to_string(), None),
        ]
    );
}

#[tokio::test]
async fn a_route_retries_as_its_policy_says_and_not_without_one() {
    let app = Upstream::start("app").await;
    let refused = SocketAddr::from(([127, 0, 0, 1], common::refused_port().await));
    let harness = Harness::start(model(app.addr, refused)).await;
    let flags = |path: &'static str| {
        let harness = &harness;
        async move {
            let answer = fetch(harness, &format!("http://app.internal{path}"), None).await;
            assert_eq!(answer.status.as_u16(), 503);
            let text = harness.prometheus();
            let flags: Vec<String> = text
                .lines()
                .filter(|l| l.starts_with("istio_requests_total{"))
                .filter_map(|l| l.split("response_flags=\"").nth(1))
                .filter_map(|rest| rest.split('"').next().map(str::to_string))
                .collect();
            flags
        }
    };
    assert_eq!(flags("/once").await, ["UF"]);
    let after = flags("/retried").await;
    assert!(after.contains(&"URX,UF".to_string()), "{after:?}");
}

/// The `response_flags` labels of `istio_requests_total` with `status`.
fn flags_of(harness: &Harness, status: &str) -> Vec<String> {
    harness
        .prometheus()
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .filter(|l| l.contains(&format!("response_code=\"{status}\"")))
        .filter_map(|l| l.split("response_flags=\"").nth(1))
        .filter_map(|rest| rest.split('"').next().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn a_routes_fault_filter_delays_and_aborts_as_envoys_does() {
    let app = Upstream::start("app").await;
    let refused = SocketAddr::from(([127, 0, 0, 1], common::refused_port().await));
    let harness = Harness::start(model(app.addr, refused)).await;

    let accepts = app.accepts();
    let aborted = fetch(&harness, "http://app.internal/aborted", None).await;
    assert_eq!(
        (aborted.status.as_u16(), aborted.text()),
        (418, "fault filter abort")
    );
    assert_eq!(aborted.header("server"), Some("envoy"));
    assert_eq!(app.accepts(), accepts, "an aborted request goes nowhere");
    assert_eq!(flags_of(&harness, "418"), ["FI"]);

    // The delay comes before the request is forwarded, and is flagged first.
    let started = Instant::now();
    let delayed = fetch(&harness, "http://app.internal/delayed", None).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!((delayed.status.as_u16(), delayed.text()), (200, "app"));
    assert_eq!(flags_of(&harness, "200"), ["DI"]);

    // A fault for no share of requests never happens.
    let spared = fetch(&harness, "http://app.internal/never", None).await;
    assert_eq!((spared.status.as_u16(), spared.text()), (200, "app"));
    let mut flags = flags_of(&harness, "200");
    flags.sort();
    assert_eq!(flags, ["-", "DI"]);

    // A gRPC status: a gRPC request gets a trailers-only gRPC answer, any other a 200 with
    // the fault filter's body, as Envoy 1.40 answers both.
    let accepts = app.accepts();
    let grpc = |path: &'static str| {
        let harness = &harness;
        async move {
            let mut sender = harness.client().await;
            let req = http::Request::post(format!("http://app.internal{path}"))
                .header("content-type", "application/grpc")
                .body(http_body_util::BodyExt::boxed(http_body_util::Full::new(
                    bytes::Bytes::from_static(b"\0\0\0\0\0"),
                )))
                .unwrap();
            common::send(&mut sender, req).await
        }
    };
    let aborted = grpc("/grpc-aborted").await;
    assert_eq!(aborted.status.as_u16(), 200);
    assert_eq!(aborted.header("content-type"), Some("application/grpc"));
    assert_eq!(aborted.header("grpc-status"), Some("14"));
    assert_eq!(aborted.header("grpc-message"), Some("fault filter abort"));
    assert!(aborted.body.is_empty());
    let plain = fetch(&harness, "http://app.internal/grpc-aborted", None).await;
    assert_eq!(
        (plain.status.as_u16(), plain.text()),
        (200, "fault filter abort")
    );
    assert_eq!(plain.header("grpc-status"), None);
    // An HTTP status answers a gRPC request with the gRPC status it maps to (418: UNKNOWN).
    let mapped = grpc("/aborted").await;
    assert_eq!(mapped.status.as_u16(), 200);
    assert_eq!(mapped.header("grpc-status"), Some("2"));
    assert_eq!(app.accepts(), accepts, "an aborted request goes nowhere");

    let text = harness.prometheus();
    assert!(
        text.contains("envoy_http_fault_aborts_injected 4"),
        "{text}"
    );
    assert!(
        text.contains("envoy_http_fault_delays_injected 1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_streamed_body_is_copied_so_a_retry_can_send_it_again() {
    let app = Upstream::start("app").await;
    let refused = SocketAddr::from(([127, 0, 0, 1], common::refused_port().await));
    let harness = Harness::start(model(app.addr, refused)).await;
    // A chunked body takes the general path, which streams it upstream.
    let request = "POST http://app.internal/flaky-echo HTTP/1.1\r\nHost: app.internal\r\n\
                   transfer-encoding: chunked\r\n\r\n7\r\npayload\r\n0\r\n\r\n";
    let (_, head, body) = common::raw(harness.addr, request).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(String::from_utf8(body).unwrap(), "payload");
    let attempts: Vec<_> = app
        .requests()
        .iter()
        .filter(|r| r.uri.contains("flaky-echo"))
        .map(|r| {
            r.headers["x-envoy-attempt-count"]
                .to_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(attempts, ["1", "2"]);
}

#[tokio::test]
async fn a_body_over_the_routes_buffer_limit_is_not_retried() {
    let app = Upstream::start("app").await;
    let refused = SocketAddr::from(([127, 0, 0, 1], common::refused_port().await));
    let harness = Harness::start(model(app.addr, refused)).await;
    let post = |body: &str| {
        format!(
            "POST http://small.internal/flaky-echo HTTP/1.1\r\nHost: small.internal\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    // 7 bytes, 4 kept: the 503 cannot be retried (Envoy gives up the retry when the body
    // outgrows its buffer), even on the HTTP/1.1 fast path.
    let (_, head, _) = common::raw(harness.addr, &post("payload")).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    let attempts = || {
        app.requests()
            .iter()
            .filter(|r| r.uri.contains("flaky-echo"))
            .map(|r| {
                r.headers["x-envoy-attempt-count"]
                    .to_str()
                    .unwrap()
                    .to_owned()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(attempts(), ["1"]);
    let (_, head, body) = common::raw(harness.addr, &post("abc")).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"abc");
}

#[tokio::test]
async fn a_mirrored_request_goes_to_the_shadow_with_its_body_and_a_shadow_host() {
    let (app, shadow) = (
        Upstream::start("app").await,
        Upstream::start("shadow").await,
    );
    let refused = SocketAddr::from(([127, 0, 0, 1], common::refused_port().await));
    let harness = Harness::start(model_with_shadow(app.addr, refused, shadow.addr)).await;
    let request = "POST http://app.internal/mirrored/echo HTTP/1.1\r\nHost: app.internal\r\n\
                   content-length: 7\r\n\r\npayload";
    let (_, head, body) = common::raw(harness.addr, request).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(String::from_utf8(body).unwrap(), "app");
    common::within(async {
        while shadow.requests().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let copy = &shadow.requests()[0];
    assert_eq!(copy.uri, "/mirrored/echo");
    assert_eq!(copy.headers["host"], "app.internal-shadow");
    assert_eq!(copy.headers["content-length"], "7");
    assert_eq!(app.requests().len(), 1);
}

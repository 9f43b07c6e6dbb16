//! The timing layer through tower's Service trait: statuses, failures, pass-through,
//! the router's matched route, bounded cardinality under a scan, and exposition that a
//! Prometheus parser accepts.

use std::future::{Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Method, Request, Response, StatusCode};
use tower_layer::Layer;
use tower_service::Service;
use upcoach_perf::{
    MatchedRoute, MemoryMetrics, MetricsSink, PrometheusExporter, RequestMetrics,
    RequestTimingLayer, RouteTable,
};

/// Answers with the status named in the path's last segment (`/.../404`), or fails
/// for `/fail`.
#[derive(Clone)]
struct Echo;

impl Service<Request<()>> for Echo {
    type Response = Response<()>;
    type Error = &'static str;
    type Future = Ready<Result<Response<()>, &'static str>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<()>) -> Self::Future {
        if req.uri().path() == "/fail" {
            return ready(Err("failed"));
        }
        let status = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(200);
        let mut response = Response::new(());
        *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
        ready(Ok(response))
    }
}

fn request(method: Method, path: &str) -> Request<()> {
    Request::builder()
        .method(method)
        .uri(path)
        .body(())
        .unwrap()
}

async fn send<S: Service<Request<()>>>(service: &mut S, method: Method, path: &str) {
    let _ = service.call(request(method, path)).await;
}

fn table() -> RouteTable {
    RouteTable::new(["/health", "/api/items/{id}", "/fail"]).unwrap()
}

#[tokio::test]
async fn records_route_template_method_and_status_class() {
    let metrics = Arc::new(RequestMetrics::new(table()));
    let mut service = RequestTimingLayer::new(metrics.clone()).layer(Echo);
    for path in [
        "/api/items/1",
        "/api/items/2",
        "/api/items/404",
        "/api/items/500",
    ] {
        send(&mut service, Method::GET, path).await;
    }
    send(&mut service, Method::DELETE, "/api/items/9").await;
    send(&mut service, Method::POST, "/fail").await;

    let routes = metrics.snapshot();
    let find = |method: &str, route: &str| {
        routes
            .iter()
            .find(|r| r.method == method && r.route == route)
            .unwrap_or_else(|| panic!("{method} {route}"))
    };
    let get = find("GET", "/api/items/{id}");
    assert_eq!(get.count, 4);
    assert_eq!(get.errors, 1, "one 5xx");
    assert_eq!(get.statuses, [("2xx", 2), ("4xx", 1), ("5xx", 1)]);
    assert_eq!(get.window.count, 4);
    assert_eq!(find("DELETE", "/api/items/{id}").count, 1);
    let failed = find("POST", "/fail");
    assert_eq!((failed.count, failed.errors), (1, 1));
    assert_eq!(failed.statuses, [("error", 1)]);

    // The live feed's view: the last minute of the routes that had requests in it.
    let recent = get.recent().expect("requests in the window");
    assert_eq!(
        (recent.method, recent.route.as_str()),
        ("GET", "/api/items/{id}")
    );
    assert_eq!(recent.errors, 1);
    assert_eq!(recent.rate_per_s, get.window.rate_per_s);
    assert!(recent.rate_per_s > 0.0 && recent.p95_ms >= 0.0);
    assert_eq!(recent.p95_ms, get.window.latency.p95_ms);
    let active: Vec<_> = routes.iter().filter_map(|r| r.recent()).collect();
    assert_eq!(
        active.len(),
        3,
        "GET and DELETE items, POST fail: {active:?}"
    );
}

/// A router that names the template it matched: the `x-template` header of the request
/// (none without it), as a `&'static` template or a shared one (`x-shared`).
#[derive(Clone)]
struct Named;

impl Service<Request<()>> for Named {
    type Response = Response<()>;
    type Error = &'static str;
    type Future = Ready<Result<Response<()>, &'static str>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<()>) -> Self::Future {
        let mut response = Response::new(());
        if let Some(template) = req.headers().get("x-template") {
            let template = template.to_str().unwrap();
            let matched = match template {
                "/api/items/{id}" if !req.headers().contains_key("x-shared") => {
                    MatchedRoute::from_static("/api/items/{id}")
                }
                other => MatchedRoute::from(Arc::<str>::from(other)),
            };
            response.extensions_mut().insert(matched);
        }
        ready(Ok(response))
    }
}

fn named(method: Method, path: &str, template: Option<&str>, shared: bool) -> Request<()> {
    let mut builder = Request::builder().method(method).uri(path);
    if let Some(template) = template {
        builder = builder.header("x-template", template);
    }
    if shared {
        builder = builder.header("x-shared", "1");
    }
    builder.body(()).unwrap()
}

#[tokio::test]
async fn the_routers_matched_route_wins_over_the_path() {
    let metrics = Arc::new(RequestMetrics::new(table()));
    let mut service = RequestTimingLayer::new(metrics.clone()).layer(Named);
    let cases = [
        // The path matches another template: the router's word is taken.
        ("/health", Some("/api/items/{id}"), false),
        // The path matches no template.
        ("/v2/items/7/", Some("/api/items/{id}"), false),
        // The same template as an `Arc<str>`.
        ("/fail", Some("/api/items/{id}"), true),
        // A template the table does not know: unmatched, whatever the path.
        ("/api/items/1", Some("/api/items/{item}"), true),
        ("/health", Some("/nowhere/{x}"), true),
        // No extension: the path decides.
        ("/health", None, false),
        ("/api/items/3", None, false),
        ("/elsewhere", None, false),
    ];
    for (path, template, shared) in cases {
        let _ = service
            .call(named(Method::GET, path, template, shared))
            .await;
    }
    let routes = metrics.snapshot();
    let count = |route: &str| {
        routes
            .iter()
            .filter(|r| r.method == "GET" && r.route == route)
            .map(|r| r.count)
            .sum::<u64>()
    };
    assert_eq!(count("/api/items/{id}"), 4, "{routes:?}");
    assert_eq!(count("unmatched"), 3, "{routes:?}");
    assert_eq!(count("/health"), 1, "{routes:?}");
    assert_eq!(count("/fail"), 0, "{routes:?}");
}

/// Names a template in its response, but only after a wait.
#[derive(Clone)]
struct SlowNamed;

impl Service<Request<()>> for SlowNamed {
    type Response = Response<()>;
    type Error = &'static str;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<()>, &'static str>> + Send>,
    >;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<()>) -> Self::Future {
        Box::pin(async {
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            let mut response = Response::new(());
            response
                .extensions_mut()
                .insert(MatchedRoute::from_static("/fail"));
            Ok(response)
        })
    }
}

#[tokio::test]
async fn a_request_dropped_before_its_response_keeps_the_route_of_its_path() {
    let metrics = Arc::new(RequestMetrics::new(table()));
    let mut service = RequestTimingLayer::new(metrics.clone()).layer(SlowNamed);
    for path in ["/api/items/5", "/nowhere"] {
        let future = service.call(request(Method::GET, path));
        let _ = tokio::time::timeout(std::time::Duration::from_millis(5), future).await;
    }
    let routes = metrics.snapshot();
    let routes: Vec<(&str, &[(&str, u64)])> = routes
        .iter()
        .map(|r| (r.route.as_str(), r.statuses.as_slice()))
        .collect();
    assert_eq!(
        routes,
        [
            ("/api/items/{id}", &[("cancelled", 1)][..]),
            ("unmatched", &[("cancelled", 1)][..])
        ]
    );
}

/// Never answers: a request that is dropped before its response.
#[derive(Clone)]
struct Hang;

impl Service<Request<()>> for Hang {
    type Response = Response<()>;
    type Error = &'static str;
    type Future = std::future::Pending<Result<Response<()>, &'static str>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<()>) -> Self::Future {
        std::future::pending()
    }
}

#[tokio::test]
async fn a_request_dropped_before_its_response_counts_as_cancelled() {
    let metrics = Arc::new(RequestMetrics::new(table()));
    let mut service = RequestTimingLayer::new(metrics.clone()).layer(Hang);
    let future = service.call(request(Method::GET, "/health"));
    let _ = tokio::time::timeout(std::time::Duration::from_millis(20), future).await;
    let routes = metrics.snapshot();
    assert_eq!(routes.len(), 1);
    assert_eq!(routes[0].statuses, [("cancelled", 1)]);
    assert_eq!(
        routes[0].errors, 0,
        "a client going away is not a server error"
    );
    assert!(
        routes[0].latency.max_ms >= 15.0,
        "its time is recorded: {:?}",
        routes[0].latency
    );
}

#[tokio::test]
async fn the_disabled_layer_records_nothing() {
    let metrics = Arc::new(RequestMetrics::new(table()));
    let _enabled_elsewhere = RequestTimingLayer::new(metrics.clone());
    let mut service = RequestTimingLayer::disabled().layer(Echo);
    send(&mut service, Method::GET, "/health").await;
    assert!(metrics.snapshot().is_empty());
}

#[tokio::test]
async fn a_scan_of_random_paths_makes_a_bounded_number_of_series() {
    let metrics = Arc::new(RequestMetrics::new(table()));
    let sink = Arc::new(MemoryMetrics::default());
    let mut service = RequestTimingLayer::new(metrics.clone()).layer(Echo);
    let methods = [
        Method::GET,
        Method::POST,
        Method::from_bytes(b"PROPFIND").unwrap(),
    ];
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for i in 0..100_000u32 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let path = format!(
            "/scan/{state:x}/{i}/{}",
            ["admin.php", ".env", "wp-login"][i as usize % 3]
        );
        send(&mut service, methods[i as usize % 3].clone(), &path).await;
    }
    let routes = metrics.snapshot();
    assert_eq!(
        routes.len(),
        3,
        "one series per method on the unmatched route"
    );
    assert!(routes.iter().all(|r| r.route == "unmatched"));
    assert_eq!(routes.iter().map(|r| r.count).sum::<u64>(), 100_000);
    assert!(
        routes.iter().any(|r| r.method == "OTHER"),
        "unknown methods fold into OTHER"
    );

    let text = PrometheusExporter::new(metrics, sink).render();
    let samples = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count();
    // 3 counters + 3 histograms × (14 buckets + +Inf + sum + count).
    assert_eq!(samples, 3 + 3 * 17, "{text}");
}

#[tokio::test]
async fn exposition_parses_as_prometheus_text() {
    let metrics = Arc::new(RequestMetrics::new(table()));
    let sink = Arc::new(MemoryMetrics::default());
    let mut service = RequestTimingLayer::new(metrics.clone()).layer(Echo);
    for path in ["/health", "/api/items/7", "/api/items/503", "/nowhere"] {
        send(&mut service, Method::GET, path).await;
    }
    sink.increment_counter("cache_hits_total", &[("tier", "l1")], 5);
    sink.increment_counter("cache_hits_total", &[("tier", "l2 \"redis\"\n")], 2);
    sink.set_gauge("process_threads", &[], 12.0);
    sink.record_histogram("db_query_seconds", &[("digest", "select_users")], 0.0123);

    // The parser is a real check: it refuses broken text.
    assert!(openmetrics_parser::prometheus::parse_prometheus("x{a=\"1\" 2\n").is_err());
    assert!(openmetrics_parser::prometheus::parse_prometheus("x{a=b} 2\n").is_err());

    let text = PrometheusExporter::new(metrics, sink.clone()).render();
    let parsed = openmetrics_parser::prometheus::parse_prometheus(&text)
        .unwrap_or_else(|e| panic!("not valid Prometheus text ({e:?}):\n{text}"));

    use openmetrics_parser::PrometheusValue;
    let value = |family: &str, labels: &[(&str, &str)]| -> PrometheusValue {
        let family = parsed
            .families
            .get(family)
            .unwrap_or_else(|| panic!("no family {family} in {:?}", parsed.families.keys()));
        family
            .iter_samples()
            .find(|s| {
                let set = s.get_labelset().unwrap();
                labels
                    .iter()
                    .all(|(k, v)| set.get_label_value(k) == Some(*v))
            })
            .unwrap_or_else(|| panic!("no sample {labels:?} in\n{text}"))
            .value
            .clone()
    };
    let counter = |v: PrometheusValue| match v {
        PrometheusValue::Counter(c) => c.value.as_f64(),
        other => panic!("not a counter: {other:?}"),
    };
    let histogram = |v: PrometheusValue| match v {
        PrometheusValue::Histogram(h) => h,
        other => panic!("not a histogram: {other:?}"),
    };
    assert_eq!(
        counter(value(
            "http_requests_total",
            &[
                ("method", "GET"),
                ("route", "/api/items/{id}"),
                ("status", "5xx")
            ]
        )),
        1.0
    );
    assert_eq!(
        counter(value(
            "http_requests_total",
            &[("route", "unmatched"), ("status", "2xx")]
        )),
        1.0
    );
    let health = histogram(value(
        "http_request_duration_seconds",
        &[("route", "/health")],
    ));
    assert_eq!(health.count, Some(1));
    assert_eq!(health.buckets.last().unwrap().count.as_f64(), 1.0);
    assert!(
        health
            .buckets
            .windows(2)
            .all(|w| w[0].count.as_f64() <= w[1].count.as_f64()),
        "cumulative buckets"
    );
    assert_eq!(counter(value("cache_hits_total", &[("tier", "l1")])), 5.0);
    assert_eq!(
        counter(value("cache_hits_total", &[("tier", "l2 \"redis\"\n")])),
        2.0
    );
    match value("process_threads", &[]) {
        PrometheusValue::Gauge(n) => assert_eq!(n.as_f64(), 12.0),
        other => panic!("not a gauge: {other:?}"),
    }
    let query = histogram(value("db_query_seconds", &[("digest", "select_users")]));
    let at = |le: f64| {
        query
            .buckets
            .iter()
            .find(|b| b.upper_bound == le)
            .unwrap()
            .count
            .as_f64()
    };
    assert_eq!(
        (at(0.01), at(0.025)),
        (0.0, 1.0),
        "12.3 ms falls in the 25 ms bucket"
    );
    assert!(
        text.contains(r#"tier="l2 \"redis\"\n""#),
        "label values are escaped:\n{text}"
    );
}

#[test]
fn the_sink_bounds_its_series_and_refuses_bad_names() {
    let sink = MemoryMetrics::new(3);
    for i in 0..10 {
        sink.increment_counter("requests_total", &[("shard", &i.to_string())], 1);
    }
    assert_eq!(sink.series_count(), 3);
    assert_eq!(sink.dropped(), 7);
    sink.set_gauge("requests_total", &[("shard", "0")], 1.0);
    assert_eq!(sink.dropped(), 8, "a type clash is dropped");
    sink.set_gauge("bad name", &[], 1.0);
    sink.set_gauge("ok_name", &[("bad-label", "x")], 1.0);
    sink.record_histogram("ok_seconds", &[], -1.0);
    sink.record_histogram("ok_seconds", &[], f64::NAN);
    assert_eq!(sink.dropped(), 12);
    assert_eq!(sink.counter("requests_total", &[("shard", "0")]), Some(1));

    // One family name, one type, across label sets and the `_total` suffix.
    let sink = MemoryMetrics::default();
    sink.increment_counter("jobs", &[("queue", "a")], 1);
    sink.set_gauge("jobs", &[("queue", "b")], 1.0);
    sink.increment_counter("jobs_total", &[("queue", "c")], 1);
    sink.increment_counter("http_requests_total", &[], 1);
    sink.record_histogram("http_request_duration_seconds", &[], 0.1);
    sink.set_gauge("x", &[("le", "1")], 1.0);
    assert_eq!(sink.dropped(), 4);
    assert_eq!(sink.series_count(), 2);
    let text =
        PrometheusExporter::new(Arc::new(RequestMetrics::new(table())), Arc::new(sink)).render();
    assert_eq!(
        text.matches("# TYPE jobs_total counter").count(),
        1,
        "one family:\n{text}"
    );
    openmetrics_parser::prometheus::parse_prometheus(&text).expect("valid exposition");
}

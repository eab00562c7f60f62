//! The metrics registry in the two text forms the admin port serves: the Prometheus text
//! exposition format 0.0.4 (`/stats/prometheus`) and Envoy's `name: value` (`/stats`).
//!
//! prometheus-client only writes OpenMetrics, and its encoder types are closed to other
//! crates, so the registry is encoded once as OpenMetrics and read back into families, from
//! which both forms are rendered. The sample lines of the two Prometheus formats are the
//! same; the differences are the family names of counters (OpenMetrics names the family
//! `x` and its sample `x_total`, 0.0.4 names both `x_total`), `info` and `unknown` types,
//! `# UNIT`, exemplars and the closing `# EOF`.
//!
//! Envoy's and Istio's metrics (`envoy_*`, `istio_*`) are registered under the exact names
//! Envoy prints, counters with or without `_total` as Envoy has them
//! (`envoy_cluster_upstream_rq_total`, `envoy_cluster_upstream_cx_connect_fail`): the
//! `_total` OpenMetrics appends to their samples is taken off again. portcullis' own
//! counters keep the Prometheus convention.

use std::collections::BTreeMap;
use std::fmt::Write;

use prometheus_client::registry::Registry;

use crate::render::ClusterGauge;

/// The type of a metric family, as OpenMetrics declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
    Info,
    Unknown,
}

impl Kind {
    fn parse(text: &str) -> Kind {
        match text {
            "counter" => Kind::Counter,
            "gauge" => Kind::Gauge,
            "histogram" => Kind::Histogram,
            "info" => Kind::Info,
            _ => Kind::Unknown,
        }
    }
}

/// One sample line: `name{labels} value`, labels still escaped.
#[derive(Debug, PartialEq, Eq)]
struct Sample<'a> {
    name: &'a str,
    labels: &'a str,
    value: &'a str,
}

/// One metric family with its samples.
#[derive(Debug)]
struct Family<'a> {
    name: &'a str,
    help: &'a str,
    kind: Kind,
    samples: Vec<Sample<'a>>,
}

/// Whether `family` is one of Envoy's or Istio's, named exactly as they name it.
fn envoy_named(family: &str) -> bool {
    family.starts_with("envoy_") || family.starts_with("istio_")
}

impl Family<'_> {
    /// The family name in the 0.0.4 format, where it must equal the samples' names.
    fn prometheus_name(&self) -> String {
        match self.kind {
            Kind::Counter if envoy_named(self.name) => self.name.to_owned(),
            Kind::Counter => format!("{}_total", self.name),
            Kind::Info => format!("{}_info", self.name),
            Kind::Gauge | Kind::Histogram | Kind::Unknown => self.name.to_owned(),
        }
    }

    fn prometheus_type(&self) -> &'static str {
        match self.kind {
            Kind::Counter => "counter",
            Kind::Gauge | Kind::Info => "gauge",
            Kind::Histogram => "histogram",
            Kind::Unknown => "untyped",
        }
    }
}

/// The registry's OpenMetrics text, without `# EOF`.
fn openmetrics(registry: &Registry) -> String {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode_registry(&mut text, registry) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    text
}

/// Splits `name{labels} value [timestamp] [# exemplar]`; `None` for anything else.
fn sample(line: &str) -> Option<Sample<'_>> {
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let (labels, rest) = if line[name_end..].starts_with('{') {
        let body = &line[name_end + 1..];
        let close = labels_end(body)?;
        (&body[..close], &body[close + 1..])
    } else {
        ("", &line[name_end..])
    };
    let value = rest.split_whitespace().next()?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// The index of the `}` that closes a label set, skipping quoted values.
fn labels_end(body: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in body.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// Reads the families back from OpenMetrics text written by prometheus-client.
fn families(text: &str) -> Vec<Family<'_>> {
    let mut out: Vec<Family<'_>> = Vec::new();
    let mut help = "";
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = rest.split_once(' ').map_or("", |(_, h)| h);
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push(Family {
                name,
                help,
                kind: Kind::parse(kind),
                samples: Vec::new(),
            });
        } else if line.starts_with('#') {
            continue;
        } else if let (Some(family), Some(mut s)) = (out.last_mut(), sample(line)) {
            if family.kind == Kind::Counter && envoy_named(family.name) {
                s.name = s.name.strip_suffix("_total").unwrap_or(s.name);
            }
            family.samples.push(s);
        }
    }
    out
}

/// Escapes a help text as the 0.0.4 format requires.
fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

/// The `cluster_name` label of a cluster's series.
fn cluster_label(cluster: &str) -> String {
    format!(
        "cluster_name=\"{}\"",
        cluster.replace('\\', "\\\\").replace('"', "\\\"")
    )
}

/// The `cluster_name` labels of the clusters `gauges` are for, each once.
fn cluster_labels(gauges: &[ClusterGauge]) -> Vec<String> {
    let mut clusters: Vec<String> = gauges.iter().map(|g| cluster_label(&g.cluster)).collect();
    clusters.dedup();
    clusters
}

/// Envoy's cluster counters tagged with a response code besides the cluster: a series
/// appears with the first response of its code.
const PER_CODE: [&str; 2] = ["envoy_cluster_upstream_rq", "envoy_cluster_upstream_rq_xx"];

/// Adds a zero sample for each of `clusters` a family of per-cluster counters has none
/// for: Envoy shows every cluster's counters from its creation on.
fn zero_for_clusters<'a>(family: &mut Family<'a>, clusters: &'a [String]) {
    let per_cluster = family.kind == Kind::Counter
        && family.name.starts_with("envoy_cluster_")
        && !PER_CODE.contains(&family.name);
    if !per_cluster {
        return;
    }
    for cluster in clusters {
        if !family.samples.iter().any(|s| s.labels == cluster) {
            family.samples.push(Sample {
                name: family.name,
                labels: cluster,
                value: "0",
            });
        }
    }
}

/// The registry in the Prometheus text exposition format 0.0.4, then `extra`'s counters
/// under the names Envoy exports them with (`envoy_` and the stat name, dots as `_`), then
/// the snapshot's cluster `gauges` as Envoy exports them (`envoy_cluster_<stat>` labelled
/// with `cluster_name`). Every cluster of `gauges` gets each per-cluster counter, at zero
/// until it counts.
pub fn prometheus(registry: &Registry, extra: &[(String, u64)], gauges: &[ClusterGauge]) -> String {
    let text = openmetrics(registry);
    let mut out = String::with_capacity(text.len());
    let clusters = cluster_labels(gauges);
    for mut family in families(&text) {
        zero_for_clusters(&mut family, &clusters);
        let name = family.prometheus_name();
        let _ = writeln!(out, "# HELP {name} {}", escape_help(family.help));
        let _ = writeln!(out, "# TYPE {name} {}", family.prometheus_type());
        for s in &family.samples {
            let _ = if s.labels.is_empty() {
                writeln!(out, "{} {}", s.name, s.value)
            } else {
                writeln!(out, "{}{{{}}} {}", s.name, s.labels, s.value)
            };
        }
    }
    for (name, value) in extra {
        let _ = writeln!(out, "envoy_{} {value}", name.replace(['.', '-'], "_"));
    }
    let mut by_stat: BTreeMap<&str, Vec<&ClusterGauge>> = BTreeMap::new();
    for g in gauges {
        by_stat.entry(g.stat).or_default().push(g);
    }
    for (stat, family) in by_stat {
        let name = format!("envoy_cluster_{}", stat.replace('.', "_"));
        let _ = writeln!(out, "# HELP {name} Envoy's cluster gauge {stat}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for g in family {
            let _ = writeln!(out, "{name}{{{}}} {}", cluster_label(&g.cluster), g.value);
        }
    }
    out
}

/// Label pairs of an escaped label set, values unescaped.
fn labels(text: &str) -> Vec<(&str, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                _ => value.push(c),
            }
        }
        out.push((key.trim_start_matches(','), value));
        rest = &after[end..];
    }
    out
}

/// The Envoy stat name of a sample. Envoy's own stats put the cluster after the scope and
/// a response code or class at the end (`cluster.<cluster_name>.upstream_rq_200`); Istio's
/// stats are `istiocustom.` plus the name, then each tag's name and value, an empty value
/// left out, as Istio's Envoy prints them.
fn envoy_name(sample: &str, labels: &[(&str, String)]) -> String {
    if let Some((scope, tail)) = sample
        .strip_prefix("envoy_")
        .and_then(|rest| rest.split_once('_'))
    {
        let mut name = scope.to_owned();
        let mut suffix = String::new();
        for (key, value) in labels {
            if key.starts_with("response_code") {
                suffix.push('_');
                suffix.push_str(value);
            } else {
                name.push('.');
                name.push_str(value);
            }
        }
        name.push('.');
        // `upstream_rq_xx` stands for the class in Envoy's own name.
        name.push_str(tail.strip_suffix("_xx").unwrap_or(tail));
        name.push_str(&suffix);
        return name;
    }
    let mut name = if sample.starts_with("istio_") {
        format!("istiocustom.{sample}")
    } else {
        sample.to_owned()
    };
    for (key, value) in labels {
        name.push('.');
        name.push_str(key);
        if !value.is_empty() {
            name.push('.');
            name.push_str(value);
        }
    }
    name
}

/// The quantiles Envoy prints for a histogram, in percent.
const QUANTILES: [f64; 10] = [0.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 100.0];

/// One labelled series of a histogram: cumulative counts per upper bound.
#[derive(Debug, Default)]
struct Buckets {
    bounds: Vec<(f64, f64)>,
    count: f64,
}

impl Buckets {
    /// The `q`th percentile, interpolated linearly within its bucket as Prometheus'
    /// `histogram_quantile` does; the open last bucket answers its lower bound.
    fn percentile(&self, q: f64) -> f64 {
        let rank = q / 100.0 * self.count;
        let mut lower = (0.0, 0.0);
        for &(bound, cumulative) in &self.bounds {
            if cumulative > 0.0 && cumulative >= rank {
                if bound.is_infinite() {
                    return lower.0;
                }
                let share = (rank - lower.1) / (cumulative - lower.1);
                return lower.0 + (bound - lower.0) * share;
            }
            lower = (bound, cumulative);
        }
        lower.0
    }

    /// Envoy's text form: `P0(interval,cumulative) P25(...) ...`. portcullis keeps no
    /// flush intervals, so the interval value is `nan`, as Envoy prints before its first flush.
    fn envoy(&self) -> String {
        if self.count == 0.0 {
            return "No recorded values".to_owned();
        }
        let mut out = String::new();
        for q in QUANTILES {
            let _ = write!(out, "P{q}(nan,{}) ", self.percentile(q));
        }
        out.pop();
        out
    }
}

/// Adds the registry's samples to `stats` (counters and gauges) and `histograms`, keyed by
/// their Envoy names; every cluster `gauges` are for gets each per-cluster counter, at zero
/// until it counts (unless `stats` holds one), as Envoy's `/stats` lists them.
pub fn envoy_stats(
    registry: &Registry,
    gauges: &[ClusterGauge],
    stats: &mut BTreeMap<String, String>,
    histograms: &mut BTreeMap<String, String>,
) {
    let text = openmetrics(registry);
    let clusters = cluster_labels(gauges);
    for mut family in families(&text) {
        if family.kind != Kind::Histogram {
            // The zeros come after the counted samples, and do not replace a value `stats`
            // already holds for the name.
            let counted = family.samples.len();
            zero_for_clusters(&mut family, &clusters);
            for (i, s) in family.samples.iter().enumerate() {
                let name = envoy_name(s.name, &labels(s.labels));
                if i < counted {
                    stats.insert(name, s.value.to_owned());
                } else {
                    stats.entry(name).or_insert_with(|| s.value.to_owned());
                }
            }
            continue;
        }
        let mut series: BTreeMap<String, Buckets> = BTreeMap::new();
        for s in &family.samples {
            let mut pairs = labels(s.labels);
            let le = pairs
                .iter()
                .position(|(k, _)| *k == "le")
                .map(|i| pairs.remove(i).1);
            let value: f64 = s.value.parse().unwrap_or(0.0);
            let entry = series.entry(envoy_name(family.name, &pairs)).or_default();
            match (s.name.strip_prefix(family.name), le) {
                (Some("_bucket"), Some(le)) => {
                    let bound = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap_or(f64::INFINITY)
                    };
                    entry.bounds.push((bound, value));
                }
                (Some("_count"), _) => entry.count = value,
                _ => {}
            }
        }
        for (name, buckets) in series {
            histograms.insert(name, buckets.envoy());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::collector::Collector;
    use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family as MetricFamily;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::Histogram;

    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    struct Labels {
        destination_service: String,
        response_code: u16,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    struct ClusterLabels {
        cluster_name: String,
    }

    /// A counter under a name ending in `_total`, as the proxy registers Envoy's.
    #[derive(Debug)]
    struct Total<M>(&'static str, M);

    impl<M: EncodeMetric + std::fmt::Debug + Send + Sync + 'static> Collector for Total<M> {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            let metric =
                encoder.encode_descriptor(self.0, "Counted", None, self.1.metric_type())?;
            self.1.encode(metric)
        }
    }

    fn registry() -> Registry {
        let mut registry = Registry::default();
        let requests = MetricFamily::<Labels, Counter>::default();
        let durations = MetricFamily::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new([1.0, 10.0, 100.0])
        });
        let upstream = MetricFamily::<ClusterLabels, Counter>::default();
        let overflow = Counter::<u64>::default();
        let dropped = Counter::<u64>::default();
        let open = Gauge::<i64>::default();
        registry.register_collector(Box::new(Total("istio_requests_total", requests.clone())));
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration",
            durations.clone(),
        );
        registry.register_collector(Box::new(Total(
            "envoy_cluster_upstream_rq_total",
            upstream.clone(),
        )));
        registry.register("envoy_listener_overflow", "Refused", overflow.clone());
        registry.register("portcullis_dropped", "Dropped", dropped.clone());
        registry.register("open_connections", "Open", open.clone());
        let ok = Labels {
            destination_service: "app.internal.com".into(),
            response_code: 200,
        };
        requests.get_or_create(&ok).inc_by(3);
        let odd = Labels {
            destination_service: "quote\"back\\slash".into(),
            response_code: 502,
        };
        requests.get_or_create(&odd).inc();
        for ms in [0.5, 5.0, 5.0, 50.0] {
            durations.get_or_create(&ok).observe(ms);
        }
        upstream
            .get_or_create(&ClusterLabels {
                cluster_name: "outbound|80||app.internal.com".into(),
            })
            .inc_by(2);
        overflow.inc();
        open.set(4);
        registry
    }

    #[test]
    fn prometheus_names_envoys_counters_exactly_and_has_no_eof() {
        let text = prometheus(&registry(), &[], &[]);
        assert!(text.contains("# TYPE istio_requests_total counter\n"));
        assert!(text.contains("# HELP istio_requests_total Counted"));
        assert!(text.contains(
            "istio_requests_total{destination_service=\"app.internal.com\",response_code=\"200\"} 3\n"
        ));
        assert!(text.contains("# TYPE envoy_listener_overflow counter\n"));
        assert!(text.contains("\nenvoy_listener_overflow 1\n"));
        assert!(
            text.contains("# TYPE portcullis_dropped_total counter\nportcullis_dropped_total 0\n")
        );
        assert!(text.contains("# TYPE istio_request_duration_milliseconds histogram\n"));
        assert!(text.contains("# TYPE open_connections gauge\nopen_connections 4\n"));
        assert!(!text.contains("# EOF"));
        assert!(!text.contains("# UNIT"));
    }

    #[test]
    fn every_cluster_gets_each_per_cluster_counter_at_zero() {
        let gauge = |cluster: &str| ClusterGauge {
            cluster: cluster.into(),
            stat: "membership_total",
            value: 1,
        };
        let gauges = [
            gauge("outbound|80||app.internal.com"),
            gauge("BlackHoleCluster"),
        ];
        let text = prometheus(&registry(), &[], &gauges);
        assert!(text.contains(
            "envoy_cluster_upstream_rq_total{cluster_name=\"outbound|80||app.internal.com\"} 2\n"
        ));
        assert!(
            text.contains("envoy_cluster_upstream_rq_total{cluster_name=\"BlackHoleCluster\"} 0\n")
        );
        assert_eq!(text.matches("envoy_cluster_upstream_rq_total{").count(), 2);
        // And in `/stats`, as Envoy's lists every cluster's counters.
        let mut stats = BTreeMap::new();
        envoy_stats(&registry(), &gauges, &mut stats, &mut BTreeMap::new());
        let get = |name: &str| stats.get(name).map(String::as_str);
        assert_eq!(
            get("cluster.outbound|80||app.internal.com.upstream_rq_total"),
            Some("2")
        );
        assert_eq!(get("cluster.BlackHoleCluster.upstream_rq_total"), Some("0"));
    }

    #[test]
    fn counters_from_outside_the_registry_follow_under_envoys_names() {
        let extra = [("cluster_manager.cds.update_success".to_owned(), 3)];
        let text = prometheus(&registry(), &extra, &[]);
        assert!(text.ends_with("envoy_cluster_manager_cds_update_success 3\n"));
    }

    #[test]
    fn prometheus_keeps_every_sample_and_its_type_line_first() {
        let text = prometheus(&registry(), &[], &[]);
        let mut typed = "";
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed = rest.split(' ').next().unwrap_or_default();
            } else if !line.starts_with('#') {
                let name = sample(line).expect("a sample line").name;
                assert!(
                    name == typed
                        || ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| name.strip_suffix(s) == Some(typed)),
                    "{name} under # TYPE {typed}"
                );
            }
        }
        let samples = text.lines().filter(|l| !l.starts_with('#')).count();
        let source = openmetrics(&registry());
        assert_eq!(
            samples,
            source.lines().filter(|l| !l.starts_with('#')).count()
        );
    }

    #[test]
    fn escaped_label_values_survive_both_forms() {
        let text = prometheus(&registry(), &[], &[]);
        assert!(text.contains("destination_service=\"quote\\\"back\\\\slash\""));
        let mut stats = BTreeMap::new();
        envoy_stats(&registry(), &[], &mut stats, &mut BTreeMap::new());
        assert_eq!(
            stats.get(
                "istiocustom.istio_requests_total.destination_service.quote\"back\\slash.response_code.502"
            ),
            Some(&"1".to_owned())
        );
    }

    #[test]
    fn envoy_names_follow_envoy_and_istio() {
        let mut stats = BTreeMap::new();
        let mut histograms = BTreeMap::new();
        envoy_stats(&registry(), &[], &mut stats, &mut histograms);
        let get = |name: &str| stats.get(name).map(String::as_str);
        assert_eq!(
            get(
                "istiocustom.istio_requests_total.destination_service.app.internal.com.response_code.200"
            ),
            Some("3")
        );
        assert_eq!(
            get("cluster.outbound|80||app.internal.com.upstream_rq_total"),
            Some("2")
        );
        assert_eq!(get("listener.overflow"), Some("1"));
        assert_eq!(get("open_connections"), Some("4"));
        let histogram = histograms
            .get("istiocustom.istio_request_duration_milliseconds.destination_service.app.internal.com.response_code.200")
            .expect("the duration histogram");
        let want = [0.0, 1.0, 5.5, 10.0, 64.0, 82.0, 96.4, 98.2, 99.64, 100.0];
        let got: Vec<(&str, f64)> = histogram
            .split(' ')
            .map(|p| {
                let (q, rest) = p.split_once("(nan,").expect("P<q>(nan,<value>)");
                (q, rest.trim_end_matches(')').parse().expect("a number"))
            })
            .collect();
        assert_eq!(got.len(), want.len(), "{histogram}");
        for ((q, value), (percent, want)) in got.iter().zip(QUANTILES.iter().zip(want)) {
            assert_eq!(*q, format!("P{percent}"));
            assert!((value - want).abs() < 1e-9, "{q}: {value}, want {want}");
        }
    }

    #[test]
    fn empty_histograms_say_so() {
        assert_eq!(Buckets::default().envoy(), "No recorded values");
    }

    #[test]
    fn values_beyond_the_last_bound_answer_that_bound() {
        let buckets = Buckets {
            bounds: vec![(1.0, 0.0), (10.0, 1.0), (f64::INFINITY, 2.0)],
            count: 2.0,
        };
        assert_eq!(buckets.percentile(100.0), 10.0);
        assert_eq!(buckets.percentile(0.0), 1.0);
    }

    #[test]
    fn label_values_may_hold_commas_quotes_and_equals() {
        assert_eq!(
            labels("a=\"x,y=\\\"z\",b=\"\\\\n\\n\",c=\"\""),
            vec![
                ("a", "x,y=\"z".to_owned()),
                ("b", "\\n\n".to_owned()),
                ("c", String::new()),
            ]
        );
    }

    #[test]
    fn sample_lines_split_around_braces_in_values() {
        assert_eq!(
            sample("x_total{a=\"}{ \\\" \"} 7 # {trace=\"1\"} 1"),
            Some(Sample {
                name: "x_total",
                labels: "a=\"}{ \\\" \"",
                value: "7",
            })
        );
        assert_eq!(sample("garbage"), None);
    }
}

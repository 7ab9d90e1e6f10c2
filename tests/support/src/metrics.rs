//! Metric scraping for tests: Prometheus text (the API server's `/metrics`) and OpenMetrics text
//! (the manager's `/metrics`, an in-process registry's `encode()`) parsed into samples with
//! labels, so a test asks for a value by name and labels instead of matching lines.

use std::collections::BTreeMap;

use anyhow::{Context, Result, anyhow, bail};
use kube::Client;

/// One sample: a metric name (with any `_total`, `_bucket`, ... suffix as written), its labels
/// and its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Name as written on the sample line.
    pub name: String,
    /// Labels, by name.
    pub labels: BTreeMap<String, String>,
    /// Value (`+Inf`, `-Inf` and `NaN` included).
    pub value: f64,
}

impl Sample {
    /// Whether every `(name, value)` in `want` is one of this sample's labels.
    pub fn has_labels(&self, want: &[(&str, &str)]) -> bool {
        want.iter()
            .all(|(k, v)| self.labels.get(*k).is_some_and(|x| x == v))
    }
}

/// Every sample of one scrape.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// The samples, in the order they were written.
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses Prometheus or OpenMetrics text. Comment lines (`# TYPE`, `# HELP`, `# EOF`) are
    /// skipped; a line that is not a sample is an error naming it.
    pub fn parse(text: &str) -> Result<Metrics> {
        let mut samples = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            samples.push(parse_line(line).with_context(|| format!("metric line {line:?}"))?);
        }
        Ok(Metrics { samples })
    }

    /// The samples named `name` that carry all of `labels` (other labels may differ).
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples
            .iter()
            .filter(move |s| s.name == name && s.has_labels(labels))
    }

    /// The value of the first sample named `name` carrying all of `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.matching(name, labels).next().map(|s| s.value)
    }

    /// The sum over every sample named `name` carrying all of `labels` (0 if there is none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// The samples named `name` carrying all of `labels`, summed per value of label `by`.
    pub fn sum_by(&self, name: &str, labels: &[(&str, &str)], by: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for s in self.matching(name, labels) {
            let k = s.labels.get(by).cloned().unwrap_or_default();
            *out.entry(k).or_insert(0.0) += s.value;
        }
        out
    }
}

fn parse_line(line: &str) -> Result<Sample> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => bail!("no value"),
    };
    let mut labels = BTreeMap::new();
    let rest = if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let end = loop {
            // Skip separators, then read `name="value"` or the closing brace.
            while let Some((_, c)) = chars.peek() {
                if *c == ',' || *c == ' ' {
                    chars.next();
                } else {
                    break;
                }
            }
            let Some((i, c)) = chars.next() else {
                bail!("unterminated labels")
            };
            if c == '}' {
                break i + 1;
            }
            let mut key = String::from(c);
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                bail!("label {key} without a quoted value");
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    None => bail!("unterminated value of label {key}"),
                    Some((_, '"')) => break,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => bail!("unterminated value of label {key}"),
                    },
                    Some((_, c)) => value.push(c),
                }
            }
            labels.insert(key.trim().to_string(), value);
        };
        &body[end..]
    } else {
        rest
    };
    // The value, then an optional timestamp (or OpenMetrics exemplar after `#`).
    let value = rest
        .split_whitespace()
        .next()
        .ok_or_else(|| anyhow!("no value"))?;
    let value = match value {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().with_context(|| format!("value {v:?}"))?,
    };
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Scrapes `url` (e.g. `http://127.0.0.1:10270/metrics`); `None` while it does not answer 200
/// with parseable text, so tests can poll it.
pub async fn scrape(url: &str) -> Option<Metrics> {
    let r = reqwest::get(url).await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    Metrics::parse(&r.text().await.ok()?).ok()
}

/// Scrapes a manager serving on `addr` (its `--http-address`).
pub async fn scrape_manager(addr: &str) -> Option<Metrics> {
    scrape(&format!("http://{addr}/metrics")).await
}

/// Scrapes the API server's own `/metrics` through `client` (which must be allowed to; the
/// control plane's admin is).
pub async fn scrape_apiserver(client: &Client) -> Result<Metrics> {
    let req = http::Request::get("/metrics")
        .body(Vec::new())
        .context("building the /metrics request")?;
    let text = client
        .request_text(req)
        .await
        .context("GET /metrics from the API server")?;
    Metrics::parse(&text)
}

/// The API server's in-flight WATCH requests per resource (summed over group, version, scope
/// and component), from its `apiserver_longrunning_requests` gauge. Counts every client's
/// watches, the API server's own loopback informers included.
pub async fn apiserver_watches(client: &Client) -> Result<BTreeMap<String, i64>> {
    let m = scrape_apiserver(client).await?;
    Ok(m.sum_by(
        "apiserver_longrunning_requests",
        &[("verb", "WATCH")],
        "resource",
    )
    .into_iter()
    .map(|(k, v)| (k, v.round() as i64))
    .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_and_openmetrics_lines() {
        let text = r#"# HELP apiserver_longrunning_requests [STABLE] Gauge
# TYPE apiserver_longrunning_requests gauge
apiserver_longrunning_requests{component="apiserver",group="",resource="pods",scope="cluster",subresource="",verb="WATCH",version="v1"} 1
apiserver_longrunning_requests{component="apiserver",group="",resource="pods",scope="namespace",subresource="",verb="WATCH",version="v1"} 2
apiserver_longrunning_requests{component="apiserver",group="",resource="pods",scope="cluster",subresource="log",verb="GET",version="v1"} 5
service_controller_manager_reconcile_total{controller="endpointslice"} 7
odd{msg="a \"quoted\", {braced} \\ value\n"} 1.5 1700000000
workqueue_depth 3
le_bucket{le="+Inf"} +Inf
# EOF
"#;
        let m = Metrics::parse(text).expect("parse");
        assert_eq!(m.samples.len(), 7);
        assert_eq!(
            m.get(
                "service_controller_manager_reconcile_total",
                &[("controller", "endpointslice")]
            ),
            Some(7.0)
        );
        assert_eq!(
            m.sum("apiserver_longrunning_requests", &[("verb", "WATCH")]),
            3.0
        );
        assert_eq!(
            m.sum_by(
                "apiserver_longrunning_requests",
                &[("verb", "WATCH")],
                "resource"
            ),
            BTreeMap::from([("pods".to_string(), 3.0)])
        );
        assert_eq!(
            m.samples[4].labels["msg"],
            "a \"quoted\", {braced} \\ value\n"
        );
        assert_eq!(m.get("odd", &[]), Some(1.5));
        assert_eq!(m.get("workqueue_depth", &[]), Some(3.0));
        assert_eq!(m.get("le_bucket", &[("le", "+Inf")]), Some(f64::INFINITY));
        assert_eq!(m.get("workqueue_depth", &[("name", "x")]), None);
        assert!(Metrics::parse("broken{a=1} 2").is_err());
    }
}

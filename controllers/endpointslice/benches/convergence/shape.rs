//! What the bench loads: how many Nodes, Services and pods, and the names, labels and IPs of
//! the pods, so the loader, the convergence check and the readiness flips agree.

/// The two modes of the bench.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// 2,000 Services of 5 pods and one of 10,000 over 50 Nodes; cold start, steady state,
    /// readiness flips.
    Default,
    /// The Kubernetes scalability envelope (5,000 Nodes, 150,000 Pods, 10,000 Services);
    /// cold start and a restart of each side.
    Envelope,
    /// The default mode's objects; readiness churn at 1000 QPS, then at the default 20/30.
    Latency,
}

/// The objects of one run.
#[derive(Clone, Debug)]
pub struct Shape {
    /// Which mode this is.
    pub mode: Mode,
    /// Nodes the pods are spread over.
    pub nodes: usize,
    /// Services with few pods each.
    pub small_services: usize,
    /// Pods per small Service.
    pub small_pods: usize,
    /// Services with many pods each.
    pub big_services: usize,
    /// Pods per big Service.
    pub big_pods: usize,
}

/// Endpoints per slice (upstream's default `--max-endpoints-per-slice`, and ours).
const PER_SLICE: usize = 100;

impl Shape {
    /// The shape selected by `SCM_BENCH_MODE` (`envelope`, or the default) and, for the
    /// envelope, `SCM_BENCH_SCALE` (a factor in (0, 1] on the Node and Service counts, for a
    /// smoke run; pods per Service stay as they are).
    pub fn from_env() -> anyhow::Result<Shape> {
        let mode = std::env::var("SCM_BENCH_MODE").unwrap_or_default();
        match mode.as_str() {
            "" | "default" => Ok(Shape {
                mode: Mode::Default,
                nodes: 50,
                small_services: 2000,
                small_pods: 5,
                big_services: 1,
                big_pods: 10_000,
            }),
            "envelope" => {
                let scale: f64 = match std::env::var("SCM_BENCH_SCALE") {
                    Ok(s) => s.parse()?,
                    Err(_) => 1.0,
                };
                if !(scale > 0.0 && scale <= 1.0) {
                    anyhow::bail!("SCM_BENCH_SCALE must be in (0, 1], got {scale}");
                }
                let n = |full: usize| ((full as f64 * scale).round() as usize).max(1);
                // 9,990 Services of 12 pods and 10 of 3,012: 150,000 pods, most Services
                // small and a few past 1,000 pods, as the scalability thresholds describe.
                Ok(Shape {
                    mode: Mode::Envelope,
                    nodes: n(5000).max(3),
                    small_services: n(9990),
                    small_pods: 12,
                    big_services: n(10),
                    big_pods: 3012,
                })
            }
            "latency" => {
                let scale: f64 = match std::env::var("SCM_BENCH_SCALE") {
                    Ok(s) => s.parse()?,
                    Err(_) => 1.0,
                };
                if !(scale > 0.0 && scale <= 1.0) {
                    anyhow::bail!("SCM_BENCH_SCALE must be in (0, 1], got {scale}");
                }
                let n = |full: usize| ((full as f64 * scale).round() as usize).max(1);
                // The default mode's objects (the table), scaled for a smoke run.
                Ok(Shape {
                    mode: Mode::Latency,
                    nodes: n(50).max(3),
                    small_services: n(2000),
                    small_pods: 5,
                    big_services: 1,
                    big_pods: n(10_000),
                })
            }
            other => {
                anyhow::bail!("SCM_BENCH_MODE={other}: expected `default`, `envelope` or `latency`")
            }
        }
    }

    /// All pods.
    pub fn total_pods(&self) -> usize {
        self.small_services * self.small_pods + self.big_services * self.big_pods
    }

    /// All Services.
    pub fn services(&self) -> usize {
        self.small_services + self.big_services
    }

    /// Slices needed at least: every Service's endpoints packed 100 to a slice.
    pub fn minimum_slices(&self) -> usize {
        self.small_services * self.small_pods.div_ceil(PER_SLICE)
            + self.big_services * self.big_pods.div_ceil(PER_SLICE)
    }

    /// The Service (and its `app` label) of pod `i`.
    pub fn service_of(&self, i: usize) -> String {
        let small = self.small_services * self.small_pods;
        if i < small {
            format!("small-{}", i / self.small_pods)
        } else {
            format!("big-{}", (i - small) / self.big_pods)
        }
    }

    /// The name of pod `i`.
    pub fn pod_name(&self, i: usize) -> String {
        let small = self.small_services * self.small_pods;
        if i < small {
            format!("small-{}-{}", i / self.small_pods, i % self.small_pods)
        } else {
            let j = i - small;
            format!("big-{}-{}", j / self.big_pods, j % self.big_pods)
        }
    }

    /// The IP of pod `i` (unique up to 4 million pods).
    pub fn pod_ip(&self, i: usize) -> String {
        format!("10.{}.{}.{}", 64 + i / 65536, (i / 256) % 256, i % 256)
    }

    /// The Node of pod `i`.
    pub fn node_of(&self, i: usize) -> String {
        format!("node-{}", i % self.nodes)
    }

    /// A one-line description for the report.
    pub fn describe(&self) -> String {
        format!(
            "{} Services x {} pods + {} x {} pods ({} pods), {} nodes",
            self.small_services,
            self.small_pods,
            self.big_services,
            self.big_pods,
            self.total_pods(),
            self.nodes
        )
    }
}

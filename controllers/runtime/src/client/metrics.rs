//! client-go's REST client metrics, under its names: request counts by code and method, request
//! latency and rate-limiter latency by verb. The client is built before any registry exists
//! (and once per process), so the families are process-wide and every [`crate::Metrics`]
//! registers them. They split a write's time into the wait for a token and the round trip.

use std::future::Future;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::time::Instant;
use tower::{Layer, Service};

/// Labels of the latency histograms: the HTTP method, as client-go's `verb`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerbLabel {
    /// `GET`, `POST`, `PUT`, `PATCH` or `DELETE`.
    pub verb: String,
}

/// Labels of the request counter, as client-go's `rest_client_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    /// The HTTP status code, or `<error>` when no response came.
    pub code: String,
    /// The HTTP method.
    pub method: String,
}

/// The process's REST client metric families.
pub struct ClientMetrics {
    /// `rest_client_requests_total`.
    pub requests: Family<CodeLabels, Counter>,
    /// `rest_client_request_duration_seconds`: from sending to the response's headers.
    pub request_duration: Family<VerbLabel, Histogram>,
    /// `rest_client_rate_limiter_duration_seconds`: the wait for a token of the client limit.
    pub rate_limiter_duration: Family<VerbLabel, Histogram>,
}

/// client-go's buckets for both latency histograms.
const BUCKETS: [f64; 12] = [
    0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0,
];

fn latency() -> Histogram {
    Histogram::new(BUCKETS)
}

/// The process-wide families.
pub static CLIENT: LazyLock<ClientMetrics> = LazyLock::new(|| ClientMetrics {
    requests: Family::default(),
    request_duration: Family::new_with_constructor(latency),
    rate_limiter_duration: Family::new_with_constructor(latency),
});

/// Registers the process-wide families in `registry`.
pub fn register(registry: &mut Registry) {
    registry.register(
        "rest_client_requests",
        "Number of HTTP requests, partitioned by status code and method",
        CLIENT.requests.clone(),
    );
    registry.register(
        "rest_client_request_duration_seconds",
        "Request latency in seconds, broken down by verb",
        CLIENT.request_duration.clone(),
    );
    registry.register(
        "rest_client_rate_limiter_duration_seconds",
        "Client side rate limiter latency in seconds, broken down by verb",
        CLIENT.rate_limiter_duration.clone(),
    );
    super::dry_run::register(registry);
}

/// What the rate limiter needs to know of a request to label its wait.
pub trait RequestVerb {
    /// The request's HTTP method.
    fn verb(&self) -> &str;
}

impl<B> RequestVerb for http::Request<B> {
    fn verb(&self) -> &str {
        self.method().as_str()
    }
}

/// Records how long a request of `verb` waited for its token.
pub fn observe_limiter_wait(verb: &str, waited: Duration) {
    CLIENT
        .rate_limiter_duration
        .get_or_create(&VerbLabel {
            verb: verb.to_string(),
        })
        .observe(waited.as_secs_f64());
}

/// Tower layer recording each request's count and round trip.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestMetricsLayer;

impl<S> Layer<S> for RequestMetricsLayer {
    type Service = RequestMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestMetrics { inner }
    }
}

/// The service [`RequestMetricsLayer`] wraps around the HTTP stack.
#[derive(Clone)]
pub struct RequestMetrics<S> {
    inner: S,
}

type Boxed<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B, RB> Service<http::Request<B>> for RequestMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: 'static,
    S::Error: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Boxed<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.method().as_str().to_string();
        let fut = self.inner.call(req);
        Box::pin(async move {
            // From the first poll: an outer token bucket polls this only once it has a token.
            let start = Instant::now();
            let res = fut.await;
            let code = match &res {
                Ok(r) => r.status().as_u16().to_string(),
                Err(_) => "<error>".to_string(),
            };
            CLIENT
                .request_duration
                .get_or_create(&VerbLabel {
                    verb: method.clone(),
                })
                .observe(start.elapsed().as_secs_f64());
            CLIENT
                .requests
                .get_or_create(&CodeLabels { code, method })
                .inc();
            res
        })
    }
}

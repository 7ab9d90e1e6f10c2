//! A kube `Client` with client-go's client-side rate limit (`--kube-api-qps`, `--kube-api-burst`):
//! a token bucket in front of the HTTP stack. kube-rs has none built in, and without one a
//! resync of a large cluster would hit the API server's priority-and-fairness limits instead.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use kube::client::ClientBuilder;
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

pub mod metrics;

use metrics::{RequestMetricsLayer, RequestVerb, observe_limiter_wait};

/// The longest one request waits for a token, whatever the rate.
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// A token bucket: `qps` tokens a second, at most `burst` saved up.
#[derive(Clone, Copy, Debug)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub qps: f64,
    /// Requests allowed at once after idling.
    pub burst: u32,
}

/// The User-Agent of every request: the API server names the field manager of our writes
/// after it (its part before the first `/`), as it names kube-controller-manager's, so
/// managedFields and audit logs say `service-controller-manager` instead of `unknown`.
pub const USER_AGENT: &str = concat!("service-controller-manager/v", env!("CARGO_PKG_VERSION"));

/// Builds a client for `config` limited by `limit` (no limit when qps <= 0), sending
/// [`USER_AGENT`] and recording client-go's REST client metrics ([`metrics`]).
pub fn rate_limited_client(
    mut config: kube::Config,
    limit: RateLimit,
) -> Result<kube::Client, kube::Error> {
    config
        .headers
        .retain(|(k, _)| k != http::header::USER_AGENT);
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(USER_AGENT),
    ));
    let builder = ClientBuilder::try_from(config)?.with_layer(&RequestMetricsLayer);
    if limit.qps <= 0.0 {
        return Ok(builder.build());
    }
    Ok(builder.with_layer(&TokenBucketLayer { limit }).build())
}

/// Tower layer adding a token bucket.
#[derive(Clone, Copy, Debug)]
pub struct TokenBucketLayer {
    limit: RateLimit,
}

impl<S> Layer<S> for TokenBucketLayer {
    type Service = TokenBucket<S>;
    fn layer(&self, inner: S) -> Self::Service {
        let burst = f64::from(self.limit.burst.max(1));
        TokenBucket {
            inner,
            qps: self.limit.qps,
            burst,
            tokens: burst,
            last: Instant::now(),
            sleep: None,
            have_token: false,
            waiting_since: None,
            waited: Duration::ZERO,
        }
    }
}

/// The service the layer wraps around the HTTP stack.
pub struct TokenBucket<S> {
    inner: S,
    qps: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    have_token: bool,
    /// When the request now waiting first asked for a token.
    waiting_since: Option<Instant>,
    /// How long the request holding the token waited for it.
    waited: Duration,
}

impl<S, R> Service<R> for TokenBucket<S>
where
    S: Service<R>,
    R: RequestVerb,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // kube's Client puts a Buffer in front of this service, so one task calls poll_ready
        // and call in turn; waiting here queues requests in that buffer, as client-go's
        // limiter makes callers wait.
        if !self.have_token {
            let since = *self.waiting_since.get_or_insert_with(Instant::now);
            loop {
                if let Some(s) = self.sleep.as_mut() {
                    if s.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    self.sleep = None;
                }
                let now = Instant::now();
                let elapsed = now.duration_since(self.last).as_secs_f64();
                self.last = now;
                self.tokens = (self.tokens + elapsed * self.qps).min(self.burst);
                if self.tokens >= 1.0 {
                    self.tokens -= 1.0;
                    self.have_token = true;
                    self.waited = now.duration_since(since);
                    self.waiting_since = None;
                    break;
                }
                let wait = (1.0 - self.tokens) / self.qps;
                // A rate too small to wait for (the flag parser refuses those) must not panic
                // inside the client's worker, which would fail every later API call.
                let wait = Duration::try_from_secs_f64(wait).unwrap_or(MAX_WAIT);
                self.sleep = Some(Box::pin(tokio::time::sleep(wait.min(MAX_WAIT))));
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        self.have_token = false;
        observe_limiter_wait(req.verb(), self.waited);
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::ServiceExt;

    impl RequestVerb for u32 {
        fn verb(&self) -> &str {
            "TEST"
        }
    }

    #[derive(Clone)]
    struct Echo;
    impl Service<u32> for Echo {
        type Response = u32;
        type Error = Infallible;
        type Future = std::future::Ready<Result<u32, Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, r: u32) -> Self::Future {
            std::future::ready(Ok(r))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_qps() {
        let mut svc = TokenBucketLayer {
            limit: RateLimit {
                qps: 10.0,
                burst: 5,
            },
        }
        .layer(Echo);
        let start = Instant::now();
        for i in 0..5 {
            assert!(svc.ready().await.ok().map(|s| s.call(i)).is_some());
        }
        assert!(start.elapsed() < Duration::from_millis(1));
        for i in 0..10 {
            let _ = svc.ready().await.map(|s| s.call(i));
        }
        // Ten more at 10 qps take about a second of (paused, virtual) time.
        let e = start.elapsed();
        assert!(
            e >= Duration::from_millis(950) && e <= Duration::from_millis(1100),
            "{e:?}"
        );
    }

    struct Verb(&'static str);
    impl RequestVerb for Verb {
        fn verb(&self) -> &str {
            self.0
        }
    }
    #[derive(Clone)]
    struct Sink;
    impl Service<Verb> for Sink {
        type Response = ();
        type Error = Infallible;
        type Future = std::future::Ready<Result<(), Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: Verb) -> Self::Future {
            std::future::ready(Ok(()))
        }
    }

    fn exported(name: &str, verb: &str) -> f64 {
        let mut r = prometheus_client::registry::Registry::default();
        metrics::register(&mut r);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        let prefix = format!("{name}{{verb=\"{verb}\"}} ");
        out.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1.0)
    }

    /// The wait for a token is what separates a saturated client budget from a slow API
    /// server in a latency breakdown; it is exported as client-go exports it.
    #[tokio::test(start_paused = true)]
    async fn each_requests_wait_for_a_token_is_recorded_under_its_verb() {
        let mut svc = TokenBucketLayer {
            limit: RateLimit {
                qps: 10.0,
                burst: 1,
            },
        }
        .layer(Sink);
        for _ in 0..3 {
            let _ = svc.ready().await.map(|s| s.call(Verb("WAITTEST")));
        }
        let count = exported(
            "rest_client_rate_limiter_duration_seconds_count",
            "WAITTEST",
        );
        let sum = exported("rest_client_rate_limiter_duration_seconds_sum", "WAITTEST");
        assert_eq!(count, 3.0);
        // The first from the burst, then 100 ms each at 10 qps (paused, virtual time).
        assert!((0.19..0.21).contains(&sum), "{sum}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_tiny_rate_waits_instead_of_panicking() {
        // Duration::from_secs_f64(1e300) panicked here, inside kube's buffer worker.
        let mut svc = TokenBucketLayer {
            limit: RateLimit {
                qps: 1e-300,
                burst: 1,
            },
        }
        .layer(Echo);
        assert!(svc.ready().await.ok().map(|s| s.call(1)).is_some());
        let second = tokio::time::timeout(Duration::from_secs(10), svc.ready()).await;
        assert!(second.is_err(), "the second request waits for a token");
    }
}

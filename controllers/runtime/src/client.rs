//! A kube `Client` with client-go's client-side rate limit (`--kube-api-qps`, `--kube-api-burst`):
//! a token bucket in front of the HTTP stack. kube-rs has none built in, and without one a
//! resync of a large cluster would hit the API server's priority-and-fairness limits instead.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use kube::client::ClientBuilder;
use tower::{Layer, Service};

pub mod bucket;
pub mod dry_run;
pub mod metrics;

use bucket::Bucket;
pub use bucket::{Class, current_class, current_priority, with_class, with_priority};
use metrics::{RequestMetricsLayer, RequestVerb, observe_limiter_wait};

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

/// Tower layer adding a token bucket ([`bucket`]) in front of the HTTP stack.
#[derive(Clone, Copy, Debug)]
pub struct TokenBucketLayer {
    limit: RateLimit,
}

impl<S> Layer<S> for TokenBucketLayer {
    type Service = TokenBucket<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TokenBucket {
            inner,
            bucket: Arc::new(Bucket::new(self.limit)),
        }
    }
}

/// The service the layer wraps around the HTTP stack.
pub struct TokenBucket<S> {
    inner: S,
    bucket: Arc<Bucket>,
}

type Boxed<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, R> Service<R> for TokenBucket<S>
where
    S: Service<R>,
    S::Future: Send + 'static,
    R: RequestVerb,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Boxed<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        // kube's Client calls this from its Buffer's worker task, but the returned future is
        // polled by the caller's task: the wait happens there, in the caller's class
        // (`with_priority`), and the HTTP stack's future does nothing until polled after it.
        let verb = req.verb().to_string();
        let fut = self.inner.call(req);
        let bucket = self.bucket.clone();
        Box::pin(async move {
            let waited = bucket.acquire(current_class()).await;
            observe_limiter_wait(&verb, waited);
            fut.await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Priority;
    use std::convert::Infallible;
    use std::sync::Mutex;
    use std::time::Duration;
    use tokio::time::Instant;
    use tower::ServiceExt;

    struct Verb(&'static str);
    impl RequestVerb for Verb {
        fn verb(&self) -> &str {
            self.0
        }
    }

    /// Records the order in which requests reach the HTTP stack (when their future is polled
    /// after the token, as a lazy HTTP client sends them).
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<&'static str>>>);
    impl Service<Verb> for Sink {
        type Response = ();
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<(), Infallible>> + Send>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, v: Verb) -> Self::Future {
            let log = self.0.clone();
            Box::pin(async move {
                log.lock().unwrap().push(v.0);
                Ok(())
            })
        }
    }

    fn layered(qps: f64, burst: u32, sink: &Sink) -> TokenBucket<Sink> {
        TokenBucketLayer {
            limit: RateLimit { qps, burst },
        }
        .layer(sink.clone())
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
        let sink = Sink::default();
        let mut svc = layered(10.0, 1, &sink);
        for _ in 0..3 {
            let f = svc.ready().await.unwrap().call(Verb("WAITTEST"));
            f.await.unwrap();
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

    /// Requests are handed to the stack in one order (kube's buffer) but sent in the order the
    /// bucket grants tokens: an urgent request made later goes out first.
    #[tokio::test(start_paused = true)]
    async fn a_request_made_with_urgent_priority_is_sent_before_waiting_ordinary_ones() {
        let sink = Sink::default();
        let mut svc = layered(10.0, 1, &sink);
        svc.ready()
            .await
            .unwrap()
            .call(Verb("first"))
            .await
            .unwrap();
        let ordinary = svc.ready().await.unwrap().call(Verb("ordinary"));
        let urgent = svc.ready().await.unwrap().call(Verb("urgent"));
        let start = Instant::now();
        let o = tokio::spawn(ordinary);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let u = tokio::spawn(with_priority(Priority::Urgent, urgent));
        o.await.unwrap().unwrap();
        u.await.unwrap().unwrap();
        assert_eq!(*sink.0.lock().unwrap(), ["first", "urgent", "ordinary"]);
        assert!(start.elapsed() <= Duration::from_millis(201));
    }
}

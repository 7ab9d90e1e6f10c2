//! How AWS API errors become [`ProviderError`]s: by the API's error code (and the HTTP status
//! when there is no code), never by message text. The code and the SDK error are kept on the
//! result, so callers steer on [`ProviderError::has_code`].

use aws_sdk_elasticloadbalancingv2 as elbv2;
use elbv2::error::{ProvideErrorMetadata, SdkError};

use crate::provider::ProviderError;

/// Throttling codes across ELBv2 and EC2.
const THROTTLED: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
];

/// Codes saying the request itself is wrong for this Service: retrying cannot help until it
/// changes.
const PERMANENT: &[&str] = &[
    "ValidationError",
    "InvalidConfigurationRequest",
    "UnsupportedProtocol",
    "InvalidSubnet",
    "SubnetNotFound",
    "InvalidScheme",
    "AvailabilityZoneNotSupported",
];

/// How an error with this code and HTTP status is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// With backoff.
    Retryable,
    /// Not until the Service changes.
    Permanent,
    /// With backoff, as a throttle.
    Throttled,
}

/// The retry kind for an API error `code` (if any) answered with HTTP `status` (if any).
pub fn kind(code: Option<&str>, status: Option<u16>) -> Kind {
    match code {
        Some(c) if THROTTLED.contains(&c) => Kind::Throttled,
        Some(c) if PERMANENT.contains(&c) => Kind::Permanent,
        _ if status == Some(429) => Kind::Throttled,
        _ => Kind::Retryable,
    }
}

/// A [`ProviderError`] for a failed call of operation `op`, with the API's code and the SDK
/// error as its source.
pub(crate) fn classify<E>(op: &'static str, e: SdkError<E>) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = e.raw_response().map(|r| r.status().as_u16());
    // The API's code and message when there is one (short enough for an Event); the full
    // error chain only for transport failures.
    let msg = match (e.code(), e.message()) {
        (Some(c), Some(m)) => format!("{op}: {c}: {m}"),
        (Some(c), None) => format!("{op}: {c}"),
        _ => format!("{op}: {}", elbv2::error::DisplayErrorContext(&e)),
    };
    let err = match kind(e.code(), status) {
        Kind::Throttled => throttled(msg),
        Kind::Permanent => ProviderError::permanent(msg),
        Kind::Retryable => ProviderError::retryable(msg),
    };
    let err = match e.code() {
        Some(c) if !c.is_empty() => err.with_code(c),
        _ => err,
    };
    err.with_source(e)
}

/// A throttle with no hint: AWS APIs send no Retry-After, so the controller's backoff decides.
fn throttled(message: String) -> ProviderError {
    ProviderError::Throttled {
        message,
        code: None,
        retry_after: None,
        source: None,
    }
}

/// Whether the API answered with one of `codes`.
pub(crate) fn is_code<E: ProvideErrorMetadata>(e: &SdkError<E>, codes: &[&str]) -> bool {
    e.code().is_some_and(|c| codes.contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use elbv2::config::http::HttpResponse;
    use elbv2::error::ErrorMetadata;
    use elbv2::operation::describe_load_balancers::DescribeLoadBalancersError;

    fn service_error(code: Option<&str>, status: u16) -> SdkError<DescribeLoadBalancersError> {
        let mut meta = ErrorMetadata::builder().message("some text that must not matter");
        if let Some(c) = code {
            meta = meta.code(c);
        }
        let raw = HttpResponse::new(status.try_into().expect("status code"), "".into());
        SdkError::service_error(DescribeLoadBalancersError::generic(meta.build()), raw)
    }

    #[test]
    fn codes_map_to_retry_kinds() {
        for (code, status, want) in [
            (Some("Throttling"), 400, Kind::Throttled),
            (Some("ThrottlingException"), 400, Kind::Throttled),
            (Some("RequestLimitExceeded"), 503, Kind::Throttled),
            (Some("TooManyRequestsException"), 400, Kind::Throttled),
            (Some("ValidationError"), 400, Kind::Permanent),
            (Some("InvalidConfigurationRequest"), 400, Kind::Permanent),
            (Some("UnsupportedProtocol"), 400, Kind::Permanent),
            (Some("InvalidSubnet"), 400, Kind::Permanent),
            (Some("SubnetNotFound"), 400, Kind::Permanent),
            (Some("InvalidScheme"), 400, Kind::Permanent),
            (Some("AvailabilityZoneNotSupported"), 400, Kind::Permanent),
            (Some("TargetGroupNotFound"), 400, Kind::Retryable),
            (Some("InternalFailure"), 500, Kind::Retryable),
            (None, 429, Kind::Throttled),
            (None, 503, Kind::Retryable),
        ] {
            assert_eq!(kind(code, Some(status)), want, "{code:?} {status}");
            let e = classify("DescribeLoadBalancers", service_error(code, status));
            let got = match &e {
                ProviderError::Retryable { .. } => Kind::Retryable,
                ProviderError::Permanent { .. } => Kind::Permanent,
                ProviderError::Throttled { retry_after, .. } => {
                    assert_eq!(*retry_after, None);
                    Kind::Throttled
                }
            };
            assert_eq!(got, want, "{code:?} {status}: {e:?}");
            assert_eq!(e.code(), code, "the API's code is kept");
            assert!(
                std::error::Error::source(&e).is_some(),
                "the SDK error is kept as the source"
            );
            if let Some(c) = code {
                assert!(e.has_code(c));
                assert!(e.to_string().contains(c), "{e}");
            }
        }
    }

    #[test]
    fn message_text_never_decides() {
        // An error whose message names other codes is classified by its own code alone.
        let mut meta = ErrorMetadata::builder().message("Throttling: TargetGroupNotFound");
        meta = meta.code("SomethingElse");
        let raw = HttpResponse::new(400u16.try_into().expect("status"), "".into());
        let e = classify(
            "DescribeLoadBalancers",
            SdkError::service_error(DescribeLoadBalancersError::generic(meta.build()), raw),
        );
        assert!(matches!(e, ProviderError::Retryable { .. }), "{e:?}");
        assert!(!e.has_code("TargetGroupNotFound"));
        assert!(!e.has_code("Throttling"));
    }
}

//! Delegated authentication and authorization, as k8s.io/apiserver's delegating options do for
//! kube-controller-manager: the bearer token is checked with a TokenReview, the request with a
//! SubjectAccessReview for its non-resource path and lowercase method (`get` on `/metrics`),
//! both against the API server, each answer cached briefly. A request without a token is
//! `system:anonymous`; paths in `--authorization-always-allow-paths` skip the authorization
//! only, so the kubelet's probes need no token but a rejected token is 401 everywhere.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, UserInfo};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::Api;
use kube::api::PostParams;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tracing::warn;

/// At most this many answers are cached per kind; beyond it expired ones are dropped, and if
/// that is not enough the cache starts over (a flood of made-up tokens must not grow memory).
const CACHE_CAP: usize = 4096;

/// Reviews in flight at once, so a flood of requests cannot become a flood of API calls.
const MAX_IN_FLIGHT: usize = 16;

/// A small map whose entries expire.
struct TtlCache<K, V> {
    entries: Mutex<HashMap<K, (Instant, V)>>,
}

impl<K: Hash + Eq, V: Clone> TtlCache<K, V> {
    fn new() -> Self {
        TtlCache {
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, k: &K) -> Option<V> {
        let g = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        g.get(k)
            .filter(|(until, _)| *until > Instant::now())
            .map(|(_, v)| v.clone())
    }

    fn put(&self, k: K, v: V, ttl: Duration) {
        if ttl.is_zero() {
            return;
        }
        let mut g = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if g.len() >= CACHE_CAP {
            let now = Instant::now();
            g.retain(|_, (until, _)| *until > now);
            if g.len() >= CACHE_CAP {
                g.clear();
            }
        }
        g.insert(k, (Instant::now() + ttl, v));
    }
}

/// Who a token belongs to, as the TokenReview said.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct User {
    name: String,
    uid: Option<String>,
    groups: Vec<String>,
    extra: BTreeMap<String, Vec<String>>,
}

/// What the delegated checks decided about one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Serve it.
    Allow,
    /// 401: a bearer token the API server does not accept (or could not review).
    Unauthenticated,
    /// 403: the SubjectAccessReview did not allow it.
    Forbidden(String),
    /// 500: the SubjectAccessReview could not be made.
    Error,
}

/// The TTLs of the two caches (upstream's flags, 10 s each by default).
#[derive(Clone, Copy, Debug)]
pub struct Ttls {
    /// `--authentication-token-webhook-cache-ttl`.
    pub token: Duration,
    /// `--authorization-webhook-cache-authorized-ttl`.
    pub allowed: Duration,
    /// `--authorization-webhook-cache-unauthorized-ttl`.
    pub denied: Duration,
}

/// The delegated authenticator and authorizer of the secure port.
pub struct Delegated {
    tokens: Api<TokenReview>,
    reviews: Api<SubjectAccessReview>,
    always_allow: Vec<String>,
    ttls: Ttls,
    token_cache: TtlCache<[u8; 32], Option<User>>,
    sar_cache: TtlCache<(User, String, String), bool>,
    in_flight: Semaphore,
}

impl Delegated {
    /// Reviews through `authn` (TokenReview) and `authz` (SubjectAccessReview).
    pub fn new(
        authn: kube::Client,
        authz: kube::Client,
        always_allow: Vec<String>,
        ttls: Ttls,
    ) -> Self {
        Delegated {
            tokens: Api::all(authn),
            reviews: Api::all(authz),
            always_allow,
            ttls,
            token_cache: TtlCache::new(),
            sar_cache: TtlCache::new(),
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
        }
    }

    /// Whether `path` is served without authentication: an exact entry, or a prefix entry
    /// ending in `*`.
    pub fn always_allowed(&self, path: &str) -> bool {
        always_allowed(&self.always_allow, path)
    }

    /// Decides one request: `authorization` is its Authorization header, `verb` its method
    /// in lowercase.
    ///
    /// Authentication runs first on every path, as k8s.io/apiserver's filter chain does: a
    /// token the API server rejects is 401 even on an always-allowed path; no token is the
    /// anonymous user (the delegating authenticator enables anonymous), which only the
    /// authorizer can refuse.
    pub async fn decide(&self, path: &str, verb: &str, authorization: Option<&str>) -> Decision {
        let user = match bearer(authorization) {
            None => anonymous(),
            Some(token) => match self.authenticate(token).await {
                Some(user) => user,
                None => return Decision::Unauthenticated,
            },
        };
        if self.always_allowed(path) {
            return Decision::Allow;
        }
        match self.authorize(&user, path, verb).await {
            Some(true) => Decision::Allow,
            Some(false) => Decision::Forbidden(format!(
                "forbidden: User \"{}\" cannot {verb} path \"{path}\"",
                user.name
            )),
            None => Decision::Error,
        }
    }

    async fn authenticate(&self, token: &str) -> Option<User> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(hit) = self.token_cache.get(&key) {
            return hit;
        }
        let _permit = self.in_flight.acquire().await.ok()?;
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: None,
            },
            ..Default::default()
        };
        let user = match self.tokens.create(&PostParams::default(), &review).await {
            Ok(r) => r.status.and_then(|s| {
                if s.authenticated == Some(true) {
                    s.user.map(user_of)
                } else {
                    None
                }
            }),
            Err(e) => {
                // Not cached: the token may be fine once the API server answers again.
                warn!(error = %e, "secure port: TokenReview failed; answering 401");
                return None;
            }
        };
        self.token_cache.put(key, user.clone(), self.ttls.token);
        user
    }

    async fn authorize(&self, user: &User, path: &str, verb: &str) -> Option<bool> {
        let key = (user.clone(), path.to_string(), verb.to_string());
        if let Some(hit) = self.sar_cache.get(&key) {
            return Some(hit);
        }
        let _permit = self.in_flight.acquire().await.ok()?;
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.name.clone()),
                uid: user.uid.clone(),
                groups: Some(user.groups.clone()),
                extra: (!user.extra.is_empty()).then(|| user.extra.clone()),
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(path.to_string()),
                    verb: Some(verb.to_string()),
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        match self.reviews.create(&PostParams::default(), &review).await {
            Ok(r) => {
                let allowed = r
                    .status
                    .is_some_and(|s| s.allowed && s.denied != Some(true));
                let ttl = if allowed {
                    self.ttls.allowed
                } else {
                    self.ttls.denied
                };
                self.sar_cache.put(key, allowed, ttl);
                Some(allowed)
            }
            Err(e) => {
                warn!(error = %e, user = %user.name, path, "secure port: SubjectAccessReview failed");
                None
            }
        }
    }
}

/// Who a request without a bearer token is (k8s.io/apiserver's anonymous authenticator).
fn anonymous() -> User {
    User {
        name: "system:anonymous".into(),
        uid: None,
        groups: vec!["system:unauthenticated".into()],
        extra: BTreeMap::new(),
    }
}

fn user_of(u: UserInfo) -> User {
    User {
        name: u.username.unwrap_or_default(),
        uid: u.uid.filter(|s| !s.is_empty()),
        groups: u.groups.unwrap_or_default(),
        extra: u.extra.unwrap_or_default(),
    }
}

fn always_allowed(list: &[String], path: &str) -> bool {
    list.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => path.starts_with(prefix),
        None => p == path,
    })
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer(header: Option<&str>) -> Option<&str> {
    let h = header?.trim();
    let (scheme, token) = h.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A `Status` body as the API server (and kube-controller-manager) answers refusals with.
fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(body.to_string()),
    )
        .into_response()
}

/// The axum middleware in front of every route of the secure port.
pub async fn middleware(State(auth): State<Arc<Delegated>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let verb = req.method().as_str().to_ascii_lowercase();
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    match auth.decide(&path, &verb, authorization.as_deref()).await {
        Decision::Allow => next.run(req).await,
        Decision::Unauthenticated => {
            status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized")
        }
        Decision::Forbidden(msg) => status(StatusCode::FORBIDDEN, "Forbidden", &msg),
        Decision::Error => status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "authorization could not be checked",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn always_allowed_paths_are_exact_or_star_prefixes() {
        let list: Vec<String> = ["/healthz", "/readyz", "/debug/*"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(always_allowed(&list, "/healthz"));
        assert!(!always_allowed(&list, "/healthz/leaderElection"));
        assert!(always_allowed(&list, "/debug/x"));
        assert!(!always_allowed(&list, "/metrics"));
    }

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(None), None);
    }

    #[test]
    fn cache_entries_expire_and_the_cache_is_bounded() {
        let c: TtlCache<u32, bool> = TtlCache::new();
        c.put(1, true, Duration::from_secs(60));
        c.put(2, true, Duration::ZERO);
        assert_eq!(c.get(&1), Some(true));
        assert_eq!(c.get(&2), None, "a zero TTL caches nothing");
        for i in 0..(CACHE_CAP as u32 + 10) {
            c.put(i, false, Duration::from_secs(60));
        }
        let len = c.entries.lock().map(|g| g.len()).unwrap_or(usize::MAX);
        assert!(len <= CACHE_CAP, "{len}");
    }
}

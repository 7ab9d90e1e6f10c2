//! The secure port's flags, named and defaulted as kube-controller-manager's (k8s.io/apiserver's
//! SecureServingOptions, DelegatingAuthenticationOptions and DelegatingAuthorizationOptions).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::flags::parse_duration;

/// kube-controller-manager's secure port.
pub const DEFAULT_SECURE_PORT: u16 = 10257;

/// How `/healthz`, `/readyz`, `/livez` and `/metrics` are served over HTTPS.
#[derive(Args, Debug, Clone)]
pub struct ServingFlags {
    /// Port serving HTTPS with authentication and authorization (0: no HTTPS).
    #[arg(long, default_value_t = DEFAULT_SECURE_PORT)]
    pub secure_port: u16,

    /// Address the secure port listens on ('::' for every address of both families).
    #[arg(long, default_value = "0.0.0.0")]
    pub bind_address: IpAddr,

    /// PEM file with the serving certificate (and any intermediates after it). Without it
    /// (and --tls-private-key-file) a self-signed certificate is generated at start.
    #[arg(long)]
    pub tls_cert_file: Option<PathBuf>,

    /// PEM file with the private key of --tls-cert-file.
    #[arg(long)]
    pub tls_private_key_file: Option<PathBuf>,

    /// Where a generated self-signed certificate is kept (service-controller-manager.crt and
    /// .key), and reused on restart. Ignored with --tls-cert-file. Empty: in memory only.
    #[arg(long)]
    pub cert_dir: Option<PathBuf>,

    /// kubeconfig of the identity that creates tokenreviews.authentication.k8s.io. Empty: the
    /// main client's (--kubeconfig, else in-cluster).
    #[arg(long)]
    pub authentication_kubeconfig: Option<PathBuf>,

    /// kubeconfig of the identity that creates subjectaccessreviews.authorization.k8s.io.
    /// Empty: the main client's.
    #[arg(long)]
    pub authorization_kubeconfig: Option<PathBuf>,

    /// Paths served over HTTPS without authentication or authorization: exact, or a prefix
    /// with a trailing '*' ('/healthz*' also covers /healthz/leaderElection).
    #[arg(long, value_delimiter = ',', default_value = "/healthz,/readyz,/livez")]
    pub authorization_always_allow_paths: Vec<String>,

    /// How long a TokenReview's answer is cached.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub authentication_token_webhook_cache_ttl: Duration,

    /// How long an allowing SubjectAccessReview's answer is cached.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub authorization_webhook_cache_authorized_ttl: Duration,

    /// How long a denying SubjectAccessReview's answer is cached.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub authorization_webhook_cache_unauthorized_ttl: Duration,
}

impl ServingFlags {
    /// Checks what no single value parser can see.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.tls_cert_file, &self.tls_private_key_file) {
            (Some(_), None) => {
                return Err("--tls-cert-file needs --tls-private-key-file".into());
            }
            (None, Some(_)) => {
                return Err("--tls-private-key-file needs --tls-cert-file".into());
            }
            _ => {}
        }
        for p in &self.authorization_always_allow_paths {
            if !p.starts_with('/') {
                return Err(format!(
                    "--authorization-always-allow-paths: '{p}' must start with '/'"
                ));
            }
            if p.find('*').is_some_and(|i| i + 1 != p.len()) {
                return Err(format!(
                    "--authorization-always-allow-paths: '{p}': '*' only at the end"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::flags::tests::flags;

    #[test]
    fn defaults_match_kube_controller_manager() {
        let f = flags(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(f.serving.secure_port, 10257);
        assert!(f.serving.bind_address.is_unspecified());
        assert_eq!(
            f.serving.authorization_always_allow_paths,
            ["/healthz", "/readyz", "/livez"]
        );
        for ttl in [
            f.serving.authentication_token_webhook_cache_ttl,
            f.serving.authorization_webhook_cache_authorized_ttl,
            f.serving.authorization_webhook_cache_unauthorized_ttl,
        ] {
            assert_eq!(ttl, std::time::Duration::from_secs(10));
        }
        assert_eq!(f.http_address, None, "plain HTTP only when asked for");
    }

    #[test]
    fn rejects_bad_values_naming_the_flag() {
        for (args, flag) in [
            (vec!["--tls-cert-file=/x.crt"], "--tls-private-key-file"),
            (vec!["--tls-private-key-file=/x.key"], "--tls-cert-file"),
            (vec!["--secure-port=70000"], "--secure-port"),
            (vec!["--bind-address=localhost"], "--bind-address"),
            (
                vec!["--authorization-always-allow-paths=healthz"],
                "--authorization-always-allow-paths",
            ),
            (
                vec!["--authorization-always-allow-paths=/a*/b"],
                "--authorization-always-allow-paths",
            ),
        ] {
            let e = flags(&args).err().unwrap_or_default();
            assert!(e.contains(flag), "{args:?}: {e}");
        }
    }
}

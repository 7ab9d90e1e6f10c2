//! The secure port's certificate: the files given by `--tls-cert-file`/`--tls-private-key-file`,
//! else a self-signed one generated at start (kept under `--cert-dir` when set), as
//! kube-controller-manager does.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tracing::info;

use super::flags::ServingFlags;

/// File names of a generated pair under `--cert-dir` (upstream names them after the component).
const PAIR_NAME: &str = "service-controller-manager";

/// The TLS configuration the secure port serves with. Only aws-lc-rs (the provider kube is
/// built with) is used, named explicitly: with two providers compiled in, rustls' implicit
/// default would be ambiguous.
pub fn server_config(flags: &ServingFlags) -> Result<ServerConfig> {
    let (chain, key) = match (&flags.tls_cert_file, &flags.tls_private_key_file) {
        (Some(c), Some(k)) => load(c, k)?,
        _ => match flags
            .cert_dir
            .as_deref()
            .filter(|d| !d.as_os_str().is_empty())
        {
            Some(dir) => in_cert_dir(dir, flags)?,
            None => {
                let pair = generate(flags)?;
                info!("serving with a generated self-signed certificate (in memory)");
                pair
            }
        },
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the serving certificate and key do not form a usable pair")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

type Pair = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn load(cert: &Path, key: &Path) -> Result<Pair> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("--tls-cert-file: reading {}", cert.display()))?;
    if chain.is_empty() {
        bail!("--tls-cert-file: no certificate in {}", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("--tls-private-key-file: reading {}", key.display()))?;
    Ok((chain, key))
}

/// A generated pair kept in `dir`: reused when both files are there, else generated and written
/// (the key readable by its owner only).
fn in_cert_dir(dir: &Path, flags: &ServingFlags) -> Result<Pair> {
    let cert: PathBuf = dir.join(format!("{PAIR_NAME}.crt"));
    let key: PathBuf = dir.join(format!("{PAIR_NAME}.key"));
    if cert.exists() && key.exists() {
        info!(cert = %cert.display(), "serving with the self-signed certificate in --cert-dir");
        return load(&cert, &key).context("--cert-dir");
    }
    let generated = rcgen::generate_simple_self_signed(names(flags))
        .context("generating a self-signed serving certificate")?;
    std::fs::create_dir_all(dir).with_context(|| format!("--cert-dir: {}", dir.display()))?;
    write_private(&key, generated.signing_key.serialize_pem().as_bytes())
        .with_context(|| format!("--cert-dir: writing {}", key.display()))?;
    std::fs::write(&cert, generated.cert.pem())
        .with_context(|| format!("--cert-dir: writing {}", cert.display()))?;
    info!(cert = %cert.display(), "generated a self-signed serving certificate in --cert-dir");
    load(&cert, &key)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

fn generate(flags: &ServingFlags) -> Result<Pair> {
    let generated = rcgen::generate_simple_self_signed(names(flags))
        .context("generating a self-signed serving certificate")?;
    let chain = vec![generated.cert.der().clone()];
    let key = PrivateKeyDer::try_from(generated.signing_key.serialize_der())
        .map_err(|e| anyhow::anyhow!("the generated key: {e}"))?;
    Ok((chain, key))
}

/// Names the generated certificate is for: loopback, this host, and a specific bind address.
fn names(flags: &ServingFlags) -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    if let Ok(h) = std::env::var("HOSTNAME")
        && !h.is_empty()
    {
        names.push(h);
    }
    if !flags.bind_address.is_unspecified() && !flags.bind_address.is_loopback() {
        names.push(flags.bind_address.to_string());
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct F {
        #[command(flatten)]
        s: ServingFlags,
    }

    fn flags(args: &[&str]) -> ServingFlags {
        let mut all = vec!["x"];
        all.extend_from_slice(args);
        F::try_parse_from(all).expect("flags").s
    }

    #[test]
    fn a_generated_certificate_makes_a_server_config() {
        server_config(&flags(&[])).expect("self-signed");
    }

    #[test]
    fn cert_dir_keeps_and_reuses_the_generated_pair() {
        let dir = std::env::temp_dir().join(format!("scm-cert-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let arg = format!("--cert-dir={}", dir.display());
        server_config(&flags(&[&arg])).expect("generated");
        let first = std::fs::read(dir.join("service-controller-manager.crt")).expect("crt");
        server_config(&flags(&[&arg])).expect("reused");
        let second = std::fs::read(dir.join("service-controller-manager.crt")).expect("crt");
        assert_eq!(first, second, "the pair is reused, not regenerated");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unreadable_files_name_the_flag() {
        let e = server_config(&flags(&[
            "--tls-cert-file=/nonexistent.crt",
            "--tls-private-key-file=/nonexistent.key",
        ]))
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
        assert!(e.contains("--tls-cert-file"), "{e}");
    }
}

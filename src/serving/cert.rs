//! The secure port's certificate: the files given by `--tls-cert-file`/`--tls-private-key-file`,
//! else a self-signed one generated at start (kept under `--cert-dir` when set), as
//! kube-controller-manager does. Given files are served dynamically, as upstream's
//! `DynamicCertKeyPairContent` serves them: when they change on disk the new pair is used for
//! the next handshakes, without a restart; a pair that does not load (a rotation half written,
//! a key that does not match) is logged and the previous pair stays in use.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, Result, bail};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tracing::info;

use super::flags::ServingFlags;

/// File names of a generated pair under `--cert-dir` (upstream names them after the component).
const PAIR_NAME: &str = "service-controller-manager";

/// The certificate the secure port serves, swapped in place by [`ServingCert::reload`].
#[derive(Debug)]
pub struct ServingCert {
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    files: Option<Files>,
}

/// The given files, and the contents last looked at (loaded or refused), so an unchanged or
/// still-broken pair is neither parsed nor logged again.
#[derive(Debug)]
struct Files {
    cert: PathBuf,
    key: PathBuf,
    seen: Mutex<(Vec<u8>, Vec<u8>)>,
    /// The last read error, so a file missing for a while is reported once.
    unreadable: Mutex<Option<String>>,
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

impl ServingCert {
    /// Whether the pair comes from `--tls-cert-file`/`--tls-private-key-file` (and so can
    /// change on disk).
    pub fn reloadable(&self) -> bool {
        self.files.is_some()
    }

    /// Reads the files again: `Ok(true)` when they changed and the new pair is now served,
    /// `Ok(false)` when nothing changed; an error (once per change) when the new contents do
    /// not form a usable pair, the previous one staying in use.
    pub fn reload(&self) -> Result<bool> {
        let Some(f) = &self.files else {
            return Ok(false);
        };
        let read = std::fs::read(&f.cert)
            .with_context(|| format!("--tls-cert-file: reading {}", f.cert.display()))
            .and_then(|c| {
                let k = std::fs::read(&f.key).with_context(|| {
                    format!("--tls-private-key-file: reading {}", f.key.display())
                })?;
                Ok((c, k))
            });
        let (cert, key) = {
            let mut last = f.unreadable.lock().unwrap_or_else(|e| e.into_inner());
            match read {
                Ok(pair) => {
                    *last = None;
                    pair
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    if last.as_deref() == Some(msg.as_str()) {
                        return Ok(false);
                    }
                    *last = Some(msg);
                    return Err(e);
                }
            }
        };
        {
            let mut seen = f.seen.lock().unwrap_or_else(|e| e.into_inner());
            if seen.0 == cert && seen.1 == key {
                return Ok(false);
            }
            *seen = (cert.clone(), key.clone());
        }
        let pair = parse(&cert, &key, &f.cert, &f.key)?;
        let certified = certified(&self.provider, pair)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(certified);
        Ok(true)
    }
}

fn certified(provider: &CryptoProvider, (chain, key): Pair) -> Result<CertifiedKey> {
    CertifiedKey::from_der(chain, key, provider)
        .context("the serving certificate and key do not form a usable pair")
}

/// The TLS configuration the secure port serves with, and its certificate (to reload). Only
/// aws-lc-rs (the provider kube is built with) is used, named explicitly: with two providers
/// compiled in, rustls' implicit default would be ambiguous.
pub fn server_config(flags: &ServingFlags) -> Result<(ServerConfig, Arc<ServingCert>)> {
    let mut files = None;
    let (chain, key) = match (&flags.tls_cert_file, &flags.tls_private_key_file) {
        (Some(c), Some(k)) => {
            let (cert_bytes, key_bytes) = (std::fs::read(c), std::fs::read(k));
            let pair = load(c, k)?;
            files = Some(Files {
                cert: c.clone(),
                key: k.clone(),
                seen: Mutex::new((
                    cert_bytes.unwrap_or_default(),
                    key_bytes.unwrap_or_default(),
                )),
                unreadable: Mutex::new(None),
            });
            pair
        }
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
    let serving = Arc::new(ServingCert {
        current: RwLock::new(Arc::new(certified(&provider, (chain, key))?)),
        provider: provider.clone(),
        files,
    });
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(serving.clone());
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((cfg, serving))
}

type Pair = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn load(cert: &Path, key: &Path) -> Result<Pair> {
    let cert_pem = std::fs::read(cert)
        .with_context(|| format!("--tls-cert-file: reading {}", cert.display()))?;
    let key_pem = std::fs::read(key)
        .with_context(|| format!("--tls-private-key-file: reading {}", key.display()))?;
    parse(&cert_pem, &key_pem, cert, key)
}

/// A chain and key from PEM contents; the paths only name them in errors.
fn parse(cert_pem: &[u8], key_pem: &[u8], cert: &Path, key: &Path) -> Result<Pair> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("--tls-cert-file: reading {}", cert.display()))?;
    if chain.is_empty() {
        bail!("--tls-cert-file: no certificate in {}", cert.display());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
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

    /// A self-signed pair written to `dir` as `<name>.crt`/`.key`; returns the certificate's DER.
    fn write_pair(dir: &Path, name: &str) -> Vec<u8> {
        let g = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("pair");
        std::fs::write(dir.join(format!("{name}.crt")), g.cert.pem()).expect("crt");
        std::fs::write(
            dir.join(format!("{name}.key")),
            g.signing_key.serialize_pem(),
        )
        .expect("key");
        g.cert.der().to_vec()
    }

    fn served(cert: &ServingCert) -> Vec<u8> {
        cert.current.read().expect("lock").cert[0].to_vec()
    }

    #[test]
    fn given_files_are_reloaded_when_they_change_and_a_bad_pair_keeps_the_old() {
        let dir = std::env::temp_dir().join(format!("scm-reload-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let a = write_pair(&dir, "a");
        let b = write_pair(&dir, "b");
        let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        let copy = |n: &str| {
            std::fs::copy(dir.join(format!("{n}.crt")), &crt).expect("crt");
            std::fs::copy(dir.join(format!("{n}.key")), &key).expect("key");
        };
        copy("a");
        let (_, cert) = server_config(&flags(&[
            &format!("--tls-cert-file={}", crt.display()),
            &format!("--tls-private-key-file={}", key.display()),
        ]))
        .expect("config");
        assert!(cert.reloadable());
        assert_eq!(served(&cert), a);
        assert!(!cert.reload().expect("unchanged"), "nothing changed");
        // Half a rotation: b's certificate with a's key. Refused once, a still served.
        std::fs::copy(dir.join("b.crt"), &crt).expect("crt");
        assert!(cert.reload().is_err());
        assert!(
            !cert.reload().expect("seen"),
            "a refused pair is not retried"
        );
        assert_eq!(served(&cert), a);
        // A file missing for a while (a rotation by rename): reported once, a still served.
        std::fs::remove_file(&key).expect("rm");
        assert!(cert.reload().is_err());
        assert!(!cert.reload().expect("reported"), "reported once");
        assert_eq!(served(&cert), a);
        copy("b");
        assert!(cert.reload().expect("reloaded"));
        assert_eq!(served(&cert), b);
        let (_, generated) = server_config(&flags(&[])).expect("self-signed");
        assert!(!generated.reloadable());
        assert!(!generated.reload().expect("nothing to reload"));
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

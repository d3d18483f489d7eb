//! rustls configurations from PEM files: TLS 1.3 only, the client's
//! certificate required by the node, the node's name checked by the client
//! unless a setting with `danger` in its name says otherwise. A [`Reloading`]
//! configuration is built again when one of its files changes, so a
//! rotated certificate is used from the next handshake on.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, Error, RootCertStore, ServerConfig,
    SignatureScheme,
};

/// A node's TLS files: its certificate chain and key, and the CA its
/// clients' certificates must be signed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// A client's TLS files: the CA the nodes' certificates must be signed by,
/// and the client's own certificate chain and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Accept a node certificate that does not name the address dialled
    /// (it is still checked against the CA). Off by default.
    pub danger_skip_server_name: bool,
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("{}: no usable private key: {e}", path.display()))
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for cert in certs(path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(Arc::new(roots))
}

/// A node's configuration: TLS 1.3, a client certificate signed by
/// `client_ca` required, no session tickets (nothing may follow the
/// handshake that the kernel's TLS would have to parse), secrets
/// extractable for the kernel.
pub fn server_config(files: &ServerFiles) -> Result<Arc<ServerConfig>, String> {
    let verifier = WebPkiClientVerifier::builder(roots(&files.client_ca)?)
        .build()
        .map_err(|e| format!("{}: {e}", files.client_ca.display()))?;
    let mut config = ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&files.cert)?, key(&files.key)?)
        .map_err(|e| format!("{} with {}: {e}", files.cert.display(), files.key.display()))?;
    config.send_tls13_tickets = 0;
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// A client's configuration: TLS 1.3, the node checked against `ca` (and
/// its name, unless `danger_skip_server_name`), this client's certificate
/// presented, secrets extractable for the kernel.
pub fn client_config(files: &ClientFiles) -> Result<Arc<ClientConfig>, String> {
    let roots = roots(&files.ca)?;
    let builder = ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13]);
    let builder = if files.danger_skip_server_name {
        let inner = WebPkiServerVerifier::builder(roots)
            .build()
            .map_err(|e| format!("{}: {e}", files.ca.display()))?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(DangerAnyName(inner)))
    } else {
        builder.with_root_certificates(roots)
    };
    let mut config = builder
        .with_client_auth_cert(certs(&files.cert)?, key(&files.key)?)
        .map_err(|e| format!("{} with {}: {e}", files.cert.display(), files.key.display()))?;
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// The name a node's certificate must carry: its IP address.
pub fn server_name(addr: std::net::SocketAddr) -> ServerName<'static> {
    ServerName::IpAddress(addr.ip().into())
}

/// The chain checked against the CA as always; only a name that does not
/// match is let through.
#[derive(Debug)]
struct DangerAnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for DangerAnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A configuration built from files, built again when one of them
/// changes (its modification time, length or inode), so that rotated
/// certificates are used from the next handshake on without a restart.
pub struct Reloading<F, C> {
    /// What the files are, for the log ("TLS files", "policy").
    what: &'static str,
    files: F,
    paths: Vec<PathBuf>,
    build: fn(&F) -> Result<Arc<C>, String>,
    current: Mutex<Current<C>>,
}

/// What a file looked like when it was read: its modification time,
/// length and inode (`None`: it could not be looked at).
type Stamp = Option<(SystemTime, u64, u64)>;

struct Current<C> {
    /// The files the configuration was built from. Only a build that
    /// succeeded records them: after a failure (a file caught half
    /// written during a rotation) every use tries again.
    built_from: Vec<Stamp>,
    config: Arc<C>,
    /// The files last found unusable, so that the error is logged once
    /// per change, not at every retry.
    failed: Option<Vec<Stamp>>,
}

impl<F, C> std::fmt::Debug for Reloading<F, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading")
            .field("files", &self.paths)
            .finish_non_exhaustive()
    }
}

impl<F, C> Reloading<F, C> {
    fn stamps(paths: &[PathBuf]) -> Vec<Stamp> {
        use std::os::unix::fs::MetadataExt;
        paths
            .iter()
            .map(|p| {
                let meta = std::fs::metadata(p).ok()?;
                Some((meta.modified().ok()?, meta.len(), meta.ino()))
            })
            .collect()
    }

    /// Builds the configuration once now: bad files are an error at start.
    pub fn new(
        what: &'static str,
        files: F,
        paths: Vec<PathBuf>,
        build: fn(&F) -> Result<Arc<C>, String>,
    ) -> Result<Self, String> {
        let built_from = Self::stamps(&paths);
        let config = build(&files)?;
        Ok(Reloading {
            what,
            files,
            paths,
            build,
            current: Mutex::new(Current {
                built_from,
                config,
                failed: None,
            }),
        })
    }

    /// The files it is built from.
    pub fn files(&self) -> &F {
        &self.files
    }

    /// The configuration for a new handshake: rebuilt if a file changed
    /// since the last build that succeeded; if the files are unusable now,
    /// the last good configuration is used (the error logged once) and the
    /// next call tries again.
    pub fn get(&self) -> Arc<C> {
        // Looked at before the build: a file changed during it is seen
        // as changed at the next call.
        let stamps = Self::stamps(&self.paths);
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if stamps != current.built_from {
            match (self.build)(&self.files) {
                Ok(config) => {
                    tracing::info!(files = ?self.paths, "{} changed: new handshakes use what it says now", self.what);
                    *current = Current {
                        built_from: stamps,
                        config,
                        failed: None,
                    };
                }
                Err(why) => {
                    if current.failed.as_ref() != Some(&stamps) {
                        tracing::error!(error = %why, "{} changed but cannot be used (yet): keeping what was loaded before, trying again at the next handshake", self.what);
                        current.failed = Some(stamps);
                    }
                }
            }
        }
        Arc::clone(&current.config)
    }
}

impl Reloading<ServerFiles, ServerConfig> {
    pub fn server(files: ServerFiles) -> Result<Self, String> {
        let paths = vec![
            files.cert.clone(),
            files.key.clone(),
            files.client_ca.clone(),
        ];
        Reloading::new("TLS files", files, paths, server_config)
    }
}

impl Reloading<ClientFiles, ClientConfig> {
    pub fn client(files: ClientFiles) -> Result<Self, String> {
        let paths = vec![files.ca.clone(), files.cert.clone(), files.key.clone()];
        Reloading::new("TLS files", files, paths, client_config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Write;

    /// A stand-in for a PEM file: usable once it ends with `END`.
    fn build(path: &PathBuf) -> Result<Arc<String>, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        if text.ends_with("END") {
            Ok(Arc::new(text))
        } else {
            Err(format!("{}: half written", path.display()))
        }
    }

    /// Overwrites `path` in place (same inode) and gives it `mtime`.
    fn write(path: &Path, text: &str, mtime: SystemTime) {
        let mut file = File::options()
            .write(true)
            .truncate(true)
            .open(path)
            .unwrap();
        file.write_all(text.as_bytes()).unwrap();
        file.set_modified(mtime).unwrap();
    }

    #[test]
    fn a_half_written_file_is_read_again_at_the_next_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cert.pem");
        std::fs::write(&path, "one END").unwrap();
        let reloading =
            Reloading::new("test file", path.clone(), vec![path.clone()], build).unwrap();
        assert_eq!(*reloading.get(), "one END");

        // Rotation caught half way: the old configuration serves...
        let rotated = SystemTime::now() + std::time::Duration::from_secs(5);
        write(&path, "two ...", rotated);
        assert_eq!(*reloading.get(), "one END");
        // ...and the finished file (same inode, length and modification
        // time: the writer finished within the clock's granularity) is
        // picked up at the next use, not at the next change.
        write(&path, "two END", rotated);
        assert_eq!(*reloading.get(), "two END");
        // Unchanged from then on: the same configuration, not rebuilt.
        let first = reloading.get();
        assert!(Arc::ptr_eq(&first, &reloading.get()));
    }
}

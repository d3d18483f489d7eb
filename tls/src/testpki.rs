//! A throwaway certificate authority and certificates signed by it, for
//! tests and the VM scenarios (feature `testpki`): never for production.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SanType,
};

/// A CA that signs leaves.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Who a leaf is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A node: its IP addresses are its names.
    Node,
    /// A client.
    Client,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Ca {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Result<Ca, String> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer =
            CertifiedIssuer::self_signed(params, KeyPair::generate().map_err(err)?).map_err(err)?;
        Ok(Ca { issuer })
    }

    /// Writes the CA's certificate to `path`.
    pub fn write(&self, path: &Path) -> Result<(), String> {
        std::fs::write(path, self.issuer.pem()).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// A leaf for `role` named `name` (and, for a node, `ips`), valid from
    /// `days_from` days from now for `days` days (negative: in the past),
    /// written to `dir/NAME.pem` and `dir/NAME.key`.
    pub fn leaf(
        &self,
        dir: &Path,
        name: &str,
        role: Role,
        ips: &[IpAddr],
        days_from: i64,
        days: i64,
    ) -> Result<Leaf, String> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
        params.extended_key_usages = vec![match role {
            Role::Node => ExtendedKeyUsagePurpose::ServerAuth,
            Role::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::days(days_from);
        params.not_after = now + time::Duration::days(days_from + days);
        let key = KeyPair::generate().map_err(err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        let leaf = Leaf {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&leaf.cert, cert.pem())
            .map_err(|e| format!("{}: {e}", leaf.cert.display()))?;
        std::fs::write(&leaf.key, key.serialize_pem())
            .map_err(|e| format!("{}: {e}", leaf.key.display()))?;
        Ok(leaf)
    }
}

/// The usual set in `dir`: `ca.pem`; `node.pem`/`.key` for 127.0.0.1;
/// `client.pem`/`.key`; all valid for a year from yesterday.
pub fn standard(dir: &Path) -> Result<(PathBuf, Leaf, Leaf), String> {
    let ca = Ca::new("netblk test CA")?;
    let ca_path = dir.join("ca.pem");
    ca.write(&ca_path)?;
    let localhost: IpAddr = [127, 0, 0, 1].into();
    let node = ca.leaf(dir, "node", Role::Node, &[localhost], -1, 366)?;
    let client = ca.leaf(dir, "client", Role::Client, &[], -1, 366)?;
    Ok((ca_path, node, client))
}

//! Who the client of a data connection is, as the node knows it: the
//! identity its TLS certificate names (`netblk_tls::identity`), or nobody
//! (a plaintext connection). Fencing and the policy are keyed by it; the
//! handshake's `client_id` only tells apart the devices of one identity.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Peer {
    /// A plaintext client: anyone who can reach the port.
    Anonymous,
    /// A client whose certificate passed verification and names this.
    Certified(String),
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Anonymous => f.write_str("plaintext client (no certificate)"),
            Peer::Certified(id) => write!(f, "client '{id}'"),
        }
    }
}

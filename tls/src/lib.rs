//! Mutual TLS for netblk's wire: rustls 1.3-only configurations built
//! from PEM files, a blocking handshake for each side, and the kernel's TLS
//! (`TCP_ULP "tls"`) taking over a socket after the handshake.
//!
//! - [`config`]: configurations from PEM files, reloaded when they change.
//! - [`handshake`]: the blocking handshakes of each side.
//! - [`identity`]: who a peer's certificate names.
//! - [`ktls`]: the kernel's TLS taking a socket over, and whether it can.
//! - [`relay`]: userspace TLS behind a loopback pair, where it cannot.

pub mod config;
pub mod handshake;
pub mod identity;
pub mod ktls;
pub mod relay;
#[cfg(feature = "testpki")]
pub mod testpki;

pub use rustls;

use std::net::TcpStream;

/// How a connection's records are encrypted once its handshake is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// No TLS.
    Plain,
    /// The kernel's TLS, on the socket itself.
    Kernel,
    /// rustls in a relay thread, behind a loopback pair.
    User,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Plain => "plaintext",
            Transport::Kernel => "kernel TLS",
            Transport::User => "userspace TLS",
        }
    }
}

/// The socket to use after `tls`'s handshake on `stream`: `stream` itself
/// with the kernel's TLS when `kernel` allows it and the kernel has it
/// (and nothing was decrypted yet that the kernel would not see), else the
/// plaintext end of a relay.
pub fn secure(
    stream: TcpStream,
    mut tls: rustls::Connection,
    kernel: bool,
) -> std::io::Result<(TcpStream, Transport)> {
    let mut pending = Vec::new();
    handshake::pending_plaintext(&mut tls, &mut pending)?;
    if kernel && pending.is_empty() && !tls.wants_write() && ktls::available() {
        let secrets = tls
            .dangerous_extract_secrets()
            .map_err(|e| std::io::Error::other(format!("TLS secrets: {e}")))?;
        ktls::install(&stream, secrets)?;
        return Ok((stream, Transport::Kernel));
    }
    Ok((relay::relay(stream, tls, pending)?, Transport::User))
}

//! Blocking handshakes on a connected socket (its read and write timeouts
//! bound them), with errors that say what went wrong in words an operator
//! can act on.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};

/// Drives `conn`'s handshake over `stream` to its end, and sends what it
/// still has to say.
fn complete(conn: &mut Connection, stream: &TcpStream) -> io::Result<()> {
    let mut io = stream;
    while conn.is_handshaking() {
        let (_, read) = conn.complete_io(&mut io)?;
        if read == 0 && conn.is_handshaking() && !conn.wants_write() {
            // complete_io saw the end of the stream.
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection during the TLS handshake",
            ));
        }
    }
    while conn.wants_write() {
        conn.write_tls(&mut io)?;
    }
    io.flush()
}

/// Why a handshake failed, in words: the rustls error and a hint where
/// one is known.
fn explain(err: io::Error, plaintext_hint: &str) -> String {
    let hint = match err.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => plaintext_hint,
        io::ErrorKind::InvalidData if err.to_string().contains("corrupt message") => plaintext_hint,
        _ => "",
    };
    format!("TLS handshake failed: {err}{hint}")
}

/// The client side: the node's certificate checked against `config`'s CA
/// and `name`, ours presented.
pub fn client(
    stream: &TcpStream,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> Result<ClientConnection, String> {
    let conn = ClientConnection::new(config, name).map_err(|e| format!("TLS: {e}"))?;
    let mut conn = Connection::Client(conn);
    complete(&mut conn, stream).map_err(|e| {
        explain(
            e,
            " (does the node serve TLS? a plaintext node closes a TLS client)",
        )
    })?;
    match conn {
        Connection::Client(conn) => Ok(conn),
        Connection::Server(_) => Err("TLS: not a client connection".into()),
    }
}

/// The node side: the client must present a certificate signed by
/// `config`'s client CA.
pub fn server(stream: &TcpStream, config: Arc<ServerConfig>) -> Result<ServerConnection, String> {
    let conn = ServerConnection::new(config).map_err(|e| format!("TLS: {e}"))?;
    let mut conn = Connection::Server(conn);
    complete(&mut conn, stream).map_err(|e| explain(e, " (a plaintext client?)"))?;
    match conn {
        Connection::Server(conn) => Ok(conn),
        Connection::Client(_) => Err("TLS: not a server connection".into()),
    }
}

/// Reads at most `buf.len()` plaintext bytes already decrypted by `conn`
/// (what arrived with the handshake's last flight), for handing over.
pub fn pending_plaintext(conn: &mut Connection, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut chunk = [0u8; 4096];
    loop {
        match conn.reader().read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

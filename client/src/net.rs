//! Connecting to a node: TCP options and the handshake, done blocking before
//! a connection is handed to its queue's ring.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use netblk_protocol::pb::{self, header::Kind};
use netblk_protocol::{
    Limits, PREAMBLE_LEN, PROTOCOL_VERSION, Preamble, decode_header, encode_head,
};
use socket2::{SockRef, TcpKeepalive};

use crate::layout::Layout;

/// Why a node could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("node {node} ({addr}): cannot connect: {source}")]
    Connect {
        node: usize,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("node {node} ({addr}) refused the handshake: {message}")]
    Refused {
        node: usize,
        addr: SocketAddr,
        message: String,
    },
    #[error("node {node} ({addr}): handshake failed: {why}")]
    Handshake {
        node: usize,
        addr: SocketAddr,
        why: String,
    },
}

/// What a node said in its handshake reply.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub node_id: String,
    pub max_io_size: u32,
}

/// Who is connecting, to which volume.
#[derive(Debug, Clone)]
pub struct Identity<'a> {
    pub client_id: &'a str,
    pub volume: &'a str,
    pub session: u64,
}

/// Connects to node `node` of `layout` and completes the handshake.
pub fn connect(
    addr: SocketAddr,
    node: usize,
    layout: &Layout,
    who: &Identity<'_>,
    timeout: Duration,
) -> Result<(TcpStream, NodeInfo), ConnectError> {
    let connect_err = |source| ConnectError::Connect { node, addr, source };
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(connect_err)?;
    configure(&stream, timeout).map_err(connect_err)?;
    let hs_err = |why: String| ConnectError::Handshake { node, addr, why };

    let handshake = pb::Header {
        kind: Some(Kind::Handshake(pb::Handshake {
            protocol_version: u32::from(PROTOCOL_VERSION),
            client_id: who.client_id.to_owned(),
            volume: who.volume.to_owned(),
            volume_size: layout.size(),
            layout: Some(layout.fingerprint(node)),
            session: who.session,
        })),
    };
    let mut bytes = Vec::new();
    encode_head(&handshake, 0, &mut bytes).map_err(|e| hs_err(e.to_string()))?;
    (&stream)
        .write_all(&bytes)
        .map_err(|e| hs_err(e.to_string()))?;

    let mut preamble = [0u8; PREAMBLE_LEN];
    (&stream)
        .read_exact(&mut preamble)
        .map_err(|e| hs_err(format!("no reply: {e}")))?;
    let preamble =
        Preamble::parse(&preamble, &Limits::default()).map_err(|e| hs_err(e.to_string()))?;
    let mut header = vec![0u8; preamble.header_len as usize];
    (&stream)
        .read_exact(&mut header)
        .map_err(|e| hs_err(format!("reply cut short: {e}")))?;
    let reply = match decode_header(&header, preamble.payload_len) {
        Ok(pb::Header {
            kind: Some(Kind::HandshakeReply(reply)),
        }) => reply,
        Ok(other) => return Err(hs_err(format!("expected a handshake reply, got {other:?}"))),
        Err(e) => return Err(hs_err(e.to_string())),
    };
    if reply.status != pb::Status::Ok as i32 {
        return Err(ConnectError::Refused {
            node,
            addr,
            message: reply.message,
        });
    }
    if reply.max_io_size < layout.stripe_unit() {
        return Err(hs_err(format!(
            "the node's max IO size {} is below the stripe unit {}",
            reply.max_io_size,
            layout.stripe_unit()
        )));
    }
    // From here on the ring does all IO; it waits without socket timeouts
    // (request deadlines bound it instead).
    stream
        .set_read_timeout(None)
        .and_then(|()| stream.set_write_timeout(None))
        .map_err(connect_err)?;
    Ok((
        stream,
        NodeInfo {
            node_id: reply.node_id,
            max_io_size: reply.max_io_size,
        },
    ))
}

fn configure(stream: &TcpStream, timeout: Duration) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let sock = SockRef::from(stream);
    sock.set_keepalive(true)?;
    sock.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(Duration::from_secs(10))
            .with_interval(Duration::from_secs(5))
            .with_retries(3),
    )?;
    // Zero-copy sends work without it on io_uring, but it is what the kernel
    // documents for sending from user pages; older kernels ignore the hint.
    crate::uring::enable_zerocopy(stream)?;
    Ok(())
}

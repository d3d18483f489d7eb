//! Connecting to a node: TCP options and the handshake, done blocking before
//! a connection is handed to its queue's ring.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use netblk_protocol::pb::{self, header::Kind};
use netblk_protocol::{
    Limits, PREAMBLE_LEN, PROTOCOL_REVISION, PROTOCOL_VERSION, Preamble, decode_header, encode_head,
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
    #[error("node {node} ({addr}) has no volume '{volume}'")]
    NotFound {
        node: usize,
        addr: SocketAddr,
        volume: String,
    },
    #[error("node {node} ({addr}): handshake failed: {why}")]
    Handshake {
        node: usize,
        addr: SocketAddr,
        why: String,
    },
    #[error("node {node} ({addr}): {why}")]
    Tls {
        node: usize,
        addr: SocketAddr,
        why: String,
    },
    #[error(
        "node {node} ({addr}) lost volume '{volume}': it now holds volume identity {got}, not {pinned} (made anew, empty): refusing it, its stripes fail with EIO"
    )]
    VolumeLost {
        node: usize,
        addr: SocketAddr,
        volume: String,
        pinned: String,
        got: String,
    },
}

/// What a node said in its handshake reply.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub node_id: String,
    pub max_io_size: u32,
    /// The volume's identity on this node, fixed when it was created.
    pub volume_id: String,
    /// This life of the volume on the node, and an earlier one whose
    /// acknowledged writes it made durable (0: none).
    pub incarnation: u64,
    pub durable_incarnation: u64,
    /// The volume's size (whole volume) as the node holds it.
    pub volume_size: u64,
    /// How the connection's records are encrypted, if at all.
    pub transport: Transport,
}

pub use netblk_tls::Transport;

/// A client's TLS files, read again when they change (a rotated
/// certificate is used from the next connection on).
pub type ClientTls = netblk_tls::config::Reloading<
    netblk_tls::config::ClientFiles,
    netblk_tls::rustls::ClientConfig,
>;

/// Who is connecting, to which volume.
#[derive(Debug, Clone)]
pub struct Identity<'a> {
    pub client_id: &'a str,
    pub volume: &'a str,
    pub session: u64,
    /// The volume identity this node must hold (pinned at first connect):
    /// None to take whatever it has.
    pub volume_id: Option<&'a str>,
    /// Ask for data digests (CRC-32C on every payload); a node that does
    /// not agree is refused.
    pub digest: bool,
    /// Mutual TLS before the netblk handshake (None: plaintext).
    pub tls: Option<&'a ClientTls>,
    /// A replicated volume's owner epoch this client attached with (0: not
    /// an owner): a node refuses it once a newer owner took over.
    pub owner_epoch: u64,
}

/// How long a connection may take to come up, and how long a request may
/// take (which also bounds how long a silent peer goes unnoticed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Connect plus handshake.
    pub connect: Duration,
    /// A request's deadline (`--io-timeout`).
    pub io: Duration,
}

/// Connects to node `node` of `layout` and completes the handshake (which
/// creates the volume if the node has none).
pub fn connect(
    addr: SocketAddr,
    node: usize,
    layout: &Layout,
    who: &Identity<'_>,
    timeouts: Timeouts,
) -> Result<(TcpStream, NodeInfo), ConnectError> {
    connect_as(addr, node, layout, who, timeouts, Open::CreateOrOpen)
}

/// Whether a handshake may create the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// Create it if the node has none (what a mapped volume does).
    CreateOrOpen,
    /// Only a volume that exists ([`ConnectError::NotFound`] otherwise;
    /// nothing is created), whatever its size (`NodeInfo::volume_size`
    /// says it): `layout`'s size is not presented. For tools that manage
    /// volumes.
    Existing,
}

/// As [`connect`], opening the volume as `open` says.
pub fn connect_as(
    addr: SocketAddr,
    node: usize,
    layout: &Layout,
    who: &Identity<'_>,
    timeouts: Timeouts,
    open: Open,
) -> Result<(TcpStream, NodeInfo), ConnectError> {
    let existing = open == Open::Existing;
    // A client that pinned the volume follows one it holds: it never
    // creates one (a node that lost the volume must not make an empty one
    // under its name, which would then look like the volume to others), and
    // a grow by a manager may have got to the nodes first.
    let pinned = who.volume_id.is_some();
    let timeout = timeouts.connect;
    let connect_err = |source| ConnectError::Connect { node, addr, source };
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(connect_err)?;
    configure(&stream, timeouts).map_err(connect_err)?;
    let hs_err = |why: String| ConnectError::Handshake { node, addr, why };
    let tls_err = |why: String| ConnectError::Tls { node, addr, why };
    // TLS first: not a byte of the netblk handshake goes out in the clear.
    let mut tls = match who.tls {
        Some(config) => Some(
            netblk_tls::handshake::client(
                &stream,
                config.get(),
                netblk_tls::config::server_name(addr),
            )
            .map_err(tls_err)?,
        ),
        None => None,
    };

    let handshake = pb::Header {
        kind: Some(Kind::Handshake(pb::Handshake {
            protocol_version: u32::from(PROTOCOL_VERSION),
            revision: PROTOCOL_REVISION,
            client_id: who.client_id.to_owned(),
            volume: who.volume.to_owned(),
            volume_size: if existing { 0 } else { layout.size() },
            layout: Some(layout.fingerprint(node)),
            session: who.session,
            owner_epoch: who.owner_epoch,
            existing: existing || pinned,
            at_least: pinned && !existing,
            data_digest: if who.digest {
                pb::DataDigest::Crc32c as i32
            } else {
                pb::DataDigest::None as i32
            },
        })),
    };
    let mut bytes = Vec::new();
    encode_head(&handshake, 0, &mut bytes).map_err(|e| hs_err(e.to_string()))?;
    // The handshake goes through rustls in this thread: a node that turned
    // our certificate away says so here (TLS 1.3 tells a client only once
    // it reads), before any data path is set up.
    let exchanged = match &mut tls {
        Some(conn) => {
            let mut sock = &stream;
            let mut io = netblk_tls::rustls::Stream::new(conn, &mut sock);
            io.write_all(&bytes)
                .map_err(|e| e.to_string())
                .and_then(|()| read_head(&mut io))
                .map_err(|why| tls_err(format!("the node did not accept this client over TLS: {why}")))
        }
        None => (&stream)
            .write_all(&bytes)
            .map_err(|e| e.to_string())
            .and_then(|()| read_head(&stream))
            .map_err(|why| {
                hs_err(format!(
                    "{why} (a node with TLS closes a plaintext client: give the TLS CA, certificate and key)"
                ))
            }),
    };
    let reply = match exchanged? {
        (
            pb::Header {
                kind: Some(Kind::HandshakeReply(reply)),
            },
            _,
        ) => reply,
        (other, _) => return Err(hs_err(format!("expected a handshake reply, got {other:?}"))),
    };
    if reply.revision != PROTOCOL_REVISION {
        // An older node cannot be trusted to fence the way this client
        // relies on (one epoch per device), nor to send header digests.
        return Err(ConnectError::Refused {
            node,
            addr,
            message: format!(
                "the node speaks protocol revision {} (0: from before revisions); this client needs revision {PROTOCOL_REVISION}: upgrade the node{}",
                reply.revision,
                if reply.message.is_empty() {
                    String::new()
                } else {
                    format!(" (it said: {})", reply.message)
                }
            ),
        });
    }
    if reply.status == pb::Status::NotFound as i32 {
        return Err(ConnectError::NotFound {
            node,
            addr,
            volume: who.volume.to_owned(),
        });
    }
    if reply.status != pb::Status::Ok as i32 {
        return Err(ConnectError::Refused {
            node,
            addr,
            message: reply.message,
        });
    }
    if let Some(pinned) = who.volume_id
        && pinned != reply.volume_id
    {
        return Err(ConnectError::VolumeLost {
            node,
            addr,
            volume: who.volume.to_owned(),
            pinned: pinned.to_owned(),
            got: reply.volume_id,
        });
    }
    if who.digest && reply.data_digest != pb::DataDigest::Crc32c as i32 {
        return Err(hs_err(
            "the node does not do data digests (crc32c): refusing to send unchecked data".into(),
        ));
    }
    if reply.max_io_size < layout.stripe_unit() {
        return Err(hs_err(format!(
            "the node's max IO size {} is below the stripe unit {}",
            reply.max_io_size,
            layout.stripe_unit()
        )));
    }
    // With TLS, the data path runs on the kernel's TLS where it has it
    // (the socket itself), else through a userspace relay.
    let (stream, transport) = match tls {
        Some(conn) => netblk_tls::secure(stream, conn.into(), true)
            .map_err(|e| tls_err(format!("cannot set up the TLS data path: {e}")))?,
        None => (stream, Transport::Plain),
    };
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
            volume_id: reply.volume_id,
            incarnation: reply.incarnation,
            durable_incarnation: reply.durable_incarnation,
            volume_size: reply.volume_size,
            transport,
        },
    ))
}

/// A session number for a short connection of a tool (resize, manage):
/// sessions of one client id must not go back, and the clock does not.
/// Milliseconds, so that the step from a tool's last use stays within
/// what a node allows (2^40, 34 years: the mock node's
/// `fence::MAX_SESSION_STEP`), above 2^62, so that they stay above the
/// nanosecond sessions earlier versions sent (a node running across the
/// upgrade would take them for stale).
pub fn clock_session() -> u64 {
    const ABOVE_NANOSECONDS: u64 = 1 << 62;
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX >> 2));
    ABOVE_NANOSECONDS | millis
}

/// Reads one frame's preamble and header (not its payload).
pub(crate) fn read_head(mut stream: impl Read) -> Result<(pb::Header, u32), String> {
    let mut preamble = [0u8; PREAMBLE_LEN];
    stream
        .read_exact(&mut preamble)
        .map_err(|e| format!("no reply: {e}"))?;
    let preamble = Preamble::parse(&preamble, &Limits::default()).map_err(|e| e.to_string())?;
    let mut header = vec![0u8; preamble.header_len as usize];
    stream
        .read_exact(&mut header)
        .map_err(|e| format!("reply cut short: {e}"))?;
    let head = decode_header(&preamble, &header).map_err(|e| e.to_string())?;
    Ok((head, preamble.payload_len))
}

/// Sends one request without payload on a connection that has handshaken
/// and returns its reply, waiting at most `timeout` for each (a reply with
/// a payload is refused: only requests without data go through here).
pub fn call(
    stream: &TcpStream,
    id: u64,
    op: pb::request::Op,
    timeout: Duration,
) -> Result<pb::Reply, String> {
    let (reply, payload) = exchange(stream, id, op, &[], 0, timeout)?;
    if !payload.is_empty() {
        return Err(format!(
            "the reply to request {id} carries {} payload bytes, none expected",
            payload.len()
        ));
    }
    Ok(reply)
}

/// Sends one request with its payload (a write's data, or none) and
/// returns the reply with its payload, which must be at most `max_payload`
/// bytes; waits at most `timeout` for each.
pub fn exchange(
    stream: &TcpStream,
    id: u64,
    op: pb::request::Op,
    payload: &[u8],
    max_payload: u32,
    timeout: Duration,
) -> Result<(pb::Reply, Vec<u8>), String> {
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    encode_head(&pb::Header::request(id, op), payload.len(), &mut bytes)
        .map_err(|e| e.to_string())?;
    (&*stream)
        .write_all(&bytes)
        .and_then(|()| (&*stream).write_all(payload))
        .map_err(|e| format!("cannot send: {e}"))?;
    match read_head(stream)? {
        (
            pb::Header {
                kind: Some(Kind::Reply(reply)),
            },
            len,
        ) if reply.id == id && len <= max_payload => {
            let mut data = vec![0u8; len as usize];
            (&*stream)
                .read_exact(&mut data)
                .map_err(|e| format!("reply payload cut short: {e}"))?;
            Ok((reply, data))
        }
        (other, len) => Err(format!(
            "expected the reply to request {id} (at most {max_payload} payload bytes), got {other:?} with {len} payload bytes"
        )),
    }
}

/// Keepalive probing of an idle connection: (idle time, interval, probes).
/// A peer that vanished (no RST: a dead host, a cut link) is noticed within
/// about the IO timeout even when no request is waiting on it.
/// Whole seconds: what the kernel takes.
pub fn keepalive_for(io_timeout: Duration) -> (Duration, Duration, u32) {
    let secs = io_timeout.as_secs();
    let idle = Duration::from_secs((secs / 2).clamp(1, 15));
    let interval = Duration::from_secs((secs / 6).clamp(1, 5));
    (idle, interval, 3)
}

/// Whether the node at the other end of `stream` is on this host: its
/// address is a loopback one, or this socket's own. Its segments are then
/// delivered locally, and local delivery copies every zero-copy page it
/// receives (`skb_copy_ubufs`) while the sender's queue may still hold
/// references to the original pages after the send's notification: a
/// request page sent zero-copy could be freed by its owner with those
/// references held (kernels that free large kmalloc pages frozen, 6.17 and
/// later, report "Bad page state" when XFS frees a log buffer so). So kernel
/// pages are never sent zero-copy to such a node (see
/// `crate::uring::send`). False when unknown.
pub fn delivered_locally(stream: &TcpStream) -> bool {
    match (stream.local_addr(), stream.peer_addr()) {
        (Ok(local), Ok(peer)) => peer.ip().is_loopback() || peer.ip() == local.ip(),
        _ => false,
    }
}

fn configure(stream: &TcpStream, timeouts: Timeouts) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeouts.connect))?;
    stream.set_write_timeout(Some(timeouts.connect))?;
    let sock = SockRef::from(stream);
    // Sent data left unacknowledged this long fails the connection (a
    // peer that stopped reading, or vanished): it is then re-established.
    sock.set_tcp_user_timeout(Some(timeouts.io))?;
    let (idle, interval, probes) = keepalive_for(timeouts.io);
    sock.set_keepalive(true)?;
    sock.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(idle)
            .with_interval(interval)
            .with_retries(probes),
    )?;
    // Zero-copy sends work without it on io_uring, but it is what the kernel
    // documents for sending from user pages; older kernels ignore the hint.
    crate::uring::enable_zerocopy(stream)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_own_address_peers_are_on_this_host() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let stream = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        assert!(delivered_locally(&stream));
    }

    #[test]
    fn a_connection_notices_a_silent_peer_within_the_io_timeout() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let stream = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let io = Duration::from_secs(7);
        configure(
            &stream,
            Timeouts {
                connect: Duration::from_secs(2),
                io,
            },
        )
        .expect("configure");
        let sock = SockRef::from(&stream);
        assert_eq!(sock.tcp_user_timeout().expect("user timeout"), Some(io));
        assert!(sock.keepalive().expect("keepalive"));
        let (idle, interval, probes) = keepalive_for(io);
        assert_eq!(sock.tcp_keepalive_time().expect("idle"), idle);
        assert_eq!(sock.tcp_keepalive_interval().expect("interval"), interval);
        assert_eq!(sock.tcp_keepalive_retries().expect("retries"), probes);
        // An idle dead peer is found within about the IO timeout.
        for secs in [1, 2, 5, 30, 3600] {
            let io = Duration::from_secs(secs);
            let (idle, interval, probes) = keepalive_for(io);
            assert!(idle + interval * probes <= io.max(Duration::from_secs(4)) + io / 2);
        }
    }
}

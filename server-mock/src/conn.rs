//! One client connection: the handshake that opens a data connection, its
//! requests taken in arrival order (executed at once, or by the node's
//! delay thread when a latency or stall fault holds them, so replies can
//! come back in any order), and the admin listener's connections.
//!
//! Data connections are driven by the node's workers ([`crate::reactor`]);
//! an admin connection has a thread of its own (rare, and never on the data
//! path).

use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use netblk_protocol::pb::{self, Status, admin::Cmd, header::Kind, request::Op};
use netblk_protocol::{FrameError, PROTOCOL_REVISION, PROTOCOL_VERSION, encode_head};
use tracing::{debug, info, warn};

use crate::exec::{Scratch, execute};
use crate::faults;
use crate::fence::{ClientOf, Member};
use crate::frames::FrameReader;
use crate::node::{Broken, Node, OwnerSeat, Volume, bump};
use crate::peer::Peer;
use crate::policy;
use crate::reply::ReplyWriter;
use crate::store::VolumeMeta;

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("connection closed in the middle of a frame ({0} bytes of it received)")]
    Truncated(usize),
    #[error("protocol violation: {0}")]
    Violation(String),
    #[error("no handshake within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("handshake refused: {0}")]
    Refused(String),
    #[error("dropped by the drop-after fault after {0} requests")]
    Dropped(u64),
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    /// An inquiry was answered: its connection ends (not an error).
    #[error("inquiry answered")]
    Answered,
}

/// A data connection after its handshake.
pub struct Conn {
    node: Arc<Node>,
    /// The node's number for this connection.
    id: u64,
    /// Its place in session fencing (none for anonymous clients, or with
    /// fencing off).
    member: Option<Arc<Member>>,
    /// The client id its handshake named (fencing's key, with the peer).
    client_id: String,
    /// Who the client is (the policy's subject).
    pub peer: Peer,
    pub volume: Arc<Volume>,
    writer: Arc<ReplyWriter>,
    /// Payloads carry a CRC-32C (data digests, asked for in the handshake).
    pub digest: bool,
    /// Requests taken off the socket so far.
    requests: AtomicU64,
    /// Requests waiting in the delay queue.
    delayed: AtomicUsize,
    /// The owner epoch the client attached with (0: none): its writes are
    /// refused once a newer owner's record is stored.
    pub owner_epoch: u64,
    _seat: Option<OwnerSeat>,
}

impl Conn {
    /// Requests of this connection still held by the delay thread.
    pub fn delayed(&self) -> usize {
        self.delayed.load(Ordering::Acquire)
    }

    /// The connection ended: its place among its client's sessions goes
    /// (nothing more from it may be applied).
    pub fn leave(&self) {
        if let Some(member) = &self.member {
            self.node.sessions.leave(
                ClientOf {
                    volume: &self.volume.name,
                    peer: &self.peer,
                    client_id: &self.client_id,
                },
                member,
            );
        }
    }

    /// True once a newer session of the same client took over.
    fn fenced(&self) -> bool {
        self.member.as_ref().is_some_and(|m| m.is_fenced())
    }

    fn begin(&self) {
        if let Some(member) = &self.member {
            member.begin();
        }
    }

    /// The request taken with [`Conn::begin`] was answered or (`applied`
    /// false) discarded.
    fn end(&self, applied: bool) {
        if let Some(member) = &self.member {
            member.end(applied);
        }
    }
}

/// A request held back by the latency knob.
pub struct Delayed {
    conn: Arc<Conn>,
    request: pb::Request,
    payload: Vec<u8>,
    /// Taken while stalled: held by the latency knob only once the stall
    /// lets it go (as if the node had not read it before).
    after_stall: Option<Duration>,
}

/// Which listener a connection came in on: the data port takes only
/// handshakes, the admin listener only admin requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Data,
    Admin,
}

/// Counts and logs why a connection ended. True if it ended on bad input
/// (the node closes it then, unless broken on purpose).
pub fn log_end(node: &Node, peer: SocketAddr, id: u64, result: &Result<(), ConnError>) -> bool {
    match result {
        Ok(()) => debug!(%peer, id, "connection closed"),
        Err(ConnError::Answered) => debug!(%peer, id, "inquiry answered, connection closed"),
        Err(ConnError::Refused(why)) => {
            bump(&node.counters.connections_refused, 1);
            warn!(%peer, "handshake refused: {why}");
        }
        Err(err @ ConnError::Dropped(_)) => {
            bump(&node.counters.dropped_connections, 1);
            info!(%peer, "closing connection: {err}");
        }
        Err(err @ ConnError::Io(_)) => info!(%peer, "connection lost: {err}"),
        Err(err) => {
            bump(&node.counters.protocol_errors, 1);
            warn!(%peer, "closing connection on bad input: {err}");
            return true;
        }
    }
    false
}

/// Serves one admin connection on its own thread until it ends, and logs
/// why it ended.
pub fn serve_admin_conn(node: Arc<Node>, stream: TcpStream, id: u64, peer: SocketAddr) {
    debug!(%peer, id, "admin connection accepted");
    let result = serve_admin_stream(&node, &stream);
    // Count and log first, close second: whoever sees the close also sees
    // the counters.
    log_end(&node, peer, id, &result);
    let _ = stream.shutdown(Shutdown::Both);
    node.unregister(id);
}

fn serve_admin_stream(node: &Arc<Node>, stream: &TcpStream) -> Result<(), ConnError> {
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(node.config.write_timeout))?;
    let timeout = node.config.handshake_timeout;
    stream.set_read_timeout(Some(timeout))?;
    let mut reader = FrameReader::new(node);
    let first = match reader.next_blocking(stream) {
        Ok(Some((header, _))) => header,
        Ok(None) => return Ok(()),
        Err(ConnError::Io(err)) if err.kind() == io::ErrorKind::TimedOut => {
            return Err(ConnError::HandshakeTimeout(timeout));
        }
        Err(err) => return Err(err),
    };
    stream.set_read_timeout(None)?;
    match first.kind {
        Some(Kind::Admin(admin)) => serve_admin(node, stream, &mut reader, admin),
        other => Err(ConnError::Violation(format!(
            "the admin listener takes admin requests only, got {}",
            kind_name(other.as_ref())
        ))),
    }
}

pub fn kind_name(kind: Option<&Kind>) -> &'static str {
    match kind {
        None => "nothing",
        Some(Kind::Handshake(_)) => "a handshake",
        Some(Kind::HandshakeReply(_)) => "a handshake reply",
        Some(Kind::Request(_)) => "a request",
        Some(Kind::Reply(_)) => "a reply",
        Some(Kind::Admin(_)) => "an admin request",
        Some(Kind::AdminReply(_)) => "an admin reply",
        Some(Kind::Inquiry(_)) => "an inquiry",
        Some(Kind::InquiryReply(_)) => "an inquiry reply",
    }
}

fn send_frame(stream: &TcpStream, header: pb::Header) -> Result<(), ConnError> {
    let mut bytes = Vec::with_capacity(128);
    encode_head(&header, 0, &mut bytes)?;
    (&*stream).write_all(&bytes)?;
    Ok(())
}

/// A handshake that was accepted: the volume, the connection's place
/// among its client's sessions (when fencing), and among the volume's
/// owners (when it presented an owner epoch).
type Accepted = (Arc<Volume>, Option<Arc<Member>>, Option<OwnerSeat>);

fn accept_handshake(
    node: &Node,
    stream: &TcpStream,
    handshake: &pb::Handshake,
    peer: &Peer,
) -> Result<Accepted, (Status, String)> {
    let refused = |why: String| (Status::Refused, why);
    if handshake.protocol_version != u32::from(PROTOCOL_VERSION) && !node.breaks(Broken::AnyVersion)
    {
        return Err(refused(format!(
            "protocol version {} is not supported; this node speaks {PROTOCOL_VERSION}",
            handshake.protocol_version
        )));
    }
    if handshake.revision != PROTOCOL_REVISION && !node.breaks(Broken::AcceptAnyRevision) {
        return Err(refused(format!(
            "the client speaks protocol revision {} (0: from before revisions); this node speaks revision {PROTOCOL_REVISION}: upgrade the client",
            handshake.revision
        )));
    }
    if !node.breaks(Broken::AnyName) {
        netblk_protocol::geometry::check_volume_name(&handshake.volume).map_err(refused)?;
    }
    // Before the volume is looked at: a client the policy keeps out learns
    // nothing of it and creates nothing.
    node.authorize(peer, &handshake.volume, policy::Op::Open)
        .map_err(refused)?;
    let layout = match handshake.layout {
        Some(layout) => layout,
        // Broken on purpose: a handshake without a layout gets one column
        // of one copy in 64 KiB stripe units.
        None if node.breaks(Broken::DefaultLayout) => pb::Layout {
            stripe_unit: 64 << 10,
            node_count: 1,
            node_index: 0,
            replicas: 1,
            replica_index: 0,
        },
        None => return Err(refused("the handshake carries no layout".to_string())),
    };
    let volume = if handshake.existing && !node.breaks(Broken::CreateWhenExisting) {
        node.existing_volume(
            &handshake.volume,
            &layout,
            handshake.volume_size,
            handshake.at_least,
        )?
    } else {
        let size = if node.breaks(Broken::OddSize) {
            handshake.volume_size.next_multiple_of(512)
        } else {
            handshake.volume_size
        };
        netblk_protocol::geometry::check_layout(size, &layout).map_err(refused)?;
        node.volume(
            &handshake.volume,
            VolumeMeta::from_handshake(handshake.volume_size, &layout),
            handshake.at_least,
        )
        .map_err(refused)?
    };
    let seat = match handshake.owner_epoch {
        0 => None,
        epoch => Some(volume.seat(epoch).map_err(refused)?),
    };
    if !node.config.fencing || handshake.client_id.is_empty() {
        return Ok((volume, None, seat));
    }
    let member = node
        .sessions
        .admit(
            ClientOf {
                volume: &handshake.volume,
                peer,
                client_id: &handshake.client_id,
            },
            handshake.session,
            stream,
            node.config.drain_timeout,
            || {
                node.faults.wake();
                node.delayed.wake();
            },
        )
        .map_err(refused)?;
    Ok((volume, Some(member), seat))
}

/// Opens a data connection with its first frame, `handshake`: the reply
/// goes out through `writer`; an accepted connection is returned, ready
/// for requests (every later frame, both ways, then carries a header
/// digest if the handshake asked for data digests).
pub fn open(
    node: &Arc<Node>,
    stream: &TcpStream,
    id: u64,
    handshake: pb::Handshake,
    peer: Peer,
    writer: &Arc<ReplyWriter>,
) -> Result<Arc<Conn>, ConnError> {
    let digest = match pb::DataDigest::try_from(handshake.data_digest) {
        Ok(d) => d == pb::DataDigest::Crc32c,
        Err(_) => {
            return Err(ConnError::Violation(format!(
                "unknown data digest {} in the handshake",
                handshake.data_digest
            )));
        }
    };
    let (volume, member, seat) = match accept_handshake(node, stream, &handshake, &peer) {
        Ok(accepted) => accepted,
        Err((status, why)) => {
            let reply = pb::HandshakeReply {
                status: status as i32,
                message: why.clone(),
                protocol_version: u32::from(PROTOCOL_VERSION),
                revision: PROTOCOL_REVISION,
                max_io_size: node.config.max_io_size,
                node_id: node.config.node_id.clone(),
                ..Default::default()
            };
            // The refusal is what matters; a failed send changes nothing.
            writer.send_header(
                node,
                &pb::Header {
                    kind: Some(Kind::HandshakeReply(reply)),
                },
            );
            return Err(ConnError::Refused(why));
        }
    };
    debug!(
        identity = %peer,
        client = handshake.client_id,
        volume = volume.name,
        session = handshake.session,
        "handshake accepted"
    );
    let reply = pb::HandshakeReply {
        status: Status::Ok as i32,
        message: String::new(),
        protocol_version: u32::from(PROTOCOL_VERSION),
        max_io_size: node.config.max_io_size,
        node_id: if node.breaks(Broken::NoNodeId) {
            String::new()
        } else {
            node.config.node_id.clone()
        },
        volume_id: volume.lineage.id.clone(),
        incarnation: if node.breaks(Broken::IncarnationPerConnection) {
            volume.lineage.incarnation ^ id
        } else {
            volume.lineage.incarnation
        },
        durable_incarnation: volume.lineage.durable_incarnation,
        volume_size: volume.meta().volume_size,
        data_digest: handshake.data_digest,
        revision: PROTOCOL_REVISION,
    };
    writer.send_header(
        node,
        &pb::Header {
            kind: Some(Kind::HandshakeReply(reply)),
        },
    );
    // From here on every frame carries a header digest, both ways.
    writer.set_digest(digest);
    Ok(Arc::new(Conn {
        node: Arc::clone(node),
        id,
        member,
        client_id: handshake.client_id,
        peer,
        volume,
        writer: Arc::clone(writer),
        digest,
        requests: AtomicU64::new(0),
        delayed: AtomicUsize::new(0),
        owner_epoch: handshake.owner_epoch,
        _seat: seat,
    }))
}

/// Applies the per-request faults, then executes the request now or queues it
/// for later.
pub fn take_request(
    conn: &Arc<Conn>,
    request: pb::Request,
    payload: &[u8],
    scratch: &mut Scratch,
) -> Result<(), ConnError> {
    let node = &conn.node;
    let total = bump(&node.counters.requests, 1);
    let faults = node.faults.get();
    if faults.crash_after > 0 && total >= faults.crash_after {
        node.crash(&format!("crash-after {} reached", faults.crash_after));
    }
    let seen = conn.requests.fetch_add(1, Ordering::Relaxed) + 1;
    if faults.drop_after > 0 && seen > faults.drop_after {
        return Err(ConnError::Dropped(faults.drop_after));
    }
    // A write's payload corrupted on its way in (fault), before any check.
    let corrupted;
    let payload = match &request.op {
        Some(Op::Write(_)) => match node.faults.take_corrupt_write(payload.len()) {
            Some((at, mask)) => {
                bump(&node.counters.corrupted_writes, 1);
                debug!(at, mask, "corrupting a write payload (fault)");
                let mut bytes = payload.to_vec();
                bytes[at] ^= mask;
                corrupted = bytes;
                &corrupted[..]
            }
            None => payload,
        },
        _ => payload,
    };
    conn.begin();
    // A stalled request waits on the delay thread, not here: the worker
    // goes on serving its other connections.
    let stalled = node.faults.stalls(&faults, conn.id);
    let delay = node.faults.delay(&faults);
    if conn.fenced() {
        conn.end(false);
    } else if delay.is_zero() && !stalled {
        let reply = execute(node, conn, &faults, &request, payload, scratch);
        if seen == 40 && node.breaks(Broken::DuplicateReply) {
            conn.writer
                .send(node, reply.clone(), &scratch.parts(), false);
        }
        conn.writer.send(node, reply, &scratch.parts(), false);
        conn.end(true);
    } else {
        conn.delayed.fetch_add(1, Ordering::AcqRel);
        let (due, after_stall) = if stalled {
            (Instant::now(), Some(delay))
        } else {
            (Instant::now() + delay, None)
        };
        node.delayed.push(
            due,
            Delayed {
                conn: Arc::clone(conn),
                request,
                payload: payload.to_vec(),
                after_stall,
            },
        );
    }
    Ok(())
}

/// The delay thread: executes held requests as they fall due.
pub fn run_delayed(node: &Node) {
    let mut scratch = Scratch::default();
    while let Some(mut job) = node.delayed.pop_due(|| node.stopping()) {
        // Its own handle: the job itself may go back into the queue.
        let conn = &Arc::clone(&job.conn);
        node.faults
            .wait_while_stalled(conn.id, || node.stopping() || conn.fenced());
        if let Some(delay) = job.after_stall.take()
            && !delay.is_zero()
            && !conn.fenced()
            && !node.stopping()
        {
            node.delayed.push(Instant::now() + delay, job);
            continue;
        }
        if conn.fenced() {
            conn.end(false);
        } else {
            let faults = node.faults.get();
            let reply = execute(
                node,
                conn,
                &faults,
                &job.request,
                &job.payload,
                &mut scratch,
            );
            conn.writer.send(node, reply, &scratch.parts(), true);
            conn.end(true);
        }
        conn.delayed.fetch_sub(1, Ordering::AcqRel);
    }
}

fn serve_admin(
    node: &Node,
    stream: &TcpStream,
    reader: &mut FrameReader,
    first: pb::Admin,
) -> Result<(), ConnError> {
    let mut next = Some(first);
    while let Some(admin) = next.take() {
        let mut reply = pb::AdminReply::default();
        match admin.cmd {
            Some(Cmd::SetFaults(faults)) => match faults::check(&faults) {
                Ok(()) => {
                    info!(?faults, "faults changed");
                    node.faults.set(faults, node.next_conn_id());
                }
                Err(why) => {
                    reply.status = Status::Invalid as i32;
                    reply.message = why;
                }
            },
            Some(Cmd::GetStats(_)) => {}
            Some(Cmd::Crash(_)) => node.crash("admin crash request"),
            None => {
                reply.status = Status::NotSupported as i32;
                reply.message = "unknown admin command".into();
            }
        }
        reply.faults = Some(node.faults.get());
        reply.stats = Some(node.stats());
        send_frame(
            stream,
            pb::Header {
                kind: Some(Kind::AdminReply(reply)),
            },
        )?;
        next = match reader.next_blocking(stream)? {
            None => None,
            Some((
                pb::Header {
                    kind: Some(Kind::Admin(admin)),
                },
                _,
            )) => Some(admin),
            Some((header, _)) => {
                return Err(ConnError::Violation(format!(
                    "expected an admin request, got {}",
                    kind_name(header.kind.as_ref())
                )));
            }
        };
    }
    Ok(())
}

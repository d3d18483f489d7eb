//! One client connection: handshake or admin first, then pipelined requests.
//!
//! The connection's thread reads frames and executes requests in arrival
//! order, batching replies until it would block on the socket. Requests held
//! by the latency knob run on the node's delay thread when due, so replies
//! can come back in any order.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use netblk_protocol::geometry::{ACTIVITY_PAGE, MAX_DIGEST_LEN};
use netblk_protocol::pb::{self, Status, admin::Cmd, header::Kind, request::Op};
use netblk_protocol::{
    Decoded, FrameError, PREAMBLE_LEN, PROTOCOL_REVISION, PROTOCOL_VERSION, decode_frame,
    encode_head, encode_head_as,
};
use prost::Message;
use tracing::{debug, info, warn};

use crate::faults;
use crate::fence::{ClientOf, Member};
use crate::node::{Broken, Node, OwnerSeat, Volume, bump};
use crate::peer::Peer;
use crate::policy;
use crate::store::VolumeMeta;

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum ConnError {
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
}

/// Replies batched before they are written, bytes.
const REPLY_BATCH: usize = 256 << 10;

/// Payloads at least this large skip the reply buffer.
const DIRECT_WRITE_MIN: usize = 32 << 10;

/// Initial read buffer; it grows up to one whole frame at most. Large, so
/// that a partial frame at its end (moved to the front before the next
/// read) is rare: with 256 KiB and 128 KiB write frames, moving them copied
/// about half the bytes a second time (seen in a guest profile: the node's
/// memmove above its receive copy).
const READ_BUF: usize = 4 << 20;

/// Reads frames off a socket into one reusable buffer.
struct FrameReader {
    stream: TcpStream,
    /// Counts what arrives (`wire_in`).
    node: Arc<Node>,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    limits: netblk_protocol::Limits,
}

impl FrameReader {
    fn new(stream: TcpStream, node: &Arc<Node>) -> Self {
        FrameReader {
            stream,
            node: Arc::clone(node),
            limits: node.limits,
            buf: vec![0; READ_BUF],
            start: 0,
            end: 0,
        }
    }

    /// The next frame, or `None` at a clean end of stream. Calls
    /// `before_block` before it waits on the socket.
    fn next_frame(
        &mut self,
        mut before_block: impl FnMut(),
    ) -> Result<Option<(pb::Header, &[u8])>, ConnError> {
        loop {
            let need = match decode_frame(&self.buf[self.start..self.end], &self.limits)? {
                Decoded::Frame(frame) => {
                    if self.node.breaks(Broken::RejectUnknownFields) {
                        // Broken on purpose: a header longer than its
                        // known fields re-encode to is refused.
                        let digest = if self.limits.header_digest { 4 } else { 0 };
                        let header_len = frame.len - PREAMBLE_LEN - frame.payload.len() - digest;
                        if frame.header.encoded_len() != header_len {
                            return Err(ConnError::Violation(
                                "a header with unknown fields".into(),
                            ));
                        }
                    }
                    let payload_at = self.start + frame.len - frame.payload.len();
                    let payload_end = self.start + frame.len;
                    self.start = payload_end;
                    return Ok(Some((frame.header, &self.buf[payload_at..payload_end])));
                }
                Decoded::NeedMore(need) => need,
            };
            // Make room for at least `need` more bytes: bounded by the limits.
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            }
            if self.end + need > self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                if self.end + need > self.buf.len() {
                    self.buf.resize(self.end + need, 0);
                }
            }
            // Replies wait while requests keep coming; once the socket has
            // nothing more, they go out before the reader sleeps.
            let n = match recv_now(&self.stream, &mut self.buf[self.end..]) {
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    before_block();
                    loop {
                        match self.stream.read(&mut self.buf[self.end..]) {
                            Ok(n) => break n,
                            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                            Err(err) => return Err(err.into()),
                        }
                    }
                }
                Err(err) => return Err(err.into()),
            };
            if n == 0 {
                let buffered = self.end - self.start;
                return if buffered == 0 {
                    Ok(None)
                } else {
                    Err(ConnError::Truncated(buffered))
                };
            }
            bump(&self.node.counters.wire_in, n as u64);
            self.end += n;
        }
    }
}

/// Reads what the socket holds right now, without waiting (`WouldBlock` if
/// nothing).
fn recv_now(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: recv writes at most `buf.len()` bytes into `buf`, which is a
        // live, exclusively borrowed slice; the descriptor belongs to `stream`.
        let n = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// The sending half of a data connection, shared with the delay thread.
/// Small replies are batched until the reader runs out of requests; a large
/// payload goes out with its header (and the batch) in one `writev`.
struct ReplyWriter {
    out: Mutex<Out>,
    raw: TcpStream,
    /// Replies carry a header digest (the connection has data digests).
    digest: bool,
}

struct Out {
    stream: TcpStream,
    pending: Vec<u8>,
}

impl Out {
    fn write_all(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = parts
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| IoSlice::new(p))
            .collect();
        let mut slices = &mut slices[..];
        while !slices.is_empty() {
            match self.stream.write_vectored(slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut slices, n),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let result = self.write_all(&[&pending]);
        self.pending = pending;
        self.pending.clear();
        result
    }
}

impl ReplyWriter {
    fn new(stream: &TcpStream, digest: bool) -> io::Result<Self> {
        Ok(ReplyWriter {
            digest,
            out: Mutex::new(Out {
                stream: stream.try_clone()?,
                pending: Vec::with_capacity(REPLY_BATCH),
            }),
            raw: stream.try_clone()?,
        })
    }

    fn send(&self, node: &Node, reply: pb::Reply, payload: &[u8], flush: bool) {
        let mut head = Vec::with_capacity(64);
        if let Err(err) = encode_head_as(
            &pb::Header::reply(reply),
            payload.len(),
            self.digest,
            &mut head,
        ) {
            warn!("cannot encode a reply: {err}");
            let _ = self.raw.shutdown(Shutdown::Both);
            return;
        }
        let mut corrupted_payload = None;
        if let Some(corruption) = node.faults.take_corrupt(&head, payload.len(), &node.limits) {
            corrupted_payload = corruption.apply(&mut head, payload);
            bump(&node.counters.corrupted_replies, 1);
            info!(
                part = ?corruption.part,
                at = corruption.at,
                mask = corruption.mask,
                "corrupting a reply frame (fault)"
            );
        }
        let payload = corrupted_payload.as_deref().unwrap_or(payload);
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let sent = if payload.len() >= DIRECT_WRITE_MIN {
            // Large data goes straight to the socket, not through the buffer.
            let pending = std::mem::take(&mut out.pending);
            let result = out.write_all(&[&pending, &head, payload]);
            out.pending = pending;
            out.pending.clear();
            result
        } else {
            out.pending.extend_from_slice(&head);
            out.pending.extend_from_slice(payload);
            if flush || out.pending.len() >= REPLY_BATCH {
                out.flush()
            } else {
                Ok(())
            }
        };
        match sent {
            Ok(()) => {
                bump(&node.counters.wire_out, (head.len() + payload.len()) as u64);
            }
            Err(err) => {
                debug!("reply not sent, closing: {err}");
                let _ = self.raw.shutdown(Shutdown::Both);
            }
        }
    }

    fn flush(&self) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(err) = out.flush() {
            debug!("replies not sent, closing: {err}");
            let _ = self.raw.shutdown(Shutdown::Both);
        }
    }
}

/// A data connection after its handshake.
struct Conn {
    node: Arc<Node>,
    /// The node's number for this connection.
    id: u64,
    /// Its place in session fencing (none for anonymous clients, or with
    /// fencing off).
    member: Option<Arc<Member>>,
    /// Who the client is (the policy's subject).
    peer: Peer,
    volume: Arc<Volume>,
    writer: ReplyWriter,
    /// Payloads carry a CRC-32C (data digests, asked for in the handshake).
    digest: bool,
    /// Requests taken off the socket so far.
    requests: AtomicU64,
    /// Requests waiting in the delay queue.
    delayed: AtomicUsize,
    /// The owner epoch the client attached with (0: none): its writes are
    /// refused once a newer owner's record is stored.
    owner_epoch: u64,
    _seat: Option<OwnerSeat>,
}

impl Conn {
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
}

/// Serves one accepted connection until it ends, and logs why it ended.
/// Which listener a connection came in on: the data port takes only
/// handshakes, the admin listener only admin requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Data,
    Admin,
}

pub fn serve(
    node: Arc<Node>,
    stream: TcpStream,
    id: u64,
    port: Port,
    peer: SocketAddr,
    client: Peer,
) {
    debug!(%peer, id, %client, "connection accepted");
    let result = serve_stream(&node, &stream, id, port, client);
    // Count and log first, close second: whoever sees the close also sees
    // the counters.
    match result {
        Ok(()) => debug!(%peer, id, "connection closed"),
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
            if node.breaks(Broken::KeepBadConnections) {
                // Broken on purpose: the connection stays open, whatever
                // comes is read and ignored until the client closes it.
                let mut sink = [0u8; 4096];
                let _ = stream.set_read_timeout(None);
                while matches!((&stream).read(&mut sink), Ok(n) if n > 0) {}
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
    node.unregister(id);
}

fn serve_stream(
    node: &Arc<Node>,
    stream: &TcpStream,
    id: u64,
    port: Port,
    client: Peer,
) -> Result<(), ConnError> {
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(node.config.write_timeout))?;
    let timeout = node.config.handshake_timeout;
    stream.set_read_timeout(Some(timeout))?;
    let mut reader = FrameReader::new(stream.try_clone()?, node);
    let first = match reader.next_frame(|| {}) {
        Ok(Some((header, _))) => header,
        Ok(None) => return Ok(()),
        Err(ConnError::Io(err))
            if matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Err(ConnError::HandshakeTimeout(timeout));
        }
        Err(err) => return Err(err),
    };
    stream.set_read_timeout(None)?;
    match (port, first.kind) {
        (Port::Data, Some(Kind::Handshake(handshake))) => {
            serve_data(node, stream, id, &mut reader, handshake, client)
        }
        (Port::Admin, Some(Kind::Admin(admin))) => serve_admin(node, stream, &mut reader, admin),
        (Port::Data, Some(Kind::Admin(_))) => Err(ConnError::Violation(
            "admin requests are not accepted on the data port (only on the node's --admin-listen address)"
                .into(),
        )),
        (Port::Data, other) => Err(ConnError::Violation(format!(
            "expected a handshake first, got {}",
            kind_name(other.as_ref())
        ))),
        (Port::Admin, other) => Err(ConnError::Violation(format!(
            "the admin listener takes admin requests only, got {}",
            kind_name(other.as_ref())
        ))),
    }
}

fn kind_name(kind: Option<&Kind>) -> &'static str {
    match kind {
        None => "nothing",
        Some(Kind::Handshake(_)) => "a handshake",
        Some(Kind::HandshakeReply(_)) => "a handshake reply",
        Some(Kind::Request(_)) => "a request",
        Some(Kind::Reply(_)) => "a reply",
        Some(Kind::Admin(_)) => "an admin request",
        Some(Kind::AdminReply(_)) => "an admin reply",
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

fn serve_data(
    node: &Arc<Node>,
    stream: &TcpStream,
    id: u64,
    reader: &mut FrameReader,
    handshake: pb::Handshake,
    peer: Peer,
) -> Result<(), ConnError> {
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
            let _ = send_frame(
                stream,
                pb::Header {
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
    send_frame(
        stream,
        pb::Header {
            kind: Some(Kind::HandshakeReply(reply)),
        },
    )?;

    // From here on every frame carries a header digest, both ways.
    reader.limits.header_digest = digest;
    let conn = Arc::new(Conn {
        node: Arc::clone(node),
        id,
        member,
        peer,
        volume,
        writer: ReplyWriter::new(stream, digest)?,
        digest,
        requests: AtomicU64::new(0),
        delayed: AtomicUsize::new(0),
        owner_epoch: handshake.owner_epoch,
        _seat: seat,
    });
    // Read data is staged here, reused from request to request.
    let mut scratch = Scratch::default();
    let result = loop {
        let frame = reader.next_frame(|| conn.writer.flush());
        let (header, payload) = match frame {
            Ok(Some(frame)) => frame,
            Ok(None) => break Ok(()),
            Err(err) => break Err(err),
        };
        let request = match header.kind {
            Some(Kind::Request(request)) => request,
            other => {
                break Err(ConnError::Violation(format!(
                    "expected a request, got {}",
                    kind_name(other.as_ref())
                )));
            }
        };
        if let Err(err) = take_request(&conn, request, payload, &mut scratch) {
            break Err(err);
        }
    };
    // Whatever ended the connection, what was accepted gets its reply
    // (unless a newer session of the client fenced it off).
    conn.writer.flush();
    drain(&conn);
    if let Some(member) = &conn.member {
        node.sessions.leave(
            ClientOf {
                volume: &handshake.volume,
                peer: &conn.peer,
                client_id: &handshake.client_id,
            },
            member,
        );
    }
    result
}

/// Waits (bounded) until every delayed request of `conn` was answered.
fn drain(conn: &Conn) {
    let deadline = Instant::now() + conn.node.config.drain_timeout;
    while conn.delayed.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(2));
    }
}

/// Applies the per-request faults, then executes the request now or queues it
/// for later.
fn take_request(
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
    node.faults
        .wait_while_stalled(conn.id, || node.stopping() || conn.fenced());
    let delay = node.faults.delay(&faults);
    if conn.fenced() {
        conn.end(false);
    } else if delay.is_zero() {
        let reply = execute(node, conn, &faults, &request, payload, scratch);
        if seen == 40 && node.breaks(Broken::DuplicateReply) {
            conn.writer
                .send(node, reply.clone(), scratch.payload(), false);
        }
        conn.writer.send(node, reply, scratch.payload(), false);
        conn.end(true);
    } else {
        conn.delayed.fetch_add(1, Ordering::AcqRel);
        node.delayed.push(
            Instant::now() + delay,
            Delayed {
                conn: Arc::clone(conn),
                request,
                payload: payload.to_vec(),
            },
        );
    }
    Ok(())
}

/// The delay thread: executes held requests as they fall due.
pub fn run_delayed(node: &Node) {
    let mut scratch = Scratch::default();
    while let Some(job) = node.delayed.pop_due(|| node.stopping()) {
        let conn = &job.conn;
        node.faults
            .wait_while_stalled(conn.id, || node.stopping() || conn.fenced());
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
            conn.writer.send(node, reply, scratch.payload(), true);
            conn.end(true);
        }
        conn.delayed.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Checks that `[offset, offset + len)` lies within the node's part of the volume.
fn in_range(volume: &Volume, offset: u64, len: u64) -> Result<(), (Status, String)> {
    match offset.checked_add(len) {
        Some(end) if end <= volume.capacity() => Ok(()),
        _ => Err((
            Status::OutOfRange,
            format!(
                "range {offset}+{len} is beyond this node's {} bytes of volume '{}'",
                volume.capacity(),
                volume.name
            ),
        )),
    }
}

/// Executes one request and returns its reply; the reply's payload (a
/// read's data) is left in `data`, which is empty otherwise.
/// Read data staged for a reply, reused from request to request. Its buffer
/// only grows and its bytes stay initialized, so a read does not zero-fill
/// it again (a guest profile of 1 MiB reads from a memory store showed that
/// fill at 9% of all samples, as much as the store's own copy).
#[derive(Default)]
struct Scratch {
    buf: Vec<u8>,
    len: usize,
}

impl Scratch {
    /// No payload.
    fn clear(&mut self) {
        self.len = 0;
    }

    /// A payload of `len` bytes, to be filled: its old contents are not
    /// cleared, the store overwrites all of them.
    fn take(&mut self, len: usize) -> &mut [u8] {
        if self.buf.len() < len {
            self.buf.resize(len, 0);
        }
        self.len = len;
        &mut self.buf[..len]
    }

    fn payload(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

fn execute(
    node: &Node,
    conn: &Conn,
    faults: &pb::Faults,
    request: &pb::Request,
    payload: &[u8],
    data: &mut Scratch,
) -> pb::Reply {
    data.clear();
    let mut reply = pb::Reply {
        id: request.id,
        ..Default::default()
    };
    if let Some(status) = node.faults.draw_error(faults) {
        bump(&node.counters.injected_errors, 1);
        reply.status = status as i32;
        reply.message = "injected error (fault)".into();
        node.counters.reply(request, &reply);
        return reply;
    }
    if let Err((status, message)) = apply(node, conn, request, payload, &mut reply, data) {
        data.clear();
        let status = if status == Status::OutOfRange && node.breaks(Broken::RangesInvalid) {
            Status::Invalid
        } else {
            status
        };
        reply.status = status as i32;
        reply.message = message;
    }
    if node.breaks(Broken::WriteReplyPayload)
        && reply.status == Status::Ok as i32
        && matches!(request.op, Some(Op::Write(_)))
    {
        data.take(8).fill(0);
    }
    node.counters.reply(request, &reply);
    reply
}

fn io_failure(what: &str, err: io::Error) -> (Status, String) {
    let status = netblk_protocol::status_of_errno(err.raw_os_error().unwrap_or(libc::EIO));
    let status = if status == Status::Ok {
        Status::IoError
    } else {
        status
    };
    (status, format!("{what} failed: {err}"))
}

fn apply(
    node: &Node,
    conn: &Conn,
    request: &pb::Request,
    payload: &[u8],
    reply: &mut pb::Reply,
    data: &mut Scratch,
) -> Result<(), (Status, String)> {
    let volume = &*conn.volume;
    let backend = &volume.backend;
    if volume.deleted() {
        return Err((
            Status::NotFound,
            format!("volume '{}' was deleted", volume.name),
        ));
    }
    let Some(op) = &request.op else {
        // The codec refuses requests without an operation; be safe anyway.
        return Err((Status::NotSupported, "no operation".into()));
    };
    let refused_on_purpose = match op {
        Op::Read(pb::Read { length: 0, .. }) | Op::Write(pb::Write { length: 0, .. }) => node
            .breaks(Broken::ZeroLengthInvalid)
            .then_some(Status::Invalid),
        Op::Write(pb::Write { fua: true, .. }) => node
            .breaks(Broken::FuaUnsupported)
            .then_some(Status::NotSupported),
        Op::Flush(_) => node
            .breaks(Broken::FlushUnsupported)
            .then_some(Status::NotSupported),
        _ => None,
    };
    if let Some(status) = refused_on_purpose {
        return Err((status, "refused (broken on purpose)".into()));
    }
    match op {
        Op::Read(read) => {
            if read.length > node.config.max_io_size && !node.breaks(Broken::NoReadLimit) {
                return Err((
                    Status::Invalid,
                    format!(
                        "read of {} bytes exceeds the max IO size {}",
                        read.length, node.config.max_io_size
                    ),
                ));
            }
            in_range(volume, read.offset, u64::from(read.length))?;
            backend
                .read(read.offset, data.take(read.length as usize))
                .map_err(|err| io_failure("read", err))?;
            bump(&node.counters.bytes_read, u64::from(read.length));
            if conn.digest {
                reply.crc32c = Some(crc32c::crc32c(data.payload()));
            }
            Ok(())
        }
        Op::Write(write) => {
            if conn.digest && !node.breaks(Broken::AcceptBadDigest) {
                check_digest(node, write, payload)?;
            }
            in_range(volume, write.offset, payload.len() as u64)?;
            let _owner = volume
                .admit_write(conn.owner_epoch)
                .map_err(|why| (Status::Refused, why))?;
            volume
                .note_change(write.offset, payload.len() as u64)
                .map_err(|err| io_failure("activity log", err))?;
            let offset = if node.breaks(Broken::UnalignedWrites) {
                write.offset & !4095
            } else {
                write.offset
            };
            let fua = write.fua && !node.breaks(Broken::FuaWithoutSync);
            backend
                .write(offset, payload, fua)
                .map_err(|err| io_failure("write", err))?;
            bump(&node.counters.bytes_written, payload.len() as u64);
            Ok(())
        }
        Op::Flush(_) => {
            if !node.breaks(Broken::AckFlushWithoutSync) {
                backend.flush().map_err(|err| io_failure("flush", err))?;
            }
            Ok(())
        }
        Op::Discard(pb::Discard { offset, length })
        | Op::WriteZeroes(pb::WriteZeroes { offset, length }) => {
            in_range(volume, *offset, *length)?;
            let _owner = volume
                .admit_write(conn.owner_epoch)
                .map_err(|why| (Status::Refused, why))?;
            volume
                .note_change(*offset, *length)
                .map_err(|err| io_failure("activity log", err))?;
            if !volume.breaks(Broken::DiscardKeepsData) {
                backend
                    .zero(*offset, *length)
                    .map_err(|err| io_failure("discard", err))?;
            }
            Ok(())
        }
        Op::Ping(ping) => {
            reply.nonce = if node.breaks(Broken::PingNoEcho) {
                0
            } else {
                ping.nonce
            };
            Ok(())
        }
        Op::Resize(resize) => {
            node.authorize(&conn.peer, &volume.name, policy::Op::Resize)
                .map_err(|why| (Status::Refused, why))?;
            node.resize(volume, resize.volume_size)
                .map_err(|why| (Status::Invalid, why))
        }
        Op::Delete(_) => {
            node.authorize(&conn.peer, &volume.name, policy::Op::Delete)
                .map_err(|why| (Status::Refused, why))?;
            node.delete(volume).map_err(|why| (Status::IoError, why))
        }
        Op::GetRecord(_) => {
            reply.record = Some(volume.record());
            reply.owner_connected = volume.owner_connected();
            Ok(())
        }
        Op::Digest(digest) => {
            if digest.length > MAX_DIGEST_LEN {
                return Err((
                    Status::Invalid,
                    format!(
                        "a digest of {} bytes exceeds {MAX_DIGEST_LEN}",
                        digest.length
                    ),
                ));
            }
            in_range(volume, digest.offset, digest.length)?;
            let chunk = u64::from(node.config.max_io_size).clamp(4096, 1 << 20);
            let mut crc = 0u32;
            let mut done = 0u64;
            while done < digest.length {
                let n = (digest.length - done).min(chunk);
                let buf = data.take(n as usize);
                backend
                    .read(digest.offset + done, buf)
                    .map_err(|err| io_failure("digest", err))?;
                crc = crc32c::crc32c_append(crc, buf);
                done += n;
            }
            // Nothing of it goes back as payload.
            data.clear();
            reply.crc32c = Some(if node.breaks(Broken::WrongDigest) {
                crc ^ 1
            } else {
                crc
            });
            Ok(())
        }
        Op::GetMissed(get) => {
            let (regions, more, since) = volume.missed.page(get.row, get.from);
            reply.missed_regions = regions;
            reply.missed_more = more;
            reply.missed_since = since;
            Ok(())
        }
        Op::GetActivity(get) => {
            let (page, more) = volume.activity.page(get.from);
            (reply.activity_regions, reply.activity_seqs) = page.into_iter().unzip();
            reply.activity_more = more;
            Ok(())
        }
        Op::TrimActivity(trim) => {
            if trim.regions.len() != trim.seqs.len() || trim.regions.len() > ACTIVITY_PAGE {
                return Err((
                    Status::Invalid,
                    format!(
                        "a trim names {} regions and {} sequence numbers (at most {ACTIVITY_PAGE}, one each)",
                        trim.regions.len(),
                        trim.seqs.len()
                    ),
                ));
            }
            // Only the owner: an older owner or a tool must not make the
            // log forget where replicas may differ.
            let _owner = volume
                .admit_write(conn.owner_epoch)
                .map_err(|why| (Status::Refused, why))?;
            if conn.owner_epoch == 0 {
                return Err((
                    Status::Refused,
                    "only the volume's owner (a connection with an owner epoch) may trim its activity log".into(),
                ));
            }
            // The missed bitmaps first: the regions about to leave the log
            // may hold their newest marks.
            volume
                .missed
                .persist(&**backend)
                .map_err(|err| io_failure("missed bitmaps", err))?;
            let entries: Vec<(u64, u64)> = trim
                .regions
                .iter()
                .copied()
                .zip(trim.seqs.iter().copied())
                .collect();
            volume
                .activity
                .trim(&**backend, &entries)
                .map_err(|err| io_failure("activity log trim", err))?;
            Ok(())
        }
        Op::PutRecord(put) => {
            let record = put.record.clone().unwrap_or_default();
            match volume.put_record(put.expected_generation, record) {
                Ok(()) => Ok(()),
                Err(crate::node::RecordError::Conflict(stored)) => {
                    let why = format!(
                        "membership record generation {} is stored, not {}",
                        stored.generation, put.expected_generation
                    );
                    reply.record = Some(*stored);
                    Err((Status::Conflict, why))
                }
                Err(crate::node::RecordError::Store(why)) => Err((
                    Status::IoError,
                    format!("cannot store the membership record: {why}"),
                )),
                Err(crate::node::RecordError::Invalid(why)) => Err((
                    Status::Invalid,
                    format!("not a membership record of this volume: {why}"),
                )),
            }
        }
    }
}

/// A write's payload against its crc32c (data digests): a mismatch writes
/// nothing and tells the client to send it again.
fn check_digest(node: &Node, write: &pb::Write, payload: &[u8]) -> Result<(), (Status, String)> {
    let Some(want) = write.crc32c else {
        return Err((
            Status::Invalid,
            "data digests are on: a write without its crc32c".into(),
        ));
    };
    let got = crc32c::crc32c(payload);
    if got == want {
        return Ok(());
    }
    bump(&node.counters.digest_errors, 1);
    warn!(
        offset = write.offset,
        len = payload.len(),
        "write payload does not match its crc32c: refused (sent again by the client)"
    );
    Err((
        Status::DigestMismatch,
        format!("payload crc32c {got:#010x}, the request says {want:#010x}: nothing written"),
    ))
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
        next = match reader.next_frame(|| {})? {
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

#[cfg(test)]
mod tests {
    use super::Scratch;

    #[test]
    fn scratch_is_sized_per_reply_and_never_filled_again() {
        let mut scratch = Scratch::default();
        assert!(scratch.payload().is_empty());
        scratch.take(8).fill(7);
        assert_eq!(scratch.payload(), &[7; 8]);
        // A reply without data has no payload.
        scratch.clear();
        assert!(scratch.payload().is_empty());
        // A shorter read gets exactly its length, and the bytes are the
        // old ones (the store overwrites them): no zero-fill per request.
        assert_eq!(scratch.take(4), &[7; 4]);
        assert_eq!(scratch.payload().len(), 4);
        // Growing adds initialized bytes.
        assert_eq!(scratch.take(12).len(), 12);
        assert_eq!(&scratch.payload()[8..], &[0; 4]);
    }
}

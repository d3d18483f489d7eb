//! The sans-IO request engine of one queue.
//!
//! It owns no socket, ring or clock. Inputs are `handle_*` calls: a block
//! request arrived, a transmit's buffer was released (send done, or its
//! zero-copy notification came), a reply header or payload arrived, a
//! connection was lost or restored, time passed. Outputs are `poll_*` calls:
//! frames to send per node, requests to complete, the next deadline.
//!
//! A block request is split into pieces by the [`Layout`]; each piece is one
//! wire request to one node. The request completes when every piece has been
//! answered **and** no send or receive still uses its buffer; its result is
//! the byte count or the first error as an errno.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use netblk_protocol::pb::{self, request::Op as WireOp};
use netblk_protocol::{encode_head_as, errno_of_status};

use crate::layout::{Layout, LiveSize};
use crate::ledger::{Acked, Ledger};
use crate::stats::QueueStats;

/// Index of a request buffer, as a ublk tag.
pub type Tag = u16;

/// Most requests one queue may have in flight.
pub const MAX_DEPTH: u16 = 4096;

const EIO: i32 = 5;
const EINVAL: i32 = 22;

/// A block operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write { fua: bool },
    Flush,
    Discard,
    WriteZeroes,
}

impl Op {
    fn has_data(self) -> bool {
        matches!(self, Op::Read | Op::Write { .. })
    }
}

/// A block request as a frontend hands it over. `tag` names its buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRequest {
    pub tag: Tag,
    pub op: Op,
    /// Byte offset in the volume (ignored by flush).
    pub offset: u64,
    /// Bytes (ignored by flush).
    pub len: u64,
}

/// Bounds and timeouts of one engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tags 0..depth may be used; at most [`MAX_DEPTH`].
    pub depth: u16,
    /// Largest data request (read or write), bytes: the size of a tag's buffer.
    pub max_io: u32,
    /// Most pieces sent and not yet answered on one connection.
    pub max_in_flight_per_node: usize,
    /// A request not complete after this long fails with EIO.
    pub io_timeout: Duration,
    /// A node down longer than this fails IO to its stripes at once with
    /// EIO instead of queueing it, until it is back.
    pub node_down_timeout: Duration,
    /// Payloads carry a CRC-32C (data digests): writes get theirs from
    /// the driver at transmit, read replies are checked by it on receipt;
    /// a mismatch is retried [`DIGEST_RETRIES`] times, then EIO.
    pub data_digest: bool,
}

/// How often a piece whose payload failed its digest is sent again before
/// its request fails with EIO.
pub const DIGEST_RETRIES: u8 = 3;

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            depth: 128,
            max_io: 1 << 20,
            max_in_flight_per_node: 1024,
            io_timeout: Duration::from_secs(30),
            node_down_timeout: Duration::from_secs(15),
            data_digest: false,
        }
    }
}

/// Part of a tag's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufSlice {
    pub tag: Tag,
    pub offset: u32,
    pub len: u32,
}

/// A frame to send to one node: `head` (preamble and header), then, for a
/// write, `payload` from the request's buffer. The caller reports
/// [`Engine::handle_buffer_released`] once the payload's buffer is no longer
/// used by the send (for zero-copy sends: at the notification).
#[derive(Debug)]
pub struct Transmit {
    pub id: u64,
    pub head: Vec<u8>,
    pub payload: Option<BufSlice>,
}

/// What to do with the payload of a reply whose header was handed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplySink {
    /// Nothing follows the header.
    Done,
    /// Receive the payload into this slice, then call [`Engine::handle_payload`].
    Buffer {
        id: u64,
        slice: BufSlice,
        /// With data digests: the payload's CRC-32C, to check on receipt.
        crc32c: Option<u32>,
    },
    /// A stale reply (its request timed out or was resent): read and drop
    /// its payload, if any.
    Discard,
}

/// How a read's payload announced by [`ReplySink::Buffer`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// Received whole (and, with data digests, it matched).
    Ok,
    /// Its connection failed first.
    Lost,
    /// Received whole, but not what its crc32c says.
    DigestMismatch,
}

/// A reply that breaks the protocol: the connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply {id} arrived from node {got}, but its request went to node {sent}")]
    WrongNode { id: u64, sent: usize, got: usize },
    #[error("reply {id} carries {got} payload bytes, expected {expected}")]
    PayloadLength { id: u64, expected: u64, got: u32 },
    #[error("second reply for request {id} while its payload is being received")]
    Duplicate { id: u64 },
    #[error("reply for request {id}, which was never sent")]
    NeverSent { id: u64 },
    #[error("read reply {id} carries no crc32c, but data digests are on")]
    MissingDigest { id: u64 },
}

/// Misuse of tags by a frontend: a bug, not an IO error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    #[error("tag {tag} is outside the queue depth {depth}")]
    OutOfRange { tag: Tag, depth: u16 },
    #[error("tag {0} is still in use")]
    Busy(Tag),
}

/// A finished block request: bytes transferred, or an errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub tag: Tag,
    pub result: Result<u64, i32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PieceState {
    Queued,
    Sent,
    Receiving,
    /// Its request timed out while its payload was arriving: the piece is
    /// done with, only the buffer it is received into stays held until the
    /// payload ends or its connection is torn down. Never sent again.
    Abandoned,
}

#[derive(Debug)]
struct PieceRec {
    tag: Tag,
    node: usize,
    op: Op,
    node_offset: u64,
    buf_offset: u64,
    len: u64,
    state: PieceState,
    /// For a flush: the node's acknowledged writes (device-wide, see
    /// [`Ledger::covers`]) when it was sent, which its success makes durable.
    covers: u64,
    sent_at: Option<Instant>,
    /// Times its payload failed a digest so far.
    digest_retries: u8,
}

#[derive(Debug, Default)]
struct Slot {
    active: bool,
    /// Distinguishes this use of the tag from earlier ones.
    seq: u64,
    len: u64,
    /// Pieces not yet answered.
    pieces: Vec<u64>,
    /// The node of every send and receive still using the buffer (one
    /// entry each).
    buf_nodes: Vec<usize>,
    errno: i32,
    timed_out: bool,
    /// What it is and when it arrived (for the latency figures).
    op: Option<Op>,
    started: Option<Instant>,
}

/// Read pieces of at least this many bytes count as big (see
/// [`Engine::big_reads_in_flight`]): a driver that can receive payloads
/// straight into request pages does so for these.
pub const BIG_READ_MIN: u64 = 16 << 10;

impl PieceRec {
    fn big_read(&self) -> bool {
        matches!(self.op, Op::Read) && self.len >= BIG_READ_MIN
    }
}

#[derive(Debug)]
struct NodeState {
    up: bool,
    /// Since when the connection is lost (None while up).
    down_since: Option<Instant>,
    /// Pieces waiting to be sent, oldest first.
    queue: VecDeque<u64>,
    in_flight: usize,
    /// Big reads among them.
    big_reads: usize,
    /// The node's incarnation of the volume on this queue's connection,
    /// once known: what the ledger attributes its acknowledgements to.
    incarnation: Option<u64>,
    /// The node no longer holds the pinned volume (it was lost and made
    /// anew): IO to its stripes fails at once.
    refused: bool,
}

/// Counters for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub requests: u64,
    pub pieces_sent: u64,
    pub pieces_resent: u64,
    pub timeouts: u64,
    pub stale_replies: u64,
    /// Connections torn down because a request timed out on them.
    pub aborts: u64,
    /// Nodes that came back as a new incarnation with acknowledged writes
    /// not known to be durable.
    pub lost_incarnations: u64,
    /// Flushes failed because a node may have lost acknowledged writes.
    pub failed_flushes: u64,
    /// Payloads that failed their digest (a write the node refused, a read
    /// reply that did not match): each was sent again, or failed its
    /// request after [`DIGEST_RETRIES`].
    pub digest_errors: u64,
}

/// The request engine of one queue; see the module docs.
pub struct Engine {
    layout: Layout,
    config: EngineConfig,
    slots: Vec<Slot>,
    pieces: HashMap<u64, PieceRec>,
    nodes: Vec<NodeState>,
    completions: VecDeque<Completion>,
    /// (deadline, tag, seq) in submission order, so deadlines only grow.
    deadlines: VecDeque<(Instant, Tag, u64)>,
    /// Nodes whose connection must be torn down (see [`Engine::poll_abort`]).
    aborts: VecDeque<usize>,
    /// The latest time handed in (for latencies).
    clock: Instant,
    /// Where the queue's figures go, if anyone reads them.
    figures: Option<Arc<QueueStats>>,
    /// The volume's size now: requests must end within it (the layout's
    /// size is where it started; see [`Engine::share_size`]).
    size: LiveSize,
    /// What the nodes acknowledged and flushed, device-wide (see
    /// [`Engine::share_ledger`]).
    ledger: Arc<Ledger>,
    next_id: u64,
    next_seq: u64,
    stats: EngineStats,
}

impl Engine {
    /// An engine for `layout`; every node starts disconnected.
    pub fn new(layout: Layout, mut config: EngineConfig) -> Engine {
        config.depth = config.depth.clamp(1, MAX_DEPTH);
        config.max_in_flight_per_node = config.max_in_flight_per_node.max(1);
        let nodes = (0..layout.node_count())
            .map(|_| NodeState {
                up: false,
                down_since: None,
                queue: VecDeque::new(),
                in_flight: 0,
                big_reads: 0,
                incarnation: None,
                refused: false,
            })
            .collect();
        Engine {
            slots: (0..config.depth).map(|_| Slot::default()).collect(),
            size: LiveSize::new(layout.size()),
            ledger: Arc::new(Ledger::new(layout.node_count())),
            layout,
            config,
            pieces: HashMap::new(),
            nodes,
            completions: VecDeque::new(),
            deadlines: VecDeque::new(),
            aborts: VecDeque::new(),
            clock: Instant::now(),
            figures: None,
            next_id: 1,
            next_seq: 1,
            stats: EngineStats::default(),
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Checks requests against `size` from now on: a handle the volume's
    /// other queues and its resize share.
    pub fn share_size(&mut self, size: LiveSize) {
        self.size = size;
    }

    /// Keeps durability in `ledger` from now on: the device's one ledger,
    /// shared by its queues (an engine alone has its own). Call before the
    /// first request.
    pub fn share_ledger(&mut self, ledger: Arc<Ledger>) {
        self.ledger = ledger;
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// Records the queue's figures (requests, latencies, per node) in
    /// `figures` from now on.
    pub fn set_figures(&mut self, figures: Arc<QueueStats>) {
        self.figures = Some(figures);
    }

    /// Stops recording figures (to measure what recording costs).
    pub fn drop_figures(&mut self) {
        self.figures = None;
    }

    pub fn figures(&self) -> Option<&Arc<QueueStats>> {
        self.figures.as_ref()
    }

    /// The time now, for latencies: the driver hands it in when it wakes,
    /// before it hands in what woke it.
    pub fn set_clock(&mut self, now: Instant) {
        self.clock = now;
    }

    /// True if no request is active.
    pub fn is_idle(&self) -> bool {
        self.slots.iter().all(|s| !s.active)
    }

    /// Tags with a request in flight.
    pub fn active_tags(&self) -> Vec<Tag> {
        (0..self.config.depth)
            .filter(|t| self.slots[usize::from(*t)].active)
            .collect()
    }

    /// A new block request on a free tag. Invalid requests (out of range,
    /// too large) complete at once with EINVAL.
    pub fn handle_request(&mut self, now: Instant, request: BlockRequest) -> Result<(), TagError> {
        let tag = request.tag;
        let depth = self.config.depth;
        let slot = self
            .slots
            .get_mut(usize::from(tag))
            .ok_or(TagError::OutOfRange { tag, depth })?;
        if slot.active {
            return Err(TagError::Busy(tag));
        }
        self.stats.requests += 1;
        self.clock = now;
        if let Some(f) = &self.figures {
            f.request_started(
                request.op,
                if request.op == Op::Flush {
                    0
                } else {
                    request.len
                },
            );
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        *slot = Slot {
            active: true,
            seq,
            len: if request.op == Op::Flush {
                0
            } else {
                request.len
            },
            pieces: std::mem::take(&mut slot.pieces),
            buf_nodes: std::mem::take(&mut slot.buf_nodes),
            op: Some(request.op),
            started: Some(now),
            ..Slot::default()
        };
        slot.pieces.clear();
        slot.buf_nodes.clear();

        let in_range = request
            .offset
            .checked_add(request.len)
            .is_some_and(|end| end <= self.size.get());
        let too_big = request.op.has_data() && request.len > u64::from(self.config.max_io);
        if request.op != Op::Flush && (!in_range || too_big) {
            slot.errno = EINVAL;
            self.try_complete(tag);
            return Ok(());
        }

        let mut new_pieces: Vec<(usize, u64, u64, u64)> = Vec::new();
        match request.op {
            Op::Read | Op::Write { .. } => new_pieces.extend(
                self.layout
                    .pieces(request.offset, request.len)
                    .map(|p| (p.node, p.node_offset, p.buf_offset, p.len)),
            ),
            Op::Discard | Op::WriteZeroes => new_pieces.extend(
                self.layout
                    .node_extents(request.offset, request.len)
                    .into_iter()
                    .map(|(node, node_offset, len)| (node, node_offset, 0, len)),
            ),
            Op::Flush => new_pieces.extend((0..self.layout.node_count()).map(|n| (n, 0, 0, 0))),
        }
        if new_pieces
            .iter()
            .any(|(node, ..)| self.node_given_up(*node, now))
        {
            let slot = &mut self.slots[usize::from(tag)];
            slot.errno = EIO;
            self.try_complete(tag);
            return Ok(());
        }
        for (node, node_offset, buf_offset, len) in new_pieces {
            let id = self.next_id;
            self.next_id += 1;
            self.pieces.insert(
                id,
                PieceRec {
                    tag,
                    node,
                    op: request.op,
                    node_offset,
                    buf_offset,
                    len,
                    state: PieceState::Queued,
                    covers: 0,
                    sent_at: None,
                    digest_retries: 0,
                },
            );
            self.nodes[node].queue.push_back(id);
            self.slots[usize::from(tag)].pieces.push(id);
        }
        self.deadlines
            .push_back((now + self.config.io_timeout, tag, seq));
        self.try_complete(tag);
        Ok(())
    }

    /// The next frame to send to `node`, if its connection is up and its
    /// in-flight bound allows.
    pub fn poll_transmit(&mut self, node: usize) -> Option<Transmit> {
        let mut head = Vec::with_capacity(64);
        // Tests: a write's digest, if asked for, is left at 0.
        let (id, payload) = self.poll_transmit_into(node, &mut head, |_| 0)?;
        Some(Transmit { id, head, payload })
    }

    /// As [`Engine::poll_transmit`], but appends the head to `head` (so a
    /// driver batches the heads of many frames in one buffer, with no
    /// allocation per frame). Returns the piece id and the payload. With
    /// data digests, `digest(payload)` gives a write payload's CRC-32C.
    pub fn poll_transmit_into(
        &mut self,
        node: usize,
        head: &mut Vec<u8>,
        mut digest: impl FnMut(BufSlice) -> u32,
    ) -> Option<(u64, Option<BufSlice>)> {
        let state = self.nodes.get_mut(node)?;
        if !state.up || state.in_flight >= self.config.max_in_flight_per_node {
            return None;
        }
        while let Some(id) = state.queue.pop_front() {
            // Pieces of timed-out requests are gone from the map: skip them.
            let Some(rec) = self.pieces.get_mut(&id) else {
                continue;
            };
            if rec.state != PieceState::Queued {
                continue;
            }
            rec.state = PieceState::Sent;
            if rec.op == Op::Flush {
                rec.covers = self.ledger.covers(node);
            }
            rec.sent_at = Some(self.clock);
            state.in_flight += 1;
            state.big_reads += usize::from(rec.big_read());
            if let Some(n) = self.figures.as_ref().and_then(|f| f.nodes.get(node)) {
                n.in_flight.set(state.in_flight as u64);
                if matches!(rec.op, Op::Write { .. }) {
                    n.sent_bytes.add(rec.len);
                }
            }
            self.stats.pieces_sent += 1;
            let len = rec.len;
            let payload = matches!(rec.op, Op::Write { .. }).then_some(BufSlice {
                tag: rec.tag,
                offset: rec.buf_offset as u32,
                len: len as u32,
            });
            let crc32c = payload.filter(|_| self.config.data_digest).map(&mut digest);
            let op = match rec.op {
                Op::Read => WireOp::Read(pb::Read {
                    offset: rec.node_offset,
                    length: len as u32,
                }),
                Op::Write { fua } => WireOp::Write(pb::Write {
                    offset: rec.node_offset,
                    length: len as u32,
                    fua,
                    crc32c,
                }),
                Op::Flush => WireOp::Flush(pb::Flush {}),
                Op::Discard => WireOp::Discard(pb::Discard {
                    offset: rec.node_offset,
                    length: len,
                }),
                Op::WriteZeroes => WireOp::WriteZeroes(pb::WriteZeroes {
                    offset: rec.node_offset,
                    length: len,
                }),
            };
            // Our own headers are small and consistent: encoding cannot fail.
            let encoded = encode_head_as(
                &pb::Header::request(id, op),
                payload.map_or(0, |p| p.len as usize),
                self.config.data_digest,
                head,
            );
            debug_assert!(encoded.is_ok(), "{encoded:?}");
            if let Some(p) = payload {
                self.slots[usize::from(p.tag)].buf_nodes.push(node);
            }
            return Some((id, payload));
        }
        None
    }

    /// The buffer of `tag` is no longer used by one earlier transmit to `node`.
    pub fn handle_buffer_released(&mut self, node: usize, tag: Tag) {
        if let Some(slot) = self.slots.get_mut(usize::from(tag)) {
            let held = slot.buf_nodes.iter().position(|n| *n == node);
            debug_assert!(held.is_some(), "buffer of tag {tag} released twice");
            if let Some(i) = held {
                slot.buf_nodes.swap_remove(i);
            }
            self.try_complete(tag);
        }
    }

    /// A reply header arrived from `node`, announcing `payload_len` bytes.
    pub fn handle_reply(
        &mut self,
        node: usize,
        reply: &pb::Reply,
        payload_len: u32,
    ) -> Result<ReplySink, ReplyError> {
        let id = reply.id;
        let Some(rec) = self.pieces.get_mut(&id) else {
            // An id this engine never gave out is a corrupted or foreign
            // reply: the connection is broken (and its pieces resent), not
            // left to wait for the deadline.
            if id == 0 || id >= self.next_id {
                return Err(ReplyError::NeverSent { id });
            }
            self.stats.stale_replies += 1;
            return Ok(ReplySink::Discard);
        };
        if rec.node != node {
            return Err(ReplyError::WrongNode {
                id,
                sent: rec.node,
                got: node,
            });
        }
        match rec.state {
            PieceState::Sent => {}
            // Sent on a connection that was lost since: it goes out again.
            PieceState::Queued => {
                self.stats.stale_replies += 1;
                return Ok(ReplySink::Discard);
            }
            PieceState::Receiving | PieceState::Abandoned => {
                return Err(ReplyError::Duplicate { id });
            }
        }
        if let Some(n) = self.figures.as_ref().and_then(|f| f.nodes.get(node)) {
            let f = self.figures.as_ref().map_or(0, |f| f.ns(self.clock));
            n.last_reply_ns.set(f);
            if let Some(sent) = rec.sent_at {
                n.piece_latency
                    .record_ns(self.clock.saturating_duration_since(sent).as_nanos() as u64);
            }
        }
        let errno = errno_of_status(reply.status);
        let expected = if errno == 0 && rec.op == Op::Read {
            rec.len
        } else {
            0
        };
        if u64::from(payload_len) != expected {
            return Err(ReplyError::PayloadLength {
                id,
                expected,
                got: payload_len,
            });
        }
        if reply.status == pb::Status::DigestMismatch as i32
            && self.config.data_digest
            && matches!(rec.op, Op::Write { .. })
        {
            self.digest_failed(id);
            return Ok(ReplySink::Done);
        }
        let crc32c = match (self.config.data_digest, expected, reply.crc32c) {
            (true, 1.., None) => return Err(ReplyError::MissingDigest { id }),
            (true, 1.., crc) => crc,
            _ => None,
        };
        if expected == 0 {
            let (op, covers) = (rec.op, rec.covers);
            let errno = if errno == 0 {
                self.acknowledged(node, op, covers)
            } else {
                errno
            };
            self.finish_piece(id, errno);
            return Ok(ReplySink::Done);
        }
        rec.state = PieceState::Receiving;
        if let Some(n) = self.figures.as_ref().and_then(|f| f.nodes.get(node)) {
            n.received_bytes.add(expected);
        }
        let slice = BufSlice {
            tag: rec.tag,
            offset: rec.buf_offset as u32,
            len: rec.len as u32,
        };
        self.slots[usize::from(rec.tag)].buf_nodes.push(node);
        Ok(ReplySink::Buffer { id, slice, crc32c })
    }

    /// Piece `id`'s payload failed its digest on the way (a write the node
    /// refused, or a read reply that did not match): it goes out again, at
    /// the front of its node's queue, or its request fails with EIO after
    /// [`DIGEST_RETRIES`] retries.
    fn digest_failed(&mut self, id: u64) {
        self.stats.digest_errors += 1;
        if let Some(f) = &self.figures {
            f.digest_errors.add(1);
        }
        let Some(rec) = self.pieces.get_mut(&id) else {
            return;
        };
        rec.digest_retries += 1;
        if rec.digest_retries > DIGEST_RETRIES {
            tracing::error!(
                node = rec.node,
                offset = rec.node_offset,
                len = rec.len,
                retries = DIGEST_RETRIES,
                "payload failed its crc32c on every try: EIO"
            );
            self.finish_piece(id, EIO);
            return;
        }
        tracing::warn!(
            node = rec.node,
            offset = rec.node_offset,
            len = rec.len,
            "payload failed its crc32c on the way: sending the request again"
        );
        rec.state = PieceState::Queued;
        let (node, big) = (rec.node, rec.big_read());
        let state = &mut self.nodes[node];
        state.in_flight = state.in_flight.saturating_sub(1);
        state.big_reads = state.big_reads.saturating_sub(usize::from(big));
        state.queue.push_front(id);
        self.stats.pieces_resent += 1;
        self.mirror_in_flight(node);
    }

    /// The payload announced by [`ReplySink::Buffer`] for `id` was received
    /// (`ok`), or its connection failed before it was (`!ok`; report the loss
    /// with [`Engine::handle_connection_lost`] next).
    pub fn handle_payload(&mut self, id: u64, ok: bool) {
        self.handle_payload_as(id, if ok { Payload::Ok } else { Payload::Lost });
    }

    /// As [`Engine::handle_payload`], with [`Payload::DigestMismatch`] for a
    /// payload received whole that failed its crc32c: read again.
    pub fn handle_payload_as(&mut self, id: u64, got: Payload) {
        let Some(rec) = self.pieces.get_mut(&id) else {
            debug_assert!(false, "payload for unknown piece {id}");
            return;
        };
        debug_assert!(matches!(
            rec.state,
            PieceState::Receiving | PieceState::Abandoned
        ));
        let tag = rec.tag;
        if let Some(slot) = self.slots.get_mut(usize::from(tag))
            && let Some(i) = slot.buf_nodes.iter().position(|n| *n == rec.node)
        {
            slot.buf_nodes.swap_remove(i);
        }
        if rec.state == PieceState::Abandoned {
            // Its request timed out: the buffer is free, the piece is done.
            self.pieces.remove(&id);
            self.try_complete(tag);
            return;
        }
        match got {
            Payload::Ok => self.finish_piece(id, 0),
            Payload::Lost => {
                rec.state = PieceState::Sent;
                self.try_complete(tag);
            }
            Payload::DigestMismatch => self.digest_failed(id),
        }
    }

    /// `node`'s connection is gone. Pieces sent on it and not answered will
    /// be sent again, first, once it is restored.
    pub fn handle_connection_lost(&mut self, now: Instant, node: usize) {
        let Some(state) = self.nodes.get_mut(node) else {
            return;
        };
        state.up = false;
        state.down_since.get_or_insert(now);
        state.in_flight = 0;
        state.big_reads = 0;
        // Abandoned pieces had their payload reported lost already; a piece
        // whose request timed out never goes out again.
        self.pieces
            .retain(|_, p| !(p.node == node && p.state == PieceState::Abandoned));
        let mut resend: Vec<u64> = self
            .pieces
            .iter()
            .filter(|(_, p)| p.node == node && p.state != PieceState::Queued)
            .map(|(id, _)| *id)
            .collect();
        resend.sort_unstable();
        for id in resend.iter().rev() {
            if let Some(rec) = self.pieces.get_mut(id) {
                debug_assert_ne!(rec.state, PieceState::Receiving, "payload not reported");
                rec.state = PieceState::Queued;
            }
            state.queue.push_front(*id);
        }
        self.stats.pieces_resent += resend.len() as u64;
        if let Some(n) = self.figures.as_ref().and_then(|f| f.nodes.get(node)) {
            n.resent.add(resend.len() as u64);
            n.in_flight.set(0);
        }
    }

    /// `node`'s connection is up (again): its queued pieces may go out.
    pub fn handle_connection_restored(&mut self, node: usize) {
        if let Some(state) = self.nodes.get_mut(node) {
            state.up = true;
            state.down_since = None;
            state.in_flight = 0;
            state.big_reads = 0;
        }
    }

    /// Time passed: requests past their deadline fail with EIO. Every
    /// connection that still holds a piece of such a request (unanswered, or
    /// its buffer in a send or receive) is to be torn down
    /// ([`Engine::poll_abort`]): that returns the buffer at once, however the
    /// node behaves, and a stale copy of the piece can never be applied
    /// later, since the node fences the old connection when the new session
    /// comes. The request completes once no IO uses its buffer.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.clock = now;
        for node in 0..self.nodes.len() {
            if self.node_given_up(node, now) && !self.nodes[node].queue.is_empty() {
                let queued: Vec<u64> = self.nodes[node].queue.drain(..).collect();
                for id in queued {
                    if self
                        .pieces
                        .get(&id)
                        .is_some_and(|p| p.state == PieceState::Queued)
                    {
                        self.finish_piece(id, EIO);
                    }
                }
            }
        }
        while let Some(&(deadline, tag, seq)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            let slot = &mut self.slots[usize::from(tag)];
            if !slot.active || slot.seq != seq || slot.timed_out {
                continue;
            }
            slot.timed_out = true;
            if slot.errno == 0 {
                slot.errno = EIO;
            }
            self.stats.timeouts += 1;
            let ids = std::mem::take(&mut slot.pieces);
            let mut abort: Vec<usize> = slot.buf_nodes.clone();
            for id in ids {
                match self.pieces.get_mut(&id).map(|p| (p.state, p.node, p)) {
                    Some((PieceState::Receiving, node, rec)) => {
                        // Finished with the request: only the buffer its
                        // payload is received into stays held, until the
                        // abort below ends the receive.
                        rec.state = PieceState::Abandoned;
                        let big = rec.big_read();
                        let n = &mut self.nodes[node];
                        n.in_flight = n.in_flight.saturating_sub(1);
                        n.big_reads = n.big_reads.saturating_sub(usize::from(big));
                        self.mirror_in_flight(node);
                        abort.push(node);
                    }
                    Some((PieceState::Sent, node, _)) => {
                        let big = self.pieces.remove(&id).is_some_and(|p| p.big_read());
                        let n = &mut self.nodes[node];
                        n.in_flight = n.in_flight.saturating_sub(1);
                        n.big_reads = n.big_reads.saturating_sub(usize::from(big));
                        self.mirror_in_flight(node);
                        abort.push(node);
                    }
                    Some((PieceState::Queued, ..)) => {
                        self.pieces.remove(&id);
                    }
                    Some((PieceState::Abandoned, ..)) | None => {}
                }
            }
            for node in abort {
                if !self.aborts.contains(&node) {
                    self.aborts.push_back(node);
                    self.stats.aborts += 1;
                    if let Some(n) = self.figures.as_ref().and_then(|f| f.nodes.get(node)) {
                        n.timeouts.add(1);
                    }
                }
            }
            self.try_complete(tag);
        }
    }

    /// A node whose connection must be torn down now (shut down and reset,
    /// so the kernel gives back every buffer it holds) and replaced by a new
    /// session: a request with a piece on it timed out. Report the loss with
    /// [`Engine::handle_connection_lost`] once the connection's operations
    /// are back, as for any lost connection.
    pub fn poll_abort(&mut self) -> Option<usize> {
        self.aborts.pop_front()
    }

    /// When [`Engine::handle_timeout`] should next be called.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let mut next = None;
        while let Some(&(deadline, tag, seq)) = self.deadlines.front() {
            let slot = &self.slots[usize::from(tag)];
            if slot.active && slot.seq == seq && !slot.timed_out {
                next = Some(deadline);
                break;
            }
            self.deadlines.pop_front();
        }
        // A down node with queued pieces is given up on at its own deadline.
        let limit = self.config.node_down_timeout;
        let node_deadline = self
            .nodes
            .iter()
            .filter(|n| !n.queue.is_empty())
            .filter_map(|n| n.down_since.map(|t| t + limit))
            .min();
        match (next, node_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// True if `node` has been down for longer than the node-down timeout,
    /// or no longer holds the volume.
    pub fn node_given_up(&self, node: usize, now: Instant) -> bool {
        self.nodes.get(node).is_some_and(|n| {
            n.refused
                || n.down_since.is_some_and(|since| {
                    now.saturating_duration_since(since) >= self.config.node_down_timeout
                })
        })
    }

    /// What `node`'s (re)connection said of the volume: its incarnation, and
    /// an earlier one whose acknowledged writes it made durable (0: none).
    /// A new incarnation while writes it acknowledged (on any queue of the
    /// device: see [`Ledger`]) are not known to be flushed means they may be
    /// lost: the next flush fails with EIO.
    pub fn handle_incarnation(&mut self, node: usize, incarnation: u64, durable_incarnation: u64) {
        let Some(n) = self.nodes.get_mut(node) else {
            return;
        };
        n.refused = false;
        n.incarnation = Some(incarnation);
        if self.ledger.observe(node, incarnation, durable_incarnation) {
            self.stats.lost_incarnations += 1;
        }
    }

    /// `node` answers, but no longer holds this volume (or holds another one
    /// under its name): IO to its stripes fails at once with EIO, queued
    /// pieces included, until [`Engine::handle_incarnation`] says it is back.
    pub fn handle_node_refused(&mut self, node: usize) {
        if let Some(n) = self.nodes.get_mut(node) {
            n.refused = true;
        }
    }

    /// Durability bookkeeping of a successful answer from `node` (in the
    /// device's ledger); the errno the piece ends with.
    fn acknowledged(&mut self, node: usize, op: Op, covers: u64) -> i32 {
        let incarnation = self.nodes[node].incarnation;
        let acked = self.ledger.acked(node, incarnation, op, covers);
        if acked == Acked::FlushFailed {
            self.stats.failed_flushes += 1;
        }
        acked.errno()
    }

    /// Read pieces of [`BIG_READ_MIN`] bytes or more sent to `node` and not
    /// answered yet: while there are none, no big payload can come.
    pub fn big_reads_in_flight(&self, node: usize) -> usize {
        self.nodes.get(node).map_or(0, |n| n.big_reads)
    }

    /// The next finished request.
    pub fn poll_completion(&mut self) -> Option<Completion> {
        self.completions.pop_front()
    }

    fn finish_piece(&mut self, id: u64, errno: i32) {
        let Some(rec) = self.pieces.remove(&id) else {
            return;
        };
        let node = &mut self.nodes[rec.node];
        node.in_flight = node.in_flight.saturating_sub(1);
        node.big_reads = node.big_reads.saturating_sub(usize::from(rec.big_read()));
        self.mirror_in_flight(rec.node);
        let slot = &mut self.slots[usize::from(rec.tag)];
        if let Some(pos) = slot.pieces.iter().position(|p| *p == id) {
            slot.pieces.swap_remove(pos);
        }
        if errno != 0 && slot.errno == 0 {
            slot.errno = errno;
        }
        self.try_complete(rec.tag);
    }

    fn mirror_in_flight(&self, node: usize) {
        if let (Some(f), Some(n)) = (&self.figures, self.nodes.get(node))
            && let Some(fig) = f.nodes.get(node)
        {
            fig.in_flight.set(n.in_flight as u64);
        }
    }

    fn try_complete(&mut self, tag: Tag) {
        let slot = &mut self.slots[usize::from(tag)];
        if !slot.active || !slot.pieces.is_empty() || !slot.buf_nodes.is_empty() {
            return;
        }
        slot.active = false;
        let result = if slot.errno != 0 {
            Err(slot.errno)
        } else {
            Ok(slot.len)
        };
        if let (Some(f), Some(op), Some(started)) = (&self.figures, slot.op, slot.started) {
            let latency = self.clock.saturating_duration_since(started).as_nanos() as u64;
            f.request_done(op, latency, slot.errno);
        }
        self.completions.push_back(Completion { tag, result });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netblk_protocol::pb::Status;

    fn engine(nodes: u32) -> Engine {
        let mut e = Engine::new(
            Layout::new(1 << 20, 4096, nodes).expect("layout"),
            EngineConfig {
                depth: 4,
                max_io: 65536,
                max_in_flight_per_node: 8,
                io_timeout: Duration::from_secs(1),
                node_down_timeout: Duration::from_secs(10),
                data_digest: false,
            },
        );
        for n in 0..nodes as usize {
            e.handle_connection_restored(n);
        }
        e
    }

    fn submit(e: &mut Engine, now: Instant, tag: Tag, op: Op, offset: u64, len: u64) {
        e.handle_request(
            now,
            BlockRequest {
                tag,
                op,
                offset,
                len,
            },
        )
        .expect("submit");
    }

    fn ok(id: u64) -> pb::Reply {
        pb::Reply {
            id,
            ..Default::default()
        }
    }

    #[test]
    fn requests_are_checked_against_the_shared_size_after_a_resize() {
        let mut e = engine(2);
        let size = LiveSize::new(1 << 20);
        e.share_size(size.clone());
        let now = Instant::now();
        submit(&mut e, now, 0, Op::Read, 1 << 20, 4096);
        assert_eq!(
            e.poll_completion(),
            Some(Completion {
                tag: 0,
                result: Err(EINVAL)
            }),
            "past the end before the resize"
        );
        size.set(2 << 20);
        submit(&mut e, now, 0, Op::Read, 1 << 20, 4096);
        assert_eq!(e.poll_completion(), None, "in range once grown");
        assert!(e.poll_transmit(0).is_some() || e.poll_transmit(1).is_some());
    }

    #[test]
    fn big_reads_in_flight_are_counted_per_node() {
        let mut e = Engine::new(
            Layout::new(1 << 20, 65536, 2).expect("layout"),
            EngineConfig {
                depth: 8,
                max_io: 65536,
                max_in_flight_per_node: 8,
                io_timeout: Duration::from_secs(1),
                node_down_timeout: Duration::from_secs(10),
                data_digest: false,
            },
        );
        e.handle_connection_restored(0);
        e.handle_connection_restored(1);
        let now = Instant::now();
        // Stripe units of 64 KiB: node 0, node 1, node 0.
        submit(&mut e, now, 0, Op::Read, 0, 65536);
        submit(&mut e, now, 1, Op::Read, 65536, 4096);
        submit(&mut e, now, 2, Op::Write { fua: false }, 2 * 65536, 65536);
        assert_eq!(e.big_reads_in_flight(0), 0, "nothing sent yet");
        let big = e.poll_transmit(0).expect("big read");
        e.poll_transmit(0).expect("write");
        e.poll_transmit(1).expect("small read");
        assert_eq!((e.big_reads_in_flight(0), e.big_reads_in_flight(1)), (1, 0));
        match e.handle_reply(0, &ok(big.id), 65536) {
            Ok(ReplySink::Buffer { id, .. }) => e.handle_payload(id, true),
            other => panic!("{other:?}"),
        }
        assert_eq!(e.big_reads_in_flight(0), 0, "answered");
        // Lost with the connection, counted again when sent again.
        submit(&mut e, now, 3, Op::Read, 0, 32768);
        e.poll_transmit(0).expect("big read");
        assert_eq!(e.big_reads_in_flight(0), 1);
        e.handle_connection_lost(now, 0);
        assert_eq!(e.big_reads_in_flight(0), 0);
        e.handle_connection_restored(0);
        while e.poll_transmit(0).is_some() {}
        assert_eq!(e.big_reads_in_flight(0), 1, "resent");
        // Timed out: gone.
        e.handle_timeout(now + Duration::from_secs(2));
        assert_eq!(e.big_reads_in_flight(0), 0);
    }

    #[test]
    fn a_write_completes_after_replies_and_buffer_release() {
        let mut e = engine(2);
        let now = Instant::now();
        submit(&mut e, now, 1, Op::Write { fua: true }, 0, 8192);
        let a = e.poll_transmit(0).expect("piece for node 0");
        let b = e.poll_transmit(1).expect("piece for node 1");
        assert_eq!(
            a.payload,
            Some(BufSlice {
                tag: 1,
                offset: 0,
                len: 4096
            })
        );
        assert_eq!(
            b.payload,
            Some(BufSlice {
                tag: 1,
                offset: 4096,
                len: 4096
            })
        );
        assert_eq!(e.handle_reply(0, &ok(a.id), 0), Ok(ReplySink::Done));
        assert_eq!(e.handle_reply(1, &ok(b.id), 0), Ok(ReplySink::Done));
        assert_eq!(e.poll_completion(), None, "zero-copy buffers still in use");
        e.handle_buffer_released(0, 1);
        assert_eq!(e.poll_completion(), None);
        e.handle_buffer_released(1, 1);
        assert_eq!(
            e.poll_completion(),
            Some(Completion {
                tag: 1,
                result: Ok(8192)
            })
        );
    }

    #[test]
    fn first_error_wins_and_maps_to_errno() {
        let mut e = engine(2);
        e.handle_request(
            Instant::now(),
            BlockRequest {
                tag: 0,
                op: Op::Read,
                offset: 0,
                len: 8192,
            },
        )
        .expect("submit");
        let a = e.poll_transmit(0).expect("a");
        let b = e.poll_transmit(1).expect("b");
        let nospc = pb::Reply {
            id: a.id,
            status: Status::NoSpace as i32,
            ..Default::default()
        };
        assert_eq!(e.handle_reply(0, &nospc, 0), Ok(ReplySink::Done));
        let sink = e.handle_reply(1, &ok(b.id), 4096).expect("sink");
        assert_eq!(
            sink,
            ReplySink::Buffer {
                id: b.id,
                slice: BufSlice {
                    tag: 0,
                    offset: 4096,
                    len: 4096
                },
                crc32c: None,
            }
        );
        assert_eq!(e.poll_completion(), None, "payload still being received");
        e.handle_payload(b.id, true);
        assert_eq!(
            e.poll_completion(),
            Some(Completion {
                tag: 0,
                result: Err(28)
            })
        );
    }

    #[test]
    fn protocol_violations_are_reported() {
        let mut e = engine(2);
        e.handle_request(
            Instant::now(),
            BlockRequest {
                tag: 0,
                op: Op::Read,
                offset: 0,
                len: 4096,
            },
        )
        .expect("submit");
        let a = e.poll_transmit(0).expect("a");
        assert!(matches!(
            e.handle_reply(1, &ok(a.id), 4096),
            Err(ReplyError::WrongNode { .. })
        ));
        assert!(matches!(
            e.handle_reply(0, &ok(a.id), 100),
            Err(ReplyError::PayloadLength { .. })
        ));
        assert_eq!(
            e.handle_reply(0, &ok(999), 0),
            Err(ReplyError::NeverSent { id: 999 }),
            "an id never given out breaks the connection"
        );
        assert!(matches!(
            e.handle_reply(0, &ok(0), 0),
            Err(ReplyError::NeverSent { .. })
        ));
    }

    #[test]
    fn flush_fans_out_and_bad_requests_fail_fast() {
        let mut e = engine(3);
        let now = Instant::now();
        e.handle_request(
            now,
            BlockRequest {
                tag: 0,
                op: Op::Flush,
                offset: 0,
                len: 0,
            },
        )
        .expect("flush");
        let ids: Vec<u64> = (0..3)
            .map(|n| e.poll_transmit(n).expect("flush piece").id)
            .collect();
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(e.poll_completion(), None);
            e.handle_reply(n, &ok(*id), 0).expect("reply");
        }
        assert_eq!(
            e.poll_completion(),
            Some(Completion {
                tag: 0,
                result: Ok(0)
            })
        );

        submit(&mut e, now, 1, Op::Read, 1 << 20, 512);
        assert_eq!(
            e.poll_completion(),
            Some(Completion {
                tag: 1,
                result: Err(EINVAL)
            })
        );
        submit(&mut e, now, 1, Op::Write { fua: false }, 0, 65537);
        assert_eq!(
            e.poll_completion(),
            Some(Completion {
                tag: 1,
                result: Err(EINVAL)
            })
        );
        assert_eq!(
            e.handle_request(
                now,
                BlockRequest {
                    tag: 9,
                    op: Op::Flush,
                    offset: 0,
                    len: 0
                }
            ),
            Err(TagError::OutOfRange { tag: 9, depth: 4 })
        );
    }

    #[test]
    fn lost_connection_resends_and_timeout_fails_with_eio() {
        let mut e = engine(1);
        let t0 = Instant::now();
        submit(&mut e, t0, 0, Op::Write { fua: false }, 0, 4096);
        let first = e.poll_transmit(0).expect("sent");
        e.handle_connection_lost(t0, 0);
        e.handle_buffer_released(0, 0);
        assert!(e.poll_transmit(0).is_none(), "nothing goes out while down");
        e.handle_connection_restored(0);
        let again = e.poll_transmit(0).expect("resent");
        assert_eq!(again.id, first.id);
        e.handle_buffer_released(0, 0);
        assert_eq!(e.stats().pieces_resent, 1);

        assert_eq!(e.poll_timeout(), Some(t0 + Duration::from_secs(1)));
        e.handle_timeout(t0 + Duration::from_millis(999));
        assert_eq!(e.poll_completion(), None);
        e.handle_timeout(t0 + Duration::from_secs(1));
        assert_eq!(
            e.poll_completion(),
            Some(Completion {
                tag: 0,
                result: Err(EIO)
            })
        );
        assert_eq!(
            e.handle_reply(0, &ok(again.id), 0),
            Ok(ReplySink::Discard),
            "late reply is stale"
        );
        assert_eq!(e.poll_timeout(), None);
    }

    #[test]
    fn a_timeout_aborts_the_connections_that_hold_its_pieces() {
        let mut e = engine(3);
        let t0 = Instant::now();
        // Pieces on nodes 0, 1 and 2.
        submit(&mut e, t0, 0, Op::Write { fua: false }, 0, 3 * 4096);
        let a = e.poll_transmit(0).expect("a");
        let b = e.poll_transmit(1).expect("b");
        let c = e.poll_transmit(2).expect("c");
        // Node 1 answered and its send is done; node 2 answered but its
        // zero-copy notification is still out; node 0 is silent.
        e.handle_reply(1, &ok(b.id), 0).expect("b reply");
        e.handle_buffer_released(1, 0);
        e.handle_reply(2, &ok(c.id), 0).expect("c reply");
        assert_eq!(e.poll_abort(), None);
        e.handle_timeout(t0 + Duration::from_secs(1));
        assert_eq!(e.poll_abort(), Some(0), "the silent node holds a piece");
        assert_eq!(e.poll_abort(), Some(2), "node 2 still holds the buffer");
        assert_eq!(e.poll_abort(), None);
        assert_eq!(e.stats().aborts, 2);
        assert_eq!(e.poll_completion(), None, "buffers still in the kernel");
        // The aborts give the buffers back.
        e.handle_buffer_released(0, 0);
        e.handle_buffer_released(2, 0);
        assert_eq!(
            e.poll_completion(),
            Some(Completion {
                tag: 0,
                result: Err(EIO)
            })
        );
        assert_eq!(e.handle_reply(0, &ok(a.id), 0), Ok(ReplySink::Discard));
    }

    fn flush(e: &mut Engine, now: Instant, tag: Tag) -> Vec<u64> {
        submit(e, now, tag, Op::Flush, 0, 0);
        (0..e.layout().node_count())
            .map(|n| e.poll_transmit(n).expect("flush piece").id)
            .collect()
    }

    fn write_acked(e: &mut Engine, now: Instant, tag: Tag, node: usize, fua: bool) {
        submit(e, now, tag, Op::Write { fua }, node as u64 * 4096, 4096);
        let t = e.poll_transmit(node).expect("write piece");
        e.handle_reply(node, &ok(t.id), 0).expect("reply");
        e.handle_buffer_released(node, tag);
        assert_eq!(e.poll_completion().map(|c| c.result), Some(Ok(4096)));
    }

    #[test]
    fn a_node_that_lost_acknowledged_writes_fails_the_next_flush_once() {
        let mut e = engine(2);
        let now = Instant::now();
        e.handle_incarnation(0, 7, 0);
        e.handle_incarnation(1, 9, 0);
        write_acked(&mut e, now, 0, 0, false);
        // Node 0 restarts as incarnation 8, nothing vouched for.
        e.handle_connection_lost(now, 0);
        e.handle_incarnation(0, 8, 0);
        e.handle_connection_restored(0);
        // A FUA write in that window fails too.
        submit(&mut e, now, 1, Op::Write { fua: true }, 0, 4096);
        let t = e.poll_transmit(0).expect("fua piece");
        e.handle_reply(0, &ok(t.id), 0).expect("reply");
        e.handle_buffer_released(0, 1);
        assert_eq!(e.poll_completion().map(|c| c.result), Some(Err(EIO)));
        let ids = flush(&mut e, now, 2);
        for (n, id) in ids.iter().enumerate() {
            e.handle_reply(n, &ok(*id), 0).expect("reply");
        }
        assert_eq!(e.poll_completion().map(|c| c.result), Some(Err(EIO)));
        assert_eq!(e.stats().failed_flushes, 1);
        // Reported once: the next flush is fine.
        let ids = flush(&mut e, now, 2);
        for (n, id) in ids.iter().enumerate() {
            e.handle_reply(n, &ok(*id), 0).expect("reply");
        }
        assert_eq!(e.poll_completion().map(|c| c.result), Some(Ok(0)));
    }

    /// Issue 21, point 1: the acknowledged writes, what flushes cover and
    /// the lost mark belong to the device, not to the queue that saw them.
    #[test]
    fn a_flush_through_another_queue_fails_over_writes_the_node_lost() {
        let ledger = Arc::new(Ledger::new(1));
        let (mut q0, mut q1) = (engine(1), engine(1));
        q0.share_ledger(Arc::clone(&ledger));
        q1.share_ledger(Arc::clone(&ledger));
        let now = Instant::now();
        q0.handle_incarnation(0, 7, 0);
        q1.handle_incarnation(0, 7, 0);
        write_acked(&mut q0, now, 0, 0, false);
        // The node restarts (a volatile cache: not vouched for); queue 1
        // reconnects first and flushes.
        q1.handle_connection_lost(now, 0);
        q1.handle_incarnation(0, 8, 0);
        q1.handle_connection_restored(0);
        let ids = flush(&mut q1, now, 0);
        q1.handle_reply(0, &ok(ids[0]), 0).expect("reply");
        assert_eq!(
            q1.poll_completion().map(|c| c.result),
            Some(Err(EIO)),
            "queue 0's acknowledged write is gone"
        );
        // Queue 0 comes back too: reported once for the device, so its
        // FUA writes and flushes, which queue 1's flush covered, succeed.
        q0.handle_connection_lost(now, 0);
        q0.handle_incarnation(0, 8, 0);
        q0.handle_connection_restored(0);
        write_acked(&mut q0, now, 1, 0, true);
        let ids = flush(&mut q0, now, 2);
        q0.handle_reply(0, &ok(ids[0]), 0).expect("reply");
        assert_eq!(q0.poll_completion().map(|c| c.result), Some(Ok(0)));
        assert_eq!(
            q0.stats().lost_incarnations + q1.stats().lost_incarnations,
            1
        );
    }

    /// Issue 21, point 3: a read whose payload was arriving at its deadline
    /// is finished with its request; the connection's reset must not put
    /// it back, so a node that then stalls cannot hold it forever.
    #[test]
    fn a_read_that_timed_out_mid_payload_is_never_sent_again() {
        let mut e = engine(1);
        let t0 = Instant::now();
        submit(&mut e, t0, 0, Op::Read, 0, 4096);
        let t = e.poll_transmit(0).expect("read piece");
        let sink = e.handle_reply(0, &ok(t.id), 4096).expect("reply");
        assert!(matches!(sink, ReplySink::Buffer { .. }));
        e.handle_timeout(t0 + Duration::from_secs(1));
        assert_eq!(e.poll_abort(), Some(0), "the receive holds the buffer");
        assert_eq!(e.poll_completion(), None, "the buffer is still in use");
        // The abort ends the receive, then the connection is reported lost.
        e.handle_payload(t.id, false);
        e.handle_connection_lost(t0 + Duration::from_secs(1), 0);
        assert_eq!(
            e.poll_completion(),
            Some(Completion {
                tag: 0,
                result: Err(EIO)
            })
        );
        e.handle_connection_restored(0);
        assert!(e.poll_transmit(0).is_none(), "nothing goes out again");
        assert!(e.is_idle());
        assert_eq!(e.poll_timeout(), None);
        // Also when the payload completes after the deadline.
        submit(&mut e, t0, 1, Op::Read, 0, 4096);
        let t = e.poll_transmit(0).expect("read piece");
        e.handle_reply(0, &ok(t.id), 4096).expect("reply");
        e.handle_timeout(t0 + Duration::from_secs(1));
        e.handle_payload(t.id, true);
        assert_eq!(e.poll_completion().map(|c| c.result), Some(Err(EIO)));
        e.handle_connection_lost(t0 + Duration::from_secs(1), 0);
        e.handle_connection_restored(0);
        assert!(e.poll_transmit(0).is_none());
    }

    #[test]
    fn a_restart_after_a_flush_or_vouched_for_loses_nothing() {
        let mut e = engine(1);
        let now = Instant::now();
        e.handle_incarnation(0, 1, 0);
        write_acked(&mut e, now, 0, 0, false);
        let ids = flush(&mut e, now, 1);
        e.handle_reply(0, &ok(ids[0]), 0).expect("reply");
        assert_eq!(e.poll_completion().map(|c| c.result), Some(Ok(0)));
        // Restart after the flush: nothing was unflushed.
        e.handle_incarnation(0, 2, 0);
        // A write, then a restart whose store made incarnation 2 durable.
        write_acked(&mut e, now, 0, 0, false);
        e.handle_incarnation(0, 3, 2);
        // A write acknowledged after a flush was sent is not covered by it.
        let ids = flush(&mut e, now, 1);
        write_acked(&mut e, now, 0, 0, false);
        e.handle_reply(0, &ok(ids[0]), 0).expect("reply");
        assert_eq!(e.poll_completion().map(|c| c.result), Some(Ok(0)));
        e.handle_incarnation(0, 4, 0);
        let ids = flush(&mut e, now, 1);
        e.handle_reply(0, &ok(ids[0]), 0).expect("reply");
        assert_eq!(
            e.poll_completion().map(|c| c.result),
            Some(Err(EIO)),
            "the write after the flush was lost with incarnation 3"
        );
        assert_eq!(e.stats().lost_incarnations, 1);
    }

    #[test]
    fn a_refused_node_fails_its_stripes_at_once() {
        let mut e = engine(2);
        let now = Instant::now();
        e.handle_connection_lost(now, 1);
        e.handle_node_refused(1);
        submit(&mut e, now, 0, Op::Write { fua: false }, 4096, 4096);
        assert_eq!(e.poll_completion().map(|c| c.result), Some(Err(EIO)));
        submit(&mut e, now, 0, Op::Read, 0, 4096);
        assert!(e.poll_transmit(0).is_some(), "node 0 still serves");
        e.handle_incarnation(1, 5, 0);
        assert!(!e.node_given_up(1, now));
    }
}

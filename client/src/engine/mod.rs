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
//!
//! Replicated volumes (see `members`): a write, discard or flush of a column
//! becomes one piece per member of its in-sync set, all from the same slice
//! of the request buffer; a read goes to one member and moves to another
//! when that one fails. A member that fails is reported to the device's
//! [`Membership`] and its pieces are held until the record without it is
//! durable, then completed without it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

mod api;
mod deadlines;
mod members;
#[cfg(test)]
mod replica_tests;
mod replies;
#[cfg(test)]
mod tests;
mod transmit;

pub use api::*;

use crate::layout::{Layout, LiveSize};
use crate::ledger::{Acked, Ledger};
use crate::membership::{Membership, View};
use crate::stats::QueueStats;

const EIO: i32 = 5;
const EINVAL: i32 = 22;

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
    /// The stripe column it belongs to.
    column: usize,
    /// Reads: the replica rows tried so far (a read moves to another
    /// member when one fails).
    tried: u32,
    op: Op,
    node_offset: u64,
    buf_offset: u64,
    len: u64,
    state: PieceState,
    /// For a flush: the node's acknowledged writes (device-wide, see
    /// [`Ledger::covers`]) when it was sent, which its success makes durable.
    covers: u64,
    sent_at: Option<Instant>,
    /// When its member got it (queued there first, or moved there from a
    /// member that failed): its replica timeout counts from then.
    given: Instant,
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
    /// A change of a replicated volume: counted device-wide while in
    /// flight, in this slot of the membership's write epochs.
    write_epoch: Option<u8>,
    /// Its ranges, counted in flight by the membership's region gate while
    /// a copier runs (see `regions`).
    gated: Option<Vec<crate::regions::Range>>,
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
    /// A replica that failed and waits to leave its column's in-sync set:
    /// nothing more is sent to it; the pieces it owes are held.
    failing: bool,
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
    /// Replicas this queue found failed (reported to the membership).
    pub member_failures: u64,
    /// Reads moved to another replica.
    pub reads_moved: u64,
    /// Pieces completed without a replica that left the in-sync set.
    pub pieces_skipped: u64,
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
    /// The same at the replica timeout (replicated volumes only): a member
    /// that still owes a piece then has failed.
    replica_deadlines: VecDeque<(Instant, Tag, u64)>,
    /// The device's membership, and the view of it this engine works with.
    membership: Arc<Membership>,
    /// Changes waiting for a region a copier holds (tag, use, request), in
    /// arrival order, and the gate's version when they were last tried.
    parked: VecDeque<(Tag, u64, BlockRequest)>,
    gate_version: u64,
    view: Arc<View>,
    view_version: u64,
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
                failing: false,
            })
            .collect();
        let membership = Membership::all_in_sync(*layout.replication());
        Engine {
            view: membership.view(),
            view_version: membership.version(),
            membership,
            parked: VecDeque::new(),
            gate_version: 0,
            replica_deadlines: VecDeque::new(),
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

    /// Follows `membership` (the device's, shared by its queues) from now
    /// on. Call before the first request.
    pub fn share_membership(&mut self, membership: Arc<Membership>) {
        self.view = membership.view();
        self.view_version = membership.version();
        self.membership = membership;
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
            write_epoch: (self.layout.replicas() > 1 && request.op.changes())
                .then(|| self.membership.writes.enter()),
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

        self.refresh_view(now);
        // A replicated device's change to a region a copier holds waits
        // for it (its deadline runs meanwhile).
        if self.layout.replicas() > 1 && request.op.changes() && self.membership.gate.active() {
            let ranges = self.layout.column_extents(request.offset, request.len);
            if !self.membership.gate.enter(&ranges) {
                self.parked.push_back((tag, seq, request));
                // Its replica deadline starts when its pieces go out.
                self.deadlines
                    .push_back((now + self.config.io_timeout, tag, seq));
                return Ok(());
            }
            self.slots[usize::from(tag)].gated = Some(ranges);
        }
        self.start_pieces(request, now);
        self.deadlines
            .push_back((now + self.config.io_timeout, tag, seq));
        self.push_replica_deadline(now, tag, seq);
        self.try_complete(tag);
        Ok(())
    }

    /// The replica deadline of request `tag` (use `seq`) whose pieces went
    /// out at `now`: a member that owes one of them then has failed.
    fn push_replica_deadline(&mut self, now: Instant, tag: Tag, seq: u64) {
        if self.layout.replicas() > 1 {
            let at = now + self.config.replica_timeout;
            // In time order (a piece moved to another member pushes one
            // later than its request's first).
            let i = self.replica_deadlines.partition_point(|d| d.0 <= at);
            self.replica_deadlines.insert(i, (at, tag, seq));
        }
    }

    /// Waiting changes whose regions a copier released go on (in order).
    fn admit_parked(&mut self, now: Instant) {
        if self.parked.is_empty() {
            return;
        }
        let gate = &self.membership.gate;
        let version = gate.version();
        if version == self.gate_version {
            return;
        }
        self.gate_version = version;
        let waiting = std::mem::take(&mut self.parked);
        for (tag, seq, request) in waiting {
            let slot = &self.slots[usize::from(tag)];
            if !slot.active || slot.seq != seq || slot.timed_out {
                continue;
            }
            let gate = &self.membership.gate;
            if gate.active() {
                let ranges = self.layout.column_extents(request.offset, request.len);
                if !gate.enter(&ranges) {
                    self.parked.push_back((tag, seq, request));
                    continue;
                }
                self.slots[usize::from(tag)].gated = Some(ranges);
            }
            self.start_pieces(request, now);
            self.push_replica_deadline(now, tag, seq);
            self.try_complete(tag);
        }
    }

    /// The pieces of `request` (its slot taken, in range), queued on their
    /// nodes; a request none of whose pieces can go fails with EIO.
    fn start_pieces(&mut self, request: BlockRequest, now: Instant) {
        let tag = request.tag;
        // (column, offset on its nodes, buffer offset, length)
        let mut new_pieces: Vec<(usize, u64, u64, u64)> = Vec::new();
        match request.op {
            Op::Read | Op::Write { .. } => new_pieces.extend(
                self.layout
                    .pieces(request.offset, request.len)
                    .map(|p| (p.column, p.node_offset, p.buf_offset, p.len)),
            ),
            Op::Discard | Op::WriteZeroes => new_pieces.extend(
                self.layout
                    .column_extents(request.offset, request.len)
                    .into_iter()
                    .map(|(column, offset, len)| (column, offset, 0, len)),
            ),
            Op::Flush => new_pieces.extend((0..self.layout.columns()).map(|c| (c, 0, 0, 0))),
        }
        let Some(targets) = self.targets(request.op, &new_pieces, now) else {
            let slot = &mut self.slots[usize::from(tag)];
            slot.errno = EIO;
            return;
        };
        for ((column, node_offset, buf_offset, len), node) in targets {
            let tried = if request.op == Op::Read {
                1 << self.layout.replication().row_of(node)
            } else {
                0
            };
            self.add_piece(
                PieceRec {
                    tag,
                    node,
                    column,
                    tried,
                    op: request.op,
                    node_offset,
                    buf_offset,
                    len,
                    state: PieceState::Queued,
                    covers: 0,
                    sent_at: None,
                    given: now,
                    digest_retries: 0,
                },
                false,
            );
        }
    }

    /// Enters `rec` as a new piece of its request, queued on its node (at
    /// the front with `first`).
    fn add_piece(&mut self, rec: PieceRec, first: bool) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let (node, tag) = (rec.node, rec.tag);
        self.pieces.insert(id, rec);
        if first {
            self.nodes[node].queue.push_front(id);
        } else {
            self.nodes[node].queue.push_back(id);
        }
        self.slots[usize::from(tag)].pieces.push(id);
        id
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
        for id in &resend {
            if let Some(rec) = self.pieces.get_mut(id) {
                debug_assert_ne!(rec.state, PieceState::Receiving, "payload not reported");
                rec.state = PieceState::Queued;
            }
        }
        // Reads it owed go to another replica at once, where there is one.
        resend.retain(|id| !self.move_read(*id));
        let state = &mut self.nodes[node];
        for id in resend.iter().rev() {
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
            // A replica that may have lost acknowledged writes is not in
            // sync: it leaves while another member vouches for them.
            let now = self.clock;
            self.fail_member(node, "restarted and may have lost acknowledged writes", now);
        }
    }

    /// `node` answers, but no longer holds this volume (or holds another one
    /// under its name): IO to its stripes fails at once with EIO, queued
    /// pieces included, until [`Engine::handle_incarnation`] says it is back.
    pub fn handle_node_refused(&mut self, node: usize) {
        let now = self.clock;
        if self.fail_member(node, "no longer holds the volume", now) {
            return;
        }
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
        let Some(rec) = self.take_piece(id) else {
            return;
        };
        let slot = &mut self.slots[usize::from(rec.tag)];
        if errno != 0 && slot.errno == 0 {
            slot.errno = errno;
        }
        self.try_complete(rec.tag);
    }

    /// Piece `id` out of the books: no longer in flight on its node, no
    /// longer one its request waits for (the request is not completed).
    fn take_piece(&mut self, id: u64) -> Option<PieceRec> {
        let rec = self.pieces.remove(&id)?;
        if matches!(rec.state, PieceState::Sent | PieceState::Receiving) {
            self.landed(rec.node, rec.big_read());
        }
        let slot = &mut self.slots[usize::from(rec.tag)];
        if let Some(pos) = slot.pieces.iter().position(|p| *p == id) {
            slot.pieces.swap_remove(pos);
        }
        Some(rec)
    }

    /// A piece (a big read, if `big`) is no longer in flight on `node`.
    fn landed(&mut self, node: usize, big: bool) {
        let n = &mut self.nodes[node];
        n.in_flight = n.in_flight.saturating_sub(1);
        n.big_reads = n.big_reads.saturating_sub(usize::from(big));
        self.mirror_in_flight(node);
    }

    /// Piece `id`, sent or being received, goes back to its node's queue
    /// (at the front with `first`), to be sent again when the node may take
    /// it.
    fn requeue(&mut self, id: u64, first: bool) {
        let Some(rec) = self.pieces.get_mut(&id) else {
            return;
        };
        let in_flight = matches!(rec.state, PieceState::Sent | PieceState::Receiving);
        rec.state = PieceState::Queued;
        let (node, big) = (rec.node, rec.big_read());
        if in_flight {
            self.landed(node, big);
        }
        let queue = &mut self.nodes[node].queue;
        if first {
            queue.push_front(id);
        } else {
            queue.push_back(id);
        }
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
        if let Some(epoch) = slot.write_epoch.take() {
            self.membership.writes.leave(epoch);
        }
        if let Some(ranges) = slot.gated.take() {
            self.membership.gate.leave(&ranges);
        }
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

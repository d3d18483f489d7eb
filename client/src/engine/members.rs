//! Replicas on the data path: which members a piece goes to, reads moved
//! to another member, members found failed, and the membership's view
//! followed (pieces a departed member owed completed without it).
//!
//! With one replica every column has one member that can never leave, and
//! none of this changes what the engine does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{EIO, Engine, Op, PieceRec, PieceState};

/// How often a queue holding pieces for a failed member looks at the
/// membership again (the manager publishes the shrink in between).
pub(super) const HOLD_TICK: Duration = Duration::from_millis(20);

/// (column, offset on its nodes, buffer offset, length)
type ColumnPiece = (usize, u64, u64, u64);

impl Engine {
    /// Takes the membership's newest view if it moved: pieces owed by
    /// members no longer in sync are completed without them (their
    /// removal is durable), reads among them move; once fenced, every
    /// piece fails.
    pub(super) fn refresh_view(&mut self, now: Instant) {
        let version = self.membership.version();
        if version == self.view_version {
            return;
        }
        self.view_version = version;
        let old = std::mem::replace(&mut self.view, self.membership.view());
        let fenced = self.view.fenced;
        let replication = *self.layout.replication();
        // Members joining now: their time down counts from the join (they
        // answered a probe), and a refusal from before is forgotten.
        for node in 0..self.nodes.len() {
            let (column, row) = (replication.column_of(node), replication.row_of(node));
            if self.view.joining(column, row) && !old.takes_writes(column, row) {
                let n = &mut self.nodes[node];
                n.refused = false;
                if !n.up {
                    n.down_since = Some(now);
                }
            }
        }
        // Members another queue found failed: none of ours go there either.
        for node in 0..self.nodes.len() {
            if !self.nodes[node].failing && self.membership.is_failed(node) {
                self.fail_member(node, "failed on another queue", now);
            }
        }
        let gone: Vec<usize> = (0..self.nodes.len())
            .filter(|n| {
                fenced
                    || !self
                        .view
                        .takes_writes(replication.column_of(*n), replication.row_of(*n))
            })
            .collect();
        for node in gone {
            self.nodes[node].failing = false;
            let mut owed: Vec<u64> = self
                .pieces
                .iter()
                .filter(|(_, p)| p.node == node && p.state != PieceState::Abandoned)
                .map(|(id, _)| *id)
                .collect();
            owed.sort_unstable();
            let mut abort = false;
            for id in owed {
                let Some(rec) = self.pieces.get(&id) else {
                    continue;
                };
                if rec.state == PieceState::Receiving {
                    // Its payload ends (or is cut off by the abort) first.
                    abort = true;
                    continue;
                }
                abort |= rec.state == PieceState::Sent;
                if fenced {
                    self.finish_piece(id, EIO);
                } else if rec.op == Op::Read {
                    if !self.move_read(id) {
                        self.finish_piece(id, EIO);
                    }
                } else {
                    self.stats.pieces_skipped += 1;
                    self.finish_piece(id, 0);
                }
            }
            self.nodes[node].queue.clear();
            // Whatever of ours it still holds in a send or receive comes
            // back at once, and nothing more of ours lands there; an idle
            // connection ends too: a member that joins again (perhaps a
            // replacement at another address) is reached anew.
            if abort
                || self.nodes[node].up
                || self.slots.iter().any(|s| s.buf_nodes.contains(&node))
            {
                self.abort(node);
            }
        }
    }

    /// The node of every piece of a new request: every in-sync and every
    /// joining member of the column for writes, discards and flushes; one
    /// in-sync member for a read. None when the request must fail at once
    /// (fenced, or a column none of whose in-sync members can take it). A
    /// joiner that cannot take it leaves instead.
    pub(super) fn targets(
        &mut self,
        op: Op,
        pieces: &[ColumnPiece],
        now: Instant,
    ) -> Option<Vec<(ColumnPiece, usize)>> {
        if self.view.fenced {
            return None;
        }
        let replication = *self.layout.replication();
        let mut out = Vec::with_capacity(pieces.len() * replication.replicas() as usize);
        for piece in pieces {
            let column = piece.0;
            if op == Op::Read {
                let stripe = self.stripe_of(column, piece.1);
                let node = self.read_member(column, stripe, 0)?;
                if self.node_given_up(node, now) {
                    return None;
                }
                out.push((*piece, node));
                continue;
            }
            for node in replication.members(column) {
                let row = replication.row_of(node);
                if self.view.joining(column, row) {
                    self.check_down(node, now);
                    if self.node_given_up(node, now) {
                        self.fail_member(node, "gave up on it while it was joining", now);
                    }
                    // A failing joiner's piece is held like any member's,
                    // until the record without it is stored.
                    out.push((*piece, node));
                    continue;
                }
                if !self.view.in_sync(column, row) {
                    continue;
                }
                self.check_down(node, now);
                if self.node_given_up(node, now) {
                    return None;
                }
                out.push((*piece, node));
            }
        }
        Some(out)
    }

    /// What spreads reads of `column` over its members: the stripe unit's
    /// index within the column (so consecutive units of a column go to
    /// different members), shifted by the column (so do the first units
    /// of different columns).
    fn stripe_of(&self, column: usize, offset: u64) -> u64 {
        let su = u64::from(self.layout.stripe_unit());
        offset / su + column as u64
    }

    /// The member a read of stripe unit `stripe` goes to: the in-sync
    /// members not failed and not in `tried` (rows), the one at `stripe`
    /// modulo their number (so each stripe unit is read from the same
    /// member while nothing changes), or the next one whose connection is
    /// up if that one's is not.
    fn read_member(&self, column: usize, stripe: u64, tried: u32) -> Option<usize> {
        let replication = self.layout.replication();
        let candidates: Vec<usize> = replication
            .members(column)
            .enumerate()
            .filter(|(row, node)| {
                self.view.in_sync(column, *row)
                    && tried & (1 << row) == 0
                    && !self.nodes[*node].failing
            })
            .map(|(_, node)| node)
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let start = (stripe % candidates.len() as u64) as usize;
        (0..candidates.len())
            .map(|i| candidates[(start + i) % candidates.len()])
            .find(|n| self.nodes[*n].up)
            .or(Some(candidates[start]))
    }

    /// Moves read piece `id` to another in-sync member it was not tried on
    /// (replicated volumes). False if it is not a read or there is none:
    /// the piece stays where it is.
    pub(super) fn move_read(&mut self, id: u64) -> bool {
        if self.layout.replicas() == 1 {
            return false;
        }
        let Some(rec) = self.pieces.get(&id) else {
            return false;
        };
        if rec.op != Op::Read || rec.state == PieceState::Receiving {
            return false;
        }
        let stripe = self.stripe_of(rec.column, rec.node_offset);
        let Some(node) = self.read_member(rec.column, stripe, rec.tried) else {
            return false;
        };
        let Some(old) = self.take_piece(id) else {
            return false;
        };
        self.stats.reads_moved += 1;
        let row = self.layout.replication().row_of(node);
        self.add_piece(
            PieceRec {
                node,
                tried: old.tried | (1 << row),
                state: PieceState::Queued,
                sent_at: None,
                given: self.clock,
                digest_retries: 0,
                ..old
            },
            true,
        );
        true
    }

    /// `node` failed (`reason`): with another in-sync member left in its
    /// column it is reported to the membership, nothing more goes to it,
    /// its connection is torn down and its reads move; the pieces it owes
    /// are held until it is out. False when it cannot leave (one replica,
    /// or the column's last member): the caller does what it would without
    /// replicas.
    pub(super) fn fail_member(&mut self, node: usize, reason: &str, now: Instant) -> bool {
        if self.layout.replicas() == 1 || node >= self.nodes.len() {
            return false;
        }
        let replication = *self.layout.replication();
        let (column, row) = (replication.column_of(node), replication.row_of(node));
        if !self.view.takes_writes(column, row) {
            return true;
        }
        if self.nodes[node].failing {
            return true;
        }
        if !self.membership.is_failed(node) {
            // A joiner can always leave: nothing reads it.
            let others = self.view.joining(column, row)
                || replication.members(column).enumerate().any(|(r, n)| {
                    r != row && self.view.in_sync(column, r) && !self.membership.is_failed(n)
                });
            if !others {
                return false;
            }
            self.stats.member_failures += 1;
            self.membership.report(node, reason, now);
        }
        self.nodes[node].failing = true;
        self.abort(node);
        let mut reads: Vec<u64> = self
            .pieces
            .iter()
            .filter(|(_, p)| p.node == node && p.op == Op::Read && p.state == PieceState::Queued)
            .map(|(id, _)| *id)
            .collect();
        // In the order they came (the map's order is not the same twice).
        reads.sort_unstable();
        for id in reads {
            self.move_read(id);
        }
        true
    }

    /// Holds piece `id`, answered with an error by a member that failed:
    /// it waits (queued, never sent: its node is failing) until the member
    /// is out, then completes without it.
    pub(super) fn hold(&mut self, id: u64) {
        self.requeue(id, false);
    }

    /// A member down for the replica timeout has failed.
    fn check_down(&mut self, node: usize, now: Instant) {
        let limit = self.config.replica_timeout;
        if self.nodes[node]
            .down_since
            .is_some_and(|since| now.saturating_duration_since(since) >= limit)
        {
            self.fail_member(
                node,
                "disconnected for longer than the replica timeout",
                now,
            );
        }
    }

    /// Requests past their replica deadline: every member that still owes
    /// one of their pieces (not answered, not receiving) for the replica
    /// timeout has failed. A piece its member got later (moved there) has
    /// a deadline of its own.
    pub(super) fn replica_deadlines_passed(&mut self, now: Instant) {
        let limit = self.config.replica_timeout;
        while let Some(&(deadline, tag, seq)) = self.replica_deadlines.front() {
            if deadline > now {
                break;
            }
            self.replica_deadlines.pop_front();
            let slot = &self.slots[usize::from(tag)];
            if !slot.active || slot.seq != seq || slot.timed_out {
                continue;
            }
            let owed = slot
                .pieces
                .iter()
                .filter_map(|id| self.pieces.get(id))
                .filter(|p| matches!(p.state, PieceState::Queued | PieceState::Sent));
            let (mut late, mut later) = (Vec::new(), None::<Instant>);
            for p in owed {
                if now.saturating_duration_since(p.given) >= limit {
                    late.push(p.node);
                } else {
                    later = Some(later.map_or(p.given, |t| t.min(p.given)));
                }
            }
            if let Some(given) = later {
                self.push_replica_deadline(given, tag, seq);
            }
            late.sort_unstable();
            late.dedup();
            for node in late {
                if !self.nodes[node].failing {
                    self.fail_member(node, "no answer within the replica timeout", now);
                }
            }
        }
        for node in 0..self.nodes.len() {
            if !self.nodes[node].queue.is_empty() {
                self.check_down(node, now);
            }
        }
    }

    /// The next replica deadline, or a short tick while pieces are held
    /// for a failed member (the membership's change must be picked up).
    pub(super) fn members_timeout(&mut self) -> Option<Instant> {
        if self.nodes.iter().any(|n| n.failing) {
            return Some(self.clock + HOLD_TICK);
        }
        while let Some(&(deadline, tag, seq)) = self.replica_deadlines.front() {
            let slot = &self.slots[usize::from(tag)];
            if slot.active && slot.seq == seq && !slot.timed_out {
                let down = self.down_deadline();
                return Some(down.map_or(deadline, |d| d.min(deadline)));
            }
            self.replica_deadlines.pop_front();
        }
        self.down_deadline()
    }

    /// When a down member with queued pieces reaches the replica timeout.
    fn down_deadline(&self) -> Option<Instant> {
        if self.layout.replicas() == 1 {
            return None;
        }
        self.nodes
            .iter()
            .filter(|n| !n.queue.is_empty() && !n.failing)
            .filter_map(|n| n.down_since.map(|t| t + self.config.replica_timeout))
            // Past already: the member could not leave (its column's last).
            .filter(|t| *t > self.clock)
            .min()
    }

    /// Tears down `node`'s connection (see [`Engine::poll_abort`]).
    pub(super) fn abort(&mut self, node: usize) {
        if !self.aborts.contains(&node) {
            self.aborts.push_back(node);
            self.stats.aborts += 1;
        }
    }

    /// True if `node` is a replica neither in its column's in-sync set nor
    /// joining it (as this engine last looked): nothing goes to it.
    pub fn is_out(&self, node: usize) -> bool {
        let r = self.layout.replication();
        !self.view.takes_writes(r.column_of(node), r.row_of(node))
    }

    /// The membership this engine follows.
    pub fn membership(&self) -> &Arc<crate::membership::Membership> {
        &self.membership
    }
}

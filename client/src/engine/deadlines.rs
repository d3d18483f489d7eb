//! Deadlines: requests past theirs fail with EIO, connections that hold
//! their pieces are torn down, and nodes down too long are given up.

use std::time::Instant;

use super::{EIO, Engine, PieceState};

impl Engine {
    /// Time passed: requests past their deadline fail with EIO. Every
    /// connection that still holds a piece of such a request (unanswered, or
    /// its buffer in a send or receive) is to be torn down
    /// ([`Engine::poll_abort`]): that returns the buffer at once, however the
    /// node behaves, and a stale copy of the piece can never be applied
    /// later, since the node fences the old connection when the new session
    /// comes. The request completes once no IO uses its buffer.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.clock = now;
        self.refresh_view(now);
        self.admit_parked(now);
        self.replica_deadlines_passed(now);
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
                        self.landed(node, big);
                        abort.push(node);
                    }
                    Some((PieceState::Sent, node, _)) => {
                        let big = self.pieces.remove(&id).is_some_and(|p| p.big_read());
                        self.landed(node, big);
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
                    self.abort(node);
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
            // A failed replica's held pieces wait for the membership instead.
            .filter(|n| !n.queue.is_empty() && !n.failing)
            .filter_map(|n| n.down_since.map(|t| t + limit))
            .min();
        // Changes waiting for a copier's region look again soon.
        let parked = (!self.parked.is_empty()).then(|| self.clock + super::members::HOLD_TICK);
        [next, node_deadline, self.members_timeout(), parked]
            .into_iter()
            .flatten()
            .min()
    }

    /// True if `node` has been down for longer than the node-down timeout,
    /// or no longer holds the volume.
    pub fn node_given_up(&self, node: usize, now: Instant) -> bool {
        self.nodes.get(node).is_some_and(|n| {
            // A failed replica's pieces are held until it is out.
            !n.failing
                && (n.refused
                    || n.down_since.is_some_and(|since| {
                        now.saturating_duration_since(since) >= self.config.node_down_timeout
                    }))
        })
    }
}

//! What goes out: the next frame for a node, its head encoded (with a
//! header digest when data digests are on) and its payload as a slice of
//! the request buffer.

use netblk_protocol::encode_head_as;
use netblk_protocol::pb::{self, request::Op as WireOp};

use super::{BufSlice, Engine, Op, PieceState, Transmit};

impl Engine {
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
        if !state.up || state.failing || state.in_flight >= self.config.max_in_flight_per_node {
            return None;
        }
        let replication = self.layout.replication();
        if !self
            .view
            .takes_writes(replication.column_of(node), replication.row_of(node))
            || self.view.fenced
        {
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
}

//! What comes back: replies and their payloads, buffers the kernel is done
//! with, and digest failures sent again.

use netblk_protocol::errno_of_status;
use netblk_protocol::pb;

use super::{
    BufSlice, DIGEST_RETRIES, EIO, Engine, Op, Payload, PieceState, ReplyError, ReplySink, Tag,
};

impl Engine {
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
            self.answered(id, node, op, errno, &reply.message);
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

    /// Piece `id` was answered (`errno`, 0 for success). On a replicated
    /// volume an error moves a read to another member, and fails the
    /// member of anything else (the piece is held until it is out).
    fn answered(&mut self, id: u64, node: usize, op: Op, errno: i32, message: &str) {
        if errno != 0 {
            let now = self.clock;
            if op == Op::Read {
                if self.move_read(id) {
                    return;
                }
            } else {
                let reason = format!("answered errno {errno}: {message}");
                if self.fail_member(node, &reason, now) {
                    self.hold(id);
                    return;
                }
            }
        }
        self.finish_piece(id, errno);
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
                "payload failed its crc32c on every try"
            );
            if rec.state == PieceState::Receiving {
                rec.state = PieceState::Sent;
            }
            let (node, op) = (rec.node, rec.op);
            self.answered(id, node, op, EIO, "payload failed its crc32c on every try");
            return;
        }
        tracing::warn!(
            node = rec.node,
            offset = rec.node_offset,
            len = rec.len,
            "payload failed its crc32c on the way: sending the request again"
        );
        self.requeue(id, true);
        self.stats.pieces_resent += 1;
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
}

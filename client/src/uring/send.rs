//! The send side of a connection: linked `SEND` header + `SEND_ZC` payload
//! chains, at most one in flight per connection, and their completions.

use std::io;

use io_uring::{cqueue, opcode, squeue, types};

use super::ids::{K_DATA, K_HEAD, conn_id, user_data};
use super::{BufferMode, Frontend, QueueDriver, SendMode};
use crate::engine::Tag;

/// Most transmits in one linked send chain.
pub(super) const MAX_CHAIN: usize = 32;

impl<F: Frontend> QueueDriver<F> {
    /// Starts a send chain on `node` if none is in flight.
    pub(super) fn post_sends(&mut self, node: usize) -> io::Result<()> {
        let conn = &mut self.conns[node];
        if conn.broken || conn.chain_left > 0 {
            return Ok(());
        }
        conn.heads.clear();
        let mut plan: Vec<(usize, Option<crate::engine::BufSlice>)> = Vec::new();
        let mut batch: Vec<u8> = Vec::new();
        for _ in 0..MAX_CHAIN {
            let Some(t) = self.engine.poll_transmit(node) else {
                break;
            };
            batch.extend_from_slice(&t.head);
            if t.payload.is_some() {
                let conn = &mut self.conns[node];
                conn.heads.push(std::mem::take(&mut batch));
                plan.push((conn.heads.len() - 1, t.payload));
            }
        }
        let conn = &mut self.conns[node];
        if !batch.is_empty() {
            conn.heads.push(batch);
            plan.push((conn.heads.len() - 1, None));
        }
        if plan.is_empty() {
            return Ok(());
        }
        let cid = conn_id(node, conn.generation);
        let mut entries = Vec::with_capacity(plan.len() * 2);
        let transmits = plan.len();
        for (i, (head, payload)) in plan.into_iter().enumerate() {
            let bytes = &conn.heads[head];
            // MSG_MORE: more of this chain follows; let TCP put a header and
            // its payload (and the next frame) in the same segments.
            let more = |last: bool| if last { 0 } else { libc::MSG_MORE };
            entries.push(
                opcode::Send::new(types::Fd(conn.fd), bytes.as_ptr(), bytes.len() as u32)
                    .flags(libc::MSG_WAITALL | more(payload.is_none() && i + 1 == transmits))
                    .build()
                    .user_data(user_data(K_HEAD, cid, head as u64)),
            );
            if let Some(slice) = payload {
                let flags = libc::MSG_WAITALL | more(i + 1 == transmits);
                let ptr = match self.buffer_mode {
                    BufferMode::User => self.buffers.slice_ptr(slice.tag, slice.offset, slice.len),
                    // A kernel-registered buffer is addressed by offset.
                    BufferMode::Kernel { .. } => slice.offset as usize as *mut u8,
                };
                // tag (13 bits) and length (27 bits: at most 64 MiB) in 40 bits.
                let detail = (u64::from(slice.tag) << 27) | u64::from(slice.len);
                if let Some(f) = self.engine.figures() {
                    match self.mode {
                        SendMode::ZeroCopy => {
                            f.zc_sends.add(1);
                            f.zc_bytes.add(u64::from(slice.len));
                        }
                        SendMode::Copy => f.copied_bytes.add(u64::from(slice.len)),
                    }
                }
                let entry = match self.mode {
                    SendMode::ZeroCopy => opcode::SendZc::new(types::Fd(conn.fd), ptr, slice.len)
                        .buf_index(Some(slice.tag))
                        .flags(flags)
                        .build(),
                    SendMode::Copy => opcode::Send::new(types::Fd(conn.fd), ptr, slice.len)
                        .flags(flags)
                        .build(),
                };
                entries.push(entry.user_data(user_data(K_DATA, cid, detail)));
            }
        }
        let last = entries.len() - 1;
        conn.chain_left = entries.len() as u32;
        conn.ops += entries.len() as u32;
        for entry in &mut entries[..last] {
            // A hard link keeps the order without cancelling the rest when
            // one fails: a cancelled SEND_ZC would still post a notification,
            // after a CQE without F_MORE.
            *entry = entry.clone().flags(squeue::Flags::IO_HARDLINK);
        }
        // SAFETY: the heads live in `conn.heads` until the chain's last CQE,
        // the payloads in tag buffers the engine holds until their buffers
        // are released (see `QueueDriver::push_chain`).
        unsafe { self.push_chain(&entries) }?;
        Ok(())
    }

    pub(super) fn on_data_sent(&mut self, node: usize, detail: u64, res: i32, flags: u32) {
        let tag = (detail >> 27) as Tag;
        let len = (detail & ((1 << 27) - 1)) as i32;
        let conn = &mut self.conns[node];
        if cqueue::notif(flags) {
            // The zero-copy notification: the kernel is done with the buffer.
            conn.ops = conn.ops.saturating_sub(1);
            if let Some(f) = self.engine.figures() {
                f.zc_notifications.add(1);
            }
            self.engine.handle_buffer_released(node, tag);
            return;
        }
        conn.chain_left = conn.chain_left.saturating_sub(1);
        if !cqueue::more(flags) {
            conn.ops = conn.ops.saturating_sub(1);
            self.engine.handle_buffer_released(node, tag);
        }
        if res != len {
            self.break_conn(node, "payload send failed", res);
        }
    }
}

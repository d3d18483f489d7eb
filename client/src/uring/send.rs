//! The send side of a connection: everything ready for a node goes out as
//! one hard-linked chain, at most one chain in flight per connection.
//!
//! A chain is as few operations as the payloads allow: heads and the
//! payloads the kernel copies anyway are gathered into one vectored
//! `SENDMSG`; a payload sent zero-copy is a `SEND_ZC` from its fixed buffer,
//! between the `SENDMSG`s before and after it. So a batch of 4 KiB writes is
//! one system-call's worth of work for the socket, and a 1 MiB write is its
//! head and its zero-copy payload.

use std::io;
use std::ops::Range;

use io_uring::{cqueue, opcode, squeue, types};

use super::ids::{K_DATA, K_HEAD, conn_id, user_data};
use super::{BufferMode, Frontend, QueueDriver, SendMode};
use crate::engine::{BufSlice, Tag};

/// Most frames in one send chain.
pub(super) const MAX_CHAIN: usize = 32;

/// Most operations in one send chain: a `SENDMSG` and a `SEND_ZC` per frame,
/// at worst.
pub(super) const MAX_CHAIN_OPS: usize = 2 * MAX_CHAIN;

/// Payloads below this size are copied even in zero-copy mode (when they are
/// in userspace buffers): pinning pages and waiting for a notification costs
/// more than copying them, and they join the batch's one `SENDMSG`.
pub(super) const ZC_MIN: u32 = 16 << 10;

/// The chain in flight on a connection, kept alive until its last completion:
/// the head bytes, and for each `SENDMSG` its message, iovecs and the tags of
/// the payloads it copies.
#[derive(Default)]
pub(super) struct SendChain {
    heads: Vec<u8>,
    iovs: Vec<libc::iovec>,
    msgs: Vec<libc::msghdr>,
    groups: Vec<Group>,
    copied: Vec<Tag>,
}

/// One `SENDMSG` of a chain.
struct Group {
    iovs: Range<usize>,
    bytes: usize,
    copied: Range<usize>,
}

/// A step of a chain being planned.
enum Part {
    /// Bytes of `SendChain::heads`.
    Head(Range<usize>),
    /// A payload the kernel copies (in the gathered `SENDMSG`).
    Copy(BufSlice),
    /// A payload sent zero-copy, on its own.
    ZeroCopy(BufSlice),
}

impl SendChain {
    pub(super) fn clear(&mut self) {
        self.heads.clear();
        self.iovs.clear();
        self.msgs.clear();
        self.groups.clear();
        self.copied.clear();
    }

    /// Bytes the `SENDMSG` `group` must send, and the tags whose payloads
    /// it copied (their buffers are free once it completed).
    pub(super) fn group(&self, group: usize) -> Option<(usize, &[Tag])> {
        let g = self.groups.get(group)?;
        Some((g.bytes, &self.copied[g.copied.clone()]))
    }
}

impl<F: Frontend> QueueDriver<F> {
    /// Whether a write payload goes out zero-copy (else the kernel copies it).
    fn zero_copy(&self, slice: &BufSlice) -> bool {
        match self.buffer_mode {
            // The request's pages are not mapped here: only a fixed-buffer send reaches them.
            BufferMode::Kernel { .. } => true,
            BufferMode::User => self.mode == SendMode::ZeroCopy && slice.len >= ZC_MIN,
        }
    }

    /// Starts a send chain on `node` if none is in flight.
    pub(super) fn post_sends(&mut self, node: usize) -> io::Result<()> {
        let conn = &mut self.conns[node];
        if conn.broken || conn.chain_left > 0 {
            return Ok(());
        }
        let mut chain = std::mem::take(&mut conn.chain);
        chain.clear();
        let mut parts: Vec<Part> = Vec::with_capacity(2 * MAX_CHAIN);
        let mut head_start = 0;
        for _ in 0..MAX_CHAIN {
            let Some((_, payload)) = self.engine.poll_transmit_into(node, &mut chain.heads) else {
                break;
            };
            let Some(slice) = payload else {
                continue;
            };
            parts.push(Part::Head(head_start..chain.heads.len()));
            head_start = chain.heads.len();
            parts.push(if self.zero_copy(&slice) {
                Part::ZeroCopy(slice)
            } else {
                Part::Copy(slice)
            });
        }
        if head_start < chain.heads.len() {
            parts.push(Part::Head(head_start..chain.heads.len()));
        }
        let mut entries = self.plan_chain(node, &mut chain, parts);
        self.conns[node].chain = chain;
        let Some(last) = entries.len().checked_sub(1) else {
            return Ok(());
        };
        let conn = &mut self.conns[node];
        conn.chain_left = entries.len() as u32;
        conn.ops += entries.len() as u32;
        for entry in &mut entries[..last] {
            // A hard link keeps the order without cancelling the rest when
            // one fails: a cancelled SEND_ZC would still post a notification,
            // after a CQE without F_MORE.
            *entry = entry.clone().flags(squeue::Flags::IO_HARDLINK);
        }
        // SAFETY: the heads, iovecs and messages live in `conn.chain`, not
        // touched until the chain's last CQE (a new chain starts only then,
        // and a reconnect only once the connection holds no operation; the
        // vectors' heap storage does not move when the chain is moved); the
        // payloads in tag buffers the engine holds until their buffers are
        // released (see `QueueDriver::push_chain`).
        unsafe { self.push_chain(&entries) }?;
        Ok(())
    }

    /// Turns the planned parts into operations: each run of heads and copied
    /// payloads becomes one `SENDMSG`, each zero-copy payload a `SEND_ZC`.
    /// `chain.heads` is final: the iovecs point into it.
    fn plan_chain(
        &mut self,
        node: usize,
        chain: &mut SendChain,
        parts: Vec<Part>,
    ) -> Vec<squeue::Entry> {
        enum Step {
            Msg(usize),
            Zc(BufSlice),
        }
        let mut steps = Vec::new();
        let mut open: Option<Group> = None;
        for part in parts {
            let (base, len) = match part {
                Part::ZeroCopy(slice) => {
                    if let Some(g) = open.take() {
                        steps.push(Step::Msg(chain.groups.len()));
                        chain.groups.push(g);
                    }
                    steps.push(Step::Zc(slice));
                    continue;
                }
                Part::Head(range) => (chain.heads[range.clone()].as_ptr(), range.len()),
                Part::Copy(slice) => {
                    chain.copied.push(slice.tag);
                    if let Some(f) = self.engine.figures() {
                        f.copied_bytes.add(u64::from(slice.len));
                    }
                    let ptr = self.buffers.slice_ptr(slice.tag, slice.offset, slice.len);
                    (ptr.cast_const(), slice.len as usize)
                }
            };
            let g = open.get_or_insert_with(|| Group {
                iovs: chain.iovs.len()..chain.iovs.len(),
                bytes: 0,
                copied: chain.copied.len()..chain.copied.len(),
            });
            chain.iovs.push(libc::iovec {
                // The kernel only reads through it.
                iov_base: base.cast_mut().cast(),
                iov_len: len,
            });
            g.iovs.end = chain.iovs.len();
            g.copied.end = chain.copied.len();
            g.bytes += len;
        }
        if let Some(g) = open.take() {
            steps.push(Step::Msg(chain.groups.len()));
            chain.groups.push(g);
        }
        // Now the iovecs are final, the messages can point at them, and
        // once the messages are final the entries can point at those.
        for g in &chain.groups {
            // SAFETY: msghdr is plain data; all zeroes is an empty message.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = chain.iovs[g.iovs.clone()].as_ptr().cast_mut();
            msg.msg_iovlen = g.iovs.len();
            chain.msgs.push(msg);
        }
        let conn = &self.conns[node];
        let fd = types::Fd(conn.fd);
        let cid = conn_id(node, conn.generation);
        let count = steps.len();
        let mut entries = Vec::with_capacity(count);
        for (i, step) in steps.into_iter().enumerate() {
            // MSG_MORE: more of this chain follows; let TCP fill segments
            // across the operations.
            let flags = libc::MSG_WAITALL | if i + 1 == count { 0 } else { libc::MSG_MORE };
            entries.push(match step {
                Step::Msg(group) => opcode::SendMsg::new(fd, &raw const chain.msgs[group])
                    .flags(flags as u32)
                    .build()
                    .user_data(user_data(K_HEAD, cid, group as u64)),
                Step::Zc(slice) => {
                    if let Some(f) = self.engine.figures() {
                        f.zc_sends.add(1);
                        f.zc_bytes.add(u64::from(slice.len));
                    }
                    let ptr = match self.buffer_mode {
                        BufferMode::User => {
                            self.buffers.slice_ptr(slice.tag, slice.offset, slice.len)
                        }
                        // A kernel-registered buffer is addressed by offset.
                        BufferMode::Kernel { .. } => slice.offset as usize as *mut u8,
                    };
                    // tag (13 bits) and length (27 bits: at most 64 MiB) in 40 bits.
                    let detail = (u64::from(slice.tag) << 27) | u64::from(slice.len);
                    opcode::SendZc::new(fd, ptr, slice.len)
                        .buf_index(Some(slice.tag))
                        .flags(flags)
                        .build()
                        .user_data(user_data(K_DATA, cid, detail))
                }
            });
        }
        entries
    }

    /// A `SENDMSG` of the chain completed: the payloads it copied are free.
    pub(super) fn on_msg_sent(&mut self, node: usize, group: u64, res: i32) {
        let conn = &mut self.conns[node];
        conn.ops = conn.ops.saturating_sub(1);
        conn.chain_left = conn.chain_left.saturating_sub(1);
        let mut expected = 0;
        if let Some((bytes, tags)) = conn.chain.group(group as usize) {
            expected = bytes;
            for &tag in tags {
                self.engine.handle_buffer_released(node, tag);
            }
        }
        if res < 0 || res as usize != expected {
            self.break_conn(node, "send failed", res);
        }
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

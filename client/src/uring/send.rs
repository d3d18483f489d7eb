//! The send side of a connection: everything ready for a node goes out as
//! one hard-linked chain, at most one chain in flight per connection.
//!
//! A chain is as few operations as the payloads allow: heads and the
//! payloads the kernel copies anyway are gathered into one vectored
//! `SENDMSG`; a payload sent zero-copy is a `SEND_ZC` from its fixed buffer,
//! between the `SENDMSG`s before and after it. So a batch of 4 KiB writes is
//! one system-call's worth of work for the socket, and a 1 MiB write is its
//! head and its zero-copy payload.
//!
//! Where the kernel sends a vectored `SENDMSG_ZC` from a registered buffer
//! (6.15+) and the payloads are in the queue's own registered buffers (user
//! buffer mode), a chain with a zero-copy payload is one operation instead:
//! heads copied into one of the connection's head slots, which lie in the
//! same registered mapping, and every payload, gathered into one
//! `SENDMSG_ZC`. Each linked operation costs the socket a separate
//! transmit, wake-up and completion; one vectored send of a whole chain is
//! what the wire baseline of `netblk bench` does.

use std::io;
use std::ops::Range;

use io_uring::{cqueue, opcode, squeue, types};

use super::buffers::{HEAD_SLOT, HEAD_SLOTS};
use super::ids::{K_DATA, K_HEAD, K_VEC, conn_id, user_data};
use super::sys::IORING_RECVSEND_FIXED_BUF;
use super::{BufferMode, Frontend, QueueDriver, SendMode};
use crate::engine::{BufSlice, Tag};

/// Most frames in one send chain.
pub(crate) const MAX_CHAIN: usize = 32;

/// Most operations in one send chain: a `SENDMSG` and a `SEND_ZC` per frame,
/// at worst.
pub(super) const MAX_CHAIN_OPS: usize = 2 * MAX_CHAIN;

/// Payloads below this size are copied even in zero-copy mode (when they are
/// in userspace buffers): pinning pages and waiting for a notification costs
/// more than copying them, and they join the batch's one `SENDMSG`.
pub(crate) const ZC_MIN: u32 = 16 << 10;

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

/// One `SENDMSG` of a chain: its iovecs, their bytes, the tags whose
/// payloads it copies, and those payloads' bytes.
struct Group {
    iovs: Range<usize>,
    bytes: usize,
    copied: Range<usize>,
    copied_bytes: u64,
}

/// One operation of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// A `SENDMSG` of the group with this index.
    Msg(usize),
    /// A `SEND_ZC` of this payload.
    ZeroCopy(BufSlice),
    /// A plain `SEND` of this payload from its fixed buffer.
    FixedCopy(BufSlice),
    /// The whole chain as one vectored `SENDMSG_ZC` (message 0), its heads
    /// in this head slot.
    Vectored(usize),
}

/// A connection's head slots: which hold the heads of a vectored send
/// still in flight, with the bytes that send must send and the tags whose
/// payloads it carries (their buffers are free at its notification).
#[derive(Default)]
pub(super) struct HeadSlots {
    slots: [HeadSlot; HEAD_SLOTS],
}

#[derive(Default)]
struct HeadSlot {
    busy: bool,
    bytes: usize,
    tags: Vec<Tag>,
}

impl HeadSlots {
    fn free(&self) -> Option<usize> {
        self.slots.iter().position(|s| !s.busy)
    }

    /// Bytes the send holding `slot` must send.
    fn bytes(&self, slot: usize) -> usize {
        self.slots.get(slot).map_or(0, |s| s.bytes)
    }

    /// The send holding `slot` is over: the slot is free, and these tags'
    /// buffers are (empty if the slot was free already).
    pub(super) fn release(&mut self, slot: usize) -> Vec<Tag> {
        match self.slots.get_mut(slot) {
            Some(s) if s.busy => {
                s.busy = false;
                std::mem::take(&mut s.tags)
            }
            _ => Vec::new(),
        }
    }
}

/// A step of a chain being planned.
enum Part {
    /// Bytes of `SendChain::heads`.
    Head(Range<usize>),
    /// A payload the kernel copies (in the gathered `SENDMSG`).
    Copy(BufSlice),
    /// A payload sent zero-copy, on its own.
    ZeroCopy(BufSlice),
    /// A payload the kernel copies from its fixed buffer, on its own.
    FixedCopy(BufSlice),
}

impl SendChain {
    pub(super) fn clear(&mut self) {
        self.heads.clear();
        self.iovs.clear();
        self.msgs.clear();
        self.groups.clear();
        self.copied.clear();
    }

    /// Makes the planned parts one vectored send: an iovec per part, in
    /// order, heads pointing into `heads` (where `self.heads` was copied:
    /// a head slot), payloads at `payload`. Returns the bytes it sends, of
    /// which payload bytes, and the payloads' tags.
    fn plan_vectored(
        &mut self,
        parts: Vec<Part>,
        heads: *const u8,
        payload: impl Fn(&BufSlice) -> *const u8,
    ) -> (usize, u64, Vec<Tag>) {
        let (mut bytes, mut payload_bytes, mut tags) = (0, 0, Vec::new());
        for part in parts {
            let (base, len) = match part {
                // SAFETY: the range lies in `self.heads`, of which `heads`
                // holds a copy of the same length.
                Part::Head(range) => (unsafe { heads.add(range.start) }, range.len()),
                Part::Copy(slice) | Part::ZeroCopy(slice) | Part::FixedCopy(slice) => {
                    tags.push(slice.tag);
                    payload_bytes += u64::from(slice.len);
                    (payload(&slice), slice.len as usize)
                }
            };
            self.iovs.push(libc::iovec {
                // The kernel only reads through it.
                iov_base: base.cast_mut().cast(),
                iov_len: len,
            });
            bytes += len;
        }
        // SAFETY: msghdr is plain data; all zeroes is an empty message.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = self.iovs.as_mut_ptr();
        msg.msg_iovlen = self.iovs.len();
        self.msgs.push(msg);
        (bytes, payload_bytes, tags)
    }

    /// Bytes the `SENDMSG` `group` must send, and the tags whose payloads
    /// it copied (their buffers are free once it completed).
    /// Group `group`'s message without its first `sent` bytes (the kernel
    /// took only those): its iovecs and byte count move past them.
    fn advance(&mut self, group: usize, sent: usize) {
        let Some(g) = self.groups.get_mut(group) else {
            return;
        };
        let mut left = sent.min(g.bytes);
        g.bytes -= left;
        while left > 0 && g.iovs.start < g.iovs.end {
            let iov = &mut self.iovs[g.iovs.start];
            if left >= iov.iov_len {
                left -= iov.iov_len;
                g.iovs.start += 1;
            } else {
                // SAFETY: `left` < iov_len: still inside the same buffer.
                iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(left) }.cast();
                iov.iov_len -= left;
                left = 0;
            }
        }
        if let Some(msg) = self.msgs.get_mut(group) {
            msg.msg_iov = self.iovs[g.iovs.clone()].as_ptr().cast_mut();
            msg.msg_iovlen = g.iovs.len();
        }
    }

    pub(super) fn group(&self, group: usize) -> Option<(usize, &[Tag])> {
        let g = self.groups.get(group)?;
        Some((g.bytes, &self.copied[g.copied.clone()]))
    }

    /// Turns the planned parts into steps: each run of heads and copied
    /// payloads becomes one group (a `SENDMSG`), each zero-copy payload a
    /// step of its own. `self.heads` is final: the iovecs point into it, and
    /// the messages into the iovecs. `payload` gives a copied payload's bytes.
    fn plan(&mut self, parts: Vec<Part>, payload: impl Fn(&BufSlice) -> *const u8) -> Vec<Step> {
        let mut steps = Vec::new();
        let mut open: Option<Group> = None;
        for part in parts {
            let (base, len, copied) = match part {
                Part::ZeroCopy(slice) | Part::FixedCopy(slice) => {
                    if let Some(g) = open.take() {
                        steps.push(Step::Msg(self.groups.len()));
                        self.groups.push(g);
                    }
                    steps.push(match part {
                        Part::FixedCopy(_) => Step::FixedCopy(slice),
                        _ => Step::ZeroCopy(slice),
                    });
                    continue;
                }
                Part::Head(range) => (self.heads[range.clone()].as_ptr(), range.len(), None),
                Part::Copy(slice) => (payload(&slice), slice.len as usize, Some(slice.tag)),
            };
            let (iovs, tags) = (self.iovs.len(), self.copied.len());
            let g = open.get_or_insert(Group {
                iovs: iovs..iovs,
                bytes: 0,
                copied: tags..tags,
                copied_bytes: 0,
            });
            self.iovs.push(libc::iovec {
                // The kernel only reads through it.
                iov_base: base.cast_mut().cast(),
                iov_len: len,
            });
            g.iovs.end = self.iovs.len();
            g.bytes += len;
            if let Some(tag) = copied {
                self.copied.push(tag);
                g.copied.end = self.copied.len();
                g.copied_bytes += len as u64;
            }
        }
        if let Some(g) = open.take() {
            steps.push(Step::Msg(self.groups.len()));
            self.groups.push(g);
        }
        // The iovecs are final: the messages can point at them.
        for g in &self.groups {
            // SAFETY: msghdr is plain data; all zeroes is an empty message.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = self.iovs[g.iovs.clone()].as_ptr().cast_mut();
            msg.msg_iovlen = g.iovs.len();
            self.msgs.push(msg);
        }
        steps
    }
}

/// How a write payload of `len` bytes goes out on a connection to a node
/// on this host (`local`) or not.
fn payload_send(buffers: BufferMode, mode: SendMode, len: u32, local: bool) -> Send {
    match buffers {
        // The request's pages are not mapped here: only a fixed-buffer send
        // reaches them, unless the device lets us copy payloads out. To a
        // node on this host they are never sent zero-copy: local delivery
        // copies zero-copy pages anyway, and may still hold references to
        // the request's pages once the request is complete; those pages can
        // be kernel memory that must not outlive it (see
        // `crate::net::delivered_locally`). A plain `SEND` from the fixed
        // buffer copies a large one in the kernel; small ones are copied
        // out and gathered, as to any node.
        BufferMode::Kernel {
            user_copy,
            send_fixed,
            ..
        } => match (local, user_copy, send_fixed) {
            (_, true, _) if len < ZC_MIN => Send::Copy,
            (true, _, true) => Send::FixedCopy,
            (true, true, false) => Send::Copy,
            _ => Send::ZeroCopy,
        },
        BufferMode::User if mode == SendMode::ZeroCopy && len >= ZC_MIN => Send::ZeroCopy,
        BufferMode::User => Send::Copy,
    }
}

/// A payload send's completion detail: its tag (13 bits) and length (27
/// bits: at most 64 MiB) in 40 bits.
fn data_detail(slice: &BufSlice) -> u64 {
    (u64::from(slice.tag) << 27) | u64::from(slice.len)
}

/// The tag and length [`data_detail`] put in a completion's detail.
pub(super) fn split_data_detail(detail: u64) -> (Tag, i32) {
    ((detail >> 27) as Tag, (detail & ((1 << 27) - 1)) as i32)
}

/// How a payload is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Send {
    /// Copied, gathered with the heads into the chain's `SENDMSG`.
    Copy,
    /// A `SEND_ZC` of its own.
    ZeroCopy,
    /// A plain `SEND` of its own from the request's fixed buffer: the
    /// kernel copies it.
    FixedCopy,
}

impl<F: Frontend> QueueDriver<F> {
    /// Starts a send chain on `node` if none is in flight.
    pub(super) fn post_sends(&mut self, node: usize) -> io::Result<()> {
        if self.fenced_off(node) {
            // Another queue's connection to the node ended since this one
            // was admitted: the node's epoch moved on, and nothing goes out
            // on an older one (see `crate::epochs`).
            self.break_conn(node, "the node's fencing epoch moved on", 0);
            return Ok(());
        }
        let conn = &mut self.conns[node];
        if conn.broken || conn.chain_left > 0 {
            return Ok(());
        }
        let local = conn.local;
        let mut chain = std::mem::take(&mut conn.chain);
        chain.clear();
        let mut parts: Vec<Part> = Vec::with_capacity(2 * MAX_CHAIN);
        let mut head_start = 0;
        // Data digests need the payload's bytes: only user buffers have them
        // (the daemon picks the copy data path with digests; a 0 here would
        // only make the node refuse the write).
        let user_buffers = self.buffer_mode == BufferMode::User;
        for _ in 0..MAX_CHAIN {
            let buffers = &self.buffers;
            let digest = |p: BufSlice| {
                if user_buffers {
                    buffers.crc32c(p.tag, p.offset, p.len)
                } else {
                    0
                }
            };
            let Some((_, payload)) = self
                .engine
                .poll_transmit_into(node, &mut chain.heads, digest)
            else {
                break;
            };
            let Some(slice) = payload else {
                continue;
            };
            parts.push(Part::Head(head_start..chain.heads.len()));
            head_start = chain.heads.len();
            parts.push(
                match payload_send(self.buffer_mode, self.mode, slice.len, local) {
                    Send::Copy if self.copy_out(&slice) => Part::Copy(slice),
                    Send::FixedCopy => Part::FixedCopy(slice),
                    Send::Copy | Send::ZeroCopy => Part::ZeroCopy(slice),
                },
            );
        }
        if head_start < chain.heads.len() {
            parts.push(Part::Head(head_start..chain.heads.len()));
        }
        let buffers = &self.buffers;
        let payload = |p: &BufSlice| buffers.slice_ptr(p.tag, p.offset, p.len).cast_const();
        let slot = self.vectored_slot(node, &chain.heads, &parts);
        let steps = match slot {
            Some((slot, at)) => {
                // SAFETY: the slot is this connection's and free (no send
                // reads it), HEAD_SLOT bytes long, and the heads fit.
                unsafe {
                    std::ptr::copy_nonoverlapping(chain.heads.as_ptr(), at, chain.heads.len());
                }
                let (bytes, payload_bytes, tags) = chain.plan_vectored(parts, at, payload);
                let s = &mut self.conns[node].head_slots.slots[slot];
                *s = HeadSlot {
                    busy: true,
                    bytes,
                    tags,
                };
                if let Some(f) = self.engine.figures() {
                    f.zc_sends.add(1);
                    f.zc_bytes.add(payload_bytes);
                }
                vec![Step::Vectored(slot)]
            }
            None => chain.plan(parts, payload),
        };
        let mut entries = self.chain_entries(node, &chain, &steps);
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

    /// A free head slot of `node`'s connection (and where it is) if this
    /// chain goes as one vectored send: the queue can, the chain has a
    /// zero-copy payload, and its heads fit.
    fn vectored_slot(&self, node: usize, heads: &[u8], parts: &[Part]) -> Option<(usize, *mut u8)> {
        if !self.vectored
            || heads.len() > HEAD_SLOT
            || !parts.iter().any(|p| matches!(p, Part::ZeroCopy(_)))
        {
            return None;
        }
        let slot = self.conns[node].head_slots.free()?;
        Some((slot, self.buffers.head_slot(node, slot)?))
    }

    /// Makes a copied payload's bytes ready in its tag buffer: in kernel
    /// buffer mode they are copied out of the request first. False if that
    /// failed: the payload then goes zero-copy, and so do all later ones of
    /// this queue.
    fn copy_out(&mut self, slice: &BufSlice) -> bool {
        if self.buffer_mode == BufferMode::User {
            return true;
        }
        let at = self.buffers.slice_ptr(slice.tag, slice.offset, slice.len);
        // SAFETY: the slice lies in the tag's buffer (`slice_ptr` checks its
        // bounds), which this queue owns while the request is in flight;
        // nothing else reads or writes it until the send that copies it
        // completed.
        let dst = unsafe { std::slice::from_raw_parts_mut(at, slice.len as usize) };
        match self.frontend.copy_out(slice.tag, slice.offset, dst) {
            Ok(()) => true,
            Err(err) => {
                self.stop_user_copy(&format!(
                    "copying a write payload out of the request failed: {err}"
                ));
                false
            }
        }
    }

    /// The chain's operations: a `SENDMSG` per group, a `SEND_ZC` per
    /// zero-copy payload, in order.
    fn chain_entries(&self, node: usize, chain: &SendChain, steps: &[Step]) -> Vec<squeue::Entry> {
        let conn = &self.conns[node];
        let fd = types::Fd(conn.fd);
        let cid = conn_id(node, conn.generation);
        let count = steps.len();
        let mut entries = Vec::with_capacity(count);
        for (i, step) in steps.iter().enumerate() {
            // MSG_MORE: more of this chain follows; let TCP fill segments
            // across the operations.
            let waitall = if self.send_waitall {
                libc::MSG_WAITALL
            } else {
                0
            };
            let flags = waitall | if i + 1 == count { 0 } else { libc::MSG_MORE };
            entries.push(match *step {
                // Every byte lies in the whole mapping, registered after
                // the tags' buffers.
                Step::Vectored(slot) => opcode::SendMsgZc::new(fd, &raw const chain.msgs[0])
                    .buf_index(Some(self.buffers.depth()))
                    .flags(flags as u32)
                    .build()
                    .user_data(user_data(K_VEC, cid, slot as u64)),
                Step::Msg(group) => {
                    if let Some(f) = self.engine.figures() {
                        f.copied_bytes.add(chain.groups[group].copied_bytes);
                    }
                    opcode::SendMsg::new(fd, &raw const chain.msgs[group])
                        .flags(flags as u32)
                        .build()
                        .user_data(user_data(K_HEAD, cid, group as u64))
                }
                Step::FixedCopy(slice) => {
                    if let Some(f) = self.engine.figures() {
                        f.copied_bytes.add(u64::from(slice.len));
                    }
                    // As a zero-copy one (below), without its notification:
                    // the buffer is free at this CQE.
                    let detail = data_detail(&slice);
                    opcode::Send::new(fd, slice.offset as usize as *const u8, slice.len)
                        .ioprio(IORING_RECVSEND_FIXED_BUF)
                        .buf_group(slice.tag)
                        .flags(flags)
                        .build()
                        .user_data(user_data(K_DATA, cid, detail))
                }
                Step::ZeroCopy(slice) => {
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
                    let detail = data_detail(&slice);
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
        let wanted = conn
            .chain
            .group(group as usize)
            .map_or(0, |(bytes, _)| bytes);
        // Without MSG_WAITALL (TLS) the kernel may take part of a message:
        // the rest goes out next, as long as nothing in the chain follows
        // it (a TLS chain is one message).
        if !self.send_waitall && res > 0 && (res as usize) < wanted && conn.chain_left == 1 {
            conn.chain.advance(group as usize, res as usize);
            let entry = opcode::SendMsg::new(
                types::Fd(conn.fd),
                &raw const conn.chain.msgs[group as usize],
            )
            .build()
            .user_data(user_data(K_HEAD, conn_id(node, conn.generation), group));
            // SAFETY: the message and its iovecs live in `conn.chain`
            // until this send completes (the chain is not replaced while
            // it has an operation left), as for the chain's first send.
            match unsafe { self.push_chain(&[entry]) } {
                Ok(()) => return,
                // Counted as a failed send below: the connection breaks.
                Err(err) => tracing::warn!(node, error = %err, "cannot continue a short send"),
            }
        }
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

    /// A vectored send's result, or its notification: at the notification
    /// (or a result that promises none) its head slot and payloads are free.
    pub(super) fn on_vectored_sent(&mut self, node: usize, slot: u64, res: i32, flags: u32) {
        let slot = slot as usize;
        let conn = &mut self.conns[node];
        let expected = conn.head_slots.bytes(slot);
        let done = if cqueue::notif(flags) {
            if let Some(f) = self.engine.figures() {
                f.zc_notifications.add(1);
            }
            true
        } else {
            conn.chain_left = conn.chain_left.saturating_sub(1);
            !cqueue::more(flags)
        };
        if done {
            conn.ops = conn.ops.saturating_sub(1);
            self.release_head_slot(node, slot);
        }
        if cqueue::notif(flags) || res as usize == expected {
            return;
        }
        if res == -libc::EINVAL || res == -libc::EFAULT || res == -libc::EOPNOTSUPP {
            // Refused whole (the probe said it would work): this queue sends
            // as before 6.15 from now on; the chain is sent again after the
            // reconnect.
            tracing::warn!(
                error = %io::Error::from_raw_os_error(-res),
                "a vectored zero-copy send was refused; this queue no longer sends chains as one"
            );
            self.vectored = false;
        }
        self.break_conn(node, "send failed", res);
    }

    /// Frees `node`'s head slot `slot` and the payloads its send carried.
    pub(super) fn release_head_slot(&mut self, node: usize, slot: usize) {
        for tag in self.conns[node].head_slots.release(slot) {
            self.engine.handle_buffer_released(node, tag);
        }
    }

    pub(super) fn on_data_sent(&mut self, node: usize, detail: u64, res: i32, flags: u32) {
        let (tag, len) = split_data_detail(detail);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_send_continues_from_the_byte_where_the_kernel_stopped() {
        let data: Vec<u8> = (0..=255).collect();
        let mut chain = SendChain::default();
        chain.heads.extend_from_slice(&data[..10]);
        let payload = data[10..].as_ptr();
        let parts = vec![Part::Head(0..10), Part::Copy(slice(3, 246))];
        let steps = chain.plan(parts, |_| payload);
        assert_eq!(steps, vec![Step::Msg(0)], "one message");
        let sendable = |c: &SendChain| -> Vec<u8> {
            let msg = &c.msgs[0];
            (0..msg.msg_iovlen)
                .flat_map(|i| {
                    // SAFETY: the iovecs point into `chain.heads` and
                    // `data`, alive for the test.
                    let iov = unsafe { &*msg.msg_iov.add(i) };
                    // SAFETY: as above, `iov_len` bytes at `iov_base`.
                    unsafe { std::slice::from_raw_parts(iov.iov_base.cast::<u8>(), iov.iov_len) }
                        .to_vec()
                })
                .collect()
        };
        assert_eq!(sendable(&chain), data);
        chain.advance(0, 4);
        assert_eq!(sendable(&chain), data[4..], "inside the head");
        chain.advance(0, 6);
        assert_eq!(sendable(&chain), data[10..], "exactly past the head");
        chain.advance(0, 100);
        assert_eq!(sendable(&chain), data[110..], "inside the payload");
        assert_eq!(chain.group(0).map(|(bytes, _)| bytes), Some(146));
        assert_eq!(
            chain.group(0).map(|(_, tags)| tags.to_vec()),
            Some(vec![3]),
            "the payload's tag is still held"
        );
    }

    fn slice(tag: Tag, len: u32) -> BufSlice {
        BufSlice {
            tag,
            offset: 0,
            len,
        }
    }

    /// Plans `frames` (payload length, zero copy?) with 10-byte heads;
    /// returns the steps and, per group, its bytes and copied tags.
    fn plan(frames: &[(Option<u32>, bool)]) -> (Vec<Step>, Vec<(usize, Vec<Tag>)>) {
        let mut chain = SendChain::default();
        let mut parts = Vec::new();
        let mut start = 0;
        for (tag, (payload, zc)) in frames.iter().enumerate() {
            chain.heads.extend_from_slice(&[0u8; 10]);
            let Some(len) = payload else { continue };
            parts.push(Part::Head(start..chain.heads.len()));
            start = chain.heads.len();
            let s = slice(tag as Tag, *len);
            parts.push(if *zc {
                Part::ZeroCopy(s)
            } else {
                Part::Copy(s)
            });
        }
        if start < chain.heads.len() {
            parts.push(Part::Head(start..chain.heads.len()));
        }
        let backing = [0u8; 1];
        let steps = chain.plan(parts, |_| backing.as_ptr());
        let groups = (0..chain.groups.len())
            .map(|g| {
                let (bytes, tags) = chain.group(g).expect("group");
                (bytes, tags.to_vec())
            })
            .collect();
        for (g, msg) in chain.msgs.iter().enumerate() {
            let iovs = &chain.iovs[chain.groups[g].iovs.clone()];
            assert_eq!(msg.msg_iov.cast_const(), iovs.as_ptr());
            assert_eq!(msg.msg_iovlen, iovs.len());
            let sum: usize = iovs.iter().map(|v| v.iov_len).sum();
            assert_eq!(
                sum, chain.groups[g].bytes,
                "a message sends its group's bytes"
            );
        }
        (steps, groups)
    }

    #[test]
    fn a_batch_of_small_writes_and_reads_is_one_sendmsg() {
        let frames = [
            (Some(4096), false),
            (None, false),
            (Some(4096), false),
            (None, false),
        ];
        let (steps, groups) = plan(&frames);
        assert_eq!(steps, vec![Step::Msg(0)]);
        assert_eq!(groups, vec![(4 * 10 + 2 * 4096, vec![0, 2])]);
    }

    #[test]
    fn zero_copy_payloads_go_alone_between_the_gathered_heads() {
        let frames = [
            (Some(1 << 20), true),
            (None, false),
            (Some(4096), false),
            (Some(1 << 20), true),
        ];
        let (steps, groups) = plan(&frames);
        assert_eq!(
            steps,
            vec![
                Step::Msg(0),
                Step::ZeroCopy(slice(0, 1 << 20)),
                Step::Msg(1),
                Step::ZeroCopy(slice(3, 1 << 20)),
            ]
        );
        // Head 0; then heads 1, 2, payload 2 and head 3.
        assert_eq!(groups, vec![(10, vec![]), (30 + 4096, vec![2])]);
    }

    fn kernel(user_copy: bool, send_fixed: bool) -> BufferMode {
        BufferMode::Kernel {
            recv_fixed: send_fixed,
            user_copy,
            send_fixed,
        }
    }

    #[test]
    fn small_payloads_are_copied_where_they_can_be() {
        let zc = SendMode::ZeroCopy;
        let small = ZC_MIN - 512;
        assert_eq!(
            payload_send(kernel(false, false), zc, 512, false),
            Send::ZeroCopy
        );
        // With user copy, small kernel payloads are copied out and gathered.
        assert_eq!(
            payload_send(kernel(true, false), zc, small, false),
            Send::Copy
        );
        assert_eq!(
            payload_send(kernel(true, true), zc, small, true),
            Send::Copy
        );
        assert_eq!(
            payload_send(kernel(true, false), zc, ZC_MIN, false),
            Send::ZeroCopy
        );
        assert_eq!(payload_send(BufferMode::User, zc, small, false), Send::Copy);
        assert_eq!(
            payload_send(BufferMode::User, zc, ZC_MIN, false),
            Send::ZeroCopy
        );
        let copy = SendMode::Copy;
        assert_eq!(
            payload_send(BufferMode::User, copy, 1 << 20, false),
            Send::Copy
        );
    }

    #[test]
    fn request_pages_go_to_a_node_on_this_host_by_copy_only() {
        let zc = SendMode::ZeroCopy;
        let big = 1 << 20;
        assert_eq!(
            payload_send(kernel(true, true), zc, big, false),
            Send::ZeroCopy
        );
        // The kernel copies from the fixed buffer where a plain SEND takes
        // one, else the payload is copied out first.
        assert_eq!(
            payload_send(kernel(true, true), zc, big, true),
            Send::FixedCopy
        );
        assert_eq!(
            payload_send(kernel(false, true), zc, big, true),
            Send::FixedCopy
        );
        assert_eq!(payload_send(kernel(true, false), zc, big, true), Send::Copy);
        // Neither: a fixed-buffer zero-copy send is the only way out.
        assert_eq!(
            payload_send(kernel(false, false), zc, big, true),
            Send::ZeroCopy
        );
        // The daemon's own buffers are its memory: sent as the mode says.
        assert_eq!(
            payload_send(BufferMode::User, zc, big, true),
            Send::ZeroCopy
        );
    }

    #[test]
    fn a_data_detail_gives_back_its_tag_and_length() {
        let s = slice(8191, (64 << 20) - 1);
        assert_eq!(split_data_detail(data_detail(&s)), (8191, (64 << 20) - 1));
    }

    #[test]
    fn a_fixed_copy_payload_goes_alone_between_the_gathered_heads() {
        let mut chain = SendChain::default();
        chain.heads.extend_from_slice(&[0u8; 60]);
        let parts = vec![
            Part::Head(0..30),
            Part::FixedCopy(slice(4, 1 << 20)),
            Part::Head(30..60),
        ];
        let steps = chain.plan(parts, |_| std::ptr::null());
        assert_eq!(
            steps,
            vec![
                Step::Msg(0),
                Step::FixedCopy(slice(4, 1 << 20)),
                Step::Msg(1)
            ]
        );
    }

    #[test]
    fn a_vectored_chain_is_one_message_of_every_part_in_order() {
        let mut chain = SendChain::default();
        chain.heads.extend_from_slice(&[1u8; 30]);
        let slot = [0u8; 30];
        let parts = vec![
            Part::Head(0..10),
            Part::ZeroCopy(slice(0, 1 << 20)),
            Part::Head(10..20),
            Part::Copy(slice(1, 4096)),
            Part::Head(20..30),
        ];
        let payloads = [0u8; 2];
        let (bytes, payload, tags) = chain.plan_vectored(parts, slot.as_ptr(), |p| {
            payloads[usize::from(p.tag)..].as_ptr()
        });
        assert_eq!(bytes, 30 + (1 << 20) + 4096);
        assert_eq!(payload, (1 << 20) + 4096);
        assert_eq!(
            tags,
            vec![0, 1],
            "every payload is held until the notification"
        );
        assert_eq!(chain.msgs.len(), 1);
        assert_eq!(chain.msgs[0].msg_iov.cast_const(), chain.iovs.as_ptr());
        assert_eq!(chain.msgs[0].msg_iovlen, 5);
        let at = |i: usize| (chain.iovs[i].iov_base as usize, chain.iovs[i].iov_len);
        let slot_at = slot.as_ptr() as usize;
        // Heads from the slot (never from `chain.heads`), payloads in place.
        assert_eq!(at(0), (slot_at, 10));
        assert_eq!(at(1), (payloads.as_ptr() as usize, 1 << 20));
        assert_eq!(at(2), (slot_at + 10, 10));
        assert_eq!(at(3), (payloads.as_ptr() as usize + 1, 4096));
        assert_eq!(at(4), (slot_at + 20, 10));
    }

    #[test]
    fn a_head_slot_is_held_until_its_send_is_over() {
        let mut slots = HeadSlots::default();
        for i in 0..HEAD_SLOTS {
            let slot = slots.free().expect("a free slot");
            assert_eq!(slot, i);
            slots.slots[slot] = HeadSlot {
                busy: true,
                bytes: 100 + i,
                tags: vec![i as Tag, 7],
            };
        }
        assert_eq!(slots.free(), None, "all held: the chain goes without one");
        assert_eq!(slots.bytes(2), 102);
        assert_eq!(slots.release(2), vec![2, 7]);
        assert_eq!(slots.free(), Some(2));
        assert_eq!(slots.release(2), Vec::<Tag>::new(), "released once");
    }

    #[test]
    fn reads_only_are_one_sendmsg_of_heads() {
        let (steps, groups) = plan(&[(None, false); 5]);
        assert_eq!(steps, vec![Step::Msg(0)]);
        assert_eq!(groups, vec![(50, vec![])]);
    }
}

//! The receive side of a connection: one receive posted at a time, into the
//! connection buffer, from which payloads are copied into request buffers;
//! for request pages only the kernel can reach (kernel buffer mode), headers
//! exactly into the connection buffer and payloads straight into the pages,
//! except while no big read is in flight on the connection and the device
//! has user copy: then replies come in bulk as in user buffer mode and their
//! payloads are copied into the pages with a write on the char device (a
//! 7.3 guest, 4 KiB random reads at depth 32 over 3 nodes and 2 queues: the
//! exact receives took 4.5 ring operations and 1.2 `io_uring_enter` per IO,
//! against 1.7 and 0.16 on the copy path).
//!
//! Why copy in user buffer mode: one large receive takes many replies
//! (`netblk bench` seqread-1m over 128 KiB stripe units, loopback: 0.87-0.91
//! of the wire baseline with a 1-2 MiB buffer, against 0.45-0.56 when each
//! payload was received on its own straight into its request buffer: twice
//! the receives, each returning window to the node and paying for its
//! transmission in the queue thread's softirq).

use std::io;

use io_uring::{opcode, types};
use netblk_protocol::PREAMBLE_LEN;

use super::ids::{K_RECV, K_RECV_PAYLOAD, conn_id, user_data};
use super::sys::IORING_RECVSEND_FIXED_BUF;
use super::{BufferMode, Frontend, QueueDriver};
use crate::recv::RecvMode;

/// Receive buffer per connection (its pages are touched as it fills).
pub(super) const RECV_BUF: usize = 1 << 20;

impl<F: Frontend> QueueDriver<F> {
    /// Keeps one receive posted on `node`.
    pub(super) fn post_recv(&mut self, node: usize) -> io::Result<()> {
        // Exact receives: headers into the connection buffer, payloads
        // straight into the pages; or bulk into the connection buffer.
        let (kernel, bulk) = match self.buffer_mode {
            BufferMode::Kernel {
                recv_fixed,
                user_copy,
                ..
            } => (
                Some(recv_fixed),
                user_copy && self.engine.big_reads_in_flight(node) == 0,
            ),
            BufferMode::User => (None, true),
        };
        let conn = &mut self.conns[node];
        if conn.broken || conn.recv_posted {
            return Ok(());
        }
        let cid = conn_id(node, conn.generation);
        let entry = match (conn.reader.mode(), kernel) {
            (
                RecvMode::Payload {
                    tag, offset, left, ..
                },
                Some(recv_fixed),
            ) => {
                // Straight into the request's pages: offset addressing.
                debug_assert_eq!(conn.rstart, conn.rend, "kernel mode reads headers exactly");
                let at = offset as usize as *mut u8;
                if recv_fixed {
                    opcode::Recv::new(types::Fd(conn.fd), at, left)
                        .ioprio(IORING_RECVSEND_FIXED_BUF)
                        .buf_group(tag)
                        .flags(libc::MSG_WAITALL)
                        .build()
                        .user_data(user_data(K_RECV_PAYLOAD, cid, 0))
                } else {
                    opcode::ReadFixed::new(types::Fd(conn.fd), at, left, tag)
                        .build()
                        .user_data(user_data(K_RECV_PAYLOAD, cid, 0))
                }
            }
            _ => {
                if conn.rstart == conn.rend {
                    conn.rstart = 0;
                    conn.rend = 0;
                } else if conn.rbuf.len() - conn.rend < 64 << 10 {
                    conn.rbuf.copy_within(conn.rstart..conn.rend, 0);
                    conn.rend -= conn.rstart;
                    conn.rstart = 0;
                }
                let want = if !bulk {
                    // Exactly the rest of the preamble, or of the header: no
                    // payload byte may land here, it belongs in the pages.
                    let have = conn.rend - conn.rstart;
                    match conn.rbuf[conn.rstart..conn.rend].first_chunk::<PREAMBLE_LEN>() {
                        None => PREAMBLE_LEN - have,
                        Some(p) => {
                            let header_len =
                                u32::from_be_bytes([p[8], p[9], p[10], p[11]]) as usize;
                            (PREAMBLE_LEN + header_len).saturating_sub(have).max(1)
                        }
                    }
                } else {
                    conn.rbuf.len() - conn.rend
                };
                let want = want.min(conn.rbuf.len() - conn.rend);
                let free = &mut conn.rbuf[conn.rend..conn.rend + want];
                let flags = if bulk { 0 } else { libc::MSG_WAITALL };
                opcode::Recv::new(types::Fd(conn.fd), free.as_mut_ptr(), free.len() as u32)
                    .flags(flags)
                    .build()
                    .user_data(user_data(K_RECV, cid, 0))
            }
        };
        conn.recv_posted = true;
        conn.ops += 1;
        self.push(&entry)
    }

    /// if it brought nothing.
    /// Books a finished receive on `node`; false (and the connection broken)
    fn recv_done(&mut self, node: usize, res: i32, what: &str) -> bool {
        let conn = &mut self.conns[node];
        conn.ops = conn.ops.saturating_sub(1);
        conn.recv_posted = false;
        if res <= 0 {
            self.break_conn(node, what, res);
            return false;
        }
        true
    }

    pub(super) fn on_recv(&mut self, node: usize, res: i32) {
        if !self.recv_done(node, res, "connection closed by node") {
            return;
        }
        self.conns[node].rend += res as usize;
        if let Err(why) = self.parse(node) {
            self.break_conn(node, &why, 0);
        }
    }

    pub(super) fn on_recv_payload(&mut self, node: usize, res: i32) {
        if !self.recv_done(node, res, "connection closed by node mid-payload") {
            return;
        }
        if let Some(f) = self.engine.figures() {
            f.recv_direct_bytes.add(res as u64);
        }
        self.conns[node]
            .reader
            .payload_received(&mut self.engine, res as u32);
    }

    /// Consumes whole frames and payload bytes from the receive buffer.
    fn parse(&mut self, node: usize) -> Result<(), String> {
        let conn = &mut self.conns[node];
        let (buffers, frontend) = (&self.buffers, &self.frontend);
        let kernel = matches!(self.buffer_mode, BufferMode::Kernel { .. });
        let mut copy_failed = None;
        let mut copied = 0u64;
        let consumed = conn.reader.feed(
            node,
            &conn.rbuf[conn.rstart..conn.rend],
            &mut self.engine,
            |tag, offset, bytes| {
                copied += bytes.len() as u64;
                if kernel {
                    return frontend.copy_in(tag, offset, bytes).map_err(|err| {
                        let why = format!("copying a read payload into the request failed: {err}");
                        copy_failed = Some(why.clone());
                        why
                    });
                }
                let at = buffers.slice_ptr(tag, offset, bytes.len() as u32);
                // SAFETY: `at..at+len` is part of the slice the engine handed
                // out for this payload, inside the tag's buffer, which the
                // queue owns while the request is in flight; the source is the
                // connection's receive buffer, which does not overlap it.
                unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), at, bytes.len()) };
                Ok(())
            },
        );
        conn.rstart += consumed.as_ref().copied().unwrap_or(0);
        if let Some(f) = self.engine.figures() {
            f.recv_copied_bytes.add(copied);
        }
        if let Some(why) = copy_failed {
            // The connection breaks and the piece is read again, exactly.
            self.stop_user_copy(&why);
        }
        consumed.map(|_| ())
    }
}

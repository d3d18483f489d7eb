//! What one queue measured: written by its own thread only (the engine and
//! the driver, on the data path, with plain loads and stores), read by
//! anyone (metrics, `netblk status`) off the data path. Figures of a device
//! are the sum over its queues.

use std::sync::Mutex;
use std::time::Instant;

use netblk_observe::histogram::{Counter, Histogram};

use crate::engine::Op;

/// Operation names, as metric labels, by [`op_index`].
pub const OPS: [&str; 5] = ["read", "write", "flush", "discard", "write_zeroes"];

pub fn op_index(op: Op) -> usize {
    match op {
        Op::Read => 0,
        Op::Write { .. } => 1,
        Op::Flush => 2,
        Op::Discard => 3,
        Op::WriteZeroes => 4,
    }
}

/// The errnos requests fail with, as metric labels; anything else counts
/// as `other`.
pub const ERRNOS: [(i32, &str); 9] = [
    (libc::EIO, "EIO"),
    (libc::EINVAL, "EINVAL"),
    (libc::ENOSPC, "ENOSPC"),
    (libc::EOPNOTSUPP, "EOPNOTSUPP"),
    (libc::ERANGE, "ERANGE"),
    (libc::EAGAIN, "EAGAIN"),
    (libc::ETIMEDOUT, "ETIMEDOUT"),
    (libc::EPERM, "EPERM"),
    (0, "other"),
];

fn errno_index(errno: i32) -> usize {
    ERRNOS
        .iter()
        .position(|(e, _)| *e == errno)
        .unwrap_or(ERRNOS.len() - 1)
}

/// Block requests of one operation.
#[derive(Debug, Default)]
pub struct OpStats {
    pub requests: Counter,
    /// Bytes asked for (0 for flush).
    pub bytes: Counter,
    pub in_flight: Counter,
    /// Failed requests, by [`ERRNOS`].
    pub errors: [Counter; ERRNOS.len()],
    /// From arrival to completion.
    pub latency: Histogram,
}

/// One node, as this queue's connection to it sees it.
#[derive(Debug, Default)]
pub struct NodeStats {
    /// From a piece's send to its reply.
    pub piece_latency: Histogram,
    /// Payload bytes sent (writes) and received (reads).
    pub sent_bytes: Counter,
    pub received_bytes: Counter,
    /// 1 while the connection is up.
    pub connected: Counter,
    /// The handshake session of the current (or last) connection.
    pub session: Counter,
    pub reconnects: Counter,
    /// Pieces sent again after a lost connection.
    pub resent: Counter,
    /// Times its connection was torn down because a request timed out.
    pub timeouts: Counter,
    /// Pieces sent and not answered.
    pub in_flight: Counter,
    /// When the last reply came, and since when the connection is down
    /// (0: up), in nanoseconds after [`QueueStats::epoch`].
    pub last_reply_ns: Counter,
    pub down_since_ns: Counter,
    /// Why the connection was last lost or refused (state changes only).
    pub last_error: Mutex<String>,
}

/// Everything one queue measured; see the module docs.
#[derive(Debug)]
pub struct QueueStats {
    pub epoch: Instant,
    pub ops: [OpStats; OPS.len()],
    pub nodes: Vec<NodeStats>,
    /// Payloads sent with `SEND_ZC`, their notifications, and the bytes
    /// sent zero-copy and copied.
    pub zc_sends: Counter,
    pub zc_notifications: Counter,
    pub zc_bytes: Counter,
    pub copied_bytes: Counter,
    /// Read payload bytes received straight into request buffers or pages,
    /// and copied there from the connection buffer.
    pub recv_direct_bytes: Counter,
    pub recv_copied_bytes: Counter,
    /// Payloads that failed their data digest on the way (each sent again,
    /// or its request failed after the retries).
    pub digest_errors: Counter,
}

impl QueueStats {
    pub fn new(nodes: usize) -> QueueStats {
        QueueStats {
            epoch: Instant::now(),
            ops: Default::default(),
            nodes: (0..nodes).map(|_| NodeStats::default()).collect(),
            zc_sends: Counter::default(),
            zc_notifications: Counter::default(),
            zc_bytes: Counter::default(),
            copied_bytes: Counter::default(),
            recv_direct_bytes: Counter::default(),
            recv_copied_bytes: Counter::default(),
            digest_errors: Counter::default(),
        }
    }

    /// `at` as nanoseconds after the epoch (at least 1, so 0 can mean "never").
    pub fn ns(&self, at: Instant) -> u64 {
        (at.saturating_duration_since(self.epoch).as_nanos() as u64).max(1)
    }

    pub fn request_started(&self, op: Op, len: u64) {
        let s = &self.ops[op_index(op)];
        s.requests.add(1);
        s.bytes.add(len);
        s.in_flight.add(1);
    }

    pub fn request_done(&self, op: Op, latency_ns: u64, errno: i32) {
        let s = &self.ops[op_index(op)];
        s.in_flight.sub(1);
        s.latency.record_ns(latency_ns);
        if errno != 0 {
            s.errors[errno_index(errno)].add(1);
        }
    }

    /// The node's connection state changed; `why` says why it went down.
    pub fn node_down(&self, node: usize, at: Instant, why: &str) {
        if let Some(n) = self.nodes.get(node) {
            n.connected.set(0);
            if n.down_since_ns.get() == 0 {
                n.down_since_ns.set(self.ns(at));
            }
            *n.last_error.lock().unwrap_or_else(|p| p.into_inner()) = why.to_string();
        }
    }

    pub fn node_up(&self, node: usize, session: u64, reconnect: bool) {
        if let Some(n) = self.nodes.get(node) {
            n.connected.set(1);
            n.session.set(session);
            n.down_since_ns.set(0);
            if reconnect {
                n.reconnects.add(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_node_states_are_counted() {
        let s = QueueStats::new(2);
        s.request_started(Op::Write { fua: true }, 4096);
        s.request_started(Op::Read, 512);
        assert_eq!(s.ops[1].in_flight.get(), 1);
        s.request_done(Op::Write { fua: true }, 50_000, 0);
        s.request_done(Op::Read, 70_000, libc::EIO);
        s.request_done(Op::Read, 70_000, 12345);
        assert_eq!(s.ops[1].in_flight.get(), 0);
        assert_eq!(s.ops[1].bytes.get(), 4096);
        assert_eq!(s.ops[0].errors[0].get(), 1, "EIO");
        assert_eq!(s.ops[0].errors[ERRNOS.len() - 1].get(), 1, "other");
        assert_eq!(s.ops[1].latency.snapshot().count(), 1);
        let now = Instant::now();
        s.node_down(1, now, "reset");
        let since = s.nodes[1].down_since_ns.get();
        assert!(since > 0);
        s.node_down(1, now + std::time::Duration::from_secs(1), "again");
        assert_eq!(
            s.nodes[1].down_since_ns.get(),
            since,
            "down since the first"
        );
        s.node_up(1, 7, true);
        assert_eq!(s.nodes[1].connected.get(), 1);
        assert_eq!(s.nodes[1].reconnects.get(), 1);
        assert_eq!(s.nodes[1].down_since_ns.get(), 0);
        assert_eq!(*s.nodes[1].last_error.lock().expect("lock"), "again");
    }
}

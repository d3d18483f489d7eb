//! One node connection as the ring sees it, and how it breaks.

use std::io;
use std::net::TcpStream;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use super::{Frontend, QueueDriver};
use crate::recv::ReplyReader;

pub(super) struct Conn {
    /// None once a broken connection's operations are all back: it was
    /// closed then (a reset: see `sys::abort`).
    pub(super) stream: Option<TcpStream>,
    pub(super) fd: RawFd,
    /// The node is on this host (`crate::net::delivered_locally`): request
    /// pages are not sent to it zero-copy.
    pub(super) local: bool,
    /// The fencing epoch this connection was admitted at (the handshake's
    /// session): it may carry requests only while it is the node's current
    /// one (see `crate::epochs`).
    pub(super) epoch: u64,
    /// Bumped when the connection is replaced (see `conn_id`).
    pub(super) generation: u8,
    /// While lost: when the next reconnect may start, and the wait after it.
    pub(super) next_attempt: Instant,
    pub(super) backoff: Duration,
    pub(super) connecting: bool,
    /// The send chain in flight; kept alive until it completes.
    pub(super) chain: super::send::SendChain,
    /// CQEs (other than notifications) the chain still owes.
    pub(super) chain_left: u32,
    /// Heads of vectored sends awaiting their notification.
    pub(super) head_slots: super::send::HeadSlots,
    pub(super) rbuf: Box<[u8]>,
    pub(super) rstart: usize,
    pub(super) rend: usize,
    pub(super) reader: ReplyReader,
    pub(super) recv_posted: bool,
    /// Operations the kernel still holds, notifications included.
    pub(super) ops: u32,
    pub(super) broken: bool,
    pub(super) lost_reported: bool,
    /// The current outage, for its log lines: since when, reconnect
    /// attempts so far, when it was last summed up, and whether the
    /// node-down timeout (or a refusal) gave the node up.
    pub(super) outage: Option<Outage>,
}

/// One outage of a connection, logged when it starts and ends, with a
/// summary at most every [`OUTAGE_SUMMARY`] in between.
pub(super) struct Outage {
    pub(super) since: Instant,
    pub(super) attempts: u32,
    pub(super) summarized: Instant,
    pub(super) given_up: bool,
    pub(super) refused: bool,
}

/// How often a continuing outage is summed up in the log.
pub(super) const OUTAGE_SUMMARY: Duration = Duration::from_secs(30);

impl<F: Frontend> QueueDriver<F> {
    pub(super) fn break_conn(&mut self, node: usize, why: &str, res: i32) {
        let conn = &mut self.conns[node];
        if !conn.broken {
            conn.broken = true;
            let detail = if res < 0 {
                format!(": {}", io::Error::from_raw_os_error(-res))
            } else {
                String::new()
            };
            let now = Instant::now();
            if conn.outage.is_none() {
                tracing::warn!(node, epoch = conn.epoch, reason = %format!("{why}{detail}"), "connection lost");
                conn.outage = Some(Outage {
                    since: now,
                    attempts: 0,
                    summarized: now,
                    given_up: false,
                    refused: false,
                });
            }
            // Makes the operations still in the kernel finish, and the
            // kernel let go of every buffer the connection holds.
            if let Some(stream) = &conn.stream {
                super::sys::abort(stream);
            }
            // Before any request it held can complete: no queue sends to
            // the node again until a connection at the next epoch, which
            // the node fences this one for, is admitted.
            if let Some(r) = &self.reconnect {
                r.epochs.ended(node, conn.epoch);
            }
            if let Some(f) = self.engine.figures() {
                f.node_down(node, now, &format!("{why}{detail}"));
            }
        }
    }

    /// True if `node`'s connection is up but at an epoch older than the
    /// node's current one: it must not carry requests any more.
    pub(super) fn fenced_off(&self, node: usize) -> bool {
        let conn = &self.conns[node];
        !conn.broken
            && self
                .reconnect
                .as_ref()
                .is_some_and(|r| !r.epochs.may_send(node, conn.epoch))
    }

    /// Once every operation of a broken connection is back, tells the engine.
    pub(super) fn check_lost(&mut self, node: usize) {
        let conn = &mut self.conns[node];
        if !conn.broken || conn.lost_reported || conn.ops > 0 {
            return;
        }
        conn.lost_reported = true;
        // Closed now, not when a new connection replaces it: with linger 0
        // that resets what `abort` could not (kernel TLS), and nothing
        // queued on it goes out any more.
        conn.stream = None;
        conn.reader.reset(&mut self.engine);
        self.engine.handle_connection_lost(Instant::now(), node);
    }
}

//! The fencing epoch of each node, one per device, shared by its queues.
//!
//! Every queue of a device talks to a node as the same client (one client
//! id per device), and every connection presents the node's current epoch
//! in its handshake. A node admits any number of connections of the newest
//! epoch it has seen, and before it admits a newer one it fences every
//! connection of an older epoch: their requests not yet executed are
//! discarded, the executing ones finished (see the mock node's `fence`).
//!
//! Whenever a connection at the current epoch ends (lost, torn down at a
//! request's deadline, given up), the epoch moves on by one, once per event
//! however many queues notice it. From then on no queue sends to that node
//! on a connection of an older epoch: each breaks its connection and
//! reconnects at the new epoch. So once one connection at the new epoch is
//! admitted, nothing an older connection held can land any more, and no
//! request completed (with EIO at its deadline, or resent and answered)
//! can be overtaken by a stale copy of itself sent through another queue.
//!
//! A recovered daemon starts at `generation << 32`, above every epoch of
//! the daemons before it.

use std::sync::atomic::{AtomicU64, Ordering};

/// The epochs of a device's nodes; see the module docs.
#[derive(Debug)]
pub struct Epochs {
    nodes: Vec<AtomicU64>,
}

impl Epochs {
    /// Every node starts at `first`.
    pub fn new(nodes: usize, first: u64) -> Epochs {
        Epochs {
            nodes: (0..nodes).map(|_| AtomicU64::new(first)).collect(),
        }
    }

    /// The epoch a new connection to `node` presents.
    pub fn current(&self, node: usize) -> u64 {
        self.nodes.get(node).map_or(0, |e| e.load(Ordering::SeqCst))
    }

    /// Whether a connection at `epoch` may still carry requests to `node`.
    pub fn may_send(&self, node: usize, epoch: u64) -> bool {
        self.current(node) == epoch
    }

    /// A connection to `node` at `epoch` ended: if it was at the current
    /// epoch, the epoch moves on (once, whichever queue tells first).
    /// Returns the epoch now current.
    pub fn ended(&self, node: usize, epoch: u64) -> u64 {
        let Some(e) = self.nodes.get(node) else {
            return 0;
        };
        match e.compare_exchange(epoch, epoch + 1, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => epoch + 1,
            Err(now) => now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_moves_the_epoch_once_whichever_queue_tells() {
        let e = Epochs::new(2, 5);
        assert!(e.may_send(0, 5) && e.may_send(1, 5));
        // Queue 0's connection to node 0 is lost.
        assert_eq!(e.ended(0, 5), 6);
        // Queue 1's connection at the old epoch may not send, and its end
        // does not move the epoch again.
        assert!(!e.may_send(0, 5));
        assert_eq!(e.ended(0, 5), 6);
        assert_eq!(e.current(0), 6);
        assert!(e.may_send(0, 6));
        // Other nodes are untouched.
        assert_eq!(e.current(1), 5);
        // A connection at the new epoch that ends moves it again.
        assert_eq!(e.ended(0, 6), 7);
    }
}

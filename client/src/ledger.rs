//! The durability ledger of one device: what each node acknowledged, what
//! completed flushes cover, and whether a node may have lost acknowledged
//! writes. One per device, shared by all its queues, so that a FLUSH on any
//! queue covers every write acknowledged on any queue before it was sent,
//! and a node that came back as a new incarnation fails the next flush once
//! for the whole device, whichever queue noticed it.
//!
//! The ledger keeps no clock and does no IO. Its persisted part
//! ([`NodeDurability`]: the last incarnation seen, whether unflushed
//! acknowledged writes may exist, the lost mark) goes into the device record,
//! so that `map --recover` can tell whether a node that restarted while no
//! daemon served vouched for what the old daemon had acknowledged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::engine::Op;

const EIO: i32 = 5;

/// What the device record keeps of one node's durability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeDurability {
    /// The last incarnation of the volume seen on the node (0: none yet).
    pub incarnation: u64,
    /// Acknowledged writes not covered by a completed flush may exist.
    pub dirty: bool,
    /// The node may have lost acknowledged writes: the next flush fails.
    pub lost: bool,
}

#[derive(Debug, Default)]
struct NodeLedger {
    /// The newest incarnation seen on any queue's connection.
    incarnation: Option<u64>,
    /// What that incarnation vouched for (0: nothing).
    durable_incarnation: u64,
    /// Writes (discards, write-zeroes) acknowledged, on any queue...
    writes_acked: u64,
    /// ...and how many of them a completed flush covers.
    flushed_upto: u64,
    lost: bool,
}

impl NodeLedger {
    fn dirty(&self) -> bool {
        self.writes_acked > self.flushed_upto
    }
}

/// What acknowledging an operation did, besides its errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acked {
    /// The operation ends with this errno (0: success).
    Errno(i32),
    /// A flush failed because the node may have lost acknowledged writes
    /// (reported once; the mark is cleared).
    FlushFailed,
}

impl Acked {
    pub fn errno(self) -> i32 {
        match self {
            Acked::Errno(e) => e,
            Acked::FlushFailed => EIO,
        }
    }
}

/// The durability ledger of one device; see the module docs.
#[derive(Debug)]
pub struct Ledger {
    nodes: Vec<Mutex<NodeLedger>>,
    /// Grows whenever a persisted field changes (incarnation, lost mark):
    /// the serving daemon rewrites the record when it moved.
    version: AtomicU64,
}

impl Ledger {
    /// A ledger for a device mapped afresh: nothing acknowledged yet.
    pub fn new(nodes: usize) -> Ledger {
        Ledger {
            nodes: (0..nodes).map(|_| Mutex::default()).collect(),
            version: AtomicU64::new(0),
        }
    }

    /// A ledger that goes on from what a device record kept (a daemon that
    /// recovers the device): a node recorded dirty holds acknowledged writes
    /// that no flush is known to cover, so a new incarnation that does not
    /// vouch for the recorded one fails the next flush. Nodes the record
    /// does not cover start fresh.
    pub fn recovered(nodes: usize, recorded: &[NodeDurability]) -> Ledger {
        let ledger = Ledger::new(nodes);
        for (slot, r) in ledger.nodes.iter().zip(recorded) {
            let mut n = lock(slot);
            n.incarnation = (r.incarnation != 0).then_some(r.incarnation);
            n.writes_acked = u64::from(r.dirty);
            n.lost = r.lost;
        }
        ledger
    }

    fn node(&self, node: usize) -> Option<MutexGuard<'_, NodeLedger>> {
        self.nodes.get(node).map(lock)
    }

    /// A (re)connection to `node` said the volume is at `incarnation`, which
    /// made durable what `durable_incarnation` acknowledged (0: nothing).
    /// True if this found the node may have lost acknowledged writes (the
    /// next flush fails with EIO).
    pub fn observe(&self, node: usize, incarnation: u64, durable_incarnation: u64) -> bool {
        let Some(mut n) = self.node(node) else {
            return false;
        };
        let mut lost_now = false;
        match n.incarnation {
            Some(old) if old == incarnation => return false,
            Some(old) => {
                if n.dirty() && durable_incarnation != old {
                    lost_now = !n.lost;
                    n.lost = true;
                } else if !n.lost {
                    // Everything the old incarnation acknowledged is durable.
                    n.flushed_upto = n.writes_acked;
                }
            }
            None => {}
        }
        n.incarnation = Some(incarnation);
        n.durable_incarnation = durable_incarnation;
        drop(n);
        self.version.fetch_add(1, Ordering::SeqCst);
        lost_now
    }

    /// The incarnation of the volume last seen on `node` (None: never).
    pub fn incarnation(&self, node: usize) -> Option<u64> {
        self.node(node).and_then(|n| n.incarnation)
    }

    /// `node` is about to join its column again (docs/resync.md): what it
    /// acknowledged before it left is copied to it anew, so nothing of its
    /// past can be lost any more. Called while nothing is sent to it.
    pub fn forget(&self, node: usize) {
        if let Some(mut n) = self.node(node) {
            *n = NodeLedger::default();
            drop(n);
            self.version.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// What a flush sent to `node` now covers: the writes acknowledged so
    /// far, on every queue.
    pub fn covers(&self, node: usize) -> u64 {
        self.node(node).map_or(0, |n| n.writes_acked)
    }

    /// `node` acknowledged `op` on a connection to `incarnation` (a flush:
    /// sent when [`Ledger::covers`] said `covers`). Returns how the
    /// operation ends.
    pub fn acked(&self, node: usize, incarnation: Option<u64>, op: Op, covers: u64) -> Acked {
        let Some(mut n) = self.node(node) else {
            return Acked::Errno(0);
        };
        // A reply from a connection to an incarnation that another queue
        // has already seen replaced (it was read from the socket before the
        // loss was noticed): what it acknowledged lives in the old one.
        let stale = incarnation.is_some() && incarnation != n.incarnation;
        let vouched = incarnation.is_some_and(|i| i == n.durable_incarnation);
        match op {
            Op::Read => Acked::Errno(0),
            Op::Write { fua: false } | Op::Discard | Op::WriteZeroes => {
                n.writes_acked += 1;
                if stale && !vouched && !n.lost {
                    n.lost = true;
                    drop(n);
                    self.version.fetch_add(1, Ordering::SeqCst);
                }
                Acked::Errno(0)
            }
            Op::Write { fua: true } if n.lost => Acked::Errno(EIO),
            Op::Write { fua: true } => Acked::Errno(0),
            Op::Flush if n.lost => {
                // Reported once: from here on the node's state is known again.
                n.lost = false;
                n.flushed_upto = n.writes_acked;
                drop(n);
                self.version.fetch_add(1, Ordering::SeqCst);
                Acked::FlushFailed
            }
            Op::Flush => {
                if !stale {
                    n.flushed_upto = n.flushed_upto.max(covers);
                }
                Acked::Errno(0)
            }
        }
    }

    /// Grows whenever what [`Ledger::persisted`] returns may have changed.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }

    /// What the device record keeps, per node. `serving`: a daemon serves
    /// the device, so writes may be acknowledged at any moment: every node
    /// counts as dirty (the record must never say clean while a write it
    /// does not know of may be acknowledged).
    pub fn persisted(&self, serving: bool) -> Vec<NodeDurability> {
        self.nodes
            .iter()
            .map(|slot| {
                let n = lock(slot);
                NodeDurability {
                    incarnation: n.incarnation.unwrap_or(0),
                    dirty: serving || n.dirty(),
                    lost: n.lost,
                }
            })
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Op = Op::Write { fua: false };
    const FUA: Op = Op::Write { fua: true };

    #[test]
    fn a_flush_on_any_queue_covers_writes_acknowledged_on_every_queue() {
        let l = Ledger::new(1);
        assert!(!l.observe(0, 7, 0));
        // Queue 0 acknowledges a write; queue 1's flush covers it.
        assert_eq!(l.acked(0, Some(7), W, 0), Acked::Errno(0));
        let covers = l.covers(0);
        assert_eq!(covers, 1);
        assert_eq!(l.acked(0, Some(7), Op::Flush, covers), Acked::Errno(0));
        // The node restarts without vouching: nothing unflushed, nothing lost.
        assert!(!l.observe(0, 8, 0));
        assert_eq!(l.acked(0, Some(8), Op::Flush, l.covers(0)), Acked::Errno(0));
    }

    #[test]
    fn a_restart_over_unflushed_writes_fails_one_flush_for_the_device() {
        let l = Ledger::new(1);
        l.observe(0, 7, 0);
        l.acked(0, Some(7), W, 0);
        // Queue 1 reconnects first and sees the new incarnation.
        assert!(l.observe(0, 8, 0), "lost writes found");
        // Queue 0 sees it too: not found twice.
        assert!(!l.observe(0, 8, 0));
        assert_eq!(l.acked(0, Some(8), FUA, 0), Acked::Errno(EIO));
        assert_eq!(
            l.acked(0, Some(8), Op::Flush, l.covers(0)),
            Acked::FlushFailed
        );
        // Once: the other queue's flush after it succeeds, and so do FUA writes.
        assert_eq!(l.acked(0, Some(8), Op::Flush, l.covers(0)), Acked::Errno(0));
        assert_eq!(l.acked(0, Some(8), FUA, 0), Acked::Errno(0));
    }

    #[test]
    fn a_vouching_incarnation_loses_nothing() {
        let l = Ledger::new(1);
        l.observe(0, 7, 0);
        l.acked(0, Some(7), W, 0);
        assert!(!l.observe(0, 8, 7));
        assert_eq!(l.acked(0, Some(8), Op::Flush, l.covers(0)), Acked::Errno(0));
    }

    #[test]
    fn an_acknowledgement_from_a_replaced_incarnation_counts_as_lost() {
        let l = Ledger::new(1);
        l.observe(0, 7, 0);
        // Queue 1 reconnects to the new incarnation with nothing unflushed...
        assert!(!l.observe(0, 8, 0));
        // ...then queue 0 reads an acknowledgement the old one sent before
        // it died: that write may be gone.
        l.acked(0, Some(7), W, 0);
        assert_eq!(
            l.acked(0, Some(8), Op::Flush, l.covers(0)),
            Acked::FlushFailed
        );
        // A flush answered by the replaced incarnation covers nothing new.
        let l = Ledger::new(1);
        l.observe(0, 7, 0);
        l.acked(0, Some(7), W, 0);
        let covers = l.covers(0);
        assert!(l.observe(0, 8, 0));
        assert_eq!(l.acked(0, Some(8), Op::Flush, covers), Acked::FlushFailed);
    }

    #[test]
    fn a_recovered_ledger_fails_the_flush_when_the_node_did_not_vouch() {
        let dirty = NodeDurability {
            incarnation: 7,
            dirty: true,
            lost: false,
        };
        let l = Ledger::recovered(1, &[dirty]);
        assert!(l.observe(0, 8, 0), "restarted while no daemon served");
        assert_eq!(
            l.acked(0, Some(8), Op::Flush, l.covers(0)),
            Acked::FlushFailed
        );
        // The same incarnation, or one that vouched: nothing lost.
        let l = Ledger::recovered(1, &[dirty]);
        assert!(!l.observe(0, 7, 0));
        let l = Ledger::recovered(1, &[dirty]);
        assert!(!l.observe(0, 8, 7));
        assert_eq!(l.acked(0, Some(8), Op::Flush, l.covers(0)), Acked::Errno(0));
        // Clean when recorded: a restart lost nothing.
        let l = Ledger::recovered(
            1,
            &[NodeDurability {
                dirty: false,
                ..dirty
            }],
        );
        assert!(!l.observe(0, 8, 0));
        // A pending lost mark survives the recovery.
        let l = Ledger::recovered(
            1,
            &[NodeDurability {
                lost: true,
                ..dirty
            }],
        );
        assert!(!l.observe(0, 7, 0));
        assert_eq!(
            l.acked(0, Some(7), Op::Flush, l.covers(0)),
            Acked::FlushFailed
        );
    }

    #[test]
    fn persisted_state_says_dirty_while_serving_and_follows_changes() {
        let l = Ledger::new(2);
        let v0 = l.version();
        l.observe(0, 7, 0);
        l.observe(1, 9, 0);
        assert!(l.version() > v0);
        assert_eq!(
            l.persisted(true),
            vec![
                NodeDurability {
                    incarnation: 7,
                    dirty: true,
                    lost: false
                },
                NodeDurability {
                    incarnation: 9,
                    dirty: true,
                    lost: false
                }
            ]
        );
        l.acked(0, Some(7), W, 0);
        let p = l.persisted(false);
        assert!(p[0].dirty && !p[1].dirty, "{p:?}");
        l.acked(0, Some(7), Op::Flush, l.covers(0));
        assert!(!l.persisted(false)[0].dirty);
    }
}

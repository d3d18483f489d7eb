//! The owner's side of the nodes' activity logs (docs/replication.md,
//! "Activity log and reconcile"): which writes are in flight device-wide
//! ([`WriteEpochs`]), and the [`Trimmer`] that tells the in-sync members to
//! forget regions whose writes every member acknowledged.
//!
//! A region may leave a member's log only once every write to it that any
//! member may have applied is acknowledged by every in-sync member. The
//! trimmer reads each member's log (regions and their sequence numbers),
//! then waits until every write the queues started before that has
//! finished (an epoch flip and drain, as RCU's grace period), then trims
//! exactly those entries: a write to a region after the read changed its
//! sequence number on the node, so that region stays logged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::layout::Layout;
use crate::membership::Membership;
use crate::records::RecordStore;

/// Epochs counted at once: a flip may reuse a slot only once the writes
/// of the epoch that last used it finished, so grace periods of the
/// trimmer and of copiers may overlap without one drain counting writes
/// newer than its flip (a drain that could wait forever under load).
const SLOTS: u64 = 4;

/// Writes (writes, discards, write-zeroes) in flight on every queue of a
/// replicated device, counted by epoch so that the trimmer and copiers can
/// wait for the ones started before a point in time without stopping new
/// ones.
#[derive(Debug, Default)]
pub struct WriteEpochs {
    epoch: AtomicU64,
    active: [AtomicU64; SLOTS as usize],
}

impl WriteEpochs {
    /// A write starts: the slot to hand back to [`WriteEpochs::leave`].
    pub fn enter(&self) -> u8 {
        loop {
            let epoch = self.epoch.load(Ordering::SeqCst);
            let slot = (epoch % SLOTS) as usize;
            self.active[slot].fetch_add(1, Ordering::SeqCst);
            // Counted in the epoch that is current after counting (a flip
            // in between: count in the new one, so the drain of the old one
            // need not wait for this write, which it did not see).
            if self.epoch.load(Ordering::SeqCst) == epoch {
                return slot as u8;
            }
            self.active[slot].fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// A write counted in `slot` finished (acknowledged by every in-sync
    /// member, or failed).
    pub fn leave(&self, slot: u8) {
        self.active[usize::from(slot) % SLOTS as usize].fetch_sub(1, Ordering::SeqCst);
    }

    /// Starts a new epoch; returns the one that ended, whose writes
    /// [`WriteEpochs::drained`] waits for. None (try again later: never
    /// wait here, the writes may wait for the caller) while writes of the
    /// epoch whose slot the new one would take are in flight.
    pub fn flip(&self) -> Option<u64> {
        loop {
            let epoch = self.epoch.load(Ordering::SeqCst);
            let next = ((epoch + 1) % SLOTS) as usize;
            if self.active[next].load(Ordering::SeqCst) != 0 {
                return None;
            }
            if self
                .epoch
                .compare_exchange(epoch, epoch + 1, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                return Some(epoch);
            }
        }
    }

    /// True once every write of `epoch` and of the epochs before it
    /// finished (another flip may have come between).
    pub fn drained(&self, epoch: u64) -> bool {
        // The epochs `SLOTS` or more before the current one are drained:
        // their slot was empty when the flip took it for a newer one.
        let oldest = self.epoch.load(Ordering::SeqCst).saturating_sub(SLOTS - 1);
        (oldest..=epoch).all(|e| self.active[(e % SLOTS) as usize].load(Ordering::SeqCst) == 0)
    }

    /// Writes in flight now, all epochs.
    pub fn in_flight(&self) -> u64 {
        self.active.iter().map(|a| a.load(Ordering::SeqCst)).sum()
    }
}

/// How often the trimmer looks at the logs: a region stays logged at least
/// this long after its last write (what an unclean stop reconciles).
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Entries of one member's log: (region, sequence number).
type Entries = Vec<(u64, u64)>;

/// Trims the in-sync members' activity logs, one step at a time (the
/// manager's thread steps it; the simulator does itself).
pub struct Trimmer {
    /// How often it reads the logs.
    every: Duration,
    next: Instant,
    /// Logs read, waiting for the writes of the epoch that ended then.
    draining: Option<(u64, Vec<(usize, Entries)>)>,
    /// A planted bug for the simulator to find (never set outside tests):
    /// trim without waiting for the writes in flight.
    #[doc(hidden)]
    pub plant_no_drain: bool,
}

impl Trimmer {
    pub fn new(now: Instant, every: Duration) -> Trimmer {
        Trimmer {
            every,
            next: now + every,
            draining: None,
            plant_no_drain: false,
        }
    }

    /// One step: reads the in-sync members' logs when due, trims once the
    /// writes started before that finished.
    pub fn step(&mut self, now: Instant, m: &Membership, store: &dyn RecordStore, layout: &Layout) {
        let view = m.view();
        if view.fenced {
            return;
        }
        if let Some((epoch, logs)) = &self.draining {
            if !m.writes.drained(*epoch) && !self.plant_no_drain {
                return;
            }
            for (node, entries) in logs {
                // Durable before it is forgotten: a member that lost an
                // acknowledged write in a restart must not find the region
                // gone from its log.
                if let Err(why) = store.flush(*node, view.owner_epoch) {
                    tracing::debug!(node, error = %why, "cannot flush before trimming the activity log");
                    continue;
                }
                if let Err(why) = store.trim(*node, view.owner_epoch, entries) {
                    // Kept: reconciled for nothing after a crash.
                    tracing::debug!(node, error = %why, "cannot trim the activity log");
                }
            }
            self.draining = None;
            self.next = now + self.every;
            return;
        }
        if now < self.next {
            return;
        }
        self.next = now + self.every;
        let r = layout.replication();
        let logs: Vec<(usize, Entries)> = (0..layout.node_count())
            .filter(|n| view.in_sync(r.column_of(*n), r.row_of(*n)) && !m.is_failed(*n))
            .filter_map(|n| store.activity(n).ok().map(|e| (n, e)))
            .filter(|(_, e)| !e.is_empty())
            .collect();
        // No flip now (writes of several epochs ago are still held): the
        // next round tries again.
        if !logs.is_empty()
            && let Some(epoch) = m.writes.flip()
        {
            self.draining = Some((epoch, logs));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_waits_for_the_writes_started_before_the_flip_only() {
        let w = WriteEpochs::default();
        let before = w.enter();
        let epoch = w.flip().expect("flip");
        let after = w.enter();
        assert!(
            !w.drained(epoch),
            "a write from before the flip is in flight"
        );
        w.leave(before);
        assert!(
            w.drained(epoch),
            "the write after the flip is not waited for"
        );
        assert_eq!(w.in_flight(), 1);
        w.leave(after);
        assert_eq!(w.in_flight(), 0);
        let next = w.flip().expect("flip");
        assert!(w.drained(next));
    }

    #[test]
    fn overlapping_drains_wait_only_for_their_own_writes() {
        let w = WriteEpochs::default();
        let old = w.enter();
        // The trimmer flips, then a copier flips before the trimmer's
        // drain is over; writes go on in the newest epoch.
        let trimmer = w.flip().expect("flip");
        let copier = w.flip().expect("flip");
        let newer: Vec<u8> = (0..3).map(|_| w.enter()).collect();
        assert!(!w.drained(trimmer), "the write from before its flip");
        assert!(!w.drained(copier), "and the copier's flip came later still");
        w.leave(old);
        assert!(
            w.drained(trimmer) && w.drained(copier),
            "the newer writes are not waited for"
        );
        // A flip never reuses a slot with writes of its old epoch in it.
        let held = w.enter();
        let at = w.flip().expect("flip");
        for s in newer {
            w.leave(s);
        }
        // As many flips as can pass it by; the next must wait for it.
        for _ in 0..SLOTS - 2 {
            w.flip().expect("flip");
        }
        assert_eq!(w.flip(), None, "its slot is not free yet");
        assert!(!w.drained(at), "still in flight after other flips");
        w.leave(held);
        assert!(w.drained(at));
    }
}

//! Regions a background copier holds (docs/resync.md: catch-up, rebuild,
//! scrub repair): while a copier copies a region of a column from one
//! member to another, new writes to that region wait, and the copier first
//! waits for the writes to it already in flight. So a write either
//! completed before the copy read the region (the copy carries it) or goes
//! to every member after the copy: the newest data ends on every member.
//!
//! While no copier runs the engines neither count nor wait (one atomic
//! load a write). A copier that starts must let the writes admitted before
//! it (not counted) drain first: a flip and drain of the membership's
//! write epochs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Bytes of node offsets one region covers: the unit of catch-up copies
/// (the nodes' missed bitmaps count in it too).
pub const RESYNC_REGION: u64 = netblk_protocol::geometry::MISSED_REGION;

/// A change in flight or waiting: (column, node offset, length).
pub type Range = (usize, u64, u64);

#[derive(Debug, Default)]
struct Region {
    /// Copiers holding it (a scrub and a catch-up may both want it).
    locked: u32,
    in_flight: u32,
}

/// The device's held regions and the writes in flight to each; shared by
/// its queues' engines and its copiers.
#[derive(Debug, Default)]
pub struct RegionGate {
    /// Copiers running.
    active: AtomicU64,
    /// Moves on every unlock: engines with waiting writes look again.
    version: AtomicU64,
    regions: Mutex<HashMap<(usize, u64), Region>>,
}

fn regions_of(ranges: &[Range]) -> impl Iterator<Item = (usize, u64)> + '_ {
    ranges.iter().flat_map(|(column, offset, len)| {
        let last = offset + len.max(&1) - 1;
        (offset / RESYNC_REGION..=last / RESYNC_REGION).map(move |r| (*column, r))
    })
}

impl RegionGate {
    fn lock_map(&self) -> MutexGuard<'_, HashMap<(usize, u64), Region>> {
        self.regions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True while a copier runs: writes must [`RegionGate::enter`].
    pub fn active(&self) -> bool {
        self.active.load(Ordering::SeqCst) > 0
    }

    /// A copier starts; it must then drain the write epochs before it
    /// relies on the counts.
    pub fn activate(&self) {
        self.active.fetch_add(1, Ordering::SeqCst);
    }

    /// A copier ended (every region it locked unlocked).
    pub fn deactivate(&self) {
        self.active.fetch_sub(1, Ordering::SeqCst);
        self.version.fetch_add(1, Ordering::SeqCst);
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }

    /// Counts a write's `ranges` in flight, all or none: false if one of
    /// their regions is locked (the write waits and tries again).
    pub fn enter(&self, ranges: &[Range]) -> bool {
        let mut map = self.lock_map();
        if regions_of(ranges).any(|key| map.get(&key).is_some_and(|r| r.locked > 0)) {
            return false;
        }
        for key in regions_of(ranges) {
            map.entry(key).or_default().in_flight += 1;
        }
        true
    }

    /// A write counted by [`RegionGate::enter`] finished.
    pub fn leave(&self, ranges: &[Range]) {
        let mut map = self.lock_map();
        for key in regions_of(ranges) {
            if let Some(r) = map.get_mut(&key) {
                r.in_flight = r.in_flight.saturating_sub(1);
                if r.in_flight == 0 && r.locked == 0 {
                    map.remove(&key);
                }
            }
        }
    }

    /// Holds region `region` of `column`: writes to it wait from now on
    /// (until every copier that holds it released it).
    pub fn lock(&self, column: usize, region: u64) {
        self.lock_map().entry((column, region)).or_default().locked += 1;
    }

    /// True once no counted write to the region is in flight.
    pub fn drained(&self, column: usize, region: u64) -> bool {
        self.lock_map()
            .get(&(column, region))
            .is_none_or(|r| r.in_flight == 0)
    }

    /// Releases the region: the writes waiting for it go on.
    pub fn unlock(&self, column: usize, region: u64) {
        let mut map = self.lock_map();
        if let Some(r) = map.get_mut(&(column, region)) {
            r.locked = r.locked.saturating_sub(1);
            if r.in_flight == 0 && r.locked == 0 {
                map.remove(&(column, region));
            }
        }
        drop(map);
        self.version.fetch_add(1, Ordering::SeqCst);
    }
}

/// Polls `done` every millisecond until it holds or `limit` passes (a
/// copier's waits for the writes it must let finish).
pub fn wait_until(limit: std::time::Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while !done() {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_locked_region_stops_new_writes_and_drains_the_old_ones() {
        let gate = RegionGate::default();
        let a = [(0, 0, 4096)];
        let spanning = [(0, RESYNC_REGION - 512, 1024)];
        let other_column = [(1, 0, 4096)];
        assert!(gate.enter(&a));
        gate.lock(0, 0);
        assert!(!gate.drained(0, 0), "the write entered before the lock");
        assert!(!gate.enter(&a), "a new write to a locked region waits");
        assert!(!gate.enter(&spanning), "all or none: one region is locked");
        assert!(gate.drained(0, 1), "and nothing of it was counted");
        assert!(gate.enter(&other_column));
        gate.leave(&a);
        assert!(gate.drained(0, 0));
        let before = gate.version();
        gate.unlock(0, 0);
        assert!(gate.version() > before, "waiting writes look again");
        assert!(gate.enter(&spanning));
        assert!(!gate.drained(0, 0) && !gate.drained(0, 1));
        gate.leave(&spanning);
        gate.leave(&other_column);
        // Two copiers hold a region: it is free after both released it.
        gate.lock(0, 0);
        gate.lock(0, 0);
        gate.unlock(0, 0);
        assert!(!gate.enter(&a), "still held by the other copier");
        gate.unlock(0, 0);
        assert!(gate.enter(&a));
        gate.leave(&a);
        assert!(gate.lock_map().is_empty(), "nothing left behind");
    }
}

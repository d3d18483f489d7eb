//! What a member out of this node's column missed (docs/resync.md, "What
//! the remaining members remember"): per replica row out of the in-sync
//! set, the regions of `MISSED_REGION` bytes changed here since it left.
//!
//! - A row is tracked from the record that takes it out (its bitmap seeded
//!   with the activity log, which holds every change that may still have
//!   been in flight then) until the record that puts it back.
//! - Kept in memory and written to the store lazily: before a region
//!   leaves the activity log ([`Missed::persist`], called by the trim), so
//!   that after a restart the stored bitmap plus the activity log cover
//!   every change since the row left.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Mutex, MutexGuard};

use netblk_protocol::geometry::{ACTIVITY_PAGE, ACTIVITY_REGION, MISSED_REGION};
use netblk_protocol::pb;

use crate::store::Backend;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Row {
    /// The record generation tracking started at.
    since: u64,
    regions: BTreeSet<u64>,
}

#[derive(Default)]
pub struct Missed {
    rows: Mutex<BTreeMap<u32, Row>>,
    /// Held while the bitmaps are encoded and stored: an older copy is
    /// never stored after a newer one.
    persisting: Mutex<()>,
}

/// The missed regions covering activity-log region `region`.
fn of_activity(region: u64) -> impl Iterator<Item = u64> {
    let per = ACTIVITY_REGION / MISSED_REGION;
    region * per..(region + 1) * per
}

impl Missed {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u32, Row>> {
        self.rows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the store kept, plus every region of the activity log
    /// (`activity`: its regions), which covers the marks made since the
    /// last [`Missed::persist`].
    pub fn load(backend: &dyn Backend, activity: &[u64]) -> io::Result<Missed> {
        let mut rows = match backend.load_missed()? {
            Some(bytes) => decode(&bytes)?,
            None => BTreeMap::new(),
        };
        for row in rows.values_mut() {
            row.regions
                .extend(activity.iter().flat_map(|r| of_activity(*r)));
        }
        Ok(Missed {
            rows: Mutex::new(rows),
            persisting: Mutex::new(()),
        })
    }

    /// A record was stored, while changes may be applied. Rows of
    /// `column` out of its in-sync set start being tracked, seeded with
    /// the activity log's regions (`activity`, read while the bitmaps are
    /// locked); rows back in it stop. Returns whether anything changed
    /// (then the caller persists).
    ///
    /// No change is lost without stopping the writes: a change is logged
    /// in the activity log before it marks the bitmaps ([`Missed::touch`]).
    /// One logged after `activity` is read marks after this returns, when
    /// the row is tracked; one logged before is in `activity`.
    pub fn on_record(
        &self,
        record: &pb::MembershipRecord,
        column: u32,
        own_row: u32,
        replicas: u32,
        activity: impl FnOnce() -> Vec<u64>,
    ) -> bool {
        let Some(iss) = record.iss.get(column as usize).copied() else {
            return false;
        };
        let mut rows = self.lock();
        let activity = activity();
        let mut changed = false;
        for row in (0..replicas).filter(|r| *r != own_row) {
            let in_sync = iss & (1 << row) != 0;
            if in_sync {
                changed |= rows.remove(&row).is_some();
            } else if let Entry::Vacant(entry) = rows.entry(row) {
                entry.insert(Row {
                    since: record.generation,
                    regions: activity.iter().flat_map(|r| of_activity(*r)).collect(),
                });
                changed = true;
            }
        }
        changed
    }

    /// A change of `len` bytes at `offset` is being applied: every tracked
    /// row missed its regions.
    pub fn touch(&self, offset: u64, len: u64) {
        let mut rows = self.lock();
        if rows.is_empty() || len == 0 {
            return;
        }
        let last = offset.saturating_add(len - 1) / MISSED_REGION;
        for row in rows.values_mut() {
            row.regions.extend(offset / MISSED_REGION..=last);
        }
    }

    /// Writes the bitmaps to the store (before activity-log regions that
    /// cover their newest marks are dropped).
    pub fn persist(&self, backend: &dyn Backend) -> io::Result<()> {
        let _one = self.persisting.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = encode(&self.lock());
        backend.store_missed(&bytes)
    }

    /// Row `row`'s regions from `from` on, at most a page; whether more
    /// follow; the generation tracking started at (0: not tracked).
    pub fn page(&self, row: u32, from: u64) -> (Vec<u64>, bool, u64) {
        let rows = self.lock();
        let Some(r) = rows.get(&row) else {
            return (Vec::new(), false, 0);
        };
        let mut it = r.regions.range(from..);
        let page: Vec<u64> = it.by_ref().take(ACTIVITY_PAGE).copied().collect();
        (page, it.next().is_some(), r.since)
    }
}

/// Rows as: u32 row, u64 since, u64 count, count × u64 region (little
/// endian).
fn encode(rows: &BTreeMap<u32, Row>) -> Vec<u8> {
    let mut out = Vec::new();
    for (row, r) in rows {
        out.extend(row.to_le_bytes());
        out.extend(r.since.to_le_bytes());
        out.extend((r.regions.len() as u64).to_le_bytes());
        for region in &r.regions {
            out.extend(region.to_le_bytes());
        }
    }
    out
}

fn decode(bytes: &[u8]) -> io::Result<BTreeMap<u32, Row>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "missed bitmaps cut short");
    // The next `n`-byte little-endian field at `*at`.
    let take = |at: &mut usize, n: usize| -> io::Result<u64> {
        let field = bytes.get(*at..*at + n).ok_or_else(bad)?;
        *at += n;
        let mut word = [0u8; 8];
        word[..n].copy_from_slice(field);
        Ok(u64::from_le_bytes(word))
    };
    let mut at = 0usize;
    let mut rows = BTreeMap::new();
    while at < bytes.len() {
        let row = u32::try_from(take(&mut at, 4)?).map_err(|_| bad())?;
        let since = take(&mut at, 8)?;
        let count = take(&mut at, 8)?;
        let mut regions = BTreeSet::new();
        for _ in 0..count {
            regions.insert(take(&mut at, 8)?);
        }
        rows.insert(row, Row { since, regions });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{StoreKind, VolumeMeta, open_or_create};

    fn meta() -> VolumeMeta {
        VolumeMeta::one_column(3)
    }

    fn record(generation: u64, iss: u32) -> pb::MembershipRecord {
        pb::MembershipRecord {
            generation,
            iss: vec![iss],
            ..Default::default()
        }
    }

    #[test]
    fn a_row_out_of_sync_collects_what_it_missed_until_it_is_back() {
        let (backend, _, _) = open_or_create(&StoreKind::Memory, "v", meta()).expect("open");
        let missed = Missed::load(&*backend, &[]).expect("load");
        missed.touch(0, 4096);
        assert_eq!(missed.page(1, 0), (vec![], false, 0), "all in sync");
        // Row 1 leaves at generation 2; a change in flight then is in the
        // activity log (region 1 = 4..8 MiB).
        assert!(missed.on_record(&record(2, 0b101), 0, 0, 3, || vec![1]));
        missed.touch(10 * MISSED_REGION + 5, 2 * MISSED_REGION);
        let (regions, more, since) = missed.page(1, 0);
        assert_eq!(regions, [4, 5, 6, 7, 10, 11, 12]);
        assert_eq!((more, since), (false, 2));
        assert_eq!(missed.page(2, 0).2, 0, "row 2 is in sync: not tracked");
        assert_eq!(missed.page(1, 7).0, [7, 10, 11, 12], "from region 7");
        // Back in sync: forgotten.
        assert!(missed.on_record(&record(3, 0b111), 0, 0, 3, Vec::new));
        assert_eq!(missed.page(1, 0), (vec![], false, 0));
    }

    #[test]
    fn after_a_restart_the_stored_bitmap_and_the_activity_log_cover_every_mark() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StoreKind::Dir(dir.path().to_path_buf());
        {
            let (backend, _, _) = open_or_create(&store, "v", meta()).expect("open");
            let missed = Missed::load(&*backend, &[]).expect("load");
            missed.on_record(&record(5, 0b011), 0, 0, 3, Vec::new);
            missed.touch(0, 512);
            missed.persist(&*backend).expect("persist");
            // Marked after the last persist: covered by the activity log.
            missed.touch(9 * MISSED_REGION, 512);
        }
        let (backend, _, _) = open_or_create(&store, "v", meta()).expect("reopen");
        let missed = Missed::load(&*backend, &[2]).expect("load");
        let (regions, _, since) = missed.page(2, 0);
        assert_eq!(regions, [0, 8, 9, 10, 11]);
        assert_eq!(since, 5);
        // Garbage is refused, not misread.
        std::fs::write(dir.path().join("v.missed"), [1, 0, 0, 0, 9]).expect("write");
        assert!(Missed::load(&*backend, &[]).is_err());
    }
}

//! The activity log of a replicated volume on this node
//! (docs/replication.md, "Activity log and reconcile"): the regions of
//! `ACTIVITY_REGION` bytes that had a write, discard or write-zeroes since
//! the volume's owner last trimmed them. After an unclean stop the owner
//! reconciles exactly those regions between the replicas.
//!
//! Rules: a region is logged durably (by the store) before the first
//! request to it after a trim is applied; the node never drops a region on
//! its own; a trim drops a region only if no request touched it since the
//! owner read its sequence number.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Mutex, MutexGuard};

use netblk_protocol::geometry::{ACTIVITY_PAGE, activity_regions};

use crate::store::{Backend, random_u64};

pub struct ActivityLog {
    inner: Mutex<Inner>,
}

struct Inner {
    /// Logged region -> its sequence number.
    regions: BTreeMap<u64, u64>,
    /// The next sequence number; starts at random so that a trim from
    /// before a restart never matches one after it.
    next_seq: u64,
}

/// One page of the log: (region, sequence number) pairs in order, and
/// whether more follow.
pub type Page = (Vec<(u64, u64)>, bool);

impl ActivityLog {
    /// The log the store kept (empty where it keeps none).
    pub fn load(backend: &dyn Backend) -> io::Result<ActivityLog> {
        let mut next_seq = random_u64() >> 2;
        let regions = backend
            .load_activity()?
            .into_iter()
            .map(|region| {
                next_seq += 1;
                (region, next_seq)
            })
            .collect();
        Ok(ActivityLog {
            inner: Mutex::new(Inner { regions, next_seq }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Logs the regions of a request at node offset `offset` of `len`
    /// bytes, before it is applied: regions new to the log are made durable
    /// by the store first. On an error the request must not be applied.
    pub fn touch(&self, backend: &dyn Backend, offset: u64, len: u64) -> io::Result<()> {
        let mut inner = self.lock();
        let regions = activity_regions(offset, len);
        let new: Vec<u64> = regions
            .clone()
            .filter(|r| !inner.regions.contains_key(r))
            .collect();
        if !new.is_empty() {
            // Under the lock: a concurrent request to the same region must
            // not be applied before the region is durably logged.
            backend.append_activity(&new)?;
        }
        for region in regions {
            inner.next_seq += 1;
            let seq = inner.next_seq;
            inner.regions.insert(region, seq);
        }
        Ok(())
    }

    /// The logged regions from `from` on, at most [`ACTIVITY_PAGE`].
    pub fn page(&self, from: u64) -> Page {
        let inner = self.lock();
        let mut entries = inner.regions.range(from..);
        let page: Vec<(u64, u64)> = entries
            .by_ref()
            .take(ACTIVITY_PAGE)
            .map(|(r, s)| (*r, *s))
            .collect();
        (page, entries.next().is_some())
    }

    /// Drops every listed region whose sequence number is unchanged, and
    /// keeps the store's log to what remains. Returns how many were
    /// dropped.
    pub fn trim(&self, backend: &dyn Backend, entries: &[(u64, u64)]) -> io::Result<usize> {
        let mut inner = self.lock();
        let drop: Vec<u64> = entries
            .iter()
            .filter(|(r, s)| inner.regions.get(r) == Some(s))
            .map(|(r, _)| *r)
            .collect();
        if drop.is_empty() {
            return Ok(0);
        }
        let kept: Vec<u64> = inner
            .regions
            .keys()
            .copied()
            .filter(|r| !drop.contains(r))
            .collect();
        // The store first: a crash keeps the longer log, never a shorter
        // one than the node answered with.
        backend.rewrite_activity(&kept)?;
        for r in &drop {
            inner.regions.remove(r);
        }
        Ok(drop.len())
    }

    /// Regions logged now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().regions.len()
    }

    /// The regions logged now.
    pub fn regions(&self) -> Vec<u64> {
        self.lock().regions.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{StoreKind, VolumeMeta, open_or_create};
    use netblk_protocol::geometry::ACTIVITY_REGION;

    fn meta() -> VolumeMeta {
        VolumeMeta::one_column(2)
    }

    #[test]
    fn a_trim_drops_only_regions_untouched_since_they_were_read() {
        let (backend, _, _) = open_or_create(&StoreKind::Memory, "v", meta()).expect("open");
        let log = ActivityLog::load(&*backend).expect("load");
        log.touch(&*backend, 0, 4096).expect("touch");
        log.touch(&*backend, ACTIVITY_REGION - 512, 1024)
            .expect("touch");
        log.touch(&*backend, 5 * ACTIVITY_REGION, 512)
            .expect("touch");
        let (page, more) = log.page(0);
        assert!(!more);
        assert_eq!(page.iter().map(|(r, _)| *r).collect::<Vec<_>>(), [0, 1, 5]);
        assert_eq!(log.page(2).0.len(), 1, "from region 2 on: region 5");
        // Region 1 is written again after the owner read the log.
        log.touch(&*backend, ACTIVITY_REGION, 512).expect("touch");
        assert_eq!(log.trim(&*backend, &page).expect("trim"), 2);
        assert_eq!(
            log.page(0).0.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
            [1]
        );
    }

    #[test]
    fn the_directory_store_keeps_the_log_across_restarts_until_trimmed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StoreKind::Dir(dir.path().to_path_buf());
        {
            let (backend, _, _) = open_or_create(&store, "v", meta()).expect("open");
            let log = ActivityLog::load(&*backend).expect("load");
            log.touch(&*backend, 3 * ACTIVITY_REGION, 2 * ACTIVITY_REGION)
                .expect("touch");
            log.touch(&*backend, 3 * ACTIVITY_REGION, 512)
                .expect("again");
        }
        let (backend, _, _) = open_or_create(&store, "v", meta()).expect("reopen");
        let log = ActivityLog::load(&*backend).expect("load");
        let (page, _) = log.page(0);
        assert_eq!(page.iter().map(|(r, _)| *r).collect::<Vec<_>>(), [3, 4]);
        assert_eq!(log.trim(&*backend, &page[..1]).expect("trim"), 1);
        drop(log);
        drop(backend);
        let (backend, _, _) = open_or_create(&store, "v", meta()).expect("reopen");
        let log = ActivityLog::load(&*backend).expect("load");
        assert_eq!(
            log.page(0).0.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
            [4]
        );
        // A torn append (a crash half way through an entry) is ignored:
        // the request it logged was never applied.
        let path = dir.path().join("v.activity");
        let mut bytes = std::fs::read(&path).expect("log file");
        bytes.extend_from_slice(&[7, 0, 0]);
        std::fs::write(&path, bytes).expect("write");
        let log = ActivityLog::load(&*backend).expect("load torn");
        assert_eq!(log.len(), 1);
    }
}

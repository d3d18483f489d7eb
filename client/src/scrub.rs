//! Scrub (docs/resync.md): the in-sync members of every column compared
//! chunk by chunk by digests the nodes compute (`Digest`), never by
//! shipping the data; with `repair`, a chunk that differs is copied from
//! the column's lowest in-sync row (the reconcile source) to the members
//! that differ.
//!
//! It runs beside the serving device: each chunk is a region of the
//! membership's region gate, held while it is compared (and repaired), so
//! a write in flight never shows as a difference and a repair never
//! overwrites a newer write.

use std::time::Duration;

use crate::layout::Layout;
use crate::membership::Membership;
use crate::records::RecordStore;
use crate::regions::{RESYNC_REGION, wait_until};

/// What a scrub found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Chunks compared (every member answered).
    pub chunks: u64,
    /// Chunks that differ: (column, node offset, length, the members whose
    /// digest differs from the source's).
    pub mismatches: Vec<(usize, u64, u64, Vec<usize>)>,
    /// Chunks rewritten from the source.
    pub repaired: u64,
    /// Chunks not compared: a member did not answer (node, why).
    pub skipped: Vec<(usize, u64, String)>,
}

impl ScrubReport {
    /// As `netblk scrub` prints it with `--json`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "chunks": self.chunks,
            "mismatches": self.mismatches.iter().map(|(column, offset, len, members)| {
                serde_json::json!({
                    "column": column,
                    "offset": offset,
                    "length": len,
                    "members": members,
                })
            }).collect::<Vec<_>>(),
            "repaired": self.repaired,
            "skipped": self.skipped.iter().map(|(node, offset, why)| {
                serde_json::json!({ "node": node, "offset": offset, "why": why })
            }).collect::<Vec<_>>(),
        })
    }
}

/// Releases what a scrub holds, however it ends.
struct Held<'a> {
    m: &'a Membership,
    region: Option<(usize, u64)>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some((column, region)) = self.region.take() {
            self.m.gate.unlock(column, region);
        }
        self.m.gate.deactivate();
    }
}

/// Compares (and, with `repair`, repairs) every column of the device whose
/// membership is `m`; `wait` bounds each wait for writes in flight.
pub fn scrub(
    store: &dyn RecordStore,
    layout: &Layout,
    m: &Membership,
    repair: bool,
    wait: Duration,
) -> Result<ScrubReport, String> {
    m.gate.activate();
    let mut held = Held { m, region: None };
    // Writes admitted before the gate was active were not counted.
    let mut epoch = None;
    if !wait_until(wait, || {
        epoch = m.writes.flip();
        epoch.is_some()
    }) {
        return Err("writes of several epochs ago did not finish".into());
    }
    let epoch = epoch.unwrap_or_default();
    if !wait_until(wait, || m.writes.drained(epoch)) {
        return Err("writes in flight did not finish: scrub not started".into());
    }
    let r = *layout.replication();
    let mut report = ScrubReport::default();
    tracing::info!(repair, "scrub started");
    for column in 0..r.columns() as usize {
        let capacity = r
            .members(column)
            .next()
            .map_or(0, |n| layout.node_capacity(n));
        let mut offset = 0;
        while offset < capacity {
            let len = RESYNC_REGION.min(capacity - offset);
            let region = offset / RESYNC_REGION;
            m.gate.lock(column, region);
            held.region = Some((column, region));
            if !wait_until(wait, || m.gate.drained(column, region)) {
                return Err(format!(
                    "writes to column {column} at {offset} did not finish: scrub stopped"
                ));
            }
            let view = m.view();
            if view.fenced {
                return Err("the device was fenced: scrub stopped".into());
            }
            if m.stopping() {
                return Err("the device is stopping: scrub stopped".into());
            }
            let members: Vec<usize> = r
                .members(column)
                .filter(|n| view.in_sync(column, r.row_of(*n)) && !m.is_failed(*n))
                .collect();
            let digests: Result<Vec<u32>, (usize, String)> = members
                .iter()
                .map(|n| store.digest(*n, offset, len).map_err(|why| (*n, why)))
                .collect();
            match digests {
                Err((node, why)) => report.skipped.push((node, offset, why)),
                Ok(digests) => {
                    report.chunks += 1;
                    let differ: Vec<usize> = members
                        .iter()
                        .zip(&digests)
                        .skip(1)
                        .filter(|(_, d)| **d != digests[0])
                        .map(|(n, _)| *n)
                        .collect();
                    if !differ.is_empty() {
                        tracing::warn!(column, offset, len, members = ?differ, "scrub: replicas differ");
                        if repair {
                            store.copy(view.owner_epoch, members[0], &differ, &[(offset, len)])?;
                            report.repaired += 1;
                        }
                        report.mismatches.push((column, offset, len, differ));
                        m.scrub_mismatches
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            held.region = None;
            m.gate.unlock(column, region);
            offset += len;
        }
    }
    tracing::info!(
        chunks = report.chunks,
        mismatches = report.mismatches.len(),
        repaired = report.repaired,
        skipped = report.skipped.len(),
        "scrub ended"
    );
    Ok(report)
}

//! Reconcile at attach (docs/replication.md, "Activity log and
//! reconcile"): after an owner stopped uncleanly, the replicas of a column
//! may differ where writes were in flight, and only in regions of the
//! members' activity logs. Before the device serves, every region in any
//! in-sync member's log is copied from the column's reconcile source (its
//! lowest in-sync row) to the other in-sync members; then the logs are
//! trimmed. Reads are therefore never spread over replicas that differ.

use std::time::Instant;

use netblk_protocol::pb::MembershipRecord;

use crate::layout::Layout;
use crate::membership::View;
use crate::records::RecordStore;

/// What an attach reconciled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Regions copied (counted once a column, however many targets).
    pub regions: u64,
    /// Bytes written to members (every target counted).
    pub bytes: u64,
    pub millis: u64,
}

/// Reconciles the in-sync members of `record` (this owner's, stored) if
/// the owner before did not stop `clean`, then trims their logs. None when
/// nothing needed copying because the stop was clean.
pub fn reconcile(
    store: &dyn RecordStore,
    layout: &Layout,
    record: &MembershipRecord,
    clean: bool,
) -> Result<Option<Reconciled>, String> {
    let started = Instant::now();
    let view = View::of_record(record);
    let r = *layout.replication();
    let in_sync = |column: usize| -> Vec<usize> {
        r.members(column)
            .filter(|n| view.in_sync(column, r.row_of(*n)))
            .collect()
    };
    let read = |node: usize| {
        store.activity(node).map_err(|why| {
            format!(
                "cannot read the activity log of {}: {why}",
                store.name(node)
            )
        })
    };
    let mut done = Reconciled::default();
    if !clean {
        for column in 0..r.columns() as usize {
            let members = in_sync(column);
            let Some((&source, targets)) = members.split_first() else {
                continue;
            };
            let mut regions: Vec<u64> = Vec::new();
            for node in &members {
                regions.extend(read(*node)?.into_iter().map(|(region, _)| region));
            }
            regions.sort_unstable();
            regions.dedup();
            if targets.is_empty() || regions.is_empty() {
                continue;
            }
            let capacity = layout.node_capacity(source);
            let size = store.activity_region();
            let ranges: Vec<(u64, u64)> = regions
                .iter()
                .map(|region| region.saturating_mul(size))
                .filter(|start| *start < capacity)
                .map(|start| (start, size.min(capacity - start)))
                .collect();
            tracing::info!(
                column,
                source = %store.name(source),
                regions = ranges.len(),
                "reconciling the replicas where writes may have been in flight at the unclean stop"
            );
            store
                .copy(view.owner_epoch, source, targets, &ranges)
                .map_err(|why| format!("cannot reconcile column {column}: {why}"))?;
            done.regions += ranges.len() as u64;
            done.bytes += ranges.iter().map(|(_, len)| len).sum::<u64>() * targets.len() as u64;
        }
    }
    // Nothing writes now (the device does not serve yet, older owners are
    // fenced): every entry may go.
    for column in 0..r.columns() as usize {
        for node in in_sync(column) {
            store
                .trim(node, view.owner_epoch, &read(node)?)
                .map_err(|why| {
                    format!(
                        "cannot trim the activity log of {}: {why}",
                        store.name(node)
                    )
                })?;
        }
    }
    if clean {
        return Ok(None);
    }
    done.millis = started.elapsed().as_millis() as u64;
    tracing::info!(
        regions = done.regions,
        bytes = done.bytes,
        millis = done.millis,
        "reconciled the replicas"
    );
    Ok(Some(done))
}

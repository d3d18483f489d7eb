//! The membership rules of a replicated volume, as pure functions over its
//! record (docs/replication.md): which record an attach may serve from, and
//! how a failed member leaves a column's in-sync set. No IO: the daemon
//! reads and writes the records on the nodes (`GetRecord`/`PutRecord`).

use netblk_protocol::pb::MembershipRecord;

use crate::layout::Replication;

/// What an attach may do with the records the nodes answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attach {
    /// No node has a record: a new volume; every member starts in sync.
    Fresh(MembershipRecord),
    /// Serve from this record (the newest generation, and every member of
    /// its in-sync sets answered: it is the current one).
    Current(MembershipRecord),
}

/// Why an attach may not serve yet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    #[error(
        "the newest membership record (generation {generation}) names nodes {missing:?} in sync, and they did not answer: waiting for them (a newer record may be on them)"
    )]
    Missing {
        generation: u64,
        missing: Vec<usize>,
    },
    #[error("node {node}'s record has {got} columns, the volume {want}")]
    Columns { node: usize, got: usize, want: u32 },
}

/// The in-sync rows of `column` in `record`, as a bitmask.
fn iss(record: &MembershipRecord, column: usize) -> u32 {
    record.iss.get(column).copied().unwrap_or(0)
}

/// The attach rule: among the records of the nodes that answered
/// (`answers[node]`, None for a node that did not), take the highest
/// generation `G`; serve from it only if every member of `ISS(G)` answered.
pub fn attach(
    answers: &[Option<MembershipRecord>],
    replication: &Replication,
) -> Result<Attach, AttachError> {
    let columns = replication.columns();
    for (node, record) in answers.iter().enumerate() {
        if let Some(r) = record
            && r.generation > 0
            && r.iss.len() != columns as usize
        {
            return Err(AttachError::Columns {
                node,
                got: r.iss.len(),
                want: columns,
            });
        }
    }
    let newest = answers
        .iter()
        .flatten()
        .max_by_key(|r| r.generation)
        .filter(|r| r.generation > 0);
    let Some(newest) = newest else {
        // Fresh only when every node said it has none: one that did not
        // answer may hold the volume's record.
        let silent: Vec<usize> = (0..answers.len())
            .filter(|node| answers[*node].is_none())
            .collect();
        if !silent.is_empty() {
            return Err(AttachError::Missing {
                generation: 0,
                missing: silent,
            });
        }
        let all = (1u32 << replication.replicas()) - 1;
        return Ok(Attach::Fresh(MembershipRecord {
            generation: 1,
            owner_epoch: 0,
            owner: String::new(),
            clean: true,
            iss: vec![all; columns as usize],
            ..MembershipRecord::default()
        }));
    };
    let missing: Vec<usize> = (0..columns as usize)
        .flat_map(|column| {
            replication
                .members(column)
                .enumerate()
                .filter(move |(row, _)| iss(newest, column) & (1 << row) != 0)
                .map(|(_, node)| node)
        })
        .filter(|node| answers.get(*node).is_none_or(Option::is_none))
        .collect();
    if !missing.is_empty() {
        return Err(AttachError::Missing {
            generation: newest.generation,
            missing,
        });
    }
    Ok(Attach::Current(newest.clone()))
}

/// The record after member `node` failed: generation + 1, `node` out of its
/// column's in-sync set, or out of its joining set (a joiner can always
/// leave: nothing reads it). None when it is the column's last member in
/// sync (the ISS never becomes empty: that column's IO fails instead) or
/// neither in sync nor joining.
pub fn shrink(
    record: &MembershipRecord,
    replication: &Replication,
    node: usize,
) -> Option<MembershipRecord> {
    let (column, row) = (replication.column_of(node), replication.row_of(node));
    let bit = 1u32 << row;
    let mut next = record.clone();
    next.generation += 1;
    if mask(&record.joining, column) & bit != 0 {
        not_joining(&mut next, replication, column, bit);
        return Some(next);
    }
    let now = iss(record, column);
    if now & bit == 0 || now & !bit == 0 {
        return None;
    }
    next.iss[column] = now & !bit;
    Some(next)
}

/// The record with `node`, out of its column's in-sync set, joining it
/// (docs/resync.md): generation + 1, it takes writes from the publish on;
/// `rebuild` says it is copied in full. None if it is in sync or joining.
pub fn join(
    record: &MembershipRecord,
    replication: &Replication,
    node: usize,
    rebuild: bool,
) -> Option<MembershipRecord> {
    let (column, row) = (replication.column_of(node), replication.row_of(node));
    let bit = 1u32 << row;
    if (iss(record, column) | mask(&record.joining, column)) & bit != 0 {
        return None;
    }
    let columns = replication.columns() as usize;
    let mut next = record.clone();
    next.generation += 1;
    next.clean = false;
    set_mask(&mut next.joining, columns, column, |m| m | bit);
    if rebuild {
        set_mask(&mut next.rebuild, columns, column, |m| m | bit);
    }
    Some(next)
}

/// The record with joining `node` in sync (its copy is done and durable):
/// generation + 1. None if it is not joining.
pub fn promote(
    record: &MembershipRecord,
    replication: &Replication,
    node: usize,
) -> Option<MembershipRecord> {
    let (column, row) = (replication.column_of(node), replication.row_of(node));
    let bit = 1u32 << row;
    if mask(&record.joining, column) & bit == 0 {
        return None;
    }
    let mut next = record.clone();
    next.generation += 1;
    next.clean = false;
    not_joining(&mut next, replication, column, bit);
    next.iss[column] |= bit;
    Some(next)
}

/// Row `bit` of `column` out of `next`'s joining (and rebuild) sets.
fn not_joining(next: &mut MembershipRecord, replication: &Replication, column: usize, bit: u32) {
    let columns = replication.columns() as usize;
    set_mask(&mut next.joining, columns, column, |m| m & !bit);
    set_mask(&mut next.rebuild, columns, column, |m| m & !bit);
}

/// `column`'s bitmask in a per-column list that may be empty.
fn mask(masks: &[u32], column: usize) -> u32 {
    masks.get(column).copied().unwrap_or(0)
}

/// Changes `column`'s bitmask in a per-column list of `columns`; the list
/// is empty again when no column has a bit.
fn set_mask(masks: &mut Vec<u32>, columns: usize, column: usize, f: impl FnOnce(u32) -> u32) {
    if masks.len() < columns {
        masks.resize(columns, 0);
    }
    masks[column] = f(masks[column]);
    if masks.iter().all(|m| *m == 0) {
        masks.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry() -> Replication {
        // 2 columns x 2 replicas: column 0 on nodes 0 and 2, column 1 on 1, 3.
        Replication::new(4, 2).expect("geometry")
    }

    fn none() -> Option<MembershipRecord> {
        Some(MembershipRecord::default())
    }

    fn fresh(g: &Replication) -> MembershipRecord {
        let Ok(Attach::Fresh(r)) = attach(&[none(), none(), none(), none()], g) else {
            panic!("fresh")
        };
        r
    }

    #[test]
    fn a_volume_without_records_starts_with_every_member_in_sync() {
        let r = fresh(&geometry());
        assert_eq!((r.generation, r.iss.clone()), (1, vec![0b11, 0b11]));
        // ...but only when every node said so: a silent one may hold it.
        assert_eq!(
            attach(&[none(), None, none(), none()], &geometry()),
            Err(AttachError::Missing {
                generation: 0,
                missing: vec![1],
            })
        );
    }

    #[test]
    fn a_shrink_never_empties_a_column() {
        let g = geometry();
        let r1 = fresh(&g);
        let r2 = shrink(&r1, &g, 2).expect("node 2 leaves column 0");
        assert_eq!((r2.generation, r2.iss.clone()), (2, vec![0b01, 0b11]));
        assert_eq!(shrink(&r2, &g, 2), None, "not in sync any more");
        assert_eq!(shrink(&r2, &g, 0), None, "column 0's last member stays");
        let r3 = shrink(&r2, &g, 1).expect("node 1 leaves column 1");
        assert_eq!(r3.iss, vec![0b01, 0b10]);
    }

    /// The proof's case: a shrink stored only on the column's remaining
    /// member; an attach that does not reach that member sees an older
    /// record, and must wait rather than serve from it.
    #[test]
    fn an_attach_that_misses_the_newest_record_waits() {
        let g = geometry();
        let r1 = fresh(&g);
        let r2 = shrink(&r1, &g, 2).expect("node 2 out");
        // r2 reached node 0 (column 0's remaining member) only; the rest
        // still hold r1.
        let held = [
            Some(r2.clone()),
            Some(r1.clone()),
            Some(r1.clone()),
            Some(r1.clone()),
        ];
        // Node 0 unreachable: the newest seen is r1, whose ISS has node 0.
        let mut without_0 = held.clone();
        without_0[0] = None;
        assert_eq!(
            attach(&without_0, &g),
            Err(AttachError::Missing {
                generation: 1,
                missing: vec![0],
            })
        );
        // Everyone answers: r2, and node 2 (out of sync) need not answer.
        assert_eq!(attach(&held, &g), Ok(Attach::Current(r2.clone())));
        let mut without_2 = held.clone();
        without_2[2] = None;
        assert_eq!(attach(&without_2, &g), Ok(Attach::Current(r2)));
    }

    #[test]
    fn a_record_of_another_geometry_is_an_error() {
        let g = geometry();
        let odd = MembershipRecord {
            generation: 3,
            iss: vec![0b11],
            ..MembershipRecord::default()
        };
        assert!(matches!(
            attach(&[Some(odd), None, None, None], &g),
            Err(AttachError::Columns {
                node: 0,
                got: 1,
                want: 2
            })
        ));
    }

    #[test]
    fn a_member_joins_writes_only_and_is_in_sync_after_its_copy() {
        let g = geometry();
        let r = fresh(&g);
        // Node 3 (column 1, row 1) failed and left.
        let out = shrink(&r, &g, 3).expect("leaves");
        assert_eq!(out.iss, vec![0b11, 0b01]);
        assert_eq!(join(&r, &g, 3, false), None, "in sync: cannot join");
        let joining = join(&out, &g, 3, false).expect("joins");
        assert_eq!(joining.generation, out.generation + 1);
        assert_eq!(
            (joining.iss.clone(), joining.joining.clone()),
            (vec![0b11, 0b01], vec![0, 0b10])
        );
        assert!(joining.rebuild.is_empty());
        assert_eq!(join(&joining, &g, 3, true), None, "joining already");
        // A joiner that fails leaves the joining set, whatever the ISS.
        let failed = shrink(&joining, &g, 3).expect("a joiner leaves");
        assert_eq!(
            (failed.iss.clone(), failed.joining.clone()),
            (vec![0b11, 0b01], vec![])
        );
        // Its copy done, it is in sync.
        let back = promote(&joining, &g, 3).expect("promoted");
        assert_eq!(
            (back.iss.clone(), back.joining.clone()),
            (vec![0b11, 0b11], vec![])
        );
        assert_eq!(promote(&back, &g, 3), None, "not joining");
        // A rebuild is marked, and cleared with the join.
        let rebuilding = join(&out, &g, 3, true).expect("rebuilds");
        assert_eq!(rebuilding.rebuild, vec![0, 0b10]);
        assert!(
            promote(&rebuilding, &g, 3)
                .expect("done")
                .rebuild
                .is_empty()
        );
    }
}

//! Volume geometry both sides must agree on: what a volume may be named,
//! the bounds of a layout and how many bytes of a striped volume one node
//! holds.

use crate::pb;

/// Smallest stripe unit, bytes.
pub const MIN_STRIPE_UNIT: u32 = 4 << 10;
/// Largest stripe unit, bytes.
pub const MAX_STRIPE_UNIT: u32 = 4 << 20;
/// Most nodes a volume may be striped over.
pub const MAX_NODES: u32 = 1024;
/// Most copies of a column (`--replicas`).
pub const MAX_REPLICAS: u32 = 5;
/// Volume sizes are whole 512-byte sectors.
pub const SECTOR: u64 = 512;
/// Largest volume, bytes (8 EiB would overflow offset arithmetic downstream).
pub const MAX_VOLUME_SIZE: u64 = 1 << 60;

/// A volume name: 1 to 128 characters of `A-Z a-z 0-9 . _ -`, not starting
/// with `.` (it names files in a node's store).
pub fn check_volume_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "volume name '{name}' must be 1 to 128 characters of A-Z a-z 0-9 . _ - and not start with '.'"
        ))
    }
}

/// Checks that a volume size and layout make sense, saying what is wrong.
pub fn check_layout(volume_size: u64, layout: &pb::Layout) -> Result<(), String> {
    if volume_size == 0 || !volume_size.is_multiple_of(SECTOR) || volume_size > MAX_VOLUME_SIZE {
        return Err(format!(
            "volume size {volume_size} must be a non-zero multiple of {SECTOR} bytes, at most {MAX_VOLUME_SIZE}"
        ));
    }
    let su = layout.stripe_unit;
    if !su.is_power_of_two() || !(MIN_STRIPE_UNIT..=MAX_STRIPE_UNIT).contains(&su) {
        return Err(format!(
            "stripe unit {su} must be a power of two from {MIN_STRIPE_UNIT} to {MAX_STRIPE_UNIT} bytes"
        ));
    }
    if layout.node_count == 0 || layout.node_count > MAX_NODES {
        return Err(format!(
            "node count {} must be from 1 to {MAX_NODES}",
            layout.node_count
        ));
    }
    if layout.node_index >= layout.node_count {
        return Err(format!(
            "node index {} must be below the node count {}",
            layout.node_index, layout.node_count
        ));
    }
    if !(1..=MAX_REPLICAS).contains(&layout.replicas) {
        return Err(format!(
            "replicas {} must be from 1 to {MAX_REPLICAS} (0: a client from before replication)",
            layout.replicas
        ));
    }
    if layout.replica_index >= layout.replicas {
        return Err(format!(
            "replica index {} must be below the replica count {}",
            layout.replica_index, layout.replicas
        ));
    }
    Ok(())
}

/// Bytes of a `volume_size`-byte volume that node `layout.node_index` holds
/// when the volume is striped RAID-0 style: stripe unit `k` of the volume
/// lives on node `k % node_count` at node offset `(k / node_count) * stripe_unit`.
///
/// The layout must have passed [`check_layout`].
pub fn node_capacity(volume_size: u64, layout: &pb::Layout) -> u64 {
    let unit = u64::from(layout.stripe_unit);
    let row = unit * u64::from(layout.node_count.max(1));
    let full_rows = volume_size / row;
    let tail = volume_size % row;
    let in_tail = tail
        .saturating_sub(u64::from(layout.node_index) * unit)
        .min(unit);
    full_rows * unit + in_tail
}

/// Bytes of node offsets one activity-log region covers (replicated
/// volumes: `GetActivity`, `TrimActivity`).
pub const ACTIVITY_REGION: u64 = 4 << 20;

/// Regions at most in one `GetActivity` reply or `TrimActivity` request
/// (their headers stay well below the 4 KiB header limit).
pub const ACTIVITY_PAGE: usize = 128;

/// Bytes of node offsets one region of a missed bitmap covers (resync:
/// `GetMissed`, and the unit a catch-up copies).
pub const MISSED_REGION: u64 = 1 << 20;

/// Bytes at most one `Digest` request covers.
pub const MAX_DIGEST_LEN: u64 = 64 << 20;

/// The activity-log regions a request at node offset `offset` of `len`
/// bytes touches (none for `len` 0).
pub fn activity_regions(offset: u64, len: u64) -> std::ops::Range<u64> {
    if len == 0 {
        return 0..0;
    }
    let last = offset.saturating_add(len - 1);
    offset / ACTIVITY_REGION..last / ACTIVITY_REGION + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(stripe_unit: u32, node_count: u32, node_index: u32) -> pb::Layout {
        pb::Layout {
            stripe_unit,
            node_count,
            node_index,
            replicas: 1,
            replica_index: 0,
        }
    }

    #[test]
    fn capacities_add_up_to_the_volume() {
        for size in [
            512u64,
            4096,
            65536,
            1 << 20,
            (1 << 30) + 512,
            3 * 65536 + 4096,
        ] {
            for nodes in [1u32, 2, 3, 8] {
                let total: u64 = (0..nodes)
                    .map(|i| node_capacity(size, &layout(65536, nodes, i)))
                    .sum();
                assert_eq!(total, size, "size {size} nodes {nodes}");
            }
        }
        // Node 0 takes the partial last stripe unit; node 2 holds nothing of the tail.
        assert_eq!(node_capacity(65536 + 4096, &layout(65536, 3, 0)), 65536);
        assert_eq!(node_capacity(65536 + 4096, &layout(65536, 3, 1)), 4096);
        assert_eq!(node_capacity(65536 + 4096, &layout(65536, 3, 2)), 0);
    }

    #[test]
    fn bad_layouts_are_named() {
        assert!(check_layout(1 << 20, &layout(65536, 3, 2)).is_ok());
        assert!(check_layout(0, &layout(65536, 3, 2)).is_err());
        assert!(check_layout(1000, &layout(65536, 3, 2)).is_err());
        assert!(check_layout(1 << 20, &layout(65535, 3, 2)).is_err());
        assert!(check_layout(1 << 20, &layout(2048, 3, 2)).is_err());
        assert!(check_layout(1 << 20, &layout(8 << 20, 3, 2)).is_err());
        assert!(check_layout(1 << 20, &layout(65536, 0, 0)).is_err());
        assert!(check_layout(1 << 20, &layout(65536, 3, 3)).is_err());
        let replicated = |replicas, replica_index| pb::Layout {
            replicas,
            replica_index,
            ..layout(65536, 3, 2)
        };
        assert!(check_layout(1 << 20, &replicated(3, 2)).is_ok());
        for (r, i, why) in [
            (0, 0, "before replication"),
            (6, 0, "from 1 to 5"),
            (2, 2, "below the replica count"),
        ] {
            let err = check_layout(1 << 20, &replicated(r, i)).expect_err(why);
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn activity_regions_cover_the_request() {
        let r = ACTIVITY_REGION;
        assert_eq!(activity_regions(0, 0), 0..0);
        assert_eq!(activity_regions(0, 4096), 0..1);
        assert_eq!(activity_regions(r - 512, 1024), 0..2);
        assert_eq!(activity_regions(3 * r, r), 3..4);
        assert_eq!(
            activity_regions(u64::MAX - 10, 10),
            u64::MAX / r..u64::MAX / r + 1
        );
    }
}

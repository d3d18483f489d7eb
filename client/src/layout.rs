//! Volume geometry: which nodes hold which byte of a striped, replicated
//! volume.
//!
//! Striping (RAID-0 over `C` columns): stripe unit `k` of the volume (bytes
//! `[k*su, (k+1)*su)`) lives in column `k % C` at offset `(k / C) * su`, so
//! the stripe units of one column are contiguous on its nodes, in volume
//! order. Replication: every column lives on `R` nodes at the same offsets;
//! node `i` of the list holds column `i % C` (see [`Replication`]).

use std::net::SocketAddr;

use netblk_protocol::geometry::{self, MAX_STRIPE_UNIT, MIN_STRIPE_UNIT};
use netblk_protocol::pb;

/// Default stripe unit: 128 KiB.
pub const DEFAULT_STRIPE_UNIT: u32 = 128 << 10;

/// A volume as the user names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// Bytes, a power of two from 4 KiB to 4 MiB.
    pub stripe_unit: u32,
    /// The nodes: `replicas` rows of the stripe columns (see
    /// [`Replication`]). The order is part of the volume's identity.
    pub nodes: Vec<SocketAddr>,
    /// Copies of every column, 1 to [`MAX_REPLICAS`].
    pub replicas: u32,
}

/// What is wrong with a [`VolumeSpec`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("a volume needs at least one node")]
    NoNodes,
    #[error("node {0} is listed twice (two replicas of a column, or two columns, on one node)")]
    DuplicateNode(SocketAddr),
    /// Why the name is not a volume name.
    #[error("{0}")]
    BadName(String),
    #[error("{0}")]
    Geometry(String),
}

impl VolumeSpec {
    /// Checks the spec and returns its layout.
    pub fn layout(&self) -> Result<Layout, SpecError> {
        netblk_protocol::geometry::check_volume_name(&self.name).map_err(SpecError::BadName)?;
        if self.nodes.is_empty() {
            return Err(SpecError::NoNodes);
        }
        for (i, node) in self.nodes.iter().enumerate() {
            if self.nodes[..i].contains(node) {
                return Err(SpecError::DuplicateNode(*node));
            }
        }
        Layout::replicated(self.size, self.stripe_unit, self.nodes.len(), self.replicas)
    }

    /// The number of stripe columns.
    pub fn columns(&self) -> usize {
        self.nodes.len() / self.replicas.max(1) as usize
    }
}

/// The geometry of a striped, replicated volume: the striping over its
/// columns (RAID-0) and the copies of every column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    size: u64,
    stripe_unit: u32,
    replication: Replication,
}

/// A mapped volume's size as it may change (online resize): one handle
/// shared by every queue's engine (requests are checked against it) and
/// reconnects (handshakes present it).
#[derive(Debug, Clone)]
pub struct LiveSize(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl LiveSize {
    pub fn new(size: u64) -> LiveSize {
        LiveSize(std::sync::Arc::new(std::sync::atomic::AtomicU64::new(size)))
    }

    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn set(&self, size: u64) {
        self.0.store(size, std::sync::atomic::Ordering::Release);
    }
}

/// A part of a byte range that lives in one column, within one stripe unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// The stripe column (the node itself with one replica).
    pub column: usize,
    /// Byte offset on the column's nodes.
    pub node_offset: u64,
    /// Byte offset into the request (its buffer, for data).
    pub buf_offset: u64,
    pub len: u64,
}

impl Layout {
    /// An unreplicated layout over `node_count` nodes, for tests and tools
    /// that already checked their numbers.
    pub fn new(size: u64, stripe_unit: u32, node_count: u32) -> Result<Layout, SpecError> {
        Layout::replicated(size, stripe_unit, node_count as usize, 1)
    }

    /// A layout over `nodes` nodes holding `replicas` copies of every
    /// column (see [`Replication`]).
    pub fn replicated(
        size: u64,
        stripe_unit: u32,
        nodes: usize,
        replicas: u32,
    ) -> Result<Layout, SpecError> {
        let layout = Layout {
            size,
            stripe_unit,
            replication: Replication::new(nodes, replicas)?,
        };
        geometry::check_layout(size, &layout.fingerprint(0)).map_err(SpecError::Geometry)?;
        debug_assert!((MIN_STRIPE_UNIT..=MAX_STRIPE_UNIT).contains(&stripe_unit));
        Ok(layout)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The same striping over `size` bytes (a resize: the stripe unit and
    /// the nodes stay, so every byte stays where it was).
    pub fn with_size(&self, size: u64) -> Result<Layout, SpecError> {
        Layout::replicated(
            size,
            self.stripe_unit,
            self.node_count(),
            self.replication.replicas,
        )
    }

    pub fn stripe_unit(&self) -> u32 {
        self.stripe_unit
    }

    /// Every node of the volume: columns × replicas.
    pub fn node_count(&self) -> usize {
        (self.replication.columns * self.replication.replicas) as usize
    }

    /// The stripe columns.
    pub fn columns(&self) -> usize {
        self.replication.columns as usize
    }

    pub fn replicas(&self) -> u32 {
        self.replication.replicas
    }

    pub fn replication(&self) -> &Replication {
        &self.replication
    }

    /// The layout fingerprint sent to node `node` in its handshake.
    pub fn fingerprint(&self, node: usize) -> pb::Layout {
        pb::Layout {
            stripe_unit: self.stripe_unit,
            node_count: self.replication.columns,
            node_index: self.replication.column_of(node) as u32,
            replicas: self.replication.replicas,
            replica_index: self.replication.row_of(node) as u32,
        }
    }

    /// Bytes node `node` holds (its column's bytes).
    pub fn node_capacity(&self, node: usize) -> u64 {
        geometry::node_capacity(self.size, &self.fingerprint(node))
    }

    /// Where volume byte `offset` lives: (column, offset on its nodes).
    pub fn locate(&self, offset: u64) -> (usize, u64) {
        let su = u64::from(self.stripe_unit);
        let n = u64::from(self.replication.columns);
        let unit = offset / su;
        ((unit % n) as usize, (unit / n) * su + offset % su)
    }

    /// The pieces of `[offset, offset + len)`, in order, each within one
    /// stripe unit. The caller keeps the range inside the volume.
    pub fn pieces(&self, offset: u64, len: u64) -> Pieces {
        Pieces {
            layout: *self,
            offset,
            done: 0,
            len,
        }
    }

    /// The range `[offset, offset + len)` as one contiguous extent per
    /// column that holds part of it: `(column, offset, length)`, in column
    /// order. Used for operations without data (discard, write-zeroes),
    /// where the request buffer does not matter.
    pub fn column_extents(&self, offset: u64, len: u64) -> Vec<(usize, u64, u64)> {
        let n = self.columns();
        let mut extents: Vec<Option<(u64, u64)>> = vec![None; n];
        // Only the first and last row can be partial: the first n pieces and
        // the last n pieces give every node's start and end.
        let su = u64::from(self.stripe_unit);
        let first_units = self.pieces(offset, len.min(n as u64 * su + su));
        for piece in first_units {
            let e = &mut extents[piece.column];
            if e.is_none() {
                *e = Some((piece.node_offset, piece.node_offset + piece.len));
            }
        }
        let tail_len = len.min(n as u64 * su + su);
        for piece in self.pieces(offset + len - tail_len, tail_len) {
            if let Some((_, end)) = &mut extents[piece.column] {
                *end = (*end).max(piece.node_offset + piece.len);
            }
        }
        extents
            .into_iter()
            .enumerate()
            .filter_map(|(node, e)| e.map(|(start, end)| (node, start, end - start)))
            .collect()
    }
}

/// Iterator over the pieces of a range; see [`Layout::pieces`].
pub struct Pieces {
    layout: Layout,
    offset: u64,
    done: u64,
    len: u64,
}

impl Iterator for Pieces {
    type Item = Piece;

    fn next(&mut self) -> Option<Piece> {
        if self.done >= self.len {
            return None;
        }
        let pos = self.offset + self.done;
        let su = u64::from(self.layout.stripe_unit);
        let len = (su - pos % su).min(self.len - self.done);
        let (column, node_offset) = self.layout.locate(pos);
        let piece = Piece {
            column,
            node_offset,
            buf_offset: self.done,
            len,
        };
        self.done += len;
        Some(piece)
    }
}

pub use geometry::MAX_REPLICAS;

/// How a node list of `C × R` addresses forms `C` stripe columns of `R`
/// replicas each (see docs/replication.md): address `i` is column `i % C`,
/// replica row `i / C`, so the first `C` addresses are the unreplicated
/// layout and each further row of `C` adds one copy of every column.
/// (The striping itself, [`Layout`], is over the `C` columns.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replication {
    columns: u32,
    replicas: u32,
}

impl Replication {
    /// `nodes` addresses holding `replicas` copies of every column.
    pub fn new(nodes: usize, replicas: u32) -> Result<Replication, SpecError> {
        if !(1..=MAX_REPLICAS).contains(&replicas) {
            return Err(SpecError::Geometry(format!(
                "replicas must be from 1 to {MAX_REPLICAS}, not {replicas}"
            )));
        }
        let nodes =
            u32::try_from(nodes).map_err(|_| SpecError::Geometry("too many nodes".into()))?;
        if nodes == 0 {
            return Err(SpecError::NoNodes);
        }
        if nodes % replicas != 0 {
            return Err(SpecError::Geometry(format!(
                "{nodes} nodes cannot hold {replicas} replicas of every column: list a multiple of {replicas} (columns × replicas)"
            )));
        }
        Ok(Replication {
            columns: nodes / replicas,
            replicas,
        })
    }

    pub fn columns(&self) -> u32 {
        self.columns
    }

    pub fn replicas(&self) -> u32 {
        self.replicas
    }

    /// The column node `node` holds a copy of.
    pub fn column_of(&self, node: usize) -> usize {
        node % self.columns as usize
    }

    /// Which copy of its column node `node` holds (its row in the list).
    pub fn row_of(&self, node: usize) -> usize {
        node / self.columns as usize
    }

    /// The nodes holding `column`, by row.
    pub fn members(&self, column: usize) -> impl Iterator<Item = usize> + use<> {
        let columns = self.columns as usize;
        (0..self.replicas as usize).map(move |row| row * columns + column)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_node_list_forms_columns_of_replicas_row_by_row() {
        let r = Replication::new(6, 2).expect("3 columns x 2");
        assert_eq!((r.columns(), r.replicas()), (3, 2));
        // The first row is the unreplicated layout; the second its copies.
        assert_eq!(r.members(0).collect::<Vec<_>>(), vec![0, 3]);
        assert_eq!(r.members(2).collect::<Vec<_>>(), vec![2, 5]);
        for node in 0..6 {
            assert!(r.members(r.column_of(node)).any(|n| n == node));
            assert_eq!(r.members(r.column_of(node)).nth(r.row_of(node)), Some(node));
        }
        let one = Replication::new(4, 1).expect("R = 1");
        assert_eq!(one.columns(), 4);
        assert_eq!(one.members(3).collect::<Vec<_>>(), vec![3]);
        for (nodes, replicas, why) in [
            (5, 2, "multiple of 2"),
            (6, 0, "from 1 to 5"),
            (12, 6, "from 1 to 5"),
        ] {
            let err = Replication::new(nodes, replicas)
                .expect_err(why)
                .to_string();
            assert!(err.contains(why), "{err}");
        }
        assert_eq!(Replication::new(0, 1), Err(SpecError::NoNodes));
    }

    fn any_layout() -> impl Strategy<Value = Layout> {
        (12u32..=22, 1u32..=9, 1u32..=3, 1u64..=4096).prop_map(
            |(shift, columns, replicas, sectors)| {
                let su = 1u32 << shift;
                // Sizes from a few sectors to many rows.
                let size = sectors * 512 * u64::from(columns) * 37;
                let nodes = (columns * replicas) as usize;
                Layout::replicated(size, su, nodes, replicas).expect("valid layout")
            },
        )
    }

    fn layout_and_range() -> impl Strategy<Value = (Layout, u64, u64)> {
        any_layout().prop_flat_map(|layout| {
            let size = layout.size();
            (Just(layout), 0..size).prop_flat_map(move |(layout, offset)| {
                (
                    Just(layout),
                    Just(offset),
                    0..=(size - offset).min(20 << 20),
                )
            })
        })
    }

    proptest! {
        #[test]
        fn pieces_cover_the_range_once_in_order_within_stripe_units(
            (layout, offset, len) in layout_and_range()
        ) {
            let su = u64::from(layout.stripe_unit());
            let mut expected_buf = 0;
            for piece in layout.pieces(offset, len) {
                prop_assert_eq!(piece.buf_offset, expected_buf, "in order, no gaps or overlaps");
                prop_assert!(piece.len > 0);
                let start = offset + piece.buf_offset;
                prop_assert_eq!(start / su, (start + piece.len - 1) / su, "within one stripe unit");
                prop_assert!(piece.column < layout.columns());
                prop_assert!(piece.node_offset + piece.len <= layout.node_capacity(piece.column));
                expected_buf += piece.len;
            }
            prop_assert_eq!(expected_buf, len, "covers the whole range");
        }

        #[test]
        fn node_offsets_agree_for_every_range_sharing_a_stripe(
            (layout, offset, len) in layout_and_range(),
            probe in any::<prop::sample::Index>(),
        ) {
            // Any byte of the range maps to the same place whether it is
            // reached through this range or through a one-byte range.
            prop_assume!(len > 0);
            let byte = offset + probe.index(len as usize) as u64;
            let via_range = layout
                .pieces(offset, len)
                .find(|p| offset + p.buf_offset <= byte && byte < offset + p.buf_offset + p.len)
                .map(|p| (p.column, p.node_offset + (byte - offset - p.buf_offset)));
            let single = layout.pieces(byte, 1).next().map(|p| (p.column, p.node_offset));
            prop_assert_eq!(via_range, single);
            prop_assert_eq!(single, Some(layout.locate(byte)));
        }

        #[test]
        fn every_node_byte_belongs_to_exactly_one_volume_byte(layout in any_layout()) {
            // Walk the whole volume by stripe units: node offsets of one node
            // are dense from 0 to its capacity, never reused.
            let su = u64::from(layout.stripe_unit());
            let mut next = vec![0u64; layout.columns()];
            let mut pos = 0;
            while pos < layout.size() {
                let (node, node_offset) = layout.locate(pos);
                prop_assert_eq!(node_offset, next[node]);
                let len = su.min(layout.size() - pos);
                next[node] += len;
                pos += len;
            }
            for (node, end) in next.iter().enumerate() {
                prop_assert_eq!(*end, layout.node_capacity(node));
            }
        }

        #[test]
        fn column_extents_are_the_union_of_the_pieces((layout, offset, len) in layout_and_range()) {
            let mut union: Vec<Option<(u64, u64)>> = vec![None; layout.columns()];
            let mut total = vec![0u64; layout.columns()];
            for p in layout.pieces(offset, len) {
                let e = union[p.column].get_or_insert((p.node_offset, p.node_offset));
                prop_assert_eq!(e.1, p.node_offset, "a node's pieces are contiguous on it");
                e.1 = p.node_offset + p.len;
                total[p.column] += p.len;
            }
            let expected: Vec<(usize, u64, u64)> = union
                .into_iter()
                .enumerate()
                .filter_map(|(n, e)| e.map(|(s, end)| (n, s, end - s)))
                .collect();
            prop_assert_eq!(layout.column_extents(offset, len), expected);
        }
    }

    #[test]
    fn spec_errors_are_clear() {
        let node = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let spec = VolumeSpec {
            name: "v".into(),
            size: 1 << 30,
            stripe_unit: DEFAULT_STRIPE_UNIT,
            nodes: vec![node(1), node(2)],
            replicas: 1,
        };
        assert!(spec.layout().is_ok());
        let bad = |f: &dyn Fn(&mut VolumeSpec)| {
            let mut s = spec.clone();
            f(&mut s);
            s.layout().expect_err("must be refused")
        };
        assert_eq!(bad(&|s| s.nodes.clear()), SpecError::NoNodes);
        assert_eq!(
            bad(&|s| s.nodes.push(node(1))),
            SpecError::DuplicateNode(node(1))
        );
        assert!(matches!(
            bad(&|s| s.name = "a/b".into()),
            SpecError::BadName(_)
        ));
        assert!(matches!(
            bad(&|s| s.stripe_unit = 3000),
            SpecError::Geometry(_)
        ));
        assert!(matches!(bad(&|s| s.size = 1000), SpecError::Geometry(_)));
        // Replicas: a whole number of rows, every copy on its own node.
        let replicated = VolumeSpec {
            nodes: vec![node(1), node(2), node(3), node(4)],
            replicas: 2,
            ..spec.clone()
        };
        let layout = replicated.layout().expect("2 columns x 2");
        assert_eq!((layout.columns(), layout.node_count()), (2, 4));
        let fp = layout.fingerprint(3);
        assert_eq!(
            (fp.node_count, fp.node_index, fp.replicas, fp.replica_index),
            (2, 1, 2, 1)
        );
        assert_eq!(layout.node_capacity(3), layout.node_capacity(1));
        let with = |f: &dyn Fn(&mut VolumeSpec)| {
            let mut s = replicated.clone();
            f(&mut s);
            s.layout()
        };
        assert!(matches!(with(&|s| {
            s.nodes.pop();
        }), Err(SpecError::Geometry(m)) if m.contains("multiple of 2")));
        assert!(
            matches!(with(&|s| s.replicas = 6), Err(SpecError::Geometry(m)) if m.contains("from 1 to 5"))
        );
        assert_eq!(
            with(&|s| s.nodes[2] = node(1)),
            Err(SpecError::DuplicateNode(node(1)))
        );
    }

    #[test]
    fn a_known_layout() {
        let layout = Layout::new(1 << 20, 4096, 3).expect("layout");
        let pieces: Vec<_> = layout.pieces(4096 + 100, 8192).collect();
        assert_eq!(
            pieces,
            vec![
                Piece {
                    column: 1,
                    node_offset: 100,
                    buf_offset: 0,
                    len: 3996
                },
                Piece {
                    column: 2,
                    node_offset: 0,
                    buf_offset: 3996,
                    len: 4096
                },
                Piece {
                    column: 0,
                    node_offset: 4096,
                    buf_offset: 8092,
                    len: 100
                },
            ]
        );
    }
}

//! Placement: which nodes of a [`Pool`] hold a volume's columns and their
//! replicas.
//!
//! A volume of C columns and R replicas needs C × R nodes. Each column
//! ranks the pool by weighted rendezvous hashing (highest random weight):
//! every node scores `weight / -ln(u)`, `u` uniform in (0, 1) from a hash
//! of the volume's name, the column and the node's name. The column takes,
//! in rank order, the nodes still free whose failure domain (at the level
//! asked) holds none of its replicas yet and that leave the rest of the
//! volume placeable. So:
//! - a node's share of a column's places follows its weight (less what
//!   the rules exclude: choosing R of a column's nodes without
//!   replacement gives light nodes a little more than their share);
//! - adding a node changes a column only where the node ranks among its
//!   replicas, and then displaces one member: the one in its domain, else
//!   the last (what moves is about the new node's weight share of the
//!   data, 1/31 for a 31st node of average weight); removing a node moves
//!   only its own places;
//! - replicas of one column never share a domain when the pool allows it,
//!   and when it does not, the placement is refused with the reason (an
//!   exact test: a flow over columns and domains).
//!
//! The hash is fixed here (8-byte words folded through splitmix64's
//! finaliser) and
//! must not change: a placement once made is stored with the volume, but a
//! preview and a later create must agree.

use std::collections::BTreeMap;

use crate::pool::{Level, Pool};

/// Where a volume went: `columns[c][r]` is the index in the pool of
/// the node holding replica r of column c.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub columns: Vec<Vec<usize>>,
}

impl Placement {
    /// Every node chosen, column by column, replica by replica.
    pub fn nodes(&self) -> impl Iterator<Item = usize> + '_ {
        self.columns.iter().flatten().copied()
    }
}

/// The hash of `volume`, its column `column` and node `name` as a number in
/// (0, 1).
fn unit_hash(volume: &str, column: u32, name: &str) -> f64 {
    // Every 8 bytes (zero-padded) folded in through splitmix64's
    // finaliser; the lengths keep `("ab", "c")` apart from `("a", "bc")`.
    fn mix(mut h: u64) -> u64 {
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^ (h >> 31)
    }
    let mut h = 0x9e37_79b9_7f4a_7c15_u64;
    let mut fold = |bytes: &[u8]| {
        h = mix(h ^ bytes.len() as u64);
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            h = mix(h.wrapping_add(0x9e37_79b9_7f4a_7c15) ^ u64::from_le_bytes(word));
        }
    };
    fold(volume.as_bytes());
    fold(&column.to_le_bytes());
    fold(name.as_bytes());
    // 53 bits, centred in their interval: never 0, never 1.
    ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// A node's weighted rendezvous score for a column.
fn score(volume: &str, column: u32, name: &str, weight: f64) -> f64 {
    weight / -unit_hash(volume, column, name).ln()
}

/// Places `columns` × `replicas` of `volume` on `pool`, replicas of a
/// column in distinct domains at `spread`.
pub fn place(
    pool: &Pool,
    volume: &str,
    columns: u32,
    replicas: u32,
    spread: Level,
) -> Result<Placement, String> {
    if columns == 0 || replicas == 0 {
        return Err("a volume needs at least one column and one replica".into());
    }
    let slots = u64::from(columns) * u64::from(replicas);
    if slots > pool.nodes.len() as u64 {
        return Err(format!(
            "{columns} column(s) × {replicas} replica(s) need {slots} nodes; the pool has {}",
            pool.nodes.len()
        ));
    }
    let unlabelled: Vec<String> = pool
        .nodes
        .iter()
        .filter(|n| n.domain(spread).is_none())
        .map(|n| n.address.to_string())
        .collect();
    if !unlabelled.is_empty() {
        return Err(format!(
            "--spread {} needs a {} label on every node; without one: {}",
            spread.name(),
            spread.name(),
            unlabelled.join(", ")
        ));
    }
    let mut state = Search::new(pool, spread, columns as usize, replicas as usize);
    if !state.feasible() {
        return Err(state.why_not());
    }
    for c in 0..columns as usize {
        // One ranking per column: its replicas are its best nodes that
        // keep the rules, so a node added to the pool displaces at most
        // one member of a column (the one of its own domain, or the last).
        let mut ranked: Vec<(f64, usize)> = pool
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (score(volume, c as u32, &n.name, n.weight), i))
            .collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        for _ in 0..replicas {
            let chosen = ranked.iter().map(|&(_, i)| i).find(|&i| {
                if !state.allowed(c, i) {
                    return false;
                }
                state.take(c, i);
                let ok = state.feasible();
                if !ok {
                    state.untake(c, i);
                }
                ok
            });
            // The whole problem was feasible before this replica, and some
            // free node keeps it so (the one an exact assignment gives it).
            if chosen.is_none() {
                return Err(state.why_not());
            }
        }
    }
    Ok(Placement {
        columns: state.chosen,
    })
}

/// A placement being made: what is taken, and whether the rest can still
/// be filled.
struct Search<'a> {
    pool: &'a Pool,
    replicas: usize,
    /// Each node's domain, as an index into `domain_names`.
    domain_of: Vec<usize>,
    domain_names: Vec<&'a str>,
    used: Vec<bool>,
    chosen: Vec<Vec<usize>>,
    level: Level,
}

impl<'a> Search<'a> {
    fn new(pool: &'a Pool, level: Level, columns: usize, replicas: usize) -> Search<'a> {
        let mut index: BTreeMap<&str, usize> = BTreeMap::new();
        let mut domain_names = Vec::new();
        let domain_of = pool
            .nodes
            .iter()
            .map(|n| {
                let d = n.domain(level).unwrap_or_default();
                *index.entry(d).or_insert_with(|| {
                    domain_names.push(d);
                    domain_names.len() - 1
                })
            })
            .collect();
        Search {
            pool,
            replicas,
            domain_of,
            domain_names,
            used: vec![false; pool.nodes.len()],
            chosen: vec![Vec::with_capacity(replicas); columns],
            level,
        }
    }

    /// Node `i` is free and its domain holds no replica of column `c`.
    fn allowed(&self, c: usize, i: usize) -> bool {
        !self.used[i]
            && !self.chosen[c]
                .iter()
                .any(|&j| self.domain_of[j] == self.domain_of[i])
    }

    fn take(&mut self, c: usize, i: usize) {
        self.used[i] = true;
        self.chosen[c].push(i);
    }

    fn untake(&mut self, c: usize, i: usize) {
        self.used[i] = false;
        self.chosen[c].pop();
    }

    /// Whether the slots left can all be filled: a flow from each column
    /// (as many units as it still needs) through the domains it has no
    /// replica in (one unit each) to the domains' free nodes.
    fn feasible(&self) -> bool {
        let domains = self.domain_names.len();
        let mut free = vec![0usize; domains];
        for (i, &d) in self.domain_of.iter().enumerate() {
            if !self.used[i] {
                free[d] += 1;
            }
        }
        let needs: Vec<usize> = self
            .chosen
            .iter()
            .map(|c| self.replicas - c.len())
            .collect();
        let total: usize = needs.iter().sum();
        // edge[c][d]: column c sends a unit through domain d.
        let mut edge = vec![vec![false; domains]; needs.len()];
        let mut through = vec![0usize; domains];
        let mut flow = 0;
        for (c, &need) in needs.iter().enumerate() {
            for _ in 0..need {
                let mut seen = vec![false; domains];
                if self.augment(c, &mut edge, &mut through, &free, &mut seen) {
                    flow += 1;
                } else {
                    return false;
                }
            }
        }
        flow == total
    }

    /// Finds a way to send one more unit from column `c` (a path
    /// alternating between domains and the columns already using them).
    fn augment(
        &self,
        c: usize,
        edge: &mut [Vec<bool>],
        through: &mut [usize],
        free: &[usize],
        seen: &mut [bool],
    ) -> bool {
        for d in 0..through.len() {
            if seen[d] || edge[c][d] || self.column_has(c, d) {
                continue;
            }
            seen[d] = true;
            if through[d] < free[d] {
                edge[c][d] = true;
                through[d] += 1;
                return true;
            }
            // The domain is full: move one of its units to another domain.
            for other in 0..edge.len() {
                if other != c && edge[other][d] {
                    edge[other][d] = false;
                    through[d] -= 1;
                    if self.augment(other, edge, through, free, seen) {
                        edge[c][d] = true;
                        through[d] += 1;
                        return true;
                    }
                    edge[other][d] = true;
                    through[d] += 1;
                }
            }
        }
        false
    }

    /// Column `c` already holds a replica in domain `d`.
    fn column_has(&self, c: usize, d: usize) -> bool {
        self.chosen[c].iter().any(|&j| self.domain_of[j] == d)
    }

    /// Why no placement exists, for the refusal.
    fn why_not(&self) -> String {
        let level = self.level.name();
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for &d in &self.domain_of {
            *counts.entry(self.domain_names[d]).or_default() += 1;
        }
        let listed: Vec<String> = counts.iter().map(|(d, n)| format!("{d}: {n}")).collect();
        let columns = self.chosen.len();
        if counts.len() < self.replicas {
            format!(
                "{} replicas of a column need {} distinct {level}s; the pool has {} ({})",
                self.replicas,
                self.replicas,
                counts.len(),
                listed.join(", ")
            )
        } else {
            format!(
                "{columns} column(s) × {} replica(s) cannot each have their replicas in distinct {level}s with the pool's nodes per {level} ({}): {} nodes in at most {} of them per column",
                self.replicas,
                listed.join(", "),
                self.pool.nodes.len(),
                counts.len()
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::SocketAddr;

    use super::*;
    use crate::pool::PoolNode;

    fn node(i: usize, weight: f64, zone: &str) -> PoolNode {
        let address: SocketAddr = format!("10.0.{}.{}:7000", i / 200, i % 200 + 1)
            .parse()
            .expect("addr");
        PoolNode {
            name: address.to_string(),
            address,
            weight,
            zone: Some(zone.to_string()),
            rack: None,
            host: address.ip().to_string(),
        }
    }

    /// 30 nodes in 3 zones (nodes 0, 3, 6... in zone a), weights 2, 3
    /// and 4 (nodes 0-2, 9-11... weigh 2): each zone holds a third of the
    /// weight.
    fn pool30() -> Pool {
        let nodes = (0..30)
            .map(|i| node(i, [2.0, 3.0, 4.0][(i / 3) % 3], ["a", "b", "c"][i % 3]))
            .collect();
        Pool::new(nodes).expect("pool")
    }

    /// Each node's slots over 10,000 volumes, as a share of what its
    /// weight asks for.
    fn shares(pool: &Pool, columns: u32, replicas: u32, spread: Level) -> Vec<f64> {
        let mut count = vec![0u64; pool.nodes.len()];
        let volumes = 10_000;
        for v in 0..volumes {
            let p = place(pool, &format!("pvc-{v}"), columns, replicas, spread).expect("place");
            for column in &p.columns {
                let mut domains: Vec<_> = column
                    .iter()
                    .map(|&i| pool.nodes[i].domain(spread))
                    .collect();
                domains.sort_unstable();
                domains.dedup();
                assert_eq!(
                    domains.len(),
                    column.len(),
                    "a column's replicas share a {spread:?}"
                );
            }
            for i in p.nodes() {
                count[i] += 1;
            }
        }
        let slots = f64::from(volumes * columns * replicas);
        let total = pool.total_weight();
        pool.nodes
            .iter()
            .zip(count)
            .map(|(n, c)| c as f64 / (slots * n.weight / total))
            .collect()
    }

    #[test]
    fn the_same_name_gets_the_same_placement() {
        let pool = pool30();
        let a = place(&pool, "vol-1", 2, 2, Level::Zone).expect("place");
        assert_eq!(a, place(&pool, "vol-1", 2, 2, Level::Zone).expect("again"));
        assert_ne!(a, place(&pool, "vol-2", 2, 2, Level::Zone).expect("other"));
        assert_eq!(a.columns.len(), 2);
        let mut nodes: Vec<usize> = a.nodes().collect();
        nodes.sort_unstable();
        nodes.dedup();
        assert_eq!(nodes.len(), 4, "four distinct nodes: {a:?}");
    }

    #[test]
    fn ten_thousand_volumes_spread_by_weight() {
        // 4 columns each: 40,000 places, 889 expected for a node of weight
        // 2 (its count varies by about 3.4% from the hash alone).
        let pool = pool30();
        let shares = shares(&pool, 4, 1, Level::Host);
        eprintln!(
            "shares: {:?}",
            shares.iter().map(|s| format!("{s:.3}")).collect::<Vec<_>>()
        );
        for (i, share) in shares.iter().enumerate() {
            assert!(
                (0.9..=1.1).contains(share),
                "node {i} (weight {}): {share:.3} of its weight's share",
                pool.nodes[i].weight
            );
        }
    }

    #[test]
    fn replicated_volumes_spread_by_weight_with_zones_apart() {
        // 2 columns × 2 replicas in distinct zones. Choosing a volume's
        // nodes without replacement gives light nodes a little more than
        // their weight's share and heavy ones a little less: within 5%
        // per weight, within 15% per node (hash variation included).
        let pool = pool30();
        let shares = shares(&pool, 2, 2, Level::Zone);
        eprintln!(
            "shares: {:?}",
            shares.iter().map(|s| format!("{s:.3}")).collect::<Vec<_>>()
        );
        for w in [2.0, 3.0, 4.0] {
            let of_w: Vec<f64> = pool
                .nodes
                .iter()
                .zip(&shares)
                .filter(|(n, _)| n.weight == w)
                .map(|(_, s)| *s)
                .collect();
            let mean = of_w.iter().sum::<f64>() / of_w.len() as f64;
            assert!((0.95..=1.05).contains(&mean), "weight {w}: {mean:.3}");
        }
        for (i, share) in shares.iter().enumerate() {
            assert!((0.85..=1.15).contains(share), "node {i}: {share:.3}");
        }
    }

    #[test]
    fn a_31st_node_takes_about_its_share_and_moves_little_else() {
        let pool = pool30();
        let mut nodes = pool.nodes.clone();
        // Of the pool's average weight (90 / 30).
        nodes.push(node(30, 3.0, "b"));
        let bigger = Pool::new(nodes).expect("pool");
        let (mut joined, mut left, mut places) = (0u64, 0u64, 0u64);
        for v in 0..10_000 {
            let name = format!("pvc-{v}");
            let before = place(&pool, &name, 2, 2, Level::Zone).expect("before");
            let after = place(&bigger, &name, 2, 2, Level::Zone).expect("after");
            // A replica's data moves where a column gained a node.
            for (b, a) in before.columns.iter().zip(&after.columns) {
                places += b.len() as u64;
                joined += a.iter().filter(|n| !b.contains(n)).count() as u64;
                left += b.iter().filter(|n| !a.contains(n)).count() as u64;
            }
        }
        let to_new = (0..10_000)
            .map(|v| {
                let p = place(&bigger, &format!("pvc-{v}"), 2, 2, Level::Zone).expect("place");
                p.nodes().filter(|&n| n == 30).count() as u64
            })
            .sum::<u64>();
        assert_eq!(joined, left);
        let share = |n: u64| n as f64 / places as f64;
        eprintln!(
            "of {places} places: {to_new} on the new node ({:.4}), {joined} changed ({:.4}); 1/31 = {:.4}",
            share(to_new),
            share(joined),
            1.0 / 31.0
        );
        let third = 1.0 / 31.0;
        assert!(
            (0.85 * third..=1.15 * third).contains(&share(to_new)),
            "the new node took {to_new} of {places} places ({:.4})",
            share(to_new)
        );
        // Each column the new node joins loses one member; a node freed so
        // may take the place of another column of the same volume.
        assert!(
            share(joined) <= 1.2 * third,
            "{joined} of {places} places changed ({:.4}; 1/31 = {third:.4}), the new node's {to_new}",
            share(joined)
        );
    }

    #[test]
    fn replicas_stay_apart_when_the_pool_allows_it_only_one_way() {
        // Zone a has 4 nodes, b and c one each: 2 columns × 2 replicas fit
        // only as {a, b} and {a, c}, whatever the hash prefers.
        let nodes = vec![
            node(0, 1.0, "a"),
            node(1, 1.0, "a"),
            node(2, 1.0, "a"),
            node(3, 1.0, "a"),
            node(4, 10.0, "b"),
            node(5, 10.0, "c"),
        ];
        let pool = Pool::new(nodes).expect("pool");
        for v in 0..200 {
            let p = place(&pool, &format!("v{v}"), 2, 2, Level::Zone).expect("place");
            for column in &p.columns {
                let zones: Vec<_> = column.iter().map(|&i| pool.nodes[i].zone.clone()).collect();
                assert_ne!(zones[0], zones[1], "{p:?}");
            }
        }
    }

    #[test]
    fn a_pool_that_cannot_keep_replicas_apart_is_refused_with_the_reason() {
        let two_zones: Vec<PoolNode> = (0..6).map(|i| node(i, 1.0, ["a", "b"][i % 2])).collect();
        let pool = Pool::new(two_zones).expect("pool");
        let err = place(&pool, "v", 1, 3, Level::Zone).expect_err("3 replicas in 2 zones");
        assert!(
            err.contains("need 3 distinct zones; the pool has 2 (a: 3, b: 3)"),
            "{err}"
        );
        // Enough zones, but not enough nodes in them for every column.
        let lopsided = vec![
            node(0, 1.0, "a"),
            node(1, 1.0, "a"),
            node(2, 1.0, "a"),
            node(3, 1.0, "b"),
        ];
        let pool = Pool::new(lopsided).expect("pool");
        let err = place(&pool, "v", 2, 2, Level::Zone).expect_err("two columns need two b's");
        assert!(
            err.contains("cannot each have their replicas in distinct zones"),
            "{err}"
        );
        let err = place(&pool, "v", 3, 2, Level::Host).expect_err("too few nodes");
        assert!(err.contains("need 6 nodes; the pool has 4"), "{err}");
        // Host spread: every node is its own host here.
        assert!(place(&pool, "v", 2, 2, Level::Host).is_ok());
    }

    #[test]
    fn a_spread_over_a_level_some_nodes_lack_is_refused_naming_them() {
        let mut nodes: Vec<PoolNode> = (0..3).map(|i| node(i, 1.0, "a")).collect();
        nodes[1].zone = None;
        let pool = Pool::new(nodes).expect("pool");
        let err = place(&pool, "v", 1, 2, Level::Zone).expect_err("unlabelled");
        assert!(err.contains("without one: 10.0.0.2:7000"), "{err}");
        assert!(place(&pool, "v", 1, 0, Level::Host).is_err());
    }

    #[test]
    fn the_hash_is_fixed() {
        // Placements made by one version must be previewed the same by
        // the next: these values must never change.
        let u = unit_hash("pvc-1", 0, "10.0.0.1:7000");
        assert!((0.0..1.0).contains(&u));
        let again = unit_hash("pvc-1", 0, "10.0.0.1:7000");
        assert_eq!(u.to_bits(), again.to_bits());
        let mut seen = HashMap::new();
        for column in 0..4 {
            seen.insert(unit_hash("pvc-1", column, "n").to_bits(), column);
        }
        assert_eq!(seen.len(), 4, "columns hash apart");
    }
}

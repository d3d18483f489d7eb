//! Volumes placed over a pool (docs/placement.md): created on the nodes
//! [`crate::placement`] chooses, with the placement written into their
//! membership records; found again from those records (never from the hash,
//! so a pool that changed since moves nothing); the volumes a node holds.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use netblk_protocol::pb;

use crate::inquiry::Asker;
use crate::manage::VolumeRef;
use crate::net::{self, ConnectError, Open, Timeouts};
use crate::placement;
use crate::pool::{Level, Pool};

/// A volume as its record places it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// Its members in node order (row by row: address i holds column
    /// i % columns), as its newest record names them.
    pub nodes: Vec<SocketAddr>,
    pub columns: u32,
    pub replicas: u32,
    pub stripe_unit: u32,
    /// Bytes of the whole volume, as its members state it.
    pub size: u64,
    /// The generation of the record read.
    pub generation: u64,
}

impl Located {
    /// Volume `name` on these members, as [`crate::manage`] reaches it.
    pub fn volume_ref(&self, name: &str, tls: Option<std::sync::Arc<net::ClientTls>>) -> VolumeRef {
        VolumeRef {
            name: name.to_owned(),
            stripe_unit: self.stripe_unit,
            nodes: self.nodes.clone(),
            replicas: self.replicas,
            tls,
        }
    }
}

/// What asking a pool's nodes about a volume found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    Found(Located),
    /// No node that answered has it; these did not answer (address: why).
    Absent {
        unreachable: Vec<String>,
    },
    /// These nodes have it, none with a placement record: a creation cut
    /// short, or a volume not created from a pool.
    Unplaced {
        holders: Vec<SocketAddr>,
    },
}

/// `ask` of every node of the pool, in parallel: each answer in pool order.
fn ask_all<T: Send>(
    pool: &Pool,
    ask: impl Fn(SocketAddr) -> Result<T, String> + Sync,
) -> Vec<Result<T, String>> {
    std::thread::scope(|s| {
        let asks: Vec<_> = pool
            .nodes
            .iter()
            .map(|n| {
                let ask = &ask;
                s.spawn(move || ask(n.address))
            })
            .collect();
        asks.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())))
            .collect()
    })
}

/// Finds volume `name` on `pool`'s nodes and reads its placement from the
/// newest membership record among them.
pub fn locate(pool: &Pool, name: &str, asker: &Asker) -> Result<Lookup, String> {
    let answers = ask_all(pool, |addr| asker.describe(addr, name));
    let mut found = Vec::new();
    let mut unreachable = Vec::new();
    for (node, answer) in pool.nodes.iter().zip(answers) {
        match answer {
            Ok(Some(described)) => found.push((node.address, described)),
            Ok(None) => {}
            Err(why) => unreachable.push(why),
        }
    }
    if found.is_empty() {
        return Ok(Lookup::Absent { unreachable });
    }
    let recorded = found.iter().any(|(_, d)| {
        d.record
            .as_ref()
            .is_some_and(|r| r.generation > 0 && !r.members.is_empty())
    });
    if !recorded {
        return Ok(Lookup::Unplaced {
            holders: found.into_iter().map(|(a, _)| a).collect(),
        });
    }
    placed(name, &found).map(Lookup::Found)
}

/// The placement of volume `name` from what the nodes in `found` hold:
/// the newest record's members, checked against each member's layout.
fn placed(name: &str, found: &[(SocketAddr, pb::VolumeDescription)]) -> Result<Located, String> {
    let holders = || {
        found
            .iter()
            .map(|(a, _)| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let newest = found
        .iter()
        .filter_map(|(_, d)| d.record.as_ref())
        .max_by_key(|r| r.generation)
        .filter(|r| r.generation > 0 && !r.members.is_empty())
        .ok_or_else(|| format!("volume '{name}' has no placement record on {}", holders()))?;
    let nodes: Vec<SocketAddr> = newest
        .members
        .iter()
        .map(|m| {
            m.parse().map_err(|_| {
                format!("volume '{name}': its record names member '{m}', not an IP:PORT")
            })
        })
        .collect::<Result<_, _>>()?;
    let mut geometry = None;
    let mut sizes = Vec::new();
    for (addr, described) in found {
        // A node the record does not name held the volume once (it was
        // replaced): what it still has is not the volume's.
        let Some(index) = nodes.iter().position(|n| n == addr) else {
            continue;
        };
        let layout = described.layout.unwrap_or_default();
        let replicas = layout.replicas.max(1);
        let columns = layout.node_count;
        let place = (
            index % columns.max(1) as usize,
            index / columns.max(1) as usize,
        );
        if place != (layout.node_index as usize, layout.replica_index as usize)
            || nodes.len() != columns as usize * replicas as usize
        {
            return Err(format!(
                "volume '{name}': {addr} holds column {} row {} of {columns} × {replicas}, but its record (generation {}) names {} members with {addr} at {index}",
                layout.node_index,
                layout.replica_index,
                newest.generation,
                nodes.len()
            ));
        }
        let this = (columns, replicas, layout.stripe_unit);
        if *geometry.get_or_insert(this) != this {
            return Err(format!(
                "volume '{name}': its members hold different layouts (at {addr}: {columns} columns × {replicas} replicas, stripe unit {})",
                layout.stripe_unit
            ));
        }
        sizes.push((addr.to_string(), described.volume_size));
    }
    let Some((columns, replicas, stripe_unit)) = geometry else {
        return Err(format!(
            "volume '{name}': its record names members {} and none of them answered with it (it is only on {})",
            newest.members.join(","),
            holders()
        ));
    };
    let size = sizes[0].1;
    if sizes.iter().any(|(_, s)| *s != size) {
        return Err(format!(
            "the members of volume '{name}' disagree on its size: {sizes:?}"
        ));
    }
    Ok(Located {
        nodes,
        columns,
        replicas,
        stripe_unit,
        size,
        generation: newest.generation,
    })
}

/// A volume to create over a pool.
#[derive(Debug, Clone)]
pub struct NewVolume {
    pub name: String,
    pub size: u64,
    pub columns: u32,
    pub replicas: u32,
    pub spread: Level,
    pub stripe_unit: u32,
}

/// What [`create`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub located: Located,
    /// It existed already, as asked for: nothing was done.
    pub existed: bool,
    /// Nodes of the pool that did not answer the search for an existing
    /// volume of the name (address: why): a volume held only by them was
    /// not seen.
    pub unreachable: Vec<String>,
}

/// Creates `new` on the nodes placement chooses from `pool`, and stores
/// the first membership record, naming them, on each. A volume of that
/// name already on the pool is left as it is: returned if it is what was
/// asked for, an error otherwise. Creating again after a creation cut
/// short finishes it.
pub fn create(
    pool: &Pool,
    new: &NewVolume,
    asker: &Asker,
    tls: Option<std::sync::Arc<net::ClientTls>>,
    client_id: &str,
    timeouts: Timeouts,
) -> Result<Created, String> {
    netblk_protocol::geometry::check_volume_name(&new.name)?;
    let max = netblk_protocol::geometry::MAX_REPLICAS;
    if !(1..=max).contains(&new.replicas) {
        return Err(format!(
            "{} replicas: a volume has 1 to {max} copies of every column",
            new.replicas
        ));
    }
    let chosen = placement::place(pool, &new.name, new.columns, new.replicas, new.spread)?;
    let columns = new.columns as usize;
    let mut nodes = vec![pool.nodes[0].address; chosen.nodes().count()];
    for (c, column) in chosen.columns.iter().enumerate() {
        for (r, &index) in column.iter().enumerate() {
            nodes[r * columns + c] = pool.nodes[index].address;
        }
    }
    let asked = Located {
        nodes: nodes.clone(),
        columns: new.columns,
        replicas: new.replicas,
        stripe_unit: new.stripe_unit,
        size: new.size,
        generation: 1,
    };
    let unreachable = match locate(pool, &new.name, asker) {
        Ok(Lookup::Found(found)) => {
            let same = (found.columns, found.replicas, found.stripe_unit, found.size)
                == (asked.columns, asked.replicas, asked.stripe_unit, asked.size);
            if same {
                return Ok(Created {
                    located: found,
                    existed: true,
                    unreachable: Vec::new(),
                });
            }
            return Err(format!(
                "volume '{}' exists on the pool as {} column(s) × {} replica(s), stripe unit {}, {} bytes, on {}: not what was asked for",
                new.name,
                found.columns,
                found.replicas,
                found.stripe_unit,
                found.size,
                members(&found.nodes)
            ));
        }
        // Partly created (no record anywhere yet) is finished below; the
        // nodes refuse another layout or size.
        Ok(Lookup::Absent { unreachable }) => unreachable,
        Ok(Lookup::Unplaced { .. }) => Vec::new(),
        Err(why) => return Err(why),
    };
    let volume = VolumeRef {
        name: new.name.clone(),
        stripe_unit: new.stripe_unit,
        nodes: nodes.clone(),
        replicas: new.replicas,
        tls,
    };
    volume
        .create(new.size, client_id, timeouts)
        .map_err(|e| format!("cannot create volume '{}': {e}", new.name))?;
    let full = (1u32 << new.replicas) - 1;
    let record = pb::MembershipRecord {
        generation: 1,
        owner_epoch: 0,
        owner: String::new(),
        clean: true,
        iss: vec![full; columns],
        joining: Vec::new(),
        rebuild: Vec::new(),
        members: nodes.iter().map(ToString::to_string).collect(),
    };
    store_first_record(&volume, &record, client_id, timeouts)?;
    Ok(Created {
        located: asked,
        existed: false,
        unreachable,
    })
}

/// Stores `record` (generation 1) on every node of `volume`; a node that
/// holds that very record already (a creation run again) is done.
fn store_first_record(
    volume: &VolumeRef,
    record: &pb::MembershipRecord,
    client_id: &str,
    timeouts: Timeouts,
) -> Result<(), String> {
    let layout = crate::layout::Layout::replicated(
        u64::from(volume.stripe_unit) * volume.nodes.len() as u64,
        volume.stripe_unit,
        volume.nodes.len(),
        volume.replicas,
    )
    .map_err(|e| e.to_string())?;
    let who = net::Identity {
        owner_epoch: 0,
        client_id,
        volume: &volume.name,
        session: net::clock_session(),
        volume_id: None,
        digest: false,
        tls: volume.tls.as_deref(),
    };
    for (node, addr) in volume.nodes.iter().enumerate() {
        let (stream, _) = net::connect_as(*addr, node, &layout, &who, timeouts, Open::Existing)
            .map_err(|e: ConnectError| e.to_string())?;
        let put = pb::request::Op::PutRecord(pb::PutRecord {
            expected_generation: 0,
            record: Some(record.clone()),
        });
        let reply = net::call(&stream, 1, put, timeouts.io)
            .map_err(|why| format!("node {node} ({addr}): {why}"))?;
        let stored_already =
            reply.status == pb::Status::Conflict as i32 && reply.record.as_ref() == Some(record);
        if reply.status != pb::Status::Ok as i32 && !stored_already {
            return Err(format!(
                "node {node} ({addr}) did not store the placement record of volume '{}': {}",
                volume.name, reply.message
            ));
        }
    }
    Ok(())
}

/// The volume `name` on `pool` as [`crate::manage`] reaches it, from its
/// record: an error if no node that answered has it.
pub fn volume_ref(
    pool: &Pool,
    name: &str,
    asker: &Asker,
    tls: Option<std::sync::Arc<net::ClientTls>>,
) -> Result<Option<(VolumeRef, Located)>, String> {
    match locate(pool, name, asker)? {
        Lookup::Found(located) => Ok(Some((located.volume_ref(name, tls), located))),
        Lookup::Unplaced { holders } => Err(format!(
            "volume '{name}' is on {} but none of them holds a placement record: it was not created from a pool, or its creation was cut short (run the create again)",
            members(&holders)
        )),
        Lookup::Absent { unreachable } if unreachable.is_empty() => Ok(None),
        Lookup::Absent { unreachable } => Err(format!(
            "no node of the pool that answered has volume '{name}', and {} did not answer: {}",
            unreachable.len(),
            unreachable.join("; ")
        )),
    }
}

/// Every node's volumes (in pool order), and each volume's newest record
/// among them.
struct Survey {
    answers: Vec<Result<Vec<pb::VolumeDescription>, String>>,
    newest: BTreeMap<String, pb::MembershipRecord>,
}

fn survey(pool: &Pool, asker: &Asker) -> Survey {
    let answers = ask_all(pool, |a| asker.list(a));
    let mut newest: BTreeMap<String, pb::MembershipRecord> = BTreeMap::new();
    for described in answers.iter().flatten().flatten() {
        let record = described.record.clone().unwrap_or_default();
        let held = newest.entry(described.volume.clone()).or_default();
        if record.generation > held.generation {
            *held = record;
        }
    }
    Survey { answers, newest }
}

/// The volumes on a pool's nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// Each volume and its members as its newest record names them (None:
    /// no placement record, e.g. a volume mapped with --nodes).
    pub volumes: BTreeMap<String, Option<Vec<SocketAddr>>>,
    /// The nodes that did not answer (address: why).
    pub unreachable: Vec<String>,
}

/// Lists the volumes on `pool`'s nodes.
pub fn list(pool: &Pool, asker: &Asker) -> Listing {
    let survey = survey(pool, asker);
    let unreachable = survey
        .answers
        .iter()
        .filter_map(|a| a.as_ref().err().cloned())
        .collect();
    let volumes = survey
        .newest
        .into_iter()
        .map(|(name, record)| {
            let members = (record.generation > 0 && !record.members.is_empty()).then(|| {
                record
                    .members
                    .iter()
                    .filter_map(|m| m.parse().ok())
                    .collect()
            });
            (name, members)
        })
        .collect();
    Listing {
        volumes,
        unreachable,
    }
}

/// The volumes that use pool node `node` (an index into `pool.nodes`):
/// those it holds, and those whose newest record names it as a member
/// (as any node of the pool that answered holds it). An error if the node
/// itself does not answer: what it holds cannot be told then.
pub fn users(pool: &Pool, node: usize, asker: &Asker) -> Result<Vec<String>, String> {
    let addr = pool.nodes[node].address;
    let survey = survey(pool, asker);
    let held = match &survey.answers[node] {
        Ok(volumes) => volumes,
        Err(why) => return Err(format!("cannot tell which volumes use {addr}: {why}")),
    };
    for why in survey.answers.iter().filter_map(|a| a.as_ref().err()) {
        tracing::warn!("{why}: the volumes it holds are not counted");
    }
    // What the node holds counts unless the volume's newest record says
    // it left (a replaced member's copy); a volume without a record (not
    // placed from a pool) counts.
    let listed = addr.to_string();
    let member = |record: &pb::MembershipRecord| record.members.contains(&listed);
    let mut names: BTreeSet<String> = held
        .iter()
        .filter(|d| {
            survey
                .newest
                .get(&d.volume)
                .is_none_or(|r| r.generation == 0 || r.members.is_empty() || member(r))
        })
        .map(|d| d.volume.clone())
        .collect();
    names.extend(
        survey
            .newest
            .iter()
            .filter(|(_, r)| member(r))
            .map(|(name, _)| name.clone()),
    );
    Ok(names.into_iter().collect())
}

/// Members as a comma-separated list.
pub fn members(nodes: &[SocketAddr]) -> String {
    nodes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

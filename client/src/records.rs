//! A replicated volume's membership record on its nodes: reading and
//! writing it ([`RecordStore`], over the network: [`NetRecords`]), the
//! attach that makes a device the volume's owner ([`attach`]), and the
//! manager thread that takes failed members out of the in-sync sets
//! ([`spawn_manager`]). The rules themselves are `replicas`' (pure).

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use netblk_protocol::pb::{self, MembershipRecord};

use crate::layout::Layout;
use crate::membership::{Membership, View};
use crate::net::{self, ClientTls, ConnectError, Identity, Timeouts};
use crate::replicas::{self, Attach, AttachError};

/// Why a record was not stored on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutError {
    /// The compare-and-set lost: the node holds this record.
    Conflict(MembershipRecord),
    /// The node did not answer, or failed to store it.
    Failed(String),
}

/// The membership records of one volume's nodes.
pub trait RecordStore: Send + Sync {
    /// Node `node`'s record (generation 0: none), and whether connections
    /// of that record's owner are open on it.
    fn get(&self, node: usize) -> Result<(MembershipRecord, bool), String>;
    /// Stores `record` on `node` if it holds generation `expected`.
    fn put(&self, node: usize, expected: u64, record: &MembershipRecord) -> Result<(), PutError>;
    /// How a node is named in messages.
    fn name(&self, node: usize) -> String {
        format!("node {node}")
    }
}

/// The records over the network: one short connection per request (they
/// are rare: an attach, a member leaving).
pub struct NetRecords {
    pub addrs: Vec<SocketAddr>,
    pub layout: Layout,
    pub volume: String,
    /// The volume identity each node must hold (empty: any).
    pub volume_ids: Vec<String>,
    pub client_id: String,
    pub tls: Option<Arc<ClientTls>>,
    pub timeouts: Timeouts,
}

impl NetRecords {
    fn call(&self, node: usize, op: pb::request::Op) -> Result<pb::Reply, String> {
        let addr = *self.addrs.get(node).ok_or("no such node")?;
        let who = Identity {
            client_id: &self.client_id,
            volume: &self.volume,
            session: net::clock_session(),
            volume_id: self
                .volume_ids
                .get(node)
                .map(String::as_str)
                .filter(|id| !id.is_empty()),
            digest: false,
            tls: self.tls.as_deref(),
            owner_epoch: 0,
        };
        let (stream, _) = net::connect(addr, node, &self.layout, &who, self.timeouts)
            .map_err(|e: ConnectError| e.to_string())?;
        net::call(&stream, 1, op, self.timeouts.io)
    }
}

impl RecordStore for NetRecords {
    fn get(&self, node: usize) -> Result<(MembershipRecord, bool), String> {
        let reply = self.call(node, pb::request::Op::GetRecord(pb::GetRecord {}))?;
        if reply.status != pb::Status::Ok as i32 {
            return Err(format!(
                "reading its membership record failed: {}",
                reply.message
            ));
        }
        Ok((reply.record.unwrap_or_default(), reply.owner_connected))
    }

    fn put(&self, node: usize, expected: u64, record: &MembershipRecord) -> Result<(), PutError> {
        let reply = self
            .call(
                node,
                pb::request::Op::PutRecord(pb::PutRecord {
                    expected_generation: expected,
                    record: Some(record.clone()),
                }),
            )
            .map_err(PutError::Failed)?;
        match reply.status {
            s if s == pb::Status::Ok as i32 => Ok(()),
            s if s == pb::Status::Conflict as i32 => {
                Err(PutError::Conflict(reply.record.unwrap_or_default()))
            }
            _ => Err(PutError::Failed(reply.message)),
        }
    }

    fn name(&self, node: usize) -> String {
        match self.addrs.get(node) {
            Some(addr) => format!("node {node} ({addr})"),
            None => format!("node {node}"),
        }
    }
}

/// How an attach may proceed.
#[derive(Debug, Clone, Default)]
pub struct AttachOptions {
    /// Who attaches (host and client id): the record's owner.
    pub owner: String,
    /// Serve even if members of the newest record's in-sync sets do not
    /// answer (acknowledged writes may be missing).
    pub force_degraded: bool,
    /// Fence an owner whose connections are still open.
    pub takeover: bool,
    /// How long to wait for missing members before failing.
    pub wait: Duration,
}

/// What an attach made: the device's membership, the record it stored,
/// and the generation each node holds.
pub struct Attached {
    pub membership: Arc<Membership>,
    pub record: MembershipRecord,
    pub known: Vec<u64>,
}

/// Every node's answer, asked in parallel.
fn read_all(
    store: &dyn RecordStore,
    nodes: usize,
) -> Vec<Result<(MembershipRecord, bool), String>> {
    std::thread::scope(|s| {
        let asks: Vec<_> = (0..nodes).map(|n| s.spawn(move || store.get(n))).collect();
        asks.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())))
            .collect()
    })
}

/// Stores `record` on every node in `nodes`, in parallel, each with the
/// generation it holds (`known`); returns each node's outcome.
fn put_all(
    store: &dyn RecordStore,
    nodes: &[usize],
    known: &[u64],
    record: &MembershipRecord,
) -> Vec<(usize, Result<(), PutError>)> {
    std::thread::scope(|s| {
        let puts: Vec<_> = nodes
            .iter()
            .map(|n| {
                let n = *n;
                let expected = known.get(n).copied().unwrap_or(0);
                s.spawn(move || (n, store.put(n, expected, record)))
            })
            .collect();
        puts.into_iter().filter_map(|h| h.join().ok()).collect()
    })
}

/// The nodes of every column's in-sync set in `record`.
fn iss_nodes(record: &MembershipRecord, layout: &Layout) -> Vec<usize> {
    let view = View::of_record(record);
    let r = layout.replication();
    (0..layout.node_count())
        .filter(|n| view.in_sync(r.column_of(*n), r.row_of(*n)))
        .collect()
}

/// Makes this device the owner of a replicated volume: reads every node's
/// record, takes the current one by the attach rule (waiting up to
/// `options.wait` for missing members), refuses an owner that looks alive
/// unless `takeover`, and stores the next generation with the next owner
/// epoch on every in-sync member before anything is served. Returns the
/// device's membership.
pub fn attach(
    store: &dyn RecordStore,
    layout: &Layout,
    options: &AttachOptions,
) -> Result<Attached, String> {
    let replication = *layout.replication();
    let deadline = Instant::now() + options.wait;
    let (current, answers) = loop {
        let answers = read_all(store, layout.node_count());
        let records: Vec<Option<MembershipRecord>> = answers
            .iter()
            .map(|a| a.as_ref().ok().map(|(r, _)| r.clone()))
            .collect();
        match replicas::attach(&records, &replication) {
            Ok(Attach::Fresh(r)) => break ((r, true), answers),
            Ok(Attach::Current(r)) => break ((r, false), answers),
            Err(AttachError::Missing {
                generation,
                missing,
            }) => {
                let named: Vec<String> = missing
                    .iter()
                    .map(|n| {
                        let why = answers[*n].as_ref().err().cloned().unwrap_or_default();
                        format!("{}: {why}", store.name(*n))
                    })
                    .collect();
                if options.force_degraded {
                    tracing::error!(
                        generation,
                        missing = ?named,
                        "attaching degraded (--force-degraded): writes acknowledged under a newer record may be missing, and reads may return older data"
                    );
                    let newest = records
                        .iter()
                        .flatten()
                        .max_by_key(|r| r.generation)
                        .cloned();
                    match newest.filter(|r| r.generation > 0) {
                        Some(r) => break ((r, false), answers),
                        None => {
                            return Err(format!(
                                "no node that answered holds a membership record, and {} did not answer: cannot even attach degraded",
                                named.join("; ")
                            ));
                        }
                    }
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "cannot attach: the newest membership record (generation {generation}) names members in sync that do not answer, and one of them may hold a newer record: {} (bring them back, or --force-degraded to attach without them, risking older data)",
                        named.join("; ")
                    ));
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(other) => return Err(other.to_string()),
        }
    };
    let ((record, fresh), answers) = (current, answers);
    let alive: Vec<String> = answers
        .iter()
        .enumerate()
        .filter(|(_, a)| a.as_ref().is_ok_and(|(_, connected)| *connected))
        .map(|(n, _)| store.name(n))
        .collect();
    if !fresh && !record.owner.is_empty() && record.owner != options.owner && !alive.is_empty() {
        if !options.takeover {
            return Err(format!(
                "volume is in use by {} (owner epoch {}): its connections are open on {}; unmap it there, or --takeover to fence it",
                record.owner,
                record.owner_epoch,
                alive.join(", ")
            ));
        }
        tracing::warn!(
            owner = %record.owner,
            owner_epoch = record.owner_epoch,
            "taking the volume over: its owner's connections are fenced"
        );
    }
    let next = MembershipRecord {
        generation: if fresh { 1 } else { record.generation + 1 },
        owner_epoch: record.owner_epoch + 1,
        owner: options.owner.clone(),
        clean: false,
        iss: record.iss.clone(),
    };
    // Each node's stored generation, as read: the compare-and-set fails if
    // anything changed it since.
    let mut known: Vec<u64> = answers
        .iter()
        .map(|a| a.as_ref().map_or(0, |(r, _)| r.generation))
        .collect();
    let members = iss_nodes(&next, layout);
    let mut failed = Vec::new();
    for (node, result) in put_all(store, &members, &known, &next) {
        match result {
            Ok(()) => known[node] = next.generation,
            Err(PutError::Conflict(held)) => failed.push(format!(
                "{} holds generation {} (owner {}): another attach raced this one",
                store.name(node),
                held.generation,
                held.owner
            )),
            Err(PutError::Failed(why)) => failed.push(format!("{}: {why}", store.name(node))),
        }
    }
    if !failed.is_empty() {
        return Err(format!(
            "cannot store the membership record (generation {}) on every member in sync: {}",
            next.generation,
            failed.join("; ")
        ));
    }
    tracing::info!(
        generation = next.generation,
        owner_epoch = next.owner_epoch,
        clean = record.clean || fresh,
        iss = ?next.iss,
        "attached the replicated volume"
    );
    Ok(Attached {
        membership: Membership::new(replication, View::of_record(&next)),
        record: next,
        known,
    })
}

/// A record that removes members: the record, the columns it changes,
/// and who leaves why.
type Change = (MembershipRecord, Vec<usize>, Vec<(usize, String)>);

/// Takes failed members out: for each member the queues reported, the
/// record without it is stored on every in-sync member of every column
/// (all remaining members of its column must take it), then published to
/// the queues. A node holding a newer owner's record fences the device.
/// [`spawn_manager`] runs it on a thread; tests step it themselves.
pub struct Manager {
    store: Box<dyn RecordStore>,
    layout: Layout,
    record: MembershipRecord,
    /// The generation each node holds, as far as this manager knows.
    known: Vec<u64>,
    /// A change tried and perhaps stored on some nodes already: it is
    /// tried again as it is (never another record of the same generation),
    /// with the columns it changes and who leaves why.
    pending: Option<Change>,
    /// A planted bug for the simulator to find (never set outside tests):
    /// the queues hear of a shrink before it is stored.
    #[doc(hidden)]
    pub plant_publish_before_store: bool,
}

impl Manager {
    /// A manager for the device an attach made.
    pub fn new(store: Box<dyn RecordStore>, layout: Layout, attached: &Attached) -> Manager {
        Manager {
            store,
            layout,
            record: attached.record.clone(),
            known: attached.known.clone(),
            pending: None,
            plant_publish_before_store: false,
        }
    }

    /// The record this device serves from.
    pub fn record(&self) -> &MembershipRecord {
        &self.record
    }

    /// Handles every reported failure once. False once the device is
    /// fenced (nothing more to do).
    pub fn step(&mut self, m: &Membership) -> bool {
        if m.view().fenced {
            return false;
        }
        let (next, changed, leaving) = match self.pending.take() {
            Some(pending) => pending,
            None => {
                // Every member reported so far leaves in one change:
                // members of one column that failed together need not wait
                // for each other.
                let mut next = self.record.clone();
                let mut leaving = Vec::new();
                for (node, failure) in &m.failed() {
                    if let Some(shrunk) = replicas::shrink(&next, self.layout.replication(), *node)
                    {
                        next = shrunk;
                        leaving.push((*node, failure.reason.clone()));
                    }
                }
                if leaving.is_empty() {
                    return true;
                }
                next.generation = self.record.generation + 1;
                let changed: Vec<usize> = leaving
                    .iter()
                    .map(|(node, _)| self.layout.replication().column_of(*node))
                    .collect();
                (next, changed, leaving)
            }
        };
        if self.plant_publish_before_store {
            m.publish(View::of_record(&next));
        }
        match store_shrink(&*self.store, &self.layout, &mut self.known, &next, &changed) {
            Ok(()) => {
                for (node, reason) in &leaving {
                    tracing::warn!(
                        node,
                        reason = %reason,
                        generation = next.generation,
                        iss = ?next.iss,
                        "replica left the in-sync set"
                    );
                }
                self.record = next;
                m.publish(View::of_record(&self.record));
            }
            Err(Shrink::Fenced(held)) => {
                tracing::error!(
                    owner = %held.owner,
                    owner_epoch = held.owner_epoch,
                    "another owner took the volume over: this device is fenced, its IO fails"
                );
                m.fence();
                return false;
            }
            Err(Shrink::Retry(why)) => {
                tracing::warn!(error = %why, generation = next.generation, "cannot store the shrunk membership record yet; retrying");
                self.pending = Some((next, changed, leaving));
            }
        }
        true
    }
}

/// Runs a [`Manager`] on a thread until the membership is dropped or the
/// device fenced: woken by every report, and once a second to retry.
pub fn spawn_manager(
    store: Box<dyn RecordStore>,
    layout: Layout,
    attached: &Attached,
) -> std::io::Result<()> {
    let weak: Weak<Membership> = Arc::downgrade(&attached.membership);
    let mut manager = Manager::new(store, layout, attached);
    std::thread::Builder::new()
        .name("netblk-members".into())
        .spawn(move || {
            while let Some(m) = weak.upgrade() {
                if !manager.step(&m) {
                    return;
                }
                m.wait_report(Duration::from_secs(1));
            }
        })
        .map(|_| ())
}

enum Shrink {
    Fenced(MembershipRecord),
    Retry(String),
}

/// Stores `next` (which drops members of the `changed` columns) on every
/// in-sync member; Ok once every remaining member of those columns holds
/// it.
fn store_shrink(
    store: &dyn RecordStore,
    layout: &Layout,
    known: &mut [u64],
    next: &MembershipRecord,
    changed: &[usize],
) -> Result<(), Shrink> {
    let replication = layout.replication();
    // Members that took this record on an earlier try hold it already.
    let members: Vec<usize> = iss_nodes(next, layout)
        .into_iter()
        .filter(|n| known.get(*n) != Some(&next.generation))
        .collect();
    let mut missing = Vec::new();
    for (n, result) in put_all(store, &members, known, next) {
        let result = match result {
            // Stored by an earlier try.
            Err(PutError::Conflict(held)) if held == *next => Ok(()),
            // A node that missed one of our earlier records: ours again,
            // over the one it holds.
            Err(PutError::Conflict(held))
                if held.owner_epoch == next.owner_epoch && held.generation < next.generation =>
            {
                known[n] = held.generation;
                store.put(n, held.generation, next)
            }
            other => other,
        };
        match result {
            Ok(()) => known[n] = next.generation,
            Err(PutError::Conflict(held)) if held.owner_epoch > next.owner_epoch => {
                return Err(Shrink::Fenced(held));
            }
            Err(PutError::Conflict(held)) => {
                missing.push((n, format!("holds generation {}", held.generation)))
            }
            Err(PutError::Failed(why)) => missing.push((n, why)),
        }
    }
    let required: Vec<&(usize, String)> = missing
        .iter()
        .filter(|(n, _)| changed.contains(&replication.column_of(*n)))
        .collect();
    if let Some((n, why)) = required.first() {
        return Err(Shrink::Retry(format!("{}: {why}", store.name(*n))));
    }
    for (n, why) in &missing {
        tracing::warn!(node = n, error = %why, generation = next.generation, "a member of another column missed the membership record; it gets the next one");
    }
    Ok(())
}

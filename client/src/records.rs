//! A replicated volume's membership record on its nodes: reading and
//! writing it ([`RecordStore`], over the network: [`NetRecords`]), the
//! attach that makes a device the volume's owner ([`attach`]), and the
//! manager thread that takes failed members out of the in-sync sets
//! ([`spawn_manager`]). The rules themselves are `replicas`' (pure).

use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use netblk_protocol::pb::{self, MembershipRecord};

use crate::activity::Trimmer;
use crate::layout::Layout;
use crate::membership::{Membership, View};
use crate::net::{self, ClientTls, ConnectError, Identity, NodeInfo, Timeouts};
use crate::reconcile;
use crate::replicas::{self, Attach, AttachError};

/// Why a record was not stored on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutError {
    /// The compare-and-set lost: the node holds this record.
    Conflict(Box<MembershipRecord>),
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
    /// Node `node`'s activity log: (region, sequence number) in order.
    fn activity(&self, node: usize) -> Result<Vec<(u64, u64)>, String>;
    /// Drops `entries` from `node`'s log, each only if its sequence number
    /// is unchanged; as the owner of `owner_epoch`.
    fn trim(&self, node: usize, owner_epoch: u64, entries: &[(u64, u64)]) -> Result<(), String>;
    /// Makes every write `node` acknowledged durable.
    fn flush(&self, node: usize, owner_epoch: u64) -> Result<(), String>;
    /// Copies the node-offset `ranges` (offset, length) from node `from` to
    /// every node of `to`, durable there when it returns; as the owner of
    /// `owner_epoch`.
    fn copy(
        &self,
        owner_epoch: u64,
        from: usize,
        to: &[usize],
        ranges: &[(u64, u64)],
    ) -> Result<(), String>;
    /// The CRC-32C of `len` bytes at node offset `offset` on `node`,
    /// computed there.
    fn digest(&self, node: usize, offset: u64, len: u64) -> Result<u32, String>;
    /// What `node` says of the volume now (without holding it to the
    /// identity it had): a member out of sync is probed before it joins.
    fn probe(&self, node: usize) -> Result<Probe, String>;
    /// The regions (of `RESYNC_REGION` node bytes) that replica row `row`
    /// of `node`'s column missed, as `node` tracked them, and the record
    /// generation it tracks them since (0: it does not).
    fn missed(&self, node: usize, row: u32) -> Result<(Vec<u64>, u64), String>;
    /// Bytes of node offsets one region of the activity logs covers.
    fn activity_region(&self) -> u64 {
        netblk_protocol::geometry::ACTIVITY_REGION
    }
    /// How a node is named in messages.
    fn name(&self, node: usize) -> String {
        format!("node {node}")
    }
}

/// What a probe of a node found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub volume_id: String,
    pub incarnation: u64,
    pub durable_incarnation: u64,
}

/// The records over the network: one short connection per request (they
/// are rare: an attach, a member leaving).
pub struct NetRecords {
    pub addrs: Vec<SocketAddr>,
    pub layout: Layout,
    pub volume: String,
    /// The volume identity each node must hold (empty: any).
    pub volume_ids: Arc<crate::membership::Pins>,
    pub client_id: String,
    pub tls: Option<Arc<ClientTls>>,
    pub timeouts: Timeouts,
}

impl NetRecords {
    /// Where `node` is: where the device was mapped, or its replacement.
    fn addr(&self, node: usize) -> Result<SocketAddr, String> {
        match self.volume_ids.addr(node) {
            Some(addr) => Ok(addr),
            None => self
                .addrs
                .get(node)
                .copied()
                .ok_or_else(|| "no such node".into()),
        }
    }

    /// A connection to `node`, as the owner of `owner_epoch` (0: a tool).
    fn open(&self, node: usize, owner_epoch: u64) -> Result<(TcpStream, NodeInfo), String> {
        let addr = self.addr(node)?;
        let pin = self.volume_ids.get(node);
        let who = Identity {
            client_id: &self.client_id,
            volume: &self.volume,
            session: net::clock_session(),
            volume_id: pin.as_deref(),
            digest: false,
            tls: self.tls.as_deref(),
            owner_epoch,
        };
        net::connect(addr, node, &self.layout, &who, self.timeouts)
            .map_err(|e: ConnectError| e.to_string())
    }

    fn call(&self, node: usize, op: pb::request::Op) -> Result<pb::Reply, String> {
        self.call_as(node, 0, op)
    }

    /// One request on a short connection; Err unless it succeeded.
    fn call_as(
        &self,
        node: usize,
        owner_epoch: u64,
        op: pb::request::Op,
    ) -> Result<pb::Reply, String> {
        let (stream, _) = self.open(node, owner_epoch)?;
        net::call(&stream, 1, op, self.timeouts.io)
    }
}

/// `reply`'s status as a Result (its message when not OK).
fn succeeded(reply: pb::Reply, what: &str) -> Result<pb::Reply, String> {
    if reply.status == pb::Status::Ok as i32 {
        Ok(reply)
    } else {
        Err(format!("{what} failed: {}", reply.message))
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
            s if s == pb::Status::Conflict as i32 => Err(PutError::Conflict(Box::new(
                reply.record.unwrap_or_default(),
            ))),
            _ => Err(PutError::Failed(reply.message)),
        }
    }

    fn activity(&self, node: usize) -> Result<Vec<(u64, u64)>, String> {
        let (stream, _) = self.open(node, 0)?;
        let mut entries = Vec::new();
        let mut from = 0;
        for id in 1.. {
            let op = pb::request::Op::GetActivity(pb::GetActivity { from });
            let reply = succeeded(
                net::call(&stream, id, op, self.timeouts.io)?,
                "reading the activity log",
            )?;
            if reply.activity_regions.len() != reply.activity_seqs.len() {
                return Err(
                    "the activity log reply pairs regions and sequence numbers unevenly".into(),
                );
            }
            let last = reply.activity_regions.last().copied();
            entries.extend(reply.activity_regions.into_iter().zip(reply.activity_seqs));
            match last {
                Some(last) if reply.activity_more => from = last.saturating_add(1),
                _ => break,
            }
        }
        Ok(entries)
    }

    fn trim(&self, node: usize, owner_epoch: u64, entries: &[(u64, u64)]) -> Result<(), String> {
        let (stream, _) = self.open(node, owner_epoch)?;
        // A request takes at most a page.
        for (id, page) in (1..).zip(entries.chunks(netblk_protocol::geometry::ACTIVITY_PAGE)) {
            let (regions, seqs) = page.iter().copied().unzip();
            let op = pb::request::Op::TrimActivity(pb::TrimActivity { regions, seqs });
            succeeded(
                net::call(&stream, id, op, self.timeouts.io)?,
                "trimming the activity log",
            )?;
        }
        Ok(())
    }

    fn flush(&self, node: usize, owner_epoch: u64) -> Result<(), String> {
        let op = pb::request::Op::Flush(pb::Flush {});
        succeeded(self.call_as(node, owner_epoch, op)?, "flush").map(drop)
    }

    fn digest(&self, node: usize, offset: u64, length: u64) -> Result<u32, String> {
        let op = pb::request::Op::Digest(pb::Digest { offset, length });
        let reply = succeeded(self.call(node, op)?, "digest")?;
        reply
            .crc32c
            .ok_or_else(|| "the digest reply carries no crc32c".to_string())
    }

    fn copy(
        &self,
        owner_epoch: u64,
        from: usize,
        to: &[usize],
        ranges: &[(u64, u64)],
    ) -> Result<(), String> {
        let named = |node: usize, why: String| format!("{}: {why}", self.name(node));
        let (source, info) = self
            .open(from, owner_epoch)
            .map_err(|why| named(from, why))?;
        let mut chunk = info.max_io_size.clamp(4096, 1 << 20);
        let mut targets = Vec::with_capacity(to.len());
        for node in to {
            let (stream, info) = self
                .open(*node, owner_epoch)
                .map_err(|why| named(*node, why))?;
            chunk = chunk.min(info.max_io_size.max(4096));
            targets.push((*node, stream));
        }
        let mut id = 0u64;
        for (offset, len) in ranges {
            let mut done = 0u64;
            while done < *len {
                let length = (*len - done).min(u64::from(chunk)) as u32;
                let at = offset + done;
                id += 1;
                let read = pb::request::Op::Read(pb::Read { offset: at, length });
                let (reply, data) = net::exchange(&source, id, read, &[], length, self.timeouts.io)
                    .map_err(|why| named(from, why))?;
                succeeded(reply, "read").map_err(|why| named(from, why))?;
                if data.len() != length as usize {
                    return Err(named(
                        from,
                        format!("read {} bytes of {length}", data.len()),
                    ));
                }
                for (node, stream) in &targets {
                    let write = pb::request::Op::Write(pb::Write {
                        offset: at,
                        length,
                        fua: false,
                        crc32c: None,
                    });
                    let (reply, _) = net::exchange(stream, id, write, &data, 0, self.timeouts.io)
                        .map_err(|why| named(*node, why))?;
                    succeeded(reply, "write").map_err(|why| named(*node, why))?;
                }
                done += u64::from(length);
            }
        }
        for (node, stream) in &targets {
            id += 1;
            let reply = net::call(
                stream,
                id,
                pb::request::Op::Flush(pb::Flush {}),
                self.timeouts.io,
            )
            .map_err(|why| named(*node, why))?;
            succeeded(reply, "flush").map_err(|why| named(*node, why))?;
        }
        Ok(())
    }

    fn probe(&self, node: usize) -> Result<Probe, String> {
        let addr = self.addr(node)?;
        let who = Identity {
            client_id: &self.client_id,
            volume: &self.volume,
            session: net::clock_session(),
            volume_id: None,
            digest: false,
            tls: self.tls.as_deref(),
            owner_epoch: 0,
        };
        let (_, info) = net::connect(addr, node, &self.layout, &who, self.timeouts)
            .map_err(|e: ConnectError| e.to_string())?;
        Ok(Probe {
            volume_id: info.volume_id,
            incarnation: info.incarnation,
            durable_incarnation: info.durable_incarnation,
        })
    }

    fn missed(&self, node: usize, row: u32) -> Result<(Vec<u64>, u64), String> {
        let (stream, _) = self.open(node, 0)?;
        let mut regions = Vec::new();
        let mut from = 0;
        for id in 1.. {
            let op = pb::request::Op::GetMissed(pb::GetMissed { row, from });
            let reply = succeeded(
                net::call(&stream, id, op, self.timeouts.io)?,
                "reading the missed regions",
            )?;
            if reply.missed_since == 0 {
                return Ok((Vec::new(), 0));
            }
            let last = reply.missed_regions.last().copied();
            regions.extend(reply.missed_regions);
            match last {
                Some(last) if reply.missed_more => from = last.saturating_add(1),
                _ => return Ok((regions, reply.missed_since)),
            }
        }
        Err("the missed regions never ended".into())
    }

    fn name(&self, node: usize) -> String {
        match self.addr(node) {
            Ok(addr) => format!("node {node} ({addr})"),
            Err(_) => format!("node {node}"),
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
    /// The members' addresses, in node order, as this attach reaches them
    /// (stored in the record; empty: not recorded).
    pub members: Vec<String>,
    /// A planted bug for the simulator to find (never set outside tests):
    /// attach without reconciling.
    #[doc(hidden)]
    pub plant_no_reconcile: bool,
}

/// Why the addresses an attach was given are not the volume's any more:
/// the newest record that answered names another address for a member
/// (it was replaced).
fn replaced(records: &[Option<MembershipRecord>], given: &[String]) -> Option<String> {
    let newest = records.iter().flatten().max_by_key(|r| r.generation)?;
    if given.is_empty() || newest.members.len() != given.len() || newest.members == given {
        return None;
    }
    let moved: Vec<String> = newest
        .members
        .iter()
        .zip(given)
        .enumerate()
        .filter(|(_, (now, was))| !now.is_empty() && now != was)
        .map(|(n, (now, was))| format!("node {n} is {now}, not {was}"))
        .collect();
    if moved.is_empty() {
        return None;
    }
    Some(format!(
        "the volume's members were replaced (membership record generation {}): {}; map it with the nodes {}",
        newest.generation,
        moved.join("; "),
        newest.members.join(",")
    ))
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
    let (current, answers, forced_out) = loop {
        let answers = read_all(store, layout.node_count());
        let records: Vec<Option<MembershipRecord>> = answers
            .iter()
            .map(|a| a.as_ref().ok().map(|(r, _)| r.clone()))
            .collect();
        if let Some(why) = replaced(&records, &options.members) {
            return Err(why);
        }
        match replicas::attach(&records, &replication) {
            Ok(Attach::Fresh(r)) => break ((r, true), answers, Vec::new()),
            Ok(Attach::Current(r)) => break ((r, false), answers, Vec::new()),
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
                        // The members that did not answer leave the
                        // in-sync sets: nothing can be stored on them.
                        Some(r) => break ((r, false), answers, missing),
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
    let mut iss = record.clone();
    for node in &forced_out {
        match replicas::shrink(&iss, &replication, *node) {
            Some(shrunk) => iss = shrunk,
            None if !View::of_record(&iss)
                .in_sync(replication.column_of(*node), replication.row_of(*node)) => {}
            None => {
                return Err(format!(
                    "no member in sync of column {} answers ({} did not): cannot attach even degraded",
                    replication.column_of(*node),
                    store.name(*node)
                ));
            }
        }
    }
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
        iss: iss.iss,
        // A copy this attach did not start is started again (the nodes'
        // missed bitmaps still cover it: the row is not in sync).
        joining: Vec::new(),
        rebuild: Vec::new(),
        members: options.members.clone(),
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
    let clean = record.clean || fresh;
    tracing::info!(
        generation = next.generation,
        owner_epoch = next.owner_epoch,
        clean,
        iss = ?next.iss,
        "attached the replicated volume"
    );
    let membership = Membership::new(replication, View::of_record(&next));
    for node in &forced_out {
        tracing::warn!(
            node,
            generation = next.generation,
            "replica left the in-sync set: it did not answer the forced degraded attach"
        );
        membership.departed(
            *node,
            "did not answer at a --force-degraded attach",
            next.generation,
        );
    }
    // The older owners are fenced on every member in sync now: what they
    // left in flight is in the members' logs, and nothing adds to it.
    if !options.plant_no_reconcile
        && let Some(done) = reconcile::reconcile(store, layout, &next, clean)?
    {
        membership.set_reconciled(done);
    }
    Ok(Attached {
        membership,
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
    /// The highest generation tried (stored or not): a new change goes
    /// above it, never another record of a generation some node may hold.
    tried: u64,
    /// Trims the in-sync members' activity logs.
    pub trimmer: Trimmer,
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
            tried: attached.record.generation,
            trimmer: Trimmer::new(Instant::now(), crate::activity::TRIM_EVERY),
            plant_publish_before_store: false,
        }
    }

    /// The background work besides failures (trimming the activity logs),
    /// one step.
    pub fn tend(&mut self, m: &Membership, now: Instant) {
        self.trimmer.step(now, m, &*self.store, &self.layout);
    }

    /// The device stopped: stores the record again marked clean on every
    /// member in sync, so that the next attach need not reconcile. Only
    /// when no write is in flight (each was acknowledged by every member
    /// in sync, or failed) and no member waits to leave; otherwise the
    /// record stays unclean and the next attach reconciles.
    pub fn stop_cleanly(&mut self, m: &Membership) -> Result<(), String> {
        let view = m.view();
        let in_flight = m.writes.in_flight();
        if view.fenced || in_flight > 0 || self.pending.is_some() || !m.failed().is_empty() {
            return Err(format!(
                "not marked clean ({} writes in flight, {} members failing, fenced: {}): the next attach reconciles",
                in_flight,
                m.failed().len(),
                view.fenced
            ));
        }
        let mut next = self.record.clone();
        next.generation += 1;
        next.clean = true;
        let members = iss_nodes(&next, &self.layout);
        let mut failed = Vec::new();
        for (node, result) in put_all(&*self.store, &members, &self.known, &next) {
            match result {
                Ok(()) => self.known[node] = next.generation,
                Err(PutError::Conflict(held)) => failed.push(format!(
                    "{} holds generation {} (owner epoch {})",
                    self.store.name(node),
                    held.generation,
                    held.owner_epoch
                )),
                Err(PutError::Failed(why)) => {
                    failed.push(format!("{}: {why}", self.store.name(node)))
                }
            }
        }
        if failed.len() == members.len() {
            return Err(format!("cannot mark the stop clean: {}", failed.join("; ")));
        }
        // Stored on some members is enough: the record says something true
        // of the data whoever holds it (no member missed a write).
        self.record = next;
        for why in &failed {
            tracing::warn!(error = %why, "a member missed the clean mark");
        }
        tracing::info!(
            generation = self.record.generation,
            "stopped cleanly: the next attach need not reconcile"
        );
        Ok(())
    }

    /// The record this device serves from.
    pub fn record(&self) -> &MembershipRecord {
        &self.record
    }

    fn next_generation(&self) -> u64 {
        self.record.generation.max(self.tried) + 1
    }

    /// Member `node`, out of sync, joins its column (docs/resync.md): the
    /// record with it joining is stored on the column's in-sync members
    /// and published; from then on it takes the column's writes.
    pub fn join(&mut self, m: &Membership, node: usize, rebuild: bool) -> Result<(), String> {
        let mut next = replicas::join(&self.record, self.layout.replication(), node, rebuild)
            .ok_or("it is in sync or joining already")?;
        // A replacement: its address is the volume's from the join on.
        if let (Some(addr), Some(member)) = (m.pins.addr(node), next.members.get_mut(node)) {
            *member = addr.to_string();
        }
        self.change(m, next, node)
    }

    /// Joining member `node`, its copy done and durable, is in sync again.
    pub fn promote(&mut self, m: &Membership, node: usize) -> Result<(), String> {
        if m.is_failed(node) {
            return Err("it failed while it caught up".into());
        }
        let next = replicas::promote(&self.record, self.layout.replication(), node)
            .ok_or("it is not joining")?;
        self.change(m, next, node)
    }

    /// Stores `next`, a change of `node`'s column, and publishes it. Not
    /// while members wait to leave: their shrink comes first.
    fn change(
        &mut self,
        m: &Membership,
        mut next: MembershipRecord,
        node: usize,
    ) -> Result<(), String> {
        if m.view().fenced {
            return Err("the device is fenced".into());
        }
        if self.pending.is_some() || !m.failed().is_empty() {
            return Err("members are leaving: tried again later".into());
        }
        next.generation = self.next_generation();
        self.tried = next.generation;
        let column = self.layout.replication().column_of(node);
        match store_change(
            &*self.store,
            &self.layout,
            &mut self.known,
            &next,
            &[column],
        ) {
            Ok(()) => {
                tracing::info!(
                    node,
                    generation = next.generation,
                    iss = ?next.iss,
                    joining = ?next.joining,
                    "membership changed"
                );
                self.record = next;
                m.publish(View::of_record(&self.record));
                Ok(())
            }
            Err(Stored::Fenced(held)) => {
                fenced_by(m, &held);
                Err("the device is fenced".into())
            }
            Err(Stored::Retry(why)) => Err(why),
        }
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
                // A device that changes its members is serving: not clean.
                next.clean = false;
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
                next.generation = self.next_generation();
                self.tried = next.generation;
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
        match store_change(&*self.store, &self.layout, &mut self.known, &next, &changed) {
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
            Err(Stored::Fenced(held)) => {
                fenced_by(m, &held);
                return false;
            }
            Err(Stored::Retry(why)) => {
                tracing::warn!(error = %why, generation = next.generation, "cannot store the shrunk membership record yet; retrying");
                self.pending = Some((next, changed, leaving));
            }
        }
        true
    }
}

/// The manager of a device, shared by its thread and the daemon (which
/// marks a clean stop through it).
#[derive(Clone)]
pub struct ManagerHandle(Arc<Mutex<Manager>>);

impl std::fmt::Debug for ManagerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ManagerHandle")
    }
}

impl ManagerHandle {
    fn lock(&self) -> std::sync::MutexGuard<'_, Manager> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// See [`Manager::join`].
    pub fn join(&self, m: &Membership, node: usize, rebuild: bool) -> Result<(), String> {
        self.lock().join(m, node, rebuild)
    }

    /// See [`Manager::promote`].
    pub fn promote(&self, m: &Membership, node: usize) -> Result<(), String> {
        self.lock().promote(m, node)
    }

    /// See [`Manager::stop_cleanly`]; logs why not. Background copies
    /// end first.
    pub fn stop_cleanly(&self, m: &Membership) {
        m.stop();
        if let Err(why) = self.lock().stop_cleanly(m) {
            tracing::warn!("{why}");
        }
    }
}

/// Runs a [`Manager`] on a thread until the membership is dropped or the
/// device fenced: woken by every report, and once a second to retry and to
/// trim the activity logs.
pub fn spawn_manager(
    store: Box<dyn RecordStore>,
    layout: Layout,
    attached: &Attached,
) -> std::io::Result<ManagerHandle> {
    let weak: Weak<Membership> = Arc::downgrade(&attached.membership);
    let handle = ManagerHandle(Arc::new(Mutex::new(Manager::new(store, layout, attached))));
    let manager = handle.clone();
    std::thread::Builder::new()
        .name("netblk-members".into())
        .spawn(move || {
            while let Some(m) = weak.upgrade() {
                {
                    let mut manager = manager.lock();
                    if !manager.step(&m) {
                        return;
                    }
                    manager.tend(&m, Instant::now());
                }
                m.wait_report(Duration::from_secs(1));
            }
        })?;
    Ok(handle)
}

/// A newer owner's record (`held`) is on a member: the device's IO fails
/// from now on.
fn fenced_by(m: &Membership, held: &MembershipRecord) {
    tracing::error!(
        owner = %held.owner,
        owner_epoch = held.owner_epoch,
        "another owner took the volume over: this device is fenced, its IO fails"
    );
    m.fence();
}

/// Why a change was not stored.
enum Stored {
    /// A newer owner's record is on a member.
    Fenced(Box<MembershipRecord>),
    /// A member of a changed column did not take it (yet).
    Retry(String),
}

/// Stores `next` (a change of the `changed` columns: members leaving,
/// joining, or back in sync) on every in-sync member; Ok once every
/// in-sync member of those columns holds it.
fn store_change(
    store: &dyn RecordStore,
    layout: &Layout,
    known: &mut [u64],
    next: &MembershipRecord,
    changed: &[usize],
) -> Result<(), Stored> {
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
            Err(PutError::Conflict(held)) if *held == *next => Ok(()),
            // A node that missed one of our earlier records (or a joiner
            // that left under an earlier owner): ours again, over the one
            // it holds.
            Err(PutError::Conflict(held))
                if held.owner_epoch <= next.owner_epoch && held.generation < next.generation =>
            {
                known[n] = held.generation;
                store.put(n, held.generation, next)
            }
            other => other,
        };
        match result {
            Ok(()) => known[n] = next.generation,
            Err(PutError::Conflict(held)) if held.owner_epoch > next.owner_epoch => {
                return Err(Stored::Fenced(held));
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
        return Err(Stored::Retry(format!("{}: {why}", store.name(*n))));
    }
    for (n, why) in &missing {
        tracing::warn!(node = n, error = %why, generation = next.generation, "a member of another column missed the membership record; it gets the next one");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records kept in memory, every node reachable.
    #[derive(Clone, Default)]
    struct Memory(Arc<Mutex<Vec<MembershipRecord>>>);

    impl RecordStore for Memory {
        fn get(&self, node: usize) -> Result<(MembershipRecord, bool), String> {
            Ok((self.0.lock().expect("records")[node].clone(), false))
        }
        fn put(&self, node: usize, expected: u64, r: &MembershipRecord) -> Result<(), PutError> {
            let mut all = self.0.lock().expect("records");
            if all[node].generation != expected || r.generation <= expected {
                return Err(PutError::Conflict(Box::new(all[node].clone())));
            }
            all[node] = r.clone();
            Ok(())
        }
        fn activity(&self, _: usize) -> Result<Vec<(u64, u64)>, String> {
            Ok(Vec::new())
        }
        fn trim(&self, _: usize, _: u64, _: &[(u64, u64)]) -> Result<(), String> {
            Ok(())
        }
        fn flush(&self, _: usize, _: u64) -> Result<(), String> {
            Ok(())
        }
        fn copy(&self, _: u64, _: usize, _: &[usize], _: &[(u64, u64)]) -> Result<(), String> {
            Ok(())
        }
        fn digest(&self, _: usize, _: u64, _: u64) -> Result<u32, String> {
            Ok(0)
        }
        fn probe(&self, _: usize) -> Result<Probe, String> {
            Err("not probed".into())
        }
        fn missed(&self, _: usize, _: u32) -> Result<(Vec<u64>, u64), String> {
            Ok((Vec::new(), 0))
        }
    }

    #[test]
    fn a_stop_is_clean_only_without_writes_in_flight_and_a_later_change_is_not() {
        let layout = Layout::replicated(8 << 20, 65536, 4, 2).expect("2 columns x 2");
        let store = Memory(Arc::new(Mutex::new(vec![MembershipRecord::default(); 4])));
        let attached = attach(&store, &layout, &AttachOptions::default()).expect("attach");
        let m = Arc::clone(&attached.membership);
        let mut manager = Manager::new(Box::new(store.clone()), layout, &attached);
        let write = m.writes.enter();
        let refused = manager.stop_cleanly(&m).expect_err("a write in flight");
        assert!(refused.contains("1 writes in flight"), "{refused}");
        assert!(store.0.lock().expect("records").iter().all(|r| !r.clean));
        m.writes.leave(write);
        manager.stop_cleanly(&m).expect("clean");
        let stored = store.0.lock().expect("records").clone();
        assert!(
            stored.iter().all(|r| r.clean && r.generation == 2),
            "{stored:?}"
        );
        // The next attach finds it clean and serves unclean; a member that
        // fails afterwards leaves by an unclean record too.
        let attached = attach(&store, &layout, &AttachOptions::default()).expect("attach");
        assert!(!attached.record.clean);
        let m = Arc::clone(&attached.membership);
        let mut manager = Manager::new(Box::new(store.clone()), layout, &attached);
        manager.record.clean = true; // as after a clean stop of this daemon
        m.report(3, "test", Instant::now());
        assert!(manager.step(&m));
        let stored = store.0.lock().expect("records").clone();
        assert_eq!(stored[1].iss, vec![0b11, 0b01]);
        assert!(!stored[1].clean, "a shrink is never clean");
    }
}

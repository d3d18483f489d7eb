//! The node: listener, shared state (volumes, faults, counters), graceful
//! shutdown.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::thread;
use std::time::{Duration, Instant};

use netblk_protocol::pb;
use tracing::{error, info, warn};

use crate::activity::ActivityLog;
use crate::conn::{self, Delayed, Port};
use crate::delay::DelayQueue;
use crate::faults::Knobs;
use crate::fence::Sessions;
use crate::missed::Missed;
use crate::peer::Peer;
use crate::policy::{self, Policy};
use crate::reactor::{Incoming, Reactor};
use crate::store::{self, Backend, StoreKind, VolumeMeta};
use netblk_tls::config::ServerFiles;
use netblk_tls::rustls::ServerConfig;

/// Exit code of the crash fault: the node exits at once, flushing nothing.
pub const CRASH_EXIT_CODE: i32 = 86;

/// How a node is set up.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub store: StoreKind,
    /// Largest payload accepted per request, bytes.
    pub max_io_size: u32,
    /// Name sent in handshake replies.
    pub node_id: String,
    /// Faults in force from the start.
    pub faults: pb::Faults,
    pub fault_seed: u64,
    /// Where to accept admin connections (fault changes, statistics,
    /// crash: test tools), on a listener of their own; None: nowhere. The
    /// data port never takes them.
    pub admin_listen: Option<SocketAddr>,
    /// Mutual TLS on the data port: every client must present a
    /// certificate signed by the client CA before it can name a volume.
    pub tls: Option<Arc<netblk_tls::config::Reloading<ServerFiles, ServerConfig>>>,
    /// Which clients may open, resize and delete which volumes (read
    /// again when the file changes); None: every client may do everything.
    pub policy: Option<Arc<netblk_tls::config::Reloading<PathBuf, Policy>>>,
    /// How long shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
    /// How long a new connection may take to send its first frame.
    pub handshake_timeout: Duration,
    /// How long a reply may wait on a client that does not read.
    pub write_timeout: Duration,
    /// Fence a client's older sessions when a newer one connects (off only
    /// to demonstrate the hazard it prevents).
    pub fencing: bool,
    /// Hold writes in a volatile cache until FLUSH (see
    /// [`store::VolatileCache`]).
    pub volatile_cache: bool,
    /// Rules of docs/protocol.md this node breaks on purpose (to show that
    /// `netblk-node-check` finds each); empty outside such tests.
    pub broken: Vec<Broken>,
    /// Worker threads serving the data connections (at least 1).
    pub threads: usize,
    /// Unsent reply bytes above which a connection's requests wait until
    /// its client reads its replies (bounded memory per connection).
    pub reply_backlog: usize,
}

/// A rule a deliberately broken node breaks (`--broken`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Broken {
    /// Writes whose payload does not match their CRC-32C are applied.
    AcceptBadDigest,
    /// Every process states the same incarnation for a volume.
    SameIncarnation,
    /// Changes of connections below the stored owner epoch are applied.
    IgnoreOwnerEpoch,
    /// A connection that sent bad input is left open (read and ignored).
    KeepBadConnections,
    /// A flush is answered OK without making anything durable.
    AckFlushWithoutSync,
    /// A handshake of another revision is accepted.
    AcceptAnyRevision,
    /// A handshake with another layout (same size) is accepted.
    IgnoreLayout,
    /// PutRecord stores whatever it is given, whatever is stored.
    NoCompareAndSet,
    /// PutRecord stores records that cannot be the volume's.
    AcceptBadRecords,
    /// Changes are not logged in the activity log.
    NoActivityLog,
    /// Discard and write-zeroes answer OK and change nothing.
    DiscardKeepsData,
    /// A handshake of another protocol version is accepted.
    AnyVersion,
    /// An existing-only handshake may create the volume.
    CreateWhenExisting,
    /// A handshake with another size (same layout) is accepted.
    IgnoreSize,
    /// Each connection is told another incarnation.
    IncarnationPerConnection,
    /// Ping answers without its nonce.
    PingNoEcho,
    /// Resize answers OK and changes nothing.
    ResizeIgnored,
    /// Delete answers OK and keeps the volume.
    DeleteIgnored,
    /// Digest answers a CRC-32C off by one bit.
    WrongDigest,
    /// A read longer than max_io_size is served.
    NoReadLimit,
    /// Any volume name is taken (use with the memory store only).
    AnyName,
    /// A handshake without a layout gets a default one.
    DefaultLayout,
    /// The handshake reply names no node.
    NoNodeId,
    /// A successful write's reply carries a payload (a mis-framed reply).
    WriteReplyPayload,
    /// A header with a field the node does not know closes the connection.
    RejectUnknownFields,
    /// A new volume's size need not be a multiple of 512.
    OddSize,
    /// The 40th request of a connection is answered twice.
    DuplicateReply,
    /// A request beyond the capacity is answered INVALID, not OUT_OF_RANGE.
    RangesInvalid,
    /// A write not aligned to 4 KiB lands at its offset rounded down.
    UnalignedWrites,
    /// A FUA write stays in the volatile cache like any other.
    FuaWithoutSync,
    /// Changes are not added to the missed regions of rows out of sync.
    NoMissedRegions,
    /// An inquiry's volume description leaves out the stored record.
    DescribeNoRecord,
    /// A describe of a volume this node lacks creates it (one column,
    /// one copy, 64 KiB stripe units, 1 MiB).
    DescribeCreates,
    /// A zero-length read or write is refused as INVALID.
    ZeroLengthInvalid,
    /// A FUA write is refused as NOT_SUPPORTED.
    FuaUnsupported,
    /// A flush is refused as NOT_SUPPORTED.
    FlushUnsupported,
}

impl Config {
    pub fn new(listen: SocketAddr, store: StoreKind) -> Self {
        Config {
            listen,
            store,
            max_io_size: netblk_protocol::DEFAULT_MAX_PAYLOAD_LEN,
            node_id: String::new(),
            faults: pb::Faults::default(),
            fault_seed: 0,
            admin_listen: None,
            tls: None,
            policy: None,
            drain_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            fencing: true,
            volatile_cache: false,
            broken: Vec::new(),
            threads: default_threads(),
            reply_backlog: DEFAULT_REPLY_BACKLOG,
        }
    }
}

/// Unsent reply bytes a connection may pile up by default.
pub const DEFAULT_REPLY_BACKLOG: usize = 8 << 20;

/// Workers by default: one per CPU, at most 4 (a node's work per request
/// is small; more threads than CPUs only add switches).
pub fn default_threads() -> usize {
    thread::available_parallelism().map_or(2, |n| n.get().min(4))
}

/// One volume as this node holds it.
pub struct Volume {
    pub name: String,
    /// What it was created with, or last resized to.
    meta: Mutex<VolumeMeta>,
    pub lineage: store::Lineage,
    /// Bytes of the volume on this node; node offsets are below it.
    capacity: AtomicU64,
    /// Deleted: requests on connections still open to it fail.
    deleted: AtomicBool,
    /// The membership record (replicated volumes; generation 0: none).
    record: Mutex<pb::MembershipRecord>,
    /// The stored record's owner epoch: writes hold it shared while they
    /// check their connection's epoch and apply; a record that raises it
    /// takes it exclusively, so no older owner's write lands after it.
    owner_gate: RwLock<u64>,
    /// The rules this node breaks on purpose ([`Broken`]).
    broken: Vec<Broken>,
    /// Open data connections per owner epoch (see [`OwnerSeat`]).
    owners: Mutex<HashMap<u64, usize>>,
    /// Copies of every column (fixed at creation): with more than one,
    /// changes are logged (activity, missed).
    replicated: bool,
    /// Regions written since the owner trimmed them (replicated volumes).
    pub activity: ActivityLog,
    /// What the members out of this node's column missed.
    pub missed: Missed,
    pub backend: Box<dyn Backend>,
}

/// A data connection's place among a volume's owners: counted while it is
/// open, so that `GetRecord` can say whether the record's owner is alive.
pub struct OwnerSeat {
    volume: Arc<Volume>,
    epoch: u64,
}

impl Drop for OwnerSeat {
    fn drop(&mut self) {
        let mut owners = lock(&self.volume.owners);
        if let Some(n) = owners.get_mut(&self.epoch) {
            *n -= 1;
            if *n == 0 {
                owners.remove(&self.epoch);
            }
        }
    }
}

impl Volume {
    pub fn meta(&self) -> VolumeMeta {
        *lock(&self.meta)
    }

    /// The membership record stored (generation 0: none).
    pub fn record(&self) -> pb::MembershipRecord {
        lock(&self.record).clone()
    }

    /// Whether data connections at the stored record's owner epoch are
    /// open (its owner looks alive).
    pub fn owner_connected(&self) -> bool {
        let epoch = lock(&self.record).owner_epoch;
        epoch > 0 && lock(&self.owners).get(&epoch).is_some_and(|n| *n > 0)
    }

    /// Counts a data connection at owner epoch `epoch` (nonzero) until the
    /// seat is dropped; refused if a newer owner took over.
    pub fn seat(self: &Arc<Self>, epoch: u64) -> Result<OwnerSeat, String> {
        let record = lock(&self.record);
        if epoch < record.owner_epoch {
            return Err(format!(
                "volume '{}' has a newer owner ({}, owner epoch {}) than this client (owner epoch {epoch}): it was fenced",
                self.name, record.owner, record.owner_epoch
            ));
        }
        *lock(&self.owners).entry(epoch).or_default() += 1;
        Ok(OwnerSeat {
            volume: Arc::clone(self),
            epoch,
        })
    }

    /// Lets a write of a connection at owner epoch `epoch` (0: none) apply
    /// while the guard is held; refused once a record of a newer owner is
    /// stored.
    pub fn admit_write(&self, epoch: u64) -> Result<RwLockReadGuard<'_, u64>, String> {
        let gate = self.owner_gate.read().unwrap_or_else(|e| e.into_inner());
        if epoch < *gate && !self.breaks(Broken::IgnoreOwnerEpoch) {
            return Err(format!(
                "fenced: a newer owner (owner epoch {}) holds volume '{}', this connection has {epoch}",
                *gate, self.name
            ));
        }
        Ok(gate)
    }

    /// Compare-and-set of the membership record: stored (durably, before
    /// it is the record served) only if the stored generation is
    /// `expected` and `record`'s is above it; otherwise the stored record
    /// comes back. A record that raises the owner epoch waits for the
    /// writes of older owners executing now, and refuses later ones; any
    /// other record is stored while writes go on (a member leaving must
    /// not stall the column's other members for a store's fsyncs).
    pub fn put_record(
        &self,
        expected: u64,
        record: pb::MembershipRecord,
    ) -> Result<(), RecordError> {
        let meta = self.meta();
        if !self.breaks(Broken::AcceptBadRecords) {
            check_record(&record, meta.replicas).map_err(RecordError::Invalid)?;
        }
        let mut stored = lock(&self.record);
        if (stored.generation != expected || record.generation <= expected)
            && !self.breaks(Broken::NoCompareAndSet)
        {
            return Err(RecordError::Conflict(Box::new(stored.clone())));
        }
        let fence = (record.owner_epoch > stored.owner_epoch)
            .then(|| self.owner_gate.write().unwrap_or_else(|e| e.into_inner()));
        self.backend
            .store_record(&prost::Message::encode_to_vec(&record))
            .map_err(|err| RecordError::Store(err.to_string()))?;
        if let Some(mut gate) = fence {
            *gate = (*gate).max(record.owner_epoch);
        }
        if self.missed.on_record(
            &record,
            meta.node_index,
            meta.replica_index,
            meta.replicas,
            || self.activity.regions(),
        ) && let Err(err) = self.missed.persist(&*self.backend)
        {
            // Lost at a restart: those rows are then rebuilt in full.
            warn!(volume = %self.name, error = %err, "cannot store the missed bitmaps");
        }
        info!(
            volume = %self.name,
            generation = record.generation,
            owner_epoch = record.owner_epoch,
            "membership record stored"
        );
        *stored = record;
        Ok(())
    }

    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    /// Whether this node breaks `rule` on purpose.
    pub fn breaks(&self, rule: Broken) -> bool {
        self.broken.contains(&rule)
    }

    /// Logs a change of `len` bytes at `offset` in the activity log before
    /// it is applied (replicated volumes; nothing for one replica).
    pub fn note_change(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.replicated && !self.breaks(Broken::NoActivityLog) {
            self.activity.touch(&*self.backend, offset, len)?;
        }
        if self.replicated && !self.breaks(Broken::NoMissedRegions) {
            self.missed.touch(offset, len);
        }
        Ok(())
    }

    pub fn deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }
}

/// Counters behind [`pb::Stats`].
#[derive(Default)]
pub struct Counters {
    pub connections_accepted: AtomicU64,
    pub connections_refused: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub requests: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub injected_errors: AtomicU64,
    pub dropped_connections: AtomicU64,
    pub corrupted_replies: AtomicU64,
    /// Writes refused because their payload and crc32c differ.
    pub digest_errors: AtomicU64,
    pub corrupted_writes: AtomicU64,
    /// Operations the policy refused.
    pub policy_refusals: AtomicU64,
    /// Bytes received on client connections (frames, payloads included).
    pub wire_in: AtomicU64,
    /// Reply bytes sent on data connections (heads and payloads).
    pub wire_out: AtomicU64,
    /// Replies by operation ([`OPS`]) and status (its protobuf number).
    pub replies: [[AtomicU64; STATUSES]; OPS.len()],
}

/// Operation names (metric labels) by their index in [`Counters::replies`].
pub const OPS: [&str; 6] = ["read", "write", "flush", "discard", "write_zeroes", "ping"];
/// Status numbers counted (0 = ok, the rest as in `netblk.v1.Status`).
pub const STATUSES: usize = 16;

impl Counters {
    /// Counts one reply to `request`.
    pub fn reply(&self, request: &pb::Request, reply: &pb::Reply) {
        use pb::request::Op;
        let op = match &request.op {
            Some(Op::Read(_)) => 0,
            Some(Op::Write(_)) => 1,
            Some(Op::Flush(_)) => 2,
            Some(Op::Discard(_)) => 3,
            Some(Op::WriteZeroes(_)) => 4,
            Some(
                Op::Ping(_)
                | Op::Resize(_)
                | Op::Delete(_)
                | Op::GetRecord(_)
                | Op::PutRecord(_)
                | Op::GetActivity(_)
                | Op::TrimActivity(_)
                | Op::Digest(_)
                | Op::GetMissed(_),
            )
            | None => 5,
        };
        let status = usize::try_from(reply.status).unwrap_or(0).min(STATUSES - 1);
        bump(&self.replies[op][status], 1);
    }
}

pub(crate) fn bump(counter: &AtomicU64, by: u64) -> u64 {
    counter.fetch_add(by, Ordering::Relaxed) + by
}

/// State shared by every connection of a node.
pub struct Node {
    pub config: Config,
    pub local_addr: SocketAddr,
    /// The admin listener's address, if there is one.
    pub admin_addr: Option<SocketAddr>,
    pub limits: netblk_protocol::Limits,
    pub faults: Knobs,
    pub counters: Counters,
    pub delayed: DelayQueue<Delayed>,
    pub sessions: Sessions,
    volumes: Mutex<HashMap<String, Arc<Volume>>>,
    open: Mutex<HashMap<u64, TcpStream>>,
    next_conn: AtomicU64,
    stopping: AtomicBool,
    /// Handles on the listening sockets, shut down to wake their accept
    /// loops when the node stops.
    listeners: Vec<TcpListener>,
}

/// Why a membership record was not stored.
#[derive(Debug)]
pub enum RecordError {
    /// The compare-and-set lost: the record stored now.
    Conflict(Box<pb::MembershipRecord>),
    /// The store could not keep it.
    Store(String),
    /// It is not a record this volume can have (why).
    Invalid(String),
}

/// What a membership record must be to be stored: its per-column lists of
/// one length (`joining` and `rebuild` may be empty: a record of a client
/// before them), every mask within the volume's `replicas` rows, a
/// joining member never in sync, a rebuilt member always joining, and the
/// members' addresses, if named, one per row of every column.
pub fn check_record(record: &pb::MembershipRecord, replicas: u32) -> Result<(), String> {
    let columns = record.iss.len();
    for (name, list) in [("joining", &record.joining), ("rebuild", &record.rebuild)] {
        if !list.is_empty() && list.len() != columns {
            return Err(format!(
                "'{name}' names {} columns, 'iss' {columns}",
                list.len()
            ));
        }
    }
    let rows = replicas.clamp(1, 32);
    let within = |mask: u32| rows == 32 || mask >> rows == 0;
    for column in 0..columns {
        let iss = record.iss[column];
        let joining = record.joining.get(column).copied().unwrap_or(0);
        let rebuild = record.rebuild.get(column).copied().unwrap_or(0);
        if !within(iss) || !within(joining) || !within(rebuild) {
            return Err(format!(
                "column {column} names a row beyond the volume's {rows} replicas"
            ));
        }
        if iss & joining != 0 {
            return Err(format!("column {column}: a row both in sync and joining"));
        }
        if rebuild & !joining != 0 {
            return Err(format!("column {column}: a row rebuilt but not joining"));
        }
    }
    if !record.members.is_empty() && record.members.len() != columns * rows as usize {
        return Err(format!(
            "{} members named for {columns} columns of {rows} replicas",
            record.members.len()
        ));
    }
    Ok(())
}

/// The membership record a store kept for a volume (none: generation 0).
fn load_record(backend: &dyn Backend) -> io::Result<pb::MembershipRecord> {
    match backend.load_record()? {
        None => Ok(pb::MembershipRecord::default()),
        Some(bytes) => {
            <pb::MembershipRecord as prost::Message>::decode(bytes.as_slice()).map_err(|err| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("membership record: {err}"),
                )
            })
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Node {
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// The number the next accepted connection will get.
    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.load(Ordering::Relaxed)
    }

    /// The volume `name`, created on first use. Refuses (with a message for
    /// the client) a size or layout different from what it was created with;
    /// `at_least` accepts a volume grown past the wanted size.
    pub fn volume(
        &self,
        name: &str,
        wanted: VolumeMeta,
        at_least: bool,
    ) -> Result<Arc<Volume>, String> {
        let mut volumes = lock(&self.volumes);
        let volume = match volumes.get(name) {
            Some(volume) => Arc::clone(volume),
            None => {
                let (mut backend, meta, mut lineage) =
                    store::open_or_create(&self.config.store, name, wanted)
                        .map_err(|err| format!("cannot open volume '{name}': {err}"))?;
                if self.config.volatile_cache {
                    backend = Box::new(store::VolatileCache::new(backend, meta.capacity()));
                    // What an earlier process held in its cache is gone.
                    lineage.durable_incarnation = 0;
                }
                if self.config.broken.contains(&Broken::SameIncarnation) {
                    lineage.incarnation = 1;
                    lineage.durable_incarnation = 0;
                }
                info!(
                    volume = name,
                    id = lineage.id,
                    incarnation = lineage.incarnation,
                    durable_incarnation = lineage.durable_incarnation,
                    "volume incarnation"
                );
                let record = load_record(&*backend)
                    .map_err(|err| format!("cannot open volume '{name}': {err}"))?;
                let activity = ActivityLog::load(&*backend)
                    .map_err(|err| format!("cannot open volume '{name}': activity log: {err}"))?;
                let missed = Missed::load(&*backend, &activity.regions())
                    .map_err(|err| format!("cannot open volume '{name}': missed bitmaps: {err}"))?;
                let volume = Arc::new(Volume {
                    name: name.to_owned(),
                    meta: Mutex::new(meta),
                    lineage,
                    capacity: AtomicU64::new(meta.capacity()),
                    deleted: AtomicBool::new(false),
                    owner_gate: RwLock::new(record.owner_epoch),
                    broken: self.config.broken.clone(),
                    owners: Mutex::new(HashMap::new()),
                    record: Mutex::new(record),
                    replicated: meta.replicas > 1,
                    activity,
                    missed,
                    backend,
                });
                volumes.insert(name.to_owned(), Arc::clone(&volume));
                info!(volume = name, %meta, "volume opened");
                volume
            }
        };
        let meta = volume.meta();
        let grown = VolumeMeta {
            volume_size: wanted.volume_size.max(meta.volume_size),
            ..wanted
        };
        let same_size = meta.volume_size == wanted.volume_size;
        let same_layout = VolumeMeta {
            volume_size: meta.volume_size,
            ..wanted
        } == meta;
        if meta != wanted
            && !(at_least && meta == grown)
            && !(same_size && self.breaks(Broken::IgnoreLayout))
            && !(same_layout && self.breaks(Broken::IgnoreSize))
        {
            return Err(format!(
                "volume '{name}' exists with {meta}; this client asked for {wanted}: refusing, a different layout would scramble data"
            ));
        }
        Ok(volume)
    }

    /// The volume `name` if it exists (open, or held by the store), with
    /// this node's `layout`; `size` 0 takes its size, another must match
    /// (or, `at_least`, be no larger). Never creates one.
    pub fn existing_volume(
        &self,
        name: &str,
        layout: &pb::Layout,
        size: u64,
        at_least: bool,
    ) -> Result<Arc<Volume>, (pb::Status, String)> {
        let meta = self.held_meta(name)?;
        let size = if size == 0 { meta.volume_size } else { size };
        self.volume(name, VolumeMeta::from_handshake(size, layout), at_least)
            .map_err(|why| (pb::Status::Refused, why))
    }

    /// Whether the policy lets `peer` do `op` to `volume` (everything
    /// without a policy). A refusal is logged and counted, and its
    /// message names the client and the operation.
    pub fn authorize(&self, peer: &Peer, volume: &str, op: policy::Op) -> Result<(), String> {
        if self.may(peer, volume, op) {
            return Ok(());
        }
        bump(&self.counters.policy_refusals, 1);
        warn!(identity = %peer, volume, %op, "refused by the policy");
        Err(format!(
            "the node's policy does not let {peer} {op} volume '{volume}'"
        ))
    }

    /// The size and layout of volume `name` as this node holds it (open,
    /// or in its store): NOT_FOUND if it holds none.
    fn held_meta(&self, name: &str) -> Result<VolumeMeta, (pb::Status, String)> {
        if let Some(open) = lock(&self.volumes).get(name) {
            return Ok(open.meta());
        }
        match store::stored_meta(&self.config.store, name) {
            Ok(Some(meta)) => Ok(meta),
            Ok(None) => Err((
                pb::Status::NotFound,
                format!("no volume '{name}' on this node"),
            )),
            Err(err) => Err((
                pb::Status::IoError,
                format!("cannot read volume '{name}': {err}"),
            )),
        }
    }

    /// Whether the policy lets `peer` do `op` to `volume`, asked without
    /// counting or logging a refusal (what a listing leaves out).
    pub fn may(&self, peer: &Peer, volume: &str, op: policy::Op) -> bool {
        self.config
            .policy
            .as_ref()
            .is_none_or(|policy| policy.get().allows(peer, volume, op))
    }

    /// The names of every volume this node holds: open ones and, with a
    /// directory store, stored ones; in name order.
    pub fn volume_names(&self) -> Result<Vec<String>, String> {
        let mut names: std::collections::BTreeSet<String> =
            lock(&self.volumes).keys().cloned().collect();
        names.extend(
            store::stored_names(&self.config.store)
                .map_err(|err| format!("cannot list the stored volumes: {err}"))?,
        );
        Ok(names.into_iter().collect())
    }

    /// The volume `name` as this node holds it, opened from its store if it
    /// is not open yet (never created): NOT_FOUND if there is none.
    pub fn describe(&self, name: &str) -> Result<pb::VolumeDescription, (pb::Status, String)> {
        let meta = self.held_meta(name)?;
        // Open already with that very meta, or opened from the store.
        let volume = self
            .volume(name, meta, false)
            .map_err(|why| (pb::Status::IoError, why))?;
        Ok(pb::VolumeDescription {
            volume: name.to_owned(),
            volume_size: meta.volume_size,
            layout: Some(meta.layout()),
            volume_id: volume.lineage.id.clone(),
            record: (!self.breaks(Broken::DescribeNoRecord)).then(|| volume.record()),
        })
    }

    /// Whether this node breaks `rule` on purpose (`--broken`).
    pub fn breaks(&self, rule: Broken) -> bool {
        self.config.broken.contains(&rule)
    }

    /// Deletes `volume` and its data; connections still open to it fail
    /// from now on, and a later handshake that may create makes a new one.
    pub fn delete(&self, volume: &Volume) -> Result<(), String> {
        if self.breaks(Broken::DeleteIgnored) {
            return Ok(());
        }
        let mut volumes = lock(&self.volumes);
        volume.deleted.store(true, Ordering::Release);
        if volumes
            .get(&volume.name)
            .is_some_and(|v| std::ptr::eq(Arc::as_ptr(v), volume))
        {
            volumes.remove(&volume.name);
        }
        volume
            .backend
            .destroy()
            .map_err(|err| format!("deleting volume '{}' failed: {err}", volume.name))?;
        info!(volume = %volume.name, "volume deleted");
        Ok(())
    }

    /// Resizes `volume` to `size` bytes in all (its layout unchanged): the
    /// store first, then what requests are checked against. Serialized with
    /// handshakes, which compare against the size.
    pub fn resize(&self, volume: &Volume, size: u64) -> Result<(), String> {
        if self.breaks(Broken::ResizeIgnored) {
            return Ok(());
        }
        let _volumes = lock(&self.volumes);
        let mut meta = lock(&volume.meta);
        let old = *meta;
        let new = VolumeMeta {
            volume_size: size,
            ..old
        };
        netblk_protocol::geometry::check_layout(size, &new.layout()).map_err(|why| {
            format!(
                "cannot resize volume '{}' to {size} bytes: {why}",
                volume.name
            )
        })?;
        volume
            .backend
            .resize(&old, &new)
            .map_err(|err| format!("resizing volume '{}' failed: {err}", volume.name))?;
        *meta = new;
        volume.capacity.store(new.capacity(), Ordering::Release);
        info!(volume = %volume.name, from = old.volume_size, to = size, "volume resized");
        Ok(())
    }

    pub fn stats(&self) -> pb::Stats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let volumes = lock(&self.volumes);
        pb::Stats {
            connections_accepted: get(&c.connections_accepted),
            connections_open: lock(&self.open).len() as u64,
            connections_refused: get(&c.connections_refused),
            protocol_errors: get(&c.protocol_errors),
            requests: get(&c.requests),
            bytes_read: get(&c.bytes_read),
            bytes_written: get(&c.bytes_written),
            injected_errors: get(&c.injected_errors),
            dropped_connections: get(&c.dropped_connections),
            corrupted_replies: get(&c.corrupted_replies),
            digest_errors: get(&c.digest_errors),
            corrupted_writes: get(&c.corrupted_writes),
            policy_refusals: get(&c.policy_refusals),
            wire_in_bytes: get(&c.wire_in),
            wire_out_bytes: get(&c.wire_out),
            volumes: volumes.len() as u64,
            stored_bytes: volumes.values().map(|v| v.backend.stored_bytes()).sum(),
        }
    }

    /// The crash fault: exit now, no flush, no goodbye.
    pub fn crash(&self, why: &str) -> ! {
        error!("crashing on purpose: {why}");
        std::process::exit(CRASH_EXIT_CODE)
    }

    fn register(&self, stream: &TcpStream) -> io::Result<u64> {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        lock(&self.open).insert(id, stream.try_clone()?);
        Ok(id)
    }

    pub fn unregister(&self, id: u64) {
        lock(&self.open).remove(&id);
    }

    fn begin_shutdown(&self) {
        if self.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        info!("shutting down: no new connections, finishing in-flight requests");
        self.faults.wake();
        self.delayed.wake();
        // Readers see end-of-stream and stop taking requests; replies still go out.
        for stream in lock(&self.open).values() {
            let _ = stream.shutdown(Shutdown::Read);
        }
        // Wake the accept loops: a listening socket shut down fails its
        // accept at once. (Not a connection to ourselves: the listening
        // address need not be reachable from here, as in a network
        // namespace whose loopback is down.)
        for listener in &self.listeners {
            shutdown_listener(listener);
        }
    }

    fn wait_connections_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let open = lock(&self.open).len();
            if open == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                warn!(open, "drain timeout passed with connections still open");
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn flush_all(&self) -> io::Result<()> {
        let volumes: Vec<Arc<Volume>> = lock(&self.volumes).values().cloned().collect();
        for volume in volumes {
            volume.backend.flush().map_err(|err| {
                io::Error::new(
                    err.kind(),
                    format!("flushing volume '{}': {err}", volume.name),
                )
            })?;
        }
        Ok(())
    }
}

/// Shuts a listening socket down: an `accept` waiting on it (in any
/// thread) returns an error, and so does every later one.
fn shutdown_listener(listener: &TcpListener) {
    // SAFETY: shutdown(2) on a descriptor `listener` owns and keeps open;
    // it touches no memory.
    let rc = unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
    if rc != 0 {
        warn!(
            "cannot wake the accept loop: {}",
            io::Error::last_os_error()
        );
    }
}

/// Asks a running [`Server`] to shut down gracefully. Cheap to clone.
#[derive(Clone)]
pub struct ShutdownHandle(Arc<Node>);

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.0.begin_shutdown();
    }
}

/// A bound node, ready to [`Server::run`].
pub struct Server {
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    node: Arc<Node>,
}

impl Server {
    pub fn bind(mut config: Config) -> io::Result<Server> {
        if let StoreKind::Dir(dir) = &config.store {
            std::fs::create_dir_all(dir).map_err(|err| {
                io::Error::new(
                    err.kind(),
                    format!("store directory {}: {err}", dir.display()),
                )
            })?;
        }
        let listener = TcpListener::bind(config.listen).map_err(|err| {
            io::Error::new(err.kind(), format!("listen on {}: {err}", config.listen))
        })?;
        let local_addr = listener.local_addr()?;
        let admin_listener = config
            .admin_listen
            .map(|addr| {
                TcpListener::bind(addr).map_err(|err| {
                    io::Error::new(err.kind(), format!("admin listen on {addr}: {err}"))
                })
            })
            .transpose()?;
        let admin_addr = admin_listener
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()?;
        if config.node_id.is_empty() {
            config.node_id = format!("mock-{local_addr}");
        }
        let listeners = std::iter::once(&listener)
            .chain(admin_listener.as_ref())
            .map(TcpListener::try_clone)
            .collect::<io::Result<Vec<_>>>()?;
        let node = Node {
            listeners,
            limits: netblk_protocol::Limits {
                max_payload_len: config.max_io_size,
                // Until a handshake asks for digests.
                header_digest: false,
            },
            faults: Knobs::new(config.faults, config.fault_seed),
            config,
            local_addr,
            admin_addr,
            counters: Counters::default(),
            delayed: DelayQueue::new(),
            sessions: Sessions::default(),
            volumes: Mutex::default(),
            open: Mutex::default(),
            next_conn: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
        };
        Ok(Server {
            listener,
            admin_listener,
            node: Arc::new(node),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.node.local_addr
    }

    /// Where admin connections are accepted, if anywhere.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.node.admin_addr
    }

    /// Serves the node's figures at `http://addr/metrics`; the address bound.
    pub fn serve_metrics(&self, addr: SocketAddr) -> Result<SocketAddr, String> {
        let node = Arc::clone(&self.node);
        netblk_observe::endpoint::serve(addr, move || collect_metrics(&node))
    }

    #[cfg(test)]
    pub(crate) fn node(&self) -> &Node {
        &self.node
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(Arc::clone(&self.node))
    }

    /// Serves until shut down, then finishes in-flight requests (bounded by
    /// the drain timeout) and flushes every volume.
    pub fn run(self) -> io::Result<()> {
        let node = self.node;
        let reactor = Reactor::start(&node, node.config.threads)?;
        let delay_node = Arc::clone(&node);
        let delay_thread = thread::Builder::new()
            .name("delayed".into())
            .spawn(move || conn::run_delayed(&delay_node))?;
        if let Some(admin) = self.admin_listener {
            let admin_node = Arc::clone(&node);
            thread::Builder::new()
                .name("admin-accept".into())
                .spawn(move || accept(&admin_node, admin, Port::Admin, None))?;
        }
        accept(&node, self.listener, Port::Data, Some(Arc::new(reactor)));
        if node.wait_connections_closed(node.config.drain_timeout) {
            node.delayed.wake();
            if delay_thread.join().is_err() {
                error!("delayed-request thread panicked");
            }
        }
        node.flush_all()?;
        info!("stopped cleanly");
        Ok(())
    }
}

/// The plaintext stream of a new connection and who its client is: the
/// connection itself and an anonymous client, or, with TLS on the data
/// port, the plaintext end of its relay and the identity its certificate
/// names, once the certificate passed (None: refused, logged and counted;
/// not a byte of a volume was touched).
fn secure(
    node: &Node,
    stream: TcpStream,
    port: Port,
    peer: SocketAddr,
) -> Option<(TcpStream, Peer)> {
    let Some(tls) = node.config.tls.as_ref().filter(|_| port == Port::Data) else {
        return Some((stream, Peer::Anonymous));
    };
    let timeout = Some(node.config.handshake_timeout);
    let shaken = stream
        .set_read_timeout(timeout)
        .and_then(|()| stream.set_write_timeout(timeout))
        .map_err(|e| e.to_string())
        .and_then(|()| netblk_tls::handshake::server(&stream, tls.get()))
        .and_then(|conn| netblk_tls::identity::of_peer(&conn).map(|id| (conn, id)));
    let (conn, identity) = match shaken {
        Ok(shaken) => shaken,
        Err(why) => {
            bump(&node.counters.connections_refused, 1);
            warn!(%peer, "TLS refused: {why}");
            return None;
        }
    };
    // The node's side always relays in userspace: rustls may already hold
    // the client's first request, which the kernel's TLS would not see.
    match netblk_tls::secure(stream, conn.into(), false) {
        Ok((plain, _)) => Some((plain, Peer::Certified(identity))),
        Err(err) => {
            warn!(%peer, "cannot relay a TLS connection: {err}");
            None
        }
    }
}

/// Takes connections on `listener` for `port` until the node stops: data
/// connections go to the workers of `reactor` (after their TLS handshake,
/// which runs on a short-lived thread of its own), admin connections each
/// get a thread.
fn accept(node: &Arc<Node>, listener: TcpListener, port: Port, reactor: Option<Arc<Reactor>>) {
    for stream in listener.incoming() {
        if node.stopping() {
            break;
        }
        let stream = match stream {
            Ok(stream) => stream,
            Err(err) => {
                // Out of descriptors or memory: back off instead of spinning.
                warn!("accept failed: {err}");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        bump(&node.counters.connections_accepted, 1);
        let peer = stream
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let start = {
            let node = Arc::clone(node);
            let reactor = reactor.clone();
            move || {
                let Some((stream, client)) = secure(&node, stream, port, peer) else {
                    return;
                };
                let id = match node.register(&stream) {
                    Ok(id) => id,
                    Err(err) => {
                        warn!("cannot track new connection: {err}");
                        return;
                    }
                };
                match reactor {
                    Some(reactor) => reactor.add(Incoming {
                        stream,
                        id,
                        peer,
                        client,
                    }),
                    None => conn::serve_admin_conn(node, stream, id, peer),
                }
            }
        };
        if port == Port::Data && node.config.tls.is_none() {
            start();
            continue;
        }
        let spawned = thread::Builder::new()
            .name(format!("conn-{peer}"))
            .spawn(start);
        if let Err(err) = spawned {
            warn!("cannot start a thread for a new connection: {err}");
        }
    }
}

/// Pushes the node's counters into the `metrics` facade (when `/metrics`
/// is scraped): requests by operation and status, bytes, connections,
/// fenced sessions, protocol errors and injected faults.
fn collect_metrics(node: &Node) {
    let stats = node.stats();
    for (op, by_status) in OPS.iter().zip(&node.counters.replies) {
        for (status, count) in by_status.iter().enumerate() {
            let count = count.load(Ordering::Relaxed);
            if count == 0 {
                continue;
            }
            let name = pb::Status::try_from(status as i32).map_or_else(
                |_| format!("status_{status}"),
                |s| {
                    let name = s.as_str_name();
                    name.strip_prefix("STATUS_").unwrap_or(name).to_lowercase()
                },
            );
            metrics::counter!("netblk_mock_requests_total", "op" => *op, "status" => name)
                .absolute(count);
        }
    }
    metrics::counter!("netblk_mock_read_bytes_total").absolute(stats.bytes_read);
    metrics::counter!("netblk_mock_written_bytes_total").absolute(stats.bytes_written);
    metrics::counter!("netblk_mock_wire_received_bytes_total").absolute(stats.wire_in_bytes);
    metrics::counter!("netblk_mock_wire_sent_bytes_total").absolute(stats.wire_out_bytes);
    metrics::counter!("netblk_mock_connections_accepted_total")
        .absolute(stats.connections_accepted);
    metrics::gauge!("netblk_mock_connections_open").set(stats.connections_open as f64);
    metrics::counter!("netblk_mock_handshakes_refused_total").absolute(stats.connections_refused);
    metrics::counter!("netblk_mock_fenced_sessions_total").absolute(node.sessions.fenced());
    metrics::counter!("netblk_mock_protocol_errors_total").absolute(stats.protocol_errors);
    metrics::counter!("netblk_mock_policy_refusals_total").absolute(stats.policy_refusals);
    for (fault, count) in [
        ("error", stats.injected_errors),
        ("drop", stats.dropped_connections),
        ("corrupt", stats.corrupted_replies),
        ("corrupt_write", stats.corrupted_writes),
    ] {
        metrics::counter!("netblk_mock_injected_faults_total", "fault" => fault).absolute(count);
    }
    metrics::counter!("netblk_mock_digest_errors_total").absolute(stats.digest_errors);
    metrics::gauge!("netblk_mock_volumes").set(stats.volumes as f64);
    metrics::gauge!("netblk_mock_stored_bytes").set(stats.stored_bytes as f64);
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    fn record(generation: u64, owner_epoch: u64, iss: u32) -> pb::MembershipRecord {
        pb::MembershipRecord {
            generation,
            owner_epoch,
            iss: vec![iss],
            ..Default::default()
        }
    }

    /// Stores `record` over `expected` on another thread; the receiver
    /// hears when it is stored.
    fn put_later(
        volume: &Arc<Volume>,
        expected: u64,
        record: pb::MembershipRecord,
    ) -> mpsc::Receiver<bool> {
        let (tx, rx) = mpsc::channel();
        let volume = Arc::clone(volume);
        std::thread::spawn(move || {
            let _ = tx.send(volume.put_record(expected, record).is_ok());
        });
        rx
    }

    #[test]
    fn only_a_record_of_a_newer_owner_waits_for_the_writes_executing() {
        let server = Server::bind(Config::new(
            "127.0.0.1:0".parse().expect("addr"),
            StoreKind::Memory,
        ))
        .expect("bind");
        let volume = server
            .node
            .volume("v", VolumeMeta::one_column(2), false)
            .expect("volume");
        volume.put_record(0, record(1, 1, 0b11)).expect("first");
        // A write of owner 1 is being applied.
        let write = volume.admit_write(1).expect("admitted");
        // The owner takes row 1 out: stored at once, the write goes on.
        let shrink = put_later(&volume, 1, record(2, 1, 0b01));
        assert_eq!(
            shrink.recv_timeout(Duration::from_secs(5)),
            Ok(true),
            "a shrink waited for a write executing"
        );
        // A newer owner waits until the write is done, then fences owner 1.
        let takeover = put_later(&volume, 2, record(3, 2, 0b01));
        assert!(
            takeover.recv_timeout(Duration::from_millis(300)).is_err(),
            "a newer owner's record did not wait for the older owner's write"
        );
        drop(write);
        assert_eq!(takeover.recv_timeout(Duration::from_secs(5)), Ok(true));
        assert!(volume.admit_write(1).is_err(), "owner 1 is fenced");
        assert!(volume.admit_write(2).is_ok());
    }
}

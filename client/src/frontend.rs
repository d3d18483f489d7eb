//! The in-process frontend: a striped volume as a library handle, driving the
//! same engine, queues, tags and registered buffers the ublk frontend uses,
//! without a kernel device. Tests use it.
//!
//! A call takes a free tag of one queue (blocking while all are busy), copies
//! write data into the tag's buffer, hands the tag to the queue thread, and
//! waits for the result; reads copy out of the tag's buffer afterwards. Calls
//! larger than the max IO size are split, as the block layer would.

use std::io;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::engine::{BlockRequest, Completion, Engine, EngineConfig, MAX_DEPTH, Op, Tag};
use crate::epochs::Epochs;
use crate::layout::{Layout, SpecError, VolumeSpec};
use crate::ledger::{Ledger, NodeDurability};
use crate::membership::{Membership, Pins};
use crate::net::{self, ConnectError, Identity, NodeInfo};
use crate::records;
use crate::stats::QueueStats;
use crate::uring::{
    BufferMode, Doorbell, Frontend, QueueDriver, QueueParts, Reconnect, SendMode, TagBuffers,
};

/// How a volume is attached.
#[derive(Debug, Clone)]
pub struct VolumeOptions {
    /// Queue threads, each with its own ring and one connection per node.
    pub queues: usize,
    /// Requests in flight per queue (tags).
    pub depth: u16,
    /// Largest request, bytes: the size of each tag's buffer.
    pub max_io: u32,
    pub send_mode: SendMode,
    pub io_timeout: Duration,
    /// A node down longer than this fails IO to its stripes at once (EIO).
    pub node_down_timeout: Duration,
    /// Replicated volumes: a member disconnected or owing an answer this
    /// long leaves its column's in-sync set (see `EngineConfig`).
    pub replica_timeout: Duration,
    /// Replicated volumes: the membership this device attached with (see
    /// [`attach_replicas`]); None: not attached yet (or one replica).
    pub membership: Option<Arc<Membership>>,
    /// Replicated volumes: the membership manager the attach started (the
    /// daemon marks a clean stop through it).
    pub manager: Option<records::ManagerHandle>,
    /// Replicated volumes: attach even without every member of the newest
    /// record's in-sync sets (see `records::AttachOptions`).
    pub force_degraded: bool,
    /// Replicated volumes: fence an owner that still looks alive.
    pub takeover: bool,
    /// Replicated volumes: how members out of sync are caught up (rate,
    /// probe interval; docs/resync.md).
    pub resync: crate::resync::ResyncOptions,
    pub connect_timeout: Duration,
    /// Who this client is to the nodes, one id for all the device's queues:
    /// nodes fence the connections of an older epoch of the same id when a
    /// newer one connects. Kept across a daemon recovery.
    pub client_id: String,
    /// The first fencing epoch of every node (the handshake's session); it
    /// moves on whenever a connection to the node ends (see
    /// [`crate::epochs`]). A recovered daemon starts above every epoch of
    /// the one before it.
    pub session: u64,
    /// What the device record kept of each node's durability (a daemon
    /// that recovers the device; empty: mapped afresh). Seeds the device's
    /// [`Ledger`].
    pub durability: Vec<NodeDurability>,
    /// The volume identity each node must hold, in node order: pinned at
    /// the first connect (empty: take what the nodes have, then pin it) and
    /// kept across a daemon recovery. A node holding another identity lost
    /// the volume and is refused.
    pub volume_ids: Vec<String>,
    /// A CRC-32C on every payload, checked by the receiver (the node for
    /// writes, this client for reads); a mismatch is sent again, then EIO.
    pub data_digest: bool,
    /// Mutual TLS to every node (None: plaintext). The copy data path and
    /// copy sends go with it (the kernel's TLS takes neither zero-copy
    /// sends nor fixed-buffer receives).
    pub tls: Option<Arc<net::ClientTls>>,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions {
            queues: 1,
            depth: 64,
            max_io: 1 << 20,
            send_mode: SendMode::ZeroCopy,
            io_timeout: Duration::from_secs(30),
            node_down_timeout: Duration::from_secs(15),
            replica_timeout: Duration::from_secs(5),
            membership: None,
            manager: None,
            force_degraded: false,
            takeover: false,
            resync: crate::resync::ResyncOptions::default(),
            connect_timeout: Duration::from_secs(10),
            client_id: fresh_client_id(),
            session: 1,
            durability: Vec::new(),
            volume_ids: Vec::new(),
            data_digest: false,
            tls: None,
        }
    }
}

/// A client id no other process (on this host or another) is likely to
/// have: nodes fence a client's older connections by it.
pub fn fresh_client_id() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    let random = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map(|()| u64::from_le_bytes(bytes))
        .unwrap_or_else(|_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
    format!("netblk-{}-{random:016x}", std::process::id())
}

/// Shortest `io_timeout` and `node_down_timeout`.
pub const MIN_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest `io_timeout` and `node_down_timeout`: one hour (deadlines are
/// `now + timeout`, which must not overflow).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// Most hex digits a pinned volume identity may have.
pub const VOLUME_ID_MAX_DIGITS: usize = 128;

/// Checks volume identities pinned by the caller (`netblk map
/// --volume-ids`, a volume file's `volume_ids`, a CSI volume context):
/// none (taken from the nodes at the first connect), or one per node of a
/// volume over `nodes` nodes, in node order, each 1 to
/// [`VOLUME_ID_MAX_DIGITS`] hex digits as the nodes state them. The one
/// place that rule lives.
pub fn check_volume_ids(ids: &[String], nodes: usize) -> Result<(), String> {
    if ids.is_empty() {
        return Ok(());
    }
    if ids.len() != nodes {
        return Err(format!(
            "{} volume identities given for {nodes} node(s): give one per node, in node order",
            ids.len()
        ));
    }
    for (node, id) in ids.iter().enumerate() {
        let hex = id.bytes().all(|b| b.is_ascii_hexdigit());
        if id.is_empty() || id.len() > VOLUME_ID_MAX_DIGITS || !hex {
            return Err(format!(
                "volume identity of node {node} '{id}' is not 1 to {VOLUME_ID_MAX_DIGITS} hex digits"
            ));
        }
    }
    Ok(())
}

/// A duration in seconds, whole where it is whole.
fn seconds(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        d.as_secs().to_string()
    } else {
        d.as_secs_f64().to_string()
    }
}

impl VolumeOptions {
    /// The owner epoch handshakes present (0: no membership record).
    pub fn owner_epoch(&self) -> u64 {
        self.membership.as_ref().map_or(0, |m| m.view().owner_epoch)
    }

    /// The timeouts of a connection of this volume.
    pub fn timeouts(&self) -> net::Timeouts {
        net::Timeouts {
            connect: self.connect_timeout,
            io: self.io_timeout,
        }
    }

    /// Checks every number against its bounds, saying which is wrong.
    /// How payloads leave: as `send_mode` says, but copied into the socket
    /// with TLS (a kernel TLS socket takes no zero-copy sends).
    pub fn sends(&self) -> SendMode {
        if self.tls.is_some() {
            SendMode::Copy
        } else {
            self.send_mode
        }
    }

    pub fn check(&self) -> Result<(), OpenError> {
        if self.queues == 0 || self.queues > 64 {
            return Err(OpenError::Options(format!(
                "queues {} must be from 1 to 64",
                self.queues
            )));
        }
        if self.depth == 0 || self.depth > MAX_DEPTH {
            return Err(OpenError::Options(format!(
                "depth {} must be from 1 to {MAX_DEPTH}",
                self.depth
            )));
        }
        if self.max_io < 4096 || !self.max_io.is_multiple_of(512) || self.max_io > (64 << 20) {
            return Err(OpenError::Options(format!(
                "max IO {} must be a multiple of 512 from 4 KiB to 64 MiB",
                self.max_io
            )));
        }
        for (what, timeout) in [
            ("io timeout", self.io_timeout),
            ("node-down timeout", self.node_down_timeout),
        ] {
            if !(MIN_TIMEOUT..=MAX_TIMEOUT).contains(&timeout) {
                return Err(OpenError::Options(format!(
                    "{what} {} s must be from {} to {} seconds",
                    seconds(timeout),
                    seconds(MIN_TIMEOUT),
                    seconds(MAX_TIMEOUT)
                )));
            }
        }
        if self.replica_timeout < MIN_REPLICA_TIMEOUT || self.replica_timeout > MAX_TIMEOUT {
            return Err(OpenError::Options(format!(
                "replica timeout {} s must be from {} to {} seconds",
                seconds(self.replica_timeout),
                seconds(MIN_REPLICA_TIMEOUT),
                seconds(MAX_TIMEOUT)
            )));
        }
        Ok(())
    }

    /// Who attaches a replicated volume, as its record names the owner.
    pub fn owner(&self) -> String {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}/{}", host.trim(), self.client_id)
    }
}

/// Shortest `replica_timeout`.
pub const MIN_REPLICA_TIMEOUT: Duration = Duration::from_millis(100);

/// Makes this device the owner of a replicated volume (see
/// [`records::attach`]) unless `options` carry a membership already, and
/// starts the thread that takes failed members out. Nothing to do with one
/// replica.
pub fn attach_replicas(
    spec: &VolumeSpec,
    layout: &Layout,
    options: &mut VolumeOptions,
) -> Result<(), OpenError> {
    if layout.replicas() == 1 || options.membership.is_some() {
        return Ok(());
    }
    if options.replica_timeout >= options.io_timeout {
        return Err(OpenError::Options(format!(
            "replica timeout {} s must be below the io timeout {} s: a failing replica must leave before requests fail",
            seconds(options.replica_timeout),
            seconds(options.io_timeout)
        )));
    }
    let attach_store = records_store(
        spec,
        layout,
        options,
        Pins::new(options.volume_ids.clone()),
        "records",
    );
    let attach = records::AttachOptions {
        owner: options.owner(),
        force_degraded: options.force_degraded,
        takeover: options.takeover,
        wait: options.connect_timeout,
        members: spec.nodes.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    };
    let attached = records::attach(&attach_store, layout, &attach).map_err(OpenError::Attach)?;
    let pins = Arc::clone(&attached.membership.pins);
    pins.set_all(options.volume_ids.clone());
    // One client id per thread that connects: a node fences the open
    // connections of a client id when a newer session of it connects.
    let store = |role| records_store(spec, layout, options, Arc::clone(&pins), role);
    let manager = records::spawn_manager(Box::new(store("records")), *layout, &attached)
        .map_err(OpenError::Uring)?;
    let resync = crate::resync::ResyncOptions {
        wait: options.io_timeout,
        ..options.resync
    };
    crate::resync::spawn(
        Box::new(store("resync")),
        *layout,
        &attached.membership,
        manager.clone(),
        resync,
    )
    .map_err(OpenError::Uring)?;
    options.membership = Some(attached.membership);
    options.manager = Some(manager);
    Ok(())
}

/// The membership records (and the copies beside them) of a replicated
/// volume, reached over short connections of their own, as client id
/// `CLIENT-role` (one role per thread that connects: a newer session of a
/// client id fences its open connections on a node).
pub fn records_store(
    spec: &VolumeSpec,
    layout: &Layout,
    options: &VolumeOptions,
    pins: Arc<Pins>,
    role: &str,
) -> records::NetRecords {
    records::NetRecords {
        addrs: spec.nodes.clone(),
        layout: *layout,
        volume: spec.name.clone(),
        volume_ids: pins,
        client_id: format!("{}-{role}", options.client_id),
        tls: options.tls.clone(),
        timeouts: net::Timeouts {
            connect: options
                .connect_timeout
                .min(options.replica_timeout.max(Duration::from_secs(1))),
            io: options.replica_timeout.max(Duration::from_secs(1)),
        },
    }
}

/// Why a volume could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("invalid volume: {0}")]
    Spec(#[from] SpecError),
    #[error("invalid options: {0}")]
    Options(String),
    #[error(transparent)]
    Node(#[from] ConnectError),
    #[error("io_uring: {0}")]
    Uring(io::Error),
    #[error("{0}")]
    Attach(String),
}

/// Connects one queue's sockets: one per node, handshaken, in node order,
/// at the first epoch. A replica out of its column's in-sync set gets none
/// (nothing goes to it) and a stand-in for what it would have said.
pub fn connect_queue(
    spec: &VolumeSpec,
    layout: &Layout,
    options: &VolumeOptions,
) -> Result<(Vec<Option<TcpStream>>, Vec<NodeInfo>), OpenError> {
    let client_id = &options.client_id;
    let mut streams = Vec::with_capacity(spec.nodes.len());
    let mut infos = Vec::with_capacity(spec.nodes.len());
    let view = options.membership.as_ref().map(|m| m.view());
    let replication = layout.replication();
    for (node, addr) in spec.nodes.iter().enumerate() {
        if view
            .as_ref()
            .is_some_and(|v| !v.takes_writes(replication.column_of(node), replication.row_of(node)))
        {
            streams.push(None);
            infos.push(NodeInfo {
                node_id: String::new(),
                max_io_size: 0,
                volume_id: options.volume_ids.get(node).cloned().unwrap_or_default(),
                incarnation: 0,
                durable_incarnation: 0,
                volume_size: layout.size(),
                transport: net::Transport::Plain,
            });
            continue;
        }
        let who = Identity {
            owner_epoch: options.owner_epoch(),
            client_id,
            volume: &spec.name,
            session: options.session,
            volume_id: options.volume_ids.get(node).map(String::as_str),
            digest: options.data_digest,
            tls: options.tls.as_deref(),
        };
        let (stream, info) = net::connect(*addr, node, layout, &who, options.timeouts())?;
        streams.push(Some(stream));
        infos.push(info);
    }
    Ok((streams, infos))
}

/// One queue's connections, in node order (None: a replica out of sync),
/// and what each node said.
pub type ConnectedQueue = (Vec<Option<TcpStream>>, Vec<NodeInfo>);

/// Connects every queue, in order. Unless `options` pin the nodes' volume
/// identities already, the first queue's connections pin them, and every
/// later connection (of any queue, reconnects included) must find the same.
pub fn connect_queues(
    spec: &VolumeSpec,
    layout: &Layout,
    options: &mut VolumeOptions,
) -> Result<Vec<ConnectedQueue>, OpenError> {
    let mut queues = Vec::with_capacity(options.queues);
    for _ in 0..options.queues {
        let (streams, infos) = connect_queue(spec, layout, options)?;
        if options.volume_ids.is_empty() {
            options.volume_ids = infos.iter().map(|i| i.volume_id.clone()).collect();
        }
        queues.push((streams, infos));
    }
    if let Some(m) = &options.membership {
        m.pins.set_all(options.volume_ids.clone());
    }
    if let Some((_, infos)) = queues.first() {
        for (node, (addr, info)) in spec.nodes.iter().zip(infos).enumerate() {
            tracing::info!(
                volume = %spec.name,
                node,
                %addr,
                node_id = %info.node_id,
                volume_id = %info.volume_id,
                incarnation = info.incarnation,
                session = options.session,
                queues = options.queues,
                "connected"
            );
        }
    }
    Ok(queues)
}

/// What a device's queues share: the durability ledger and the nodes'
/// fencing epochs. Made once per device, before its first queue.
#[derive(Debug, Clone)]
pub struct DeviceWide {
    pub ledger: Arc<Ledger>,
    pub epochs: Arc<Epochs>,
    pub membership: Arc<Membership>,
    /// Replicated volumes: the membership's manager.
    pub manager: Option<records::ManagerHandle>,
}

impl DeviceWide {
    /// For a device with `layout` mapped (or recovered) with `options`.
    pub fn new(layout: &Layout, options: &VolumeOptions) -> DeviceWide {
        let nodes = layout.node_count();
        let membership = options
            .membership
            .clone()
            .unwrap_or_else(|| Membership::all_in_sync(*layout.replication()));
        let ledger = Arc::new(if options.durability.is_empty() {
            Ledger::new(nodes)
        } else {
            Ledger::recovered(nodes, &options.durability)
        });
        membership.set_ledger(Arc::clone(&ledger));
        DeviceWide {
            membership,
            ledger,
            epochs: Arc::new(Epochs::new(nodes, options.session)),
            manager: options.manager.clone(),
        }
    }
}

/// A queue's engine, keeping durability in the device's ledger, told what
/// each node's handshake said of its incarnation of the volume, and the
/// figures it records.
pub fn queue_engine(
    layout: &Layout,
    options: &VolumeOptions,
    nodes: &[NodeInfo],
    wide: &DeviceWide,
) -> (Engine, Arc<QueueStats>) {
    let mut engine = Engine::new(*layout, engine_config(options));
    engine.share_ledger(Arc::clone(&wide.ledger));
    engine.share_membership(Arc::clone(&wide.membership));
    for (node, info) in nodes.iter().enumerate() {
        engine.handle_incarnation(node, info.incarnation, info.durable_incarnation);
    }
    let figures = Arc::new(QueueStats::new(layout.node_count()));
    engine.set_figures(Arc::clone(&figures));
    (engine, figures)
}

/// The span a queue thread runs in: its log events carry the volume, the
/// device (empty in-process) and the queue.
pub fn queue_span(volume: &str, device: &str, queue: usize) -> tracing::Span {
    tracing::info_span!("queue", volume, device, queue)
}

/// A running queue thread; joining it gives back its frontend (unless the
/// ring could not even be made) and how the queue ended.
pub type QueueThread<F> = JoinHandle<(Option<F>, io::Result<()>)>;

/// Starts a queue thread serving `frontend` over `streams`; returns once its
/// ring is set up. Joining the thread gives the frontend back.
pub fn spawn_queue<F: Frontend + Send + 'static>(
    name: String,
    parts: QueueParts<F>,
) -> Result<QueueThread<F>, OpenError> {
    // The ring is made on the thread that uses it (single issuer).
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let span = parts.span.clone();
    let thread = std::thread::Builder::new()
        .name(name)
        .spawn(move || match span.in_scope(|| QueueDriver::new(parts)) {
            Ok(driver) => {
                let _ = ready_tx.send(Ok(()));
                let (frontend, result) = span.in_scope(|| driver.run());
                (Some(frontend), result)
            }
            Err(err) => {
                let _ = ready_tx.send(Err(io::Error::new(err.kind(), err.to_string())));
                (None, Err(err))
            }
        })
        .map_err(OpenError::Uring)?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(err)) => {
            let _ = thread.join();
            Err(OpenError::Uring(err))
        }
        Err(_) => Err(OpenError::Uring(io::Error::other(
            "queue thread died while starting",
        ))),
    }
}

/// Where a tag's result goes: the caller waits on it.
struct TagSlot {
    result: Mutex<Option<Result<u64, i32>>>,
    ready: Condvar,
}

/// What a queue shares between its callers and its thread.
struct QueueShared {
    buffers: Arc<TagBuffers>,
    slots: Vec<TagSlot>,
    doorbell: Doorbell,
    stopping: AtomicBool,
    /// The queue thread died and its ring is gone.
    failed: AtomicBool,
}

impl QueueShared {
    fn complete(&self, tag: Tag, result: Result<u64, i32>) {
        if let Some(slot) = self.slots.get(usize::from(tag)) {
            let mut r = slot.result.lock().unwrap_or_else(|p| p.into_inner());
            *r = Some(result);
            slot.ready.notify_one();
        }
    }

    /// Waits for the result of the request on `tag`; EIO if the queue died.
    fn wait(&self, tag: Tag) -> Result<u64, i32> {
        let Some(slot) = self.slots.get(usize::from(tag)) else {
            return Err(libc::EINVAL);
        };
        let mut r = slot.result.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(result) = r.take() {
                return result;
            }
            if self.failed.load(Ordering::Acquire) {
                return Err(libc::EIO);
            }
            r = slot
                .ready
                .wait_timeout(r, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// The queue side of the in-process frontend.
struct ChannelFrontend {
    shared: Arc<QueueShared>,
    requests: Receiver<BlockRequest>,
}

impl Frontend for ChannelFrontend {
    fn poll(&mut self, engine: &mut Engine, _: &TagBuffers, now: Instant) -> bool {
        loop {
            match self.requests.try_recv() {
                Ok(request) => {
                    if let Err(err) = engine.handle_request(now, request) {
                        // A frontend bug: fail the request rather than hang it.
                        debug_assert!(false, "{err}");
                        self.shared.complete(request.tag, Err(libc::EINVAL));
                    }
                }
                Err(TryRecvError::Empty) => return !self.shared.stopping.load(Ordering::Acquire),
                Err(TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn complete(&mut self, completion: Completion, _: &TagBuffers) {
        self.shared.complete(completion.tag, completion.result);
    }

    fn wake_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.shared.doorbell.fd())
    }

    fn fail(&mut self, tags: &[Tag]) {
        self.shared.failed.store(true, Ordering::Release);
        for tag in tags {
            self.shared.complete(*tag, Err(libc::EIO));
        }
    }
}

struct Queue {
    /// What the queue measured.
    figures: Arc<QueueStats>,
    shared: Arc<QueueShared>,
    requests: Sender<BlockRequest>,
    free_tags: (Sender<Tag>, Receiver<Tag>),
    thread: Option<QueueThread<ChannelFrontend>>,
}

/// An attached striped volume. Usable from many threads at once.
pub struct Volume {
    layout: Layout,
    queues: Vec<Queue>,
    next_queue: AtomicUsize,
    max_io: u32,
    nodes: Vec<NodeInfo>,
    send_mode: SendMode,
    membership: Arc<Membership>,
    manager: Option<records::ManagerHandle>,
}

impl Volume {
    /// Connects every queue to every node, handshakes, and starts the queues.
    pub fn open(spec: &VolumeSpec, options: &VolumeOptions) -> Result<Volume, OpenError> {
        let layout = spec.layout()?;
        options.check()?;
        crate::uring::probe(options.sends()).map_err(OpenError::Uring)?;
        let mut queues: Vec<Queue> = Vec::with_capacity(options.queues);
        let mut nodes = Vec::new();
        let mut options = options.clone();
        let options = &mut options;
        attach_replicas(spec, &layout, options)?;
        let wide = DeviceWide::new(&layout, options);
        for (q, (streams, infos)) in connect_queues(spec, &layout, options)?
            .into_iter()
            .enumerate()
        {
            let (engine, figures) = queue_engine(&layout, options, &infos, &wide);
            nodes = infos;
            let buffers =
                Arc::new(TagBuffers::new(options.depth, options.max_io).map_err(OpenError::Uring)?);
            let shared = Arc::new(QueueShared {
                buffers: Arc::clone(&buffers),
                slots: (0..options.depth)
                    .map(|_| TagSlot {
                        result: Mutex::new(None),
                        ready: Condvar::new(),
                    })
                    .collect(),
                doorbell: Doorbell::new().map_err(OpenError::Uring)?,
                stopping: AtomicBool::new(false),
                failed: AtomicBool::new(false),
            });
            let (requests_tx, requests_rx) = crossbeam_channel::unbounded();
            let frontend = ChannelFrontend {
                shared: Arc::clone(&shared),
                requests: requests_rx,
            };
            let thread = spawn_queue(
                format!("netblk-q{q}"),
                QueueParts {
                    engine,
                    streams,
                    buffers,
                    frontend,
                    mode: options.sends(),
                    buffer_mode: BufferMode::User,
                    reconnect: Some(reconnect_for(spec, &layout, options, &wide)),
                    span: queue_span(&spec.name, "", q),
                },
            )?;
            let free_tags = crossbeam_channel::bounded(usize::from(options.depth));
            for tag in 0..options.depth {
                // The channel holds exactly `depth` tags: this cannot fail.
                let _ = free_tags.0.send(tag);
            }
            queues.push(Queue {
                figures,
                shared,
                requests: requests_tx,
                free_tags,
                thread: Some(thread),
            });
        }
        Ok(Volume {
            layout,
            queues,
            next_queue: AtomicUsize::new(0),
            max_io: options.max_io,
            nodes,
            send_mode: options.sends(),
            membership: Arc::clone(&wide.membership),
            manager: wide.manager.clone(),
        })
    }

    /// The replicas in sync and who left (every member in sync with one
    /// replica).
    pub fn membership(&self) -> &Arc<Membership> {
        &self.membership
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn size(&self) -> u64 {
        self.layout.size()
    }

    pub fn send_mode(&self) -> SendMode {
        self.send_mode
    }

    /// What each node said at handshake, in node order.
    /// What each queue measured (requests, latencies, per node).
    pub fn figures(&self) -> Vec<Arc<QueueStats>> {
        self.queues.iter().map(|q| Arc::clone(&q.figures)).collect()
    }

    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        for (i, chunk) in buf.chunks_mut(self.max_io as usize).enumerate() {
            let at = offset + i as u64 * u64::from(self.max_io);
            self.io(
                Op::Read,
                at,
                chunk.len() as u64,
                |_| {},
                |data| chunk.copy_from_slice(&data[..chunk.len()]),
            )?;
        }
        Ok(())
    }

    /// Writes `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at_with(buf, offset, false)
    }

    /// Writes `buf` at `offset`, durable on every node before it returns.
    pub fn write_at_fua(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at_with(buf, offset, true)
    }

    fn write_at_with(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        for (i, chunk) in buf.chunks(self.max_io as usize).enumerate() {
            let at = offset + i as u64 * u64::from(self.max_io);
            self.io(
                Op::Write { fua },
                at,
                chunk.len() as u64,
                |data| data[..chunk.len()].copy_from_slice(chunk),
                |_| {},
            )?;
        }
        Ok(())
    }

    /// Makes every completed write durable on every node.
    pub fn flush(&self) -> io::Result<()> {
        self.io(Op::Flush, 0, 0, |_| {}, |_| {})
    }

    /// Frees `[offset, offset + len)`; it reads back as zeroes.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        self.no_data(Op::Discard, offset, len)
    }

    /// Zeroes `[offset, offset + len)`.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        self.no_data(Op::WriteZeroes, offset, len)
    }

    fn no_data(&self, op: Op, offset: u64, len: u64) -> io::Result<()> {
        // Bounded like the block layer bounds discards.
        const MAX: u64 = 1 << 30;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MAX);
            self.io(op, offset + done, n, |_| {}, |_| {})?;
            done += n;
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.layout.size() => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range {offset}+{len} is beyond the volume's {} bytes",
                    self.layout.size()
                ),
            )),
        }
    }

    /// One request on one tag of one queue.
    fn io(
        &self,
        op: Op,
        offset: u64,
        len: u64,
        fill: impl FnOnce(&mut [u8]),
        drain: impl FnOnce(&[u8]),
    ) -> io::Result<()> {
        let q = &self.queues[self.next_queue.fetch_add(1, Ordering::Relaxed) % self.queues.len()];
        let tag = q
            .free_tags
            .1
            .recv()
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "volume is closing"))?;
        // SAFETY: we hold the tag (taken from the free list), so no IO uses its
        // buffer and no other thread touches it until we hand it over below.
        fill(unsafe { q.shared.buffers.tag_slice(tag) });
        let result = if q.shared.failed.load(Ordering::Acquire) {
            Err(libc::EIO)
        } else {
            match q.requests.send(BlockRequest {
                tag,
                op,
                offset,
                len,
            }) {
                Ok(()) => {
                    q.shared.doorbell.ring();
                    q.shared.wait(tag)
                }
                Err(_) => Err(libc::ESHUTDOWN),
            }
        };
        if result.is_ok() {
            // SAFETY: the engine completed the request, which happens only
            // once no send or receive uses the buffer: the tag is ours again.
            drain(unsafe { q.shared.buffers.tag_slice(tag) });
        }
        let _ = q.free_tags.0.send(tag);
        result.map(|_| ()).map_err(io::Error::from_raw_os_error)
    }
}

/// How queues of this volume reconnect to its nodes.
pub fn reconnect_for(
    spec: &VolumeSpec,
    layout: &Layout,
    options: &VolumeOptions,
    wide: &DeviceWide,
) -> Reconnect {
    Reconnect {
        addrs: spec.nodes.clone(),
        layout: *layout,
        size: crate::layout::LiveSize::new(layout.size()),
        client_id: options.client_id.clone(),
        epochs: Arc::clone(&wide.epochs),
        volume: spec.name.clone(),
        timeouts: net::Timeouts {
            connect: options.connect_timeout.min(Duration::from_secs(5)),
            io: options.io_timeout,
        },
        volume_ids: options.volume_ids.clone(),
        digest: options.data_digest,
        tls: options.tls.clone(),
        owner_epoch: options.owner_epoch(),
    }
}

/// The engine settings a frontend's options imply.
pub fn engine_config(options: &VolumeOptions) -> EngineConfig {
    EngineConfig {
        depth: options.depth,
        max_io: options.max_io,
        max_in_flight_per_node: usize::from(options.depth) * 4,
        io_timeout: options.io_timeout,
        node_down_timeout: options.node_down_timeout,
        replica_timeout: options.replica_timeout,
        data_digest: options.data_digest,
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        for q in &self.queues {
            q.shared.stopping.store(true, Ordering::Release);
            q.shared.doorbell.ring();
        }
        for q in &mut self.queues {
            if let Some(thread) = q.thread.take() {
                match thread.join() {
                    Ok((_, Ok(()))) => {}
                    Ok((_, Err(err))) => tracing::error!(error = %err, "queue thread failed"),
                    Err(_) => tracing::error!("queue thread panicked"),
                }
            }
        }
        if let Some(manager) = &self.manager {
            manager.stop_cleanly(&self.membership);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check_volume_ids;

    #[test]
    fn pinned_volume_identities_are_one_hex_string_per_node() {
        let ids = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(check_volume_ids(&[], 3), Ok(()), "none: pinned at connect");
        assert_eq!(check_volume_ids(&ids(&["0a1b", "FF00"]), 2), Ok(()));
        let err = check_volume_ids(&ids(&["0a1b"]), 2).expect_err("count");
        assert!(
            err.contains("1 volume identities given for 2 node(s)"),
            "{err}"
        );
        let err = check_volume_ids(&ids(&["0a1b", "xyz"]), 2).expect_err("hex");
        assert!(err.contains("node 1 'xyz'"), "{err}");
        assert!(check_volume_ids(&ids(&["", "00"]), 2).is_err(), "empty");
        assert!(
            check_volume_ids(&ids(&[&"0".repeat(129)]), 1).is_err(),
            "long"
        );
    }
}

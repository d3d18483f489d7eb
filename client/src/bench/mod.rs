//! `netblk bench`: netblk's own benchmark, each figure a ratio of an
//! upper-bound baseline measured just before it in the same run (these
//! machines are shared and noisy).
//!
//! Workloads, each for a fixed time, through the in-process frontend:
//! random 4 KiB reads and writes, sequential 1 MiB writes and reads. Each
//! keeps `depth` requests in flight. The baseline ([`wire`]) does the same
//! operation as cheaply as the machine allows: the same pieces to the same
//! node processes over the same connections, as prebuilt frames from one
//! ring per queue, with no engine, layout or encoding. netblk's ratio of it
//! is at most 1 (above 1, the baseline would be wrong), and the figure to
//! raise.

pub mod catchup;
mod report;
pub mod security;
pub mod wire;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{BlockRequest, Completion, Engine, Op, Tag};
use crate::frontend::{
    DeviceWide, VolumeOptions, connect_queue, queue_engine, queue_span, spawn_queue,
};
use crate::layout::{DEFAULT_STRIPE_UNIT, Layout, VolumeSpec};
use crate::mock::{MockNodes, mock_node_bin, start_mock_nodes};
use crate::rng::Rng;
use crate::telemetry::{Source, Telemetry};
use crate::uring::{BufferMode, Frontend, QueueParts, SendMode, TagBuffers};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Use these nodes instead of starting mock nodes.
    pub nodes: Vec<SocketAddr>,
    /// How many mock nodes to start when `nodes` is empty.
    pub node_count: usize,
    /// Copies of every stripe column: the nodes form `nodes / replicas`
    /// columns (see `layout::Replication`).
    pub replicas: u32,
    pub mock_node_bin: Option<PathBuf>,
    pub queues: usize,
    pub depth: u16,
    pub duration: Duration,
    pub modes: Vec<SendMode>,
    pub stripe_unit: u32,
    pub volume_size: u64,
    /// Store of the mock nodes started (`null` measures client and network only).
    pub node_store: String,
    /// Where each workload's figures are reported (`--metrics-addr`).
    pub telemetry: Option<Arc<Telemetry>>,
    /// Also measure the 4 KiB workloads without recording figures,
    /// alternating with and without, to state what recording costs.
    pub metrics_overhead: bool,
    /// The workloads to run, in this order.
    pub workloads: Vec<Workload>,
    /// Pairs of runs (netblk and its baseline, which goes first
    /// alternating) per workload; the median pair is reported.
    pub rounds: usize,
    /// Run everything for each of [`SWEEP`]'s queues and nodes instead
    /// (with `nodes`, the first that many of them).
    pub sweep: bool,
    /// Measure what data digests (and, with TLS files, TLS) cost instead:
    /// netblk with each against netblk in plaintext ([`security`]).
    pub security: bool,
    /// A directory with `ca.pem`, `node.pem`/`.key` and `client.pem`/`.key`
    /// (as `cargo xtask test-certs` makes): TLS is measured too.
    pub tls_dir: Option<PathBuf>,
    /// Measure what a catch-up costs random writes instead ([`catchup`]).
    pub resync: bool,
    /// The catch-up's rate limit, bytes a second (0: none).
    pub resync_rate: u64,
}

/// The (queues, nodes) a sweep measures.
pub const SWEEP: [(usize, usize); 8] = [
    (1, 1),
    (1, 2),
    (1, 4),
    (1, 8),
    (2, 1),
    (2, 2),
    (2, 4),
    (2, 8),
];

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            nodes: Vec::new(),
            node_count: 4,
            replicas: 1,
            mock_node_bin: None,
            queues: 1,
            depth: 32,
            duration: Duration::from_secs(3),
            modes: vec![SendMode::ZeroCopy, SendMode::Copy],
            stripe_unit: DEFAULT_STRIPE_UNIT,
            volume_size: 1 << 30,
            node_store: "null".into(),
            telemetry: None,
            metrics_overhead: false,
            workloads: Workload::ALL.to_vec(),
            rounds: 3,
            sweep: false,
            security: false,
            tls_dir: None,
            resync: false,
            resync_rate: crate::resync::DEFAULT_RATE,
        }
    }
}

/// Most rounds per workload.
pub const MAX_ROUNDS: usize = 99;

/// Shortest time per workload.
pub const MIN_DURATION: Duration = Duration::from_millis(1);
/// Longest time per workload: one hour.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);
/// Most mock nodes the benchmark starts.
pub const MAX_MOCK_NODES: usize = 64;

/// A time per workload given in (fractional) seconds, checked.
pub fn duration_from_secs(secs: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(secs)
        .map_err(|_| duration_error(secs))
        .and_then(check_duration)
}

fn check_duration(duration: Duration) -> Result<Duration, String> {
    if (MIN_DURATION..=MAX_DURATION).contains(&duration) {
        Ok(duration)
    } else {
        Err(duration_error(duration.as_secs_f64()))
    }
}

fn duration_error(secs: f64) -> String {
    format!(
        "duration {secs} s must be from {} to {} seconds",
        MIN_DURATION.as_secs_f64(),
        MAX_DURATION.as_secs_f64()
    )
}

impl BenchOptions {
    /// Checks every number against its bounds, saying which is wrong: the
    /// queues and depth as a volume's, the volume's geometry over the nodes,
    /// the duration, and a volume large enough for the largest workload block.
    pub fn check(&self) -> Result<(), String> {
        check_duration(self.duration)?;
        if !(1..=MAX_ROUNDS).contains(&self.rounds) {
            return Err(format!(
                "rounds {} must be from 1 to {MAX_ROUNDS}",
                self.rounds
            ));
        }
        if self.workloads.is_empty() {
            return Err("no workload to run".into());
        }
        if self.resync && (self.security || self.sweep) {
            return Err(
                "--resync is a benchmark of its own: not with --security or --sweep".into(),
            );
        }
        if self.resync && self.replicas < 2 {
            return Err(format!(
                "--resync measures a catch-up: it needs --replicas 2 or more, not {}",
                self.replicas
            ));
        }
        if self.nodes.is_empty() && !(1..=MAX_MOCK_NODES).contains(&self.node_count) {
            return Err(format!(
                "node count {} must be from 1 to {MAX_MOCK_NODES}",
                self.node_count
            ));
        }
        let volume = VolumeOptions {
            queues: self.queues,
            depth: self.depth,
            ..VolumeOptions::default()
        };
        volume.check().map_err(|e| e.to_string())?;
        if usize::from(self.depth) < self.queues {
            return Err(format!(
                "depth {} must be at least the number of queues {} (it is shared among them)",
                self.depth, self.queues
            ));
        }
        if self.nodes.is_empty() {
            let node_count =
                u32::try_from(self.node_count).map_err(|_| "too many nodes".to_string())?;
            Layout::replicated(
                self.volume_size,
                self.stripe_unit,
                node_count as usize,
                self.replicas,
            )
        } else {
            self.spec(self.nodes.clone()).layout()
        }
        .map_err(|e| e.to_string())?;
        let largest = Workload::SeqWrite1m.block();
        if self.volume_size < largest {
            return Err(format!(
                "volume size {} must be at least {largest} bytes (the largest workload block)",
                self.volume_size
            ));
        }
        Ok(())
    }

    /// The benchmark's volume over `nodes`.
    fn spec(&self, nodes: Vec<SocketAddr>) -> VolumeSpec {
        VolumeSpec {
            name: format!("bench-{}", std::process::id()),
            size: self.volume_size,
            stripe_unit: self.stripe_unit,
            nodes,
            replicas: self.replicas,
        }
    }
}

/// The figures of one run of one workload.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub ops: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Client CPU seconds (user + system) over the run; 0 where not measured.
    pub cpu_s: f64,
    /// CPU of the mock nodes the benchmark started, percent of one core
    /// (0 with `--nodes`).
    pub node_cpu_pct: f64,
}

impl Figures {
    /// Client CPU per GiB moved; 0 where not measured.
    pub fn cpu_s_per_gib(&self) -> f64 {
        let gib = self.bytes as f64 / (1u64 << 30) as f64;
        if gib > 0.0 && self.cpu_s > 0.0 {
            self.cpu_s / gib
        } else {
            0.0
        }
    }
    /// Client CPU over the run, percent of one core.
    pub fn cpu_pct(&self) -> f64 {
        100.0 * self.cpu_s / self.seconds.max(1e-9)
    }
    pub fn iops(&self) -> f64 {
        self.ops as f64 / self.seconds.max(1e-9)
    }
    pub fn mib_s(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / self.seconds.max(1e-9)
    }
}

/// One netblk workload result and how it compares with its baseline.
#[derive(Debug, Clone)]
pub struct Row {
    pub workload: &'static str,
    pub mode: SendMode,
    pub figures: Figures,
    pub baseline: &'static str,
    /// The baseline measured just before this workload.
    pub baseline_figures: Figures,
    /// The queues and nodes it ran with.
    pub queues: usize,
    pub nodes: usize,
    /// netblk figure / baseline figure (IOPS for 4 KiB, MiB/s for 1 MiB):
    /// the median over the rounds (whose figures these are), and the
    /// lowest and highest.
    pub ratio: f64,
    pub ratio_min: f64,
    pub ratio_max: f64,
    pub rounds: usize,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub nodes: usize,
    pub connections: usize,
    pub options: BenchOptions,
    pub rows: Vec<Row>,
    /// What recording figures costs, where measured.
    pub overhead: Vec<Overhead>,
    /// What digests and TLS cost, with `--security`.
    pub security: Vec<security::SecurityRow>,
    /// What a catch-up costs, with `--resync`.
    pub resync: Vec<catchup::ResyncRow>,
}

/// IOPS of a 4 KiB workload with figures recorded, as a ratio of IOPS
/// without: the median over alternating pairs of runs.
#[derive(Debug, Clone)]
pub struct Overhead {
    pub workload: &'static str,
    pub mode: SendMode,
    pub ratio: f64,
    pub pairs: usize,
    /// What recording one such request costs, timed in a loop, and the CPU
    /// netblk spends per request of the workload (from its CPU per GiB).
    pub recording_ns: f64,
    pub cpu_ns_per_request: f64,
}

/// The CPU time of recording one single-piece request's figures (what the
/// engine does when figures are on), timed over many in a loop.
pub fn recording_ns_per_request() -> f64 {
    const ROUNDS: u32 = 2_000_000;
    let figures = crate::stats::QueueStats::new(4);
    let op = Op::Write { fua: false };
    // Latencies spread over the buckets (10 µs to 10 ms), so that the bucket
    // search is not always predicted right.
    let mut rng = Rng::new(0x5eed);
    let latencies: Vec<u64> = (0..4096).map(|_| 10_000 + rng.below(10_000_000)).collect();
    let t0 = Instant::now();
    for i in 0..ROUNDS {
        let node = &figures.nodes[(i % 4) as usize];
        let latency = std::hint::black_box(latencies[(i % 4096) as usize]);
        figures.request_started(op, 4096);
        node.in_flight.set(u64::from(i & 7));
        node.sent_bytes.add(4096);
        node.last_reply_ns.set(u64::from(i));
        node.piece_latency.record_ns(latency);
        node.in_flight.set(u64::from(i & 3));
        figures.request_done(op, latency + 5_000, 0);
    }
    let ns = t0.elapsed().as_nanos() as f64 / f64::from(ROUNDS);
    // Keep the loop from being optimised away.
    std::hint::black_box(&figures);
    ns
}

/// Pairs of runs (without, then with figures) behind an [`Overhead`].
const OVERHEAD_PAIRS: usize = 5;

/// One of the benchmark's workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    RandRead4k,
    RandWrite4k,
    SeqWrite1m,
    SeqRead1m,
}

impl std::str::FromStr for Workload {
    type Err = String;
    fn from_str(text: &str) -> Result<Workload, String> {
        Workload::ALL
            .into_iter()
            .find(|w| w.name() == text)
            .ok_or_else(|| {
                let names: Vec<&str> = Workload::ALL.iter().map(|w| w.name()).collect();
                format!("unknown workload {text:?} (known: {})", names.join(", "))
            })
    }
}

impl Workload {
    /// Every workload, in the order a run takes them.
    pub const ALL: [Workload; 4] = [
        Workload::SeqWrite1m,
        Workload::SeqRead1m,
        Workload::RandWrite4k,
        Workload::RandRead4k,
    ];

    /// The figure its ratios compare: MiB/s for 1 MiB requests, else IOPS.
    pub fn figure(self) -> fn(&Figures) -> f64 {
        if self.block() >= 1 << 20 {
            Figures::mib_s
        } else {
            Figures::iops
        }
    }

    /// How progress names round `round` (from 0) of `rounds`.
    pub fn round_label(self, round: usize, rounds: usize) -> String {
        format!("{} (round {}/{rounds})", self.name(), round + 1)
    }

    pub fn name(self) -> &'static str {
        match self {
            Workload::RandRead4k => "randread-4k",
            Workload::RandWrite4k => "randwrite-4k",
            Workload::SeqWrite1m => "seqwrite-1m",
            Workload::SeqRead1m => "seqread-1m",
        }
    }
    fn block(self) -> u64 {
        match self {
            Workload::RandRead4k | Workload::RandWrite4k => 4096,
            Workload::SeqWrite1m | Workload::SeqRead1m => 1 << 20,
        }
    }
    fn random(self) -> bool {
        matches!(self, Workload::RandRead4k | Workload::RandWrite4k)
    }
    fn writes(self) -> bool {
        matches!(self, Workload::RandWrite4k | Workload::SeqWrite1m)
    }
}

/// The wire baseline of `workload`: the same pieces netblk sends (a 4 KiB
/// request is one piece; a 1 MiB request, aligned, one piece per stripe
/// unit), as many in flight, with the same send mode, to the same nodes.
/// With replicas a write is R pieces, one per copy: the baseline keeps R
/// times the pieces in flight and counts every R of them as one write
/// (the same bytes on the wire, the same node requests outstanding,
/// without the wait for the slowest copy: an upper bound).
fn measure_wire(
    spec: &VolumeSpec,
    options: &BenchOptions,
    mode: SendMode,
    workload: Workload,
) -> io::Result<Figures> {
    let queues = options.queues.max(1);
    let piece = workload.block().min(u64::from(options.stripe_unit)) as u32;
    let pieces_per_request = workload.block().div_ceil(u64::from(piece)) as usize;
    let per_queue = (usize::from(options.depth) / queues).max(1);
    let copies = if workload.writes() {
        options.replicas.max(1) as usize
    } else {
        1
    };
    let load = wire::WireLoad {
        write: workload.writes(),
        piece,
        queues,
        in_flight: per_queue * pieces_per_request * copies,
        mode,
        duration: options.duration,
        random: workload.random(),
    };
    let cpu0 = cpu_seconds();
    let r = wire::run(spec, load)?;
    let cpu = cpu_seconds() - cpu0;
    let bytes = r.bytes / copies as u64;
    let requests = bytes / workload.block();
    Ok(figures(r.latencies_us, requests, bytes, r.seconds, cpu))
}

/// Runs `measure`, and adds the CPU the mock nodes used meanwhile.
pub(crate) fn with_node_cpu(
    pids: &[u32],
    measure: impl FnOnce() -> io::Result<Figures>,
) -> io::Result<Figures> {
    let before = cpu_seconds_of_all(pids);
    let mut f = measure()?;
    f.node_cpu_pct = 100.0 * (cpu_seconds_of_all(pids) - before) / f.seconds.max(1e-9);
    Ok(f)
}

/// CPU seconds (user + system) this process has used, from /proc.
fn cpu_seconds() -> f64 {
    cpu_seconds_of("self")
}

/// CPU seconds the processes `pids` have used together.
fn cpu_seconds_of_all(pids: &[u32]) -> f64 {
    pids.iter().map(|p| cpu_seconds_of(&p.to_string())).sum()
}

/// CPU seconds (user + system) process `pid` ("self" or a number) has used.
fn cpu_seconds_of(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which is in parentheses).
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 11 and 12 after ')'.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // USER_HZ is 100 on every Linux ABI this runs on.
    (ticks(11) + ticks(12)) / 100.0
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)])
}

fn figures(mut latencies: Vec<u32>, ops: u64, bytes: u64, seconds: f64, cpu: f64) -> Figures {
    latencies.sort_unstable();
    Figures {
        ops,
        bytes,
        seconds,
        p50_us: percentile(&latencies, 0.50),
        p99_us: percentile(&latencies, 0.99),
        p999_us: percentile(&latencies, 0.999),
        cpu_s: cpu,
        node_cpu_pct: 0.0,
    }
}

/// A frontend that generates one workload inside the queue thread, keeping
/// `depth` requests in flight until its deadline, the way the kernel keeps a
/// ublk queue busy: no other thread sits between requests and the engine.
/// Buffers are neither filled nor read (the data is already "in the pages").
struct Generator {
    workload: Workload,
    duration: Duration,
    deadline: Option<Instant>,
    started: Option<Instant>,
    finished: Option<Instant>,
    free: Vec<Tag>,
    issued_at: Vec<Instant>,
    rng: Rng,
    /// Sequential workloads: this queue's next block, stepping by `stride`.
    cursor: u64,
    stride: u64,
    blocks: u64,
    latencies: Vec<u32>,
    ops: u64,
    errors: u64,
    first_error: Option<i32>,
    /// Requests to issue at most (a pass over the volume), and issued.
    limit: Option<u64>,
    issued: u64,
    depth: usize,
}

impl Generator {
    fn new(
        workload: Workload,
        depth: u16,
        queue: u64,
        queues: u64,
        volume_size: u64,
        duration: Duration,
    ) -> Self {
        Generator {
            workload,
            duration,
            deadline: None,
            started: None,
            finished: None,
            free: (0..depth).rev().collect(),
            issued_at: vec![Instant::now(); usize::from(depth)],
            rng: Rng::new(queue + 1),
            cursor: queue,
            stride: queues,
            blocks: volume_size / workload.block(),
            latencies: Vec::with_capacity(1 << 18),
            ops: 0,
            errors: 0,
            first_error: None,
            limit: None,
            issued: 0,
            depth: usize::from(depth),
        }
    }

    /// Issues one pass over the volume (this queue's share of its blocks)
    /// and ends when the last completes.
    fn once(&mut self) {
        let mine = (self.blocks + self.stride - 1 - self.cursor.min(self.blocks)) / self.stride;
        self.limit = Some(mine);
    }
}

impl Frontend for Generator {
    fn poll(&mut self, engine: &mut Engine, _: &TagBuffers, now: Instant) -> bool {
        let deadline = *self.deadline.get_or_insert(now + self.duration);
        self.started.get_or_insert(now);
        if now >= deadline {
            return false;
        }
        if self.limit.is_some_and(|limit| self.issued >= limit) {
            return self.free.len() < self.depth;
        }
        while let Some(tag) = self.free.pop() {
            if self.limit.is_some_and(|limit| self.issued >= limit) {
                self.free.push(tag);
                break;
            }
            self.issued += 1;
            let index = match self.workload {
                Workload::RandRead4k | Workload::RandWrite4k => self.rng.below(self.blocks),
                Workload::SeqWrite1m | Workload::SeqRead1m => {
                    let i = self.cursor % self.blocks;
                    self.cursor += self.stride;
                    i
                }
            };
            let op = match self.workload {
                Workload::RandRead4k | Workload::SeqRead1m => Op::Read,
                Workload::RandWrite4k | Workload::SeqWrite1m => Op::Write { fua: false },
            };
            let block = self.workload.block();
            let request = BlockRequest {
                tag,
                op,
                offset: index * block,
                len: block,
            };
            self.issued_at[usize::from(tag)] = now;
            if engine.handle_request(now, request).is_err() {
                self.errors += 1;
            }
        }
        true
    }

    fn complete(&mut self, c: Completion, _: &TagBuffers) {
        let now = Instant::now();
        let started = self.issued_at[usize::from(c.tag)];
        self.latencies.push(
            now.duration_since(started)
                .as_micros()
                .min(u128::from(u32::MAX)) as u32,
        );
        match c.result {
            Ok(_) => self.ops += 1,
            Err(errno) => {
                self.errors += 1;
                self.first_error.get_or_insert(errno);
            }
        }
        self.finished = Some(now);
        self.free.push(c.tag);
    }

    fn fail(&mut self, tags: &[Tag]) {
        self.errors += tags.len() as u64;
        self.first_error.get_or_insert(libc::EIO);
    }
}

/// What protects a run's connections: data digests, TLS (none by default).
#[derive(Debug, Clone, Default)]
pub struct Protect {
    pub digest: bool,
    pub tls: Option<Arc<crate::net::ClientTls>>,
}

/// Runs one workload on fresh connections, one generator per queue.
pub(crate) fn measure_workload(
    spec: &VolumeSpec,
    options: &BenchOptions,
    mode: SendMode,
    workload: Workload,
    record: bool,
    report: Option<&Telemetry>,
    protect: &Protect,
) -> io::Result<Figures> {
    let attached = Attached::new(spec, options, mode, protect, None)?;
    attached.run(workload, Pass::For(options.duration), record, report)
}

/// How long a run issues requests.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Pass {
    /// For this long.
    For(Duration),
    /// Once over the volume (sequential workloads), however long it takes.
    Once,
}

/// The benchmark's volume attached (its owner epoch taken, its membership
/// and, replicated, the manager and catch-up threads running): each
/// [`Attached::run`] connects its queues anew under it.
pub(crate) struct Attached {
    spec: VolumeSpec,
    layout: Layout,
    options: VolumeOptions,
    wide: DeviceWide,
    mode: SendMode,
    /// Queues reconnect lost connections (TLS, or members that leave and
    /// join during a catch-up).
    reconnect: bool,
}

impl Attached {
    /// Attaches `spec` as the benchmark's queues and depth ask (with
    /// `resync`, catch-ups run as that asks).
    pub(crate) fn new(
        spec: &VolumeSpec,
        options: &BenchOptions,
        mode: SendMode,
        protect: &Protect,
        resync: Option<crate::resync::ResyncOptions>,
    ) -> io::Result<Attached> {
        let layout = spec.layout().map_err(|e| io::Error::other(e.to_string()))?;
        let queues = options.queues.max(1);
        let depth = (usize::from(options.depth) / queues).max(1) as u16;
        let mut volume_options = VolumeOptions {
            queues,
            depth,
            max_io: 1 << 20,
            send_mode: mode,
            data_digest: protect.digest,
            tls: protect.tls.clone(),
            // Each run is the benchmark volume's new owner (the last run's
            // connections may still be closing).
            takeover: true,
            resync: resync.unwrap_or_default(),
            ..VolumeOptions::default()
        };
        let mode = volume_options.sends();
        let err = |e: crate::frontend::OpenError| io::Error::other(e.to_string());
        crate::frontend::attach_replicas(spec, &layout, &mut volume_options).map_err(err)?;
        // The nodes' volume identities, pinned as a map pins them (a member
        // that comes back under another is rebuilt, not caught up).
        let (_, infos) = connect_queue(spec, &layout, &volume_options).map_err(err)?;
        volume_options.volume_ids = infos.into_iter().map(|i| i.volume_id).collect();
        if let Some(m) = &volume_options.membership {
            m.pins.set_all(volume_options.volume_ids.clone());
        }
        let wide = DeviceWide::new(&layout, &volume_options);
        Ok(Attached {
            spec: spec.clone(),
            layout,
            options: volume_options,
            wide,
            mode,
            reconnect: protect.tls.is_some() || resync.is_some(),
        })
    }

    pub(crate) fn membership(&self) -> &Arc<crate::membership::Membership> {
        &self.wide.membership
    }

    pub(crate) fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Runs `workload` on fresh connections, one generator per queue.
    pub(crate) fn run(
        &self,
        workload: Workload,
        pass: Pass,
        record: bool,
        report: Option<&Telemetry>,
    ) -> io::Result<Figures> {
        let (spec, layout, volume_options) = (&self.spec, &self.layout, &self.options);
        let queues = volume_options.queues;
        let depth = volume_options.depth;
        let err = |e: crate::frontend::OpenError| io::Error::other(e.to_string());
        let mut threads = Vec::new();
        let mut all_figures = Vec::new();
        let cpu0 = cpu_seconds();
        for q in 0..queues {
            let (streams, nodes) = connect_queue(spec, layout, volume_options).map_err(err)?;
            let (mut engine, figures) = queue_engine(layout, volume_options, &nodes, &self.wide);
            if record {
                all_figures.push(figures);
            } else {
                engine.drop_figures();
            }
            let buffers = Arc::new(TagBuffers::new(depth, 1 << 20)?);
            let mut generator = Generator::new(
                workload,
                depth,
                q as u64,
                queues as u64,
                spec.size,
                match pass {
                    Pass::For(duration) => duration,
                    Pass::Once => MAX_DURATION,
                },
            );
            if let Pass::Once = pass {
                generator.once();
            }
            threads.push(
                spawn_queue(
                    format!("bench-q{q}"),
                    QueueParts {
                        engine,
                        streams,
                        buffers,
                        frontend: generator,
                        mode: self.mode,
                        buffer_mode: BufferMode::User,
                        reconnect: self.reconnect.then(|| {
                            crate::frontend::reconnect_for(spec, layout, volume_options, &self.wide)
                        }),
                        span: queue_span(&spec.name, "", q),
                    },
                )
                .map_err(err)?,
            );
        }
        if let Some(telemetry) = report {
            telemetry.add(Source {
                volume: format!("{}-{}-{}", spec.name, workload.name(), self.mode),
                device: String::new(),
                nodes: spec.nodes.clone(),
                data_path: "in-process".into(),
                queues: all_figures.clone(),
                membership: None,
            });
        }
        collect(threads, workload, cpu0)
    }
}

/// The figures of a run's queue threads, once they end.
fn collect(
    threads: Vec<crate::frontend::QueueThread<Generator>>,
    workload: Workload,
    cpu0: f64,
) -> io::Result<Figures> {
    let mut latencies = Vec::new();
    let (mut ops, mut errors, mut first_error) = (0, 0, None);
    let (mut start, mut end): (Option<Instant>, Option<Instant>) = (None, None);
    for thread in threads {
        let (generator, result) = thread
            .join()
            .map_err(|_| io::Error::other("queue thread panicked"))?;
        result?;
        let Some(g) = generator else { continue };
        latencies.extend(g.latencies);
        ops += g.ops;
        errors += g.errors;
        first_error = first_error.or(g.first_error);
        start = match (start, g.started) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        end = match (end, g.finished) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
    let cpu = cpu_seconds() - cpu0;
    if errors > 0 {
        let errno = first_error.unwrap_or(libc::EIO);
        return Err(io::Error::other(format!(
            "{} of {} requests failed, first with: {}",
            errors,
            errors + ops,
            io::Error::from_raw_os_error(errno)
        )));
    }
    let seconds = match (start, end) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
        _ => 0.0,
    };
    Ok(figures(
        latencies,
        ops,
        ops * workload.block(),
        seconds,
        cpu,
    ))
}

/// Runs the whole benchmark.
pub fn run(options: &BenchOptions, progress: &mut dyn FnMut(&str)) -> io::Result<Report> {
    options
        .check()
        .map_err(|why| io::Error::new(io::ErrorKind::InvalidInput, why))?;
    if options.security {
        return security::run(options, progress);
    }
    if options.resync {
        return catchup::run(options, progress);
    }
    if !options.sweep {
        return run_one(options, progress);
    }
    let mut report: Option<Report> = None;
    for (queues, nodes) in SWEEP {
        if usize::from(options.depth) < queues
            || (!options.nodes.is_empty() && options.nodes.len() < nodes)
        {
            continue;
        }
        let point = BenchOptions {
            queues,
            node_count: nodes,
            nodes: options.nodes.iter().take(nodes).copied().collect(),
            ..options.clone()
        };
        progress(&format!("sweep: {queues} queue(s), {nodes} node(s)"));
        let one = run_one(&point, progress)?;
        match report.as_mut() {
            None => report = Some(one),
            Some(r) => {
                r.rows.extend(one.rows);
                r.overhead.extend(one.overhead);
            }
        }
    }
    let mut report = report.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "no sweep point fits these options",
        )
    })?;
    report.options = options.clone();
    Ok(report)
}

/// One benchmark at `options`' queues and nodes.
fn run_one(options: &BenchOptions, progress: &mut dyn FnMut(&str)) -> io::Result<Report> {
    let (mock, addrs) = if options.nodes.is_empty() {
        let bin = mock_node_bin(options.mock_node_bin.as_ref())?;
        progress(&format!(
            "starting {} mock nodes ({}, store {})",
            options.node_count,
            bin.display(),
            options.node_store
        ));
        start_mock_nodes(options.node_count, &bin, &options.node_store, &[])?
    } else {
        (MockNodes::none(), options.nodes.clone())
    };
    let connections = addrs.len() * options.queues;
    let node_pids = mock.pids();
    let mut rows = Vec::new();
    let spec = options.spec(addrs.clone());
    crate::uring::probe(SendMode::Copy)?;
    let mut overhead = Vec::new();
    // Warm up (connections, the nodes' buffers, TCP windows) unmeasured, so
    // that the first pair does not pay for it.
    let warm = BenchOptions {
        duration: options.duration.min(Duration::from_millis(500)),
        ..options.clone()
    };
    measure_wire(&spec, &warm, SendMode::Copy, options.workloads[0])?;
    for mode in &options.modes {
        crate::uring::probe(*mode)?;
        for &workload in &options.workloads {
            let ratio_of = workload.figure();
            // Rounds of pairs, the baseline first in even rounds and netblk
            // first in odd ones, so that warming up and the machine's drift
            // favour neither; the median pair is reported.
            let mut pairs: Vec<(f64, Figures, Figures)> = Vec::with_capacity(options.rounds);
            for round in 0..options.rounds {
                let of = workload.round_label(round, options.rounds);
                let baseline = |progress: &mut dyn FnMut(&str)| {
                    progress(&format!(
                        "baseline: {of} over {connections} connections, {mode}"
                    ));
                    with_node_cpu(&node_pids, || measure_wire(&spec, options, *mode, workload))
                };
                let netblk = |progress: &mut dyn FnMut(&str)| {
                    progress(&format!("netblk {mode}: {of}"));
                    let report = options.telemetry.as_deref();
                    with_node_cpu(&node_pids, || {
                        measure_workload(
                            &spec,
                            options,
                            *mode,
                            workload,
                            true,
                            report,
                            &Protect::default(),
                        )
                    })
                };
                let (f, b) = if round % 2 == 0 {
                    let b = baseline(progress)?;
                    (netblk(progress)?, b)
                } else {
                    let f = netblk(progress)?;
                    (f, baseline(progress)?)
                };
                pairs.push((ratio_of(&f) / ratio_of(&b).max(1e-9), f, b));
            }
            pairs.sort_by(|x, y| x.0.total_cmp(&y.0));
            let (ratio_min, ratio_max) = (pairs[0].0, pairs[pairs.len() - 1].0);
            let rounds = pairs.len();
            let (ratio, f, baseline) = pairs.swap_remove(rounds / 2);
            if options.metrics_overhead && workload.block() == 4096 {
                progress(&format!(
                    "netblk {mode}: {} with and without figures, {OVERHEAD_PAIRS} pairs",
                    workload.name()
                ));
                let mut ratios = Vec::with_capacity(OVERHEAD_PAIRS);
                for pair in 0..OVERHEAD_PAIRS {
                    // Which goes first alternates, so that warming up (or
                    // the machine's drift) favours neither.
                    let run = |record| {
                        measure_workload(
                            &spec,
                            options,
                            *mode,
                            workload,
                            record,
                            None,
                            &Protect::default(),
                        )
                    };
                    let (with, without) = if pair % 2 == 0 {
                        let without = run(false)?;
                        (run(true)?, without)
                    } else {
                        let with = run(true)?;
                        (with, run(false)?)
                    };
                    ratios.push(with.iops() / without.iops().max(1e-9));
                }
                ratios.sort_by(f64::total_cmp);
                let per_request = f.cpu_s_per_gib() * workload.block() as f64 / (1u64 << 30) as f64;
                overhead.push(Overhead {
                    workload: workload.name(),
                    mode: *mode,
                    ratio: ratios[ratios.len() / 2],
                    pairs: ratios.len(),
                    recording_ns: recording_ns_per_request(),
                    cpu_ns_per_request: per_request * 1e9,
                });
            }
            rows.push(Row {
                workload: workload.name(),
                mode: *mode,
                queues: options.queues,
                nodes: addrs.len(),
                figures: f,
                baseline: "wire",
                baseline_figures: baseline,
                ratio,
                ratio_min,
                ratio_max,
                rounds,
            });
        }
    }
    Ok(Report {
        nodes: addrs.len(),
        connections,
        options: options.clone(),
        rows,
        overhead,
        security: Vec::new(),
        resync: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_numbers_are_checked() {
        assert!(BenchOptions::default().check().is_ok());
        let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let bad: [(BenchOptions, &str); 17] = [
            (
                BenchOptions {
                    node_count: 0,
                    ..BenchOptions::default()
                },
                "node count 0 must be from 1 to 64",
            ),
            (
                BenchOptions {
                    node_count: usize::MAX,
                    ..BenchOptions::default()
                },
                "must be from 1 to 64",
            ),
            (
                BenchOptions {
                    queues: 0,
                    ..BenchOptions::default()
                },
                "queues 0 must be from 1 to 64",
            ),
            (
                BenchOptions {
                    queues: 65,
                    depth: 4096,
                    ..BenchOptions::default()
                },
                "queues 65",
            ),
            (
                BenchOptions {
                    depth: 0,
                    ..BenchOptions::default()
                },
                "depth 0 must be from 1 to 4096",
            ),
            (
                BenchOptions {
                    depth: 4097,
                    ..BenchOptions::default()
                },
                "depth 4097",
            ),
            (
                BenchOptions {
                    depth: 2,
                    queues: 4,
                    ..BenchOptions::default()
                },
                "at least the number of queues 4",
            ),
            (
                BenchOptions {
                    duration: Duration::ZERO,
                    ..BenchOptions::default()
                },
                "duration 0 s must be from 0.001 to 3600 seconds",
            ),
            (
                BenchOptions {
                    duration: Duration::MAX,
                    ..BenchOptions::default()
                },
                "must be from 0.001 to 3600 seconds",
            ),
            (
                BenchOptions {
                    volume_size: 512 << 10,
                    ..BenchOptions::default()
                },
                "volume size 524288 must be at least 1048576 bytes",
            ),
            (
                BenchOptions {
                    volume_size: u64::MAX,
                    ..BenchOptions::default()
                },
                "at most",
            ),
            (
                BenchOptions {
                    stripe_unit: 1000,
                    ..BenchOptions::default()
                },
                "stripe unit 1000 must be a power of two",
            ),
            (
                BenchOptions {
                    nodes: (0..1025).map(|p| addr(1000 + p)).collect(),
                    ..BenchOptions::default()
                },
                "node count 1025 must be from 1 to 1024",
            ),
            (
                BenchOptions {
                    nodes: vec![addr(1), addr(2), addr(1)],
                    ..BenchOptions::default()
                },
                "node 127.0.0.1:1 is listed twice",
            ),
            (
                BenchOptions {
                    rounds: 0,
                    ..BenchOptions::default()
                },
                "rounds 0 must be from 1 to 99",
            ),
            (
                BenchOptions {
                    rounds: 100,
                    ..BenchOptions::default()
                },
                "rounds 100 must be from 1 to 99",
            ),
            (
                BenchOptions {
                    workloads: Vec::new(),
                    ..BenchOptions::default()
                },
                "no workload to run",
            ),
        ];
        for (options, says) in bad {
            let err = options.check().expect_err(says);
            assert!(err.contains(says), "{err}");
            let err = run(&options, &mut |_| {}).expect_err(says);
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        }
    }

    #[test]
    fn durations_in_seconds_are_checked() {
        assert_eq!(duration_from_secs(0.5), Ok(Duration::from_millis(500)));
        assert_eq!(duration_from_secs(3600.0), Ok(MAX_DURATION));
        for secs in [0.0, -1.0, 1e-12, 3600.5, 1e300, f64::NAN, f64::INFINITY] {
            let err = duration_from_secs(secs).expect_err("out of range");
            assert!(
                err.contains("must be from 0.001 to 3600 seconds"),
                "{secs}: {err}"
            );
        }
    }

    #[test]
    fn workloads_are_named_as_printed() {
        for w in Workload::ALL {
            assert_eq!(w.name().parse::<Workload>(), Ok(w));
        }
        let err = "randread-8k".parse::<Workload>().expect_err("unknown");
        assert!(err.contains("unknown workload \"randread-8k\""), "{err}");
        assert!(
            err.contains("seqwrite-1m, seqread-1m, randwrite-4k, randread-4k"),
            "{err}"
        );
    }
}

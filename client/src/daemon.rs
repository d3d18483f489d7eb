//! The map daemon: `netblk map` and `map --recover` set a device up, then
//! serve it (record, control socket, metrics, supervision of the queues)
//! until a signal, or until a queue fails and the device is left for a new
//! daemon. Part of the `netblk` binary, not of the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use netblk::config::VolumeFile;
use netblk::state;
use netblk::ublk::ctrl::{daemon_alive, process_start_time};
use netblk::uring::SendMode;
use netblk_protocol::units::parse_size;

use crate::{Failure, parse_stripe_unit};

#[derive(clap::Args, Debug)]
pub struct MapArgs {
    /// Take over device N (/dev/ublkbN or N) whose daemon died: everything
    /// else comes from its record under the state directory (options given
    /// anyway must match it).
    #[arg(long, value_name = "DEVICE")]
    pub recover: Option<String>,
    /// A volume file (/etc/netblk/volumes/NAME.toml): its keys are this
    /// command's options with `_` for `-` (nodes as an array of "IP:PORT"
    /// strings, sizes as numbers or strings such as "10G"); the volume is
    /// named after the file unless it has a `volume` key. Flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Volume name (the nodes store it under this name).
    #[arg(long, required_unless_present_any = ["recover", "config"])]
    pub volume: Option<String>,
    /// Volume size (bytes; K, M, G, T suffixes): whole blocks, at most 1 EiB.
    #[arg(long, value_parser = parse_size, required_unless_present_any = ["recover", "config", "pool"])]
    pub size: Option<u64>,
    /// A pool file (`netblk create --pool`): the volume's nodes, stripe
    /// unit, replicas and size are read from its placement record on the
    /// pool's nodes.
    #[arg(long, value_name = "FILE", conflicts_with = "nodes")]
    pub pool: Option<PathBuf>,
    /// The nodes, in stripe order (comma separated; 1 to 1024). The order is
    /// part of the volume: nodes refuse a different one.
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present_any = ["recover", "config", "pool"],
        value_name = "ADDR,..."
    )]
    pub nodes: Vec<SocketAddr>,
    /// Stripe unit (bytes; K, M suffixes): a power of two from 4K to 4M
    /// [default: 128K].
    #[arg(long, value_parser = parse_stripe_unit, value_name = "SIZE")]
    pub stripe_unit: Option<u32>,
    /// Hardware queues (1 to 64), each a thread with its own connections
    /// [default: 1].
    #[arg(long)]
    pub queues: Option<usize>,
    /// Requests in flight per queue (1 to 4096) [default: 64].
    #[arg(long)]
    pub depth: Option<u16>,
    /// Logical block size: 512 or 4096 [default: 512].
    #[arg(long)]
    pub block_size: Option<u32>,
    /// How payloads leave for the nodes in copy mode: zc (SEND_ZC) or copy
    /// [default: zc].
    #[arg(long, value_parser = ["zc", "copy"])]
    pub send: Option<String>,
    /// Zero copy between the block layer and the network: auto (the best the
    /// kernel offers), on (fail where the kernel cannot), off (copy mode)
    /// [default: auto].
    #[arg(long, value_parser = ["auto", "on", "off"])]
    pub zero_copy: Option<String>,
    /// Seconds before a request fails with EIO (1 to 3600) [default: 30].
    #[arg(long, value_name = "SECS")]
    pub io_timeout: Option<u64>,
    /// Seconds a node may stay unreachable before IO to its stripes fails at
    /// once with EIO (instead of waiting for --io-timeout); IO works again as
    /// soon as it is back (1 to 3600) [default: 15].
    #[arg(long, value_name = "SECS")]
    pub node_down_timeout: Option<u64>,
    /// Copies of every stripe column (1 to 5): --nodes then lists columns
    /// × replicas addresses, row by row (address i holds column i %
    /// columns) [default: 1].
    #[arg(long, value_name = "R")]
    pub replicas: Option<u32>,
    /// Seconds a replica may stay unreachable, or owe an answer, before it
    /// leaves its column's in-sync set (while another member is left); below
    /// --io-timeout [default: 5].
    #[arg(long, value_name = "SECS")]
    pub replica_timeout: Option<u64>,
    /// Bytes a second at most that bringing a replica back in sync (a
    /// catch-up or rebuild) copies, K/M/G suffixes; 0: no limit
    /// [default: 64M].
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub resync_rate: Option<u64>,
    /// Attach a replicated volume even though members of its newest
    /// membership record's in-sync sets do not answer. Dangerous: a newer
    /// record (and writes acknowledged under it) may be on them, and reads
    /// may return older data.
    #[arg(long)]
    pub force_degraded: bool,
    /// Take a replicated volume over from the owner that holds it (a host
    /// that died, a pod that moved): its connections are fenced, nothing
    /// it sends lands any more.
    #[arg(long)]
    pub takeover: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0: any).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// A checksum on every payload, checked by the receiver (the node for
    /// writes, netblk for reads; a mismatch is sent again, then EIO):
    /// crc32c or none. Digests use the copy data path [default: none].
    #[arg(long, value_parser = ["crc32c", "none"])]
    pub data_digest: Option<String>,
    /// Mutual TLS (1.3) to every node: the CA the nodes' certificates must
    /// be signed by (PEM). With --tls-cert and --tls-key. Each node's
    /// certificate must name its IP address. The copy data path goes with
    /// it; the kernel's TLS carries the data where it has it.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This client's certificate chain (PEM), which the nodes check.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Accept a node certificate that does not name the node's address
    /// (still checked against --tls-ca). Dangerous: anyone with a
    /// certificate from that CA can pose as any node.
    #[arg(long)]
    pub tls_danger_skip_server_name: bool,
    /// The volume identity each node must already hold, in node order (hex,
    /// as the nodes state them in their handshake; comma separated): the
    /// map then creates nothing and refuses a node that holds another
    /// volume under the name, or none (it lost the volume). Without it the
    /// identities are taken from the nodes and pinned at the first connect
    /// (and a node without the volume creates it).
    #[arg(long, value_delimiter = ',', value_name = "ID,...")]
    pub volume_ids: Vec<String>,
}

/// What `map` runs with: each option from its flag, else the volume file,
/// else its default. Volume, size and nodes have no default (with
/// `--recover` they come from the device's record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub volume: Option<String>,
    pub size: Option<u64>,
    pub nodes: Vec<SocketAddr>,
    pub stripe_unit: u32,
    pub queues: usize,
    pub depth: u16,
    pub block_size: u32,
    pub send: String,
    pub zero_copy: String,
    pub io_timeout: u64,
    pub node_down_timeout: u64,
    pub replicas: u32,
    pub replica_timeout: u64,
    pub resync_rate: u64,
    pub force_degraded: bool,
    pub takeover: bool,
    pub metrics_addr: Option<SocketAddr>,
    pub data_digest: bool,
    pub tls: Option<netblk_tls::config::ClientFiles>,
    /// Pinned volume identities, one per node (empty: pinned at connect).
    pub volume_ids: Vec<String>,
    /// Where the nodes come from instead: a pool file.
    pub pool: Option<PathBuf>,
}

impl Settings {
    /// The flags over `file` (if any) over the defaults.
    pub fn resolve(args: &MapArgs, file: Option<VolumeFile>) -> Settings {
        let volume_from_file = file.as_ref().map(|f| f.volume.clone());
        let f = file.unwrap_or_default();
        Settings {
            volume: args.volume.clone().or(volume_from_file),
            size: args.size.or(f.size),
            nodes: if args.nodes.is_empty() {
                f.nodes.unwrap_or_default()
            } else {
                args.nodes.clone()
            },
            stripe_unit: args.stripe_unit.or(f.stripe_unit).unwrap_or(128 << 10),
            queues: args.queues.or(f.queues).unwrap_or(1),
            depth: args.depth.or(f.depth).unwrap_or(64),
            block_size: args.block_size.or(f.block_size).unwrap_or(512),
            send: args.send.clone().or(f.send).unwrap_or_else(|| "zc".into()),
            zero_copy: args
                .zero_copy
                .clone()
                .or(f.zero_copy)
                .unwrap_or_else(|| "auto".into()),
            io_timeout: args.io_timeout.or(f.io_timeout).unwrap_or(30),
            node_down_timeout: args.node_down_timeout.or(f.node_down_timeout).unwrap_or(15),
            replicas: args.replicas.or(f.replicas).unwrap_or(1),
            replica_timeout: args.replica_timeout.or(f.replica_timeout).unwrap_or(5),
            resync_rate: args
                .resync_rate
                .or(f.resync_rate)
                .unwrap_or(netblk::resync::DEFAULT_RATE),
            force_degraded: args.force_degraded,
            takeover: args.takeover,
            metrics_addr: args.metrics_addr.or(f.metrics_addr),
            data_digest: args.data_digest.clone().or(f.data_digest).as_deref() == Some("crc32c"),
            tls: tls_files(
                args.tls_ca.clone().or(f.tls_ca),
                args.tls_cert.clone().or(f.tls_cert),
                args.tls_key.clone().or(f.tls_key),
                args.tls_danger_skip_server_name || f.tls_danger_skip_server_name == Some(true),
            ),
            volume_ids: if args.volume_ids.is_empty() {
                f.volume_ids.unwrap_or_default()
            } else {
                args.volume_ids.clone()
            },
            pool: args.pool.clone().or(f.pool),
        }
    }

    /// Nodes, stripe unit, replicas and size from the volume's placement
    /// record on the pool's nodes; those given as well must match it.
    fn read_pool(&mut self, tls: Option<&netblk::net::ClientTls>) -> Result<(), String> {
        let (Some(path), Some(volume)) = (&self.pool, &self.volume) else {
            return Ok(());
        };
        if !self.nodes.is_empty() {
            return Err("--pool and --nodes (key `nodes`) exclude each other".into());
        }
        let pool = netblk::pool::Pool::load(path)?;
        let asker = netblk::inquiry::Asker {
            tls,
            timeout: Duration::from_secs(5),
        };
        let Some((_, located)) = netblk::pooled::volume_ref(&pool, volume, &asker, None)? else {
            return Err(format!(
                "no volume '{volume}' on the nodes of pool {} (create it with `netblk create --pool`)",
                path.display()
            ));
        };
        let differs = |what: &str, given: u64, stored: u64| {
            format!(
                "{what} {given} given, but volume '{volume}' has {stored} (its placement record)"
            )
        };
        if self.replicas != 1 && self.replicas != located.replicas {
            return Err(differs(
                "--replicas",
                self.replicas.into(),
                located.replicas.into(),
            ));
        }
        if let Some(size) = self.size
            && size > located.size
        {
            return Err(differs("--size", size, located.size));
        }
        tracing::info!(
            volume,
            nodes = %netblk::pooled::members(&located.nodes),
            generation = located.generation,
            "placement read from the pool"
        );
        self.nodes = located.nodes;
        self.stripe_unit = located.stripe_unit;
        self.replicas = located.replicas;
        self.size = Some(located.size);
        Ok(())
    }

    /// TLS given only in part is an error naming what is missing.
    fn check_tls(args: &MapArgs, file: Option<&VolumeFile>) -> Result<(), String> {
        let given = [
            (
                "--tls-ca (key `tls_ca`)",
                args.tls_ca.is_some() || file.is_some_and(|f| f.tls_ca.is_some()),
            ),
            (
                "--tls-cert (key `tls_cert`)",
                args.tls_cert.is_some() || file.is_some_and(|f| f.tls_cert.is_some()),
            ),
            (
                "--tls-key (key `tls_key`)",
                args.tls_key.is_some() || file.is_some_and(|f| f.tls_key.is_some()),
            ),
        ];
        if given.iter().any(|(_, g)| *g)
            && let Some((what, _)) = given.iter().find(|(_, g)| !*g)
        {
            return Err(format!(
                "TLS needs its CA, certificate and key: no {what} given"
            ));
        }
        Ok(())
    }

    /// What a fresh map needs that has no default, named as the flag and
    /// the volume-file key.
    fn missing(&self) -> Option<&'static str> {
        if self.volume.is_none() {
            Some("--volume (key `volume`)")
        } else if self.size.is_none() {
            Some("--size (key `size`)")
        } else if self.nodes.is_empty() {
            Some("--nodes (key `nodes`)")
        } else {
            None
        }
    }
}

pub fn map(args: MapArgs) -> Result<(), Failure> {
    use netblk::frontend::VolumeOptions;
    use netblk::layout::VolumeSpec;
    use netblk::ublk::device::{self, MapOptions};
    let file = args
        .config
        .as_deref()
        .map(netblk::config::load)
        .transpose()
        .map_err(Failure::Usage)?;
    Settings::check_tls(&args, file.as_ref()).map_err(Failure::Usage)?;
    let set = Settings::resolve(&args, file);
    let tls = client_tls(set.tls.clone()).map_err(Failure::Usage)?;
    // Errors in values from a volume file say which file.
    let bad = |why: String| match &args.config {
        Some(path) => Failure::Usage(format!("{why} (options from {})", path.display())),
        None => Failure::Usage(why),
    };
    let options = MapOptions {
        volume: VolumeOptions {
            queues: set.queues,
            depth: set.depth,
            max_io: 1 << 20,
            send_mode: send_mode(&set.send),
            io_timeout: Duration::from_secs(set.io_timeout),
            node_down_timeout: Duration::from_secs(set.node_down_timeout),
            replica_timeout: Duration::from_secs(set.replica_timeout),
            resync: netblk::resync::ResyncOptions {
                rate: set.resync_rate,
                ..Default::default()
            },
            force_degraded: set.force_degraded,
            takeover: set.takeover,
            data_digest: set.data_digest,
            tls,
            volume_ids: set.volume_ids.clone(),
            ..VolumeOptions::default()
        },
        block_size: set.block_size,
        zero_copy: match set.zero_copy.as_str() {
            "on" => device::ZeroCopy::On,
            "off" => device::ZeroCopy::Off,
            _ => device::ZeroCopy::Auto,
        },
        fail_queue: None,
    };
    // Every number given is checked, also with --recover (which takes its
    // options from the record instead).
    options.check().map_err(|e| bad(e.to_string()))?;
    // The test hook is read once, here, for the map and for a recovery.
    let fail_queue = device::FailQueue::from_env().map_err(|e| Failure::Usage(e.to_string()))?;
    if let Some(device) = &args.recover {
        return recover(device, &set, fail_queue);
    }
    let mut set = set;
    if set.volume.is_none() && set.pool.is_some() {
        return Err(bad("--pool needs --volume (key `volume`)".into()));
    }
    set.read_pool(options.volume.tls.as_deref())
        .map_err(Failure::Run)?;
    if let Some(what) = set.missing() {
        return Err(bad(format!("no {what} given")));
    }
    let options = MapOptions {
        fail_queue,
        ..options
    };
    let spec = VolumeSpec {
        name: set.volume.clone().unwrap_or_default(),
        size: set.size.unwrap_or_default(),
        stripe_unit: set.stripe_unit,
        nodes: set.nodes.clone(),
        replicas: set.replicas,
    };
    device::check(&spec, &options).map_err(|e| bad(e.to_string()))?;
    // This volume's device may be waiting for a new daemon (the old one
    // crashed, or was stopped while the device was in use): attach to it,
    // so a restart never makes a second device under a mounted filesystem.
    if let Some((id, size)) = awaiting_recovery(&spec)? {
        tracing::info!(
            device = %format!("/dev/ublkb{id}"),
            volume = %spec.name,
            "volume '{}' is already /dev/ublkb{id}, which waits for a daemon: recovering it",
            spec.name
        );
        let mut set = set.clone();
        if set.size != Some(size) {
            // Resized since the file was written: the device knows better.
            tracing::warn!(
                "volume '{}' is {size} bytes now (resized?), not {}: update its size where it is configured",
                spec.name,
                spec.size
            );
            set.size = None;
        }
        return recover(&id.to_string(), &set, options.fail_queue);
    }
    let signals = stop_signals()?;
    let device = device::map(&spec, &options).map_err(|e| e.to_string())?;
    tracing::info!(
        device = %device.block_path(),
        volume = %spec.name,
        nodes = spec.nodes.len(),
        "{} serves volume '{}' over {} node(s): data path: {}",
        device.block_path(),
        spec.name,
        spec.nodes.len(),
        data_path(&device, &options)
    );
    serve(
        device,
        &spec,
        &options,
        0,
        signals,
        set.metrics_addr,
        true,
        None,
    )
    .map_err(Failure::Run)
}

/// The device of `spec`'s volume (same name, same nodes) whose daemon is
/// gone while the kernel still has it, if any; a volume served by a live
/// daemon is an error, and a record whose device is gone is dropped.
fn awaiting_recovery(spec: &netblk::layout::VolumeSpec) -> Result<Option<(u32, u64)>, Failure> {
    let dir = state::state_dir();
    let mut ctrl = netblk::ublk::ctrl::Control::open().ok();
    for record in state::list(&dir).into_iter().flatten() {
        if record.volume != spec.name || record.nodes != spec.nodes {
            continue;
        }
        if daemon_alive(record.pid, record.pid_start) {
            return Err(Failure::Run(format!(
                "volume '{}' is already mapped as /dev/ublkb{} by daemon {}",
                spec.name, record.id, record.pid
            )));
        }
        if ctrl.as_mut().is_some_and(|c| c.info(record.id).is_ok()) {
            return Ok(Some((record.id, record.size)));
        }
        let _ = state::remove(&dir, record.id);
    }
    Ok(None)
}

/// The TLS files given (all three, or none).
fn tls_files(
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    danger_skip_server_name: bool,
) -> Option<netblk_tls::config::ClientFiles> {
    Some(netblk_tls::config::ClientFiles {
        ca: ca?,
        cert: cert?,
        key: key?,
        danger_skip_server_name,
    })
}

/// The client's TLS configuration from `files` (checked now: unusable
/// files are an error before anything is mapped).
fn client_tls(
    files: Option<netblk_tls::config::ClientFiles>,
) -> Result<Option<std::sync::Arc<netblk::net::ClientTls>>, String> {
    files
        .map(|files| {
            if files.danger_skip_server_name {
                tracing::warn!("TLS: node names are not checked (--tls-danger-skip-server-name)");
            }
            netblk_tls::config::Reloading::client(files)
                .map(std::sync::Arc::new)
                .map_err(|why| format!("TLS: {why}"))
        })
        .transpose()
}

/// The data path as the log, `list`, `status` and metrics name it: the
/// kernel side, and the digests when they are on.
fn data_path(
    device: &netblk::ublk::device::Device,
    options: &netblk::ublk::device::MapOptions,
) -> String {
    let mut parts = vec![device.path.name()];
    if options.volume.tls.is_some() {
        parts.push(if netblk_tls::ktls::available() {
            netblk_tls::Transport::Kernel.name()
        } else {
            netblk_tls::Transport::User.name()
        });
    }
    if options.volume.data_digest {
        parts.push("crc32c data digests");
    }
    parts.join(" + ")
}

/// Starts `/metrics` on `addr`, if given: the telemetry to report to.
pub fn start_metrics(
    addr: Option<SocketAddr>,
) -> Result<Option<std::sync::Arc<netblk::telemetry::Telemetry>>, String> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let telemetry = netblk::telemetry::Telemetry::new();
    let collector = std::sync::Arc::clone(&telemetry);
    let bound = netblk_observe::endpoint::serve(addr, move || collector.collect())?;
    tracing::info!(%bound, "metrics at http://{bound}/metrics");
    Ok(Some(telemetry))
}

pub fn send_mode(name: &str) -> SendMode {
    if name == "copy" {
        SendMode::Copy
    } else {
        SendMode::ZeroCopy
    }
}

pub fn stop_signals() -> Result<signal_hook::iterator::Signals, String> {
    signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])
        .map_err(|e| format!("signals: {e}"))
}

/// `map --recover`: a new daemon for a device whose daemon died, set up
/// from its record. The pid check here is only an early, friendly refusal:
/// what keeps a live daemon from being fenced out is the kernel's state of
/// the device, which `device::recover` waits on before any node is touched.
fn recover(
    device: &str,
    args: &Settings,
    fail_queue: Option<netblk::ublk::device::FailQueue>,
) -> Result<(), Failure> {
    use netblk::frontend::VolumeOptions;
    use netblk::layout::VolumeSpec;
    use netblk::ublk::device::{self, MapOptions};
    let id = state::parse_device(device)?;
    let dir = state::state_dir();
    let load = || {
        state::load(&dir, id)?.ok_or_else(|| {
            format!(
                "no record of /dev/ublkb{id} in {} (was it mapped by netblk on this host?)",
                dir.display()
            )
        })
    };
    // One recovery of a device at a time: the lock beside its record is
    // held until the new daemon has written its own record (in `serve`).
    load()?;
    let lock = netblk::record_lock::lock(&dir, id, RECORD_LOCK_WAIT, || {
        tracing::info!("another netblk is recovering /dev/ublkb{id}: waiting for it");
    })?;
    // Read again under the lock: the recovery waited for may have served it.
    let record = load()?;
    if daemon_alive(record.pid, record.pid_start) {
        return Err(Failure::Run(format!(
            "/dev/ublkb{id} is served by daemon {} which is still running: nothing to recover",
            record.pid
        )));
    }
    let differs = |what: &str| {
        Failure::Usage(format!(
            "--{what} differs from what /dev/ublkb{id} was mapped with"
        ))
    };
    if args.volume.as_ref().is_some_and(|v| *v != record.volume) {
        return Err(differs("volume"));
    }
    if args.size.is_some_and(|s| s != record.size) {
        return Err(differs("size"));
    }
    if !args.nodes.is_empty() && args.nodes != record.nodes {
        return Err(differs("nodes"));
    }
    if !args.volume_ids.is_empty() && args.volume_ids != record.volume_ids {
        return Err(differs("volume-ids"));
    }
    let generation = record
        .generation
        .checked_add(1)
        .ok_or_else(|| format!("/dev/ublkb{id} has been recovered too often"))?;
    let spec = VolumeSpec {
        name: record.volume.clone(),
        size: record.size,
        stripe_unit: record.stripe_unit,
        nodes: record.nodes.clone(),
        replicas: record.replicas,
    };
    let options = MapOptions {
        volume: VolumeOptions {
            queues: record.queues,
            depth: record.depth,
            max_io: 1 << 20,
            send_mode: send_mode(&record.send),
            io_timeout: Duration::from_secs(record.io_timeout_secs),
            node_down_timeout: Duration::from_secs(record.node_down_timeout_secs),
            replica_timeout: Duration::from_secs(record.replica_timeout_secs),
            resync: netblk::resync::ResyncOptions {
                rate: record.resync_rate,
                ..Default::default()
            },
            client_id: record.client_id.clone(),
            session: u64::from(generation) << 32,
            volume_ids: record.volume_ids.clone(),
            durability: record.durability.clone(),
            data_digest: record.data_digest,
            tls: client_tls(record.tls.clone())?,
            ..VolumeOptions::default()
        },
        block_size: record.block_size,
        zero_copy: device::ZeroCopy::Auto,
        fail_queue: None,
    };
    // The record is a file: its numbers are checked like the user's.
    device::check(&spec, &options).map_err(|e| {
        format!(
            "the record of /dev/ublkb{id} in {} is unusable: {e}",
            dir.display()
        )
    })?;
    let options = MapOptions {
        fail_queue,
        ..options
    };
    options.check().map_err(|e| Failure::Usage(e.to_string()))?;
    let mut signals = stop_signals()?;
    // SIGINT/SIGTERM while waiting for the kernel give up the recovery.
    let mut interrupted = || signals.pending().next().is_some();
    let device =
        device::recover(&spec, &options, id, &mut interrupted).map_err(|e| e.to_string())?;
    tracing::info!(
        device = %device.block_path(),
        volume = %spec.name,
        generation,
        "recovered {}: volume '{}' over {} node(s), data path: {}",
        device.block_path(),
        spec.name,
        spec.nodes.len(),
        data_path(&device, &options)
    );
    serve(
        device,
        &spec,
        &options,
        generation,
        signals,
        args.metrics_addr,
        true,
        Some(lock),
    )
    .map_err(Failure::Run)
}

/// How long a recovery waits for another one of the same device (which
/// may itself wait 90 s for the kernel, then connect to every node).
const RECORD_LOCK_WAIT: Duration = Duration::from_secs(180);

/// How often the serving daemon looks at its signals and queue threads.
const SUPERVISE_POLL: Duration = Duration::from_millis(100);

/// When one queue's ring dies the kernel aborts the others' commands: how
/// long the supervisor lets them end too, so that the queue that failed is
/// named first, not one that was merely aborted.
const QUEUE_END_GRACE: Duration = Duration::from_millis(300);

/// Records the device for `list`/`unmap`/`map --recover`, starts its
/// control socket and metrics, prints its path (if `print_path`: scripts may
/// use all of it from then on), serves until
/// SIGINT or SIGTERM, then stops it and drops the record. If a queue ends
/// by itself meanwhile, returns an error naming it and why, leaving the
/// device and its record as they are: once this process is gone the kernel
/// quiesces the device, `list` shows it as needing recovery, and
/// `map --recover` takes over. A recovery's `record_lock` is let go once
/// the new record is written.
/// What `netblk scrub` runs in the daemon of a replicated device: the
/// members of every column compared (and repaired) beside the serving
/// device, over its current size.
fn scrubber(
    device: &netblk::ublk::device::Device,
    spec: &netblk::layout::VolumeSpec,
    vopts: &netblk::frontend::VolumeOptions,
) -> netblk::control::ScrubFn {
    let membership = std::sync::Arc::clone(&device.wide.membership);
    let size = device.size.clone();
    let spec = spec.clone();
    let options = netblk::frontend::VolumeOptions {
        membership: None,
        manager: None,
        ..vopts.clone()
    };
    let wait = vopts.io_timeout;
    std::sync::Arc::new(move |repair| {
        let layout = spec
            .layout()
            .and_then(|l| l.with_size(size.get()))
            .map_err(|e| e.to_string())?;
        let store = netblk::frontend::records_store(
            &spec,
            &layout,
            &options,
            std::sync::Arc::clone(&membership.pins),
            "scrub",
        );
        let report = netblk::scrub::scrub(&store, &layout, &membership, repair, wait)?;
        Ok(report.to_json())
    })
}

#[allow(clippy::too_many_arguments)]
pub fn serve(
    mut device: netblk::ublk::device::Device,
    spec: &netblk::layout::VolumeSpec,
    options: &netblk::ublk::device::MapOptions,
    generation: u32,
    mut signals: signal_hook::iterator::Signals,
    metrics_addr: Option<SocketAddr>,
    print_path: bool,
    record_lock: Option<netblk::record_lock::RecordLock>,
) -> Result<(), String> {
    let dir = state::state_dir();
    let tls_record = options.volume.tls.as_ref().map(|t| t.files().clone());
    let source = netblk::telemetry::Source {
        volume: spec.name.clone(),
        device: device.block_path(),
        nodes: spec.nodes.clone(),
        data_path: data_path(&device, options),
        queues: device.figures.clone(),
        membership: (spec.replicas > 1).then(|| std::sync::Arc::clone(&device.wide.membership)),
    };
    if let Some(telemetry) = start_metrics(metrics_addr)? {
        telemetry.add(source.clone());
    }
    let vopts = &options.volume;
    let record = state::DeviceRecord {
        id: device.dev_id,
        volume: spec.name.clone(),
        size: spec.size,
        stripe_unit: spec.stripe_unit,
        nodes: spec.nodes.clone(),
        queues: vopts.queues,
        depth: vopts.depth,
        block_size: options.block_size,
        data_path: data_path(&device, options),
        pid: std::process::id(),
        pid_start: process_start_time(std::process::id()).unwrap_or(0),
        client_id: vopts.client_id.clone(),
        generation,
        io_timeout_secs: vopts.io_timeout.as_secs(),
        node_down_timeout_secs: vopts.node_down_timeout.as_secs(),
        replicas: spec.replicas,
        replica_timeout_secs: vopts.replica_timeout.as_secs(),
        resync_rate: vopts.resync.rate,
        send: match vopts.send_mode {
            SendMode::Copy => "copy",
            SendMode::ZeroCopy => "zc",
        }
        .to_string(),
        volume_ids: device.volume_ids.clone(),
        data_digest: vopts.data_digest,
        tls: tls_record.clone(),
        durability: device.wide.ledger.persisted(true),
    };
    let ledger = std::sync::Arc::clone(&device.wide.ledger);
    let mut recorded_version = ledger.version();
    if let Err(err) = state::save(&dir, &record) {
        tracing::error!(
            dir = %dir.display(),
            error = %err,
            "cannot record the device: list, status, unmap and recovery will not see it"
        );
    }
    drop(record_lock);
    // udev saw the device appear before its record existed: a change event
    // now lets the rule name it /dev/netblk/VOLUME.
    let uevent = format!("/sys/block/ublkb{}/uevent", device.dev_id);
    if let Err(err) = std::fs::write(&uevent, "change") {
        tracing::debug!(path = %uevent, error = %err, "no change event for udev");
    }
    let socket = netblk::control::socket_path(&dir, device.dev_id);
    let resizer = netblk::resize::Resizer {
        dev_id: device.dev_id,
        spec: spec.clone(),
        size: device.size.clone(),
        client_id: vopts.client_id.clone(),
        volume_ids: device.volume_ids.clone(),
        timeouts: vopts.timeouts(),
        block_size: options.block_size,
        tls: vopts.tls.clone(),
    };
    let record = std::sync::Arc::new(std::sync::Mutex::new(record));
    let resized_record = std::sync::Arc::clone(&record);
    let record_dir = dir.clone();
    let resize: netblk::control::ResizeFn = Box::new(move |to, force| {
        let from = resizer.resize(to, force)?;
        // The record follows, so `map --recover` and `list` see the new size.
        let mut record = resized_record.lock().unwrap_or_else(|p| p.into_inner());
        record.size = to;
        if let Err(err) = state::save(&record_dir, &record) {
            tracing::error!(error = %err, "resized, but the record keeps the old size");
        }
        Ok(from)
    });
    let commands = netblk::control::Commands {
        resize: Some(resize),
        scrub: (spec.replicas > 1).then(|| scrubber(&device, spec, vopts)),
        replace: (spec.replicas > 1).then(|| {
            let membership = std::sync::Arc::clone(&device.wide.membership);
            let mapped = spec.nodes.clone();
            let wait = vopts.io_timeout;
            Box::new(move |old, new| netblk::resync::replace(&membership, &mapped, old, new, wait))
                as netblk::control::ReplaceFn
        }),
    };
    if let Err(err) = netblk::control::serve(&socket, source, commands) {
        tracing::error!(socket = %socket.display(), error = %err, "no control socket: `netblk status` cannot ask this daemon");
    }
    // The path, once the device, its record, its control socket and its
    // metrics are all in place: scripts may use any of them from here.
    if print_path {
        println!("{}", device.block_path());
    }
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let path = device.block_path();
    // A systemd unit with Type=notify is started from here on.
    if let Err(err) = netblk::notify::notify(&format!("READY=1\nSTATUS=serving {path}")) {
        tracing::warn!(error = %err, "cannot tell the service manager the device is ready");
    }
    // Test hook only (NETBLK_TEST_FAIL_QUEUE): when to make a queue fail.
    let mut hook_due = options
        .fail_queue
        .map(|hook| (hook, Instant::now() + hook.after));
    loop {
        use netblk::ublk::device::{FAIL_QUEUE_ENV, Supervision, supervise};
        let signal = signals.pending().next();
        let stop = signal.is_some();
        if let Some((hook, due)) = hook_due
            && Instant::now() >= due
        {
            tracing::warn!(
                "{FAIL_QUEUE_ENV}: making queue {} of {path} fail now (test hook)",
                hook.queue
            );
            device.fail_queue_now();
            hook_due = None;
        }
        let mut ended = device.ended_queues();
        if !ended.is_empty() && !stop {
            std::thread::sleep(QUEUE_END_GRACE);
            ended.extend(device.ended_queues());
        }
        // What the nodes' durability looks like now goes into the record,
        // so a recovery after this daemon compares against it.
        let version = ledger.version();
        let pins = (spec.replicas > 1)
            .then(|| device.wide.membership.pins.all())
            .filter(|p| p.len() == spec.nodes.len());
        let members = device.wide.membership.pins.addrs(&spec.nodes);
        let repinned = {
            let record = record.lock().unwrap_or_else(|p| p.into_inner());
            pins.as_ref().is_some_and(|p| *p != record.volume_ids) || members != record.nodes
        };
        if version != recorded_version || repinned {
            recorded_version = version;
            let mut record = record.lock().unwrap_or_else(|p| p.into_inner());
            record.durability = ledger.persisted(true);
            if let Some(pins) = pins {
                // A member rebuilt under a new volume identity: a
                // recovery holds it to that one.
                record.volume_ids = pins;
            }
            // A replaced member: a recovery reaches the new one.
            record.nodes = members;
            if let Err(err) = state::save(&dir, &record) {
                tracing::error!(error = %err, "the record keeps the nodes' earlier durability");
            }
        }
        match supervise(stop, &ended) {
            Supervision::Serve => std::thread::sleep(SUPERVISE_POLL),
            Supervision::Stop => {
                for end in &ended {
                    tracing::info!("{path}: {end}");
                }
                if ended.is_empty()
                    && signal == Some(signal_hook::consts::SIGTERM)
                    && let Some(why) = netblk::ublk::device::block_in_use(&path)
                {
                    // A service manager stopping us (a restart, an upgrade)
                    // must not pull the device from under a mounted
                    // filesystem or a process that has it open: the device
                    // waits, its IO held, for the next `map` of this
                    // volume, which recovers it.
                    tracing::warn!(
                        device = %path,
                        "{path} is in use ({why}): left for the next `netblk map` of volume '{}' to recover; unmount or close it before stopping to unmap it",
                        spec.name
                    );
                    return Ok(());
                }
                break;
            }
            Supervision::Abandon(why) => {
                // Neither stopped nor deleted: the device waits for a new
                // daemon, and the record tells `map --recover` how to make it.
                return Err(format!(
                    "{path}: {why}; the daemon exits and leaves the device to the kernel, which holds its IO until `netblk map --recover {path}`"
                ));
            }
        }
    }
    tracing::info!(device = %path, "stopping");
    let _ = netblk::notify::notify("STOPPING=1");
    let id = device.dev_id;
    let (manager, membership) = (
        device.wide.manager.clone(),
        std::sync::Arc::clone(&device.wide.membership),
    );
    let stopped = device.stop().map_err(|e| e.to_string());
    // Every queue has ended: a replicated volume's record says whether the
    // replicas agree (no write left in flight), sparing the next attach
    // its reconcile.
    if let (Ok(()), Some(manager)) = (&stopped, manager) {
        manager.stop_cleanly(&membership);
    }
    let _ = state::remove(&dir, id);
    let _ = std::fs::remove_file(&socket);
    stopped
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        map: MapArgs,
    }

    fn args(flags: &[&str]) -> MapArgs {
        let mut argv = vec!["map"];
        argv.extend_from_slice(flags);
        Cli::try_parse_from(argv).expect("flags").map
    }

    #[test]
    fn flags_override_the_file_which_overrides_the_defaults() {
        let file = netblk::config::parse(
            "nodes = [\"10.0.0.1:7001\"]\nsize = \"1G\"\ndepth = 8\nqueues = 2\n",
            "db",
        )
        .expect("file");
        let set = Settings::resolve(&args(&["--config", "db.toml", "--depth", "16"]), Some(file));
        assert_eq!(set.volume.as_deref(), Some("db"), "named after the file");
        assert_eq!(set.size, Some(1 << 30));
        assert_eq!(set.depth, 16, "the flag wins");
        assert_eq!(set.queues, 2, "the file wins over the default");
        assert_eq!(set.stripe_unit, 128 << 10, "the default");
        assert_eq!(set.io_timeout, 30);
        assert_eq!(set.zero_copy, "auto");
        assert_eq!(set.missing(), None);
    }

    #[test]
    fn without_a_file_the_defaults_are_the_documented_ones() {
        let set = Settings::resolve(
            &args(&["--volume", "v", "--size", "1G", "--nodes", "127.0.0.1:1"]),
            None,
        );
        assert_eq!(
            (
                set.queues,
                set.depth,
                set.block_size,
                set.io_timeout,
                set.node_down_timeout
            ),
            (1, 64, 512, 30, 15)
        );
        assert_eq!((set.send.as_str(), set.zero_copy.as_str()), ("zc", "auto"));
    }

    #[test]
    fn a_file_without_nodes_names_what_is_missing() {
        let file = netblk::config::parse("size = \"1G\"\n", "db").expect("file");
        let set = Settings::resolve(&args(&["--config", "db.toml"]), Some(file));
        assert_eq!(set.missing(), Some("--nodes (key `nodes`)"));
        assert!(
            Cli::try_parse_from(["map"]).is_err(),
            "without --config or --recover, --volume is required"
        );
    }
}

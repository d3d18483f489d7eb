//! The map daemon: `netblk map` and `map --recover` set a device up, then
//! serve it (record, control socket, metrics, supervision of the queues)
//! until a signal, or until a queue fails and the device is left for a new
//! daemon. Part of the `netblk` binary, not of the library.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

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
    /// Volume name (the nodes store it under this name).
    #[arg(long, required_unless_present = "recover")]
    pub volume: Option<String>,
    /// Volume size (bytes; K, M, G, T suffixes): whole blocks, at most 1 EiB.
    #[arg(long, value_parser = parse_size, required_unless_present = "recover")]
    pub size: Option<u64>,
    /// The nodes, in stripe order (comma separated; 1 to 1024). The order is
    /// part of the volume: nodes refuse a different one.
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "recover",
        value_name = "ADDR,..."
    )]
    pub nodes: Vec<SocketAddr>,
    /// Stripe unit (bytes; K, M suffixes): a power of two from 4K to 4M.
    #[arg(long, default_value = "128K", value_parser = parse_stripe_unit)]
    pub stripe_unit: u32,
    /// Hardware queues (1 to 64), each a thread with its own connections.
    #[arg(long, default_value_t = 1)]
    pub queues: usize,
    /// Requests in flight per queue (1 to 4096).
    #[arg(long, default_value_t = 64)]
    pub depth: u16,
    /// Logical block size: 512 or 4096.
    #[arg(long, default_value_t = 512)]
    pub block_size: u32,
    /// How payloads leave for the nodes in copy mode: zc (SEND_ZC) or copy.
    #[arg(long, default_value = "zc", value_parser = ["zc", "copy"])]
    pub send: String,
    /// Zero copy between the block layer and the network: auto (the best the
    /// kernel offers), on (fail where the kernel cannot), off (copy mode).
    #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
    pub zero_copy: String,
    /// Seconds before a request fails with EIO (1 to 3600).
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub io_timeout: u64,
    /// Seconds a node may stay unreachable before IO to its stripes fails at
    /// once with EIO (instead of waiting for --io-timeout); IO works again as
    /// soon as it is back (1 to 3600).
    #[arg(long, default_value_t = 15, value_name = "SECS")]
    pub node_down_timeout: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (port 0: any).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

pub fn map(args: MapArgs) -> Result<(), Failure> {
    use netblk::frontend::VolumeOptions;
    use netblk::layout::VolumeSpec;
    use netblk::ublk::device::{self, MapOptions};
    let options = MapOptions {
        volume: VolumeOptions {
            queues: args.queues,
            depth: args.depth,
            max_io: 1 << 20,
            send_mode: send_mode(&args.send),
            io_timeout: Duration::from_secs(args.io_timeout),
            node_down_timeout: Duration::from_secs(args.node_down_timeout),
            ..VolumeOptions::default()
        },
        block_size: args.block_size,
        zero_copy: match args.zero_copy.as_str() {
            "on" => device::ZeroCopy::On,
            "off" => device::ZeroCopy::Off,
            _ => device::ZeroCopy::Auto,
        },
        fail_queue: None,
    };
    // Every number given is checked, also with --recover (which takes its
    // options from the record instead).
    options.check().map_err(|e| Failure::Usage(e.to_string()))?;
    // The test hook is read once, here, for the map and for a recovery.
    let fail_queue = device::FailQueue::from_env().map_err(|e| Failure::Usage(e.to_string()))?;
    if let Some(device) = &args.recover {
        return recover(device, &args, fail_queue);
    }
    let options = MapOptions {
        fail_queue,
        ..options
    };
    let spec = VolumeSpec {
        name: args.volume.clone().unwrap_or_default(),
        size: args.size.unwrap_or_default(),
        stripe_unit: args.stripe_unit,
        nodes: args.nodes.clone(),
    };
    device::check(&spec, &options).map_err(|e| Failure::Usage(e.to_string()))?;
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
        device.path.name()
    );
    serve(device, &spec, &options, 0, signals, args.metrics_addr, true).map_err(Failure::Run)
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
    args: &MapArgs,
    fail_queue: Option<netblk::ublk::device::FailQueue>,
) -> Result<(), Failure> {
    use netblk::frontend::VolumeOptions;
    use netblk::layout::VolumeSpec;
    use netblk::ublk::device::{self, MapOptions};
    let id = state::parse_device(device)?;
    let dir = state::state_dir();
    let record = state::load(&dir, id)?.ok_or_else(|| {
        format!(
            "no record of /dev/ublkb{id} in {} (was it mapped by netblk on this host?)",
            dir.display()
        )
    })?;
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
    let generation = record
        .generation
        .checked_add(1)
        .ok_or_else(|| format!("/dev/ublkb{id} has been recovered too often"))?;
    let spec = VolumeSpec {
        name: record.volume.clone(),
        size: record.size,
        stripe_unit: record.stripe_unit,
        nodes: record.nodes.clone(),
    };
    let options = MapOptions {
        volume: VolumeOptions {
            queues: record.queues,
            depth: record.depth,
            max_io: 1 << 20,
            send_mode: send_mode(&record.send),
            io_timeout: Duration::from_secs(record.io_timeout_secs),
            node_down_timeout: Duration::from_secs(record.node_down_timeout_secs),
            client_id: record.client_id.clone(),
            session: u64::from(generation) << 32,
            volume_ids: record.volume_ids.clone(),
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
        device.path.name()
    );
    serve(
        device,
        &spec,
        &options,
        generation,
        signals,
        args.metrics_addr,
        true,
    )
    .map_err(Failure::Run)
}

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
/// `map --recover` takes over.
pub fn serve(
    mut device: netblk::ublk::device::Device,
    spec: &netblk::layout::VolumeSpec,
    options: &netblk::ublk::device::MapOptions,
    generation: u32,
    mut signals: signal_hook::iterator::Signals,
    metrics_addr: Option<SocketAddr>,
    print_path: bool,
) -> Result<(), String> {
    let dir = state::state_dir();
    let source = netblk::telemetry::Source {
        volume: spec.name.clone(),
        device: device.block_path(),
        nodes: spec.nodes.clone(),
        data_path: device.path.name().to_string(),
        queues: device.figures.clone(),
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
        data_path: device.path.name().to_string(),
        pid: std::process::id(),
        pid_start: process_start_time(std::process::id()).unwrap_or(0),
        client_id: vopts.client_id.clone(),
        generation,
        io_timeout_secs: vopts.io_timeout.as_secs(),
        node_down_timeout_secs: vopts.node_down_timeout.as_secs(),
        send: match vopts.send_mode {
            SendMode::Copy => "copy",
            SendMode::ZeroCopy => "zc",
        }
        .to_string(),
        volume_ids: device.volume_ids.clone(),
    };
    if let Err(err) = state::save(&dir, &record) {
        tracing::error!(
            dir = %dir.display(),
            error = %err,
            "cannot record the device: list, status, unmap and recovery will not see it"
        );
    }
    let socket = netblk::control::socket_path(&dir, device.dev_id);
    if let Err(err) = netblk::control::serve(&socket, source) {
        tracing::error!(socket = %socket.display(), error = %err, "no control socket: `netblk status` cannot ask this daemon");
    }
    // The path, once the device, its record, its control socket and its
    // metrics are all in place: scripts may use any of them from here.
    if print_path {
        println!("{}", device.block_path());
    }
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let path = device.block_path();
    // Test hook only (NETBLK_TEST_FAIL_QUEUE): when to make a queue fail.
    let mut hook_due = options
        .fail_queue
        .map(|hook| (hook, Instant::now() + hook.after));
    loop {
        use netblk::ublk::device::{FAIL_QUEUE_ENV, Supervision, supervise};
        let stop = signals.pending().next().is_some();
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
        match supervise(stop, &ended) {
            Supervision::Serve => std::thread::sleep(SUPERVISE_POLL),
            Supervision::Stop => {
                for end in &ended {
                    tracing::info!("{path}: {end}");
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
    let id = device.dev_id;
    let stopped = device.stop().map_err(|e| e.to_string());
    let _ = state::remove(&dir, id);
    let _ = std::fs::remove_file(&socket);
    stopped
}

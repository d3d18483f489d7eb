//! `netblk`: see `--help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod daemon;
mod pool_cli;

use clap::{Parser, Subcommand};
use netblk::bench::{self, BenchOptions};
use netblk::state;
use netblk::ublk::ctrl::{Control, daemon_alive, feature_names, terminate};
use netblk::uring::SendMode;
use netblk_observe::logging::LogFormat;
use netblk_protocol::units::parse_size;

/// netblk: a distributed network block storage client.
#[derive(Parser, Debug)]
#[command(name = "netblk", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// Log lines as text (coloured only on a terminal) or one JSON object
    /// a line; levels from RUST_LOG (default info).
    #[arg(long, global = true, default_value = "text", value_parser = parse_log_format)]
    log_format: LogFormat,
}

fn parse_log_format(text: &str) -> Result<LogFormat, String> {
    text.parse()
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Measure netblk against an upper-bound baseline in the same run.
    ///
    /// Starts mock nodes on 127.0.0.1 (or uses --nodes), then runs sequential
    /// 1 MiB writes and reads and random 4 KiB writes and reads, each for a
    /// fixed time at a fixed depth, and prints IOPS, MiB/s, p50/p99/p99.9
    /// latency and client CPU seconds per GiB for netblk and for its
    /// baseline, and netblk's IOPS as a ratio of the baseline's. The
    /// baseline ("wire") does the same operation to the same nodes over the
    /// same connections with no engine: prebuilt frames, one gathered send
    /// per connection at a time, one io_uring per queue.
    Bench(BenchArgs),
    /// Attach a striped volume as /dev/ublkbN and serve it until SIGINT or
    /// SIGTERM, then detach it cleanly. The device outlives a daemon that
    /// dies: `netblk map --recover N` attaches a new one and IO resumes.
    Map(Box<daemon::MapArgs>),
    /// Try netblk: start 3 mock nodes, map a volume over them, print the
    /// device and how to make a filesystem on it, serve until Ctrl-C, then
    /// unmap and stop the nodes. Without ublk in this kernel, says so and
    /// runs the same demo in a QEMU VM (`cargo xtask vm-demo`).
    Demo {
        /// Volume size: whole 512-byte blocks, at most 1 EiB.
        #[arg(long, default_value = "1G", value_parser = parse_size)]
        size: u64,
        /// Copies of every stripe column (1 to 5): the demo starts 3 ×
        /// replicas mock nodes.
        #[arg(long, default_value_t = 1)]
        replicas: u32,
    },
    /// Stop and remove a device: the daemon finishes in-flight IO, then the
    /// device goes away. A device in use (mounted, or held by another
    /// device) is refused: unmount it first.
    Unmap {
        /// /dev/ublkbN or N.
        device: String,
    },
    /// Grow a mapped volume online (or shrink it, with --force): every node
    /// is told the new size, then the device grows (Linux 6.16+, the ublk
    /// driver's UPDATE_SIZE; older kernels: a clear error and nothing
    /// changed). Grow a filesystem on it afterwards (`resize2fs`,
    /// `xfs_growfs`); update `size` in its volume file too.
    Resize {
        /// /dev/ublkbN or N.
        device: String,
        /// The new size of the whole volume (bytes; K, M, G, T suffixes).
        #[arg(value_parser = parse_size)]
        size: u64,
        /// Allow a smaller size: everything past it is lost.
        #[arg(long)]
        force: bool,
    },
    /// Compare the replicas of every column of a replicated device, by
    /// digests the nodes compute (no data comes to this host), beside the
    /// serving device; report the ranges that differ. With --repair,
    /// rewrite them from the column's lowest in-sync replica. Exits 1 when
    /// ranges differ and were not repaired.
    Scrub {
        /// /dev/ublkbN or N.
        device: String,
        /// Rewrite differing ranges from the column's lowest in-sync replica.
        #[arg(long)]
        repair: bool,
        /// The report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Replace a member of a replicated device with a new node, online: the
    /// old one leaves its column (another member must be in sync), the new
    /// one joins it and is rebuilt in full from an in-sync member, then
    /// serves; nothing more goes to the old one. Waits until the new one is
    /// in sync unless --no-wait. Map the volume with the new address from
    /// then on (volume files, StorageClasses): an attach with the old one
    /// is refused.
    Replace {
        /// /dev/ublkbN or N.
        device: String,
        /// The member to replace (host:port, as mapped).
        #[arg(long)]
        node: std::net::SocketAddr,
        /// The node that takes its place (host:port).
        #[arg(long = "with")]
        with: std::net::SocketAddr,
        /// Return once the new node is joining instead of once it is in sync.
        #[arg(long)]
        no_wait: bool,
    },
    /// Print the volume name of a netblk device (ublkbN, /dev/ublkbN or N)
    /// from its record: what the udev rule names /dev/netblk/VOLUME after.
    /// Prints nothing and exits 1 for a device netblk has no record of.
    UdevName { device: String },
    /// Show each device as its daemon sees it: volume, data path, state,
    /// and per node: connection (or down since when), session, pieces in
    /// flight, reconnects, p50/p99 latency over the last minute, last error.
    ///
    /// Asks each live daemon over its control socket; a device whose daemon
    /// is gone is shown from its record.
    Status {
        /// Only this device (/dev/ublkbN or N).
        device: Option<String>,
        /// One JSON array of devices, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Pools of nodes: check a pool file, preview a volume's placement,
    /// list the volumes on a pool, remove a node no volume uses.
    #[command(subcommand)]
    Pool(pool_cli::PoolCmd),
    /// Create a volume over a pool: its columns × replicas nodes chosen by
    /// weighted rendezvous hashing of its name, replicas of a column in
    /// distinct failure domains, and the placement written into its
    /// membership record on every node (`netblk map --pool` reads it
    /// there). Creating a volume that exists as asked changes nothing.
    Create(pool_cli::CreateArgs),
    /// Delete a volume created over a pool, with its data, from the nodes
    /// its placement record names.
    Delete(pool_cli::DeleteArgs),
    /// Show every netblk device: id, path, volume, nodes, data path, state.
    ///
    /// A record that cannot be read is reported by its file name and the
    /// others are still shown; the exit status is then 1.
    List,
    /// Show what this kernel offers netblk: ublk driver features and the
    /// io_uring operations the data path uses.
    Features,
    /// Exercise the ublk control path without serving IO: add a device, set
    /// its parameters, read its info back, delete it. Needs ublk_drv and root.
    UblkCheck,
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// Use these nodes (comma separated) instead of starting mock nodes.
    #[arg(long, value_delimiter = ',', value_name = "ADDR,...")]
    nodes: Vec<SocketAddr>,
    /// How many mock nodes to start (1 to 64).
    #[arg(long, default_value_t = 4, value_name = "N")]
    node_count: usize,
    /// Copies of every stripe column (1 to 5): the nodes form node count /
    /// replicas columns.
    #[arg(long, default_value_t = 1, value_name = "R")]
    replicas: u32,
    /// The netblk-mock-node binary [default: beside this program].
    #[arg(long, value_name = "PATH")]
    mock_node: Option<PathBuf>,
    /// Queue threads (1 to 64; each has one connection per node).
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// Requests in flight, shared among the queues (from --queues to 4096).
    #[arg(long, default_value_t = 32)]
    depth: u16,
    /// Seconds per workload (fractions allowed; 0.001 to 3600).
    #[arg(long, default_value_t = 3.0, value_name = "SECS")]
    duration: f64,
    /// Send mode to measure: zc, copy, or both (compared in one run).
    #[arg(long, default_value = "both", value_parser = ["zc", "copy", "both"])]
    mode: String,
    /// Stripe unit (bytes; K, M suffixes): a power of two from 4K to 4M.
    #[arg(long, default_value = "128K", value_parser = parse_stripe_unit, value_name = "SIZE")]
    stripe_unit: u32,
    /// Volume size (bytes; K, M, G, T suffixes): from 1M to 1 EiB, whole
    /// 512-byte sectors.
    #[arg(long, default_value = "1G", value_parser = parse_size, value_name = "SIZE")]
    size: u64,
    /// Store of the mock nodes started: null (measures client and network
    /// only) or memory.
    #[arg(long, default_value = "null", value_parser = ["null", "memory"])]
    node_store: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics while it runs.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Also run each 4 KiB workload with and without recording figures
    /// (alternating pairs) and print what recording costs.
    #[arg(long)]
    metrics_overhead: bool,
    /// Workloads to run (comma separated): seqwrite-1m, seqread-1m,
    /// randwrite-4k, randread-4k [default: all].
    #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
    workloads: Vec<bench::Workload>,
    /// Pairs of runs per workload (1 to 99), netblk and its baseline, which
    /// goes first alternating; the median pair is shown, with the spread of
    /// the ratio.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Run everything at 1 and 2 queues over 1, 2, 4 and 8 nodes (with
    /// --nodes, the first that many) and print the curve, with the CPU of
    /// the client and of the mock nodes.
    #[arg(long)]
    sweep: bool,
    /// Measure what protection costs instead: each workload with CRC-32C
    /// data digests, and over mutual TLS with --tls-dir, against plaintext
    /// (the same operation over the same connections), in rotating rounds.
    #[arg(long)]
    security: bool,
    /// With --security: a directory with ca.pem, node.pem, node.key,
    /// client.pem and client.key (`cargo xtask test-certs DIR` makes one).
    #[arg(long, value_name = "DIR", requires = "security")]
    tls_dir: Option<std::path::PathBuf>,
    /// Measure what a catch-up costs instead: random 4 KiB writes while a
    /// member catches up (after a pass of writes while it was out) against
    /// the same writes with every member in sync, in rounds (needs
    /// --replicas 2 or more).
    #[arg(long, conflicts_with_all = ["security", "sweep"])]
    resync: bool,
    /// With --resync: the catch-up's rate limit (bytes a second; K, M, G
    /// suffixes; 0: none).
    #[arg(long, default_value = "64M", value_parser = parse_size, value_name = "BYTES", requires = "resync")]
    resync_rate: u64,
}

fn parse_stripe_unit(text: &str) -> Result<u32, String> {
    let size = parse_size(text)?;
    u32::try_from(size).map_err(|_| format!("stripe unit {size} is too large"))
}

/// Why a command failed.
#[derive(Debug)]
enum Failure {
    /// Bad input, found before anything started: exit status 2, as for
    /// clap's own errors.
    Usage(String),
    /// Anything else: exit status 1.
    Run(String),
}

impl From<String> for Failure {
    fn from(why: String) -> Failure {
        Failure::Run(why)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    netblk_observe::logging::init(cli.log_format);
    let result = match cli.command {
        Cmd::Bench(args) => run_bench(args),
        Cmd::Map(args) => daemon::map(*args),
        Cmd::Demo { size, replicas } => demo(size, replicas),
        Cmd::Unmap { device } => unmap(&device).map_err(Failure::Run),
        Cmd::UdevName { device } => udev_name(&device).map_err(Failure::Run),
        Cmd::Resize {
            device,
            size,
            force,
        } => resize(&device, size, force).map_err(Failure::Run),
        Cmd::Scrub {
            device,
            repair,
            json,
        } => scrub(&device, repair, json).map_err(Failure::Run),
        Cmd::Replace {
            device,
            node,
            with,
            no_wait,
        } => replace(&device, node, with, !no_wait).map_err(Failure::Run),
        Cmd::Pool(cmd) => pool_cli::run(cmd).map_err(Failure::Run),
        Cmd::Create(args) => pool_cli::create(args).map_err(Failure::Run),
        Cmd::Delete(args) => pool_cli::delete(args).map_err(Failure::Run),
        Cmd::List => list().map_err(Failure::Run),
        Cmd::Status { device, json } => status(device.as_deref(), json).map_err(Failure::Run),
        Cmd::Features => features().map_err(Failure::Run),
        Cmd::UblkCheck => ublk_check().map_err(Failure::Run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(why)) => {
            eprintln!("netblk: {why}");
            ExitCode::from(2)
        }
        Err(Failure::Run(why)) => {
            eprintln!("netblk: {why}");
            ExitCode::FAILURE
        }
    }
}

fn run_bench(args: BenchArgs) -> Result<(), Failure> {
    let modes = match args.mode.as_str() {
        "zc" => vec![SendMode::ZeroCopy],
        "copy" => vec![SendMode::Copy],
        _ => vec![SendMode::ZeroCopy, SendMode::Copy],
    };
    let options = BenchOptions {
        nodes: args.nodes,
        node_count: args.node_count,
        replicas: args.replicas,
        mock_node_bin: args.mock_node,
        queues: args.queues,
        depth: args.depth,
        duration: bench::duration_from_secs(args.duration).map_err(Failure::Usage)?,
        modes,
        stripe_unit: args.stripe_unit,
        volume_size: args.size,
        node_store: args.node_store,
        telemetry: None,
        metrics_overhead: args.metrics_overhead,
        security: args.security,
        tls_dir: args.tls_dir.clone(),
        resync: args.resync,
        resync_rate: args.resync_rate,
        workloads: if args.workloads.is_empty() {
            bench::Workload::ALL.to_vec()
        } else {
            args.workloads
        },
        rounds: args.rounds,
        sweep: args.sweep,
    };
    options.check().map_err(Failure::Usage)?;
    let options = BenchOptions {
        telemetry: daemon::start_metrics(args.metrics_addr)?,
        ..options
    };
    let json = args.json;
    let report = bench::run(&options, &mut |step| {
        if !json {
            eprintln!("... {step}");
        }
    })
    .map_err(|e| e.to_string())?;
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

fn features() -> Result<(), String> {
    for (mode, name) in [
        (SendMode::Copy, "copy sends"),
        (SendMode::ZeroCopy, "zero-copy sends (SEND_ZC)"),
    ] {
        match netblk::uring::probe(mode) {
            Ok(()) => println!("io_uring: {name}: yes"),
            Err(err) => println!("io_uring: {name}: no ({err})"),
        }
    }
    let yes = |b: bool| if b { "yes" } else { "no" };
    println!(
        "io_uring: plain SEND / RECV from a fixed buffer: {} / {}",
        yes(netblk::uring::probe_send_fixed()),
        yes(netblk::uring::probe_recv_fixed())
    );
    let mut ctrl = Control::open().map_err(|e| e.to_string())?;
    let bits = ctrl.features().map_err(|e| e.to_string())?;
    println!("ublk features: {bits:#x} {}", feature_names(bits).join(" "));
    Ok(())
}

fn ublk_check() -> Result<(), String> {
    use netblk::ublk::sys;
    let mut ctrl = Control::open().map_err(|e| e.to_string())?;
    let info = sys::DevInfo {
        nr_hw_queues: 1,
        queue_depth: 32,
        max_io_buf_bytes: 1 << 20,
        dev_id: u32::MAX,
        ..sys::DevInfo::default()
    };
    let added = ctrl.add(info).map_err(|e| e.to_string())?;
    let id = added.dev_id;
    println!("ublk: added device {id}");
    let params = sys::Params {
        len: std::mem::offset_of!(sys::Params, devt) as u32,
        types: sys::UBLK_PARAM_TYPE_BASIC,
        basic: sys::ParamBasic {
            attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
            logical_bs_shift: 9,
            physical_bs_shift: 12,
            io_opt_shift: 12,
            io_min_shift: 9,
            max_sectors: (1 << 20) >> 9,
            dev_sectors: (1 << 30) >> 9,
            ..sys::ParamBasic::default()
        },
        ..sys::Params::default()
    };
    let result = ctrl
        .set_params(id, &params)
        .and_then(|()| ctrl.info(id))
        .map(|info| {
            println!(
                "ublk: device {id}: state {}, {} queue(s) of depth {}, max IO {} bytes, flags {:#x}",
                info.state, info.nr_hw_queues, info.queue_depth, info.max_io_buf_bytes, info.flags
            );
        });
    ctrl.delete(id).map_err(|e| e.to_string())?;
    println!("ublk: deleted device {id}");
    result.map_err(|e| e.to_string())
}

fn status(device: Option<&str>, json: bool) -> Result<(), String> {
    let only = device.map(state::parse_device).transpose()?;
    let dir = state::state_dir();
    let mut ctrl = Control::open().ok();
    let (devices, errors) = netblk::control::status_all(&dir, only, |record| {
        let info = ctrl.as_mut().and_then(|c| c.info(record.id).ok());
        state::device_state(
            info.map(|i| i.state),
            daemon_alive(record.pid, record.pid_start),
        )
        .to_string()
    });
    if let Some(id) = only
        && devices.is_empty()
        && errors.is_empty()
    {
        return Err(format!(
            "no netblk device {id} (`netblk list` shows the mapped ones)"
        ));
    }
    if json {
        println!("{}", serde_json::Value::Array(devices));
    } else {
        print!("{}", netblk::control::status_text(&devices));
    }
    for why in &errors {
        eprintln!("netblk: {why}");
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} device record(s) in {} could not be read (see above)",
            errors.len(),
            dir.display()
        ))
    }
}

fn unmap(device: &str) -> Result<(), String> {
    let id = state::parse_device(device)?;
    let dir = state::state_dir();
    let record = state::load(&dir, id)?;
    let mut ctrl = Control::open().map_err(|e| e.to_string())?;
    let exists = ctrl.info(id).is_ok();
    let in_use = exists
        .then(|| netblk::ublk::device::block_in_use(&format!("/dev/ublkb{id}")))
        .flatten();
    match (record, exists, in_use) {
        (None, false, _) => Err(format!(
            "no netblk device {id} (`netblk list` shows the mapped ones)"
        )),
        (Some(_), false, _) => {
            let _ = state::remove(&dir, id);
            Err(format!(
                "/dev/ublkb{id} is already gone (its stale record was removed)"
            ))
        }
        (_, true, Some(why)) => Err(format!(
            "/dev/ublkb{id} is in use ({why}): unmount or close it first"
        )),
        (record, true, None) => {
            match record
                .as_ref()
                .filter(|r| daemon_alive(r.pid, r.pid_start))
                .map(|r| r.pid)
            {
                Some(pid) => {
                    // The daemon drains in-flight IO, stops and deletes the device.
                    terminate(pid).map_err(|e| format!("cannot signal the daemon {pid}: {e}"))?;
                    let deadline = std::time::Instant::now() + Duration::from_secs(60);
                    while ctrl.info(id).is_ok() {
                        if std::time::Instant::now() > deadline {
                            return Err(format!(
                                "/dev/ublkb{id} still exists 60 s after asking daemon {pid} to stop"
                            ));
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
                None => {
                    // No daemon: nothing is in flight; take the device down here.
                    ctrl.stop(id).map_err(|e| e.to_string())?;
                    ctrl.delete(id).map_err(|e| e.to_string())?;
                }
            }
            let _ = state::remove(&dir, id);
            println!("unmapped /dev/ublkb{id}");
            Ok(())
        }
    }
}

fn resize(device: &str, size: u64, force: bool) -> Result<(), String> {
    let (id, socket) = live_daemon(device, "to resize it")?;
    let command = format!("resize {size}{}", if force { " force" } else { "" });
    let answer = netblk::control::ask_within(&socket, &command, netblk::control::RESIZE_TIMEOUT)
        .map_err(|e| format!("cannot ask the daemon of /dev/ublkb{id}: {e}"))?;
    if let Some(why) = answer.get("error").and_then(|e| e.as_str()) {
        return Err(why.to_string());
    }
    let from = answer
        .get("from")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    if from == size {
        println!("/dev/ublkb{id} is already {size} bytes");
    } else {
        println!("resized /dev/ublkb{id} from {from} to {size} bytes");
    }
    Ok(())
}

/// Device `device`'s id and control socket, if its daemon runs (`what`:
/// what it is needed for, in the error).
fn live_daemon(device: &str, what: &str) -> Result<(u32, std::path::PathBuf), String> {
    let id = state::parse_device(device)?;
    let dir = state::state_dir();
    let record = state::load(&dir, id)?
        .ok_or_else(|| format!("no netblk device {id} (`netblk list` shows the mapped ones)"))?;
    if !daemon_alive(record.pid, record.pid_start) {
        return Err(format!(
            "/dev/ublkb{id} has no running daemon {what}: `netblk map --recover /dev/ublkb{id}` first"
        ));
    }
    Ok((id, netblk::control::socket_path(&dir, id)))
}

fn replace(
    device: &str,
    old: std::net::SocketAddr,
    new: std::net::SocketAddr,
    wait: bool,
) -> Result<(), String> {
    let (id, socket) = live_daemon(device, "to replace a member")?;
    let answer = netblk::control::ask_within(
        &socket,
        &format!("replace {old} {new}"),
        netblk::control::RESIZE_TIMEOUT,
    )
    .map_err(|e| format!("cannot ask the daemon of /dev/ublkb{id}: {e}"))?;
    if let Some(why) = answer.get("error").and_then(|e| e.as_str()) {
        return Err(why.to_string());
    }
    let node = answer["node"]
        .as_u64()
        .ok_or("the daemon did not say which member")?;
    println!("/dev/ublkb{id}: node {node} is {new} now (was {old}); rebuilding it");
    if !wait {
        return Ok(());
    }
    // Until the member is in sync again (status: in its column's in-sync
    // list), as long as it is joining: one that does not join within a
    // minute does not answer (the daemon keeps probing it).
    let mut last_seen = std::time::Instant::now();
    loop {
        if last_seen.elapsed() > std::time::Duration::from_secs(60) {
            return Err(format!(
                "{new} has not joined within a minute: it does not answer, or holds another volume under this name; the daemon keeps trying (`netblk status`)"
            ));
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
        let status = netblk::control::ask(&socket, "status")
            .map_err(|e| format!("cannot ask the daemon of /dev/ublkb{id}: {e}"))?;
        let columns = status["replication"]["columns"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let in_sync = columns.iter().any(|c| {
            c["in_sync"]
                .as_array()
                .is_some_and(|m| m.iter().any(|n| n.as_u64() == Some(node)))
        });
        if in_sync {
            println!("/dev/ublkb{id}: {new} is in sync");
            return Ok(());
        }
        if let Some(j) = columns
            .iter()
            .flat_map(|c| c["joining"].as_array().cloned().unwrap_or_default())
            .find(|j| j["node"].as_u64() == Some(node))
        {
            last_seen = std::time::Instant::now();
            if let Some(pct) = j["percent"].as_f64() {
                println!("/dev/ublkb{id}: {new} rebuilding {pct:.1}%");
            }
        }
    }
}

fn scrub(device: &str, repair: bool, json: bool) -> Result<(), String> {
    let (id, socket) = live_daemon(device, "to scrub it")?;
    let command = if repair { "scrub repair" } else { "scrub" };
    let answer = netblk::control::ask_within(&socket, command, netblk::control::SCRUB_TIMEOUT)
        .map_err(|e| format!("cannot ask the daemon of /dev/ublkb{id}: {e}"))?;
    if let Some(why) = answer.get("error").and_then(|e| e.as_str()) {
        return Err(why.to_string());
    }
    let list = |key: &str| answer[key].as_array().cloned().unwrap_or_default();
    let (mismatches, skipped) = (list("mismatches"), list("skipped"));
    let repaired = answer["repaired"].as_u64().unwrap_or(0);
    if json {
        println!("{answer}");
    } else {
        for m in &mismatches {
            println!(
                "column {} at {} ({} bytes): nodes {} differ{}",
                m["column"],
                m["offset"],
                m["length"],
                m["members"],
                if repair { ", repaired" } else { "" }
            );
        }
        for s in &skipped {
            println!(
                "node {} at {}: not compared: {}",
                s["node"], s["offset"], s["why"]
            );
        }
        println!(
            "/dev/ublkb{id}: {} chunks compared, {} differ, {} repaired, {} not compared",
            answer["chunks"].as_u64().unwrap_or(0),
            mismatches.len(),
            repaired,
            skipped.len()
        );
    }
    if mismatches.len() as u64 > repaired {
        return Err(format!(
            "{} ranges differ: `netblk scrub --repair /dev/ublkb{id}` rewrites them",
            mismatches.len() as u64 - repaired
        ));
    }
    Ok(())
}

fn udev_name(device: &str) -> Result<(), String> {
    let id = state::parse_device(device)?;
    let record = state::load(&state::state_dir(), id)?
        .ok_or_else(|| format!("no record of /dev/ublkb{id}: not a netblk device"))?;
    println!("{}", record.volume);
    Ok(())
}

fn list() -> Result<(), String> {
    let dir = state::state_dir();
    let records = state::list(&dir);
    let mut ctrl = Control::open().ok();
    println!(
        "{:<4} {:<14} {:<16} {:<18} {:<8} NODES",
        "ID", "DEVICE", "VOLUME", "DATA PATH", "STATE"
    );
    let mut unreadable = 0;
    for record in records {
        let record = match record {
            Ok(r) => r,
            Err(why) => {
                eprintln!("netblk: {why}");
                unreadable += 1;
                continue;
            }
        };
        let info = ctrl.as_mut().and_then(|c| c.info(record.id).ok());
        let state = state::device_state(
            info.map(|i| i.state),
            daemon_alive(record.pid, record.pid_start),
        );
        let nodes: Vec<String> = record.nodes.iter().map(ToString::to_string).collect();
        println!(
            "{:<4} {:<14} {:<16} {:<18} {:<8} {}",
            record.id,
            format!("/dev/ublkb{}", record.id),
            record.volume,
            record.data_path,
            state,
            nodes.join(",")
        );
    }
    if unreadable > 0 {
        return Err(format!(
            "{unreadable} device record(s) in {} could not be read (see above)",
            dir.display()
        ));
    }
    Ok(())
}

fn demo(size: u64, replicas: u32) -> Result<(), Failure> {
    use netblk::frontend::VolumeOptions;
    use netblk::layout::VolumeSpec;
    use netblk::ublk::ctrl::CtrlError;
    use netblk::ublk::device::{self, MapOptions, ZeroCopy};
    const COLUMNS: u16 = 3;
    let nodes = COLUMNS.saturating_mul(u16::try_from(replicas).unwrap_or(u16::MAX));
    // Checked with stand-in addresses before any node starts.
    let mut spec = VolumeSpec {
        name: "demo".into(),
        size,
        stripe_unit: 128 << 10,
        nodes: (1..=nodes)
            .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
            .collect(),
        replicas,
    };
    let options = MapOptions {
        volume: VolumeOptions {
            queues: 2,
            ..VolumeOptions::default()
        },
        block_size: 512,
        zero_copy: ZeroCopy::Auto,
        fail_queue: None,
    };
    device::check(&spec, &options).map_err(|e| Failure::Usage(e.to_string()))?;
    if let Err(CtrlError::NoDriver) = Control::open() {
        println!(
            "netblk demo: this kernel has no ublk driver, so the demo runs in a QEMU VM with a 7.3 kernel (cargo xtask vm-demo)"
        );
        let in_tree = std::path::Path::new("xtask/Cargo.toml").exists();
        if !in_tree {
            return Err(Failure::Run("run `cargo xtask vm-demo` from a netblk source checkout, or use a kernel with ublk_drv".into()));
        }
        let status = std::process::Command::new("cargo")
            .args(["xtask", "vm-demo"])
            .status()
            .map_err(|e| format!("cannot run cargo xtask vm-demo: {e}"))?;
        return if status.success() {
            Ok(())
        } else {
            Err(Failure::Run(format!("vm-demo failed ({status})")))
        };
    }
    let bin = netblk::mock::mock_node_bin(None).map_err(|e| e.to_string())?;
    let (_nodes, addrs) = netblk::mock::start_mock_nodes(usize::from(nodes), &bin, "memory", &[])
        .map_err(|e| e.to_string())?;
    spec.nodes = addrs;
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .map_err(|e| format!("signals: {e}"))?;
    let device = device::map(&spec, &options).map_err(|e| e.to_string())?;
    let path = device.block_path();
    let nodes: Vec<String> = spec.nodes.iter().map(ToString::to_string).collect();
    println!("{path}");
    println!(
        "netblk demo: {path} is a {} volume striped over {COLUMNS} columns × {replicas} replica(s) on mock nodes ({}), data path: {}",
        netblk_size(size),
        nodes.join(", "),
        device.path.name()
    );
    println!("try:  mkfs.ext4 {path} && mkdir -p /mnt/netblk && mount {path} /mnt/netblk");
    println!("then: umount /mnt/netblk, and Ctrl-C here to unmap and stop the nodes");
    let served = daemon::serve(device, &spec, &options, 0, signals, None, false, None);
    if served.is_ok() {
        println!("netblk demo: unmapped {path}; stopping the nodes");
    }
    Ok(served?)
}

fn netblk_size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b => format!("{b} bytes"),
    }
}

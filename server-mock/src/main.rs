//! `netblk-mock-node`: see `--help`.

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use netblk_mock_node::{Config, Server, StoreKind, parse_size};
use netblk_observe::logging::LogFormat;
use netblk_protocol::pb::{self, CorruptPart, Status};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// A netblk storage node for tests, demos and benchmarks.
///
/// Serves any number of volumes over the netblk wire protocol v1. A volume is
/// created by the first client that names it, with that client's size and
/// layout; later clients must present the same. Prints `listening on
/// <ip:port>` on stdout once it accepts connections. SIGTERM or SIGINT: stop
/// accepting, finish in-flight requests, flush the store, exit 0.
///
/// Faults given here are in force from the start; the admin protocol (only
/// on `--admin-listen`, off by default) reads and changes them while the
/// node runs.
#[derive(Parser, Debug)]
#[command(name = "netblk-mock-node", version, max_term_width = 100)]
struct Args {
    /// Address to listen on. Port 0 picks a free port (see the `listening on` line).
    #[arg(long, default_value = "127.0.0.1:0", value_name = "IP:PORT")]
    listen: SocketAddr,

    /// Serve Prometheus metrics at http://ADDR/metrics (port 0: any; the
    /// address is logged).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,

    /// Log lines as text (coloured only on a terminal) or one JSON object a
    /// line; levels from RUST_LOG (default info).
    #[arg(long, default_value = "text", value_parser = parse_log_format)]
    log_format: LogFormat,

    /// Where volumes live: `memory` (sparse, lost at exit), `dir:PATH` (one
    /// sparse file per volume under PATH; flush and FUA writes are durable;
    /// survives restarts), or `null` (keeps nothing, reads return zeroes: for
    /// benchmarking clients and networks).
    #[arg(long, default_value = "memory", value_name = "memory|dir:PATH|null")]
    store: StoreKind,

    /// Largest payload one request may carry (bytes; K, M, G suffixes).
    #[arg(long, default_value = "4M", value_parser = parse_io_size, value_name = "SIZE")]
    max_io_size: u32,

    /// Name this node gives in handshake replies [default: mock-<listen address>].
    #[arg(long, value_name = "ID")]
    node_id: Option<String>,

    /// Seconds to wait for in-flight requests on shutdown before exiting
    /// anyway (0 to 3600).
    #[arg(long, default_value_t = 10, value_name = "SECS", value_parser = clap::value_parser!(u64).range(0..=3600))]
    drain_timeout: u64,

    /// Seconds a new connection may take to send its handshake before it is
    /// closed (1 to 3600).
    #[arg(long, default_value_t = 10, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    handshake_timeout: u64,

    /// Accept admin connections (fault changes, statistics, crash: test
    /// tools) on a listener of their own at ADDR (port 0: any; printed as
    /// `admin listening on <ip:port>`). Off unless given; the data port
    /// never takes them.
    #[arg(long, value_name = "IP:PORT")]
    admin_listen: Option<SocketAddr>,

    /// Mutual TLS (1.3) on the data port: this node's certificate chain
    /// (PEM). With --tls-key and --tls-client-ca; a file changed on disk is
    /// used from the next connection on.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_client_ca"])]
    tls_cert: Option<std::path::PathBuf>,

    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,

    /// The CA clients' certificates must be signed by (PEM): a client
    /// without one is refused before it can name a volume.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_client_ca: Option<std::path::PathBuf>,

    /// Which clients may open, resize and delete which volumes: one rule a
    /// line, `IDENTITY VOLUMES OPERATIONS` (`*` in a pattern: any run of
    /// characters; `-` as the identity: plaintext clients; operations
    /// `open,resize,delete` or `all`). A client's identity is what its
    /// certificate names. Read again when the file changes. Without it,
    /// every client may do everything.
    #[arg(long, value_name = "FILE")]
    policy: Option<std::path::PathBuf>,

    /// Unsent reply bytes a connection may pile up (a client that does not
    /// read its replies) before the node takes no more of its requests
    /// until it reads them (64K to 1G).
    #[arg(long, default_value = "8M", value_parser = parse_reply_backlog, value_name = "SIZE")]
    reply_backlog: usize,

    /// Worker threads serving the data connections (each an epoll loop;
    /// default: one per CPU, at most 4).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: Option<u16>,

    /// Do not fence a client's older sessions when it reconnects. Unsafe:
    /// stale requests of a dead connection may then overwrite newer data.
    /// Only for demonstrating that hazard.
    #[arg(long, help_heading = "Fault injection")]
    no_fencing: bool,

    /// Break a rule of the node protocol on purpose (repeatable), so that
    /// `netblk-node-check` can be shown to find it. Never in production.
    #[arg(long, value_enum, value_name = "RULE", hide = true)]
    broken: Vec<netblk_mock_node::Broken>,

    /// Model a disk with a volatile write cache: writes stay in memory until
    /// a FLUSH (or their own FUA); a crash or kill -9 loses the rest.
    #[arg(long, help_heading = "Fault injection")]
    volatile_cache: bool,

    /// Hold every request this many microseconds before executing it (at
    /// most one hour).
    #[arg(
        long,
        default_value_t = 0,
        value_name = "US",
        help_heading = "Fault injection"
    )]
    latency_us: u64,

    /// Add a random 0..=US microseconds to each request's latency (replies
    /// then come back out of order; at most one hour).
    #[arg(
        long,
        default_value_t = 0,
        value_name = "US",
        help_heading = "Fault injection"
    )]
    jitter_us: u64,

    /// Answer each request with an error instead, with this probability (0 to 1).
    #[arg(
        long,
        default_value_t = 0.0,
        value_name = "P",
        help_heading = "Fault injection"
    )]
    error_probability: f64,

    /// The error injected replies carry: eio, enospc, einval, eopnotsupp,
    /// erange, eagain, etimedout.
    #[arg(long, default_value = "eio", value_parser = parse_status, value_name = "ERRNO", help_heading = "Fault injection")]
    error_status: Status,

    /// Close each connection once it has received N requests; request N+1
    /// gets no reply (0 = never).
    #[arg(
        long,
        default_value_t = 0,
        value_name = "N",
        help_heading = "Fault injection"
    )]
    drop_after: u64,

    /// Stall: take requests but answer none until the stall is cleared over
    /// the admin protocol.
    #[arg(long, help_heading = "Fault injection")]
    stall: bool,

    /// Corrupt the next N reply frames: one byte of each is XORed with a
    /// nonzero mask, at a place --corrupt-part allows.
    #[arg(
        long,
        default_value_t = 0,
        value_name = "N",
        help_heading = "Fault injection"
    )]
    corrupt_replies: u32,

    /// Where --corrupt-replies flips its byte. `any`: the preamble or the
    /// protobuf header, only where the frame then no longer decodes as a
    /// reply, which a client detects (it reconnects and resends).
    /// `preamble`, `header`: any byte of that part, whatever it does (a
    /// header flip may yield a valid reply with another id or status; a
    /// longer header length leaves the client waiting for bytes). `payload`:
    /// any byte of a read's data, which a client detects only with data
    /// digests (it reads again; without them data goes wrong silently);
    /// replies without data are passed over and not counted. Byte and mask
    /// come from --fault-seed.
    #[arg(
        long,
        default_value = "any",
        value_parser = parse_corrupt_part,
        value_name = "any|preamble|header|payload",
        help_heading = "Fault injection"
    )]
    corrupt_part: CorruptPart,

    /// Corrupt the payload of the next N writes as they arrive (one byte
    /// XORed, before any check), as a bad NIC would: with data digests the
    /// node refuses them and the client sends them again; without, the
    /// store keeps the wrong bytes.
    #[arg(
        long,
        default_value_t = 0,
        value_name = "N",
        help_heading = "Fault injection"
    )]
    corrupt_writes: u32,

    /// Exit at once (a crash: exit code 86, nothing flushed) when the node has
    /// received N requests in all (0 = never).
    #[arg(
        long,
        default_value_t = 0,
        value_name = "N",
        help_heading = "Fault injection"
    )]
    crash_after: u64,

    /// Seed for the random draws of jitter, error injection and where
    /// corruption lands (a stream of its own) [default: from the clock].
    #[arg(long, value_name = "SEED", help_heading = "Fault injection")]
    fault_seed: Option<u64>,
}

fn parse_io_size(text: &str) -> Result<u32, String> {
    let size = parse_size(text)?;
    match u32::try_from(size) {
        Ok(size) if (4096..=(64 << 20)).contains(&size) => Ok(size),
        _ => Err(format!("max IO size {size} must be from 4K to 64M")),
    }
}

fn parse_reply_backlog(text: &str) -> Result<usize, String> {
    let size = parse_size(text)?;
    match usize::try_from(size) {
        Ok(size) if ((64 << 10)..=(1 << 30)).contains(&size) => Ok(size),
        _ => Err(format!("reply backlog {size} must be from 64K to 1G")),
    }
}

fn parse_status(text: &str) -> Result<Status, String> {
    Ok(match text.to_ascii_lowercase().as_str() {
        "eio" => Status::IoError,
        "enospc" => Status::NoSpace,
        "einval" => Status::Invalid,
        "eopnotsupp" => Status::NotSupported,
        "erange" => Status::OutOfRange,
        "eagain" => Status::Busy,
        "etimedout" => Status::TimedOut,
        _ => {
            return Err(format!(
                "unknown error '{text}': use eio, enospc, einval, eopnotsupp, erange, eagain or etimedout"
            ));
        }
    })
}

fn parse_corrupt_part(text: &str) -> Result<CorruptPart, String> {
    Ok(match text.to_ascii_lowercase().as_str() {
        "any" => CorruptPart::Any,
        "preamble" => CorruptPart::Preamble,
        "header" => CorruptPart::Header,
        "payload" => CorruptPart::Payload,
        _ => {
            return Err(format!(
                "unknown part '{text}': use any, preamble, header or payload"
            ));
        }
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    netblk_observe::logging::init(args.log_format);

    let faults = pb::Faults {
        latency_us: args.latency_us,
        jitter_us: args.jitter_us,
        error_probability: args.error_probability,
        error_status: args.error_status as i32,
        drop_after: args.drop_after,
        stall: args.stall,
        corrupt_replies: args.corrupt_replies,
        crash_after: args.crash_after,
        stall_open_only: false,
        corrupt_part: args.corrupt_part as i32,
        corrupt_writes: args.corrupt_writes,
    };
    if let Err(why) = netblk_mock_node::faults::check(&faults) {
        eprintln!("netblk-mock-node: {why}");
        return ExitCode::from(2);
    }
    let mut config = Config::new(args.listen, args.store);
    config.max_io_size = args.max_io_size;
    config.reply_backlog = args.reply_backlog;
    config.node_id = args.node_id.unwrap_or_default();
    config.drain_timeout = Duration::from_secs(args.drain_timeout);
    config.handshake_timeout = Duration::from_secs(args.handshake_timeout);
    config.admin_listen = args.admin_listen;
    if let (Some(cert), Some(key), Some(client_ca)) =
        (args.tls_cert, args.tls_key, args.tls_client_ca)
    {
        let files = netblk_tls::config::ServerFiles {
            cert,
            key,
            client_ca,
        };
        match netblk_tls::config::Reloading::server(files) {
            Ok(tls) => config.tls = Some(std::sync::Arc::new(tls)),
            Err(why) => {
                eprintln!("netblk-mock-node: TLS: {why}");
                return ExitCode::from(2);
            }
        }
    }
    if let Some(path) = args.policy {
        let paths = vec![path.clone()];
        match netblk_tls::config::Reloading::new(
            "policy",
            path,
            paths,
            netblk_mock_node::policy::Policy::load,
        ) {
            Ok(policy) => config.policy = Some(std::sync::Arc::new(policy)),
            Err(why) => {
                eprintln!("netblk-mock-node: policy: {why}");
                return ExitCode::from(2);
            }
        }
    }
    config.fencing = !args.no_fencing;
    config.broken = args.broken.clone();
    if let Some(threads) = args.threads {
        config.threads = usize::from(threads);
    }
    config.volatile_cache = args.volatile_cache;
    config.faults = faults;
    config.fault_seed = args.fault_seed.unwrap_or_else(clock_seed);

    match serve(config, args.metrics_addr) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("netblk-mock-node: {err}");
            ExitCode::FAILURE
        }
    }
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn parse_log_format(text: &str) -> Result<LogFormat, String> {
    text.parse()
}

fn serve(config: Config, metrics_addr: Option<SocketAddr>) -> std::io::Result<()> {
    let server = Server::bind(config)?;
    if let Some(addr) = metrics_addr {
        let bound = server.serve_metrics(addr).map_err(std::io::Error::other)?;
        tracing::info!(%bound, "metrics at http://{bound}/metrics");
    }
    let handle = server.shutdown_handle();
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                handle.shutdown();
            }
        })?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on {}", server.local_addr())?;
    if let Some(admin) = server.admin_addr() {
        writeln!(stdout, "admin listening on {admin}")?;
    }
    stdout.flush()?;
    drop(stdout);
    tracing::info!(addr = %server.local_addr(), admin = ?server.admin_addr(), "listening");
    server.run()
}

//! `netblk-csi`: see `--help`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;
use netblk_csi::controller::Controller;
use netblk_csi::daemons::Daemons;
use netblk_csi::identity::Identity;
use netblk_csi::node::Node;
use netblk_csi::server::Services;
use netblk_observe::logging::LogFormat;

/// netblk's Kubernetes CSI driver: serves the CSI Identity service, and the
/// Controller service (`--controller`, beside the external-provisioner and
/// external-resizer) or the Node service (`--node`, on every host, beside
/// the node-driver-registrar), on a unix socket.
#[derive(Parser, Debug)]
#[command(name = "netblk-csi", version)]
struct Cli {
    /// The unix socket to serve on (what the sidecars and kubelet dial).
    #[arg(long, default_value = "/csi/csi.sock", value_name = "PATH")]
    socket: PathBuf,
    /// Serve the Controller service: volumes made, grown and deleted on
    /// the storage nodes.
    #[arg(long)]
    controller: bool,
    /// Serve the Node service: volumes mapped, mounted and grown on this
    /// host. At start, devices whose map daemon is gone are recovered first.
    #[arg(long)]
    node: bool,
    /// This host's name as Kubernetes knows it (the DaemonSet passes
    /// spec.nodeName); the hostname by default.
    #[arg(long, value_name = "ID")]
    node_id: Option<String>,
    /// The netblk binary the node service runs.
    #[arg(long, default_value = "netblk", value_name = "PATH")]
    netblk: PathBuf,
    /// Where each map daemon's output goes (NAME.log).
    #[arg(long, default_value = "/run/netblk/csi", value_name = "DIR")]
    log_dir: PathBuf,
    /// Mutual TLS to the storage nodes: the CA the nodes' certificates
    /// must be signed by (PEM; a mounted Secret's file). With --tls-cert
    /// and --tls-key. The controller uses them for its own connections,
    /// the node passes them to every `netblk map`.
    #[arg(long, value_name = "PATH")]
    tls_ca: Option<PathBuf>,
    /// This plugin's client certificate (PEM), signed by the CA the nodes
    /// trust.
    #[arg(long, value_name = "PATH")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PATH")]
    tls_key: Option<PathBuf>,
    /// Where pool files are (NAME.toml, a mounted ConfigMap): a
    /// StorageClass with `pool: NAME` places its volumes over that pool.
    #[arg(long, default_value = netblk_csi::pools::DEFAULT_DIR, value_name = "DIR")]
    pool_dir: PathBuf,
    /// Log lines as text or one JSON object a line; levels from RUST_LOG.
    #[arg(long, default_value = "text", value_parser = parse_log_format)]
    log_format: LogFormat,
}

fn parse_log_format(text: &str) -> Result<LogFormat, String> {
    text.parse()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    netblk_observe::logging::init(cli.log_format);
    if !cli.controller && !cli.node {
        eprintln!("netblk-csi: give --controller, --node or both");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(r) => r,
        Err(err) => {
            eprintln!("netblk-csi: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let tls = match netblk_csi::volume::tls(cli.tls_ca, cli.tls_cert, cli.tls_key) {
        Ok(tls) => tls,
        Err(why) => {
            eprintln!("netblk-csi: {why}");
            return ExitCode::from(2);
        }
    };
    let ready = Arc::new(AtomicBool::new(!cli.node));
    let node = cli.node.then(|| Node {
        node_id: cli.node_id.clone().unwrap_or_else(hostname),
        daemons: Daemons {
            netblk: cli.netblk.clone(),
            log_dir: cli.log_dir.clone(),
            tls: tls.clone(),
            pools: netblk_csi::pools::Pools {
                dir: cli.pool_dir.clone(),
            },
        },
        timeouts: netblk_csi::controller::NODE_TIMEOUTS,
        busy: Default::default(),
    });
    let services = Services {
        identity: Identity {
            ready: Arc::clone(&ready),
            controller: cli.controller,
        },
        controller: cli.controller.then(|| Controller {
            tls: tls.clone(),
            pools: netblk_csi::pools::Pools {
                dir: cli.pool_dir.clone(),
            },
            ..Controller::new()
        }),
        node: node.clone(),
    };
    let result = runtime.block_on(async {
        let listener = netblk_csi::server::bind(&cli.socket)
            .map_err(|e| format!("cannot listen on {}: {e}", cli.socket.display()))?;
        tracing::info!(socket = %cli.socket.display(), controller = cli.controller, node = cli.node, "serving CSI");
        if let Some(node) = node {
            // Probe says not ready until the devices of an earlier run are
            // served again; their IO waits in the kernel meanwhile.
            tokio::task::spawn_blocking(move || {
                let failed = node.daemons.recover_all(&node.busy);
                if failed.is_empty() {
                    tracing::info!("every device of this host is served");
                } else {
                    tracing::error!(?failed, "some devices could not be recovered");
                }
                ready.store(true, Ordering::Release);
            });
        }
        netblk_csi::server::serve(listener, services)
            .await
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("netblk-csi: {why}");
            ExitCode::FAILURE
        }
    }
}

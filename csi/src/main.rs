//! `netblk-csi`: see `--help`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::Parser;
use netblk_csi::identity::Identity;
use netblk_observe::logging::LogFormat;

/// netblk's Kubernetes CSI driver: serves the CSI Identity service (and,
/// as the issue goes on, Controller and Node) on a unix socket.
#[derive(Parser, Debug)]
#[command(name = "netblk-csi", version)]
struct Cli {
    /// The unix socket to serve on (what the sidecars and kubelet dial).
    #[arg(long, default_value = "/csi/csi.sock", value_name = "PATH")]
    socket: PathBuf,
    /// Also serve the Controller service.
    #[arg(long)]
    controller: bool,
    /// Log lines as text or one JSON object a line; levels from RUST_LOG.
    #[arg(long, default_value = "text", value_parser = parse_log_format)]
    log_format: LogFormat,
}

fn parse_log_format(text: &str) -> Result<LogFormat, String> {
    text.parse()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    netblk_observe::logging::init(cli.log_format);
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
    let identity = Identity {
        ready: Arc::new(AtomicBool::new(true)),
        controller: cli.controller,
    };
    let result = runtime.block_on(async {
        let listener = netblk_csi::server::bind(&cli.socket)
            .map_err(|e| format!("cannot listen on {}: {e}", cli.socket.display()))?;
        tracing::info!(socket = %cli.socket.display(), "serving CSI");
        netblk_csi::server::serve(listener, identity)
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

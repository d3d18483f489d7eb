//! `netblk-node-check ADDR`: runs the conformance checks of
//! docs/protocol.md against a live storage node and prints one line per
//! check (PASS, FAIL or SKIP, the section it tests, why), then a summary.
//! Exit status 1 if any check failed, 2 for bad arguments.

mod checks;
mod ctx;
mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

use crate::ctx::{Ctx, Verdict};
use crate::wire::Target;

#[derive(Parser, Debug)]
#[command(
    name = "netblk-node-check",
    about = "Checks a storage node against the netblk node protocol (docs/protocol.md)"
)]
struct Args {
    /// The node's data listener (host:port).
    addr: SocketAddr,
    /// With mutual TLS: the CA that signed the node's certificate.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// With mutual TLS: this client's certificate.
    #[arg(long, value_name = "FILE", requires = "tls_ca")]
    tls_cert: Option<PathBuf>,
    /// With mutual TLS: this client's key.
    #[arg(long, value_name = "FILE", requires = "tls_ca")]
    tls_key: Option<PathBuf>,
    /// The node's admin listener (the mock node's): checks that must hold
    /// a request use it, and are skipped without it.
    #[arg(long, value_name = "ADDR")]
    admin: Option<SocketAddr>,
    /// A shell command that restarts the node on its store (and returns
    /// once it was started): the restart checks are skipped without it.
    #[arg(long, value_name = "CMD")]
    restart_cmd: Option<String>,
    /// Only the checks of these sections (and their subsections), comma
    /// separated, e.g. 3 or 6.7,9.
    #[arg(long, value_delimiter = ',', value_name = "SECTION,...")]
    only: Vec<String>,
    /// Seconds to wait for a connection or a reply (0.1 to 600).
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    timeout: f64,
    /// One JSON object instead of lines.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !(0.1..=600.0).contains(&args.timeout) {
        eprintln!(
            "netblk-node-check: --timeout {} must be from 0.1 to 600 seconds",
            args.timeout
        );
        return ExitCode::from(2);
    }
    let tls = match (&args.tls_ca, &args.tls_cert, &args.tls_key) {
        (Some(ca), Some(cert), Some(key)) => {
            match netblk_tls::config::client_config(&netblk_tls::config::ClientFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
                danger_skip_server_name: false,
            }) {
                Ok(config) => Some(config),
                Err(why) => {
                    eprintln!("netblk-node-check: TLS: {why}");
                    return ExitCode::from(2);
                }
            }
        }
        _ => None,
    };
    let checks: Vec<_> = checks::all()
        .into_iter()
        .filter(|c| {
            args.only.is_empty() || args.only.iter().any(|o| checks::selected(c.section, o))
        })
        .collect();
    if checks.is_empty() {
        eprintln!(
            "netblk-node-check: no check in section(s) {}",
            args.only.join(",")
        );
        return ExitCode::from(2);
    }
    let ctx = Ctx::new(
        Target {
            addr: args.addr,
            tls,
            timeout: Duration::from_secs_f64(args.timeout),
        },
        args.admin,
        args.restart_cmd.clone(),
    );
    let mut results = Vec::with_capacity(checks.len());
    for check in checks {
        let started = Instant::now();
        let outcome = (check.run)(&ctx);
        let (verdict, why) = match outcome {
            Ok(()) => ("PASS", String::new()),
            Err(Verdict::Fail(why)) => ("FAIL", why),
            Err(Verdict::Skip(why)) => ("SKIP", why),
        };
        if !args.json {
            let why = if why.is_empty() {
                String::new()
            } else {
                format!(": {why}")
            };
            println!("{verdict}  {:<5} {}{why}", check.section, check.name);
        }
        results.push((check, verdict, why, started.elapsed()));
    }
    ctx.clean_up();
    let count = |v: &str| results.iter().filter(|r| r.1 == v).count();
    let (passed, failed, skipped) = (count("PASS"), count("FAIL"), count("SKIP"));
    if args.json {
        let checks: Vec<serde_json::Value> = results
            .iter()
            .map(|(check, verdict, why, took)| {
                serde_json::json!({
                    "section": check.section,
                    "check": check.name,
                    "result": verdict,
                    "why": why,
                    "seconds": took.as_secs_f64(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "node": args.addr.to_string(),
                "checks": checks,
                "passed": passed,
                "failed": failed,
                "skipped": skipped,
            })
        );
    } else {
        println!("{passed} passed, {failed} failed, {skipped} skipped");
    }
    if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

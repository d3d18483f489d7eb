//! Project automation, run as `cargo xtask <task>` (alias in `.cargo/config.toml`).
//!
//! - `ci`: everything CI checks, in order: formatting, clippy with warnings as
//!   errors, and the whole test suite. This is the README's test command.

use std::process::{Command, ExitCode};
use std::time::Instant;

const USAGE: &str = "usage: cargo xtask <task>

tasks:
  ci    cargo fmt --check, cargo clippy -D warnings, cargo build --bins,
        cargo test --workspace";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") if args.len() == 1 => ci(),
        Some("-h" | "--help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(format!("unknown task {args:?}\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("xtask: {why}");
            ExitCode::FAILURE
        }
    }
}

fn ci() -> Result<(), String> {
    cargo(&["fmt", "--all", "--", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    // The tests start netblk-mock-node as a process: build every binary first.
    cargo(&["build", "--workspace", "--bins"])?;
    cargo(&["test", "--workspace"])?;
    Ok(())
}

/// Runs one cargo command with inherited output; an error names it.
fn cargo(args: &[&str]) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let shown = format!("cargo {}", args.join(" "));
    eprintln!("==> {shown}");
    let start = Instant::now();
    let status = Command::new(&cargo)
        .args(args)
        .status()
        .map_err(|err| format!("cannot run {shown}: {err}"))?;
    eprintln!("<== {shown}: {status} in {:.1?}", start.elapsed());
    if status.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed ({status})"))
    }
}

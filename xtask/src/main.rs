//! Project automation, run as `cargo xtask <task>` (alias in `.cargo/config.toml`).
//!
//! - `ci`: everything CI checks, in order: formatting, clippy with warnings as
//!   errors, and the whole test suite. This is the README's test command.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

mod vm;

const USAGE: &str = "usage: cargo xtask <task>

tasks:
  vm-demo [--kernel 6.12|6.17|7.3]
        run `netblk demo` in a QEMU guest (7.3 by default) and show it
  vm-test [--kernel 6.12|6.17|7.3 [--version DEBIAN-VERSION]]
        boot real ublk kernels under QEMU and run the scenario in each;
        the versions are pinned (6.12.117, 6.17.13, 7.3.4 +deb13-amd64),
        --version picks another Debian build of that kernel line
  ci [--vm]
        cargo fmt --check, cargo clippy -D warnings, cargo build --bins,
        cargo test --workspace; with --vm, then vm-test on every kernel";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") if args.len() == 1 => ci(),
        Some("ci") if args.len() == 2 && args[1] == "--vm" => {
            ci().and_then(|()| vm::vm_test(&workspace_root(), None, None))
        }
        Some("vm-demo") => match &args[1..] {
            [] => vm::vm_demo(&workspace_root(), None),
            [flag, kernel] if flag == "--kernel" => vm::vm_demo(&workspace_root(), Some(kernel)),
            _ => Err(format!(
                "usage: cargo xtask vm-demo [--kernel NAME]\n{USAGE}"
            )),
        },
        Some("vm-test") => match &args[1..] {
            [] => vm::vm_test(&workspace_root(), None, None),
            [flag, kernel] if flag == "--kernel" => {
                vm::vm_test(&workspace_root(), Some(kernel), None)
            }
            [k, kernel, v, version] if k == "--kernel" && v == "--version" => {
                vm::vm_test(&workspace_root(), Some(kernel), Some(version))
            }
            _ => Err(format!(
                "usage: cargo xtask vm-test [--kernel NAME [--version VERSION]]\n{USAGE}"
            )),
        },
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

/// The workspace root: the parent of this crate's directory.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
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

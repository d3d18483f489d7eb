//! Project automation, run as `cargo xtask <task>` (alias in `.cargo/config.toml`).
//!
//! - `ci`: everything CI checks, in order: formatting, clippy with warnings as
//!   errors, the Kubernetes manifests against their schemas (offline), and
//!   the whole test suite. This is the README's test command.
//! - `vm-test`, `vm-demo` (vm.rs): netblk in QEMU guests of real kernels.
//! - `vm-bench` (vmbench/): netblk against the kernel NBD client and brd,
//!   measured with fio in one guest.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

mod vm;
mod vmbench;

const USAGE: &str = "usage: cargo xtask <task>

tasks:
  vm-demo [--kernel 6.12|6.17|7.3]
        run `netblk demo` in a QEMU guest (7.3 by default) and show it
  vm-test [--kernel 6.12|6.17|7.3 [--version DEBIAN-VERSION]] [--scenario NAME[,NAME...]]
        boot real ublk kernels under QEMU and run the scenarios in each;
        the versions are pinned (6.12.117, 6.17.13, 7.3.4 +deb13-amd64),
        --version picks another Debian build of that kernel line;
        --scenario runs only those (xtask/src/scenarios/NAME.sh, after
        common.sh, in their fixed order): refusals, blocksize, basic, fs,
        reliability, orphan, trust, replicas, resync, pool, recovery, deploy, resize, observe, digest, tls, csi
  vm-bench [--kernel 6.12|6.17|7.3] [--sweep] [--rounds N] [--runtime SECS] [--ramp SECS]
           [--quick] [--no-pause] [--output FILE]
        fio in one 7.3 guest (by default) on netblk (1 node/1 queue and
        3 nodes/2 queues, copy and zero-copy data paths), the kernel NBD
        client (1 and 6 connections) and brd, with stores and with
        discarding servers; rounds interleave the targets (default 3 rounds
        of 3 s after 1 s ramp; --quick: 1 round of 1 s after 0.5 s);
        the guest is paused while other host processes take CPU (not with
        --no-pause); prints a markdown table and writes docs/benchmarks.md
        (a quick run: target/vm-bench/benchmarks-quick.md). --sweep: netblk
        alone over queues (1, 2) x nodes (1, 2, 4, 8) on both data paths,
        with each party's CPU (default 2 rounds of 2 s after 1 s ramp;
        docs/benchmarks-sweep.md). Needs the host packages nbd-client,
        nbd-server and nbdkit
  test-certs DIR
        a throwaway CA and certificates in DIR for trying TLS (ca.pem,
        node.pem/.key for 127.0.0.1, client.pem/.key): for tests and
        `netblk bench --security --tls-dir DIR`, never for production
  ci [--vm]
        cargo fmt --check, cargo clippy -D warnings, the Kubernetes
        manifests validated offline (deploy/kubernetes/validate.sh),
        cargo build --bins, cargo test --workspace; with --vm, then
        vm-test on every kernel";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") if args.len() == 1 => ci(),
        Some("ci") if args.len() == 2 && args[1] == "--vm" => {
            ci().and_then(|()| vm::vm_test(&workspace_root(), None, None, &[]))
        }
        Some("vm-demo") => match &args[1..] {
            [] => vm::vm_demo(&workspace_root(), None),
            [flag, kernel] if flag == "--kernel" => vm::vm_demo(&workspace_root(), Some(kernel)),
            _ => Err(format!(
                "usage: cargo xtask vm-demo [--kernel NAME]\n{USAGE}"
            )),
        },
        Some("vm-test") => VmTestArgs::parse(&args[1..]).and_then(|a| {
            vm::vm_test(
                &workspace_root(),
                a.kernel.as_deref(),
                a.version.as_deref(),
                &a.scenarios,
            )
        }),
        Some("vm-bench") => vmbench::BenchArgs::parse(&args[1..]).and_then(|a| {
            let command = format!("cargo xtask {}", args.join(" "));
            vmbench::vm_bench(&workspace_root(), &a, command)
        }),
        Some("test-certs") if args.len() == 2 => {
            let dir = std::path::Path::new(&args[1]);
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("{}: {e}", dir.display()))
                .and_then(|()| netblk_tls::testpki::standard(dir))
                .map(|_| eprintln!("test certificates in {}", dir.display()))
        }
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

/// The flags of `vm-test`.
#[derive(Debug, Default, PartialEq, Eq)]
struct VmTestArgs {
    kernel: Option<String>,
    version: Option<String>,
    /// Scenario names, in the order given (they run in their fixed order).
    scenarios: Vec<String>,
}

impl VmTestArgs {
    fn parse(args: &[String]) -> Result<VmTestArgs, String> {
        let usage = || {
            format!(
                "usage: cargo xtask vm-test [--kernel NAME [--version VERSION]] [--scenario NAME[,NAME...]]\n{USAGE}"
            )
        };
        let mut parsed = VmTestArgs::default();
        let mut args = args.iter();
        while let Some(flag) = args.next() {
            let value = args.next().ok_or_else(usage)?;
            match flag.as_str() {
                "--kernel" if parsed.kernel.is_none() => parsed.kernel = Some(value.clone()),
                "--version" if parsed.version.is_none() => parsed.version = Some(value.clone()),
                // An empty name is kept, to be refused as unknown.
                "--scenario" => parsed.scenarios.extend(value.split(',').map(String::from)),
                _ => return Err(usage()),
            }
        }
        if parsed.version.is_some() && parsed.kernel.is_none() {
            return Err(format!("--version needs --kernel\n{}", usage()));
        }
        Ok(parsed)
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
    // Against the Kubernetes API schemas, strictly (see the script).
    script("deploy/kubernetes/validate.sh")?;
    // The tests start netblk-mock-node as a process: build every binary first.
    cargo(&["build", "--workspace", "--bins"])?;
    // A test that hangs fails the run in bounded time, with the tests
    // `cargo test` named as running long above, instead of spending the
    // whole CI budget (coreutils' timeout signals the whole process group
    // and passes Ctrl-C on).
    let limit = format!("{}s", HOST_TEST_LIMIT.as_secs());
    let mut command = Command::new("timeout");
    command.args([
        "--kill-after=30s",
        &limit,
        &cargo_bin(),
        "test",
        "--workspace",
    ]);
    shown_run("cargo test --workspace", &mut command).map_err(|err| {
        format!(
            "{err}; exit status 124 means it ran past {} min: a test hangs (see the tests \"running for over 60 seconds\" above)",
            HOST_TEST_LIMIT.as_secs() / 60
        )
    })?;
    Ok(())
}

/// The host tests take about 5 minutes on the 2-core machine; five times
/// that means one of them hangs.
const HOST_TEST_LIMIT: Duration = Duration::from_secs(25 * 60);

/// Runs one cargo command with inherited output; an error names it.
fn cargo(args: &[&str]) -> Result<(), String> {
    let mut command = Command::new(cargo_bin());
    command.args(args);
    shown_run(&format!("cargo {}", args.join(" ")), &mut command)
}

/// The cargo that runs this task.
fn cargo_bin() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Runs a bash script of the repository (`path` from the workspace root)
/// with inherited output; an error names it.
fn script(path: &str) -> Result<(), String> {
    let mut command = Command::new("bash");
    command.arg(workspace_root().join(path));
    shown_run(path, &mut command)
}

/// Runs `command`, shown as `shown` before and after, with inherited
/// output; an error names it.
fn shown_run(shown: &str, command: &mut Command) -> Result<(), String> {
    eprintln!("==> {shown}");
    let start = Instant::now();
    let status = command
        .status()
        .map_err(|err| format!("cannot run {shown}: {err}"))?;
    eprintln!("<== {shown}: {status} in {:.1?}", start.elapsed());
    if status.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed ({status})"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn vm_test_flags_parse() {
        assert_eq!(VmTestArgs::parse(&[]), Ok(VmTestArgs::default()));
        assert_eq!(
            VmTestArgs::parse(&args(&[
                "--kernel",
                "7.3",
                "--scenario",
                "fs,basic",
                "--scenario",
                "orphan"
            ])),
            Ok(VmTestArgs {
                kernel: Some("7.3".into()),
                version: None,
                scenarios: args(&["fs", "basic", "orphan"]),
            })
        );
        assert_eq!(
            VmTestArgs::parse(&args(&["--scenario", "basic", "--kernel", "6.12"]))
                .map(|a| a.kernel),
            Ok(Some("6.12".into()))
        );
        for bad in [
            &["--scenario"][..],
            &["--kernel", "7.3", "--kernel", "6.12"],
            &["--version", "7.3.5+deb13-amd64"],
            &["--scenarios", "basic"],
        ] {
            assert!(VmTestArgs::parse(&args(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn usage_names_every_scenario() {
        for (name, _) in vm::SCENARIOS {
            assert!(USAGE.contains(name), "{name}");
        }
    }
}

//! `cargo xtask vm-bench`: netblk against the kernel's NBD client and a RAM
//! disk (`brd`, the ceiling), measured with fio in one QEMU guest of a real
//! Debian kernel (7.3 by default).
//!
//! The guest (`guest.sh`, after the settings written here) runs every
//! target, one at a time, for each workload and round, in two passes: with
//! stores (mock nodes with memory stores, nbd-server on a tmpfs file) and
//! with discarding servers (mock nodes `--store null`, nbdkit's null plugin).
//! Each fio run reaches the host as base64 lines of its JSON plus one line of
//! CPU figures on the serial console; the host checks and parses them, takes
//! medians over the rounds and writes a markdown report.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::vm;

mod console;
mod report;
mod sweep;
mod watch;

use console::*;
use report::*;
use watch::*;

/// The guest's script, after the settings.
const GUEST: &str = include_str!("guest.sh");

/// Size of every device (netblk volumes, the NBD export, brd), in MiB.
const SIZE_MIB: u64 = 128;
/// Nodes and queues of the larger netblk configuration; NBD gets as many
/// connections as it has node connections.
const NODES: u32 = 3;
const QUEUES: u32 = 2;

/// One fio workload.
#[derive(Debug)]
pub struct Workload {
    pub name: &'static str,
    rw: &'static str,
    bs: &'static str,
    depth: u32,
    /// The side of fio's JSON that holds its figures.
    side: &'static str,
}

pub const WORKLOADS: &[Workload] = &[
    Workload {
        name: "randread-4k-qd1",
        rw: "randread",
        bs: "4k",
        depth: 1,
        side: "read",
    },
    Workload {
        name: "randread-4k-qd32",
        rw: "randread",
        bs: "4k",
        depth: 32,
        side: "read",
    },
    Workload {
        name: "randwrite-4k-qd1",
        rw: "randwrite",
        bs: "4k",
        depth: 1,
        side: "write",
    },
    Workload {
        name: "randwrite-4k-qd32",
        rw: "randwrite",
        bs: "4k",
        depth: 32,
        side: "write",
    },
    Workload {
        name: "read-1m-qd8",
        rw: "read",
        bs: "1m",
        depth: 8,
        side: "read",
    },
    Workload {
        name: "write-1m-qd8",
        rw: "write",
        bs: "1m",
        depth: 8,
        side: "write",
    },
];

/// One device measured.
#[derive(Debug)]
pub struct Target {
    pub id: &'static str,
    /// What it is, for the report.
    what: &'static str,
    /// The NBD target it is compared with (netblk targets only).
    peer: Option<&'static str>,
}

const BRD: &str = "brd";

/// The targets in the order each round runs them (netblk and NBD take
/// turns); every other round runs them in reverse.
pub const TARGETS: &[Target] = &[
    Target {
        id: "netblk-1n1q-copy",
        what: "netblk, 1 node, 1 queue, `--zero-copy off`",
        peer: Some("nbd-1conn"),
    },
    Target {
        id: "nbd-1conn",
        what: "kernel NBD client, 1 connection",
        peer: None,
    },
    Target {
        id: "netblk-1n1q-auto",
        what: "netblk, 1 node, 1 queue, `--zero-copy auto` (default)",
        peer: Some("nbd-1conn"),
    },
    Target {
        id: "netblk-3n2q-copy",
        what: "netblk, 3 nodes, 2 queues, `--zero-copy off`",
        peer: Some("nbd-6conn"),
    },
    Target {
        id: "nbd-6conn",
        what: "kernel NBD client, 6 connections (`-C 6`: nodes × queues)",
        peer: None,
    },
    Target {
        id: "netblk-3n2q-auto",
        what: "netblk, 3 nodes, 2 queues, `--zero-copy auto` (default)",
        peer: Some("nbd-6conn"),
    },
    Target {
        id: REPLICATED,
        what: "netblk, 3 columns × 2 replicas (6 nodes), 2 queues, `--replicas 2 --zero-copy auto`: every write goes to 2 nodes",
        peer: Some("nbd-6conn"),
    },
    Target {
        id: BRD,
        what: "RAM disk (`brd.ko`): the ceiling",
        peer: None,
    },
];

/// The replicated target, and the unreplicated one with the same columns
/// and queues it is also compared with (what replication costs).
pub const REPLICATED: &str = "netblk-3c2r-auto";
pub const UNREPLICATED: &str = "netblk-3n2q-auto";

/// The order of the report's rows.
const SHOWN: &[&str] = &[
    BRD,
    "nbd-1conn",
    "netblk-1n1q-copy",
    "netblk-1n1q-auto",
    "nbd-6conn",
    "netblk-3n2q-copy",
    "netblk-3n2q-auto",
    REPLICATED,
];

/// The passes, in the order the guest runs them.
pub const PASSES: &[(&str, &str)] = &[
    (
        "store",
        "With stores: mock nodes `--store memory`, nbd-server exporting a file on tmpfs",
    ),
    (
        "null",
        "With discarding servers: mock nodes `--store null`, nbdkit's `null` plugin",
    ),
];

/// Host programs the guest needs beyond vm-test's, and their Debian packages.
const TOOLS: &[(&str, &str)] = &[
    ("nbd-client", "nbd-client"),
    ("nbd-server", "nbd-server"),
    ("nbdkit", "nbdkit"),
];

const USAGE: &str = "usage: cargo xtask vm-bench [--kernel 6.12|6.17|7.3] [--sweep] [--rounds N] [--runtime SECS] [--ramp SECS] [--quick] [--no-pause] [--output FILE]";

/// The flags of `vm-bench`.
#[derive(Debug, Default, PartialEq)]
pub struct BenchArgs {
    pub kernel: Option<String>,
    pub rounds: Option<u32>,
    pub runtime: Option<f64>,
    pub ramp: Option<f64>,
    pub quick: bool,
    /// netblk alone over queues x nodes (sweep.rs) instead of the NBD
    /// comparison.
    pub sweep: bool,
    /// Do not pause the guest while other host processes take CPU.
    pub no_pause: bool,
    pub output: Option<PathBuf>,
}

impl BenchArgs {
    pub fn parse(args: &[String]) -> Result<BenchArgs, String> {
        let mut parsed = BenchArgs::default();
        let mut args = args.iter();
        while let Some(flag) = args.next() {
            match flag.as_str() {
                "--quick" => {
                    parsed.quick = true;
                    continue;
                }
                "--no-pause" => {
                    parsed.no_pause = true;
                    continue;
                }
                "--sweep" => {
                    parsed.sweep = true;
                    continue;
                }
                _ => {}
            }
            let value = args
                .next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
            let seconds = |what: &str, low: f64, high: f64| -> Result<f64, String> {
                match value.parse::<f64>() {
                    Ok(v) if (low..=high).contains(&v) => Ok(v),
                    _ => Err(format!(
                        "{what} must be seconds from {low} to {high}, not '{value}'"
                    )),
                }
            };
            match flag.as_str() {
                "--kernel" if parsed.kernel.is_none() => parsed.kernel = Some(value.clone()),
                "--rounds" if parsed.rounds.is_none() => match value.parse::<u32>() {
                    Ok(n) if (1..=20).contains(&n) => parsed.rounds = Some(n),
                    _ => return Err(format!("--rounds must be 1 to 20, not '{value}'")),
                },
                "--runtime" if parsed.runtime.is_none() => {
                    parsed.runtime = Some(seconds("--runtime", 0.5, 600.0)?);
                }
                "--ramp" if parsed.ramp.is_none() => {
                    parsed.ramp = Some(seconds("--ramp", 0.0, 60.0)?);
                }
                "--output" if parsed.output.is_none() => {
                    parsed.output = Some(PathBuf::from(value));
                }
                _ => return Err(format!("unknown or repeated flag '{flag}'\n{USAGE}")),
            }
        }
        Ok(parsed)
    }

    /// Rounds and times: given ones win; otherwise 3 rounds of 3 s after
    /// 1 s of ramp (a sweep: 2 rounds of 2 s), or with `--quick` 1 round of
    /// 1 s after 0.5 s.
    pub fn plan(&self) -> Plan {
        let (rounds, runtime, ramp) = match (self.quick, self.sweep) {
            (true, _) => (1, 1.0, 0.5),
            (false, false) => (3, 3.0, 1.0),
            (false, true) => (2, 2.0, 1.0),
        };
        Plan {
            rounds: self.rounds.unwrap_or(rounds),
            runtime_ms: (self.runtime.unwrap_or(runtime) * 1000.0).round() as u64,
            ramp_ms: (self.ramp.unwrap_or(ramp) * 1000.0).round() as u64,
            sweep: self.sweep,
        }
    }

    /// Where the report goes: `--output`, else docs/benchmarks.md (a quick
    /// run, a smoke test, goes under target/ instead).
    pub fn output(&self, root: &Path) -> PathBuf {
        let name = if self.sweep {
            "benchmarks-sweep"
        } else {
            "benchmarks"
        };
        match &self.output {
            Some(path) => path.clone(),
            None if self.quick => vm::target_dir(root).join(format!("vm-bench/{name}-quick.md")),
            None => root.join(format!("docs/{name}.md")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub rounds: u32,
    pub runtime_ms: u64,
    pub ramp_ms: u64,
    pub sweep: bool,
}

impl Plan {
    pub fn runs(&self) -> u64 {
        let per_round = if self.sweep {
            sweep::CONFIGS.len() * sweep::WORKLOADS.len()
        } else {
            PASSES.len() * WORKLOADS.len() * TARGETS.len()
        };
        per_round as u64 * u64::from(self.rounds)
    }

    /// A generous bound on the guest's whole run: every fio run with 8 s of
    /// overhead (start, report, the slowest emulated moments), twice, plus
    /// 10 minutes for boot and set-up and the longest the guest may be
    /// paused.
    fn timeout(&self) -> Duration {
        let per_run = self.runtime_ms + self.ramp_ms + 8_000;
        Duration::from_millis(2 * self.runs() * per_run + 600_000) + PAUSE_BUDGET + LONGEST_PAUSE
    }
}

/// The settings the guest script starts from.
pub fn guest_script(plan: &Plan) -> String {
    let mut script = String::from("# ---- settings from xtask/src/vmbench/mod.rs\n");
    let names = |list: &mut dyn Iterator<Item = &str>| list.collect::<Vec<_>>().join(" ");
    let _ = writeln!(
        script,
        "RUNTIME_MS={}\nRAMP_MS={}\nROUNDS={}\nSIZE_MB={SIZE_MIB}\nQUEUES={QUEUES}\nCONNS={}",
        plan.runtime_ms,
        plan.ramp_ms,
        plan.rounds,
        NODES * QUEUES
    );
    if plan.sweep {
        script.push_str(&sweep::settings());
    } else {
        let _ = writeln!(
            script,
            "PASSES=\"{}\"\nTARGETS=\"{}\"\nWORKLOADS=\"{}\"\nNODE_PROCS=10",
            names(&mut PASSES.iter().map(|(p, _)| *p)),
            names(&mut TARGETS.iter().map(|t| t.id)),
            names(&mut WORKLOADS.iter().map(|w| w.name)),
        );
    }
    script.push_str("workload_args() {\n  case $1 in\n");
    for w in WORKLOADS {
        let _ = writeln!(
            script,
            "    {}) echo \"--rw={} --bs={} --iodepth={}\" ;;",
            w.name, w.rw, w.bs, w.depth
        );
    }
    script.push_str("  esac\n}\n# ---- xtask/src/vmbench/guest.sh\n");
    script.push_str(GUEST);
    script
}

pub(super) fn need_bench_tools() -> Result<PathBuf, String> {
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(tool, _)| vm::which(tool).is_err())
        .map(|(_, package)| *package)
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "vm-bench needs the NBD tools on the host, copied into the guest: apt-get install -y {}",
            missing.join(" ")
        ));
    }
    // nbdkit loads its null plugin from its plugin directory.
    let out = Command::new("nbdkit")
        .arg("--dump-config")
        .output()
        .map_err(|e| format!("nbdkit --dump-config: {e}"))?;
    let config = String::from_utf8_lossy(&out.stdout);
    let dir = config
        .lines()
        .find_map(|l| l.strip_prefix("plugindir="))
        .ok_or("nbdkit --dump-config names no plugindir")?;
    let plugin = Path::new(dir.trim()).join("nbdkit-null-plugin.so");
    if plugin.exists() {
        Ok(plugin)
    } else {
        Err(format!(
            "no nbdkit null plugin at {} (apt-get install -y nbdkit)",
            plugin.display()
        ))
    }
}

/// Today's date and time (UTC), from `date`.
fn now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// `cargo xtask vm-bench`.
pub fn vm_bench(root: &Path, args: &BenchArgs, command: String) -> Result<(), String> {
    let plan = args.plan();
    let name = args.kernel.as_deref().unwrap_or("7.3");
    let kernel = vm::KERNELS
        .iter()
        .find(|k| k.name == name)
        .ok_or_else(|| format!("unknown kernel '{name}'\n{USAGE}"))?;
    vm::need_tools()?;
    let plugin = need_bench_tools()?;
    let bins = vm::build_static(root)?;
    let work = vm::target_dir(root).join("vm-bench").join(kernel.name);
    let script = guest_script(&plan);
    let modules = [
        ("nbd", "nbds_max=2 max_part=0".to_string()),
        ("brd", format!("rd_nr=1 rd_size={}", SIZE_MIB * 1024)),
    ];
    let tools: Vec<&str> = TOOLS.iter().map(|(t, _)| *t).collect();
    let files = [plugin];
    let extras = vm::Extras {
        tools: &tools,
        files: &files,
        modules: &modules,
        ..vm::Extras::default()
    };
    eprintln!(
        "==> vm-bench on {}: {} fio runs of {} ms after {} ms ramp ({} round(s)); guest timeout {:.0?}",
        kernel.version,
        plan.runs(),
        plan.runtime_ms,
        plan.ramp_ms,
        plan.rounds,
        plan.timeout()
    );
    // The follower must not read an earlier run's log.
    let console_path = work.join("console.log");
    match fs::remove_file(&console_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("{}: {e}", console_path.display()));
        }
        _ => {}
    }
    let started = Instant::now();
    let stop = AtomicBool::new(false);
    let monitor = work.join("monitor.sock");
    let guest = vm::Guest {
        extras,
        timeout: plan.timeout(),
        monitor: (!args.no_pause).then_some(monitor.as_path()),
    };
    let (log, host) = std::thread::scope(|scope| {
        let (console, stop, total) = (&console_path, &stop, plan.runs());
        let watcher = scope.spawn(move || watch(console, guest.monitor, total, stop));
        let log = vm::run_guest(&work, &bins, kernel, &script, &guest);
        stop.store(true, Ordering::Relaxed);
        let host = watcher.join().unwrap_or_default();
        log.map(|log| (log, host))
    })?;
    let wall = started.elapsed();
    let console = parse_console(&log);
    if let Some(why) = &console.failure {
        return Err(format!(
            "the guest gave up: {why}; console log in {}",
            console_path.display()
        ));
    }
    if !console.done {
        return Err(format!(
            "the guest stopped before the end; console log in {}",
            console_path.display()
        ));
    }
    if console.samples.is_empty() {
        return Err(format!(
            "no run could be read; console log in {}",
            console_path.display()
        ));
    }
    let text = if plan.sweep { sweep::report } else { report }(
        &console,
        &Setting {
            command,
            date: now(),
            kernel: kernel.version.to_string(),
            plan,
            wall,
            host,
        },
    );
    println!("{text}");
    let output = args.output(root);
    if let Some(dir) = output.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    fs::write(&output, &text).map_err(|e| format!("{}: {e}", output.display()))?;
    eprintln!(
        "<== vm-bench: {} of {} runs measured in {:.0?}; report in {}",
        console.samples.len(),
        plan.runs(),
        wall,
        output.display()
    );
    for problem in &console.problems {
        eprintln!("    not counted: {problem}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|a| a.to_string()).collect()
    }

    /// A trimmed fio JSON report as fio 3.33 writes it (one job).
    fn fio_json(side: &str, iops: f64, p50_ns: u64, p99_ns: u64, io_bytes: u64) -> String {
        let other = if side == "read" { "write" } else { "read" };
        format!(
            r#"{{
  "fio version" : "fio-3.33",
  "jobs" : [
    {{
      "jobname" : "bench",
      "error" : 0,
      "job options" : {{ "filename" : "/dev/nbd0", "rw" : "randread" }},
      "{side}" : {{
        "io_bytes" : {io_bytes},
        "bw_bytes" : {bw},
        "iops" : {iops},
        "runtime" : 2000,
        "lat_ns" : {{ "min" : 1, "percentile" : {{ "1.000000" : 10, "50.000000" : {p50_ns}, "99.000000" : {p99_ns} }} }}
      }},
      "{other}" : {{ "io_bytes" : 0, "bw_bytes" : 0, "iops" : 0.0, "runtime" : 0 }}
    }}
  ]
}}
"#,
            bw = io_bytes / 2
        )
    }

    fn base64_encode(data: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let word = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[(word >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    /// The console lines the guest prints for one run, JSON compacted as
    /// the guest does.
    fn run_lines(
        id: u32,
        pass: &str,
        target: &str,
        workload: &str,
        round: u32,
        json: &str,
    ) -> String {
        let compact: String = json.lines().map(str::trim_start).collect();
        let encoded = base64_encode(compact.as_bytes());
        let mut out = String::new();
        for (i, chunk) in encoded.as_bytes().chunks(76).enumerate() {
            let _ = writeln!(
                out,
                "NETBLK-BENCH-DATA {id} {} {}",
                i + 1,
                std::str::from_utf8(chunk).expect("ascii")
            );
        }
        let _ = writeln!(
            out,
            "NETBLK-BENCH-RUN {id} {pass} {target} {workload} {round} rc=0 busy=150 total=400 ncpu=2 bytes={} nodes=40 ctxt=4000 cswc=1000 cswn=2000",
            compact.len()
        );
        out
    }

    #[test]
    fn flags_parse() {
        assert_eq!(BenchArgs::parse(&[]), Ok(BenchArgs::default()));
        let parsed = BenchArgs::parse(&args(&[
            "--kernel",
            "6.17",
            "--rounds",
            "5",
            "--runtime",
            "2.5",
            "--quick",
            "--ramp",
            "0",
            "--no-pause",
            "--output",
            "/tmp/b.md",
        ]))
        .expect("valid");
        assert_eq!(
            parsed,
            BenchArgs {
                kernel: Some("6.17".into()),
                rounds: Some(5),
                runtime: Some(2.5),
                ramp: Some(0.0),
                quick: true,
                sweep: false,
                no_pause: true,
                output: Some("/tmp/b.md".into()),
            }
        );
        // Given figures win over --quick's.
        assert_eq!(
            parsed.plan(),
            Plan {
                rounds: 5,
                runtime_ms: 2500,
                ramp_ms: 0,
                sweep: false,
            }
        );
        for bad in [
            &["--rounds"][..],
            &["--rounds", "0"],
            &["--rounds", "x"],
            &["--runtime", "0.1"],
            &["--runtime", "nan"],
            &["--ramp", "-1"],
            &["--kernel", "7.3", "--kernel", "6.12"],
            &["--round", "3"],
        ] {
            let err = BenchArgs::parse(&args(bad)).expect_err("refused");
            assert!(!err.is_empty(), "{bad:?}");
        }
    }

    #[test]
    fn defaults_and_quick_mode() {
        let full = BenchArgs::default();
        assert_eq!(
            full.plan(),
            Plan {
                rounds: 3,
                runtime_ms: 3000,
                ramp_ms: 1000,
                sweep: false,
            }
        );
        let root = Path::new("/src");
        assert_eq!(full.output(root), root.join("docs/benchmarks.md"));
        let quick = BenchArgs {
            quick: true,
            ..BenchArgs::default()
        };
        assert_eq!(quick.plan().rounds, 1);
        assert!(quick.output(root).ends_with("vm-bench/benchmarks-quick.md"));
        // The full run fits the time asked for: 2 passes x 6 workloads x 7
        // targets x 3 rounds, each about runtime + ramp + 1 s (fio starting,
        // the report lines; 0.8 s measured), plus a minute of set-up.
        let plan = full.plan();
        assert_eq!(plan.runs(), 288);
        let estimate = plan.runs() * (plan.runtime_ms + plan.ramp_ms + 1_000) / 1000 + 60;
        assert!(estimate < 30 * 60, "{estimate} s");
        assert!(plan.timeout() > Duration::from_secs(2 * estimate));
    }

    #[test]
    fn the_script_names_every_target_workload_and_pass() {
        let script = guest_script(&BenchArgs::default().plan());
        for t in TARGETS {
            assert!(script.contains(t.id), "{}", t.id);
            assert!(SHOWN.contains(&t.id), "{}", t.id);
            if let Some(peer) = t.peer {
                assert!(TARGETS.iter().any(|p| p.id == peer), "{peer}");
            }
        }
        assert_eq!(SHOWN.len(), TARGETS.len());
        // The NBD target with many connections has nodes x queues of them.
        assert!(
            TARGETS
                .iter()
                .any(|t| t.id == format!("nbd-{}conn", NODES * QUEUES))
        );
        for w in WORKLOADS {
            assert!(script.contains(&format!("    {}) echo \"--rw={} ", w.name, w.rw)));
        }
        assert!(script.contains("PASSES=\"store null\""));
        assert!(script.contains("RUNTIME_MS=3000\nRAMP_MS=1000\nROUNDS=3\n"));
        vm::tests::assert_valid_shell(&script);
    }

    #[test]
    fn base64_round_trips_and_refuses_garbage() {
        for data in [
            &b""[..],
            b"a",
            b"ab",
            b"abc",
            b"abcd",
            b"{\"x\": [1, 2]}\xff",
        ] {
            assert_eq!(base64_decode(&base64_encode(data)).as_deref(), Ok(data));
        }
        assert!(base64_decode("abc").is_err());
        assert!(base64_decode("ab=c").is_err());
        assert!(base64_decode("a===").is_err());
        assert!(base64_decode("ab==abcd").is_err());
        assert!(base64_decode("ab[c").is_err());
    }

    #[test]
    fn fio_json_gives_the_figures() {
        let run = RunLine {
            busy: 150,
            total: 400,
            ncpu: 2,
            nodes: 100,
            ..RunLine::default()
        };
        // 1 GiB in 2 s with 0.75 of 2 CPUs busy: 1.5 CPU s/GiB.
        let json = fio_json("read", 1234.5, 80_000, 250_500, 1 << 30);
        let m = fio_metrics(&format!("fio: note\n{json}"), "read", &run).expect("figures");
        assert_eq!(m.iops, 1234.5);
        assert_eq!(m.mib_s, 512.0);
        assert_eq!(m.p50_us, 80.0);
        assert_eq!(m.p99_us, 250.5);
        assert!((m.cpu_s_per_gib - 1.5).abs() < 1e-9, "{}", m.cpu_s_per_gib);
        // The servers: 100 of 200 ticks per CPU, half a CPU for 2 s.
        assert!(
            (m.server_s_per_gib - 1.0).abs() < 1e-9,
            "{}",
            m.server_s_per_gib
        );
        // The write side of a read run moved nothing.
        assert!(fio_metrics(&json, "write", &run).is_err());
        let failed = json.replace("\"error\" : 0", "\"error\" : 5");
        assert!(
            fio_metrics(&failed, "read", &run)
                .expect_err("error")
                .contains("error 5")
        );
        assert!(fio_metrics("{\"jobs\": [", "read", &run).is_err());
        let no_cpu = RunLine::default();
        assert!(fio_metrics(&json, "read", &no_cpu).is_err());
    }

    #[test]
    fn small_ratios_keep_a_third_decimal() {
        let cell = |median, min, max| ratio_cell(Some(Spread { median, min, max }));
        assert_eq!(cell(0.0214, 0.0196, 0.025), "0.021 (0.020–0.025)");
        assert_eq!(cell(0.5, 0.45, 0.551), "0.50 (0.45–0.55)");
        assert_eq!(ratio_cell(None), "—");
    }

    #[test]
    fn medians_and_spreads() {
        assert_eq!(spread(vec![]), None);
        assert_eq!(
            spread(vec![3.0, 1.0, 2.0]),
            Some(Spread {
                median: 2.0,
                min: 1.0,
                max: 3.0
            })
        );
        assert_eq!(
            spread(vec![4.0, 1.0, 2.0, 10.0]).map(|s| s.median),
            Some(3.0)
        );
        assert_eq!(spread(vec![f64::NAN, 5.0]).map(|s| s.median), Some(5.0));
    }

    /// A console with kernel noise, a run fio failed, a run with a corrupted
    /// line, and three rounds of two targets and brd.
    fn console_text() -> String {
        let mut text = String::from(
            "NETBLK-VM-INIT\n[    1.234] random kernel line\n\
             NETBLK-BENCH-PATH store netblk-1n1q-auto full zero copy\n\
             NETBLK-BENCH-PATH store nbd-1conn kernel nbd, 1 connection(s), nbd-server 3.24, file on tmpfs\n",
        );
        let mut id = 0;
        let iops = |target: &str, round: u32| match target {
            "netblk-1n1q-auto" => [900.0, 1000.0, 1100.0][round as usize - 1],
            "nbd-1conn" => 1000.0,
            _ => 2000.0,
        };
        for round in 1..=3 {
            for target in ["netblk-1n1q-auto", "nbd-1conn", BRD] {
                id += 1;
                let json = fio_json(
                    "read",
                    iops(target, round),
                    50_000 * u64::from(round),
                    90_000,
                    1 << 28,
                );
                text.push_str(&run_lines(
                    id,
                    "store",
                    target,
                    "randread-4k-qd1",
                    round,
                    &json,
                ));
            }
        }
        // A kernel message in the middle of a data line spoils that run.
        let mut spoiled = run_lines(
            20,
            "store",
            "nbd-6conn",
            "randread-4k-qd1",
            1,
            &fio_json("read", 5.0, 1, 1, 4096),
        );
        spoiled = spoiled.replacen(
            "NETBLK-BENCH-DATA 20 2 ",
            "NETBLK-BENCH-DATA 20 2 [ 9.9] nbd0: oops",
            1,
        );
        text.push_str(&spoiled);
        text.push_str("NETBLK-BENCH-RUN 21 store nbd-6conn randread-4k-qd1 2 rc=1 busy=1 total=2 ncpu=2 bytes=0\n");
        text.push_str("[  99.1] blah NETBLK-BENCH-DONE\n");
        text
    }

    #[test]
    fn the_console_becomes_samples_ratios_and_a_table() {
        let console = parse_console(&console_text());
        assert!(console.done);
        assert_eq!(console.failure, None);
        assert_eq!(console.samples.len(), 9, "{:?}", console.problems);
        assert_eq!(console.problems.len(), 2, "{:?}", console.problems);
        assert!(
            console
                .problems
                .iter()
                .any(|p| p.contains("round 1") && p.contains("nbd-6conn"))
        );
        assert!(console.problems.iter().any(|p| p.contains("status 1")));
        assert_eq!(
            console.paths[0],
            (
                "store".into(),
                "netblk-1n1q-auto".into(),
                "full zero copy".into()
            )
        );

        let vs_nbd = ratio(
            &console.samples,
            "store",
            "randread-4k-qd1",
            "netblk-1n1q-auto",
            "nbd-1conn",
        )
        .expect("three rounds");
        assert_eq!(
            vs_nbd,
            Spread {
                median: 1.0,
                min: 0.9,
                max: 1.1
            }
        );
        let vs_brd = ratio(
            &console.samples,
            "store",
            "randread-4k-qd1",
            "netblk-1n1q-auto",
            BRD,
        )
        .expect("three rounds");
        assert_eq!(vs_brd.median, 0.5);

        let table = pass_table(&console.samples, "store");
        let row = table
            .lines()
            .find(|l| l.starts_with("| randread-4k-qd1 | netblk-1n1q-auto |"))
            .expect("row");
        // IOPS, MiB/s (256 MiB in 2 s), p50 (median of 50, 100, 150 µs),
        // p99, CPU, the servers' CPU (0.2 of a CPU for 2 s over 1/4 GiB),
        // ratios, runs.
        assert_eq!(
            row,
            "| randread-4k-qd1 | netblk-1n1q-auto | 1000 | 128 | 100 | 90.0 | 6.00 | 1.60 | 1.00 (0.90–1.10) | 0.50 (0.45–0.55) | 3 |"
        );
        // 2000 IOs over the 2 s run (1000 IOPS): 4000, 1000 and 2000
        // switches are 2, 0.5 and 1 per IO.
        let switches = switches_table(&console.samples);
        assert!(
            switches
                .contains("| randread-4k-qd1 | store | netblk-1n1q-auto | 2.00 | 0.50 | 1.00 |"),
            "{switches}"
        );
        assert!(servers_table(&console.samples).contains("medians."));
        let brd = table
            .lines()
            .find(|l| l.starts_with("| randread-4k-qd1 | brd |"))
            .expect("brd");
        assert!(brd.ends_with("| — | — | 3 |"), "{brd}");
        let missing = table
            .lines()
            .find(|l| l.starts_with("| write-1m-qd8 | netblk-3n2q-copy |"))
            .expect("row");
        assert!(
            missing.ends_with("| — | — | — | — | — | — | — | 0 |"),
            "{missing}"
        );
        // The NBD rows are not compared with themselves.
        let nbd = table
            .lines()
            .find(|l| l.starts_with("| randread-4k-qd1 | nbd-1conn |"))
            .expect("nbd");
        assert!(nbd.ends_with("| — | 0.50 (0.50–0.50) | 3 |"), "{nbd}");

        let text = report(
            &console,
            &Setting {
                command: "cargo xtask vm-bench".into(),
                date: "2026-11-26 12:00 UTC".into(),
                kernel: "7.3.4+deb13-amd64".into(),
                plan: BenchArgs::default().plan(),
                wall: Duration::from_secs(1200),
                host: HostWatch {
                    loads: [(1, 0.1), (2, 1.5)].into_iter().collect(),
                    overall: Some(0.25),
                    pauses: 3,
                    paused: Duration::from_secs(42),
                    cpus: Some(2),
                },
            },
        );
        assert!(text.contains("- command: `cargo xtask vm-bench`"));
        assert!(text.contains("7.3.4+deb13-amd64"));
        assert!(
            text.contains("ran for 1200 s (paused 42 s of it), on a host of 2 CPUs"),
            "{text}"
        );
        assert!(text.contains("2026-11-26"));
        assert!(
            text.contains("As set up:\n\n- `netblk-1n1q-auto`: full zero copy\n- `nbd-1conn`: ")
        );
        assert!(text.contains("## Runs not counted"));
        assert!(
            text.contains("paused (its clock too) 3 time(s), 42 s in all"),
            "{text}"
        );
        assert!(
            text.contains("1 of 9 runs still saw 0.5 CPU or more"),
            "{text}"
        );
        assert!(
            text.contains("- 1.5: store randread-4k-qd1 nbd-1conn round 1\n"),
            "{text}"
        );
        assert_eq!(text.matches("| workload | target |").count(), PASSES.len());
        let summary = text
            .lines()
            .find(|l| l.starts_with("| randread-4k-qd1 | store |"))
            .expect("summary row");
        assert_eq!(
            summary,
            "| randread-4k-qd1 | store | — | 1.00 (0.90–1.10) | — | — | — |"
        );
        assert!(text.contains("| workload | servers | netblk-1n1q-copy ÷ nbd-1conn |"));
        assert!(text.contains("| workload | servers | netblk-3c2r-auto ÷ netblk-3n2q-auto |"));
    }

    #[test]
    fn host_cpu_figures_parse() {
        let stat = "cpu  100 5 50 800 40 3 2 0 0 0\ncpu0 50 2 25 400 20 1 1 0 0 0\ncpu1 50 3 25 400 20 2 1 0 0 0\nintr 1\n";
        assert_eq!(host_cpu(stat), Some((160, 1000, 2)));
        assert_eq!(host_cpu("cpu0 1 2 3\n"), None);
        assert_eq!(host_cpu("cpu  1 x 3 4\n"), None);
        let qemu = "4242 (qemu-system-x86) S 4000 4242 4000 0 -1 4194560 100 0 0 0 700 300 0 0 20 0 5 0 1000 1 1";
        assert_eq!(process_cpu(qemu), Some((4000, "qemu-system-x86", 1000)));
        // A name with spaces and parentheses.
        let odd = "7 (a (b) c) R 1 7 7 0 -1 0 0 0 0 0 1 2 0 0";
        assert_eq!(process_cpu(odd), Some((1, "a (b) c", 3)));
        assert_eq!(process_cpu("7 (x) R"), None);
        // 2 CPUs, 200 jiffies: 150 busy, 50 of them QEMU's: 1 CPU of others.
        let load = others_load((1000, 5000, 2, 300), (1150, 5200, 2, 350)).expect("load");
        assert!((load - 1.0).abs() < 1e-9, "{load}");
        assert_eq!(others_load((1, 5, 2, 0), (1, 5, 2, 0)), None);
    }

    #[test]
    fn a_guest_that_gave_up_says_why() {
        let console = parse_console(
            "x\nNETBLK-BENCH-FAIL: nbd-client for nbd-1conn\nNETBLK-VM-RESULT: fail\n",
        );
        assert_eq!(console.failure.as_deref(), Some("nbd-client for nbd-1conn"));
        assert!(!console.done);
    }
}

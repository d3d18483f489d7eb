//! `cargo xtask vm-bench`: netblk against the kernel's NBD client and a RAM
//! disk (`brd`, the ceiling), measured with fio in one QEMU guest of a real
//! Debian kernel (7.3 by default).
//!
//! The guest (`vmbench.sh`, after the settings written here) runs every
//! target, one at a time, for each workload and round, in two passes: with
//! stores (mock nodes with memory stores, nbd-server on a tmpfs file) and
//! with discarding servers (mock nodes `--store null`, nbdkit's null plugin).
//! Each fio run reaches the host as base64 lines of its JSON plus one line of
//! CPU figures on the serial console; the host checks and parses them, takes
//! medians over the rounds and writes a markdown report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::vm;

/// The guest's script, after the settings.
const GUEST: &str = include_str!("vmbench.sh");

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
        id: BRD,
        what: "RAM disk (`brd.ko`): the ceiling",
        peer: None,
    },
];

/// The order of the report's rows.
const SHOWN: &[&str] = &[
    BRD,
    "nbd-1conn",
    "netblk-1n1q-copy",
    "netblk-1n1q-auto",
    "nbd-6conn",
    "netblk-3n2q-copy",
    "netblk-3n2q-auto",
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

const USAGE: &str = "usage: cargo xtask vm-bench [--kernel 6.12|6.17|7.3] [--rounds N] [--runtime SECS] [--ramp SECS] [--quick] [--no-pause] [--output FILE]";

/// The flags of `vm-bench`.
#[derive(Debug, Default, PartialEq)]
pub struct BenchArgs {
    pub kernel: Option<String>,
    pub rounds: Option<u32>,
    pub runtime: Option<f64>,
    pub ramp: Option<f64>,
    pub quick: bool,
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
    /// 1 s of ramp, or with `--quick` 1 round of 1 s after 0.5 s.
    pub fn plan(&self) -> Plan {
        let (rounds, runtime, ramp) = if self.quick {
            (1, 1.0, 0.5)
        } else {
            (3, 3.0, 1.0)
        };
        Plan {
            rounds: self.rounds.unwrap_or(rounds),
            runtime_ms: (self.runtime.unwrap_or(runtime) * 1000.0).round() as u64,
            ramp_ms: (self.ramp.unwrap_or(ramp) * 1000.0).round() as u64,
        }
    }

    /// Where the report goes: `--output`, else docs/benchmarks.md (a quick
    /// run, a smoke test, goes under target/ instead).
    pub fn output(&self, root: &Path) -> PathBuf {
        match &self.output {
            Some(path) => path.clone(),
            None if self.quick => vm::target_dir(root).join("vm-bench/benchmarks-quick.md"),
            None => root.join("docs/benchmarks.md"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub rounds: u32,
    pub runtime_ms: u64,
    pub ramp_ms: u64,
}

impl Plan {
    pub fn runs(&self) -> u64 {
        (PASSES.len() * WORKLOADS.len() * TARGETS.len()) as u64 * u64::from(self.rounds)
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
    let mut script = String::from("# ---- settings from xtask/src/vmbench.rs\n");
    let names = |list: &mut dyn Iterator<Item = &str>| list.collect::<Vec<_>>().join(" ");
    let _ = writeln!(
        script,
        "RUNTIME_MS={}\nRAMP_MS={}\nROUNDS={}\nSIZE_MB={SIZE_MIB}\nQUEUES={QUEUES}\nCONNS={}",
        plan.runtime_ms,
        plan.ramp_ms,
        plan.rounds,
        NODES * QUEUES
    );
    let _ = writeln!(
        script,
        "PASSES=\"{}\"\nTARGETS=\"{}\"\nWORKLOADS=\"{}\"",
        names(&mut PASSES.iter().map(|(p, _)| *p)),
        names(&mut TARGETS.iter().map(|t| t.id)),
        names(&mut WORKLOADS.iter().map(|w| w.name)),
    );
    script.push_str("workload_args() {\n  case $1 in\n");
    for w in WORKLOADS {
        let _ = writeln!(
            script,
            "    {}) echo \"--rw={} --bs={} --iodepth={}\" ;;",
            w.name, w.rw, w.bs, w.depth
        );
    }
    script.push_str("  esac\n}\n# ---- xtask/src/vmbench.sh\n");
    script.push_str(GUEST);
    script
}

/// One fio run's figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metrics {
    pub iops: f64,
    pub mib_s: f64,
    /// Latency (submission to completion) percentiles, in microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
    /// Non-idle guest CPU seconds (all CPUs, everything running) per GiB moved.
    pub cpu_s_per_gib: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The guest's number for the run.
    pub id: u32,
    pub pass: String,
    pub target: String,
    pub workload: String,
    pub round: u32,
    pub metrics: Metrics,
}

/// What the guest reported.
#[derive(Debug, Default)]
pub struct Console {
    pub samples: Vec<Sample>,
    /// (pass, target, data path as the guest saw it).
    pub paths: Vec<(String, String, String)>,
    /// Runs that failed or whose report could not be read.
    pub problems: Vec<String>,
    /// The guest's own failure message, if it gave up.
    pub failure: Option<String>,
    pub done: bool,
}

/// The header line of one run.
#[derive(Debug, Default, PartialEq)]
struct RunLine {
    id: u32,
    pass: String,
    target: String,
    workload: String,
    round: u32,
    rc: i64,
    busy: u64,
    total: u64,
    ncpu: u32,
    bytes: usize,
}

impl RunLine {
    fn parse(fields: &[&str]) -> Result<RunLine, String> {
        let [id, pass, target, workload, round, rest @ ..] = fields else {
            return Err("too few fields".into());
        };
        let mut run = RunLine {
            id: id.parse().map_err(|_| format!("bad run id '{id}'"))?,
            pass: pass.to_string(),
            target: target.to_string(),
            workload: workload.to_string(),
            round: round.parse().map_err(|_| format!("bad round '{round}'"))?,
            ..RunLine::default()
        };
        let mut seen = 0;
        for field in rest {
            let (key, value) = field
                .split_once('=')
                .ok_or_else(|| format!("bad field '{field}'"))?;
            let bad = || format!("bad {key} '{value}'");
            match key {
                "rc" => run.rc = value.parse().map_err(|_| bad())?,
                "busy" => run.busy = value.parse().map_err(|_| bad())?,
                "total" => run.total = value.parse().map_err(|_| bad())?,
                "ncpu" => run.ncpu = value.parse().map_err(|_| bad())?,
                "bytes" => run.bytes = value.parse().map_err(|_| bad())?,
                _ => return Err(format!("unknown field '{key}'")),
            }
            seen += 1;
        }
        if seen != 5 {
            return Err("missing fields".into());
        }
        Ok(run)
    }
}

/// The first marker in a line and what follows it (a kernel message may
/// stand before it on the same line).
fn marked<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|at| &line[at + marker.len()..])
}

/// Reads the guest's console: every run's figures, the data paths, and
/// what went wrong.
pub fn parse_console(text: &str) -> Console {
    let mut console = Console::default();
    let mut chunks: BTreeMap<u32, Vec<(u32, String)>> = BTreeMap::new();
    let mut runs = Vec::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(rest) = marked(line, "NETBLK-BENCH-DATA ") {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // A spoiled line is left out: its run then misses it and is
            // reported as such.
            if let [id, seq, chunk] = fields[..]
                && let (Ok(id), Ok(seq)) = (id.parse(), seq.parse())
            {
                chunks.entry(id).or_default().push((seq, chunk.into()));
            }
        } else if let Some(rest) = marked(line, "NETBLK-BENCH-RUN ") {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            match RunLine::parse(&fields) {
                Ok(run) => runs.push(run),
                Err(why) => console
                    .problems
                    .push(format!("unreadable run line ({why}): {line}")),
            }
        } else if let Some(rest) = marked(line, "NETBLK-BENCH-PATH ") {
            let mut fields = rest.splitn(3, ' ');
            if let (Some(pass), Some(target), Some(path)) =
                (fields.next(), fields.next(), fields.next())
            {
                console
                    .paths
                    .push((pass.into(), target.into(), path.trim().into()));
            }
        } else if let Some(rest) = marked(line, "NETBLK-BENCH-FAIL: ") {
            console.failure.get_or_insert_with(|| rest.to_string());
        } else if line.contains("NETBLK-BENCH-DONE") {
            console.done = true;
        }
    }
    for run in runs {
        let name = format!(
            "{} {} {} round {}",
            run.pass, run.target, run.workload, run.round
        );
        match sample(&run, chunks.remove(&run.id).unwrap_or_default()) {
            Ok(metrics) => console.samples.push(Sample {
                id: run.id,
                pass: run.pass,
                target: run.target,
                workload: run.workload,
                round: run.round,
                metrics,
            }),
            Err(why) => console.problems.push(format!("{name}: {why}")),
        }
    }
    console
}

/// One run's figures from its header and its data lines.
fn sample(run: &RunLine, mut chunks: Vec<(u32, String)>) -> Result<Metrics, String> {
    if run.rc != 0 {
        return Err(format!("fio exited with status {}", run.rc));
    }
    let workload = WORKLOADS
        .iter()
        .find(|w| w.name == run.workload)
        .ok_or_else(|| format!("unknown workload '{}'", run.workload))?;
    chunks.sort_by_key(|(seq, _)| *seq);
    if chunks
        .iter()
        .enumerate()
        .any(|(i, (seq, _))| *seq as usize != i + 1)
    {
        return Err("data lines missing or repeated".into());
    }
    let text: String = chunks.into_iter().map(|(_, c)| c).collect();
    let json = base64_decode(&text)?;
    if json.len() != run.bytes {
        return Err(format!(
            "fio's report has {} bytes, the guest sent {}",
            json.len(),
            run.bytes
        ));
    }
    let json = String::from_utf8(json).map_err(|_| "fio's report is not UTF-8")?;
    fio_metrics(&json, workload.side, run)
}

/// The figures of one fio JSON report (one job) for `side` ("read" or
/// "write"), with the CPU the guest spent around it.
fn fio_metrics(json: &str, side: &str, run: &RunLine) -> Result<Metrics, String> {
    let start = json.find('{').ok_or("no JSON object in fio's report")?;
    let report: Value = serde_json::Deserializer::from_str(&json[start..])
        .into_iter::<Value>()
        .next()
        .ok_or("empty fio report")?
        .map_err(|e| format!("fio's report is not JSON: {e}"))?;
    let job = report
        .get("jobs")
        .and_then(|jobs| jobs.get(0))
        .ok_or("fio's report has no job")?;
    match job.get("error").and_then(Value::as_i64) {
        Some(0) | None => {}
        Some(error) => return Err(format!("fio reports error {error}")),
    }
    let figures = job
        .get(side)
        .ok_or_else(|| format!("fio's report has no '{side}' figures"))?;
    let number = |value: Option<&Value>, what: &str| {
        value
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("fio's report has no number at {side}.{what}"))
    };
    let io_bytes = number(figures.get("io_bytes"), "io_bytes")?;
    let runtime_ms = number(figures.get("runtime"), "runtime")?;
    if io_bytes <= 0.0 || runtime_ms <= 0.0 {
        return Err("fio moved no data".into());
    }
    let percentiles = figures
        .get("lat_ns")
        .and_then(|l| l.get("percentile"))
        .or_else(|| figures.get("clat_ns").and_then(|l| l.get("percentile")));
    let percentile = |p: &str| {
        number(
            percentiles.and_then(|all| all.get(p)),
            &format!("lat_ns.percentile.{p}"),
        )
    };
    if run.total == 0 || run.ncpu == 0 || run.busy > run.total {
        return Err(format!(
            "implausible CPU figures: busy {} of {} jiffies on {} CPUs",
            run.busy, run.total, run.ncpu
        ));
    }
    // /proc/stat covered the ramp too: take the share of the CPUs that was
    // busy over the whole run as the rate during the measured part.
    let busy_cpus = run.busy as f64 / run.total as f64 * f64::from(run.ncpu);
    let gib = io_bytes / f64::from(1u32 << 30);
    Ok(Metrics {
        iops: number(figures.get("iops"), "iops")?,
        mib_s: number(figures.get("bw_bytes"), "bw_bytes")? / f64::from(1u32 << 20),
        p50_us: percentile("50.000000")? / 1000.0,
        p99_us: percentile("99.000000")? / 1000.0,
        cpu_s_per_gib: busy_cpus * runtime_ms / 1000.0 / gib,
    })
}

/// Decodes standard base64 (with padding); anything else is an error.
fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return Err("base64 data of a length not a multiple of 4".into());
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let quads = bytes.len() / 4;
    for (i, quad) in bytes.chunks(4).enumerate() {
        let pad = quad.iter().rev().take_while(|c| **c == b'=').count();
        if pad > 2 || (pad > 0 && i + 1 != quads) {
            return Err("base64 padding in the wrong place".into());
        }
        let mut word = 0u32;
        for c in &quad[..4 - pad] {
            word = word << 6 | value(*c).ok_or("not base64 data")?;
        }
        word <<= 6 * pad as u32;
        let three = [(word >> 16) as u8, (word >> 8) as u8, word as u8];
        out.extend_from_slice(&three[..3 - pad]);
    }
    Ok(out)
}

/// Median, smallest and largest of some values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn spread(mut values: Vec<f64>) -> Option<Spread> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    Some(Spread {
        median,
        min: values[0],
        max: values[n - 1],
    })
}

fn find<'a>(samples: &'a [Sample], pass: &str, target: &str, workload: &str) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.pass == pass && s.target == target && s.workload == workload)
        .collect()
}

/// The IOPS ratio of `target` to `other`, round by round (rounds where both
/// ran), as a spread.
pub fn ratio(
    samples: &[Sample],
    pass: &str,
    workload: &str,
    target: &str,
    other: &str,
) -> Option<Spread> {
    let mine = find(samples, pass, target, workload);
    let theirs = find(samples, pass, other, workload);
    let ratios = mine
        .iter()
        .filter_map(|m| {
            theirs
                .iter()
                .find(|t| t.round == m.round && t.metrics.iops > 0.0)
                .map(|t| m.metrics.iops / t.metrics.iops)
        })
        .collect();
    spread(ratios)
}

/// A ratio's median and range, with a third decimal for small ones.
fn ratio_cell(s: Option<Spread>) -> String {
    match s {
        Some(s) if s.median < 0.1 => format!("{:.3} ({:.3}–{:.3})", s.median, s.min, s.max),
        Some(s) => format!("{:.2} ({:.2}–{:.2})", s.median, s.min, s.max),
        None => "—".into(),
    }
}

fn number_cell(value: Option<f64>) -> String {
    match value {
        None => "—".into(),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) if v >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

/// The markdown table of one pass: the median of each figure over the
/// rounds, and the round-by-round IOPS ratios.
pub fn pass_table(samples: &[Sample], pass: &str) -> String {
    let mut out = String::from(
        "| workload | target | IOPS | MiB/s | p50 µs | p99 µs | CPU s/GiB | ÷ NBD (min–max) | ÷ brd (min–max) | runs |\n\
         |---|---|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for workload in WORKLOADS {
        for target in SHOWN {
            let runs = find(samples, pass, target, workload.name);
            let median = |f: fn(&Metrics) -> f64| {
                spread(runs.iter().map(|s| f(&s.metrics)).collect()).map(|s| s.median)
            };
            let peer = TARGETS
                .iter()
                .find(|t| t.id == *target)
                .and_then(|t| t.peer);
            let vs_nbd = peer.and_then(|p| ratio(samples, pass, workload.name, target, p));
            let vs_brd = if *target == BRD {
                None
            } else {
                ratio(samples, pass, workload.name, target, BRD)
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                workload.name,
                target,
                number_cell(median(|m| m.iops)),
                number_cell(median(|m| m.mib_s)),
                number_cell(median(|m| m.p50_us)),
                number_cell(median(|m| m.p99_us)),
                number_cell(median(|m| m.cpu_s_per_gib)),
                if peer.is_some() {
                    ratio_cell(vs_nbd)
                } else {
                    "—".into()
                },
                if *target == BRD {
                    "—".into()
                } else {
                    ratio_cell(vs_brd)
                },
                runs.len()
            );
        }
    }
    out
}

/// The headline: netblk's IOPS over NBD's, per workload and pass, one
/// column per netblk target.
pub fn summary_table(samples: &[Sample]) -> String {
    let netblk: Vec<&Target> = TARGETS.iter().filter(|t| t.peer.is_some()).collect();
    let mut out = String::from("| workload | servers |");
    for t in &netblk {
        let _ = write!(out, " {} ÷ {} |", t.id, t.peer.unwrap_or_default());
    }
    out.push_str("\n|---|---|");
    out.push_str(&"--:|".repeat(netblk.len()));
    out.push('\n');
    for workload in WORKLOADS {
        for (pass, _) in PASSES {
            let _ = write!(out, "| {} | {pass} |", workload.name);
            for t in &netblk {
                let peer = t.peer.unwrap_or_default();
                let _ = write!(
                    out,
                    " {} |",
                    ratio_cell(ratio(samples, pass, workload.name, t.id, peer))
                );
            }
            out.push('\n');
        }
    }
    out
}

/// What the report says about where and how it was measured.
pub struct Setting {
    pub command: String,
    pub date: String,
    pub kernel: String,
    pub plan: Plan,
    pub wall: Duration,
    /// Other work on the host meanwhile.
    pub host: HostWatch,
}

/// Other work on the host above this (in CPUs, averaged over a run) is
/// named in the report.
const BUSY_HOST: f64 = 0.5;

/// What the report says about other work on the host while it measured.
fn host_section(samples: &[Sample], setting: &Setting) -> String {
    let mut out = String::from("## Other work on the host\n\n");
    let host = &setting.host;
    let Some(overall) = host.overall else {
        out.push_str("Not measured (no /proc figures for the QEMU process).\n\n");
        return out;
    };
    let mut busy: Vec<(f64, &Sample)> = samples
        .iter()
        .filter_map(|s| host.loads.get(&s.id).map(|l| (*l, s)))
        .filter(|(l, _)| *l >= BUSY_HOST)
        .collect();
    busy.sort_by(|a, b| b.0.total_cmp(&a.0));
    let _ = writeln!(
        out,
        "The guest's vCPUs are host threads; other processes on the host used {overall:.2} host CPUs on \
         average while the guest measured. The guest was paused (its clock too) {} time(s), {:.0} s in all, \
         while they used {PAUSE_ABOVE} CPU or more. {} of {} runs still saw {BUSY_HOST} CPU or more of such load{}",
        host.pauses,
        host.paused.as_secs_f64(),
        busy.len(),
        samples.len(),
        if busy.is_empty() {
            "."
        } else {
            " (CPUs, run):"
        }
    );
    for (load, s) in busy.iter().take(40) {
        let _ = writeln!(
            out,
            "- {load:.1}: {} {} {} round {}",
            s.pass, s.workload, s.target, s.round
        );
    }
    if busy.len() > 40 {
        let _ = writeln!(out, "- and {} more", busy.len() - 40);
    }
    out.push('\n');
    out
}

/// The whole markdown report.
pub fn report(console: &Console, setting: &Setting) -> String {
    let plan = &setting.plan;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Benchmarks: netblk, the kernel NBD client and brd\n\n\
         Written by `cargo xtask vm-bench`; run it again rather than editing this file.\n\n\
         - command: `{}`\n- date: {}\n- kernel: {} (Debian), in QEMU under software emulation (TCG), 2 vCPUs, 2 GiB\n\
         - fio: `--direct=1 --ioengine=libaio --time_based --runtime={}ms --ramp_time={}ms`, one job, {} round(s)\n\
         - the guest ran for {:.0} s{}\n",
        setting.command,
        setting.date,
        setting.kernel,
        plan.runtime_ms,
        plan.ramp_ms,
        plan.rounds,
        setting.wall.as_secs_f64(),
        setting.host.cpus.map_or(String::new(), |n| format!(
            " (paused {:.0} s of it), on a host of {n} CPUs shared with other work",
            setting.host.paused.as_secs_f64()
        ))
    );
    out.push_str(
        "Every figure comes from one guest boot, targets measured one at a time with nothing\n\
         else doing IO; the servers run in the guest too, on loopback. Under software emulation\n\
         the absolute numbers are emulation figures: compare targets within one table, not with\n\
         other machines.\n\n\
         How to read it:\n\
         - each cell is the median over the rounds; `runs` counts the rounds measured;\n\
         - `÷ NBD` is netblk's IOPS over the NBD client's with as many connections (1 node and 1 queue\n  \
           against 1 connection; 3 nodes and 2 queues against 6), `÷ brd` a target's IOPS over the\n  \
           RAM disk's: both taken round by round (each round runs every target once, in alternating\n  \
           order), then the median and the smallest and largest of those ratios;\n\
         - latency is fio's total latency (submission to completion);\n\
         - CPU s/GiB is all non-idle guest CPU time (fio, netblk, the servers, the kernel; from\n  \
           /proc/stat around the run, scaled to the measured part) per GiB moved;\n\
         - a device gets at most one blk-mq hardware queue per CPU (the mapping is listed with the\n  \
           data paths): with 2 vCPUs, `nbd-client -C 6` makes 6 connections but 2 queues, and the\n  \
           NBD client sends a queue's requests over the connection of the same number, so 2 of the\n  \
           6 carry IO; netblk's 2 queues each reach all 3 nodes. One fio job submits from the CPU\n  \
           it runs on, so mostly through one queue at a time;\n\
         - every device is 128 MiB; with stores, each is written whole once before the runs.\n\n",
    );
    out.push_str(
        "## Summary: netblk's IOPS over the NBD client's\n\n\
         Median of the per-round ratios (smallest–largest); `store`: with stores, `null`: with\n\
         discarding servers.\n\n",
    );
    out.push_str(&summary_table(&console.samples));
    out.push_str("\nTargets:\n\n");
    for target in SHOWN {
        if let Some(t) = TARGETS.iter().find(|t| t.id == *target) {
            let _ = writeln!(out, "- `{}`: {}", t.id, t.what);
        }
    }
    out.push('\n');
    for (pass, title) in PASSES {
        let _ = writeln!(out, "## {title}\n");
        let paths: Vec<String> = console
            .paths
            .iter()
            .filter(|(p, _, _)| p == pass)
            .map(|(_, t, path)| format!("`{t}`: {path}"))
            .collect();
        if !paths.is_empty() {
            let _ = writeln!(out, "As set up:\n\n- {}\n", paths.join("\n- "));
        }
        out.push_str(&pass_table(&console.samples, pass));
        out.push('\n');
    }
    out.push_str(&host_section(&console.samples, setting));
    if !console.problems.is_empty() {
        out.push_str("## Runs not counted\n\n");
        for problem in &console.problems {
            let _ = writeln!(out, "- {problem}");
        }
        out.push('\n');
    }
    out
}

fn need_bench_tools() -> Result<PathBuf, String> {
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

/// The host's CPU time: (busy, total) jiffies over all CPUs, and the
/// number of CPUs, from the text of /proc/stat.
fn host_cpu(stat: &str) -> Option<(u64, u64, u32)> {
    let first = stat.lines().next()?;
    let fields: Vec<u64> = first
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal ...
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4).unwrap_or(&0);
    let cpus = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .count();
    Some((
        total.checked_sub(idle)?,
        total,
        u32::try_from(cpus).ok()?.max(1),
    ))
}

/// A process's parent, name and CPU time (user + system jiffies), from the
/// text of /proc/PID/stat.
fn process_cpu(stat: &str) -> Option<(u32, &str, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?;
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // After the name: state ppid ... utime (field 14) stime (15).
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, name, utime + stime))
}

/// The QEMU this process started, by its pid.
fn our_qemu() -> Option<u32> {
    let me = std::process::id();
    fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
        let (ppid, name, _) = process_cpu(&stat)?;
        (ppid == me && name.starts_with("qemu-system")).then_some(pid)
    })
}

/// Host CPU figures at one moment: (busy, total, CPUs, QEMU's CPU time).
fn host_now(qemu: Option<u32>) -> Option<(u64, u64, u32, u64)> {
    let (busy, total, cpus) = host_cpu(&fs::read_to_string("/proc/stat").ok()?)?;
    let stat = fs::read_to_string(format!("/proc/{}/stat", qemu?)).ok()?;
    let (_, _, qemu_cpu) = process_cpu(&stat)?;
    Some((busy, total, cpus, qemu_cpu))
}

/// How many host CPUs, on average, processes other than QEMU kept busy
/// between two moments.
fn others_load(before: (u64, u64, u32, u64), after: (u64, u64, u32, u64)) -> Option<f64> {
    let total = after.1.checked_sub(before.1).filter(|t| *t > 0)?;
    let busy = after.0.saturating_sub(before.0);
    let qemu = after.3.saturating_sub(before.3);
    Some(busy.saturating_sub(qemu) as f64 * f64::from(after.2) / total as f64)
}

/// What the watcher saw of the host while the guest measured.
#[derive(Debug, Default)]
pub struct HostWatch {
    /// Host CPUs that other processes used, on average while the guest ran
    /// (pauses left out), by run id.
    pub loads: BTreeMap<u32, f64>,
    /// The same over the whole measurement.
    pub overall: Option<f64>,
    /// How often, and how long in all, the guest was paused for other work.
    pub pauses: u32,
    pub paused: Duration,
    /// The host's CPUs.
    pub cpus: Option<u32>,
}

/// The guest is paused when other processes used this many host CPUs over
/// the last tick...
const PAUSE_ABOVE: f64 = 0.5;
/// ...and resumed once they used less than this for `QUIET_FOR`, or after
/// `LONGEST_PAUSE`; pauses stop once they add up to `PAUSE_BUDGET`.
const RESUME_BELOW: f64 = 0.3;
const QUIET_FOR: Duration = Duration::from_secs(2);
const LONGEST_PAUSE: Duration = Duration::from_secs(120);
const PAUSE_BUDGET: Duration = Duration::from_secs(15 * 60);
const TICK: Duration = Duration::from_millis(250);

/// QEMU's human monitor, for `stop` and `cont`.
struct Monitor(UnixStream);

impl Monitor {
    fn connect(path: &Path) -> Option<Monitor> {
        let stream = UnixStream::connect(path).ok()?;
        stream.set_nonblocking(true).ok()?;
        let mut monitor = Monitor(stream);
        monitor.drain();
        Some(monitor)
    }

    /// Sends one command; its echo and prompt are read and dropped.
    fn command(&mut self, command: &str) -> bool {
        self.drain();
        let sent = self.0.write_all(format!("{command}\n").as_bytes()).is_ok();
        self.drain();
        sent
    }

    fn drain(&mut self) {
        let mut buf = [0u8; 4096];
        while matches!(self.0.read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// An average load over some time.
#[derive(Default)]
struct Average {
    cpu_seconds: f64,
    seconds: f64,
}

impl Average {
    fn add(&mut self, load: f64, time: Duration) {
        self.cpu_seconds += load * time.as_secs_f64();
        self.seconds += time.as_secs_f64();
    }

    fn get(&self) -> Option<f64> {
        (self.seconds > 0.0).then(|| self.cpu_seconds / self.seconds)
    }
}

/// Follows the guest's console log while it runs and prints each run as it
/// is reported; measures how much host CPU other processes take meanwhile
/// and, with a `monitor`, pauses the guest (its clock too) while they take
/// much, so they do not slow the emulated CPUs in the middle of a run.
fn watch(log: &Path, monitor: Option<&Path>, total: u64, stop: &AtomicBool) -> HostWatch {
    let mut seen = HostWatch::default();
    let (mut offset, mut partial, mut runs) = (0u64, String::new(), 0u64);
    let started = Instant::now();
    let (mut qemu, mut control) = (None, None);
    let mut last: Option<((u64, u64, u32, u64), Instant)> = None;
    let (mut measuring, mut run, mut whole) = (false, Average::default(), Average::default());
    let mut paused: Option<(Instant, Duration)> = None;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(TICK);
        if qemu.is_none() {
            qemu = our_qemu();
        }
        if let (None, Some(path)) = (&control, monitor) {
            control = Monitor::connect(path);
        }
        let now = Instant::now();
        let sample = host_now(qemu);
        let load = last
            .zip(sample)
            .and_then(|((before, _), after)| others_load(before, after));
        if let (Some(load), Some((_, at))) = (load, last) {
            let tick = now - at;
            match &mut paused {
                None => {
                    run.add(load, tick);
                    if measuring {
                        whole.add(load, tick);
                    }
                    if measuring
                        && load >= PAUSE_ABOVE
                        && seen.paused < PAUSE_BUDGET
                        && control.as_mut().is_some_and(|c| c.command("stop"))
                    {
                        paused = Some((now, Duration::ZERO));
                        seen.pauses += 1;
                    }
                }
                Some((since, quiet)) => {
                    *quiet = if load < RESUME_BELOW {
                        *quiet + tick
                    } else {
                        Duration::ZERO
                    };
                    let long = now - *since;
                    if (*quiet >= QUIET_FOR
                        || long >= LONGEST_PAUSE
                        || seen.paused + long >= PAUSE_BUDGET)
                        && control.as_mut().is_some_and(|c| c.command("cont"))
                    {
                        seen.paused += long;
                        eprintln!(
                            "    (guest paused {long:.1?} while the host was busy with other work)"
                        );
                        paused = None;
                    }
                }
            }
        }
        if let Some(sample) = sample {
            last = Some((sample, now));
            seen.cpus = Some(sample.2);
        }
        let Ok(mut file) = fs::File::open(log) else {
            continue;
        };
        let mut fresh = Vec::new();
        if file.seek(SeekFrom::Start(offset)).is_err() || file.read_to_end(&mut fresh).is_err() {
            continue;
        }
        offset += fresh.len() as u64;
        partial.push_str(&String::from_utf8_lossy(&fresh));
        while let Some(end) = partial.find('\n') {
            let line: String = partial.drain(..=end).collect();
            if let Some(rest) = marked(&line, "NETBLK-BENCH-RUN ") {
                runs += 1;
                let fields: Vec<&str> = rest.split_whitespace().collect();
                let load = run.get();
                if let (Some(id), Some(load)) = (fields.first().and_then(|f| f.parse().ok()), load)
                {
                    seen.loads.insert(id, load);
                }
                eprintln!(
                    "    [{runs}/{total} {:.0?}] {}{}",
                    started.elapsed(),
                    fields.get(1..5).unwrap_or_default().join(" "),
                    load.filter(|l| *l >= 0.05)
                        .map_or(String::new(), |l| format!("  (other host load {l:.1} CPU)"))
                );
                run = Average::default();
            } else if line.contains("NETBLK-BENCH-PLAN") {
                measuring = true;
            } else if line.contains("NETBLK-BENCH-DONE") {
                measuring = false;
            } else if line.starts_with("== ") || line.contains("NETBLK-BENCH-FAIL") {
                eprintln!("    {}", line.trim_end());
                if line.contains(": measuring") {
                    run = Average::default();
                }
            }
        }
    }
    if let (Some((since, _)), Some(c)) = (paused, control.as_mut()) {
        seen.paused += since.elapsed();
        c.command("cont");
    }
    seen.overall = whole.get();
    seen
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
    let text = report(
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
            "NETBLK-BENCH-RUN {id} {pass} {target} {workload} {round} rc=0 busy=150 total=400 ncpu=2 bytes={}",
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
                ramp_ms: 0
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
                ramp_ms: 1000
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
        assert_eq!(plan.runs(), 252);
        let estimate = plan.runs() * (plan.runtime_ms + plan.ramp_ms + 1_000) / 1000 + 60;
        assert!(estimate < 25 * 60, "{estimate} s");
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
        let out = Command::new("sh")
            .args(["-n", "-c", &script])
            .output()
            .expect("run sh -n");
        assert!(
            out.status.success(),
            "sh -n: {}",
            String::from_utf8_lossy(&out.stderr)
        );
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
        // p99, CPU, ratios, runs.
        assert_eq!(
            row,
            "| randread-4k-qd1 | netblk-1n1q-auto | 1000 | 128 | 100 | 90.0 | 6.00 | 1.00 (0.90–1.10) | 0.50 (0.45–0.55) | 3 |"
        );
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
            "| randread-4k-qd1 | store | — | 1.00 (0.90–1.10) | — | — |"
        );
        assert!(text.contains("| workload | servers | netblk-1n1q-copy ÷ nbd-1conn |"));
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

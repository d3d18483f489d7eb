//! The guest's console: run lines and base64 fio reports, parsed into
//! samples.

use std::collections::BTreeMap;

use serde_json::Value;

use super::*;

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
    /// CPU seconds of the target's servers (its mock nodes, nbd-server or
    /// nbdkit) per GiB moved.
    pub server_s_per_gib: f64,
    /// CPUs busy over the run: the whole guest, the target's netblk daemon
    /// (0 for other targets), its busiest thread, its servers, softirqs.
    pub cpus: Cpus,
    pub switches: Switches,
}

/// Shares of one CPU, over the whole run (ramp included).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Cpus {
    pub guest: f64,
    pub client: f64,
    pub client_thread: f64,
    pub nodes: f64,
    pub softirq: f64,
}

/// Context switches per IO over the run: the whole guest, the target's
/// netblk daemon (0 for other targets), its servers.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Switches {
    pub guest: f64,
    pub client: f64,
    pub servers: f64,
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
pub(super) struct RunLine {
    pub(super) id: u32,
    pub(super) pass: String,
    pub(super) target: String,
    pub(super) workload: String,
    pub(super) round: u32,
    pub(super) rc: i64,
    pub(super) busy: u64,
    pub(super) total: u64,
    pub(super) ncpu: u32,
    pub(super) bytes: usize,
    /// Clock ticks (optional fields): the netblk daemon, its busiest
    /// thread, the nodes, softirqs.
    pub(super) client: u64,
    pub(super) top: u64,
    pub(super) nodes: u64,
    pub(super) sirq: u64,
    /// Context switches (optional fields): the whole guest, the netblk
    /// daemon's threads, the servers' threads.
    pub(super) ctxt: u64,
    pub(super) cswc: u64,
    pub(super) cswn: u64,
}

impl RunLine {
    pub(super) fn parse(fields: &[&str]) -> Result<RunLine, String> {
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
            // Optional figures: clock ticks and context switches.
            let optional = match key {
                "client" => Some(&mut run.client),
                "top" => Some(&mut run.top),
                "nodes" => Some(&mut run.nodes),
                "sirq" => Some(&mut run.sirq),
                "ctxt" => Some(&mut run.ctxt),
                "cswc" => Some(&mut run.cswc),
                "cswn" => Some(&mut run.cswn),
                _ => None,
            };
            if let Some(figure) = optional {
                *figure = value.parse().map_err(|_| bad())?;
                continue;
            }
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
pub(super) fn marked<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
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
pub(super) fn sample(run: &RunLine, mut chunks: Vec<(u32, String)>) -> Result<Metrics, String> {
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
pub(super) fn fio_metrics(json: &str, side: &str, run: &RunLine) -> Result<Metrics, String> {
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
    // Ticks per CPU over the run.
    let span = run.total as f64 / f64::from(run.ncpu);
    let cpus = Cpus {
        guest: busy_cpus,
        client: run.client as f64 / span,
        client_thread: run.top as f64 / span,
        nodes: run.nodes as f64 / span,
        softirq: run.sirq as f64 / span,
    };
    let iops = number(figures.get("iops"), "iops")?;
    // IOs over the whole run (ramp included, as the counters are), at the
    // measured rate; USER_HZ is 100 on every kernel measured.
    let ios = iops * span / 100.0;
    let per_io = |n: u64| if ios > 0.0 { n as f64 / ios } else { 0.0 };
    Ok(Metrics {
        iops,
        switches: Switches {
            guest: per_io(run.ctxt),
            client: per_io(run.cswc),
            servers: per_io(run.cswn),
        },
        mib_s: number(figures.get("bw_bytes"), "bw_bytes")? / f64::from(1u32 << 20),
        p50_us: percentile("50.000000")? / 1000.0,
        p99_us: percentile("99.000000")? / 1000.0,
        cpu_s_per_gib: busy_cpus * runtime_ms / 1000.0 / gib,
        server_s_per_gib: cpus.nodes * runtime_ms / 1000.0 / gib,
        cpus,
    })
}

/// Decodes standard base64 (with padding); anything else is an error.
pub(super) fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
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

//! Medians, ratios and the markdown report.

use std::fmt::Write as _;
use std::time::Duration;

use super::*;

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

pub(super) fn find<'a>(
    samples: &'a [Sample],
    pass: &str,
    target: &str,
    workload: &str,
) -> Vec<&'a Sample> {
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
    ratio_of(samples, pass, workload, target, other, |m| m.iops)
}

/// The ratio of a figure of `target` to the same figure of `other`, round
/// by round, as a spread.
pub fn ratio_of(
    samples: &[Sample],
    pass: &str,
    workload: &str,
    target: &str,
    other: &str,
    figure: fn(&Metrics) -> f64,
) -> Option<Spread> {
    let mine = find(samples, pass, target, workload);
    let theirs = find(samples, pass, other, workload);
    let ratios = mine
        .iter()
        .filter_map(|m| {
            theirs
                .iter()
                .find(|t| t.round == m.round && figure(&t.metrics) > 0.0)
                .map(|t| figure(&m.metrics) / figure(&t.metrics))
        })
        .collect();
    spread(ratios)
}

/// A ratio's median and range, with a third decimal for small ones.
pub(super) fn ratio_cell(s: Option<Spread>) -> String {
    match s {
        Some(s) if s.median < 0.1 => format!("{:.3} ({:.3}–{:.3})", s.median, s.min, s.max),
        Some(s) => format!("{:.2} ({:.2}–{:.2})", s.median, s.min, s.max),
        None => "—".into(),
    }
}

pub(super) fn number_cell(value: Option<f64>) -> String {
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
        "| workload | target | IOPS | MiB/s | p50 µs | p99 µs | CPU s/GiB | servers' CPU s/GiB | ÷ NBD (min–max) | ÷ brd (min–max) | runs |\n\
         |---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
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
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                workload.name,
                target,
                number_cell(median(|m| m.iops)),
                number_cell(median(|m| m.mib_s)),
                number_cell(median(|m| m.p50_us)),
                number_cell(median(|m| m.p99_us)),
                number_cell(median(|m| m.cpu_s_per_gib)),
                if *target == BRD {
                    "—".into()
                } else {
                    number_cell(median(|m| m.server_s_per_gib))
                },
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

/// A figure of each netblk target over the same figure of its NBD peer,
/// round by round, per workload and pass: the markdown table, and every
/// cell's spread.
fn vs_peer_table(samples: &[Sample], figure: fn(&Metrics) -> f64) -> (String, Vec<Spread>) {
    let netblk: Vec<&Target> = TARGETS.iter().filter(|t| t.peer.is_some()).collect();
    let mut out = String::from("| workload | servers |");
    for t in &netblk {
        let _ = write!(out, " {} ÷ {} |", t.id, t.peer.unwrap_or_default());
    }
    out.push_str("\n|---|---|");
    out.push_str(&"--:|".repeat(netblk.len()));
    out.push('\n');
    let mut cells = Vec::new();
    for workload in WORKLOADS {
        for (pass, _) in PASSES {
            let _ = write!(out, "| {} | {pass} |", workload.name);
            for t in &netblk {
                let peer = t.peer.unwrap_or_default();
                let cell = ratio_of(samples, pass, workload.name, t.id, peer, figure);
                cells.extend(cell);
                let _ = write!(out, " {} |", ratio_cell(cell));
            }
            out.push('\n');
        }
    }
    (out, cells)
}

/// The headline: netblk's IOPS over NBD's, per workload and pass, one
/// column per netblk target.
pub fn summary_table(samples: &[Sample]) -> String {
    vs_peer_table(samples, |m| m.iops).0
}

/// What the servers cost: the CPU seconds per GiB of netblk's mock nodes
/// over those of the NBD server with as many connections, per workload and
/// pass (below 1: the mock nodes cost less), and how many medians meet
/// the goal of at most 1.
pub fn servers_table(samples: &[Sample]) -> String {
    let (mut out, cells) = vs_peer_table(samples, |m| m.server_s_per_gib);
    let met = cells.iter().filter(|s| s.median <= 1.0).count();
    let _ = writeln!(
        out,
        "\nAt most 1 (the mock nodes cost no more CPU per GiB than the NBD server): {met} of {} medians.",
        cells.len()
    );
    out
}

/// Where the wake-ups of one request at a time go: context switches per
/// IO of the whole guest, of the netblk daemon and of the servers, for the
/// depth-1 workloads (medians over the rounds).
pub fn switches_table(samples: &[Sample]) -> String {
    let mut out = String::from(
        "| workload | servers | target | whole guest | netblk daemon | servers |\n|---|---|---|--:|--:|--:|\n",
    );
    for workload in WORKLOADS.iter().filter(|w| w.name.ends_with("-qd1")) {
        for (pass, _) in PASSES {
            for target in SHOWN.iter().filter(|t| **t != BRD) {
                let runs = find(samples, pass, target, workload.name);
                if runs.is_empty() {
                    continue;
                }
                let median = |f: fn(&Switches) -> f64| {
                    spread(runs.iter().map(|s| f(&s.metrics.switches)).collect()).map(|s| s.median)
                };
                let _ = writeln!(
                    out,
                    "| {} | {pass} | {target} | {} | {} | {} |",
                    workload.name,
                    number_cell(median(|s| s.guest)),
                    if target.starts_with("netblk") {
                        number_cell(median(|s| s.client))
                    } else {
                        "—".into()
                    },
                    number_cell(median(|s| s.servers)),
                );
            }
        }
    }
    out
}

/// What replication costs: the replicated target's IOPS over the
/// unreplicated one's with the same columns and queues, per workload and
/// pass.
pub fn replication_table(samples: &[Sample]) -> String {
    let mut out =
        format!("| workload | servers | {REPLICATED} ÷ {UNREPLICATED} |\n|---|---|--:|\n");
    for workload in WORKLOADS {
        for (pass, _) in PASSES {
            let _ = writeln!(
                out,
                "| {} | {pass} | {} |",
                workload.name,
                ratio_cell(ratio(
                    samples,
                    pass,
                    workload.name,
                    REPLICATED,
                    UNREPLICATED
                ))
            );
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
pub(super) const BUSY_HOST: f64 = 0.5;

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

/// A report's title and where and how it was measured.
pub(super) fn heading(title: &str, setting: &Setting) -> String {
    let plan = &setting.plan;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# {title}\n\n\
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
    out
}

/// The whole markdown report.
pub fn report(console: &Console, setting: &Setting) -> String {
    let mut out = heading("Benchmarks: netblk, the kernel NBD client and brd", setting);
    out.push_str(
        "Every figure comes from one guest boot, targets measured one at a time with nothing\n\
         else doing IO; the servers run in the guest too, on loopback. Under software emulation\n\
         the absolute numbers are emulation figures: compare targets within one table, not with\n\
         other machines.\n\n\
         How to read it:\n\
         - each cell is the median over the rounds; `runs` counts the rounds measured;\n\
         - `÷ NBD` is netblk's IOPS over the NBD client's with as many connections (1 node and 1 queue\n  \
           against 1 connection; 3 nodes and 2 queues against 6; the replicated device, which writes\n  \
           every block twice, against 6 too), `÷ brd` a target's IOPS over the\n  \
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
    out.push_str(
        "\n## Replication: R = 2 over R = 1\n\n\
         The replicated device (3 columns on 6 nodes) over the unreplicated one (3 nodes), same\n\
         queues and data path, round by round: writes go out twice and wait for both copies;\n\
         reads go to one copy, spread over both.\n\n",
    );
    out.push_str(&replication_table(&console.samples));
    out.push_str(
        "\n## The servers' CPU: mock nodes over the NBD server\n\n\
         CPU seconds per GiB moved of the processes serving each target (user and system time of\n\
         every thread, from /proc around the run, scaled to the measured part): netblk's mock\n\
         nodes over nbd-server's processes (it forks one per connection) with stores, over\n\
         nbdkit's with discarding servers; round by round, median (smallest–largest).\n\n",
    );
    out.push_str(&servers_table(&console.samples));
    out.push_str(
        "\n## Context switches per IO, one request at a time\n\n\
         Where the wake-ups of a depth-1 request go: context switches per IO of the whole guest\n\
         (/proc/stat), of the netblk daemon's threads and of the servers' threads\n\
         (/proc/PID/task/*/status), over the run at the measured rate. The kernel NBD client has\n\
         no process of its own: its switches are among the guest's.\n\n",
    );
    out.push_str(&switches_table(&console.samples));
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
    out.push_str(&closing_sections(console, setting));
    out
}

/// The end of every report: other work on the host, and the runs that
/// could not be counted.
pub(super) fn closing_sections(console: &Console, setting: &Setting) -> String {
    let mut out = host_section(&console.samples, setting);
    if !console.problems.is_empty() {
        out.push_str("## Runs not counted\n\n");
        for problem in &console.problems {
            let _ = writeln!(out, "- {problem}");
        }
        out.push('\n');
    }
    out
}

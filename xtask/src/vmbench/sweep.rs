//! `cargo xtask vm-bench --sweep`: netblk alone over queues (1, 2) and
//! nodes (1, 2, 4, 8), on both data paths, against discarding nodes, with
//! the CPU of each party, to see how throughput grows with nodes and what
//! saturates where it stops growing.

use std::fmt::Write as _;

use super::*;

/// One netblk configuration of the sweep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// `copy` (`--zero-copy off`) or `auto`.
    pub path: &'static str,
    pub queues: u32,
    pub nodes: u32,
}

impl Config {
    pub fn id(&self) -> String {
        format!("netblk-{}n{}q-{}", self.nodes, self.queues, self.path)
    }

    fn zero_copy(&self) -> &'static str {
        if self.path == "copy" { "off" } else { "auto" }
    }
}

const fn config(path: &'static str, queues: u32, nodes: u32) -> Config {
    Config {
        path,
        queues,
        nodes,
    }
}

/// Every configuration, in the order a round runs them (every other round
/// runs them in reverse).
pub const CONFIGS: &[Config] = &[
    config("copy", 1, 1),
    config("copy", 1, 2),
    config("copy", 1, 4),
    config("copy", 1, 8),
    config("copy", 2, 1),
    config("copy", 2, 2),
    config("copy", 2, 4),
    config("copy", 2, 8),
    config("auto", 1, 1),
    config("auto", 1, 2),
    config("auto", 1, 4),
    config("auto", 1, 8),
    config("auto", 2, 1),
    config("auto", 2, 2),
    config("auto", 2, 4),
    config("auto", 2, 8),
];

/// Mock node processes the sweep starts (the most any configuration uses).
const NODE_PROCS: u32 = 8;

/// The workloads swept (from the main list).
pub const WORKLOADS: &[&str] = &[
    "randread-4k-qd32",
    "randwrite-4k-qd32",
    "read-1m-qd8",
    "write-1m-qd8",
];

const PASS: &str = "sweep";

/// The sweep's settings for the guest script: its pass, targets and
/// workloads, and the function that maps its devices.
pub fn settings() -> String {
    let ids: Vec<String> = CONFIGS.iter().map(Config::id).collect();
    let mut out = format!(
        "PASSES=\"{PASS}\"\nTARGETS=\"{}\"\nWORKLOADS=\"{}\"\nNODE_PROCS={NODE_PROCS}\nsweep_maps() {{\n",
        ids.join(" "),
        WORKLOADS.join(" ")
    );
    for c in CONFIGS {
        let _ = writeln!(
            out,
            "  map_netblk {} \"$(node_list {})\" {} {}",
            c.id(),
            c.nodes,
            c.queues,
            c.zero_copy()
        );
    }
    out.push_str("}\n");
    out
}

fn share(value: Option<f64>) -> String {
    value.map_or("—".into(), |v| format!("{v:.2}"))
}

/// One workload's table: a row per configuration.
pub fn table(samples: &[Sample], workload: &str) -> String {
    let mut out = String::from(
        "| data path | queues | nodes | IOPS | MiB/s | p50 µs | ÷ 1 node (min–max) | guest CPUs | netblk | its busiest thread | nodes | softirq | runs |\n\
         |---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    for c in CONFIGS {
        let id = c.id();
        let runs = find(samples, PASS, &id, workload);
        let median = |f: fn(&Metrics) -> f64| {
            spread(runs.iter().map(|s| f(&s.metrics)).collect()).map(|s| s.median)
        };
        let one = Config { nodes: 1, ..*c }.id();
        let growth = if c.nodes == 1 {
            "—".into()
        } else {
            ratio_cell(ratio(samples, PASS, workload, &id, &one))
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {growth} | {} | {} | {} | {} | {} | {} |",
            c.path,
            c.queues,
            c.nodes,
            number_cell(median(|m| m.iops)),
            number_cell(median(|m| m.mib_s)),
            number_cell(median(|m| m.p50_us)),
            share(median(|m| m.cpus.guest)),
            share(median(|m| m.cpus.client)),
            share(median(|m| m.cpus.client_thread)),
            share(median(|m| m.cpus.nodes)),
            share(median(|m| m.cpus.softirq)),
            runs.len()
        );
    }
    out
}

/// The sweep's markdown report.
pub fn report(console: &Console, setting: &Setting) -> String {
    let mut out = heading("Scaling: netblk over queues and nodes", setting);
    out.push_str(
        "netblk alone, 1 and 2 queues over 1, 2, 4 and 8 mock nodes (`--store null`: writes are\n\
         dropped, reads return zeroes, so the nodes' stores are not measured), on the copy data\n\
         path (`--zero-copy off`) and the default (`auto`). Every configuration is mapped at\n\
         once; each round runs them one at a time, in alternating order.\n\n\
         How to read it:\n\
         - each cell is the median over the rounds; `÷ 1 node` is the IOPS over the same data\n  \
           path and queues with 1 node, round by round (median, smallest–largest);\n\
         - the CPU columns are shares of one CPU over the run (2 in all): the whole guest (fio,\n  \
           netblk, the nodes, the kernel), the netblk daemon (every thread) and its busiest\n  \
           thread, the mock node processes, and softirq time (loopback delivery);\n\
         - a row stops growing where a column reaches its ceiling: the guest at 2 CPUs, a queue\n  \
           thread at 1.\n\n",
    );
    for workload in WORKLOADS {
        let _ = writeln!(out, "## {workload}\n");
        out.push_str(&table(&console.samples, workload));
        out.push('\n');
    }
    let paths: Vec<String> = console
        .paths
        .iter()
        .map(|(_, t, path)| format!("`{t}`: {path}"))
        .collect();
    if !paths.is_empty() {
        let _ = writeln!(out, "## As set up\n\n- {}\n", paths.join("\n- "));
    }
    out.push_str(&closing_sections(console, setting));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_configuration_is_mapped_once_with_its_nodes() {
        let script = guest_script(
            &BenchArgs {
                sweep: true,
                ..BenchArgs::default()
            }
            .plan(),
        );
        for c in CONFIGS {
            assert!(c.nodes <= NODE_PROCS);
            let line = format!(
                "  map_netblk {} \"$(node_list {})\" {} {}\n",
                c.id(),
                c.nodes,
                c.queues,
                c.zero_copy()
            );
            assert_eq!(script.matches(&line).count(), 1, "{line}");
            // The 1-node configuration each row is compared with exists.
            assert!(CONFIGS.contains(&Config { nodes: 1, ..*c }));
        }
        for w in WORKLOADS {
            assert!(super::super::WORKLOADS.iter().any(|m| m.name == *w), "{w}");
        }
        assert!(script.contains("PASSES=\"sweep\"\n"));
        assert!(script.contains("NODE_PROCS=8\n"));
        assert!(script.contains("RUNTIME_MS=2000\nRAMP_MS=1000\nROUNDS=2\n"));
        vm::tests::assert_valid_shell(&script);
    }

    /// The CPU figures the guest measures around each run.
    fn run(target: &str, round: u32, iops: f64, client: u64) -> Sample {
        let line = format!(
            "1 sweep {target} read-1m-qd8 {round} rc=0 busy=300 total=400 ncpu=2 bytes=1 client={client} top={} nodes=50 sirq=20",
            client / 2
        );
        let fields: Vec<&str> = line.split_whitespace().collect();
        let parsed = RunLine::parse(&fields).expect("run line");
        assert_eq!((parsed.client, parsed.nodes, parsed.sirq), (client, 50, 20));
        let json = format!(
            r#"{{"jobs": [{{"error": 0, "read": {{"io_bytes": 1073741824, "bw_bytes": 536870912, "iops": {iops}, "runtime": 2000, "lat_ns": {{"percentile": {{"50.000000": 1000, "99.000000": 2000}}}}}}}}]}}"#
        );
        Sample {
            id: 1,
            pass: PASS.into(),
            target: target.into(),
            workload: "read-1m-qd8".into(),
            round,
            metrics: fio_metrics(&json, "read", &parsed).expect("figures"),
        }
    }

    #[test]
    fn rows_show_growth_over_one_node_and_who_is_busy() {
        let samples = vec![
            run("netblk-1n1q-copy", 1, 100.0, 100),
            run("netblk-1n1q-copy", 2, 200.0, 100),
            run("netblk-4n1q-copy", 1, 150.0, 200),
            run("netblk-4n1q-copy", 2, 360.0, 180),
        ];
        let text = table(&samples, "read-1m-qd8");
        // 200 ticks over 2 CPUs' 400: 1 CPU; its thread 0.5; the nodes
        // 0.25, softirqs 0.1; the guest 1.5 CPUs.
        let row = text
            .lines()
            .find(|l| l.starts_with("| copy | 1 | 4 |"))
            .expect("row");
        assert_eq!(
            row,
            "| copy | 1 | 4 | 255 | 512 | 1.00 | 1.65 (1.50–1.80) | 1.50 | 0.95 | 0.47 | 0.25 | 0.10 | 2 |"
        );
        let base = text
            .lines()
            .find(|l| l.starts_with("| copy | 1 | 1 |"))
            .expect("row");
        assert!(base.contains("| — | 1.50 | 0.50 | 0.25 |"), "{base}");
        let absent = text
            .lines()
            .find(|l| l.starts_with("| auto | 2 | 8 |"))
            .expect("row");
        assert!(
            absent.ends_with("| — | — | — | — | — | — | 0 |"),
            "{absent}"
        );
    }
}

//! How a benchmark report is shown: a table for people, one JSON object for
//! programs.

use super::{Figures, Report};

impl Report {
    /// A table for people.
    pub fn to_text(&self) -> String {
        if self.options.security {
            return self.security_text();
        }
        if self.options.resync {
            return self.resync_text();
        }
        if self.options.sweep {
            return self.sweep_text();
        }
        let mut out = format!(
            "netblk bench: {} nodes, {} queue(s), {} connections, depth {}, {:.1} s per run, {} round(s) per workload (the median pair shown)\n\n",
            self.nodes,
            self.options.queues,
            self.connections,
            self.options.depth,
            self.options.duration.as_secs_f64(),
            self.options.rounds
        );
        out.push_str(&format!(
            "{:<14} {:<5} {:<8} {:>10} {:>9} {:>9} {:>9} {:>9} {:>10} {:>6}  {}\n",
            "workload",
            "mode",
            "who",
            "IOPS",
            "MiB/s",
            "p50 us",
            "p99 us",
            "p99.9 us",
            "CPU s/GiB",
            "p50 x",
            "ratio"
        ));
        for r in &self.rows {
            for (who, f) in [("netblk", &r.figures), (r.baseline, &r.baseline_figures)] {
                let p50 = if who == "netblk" {
                    format!("{:.2}", f.p50_us / r.baseline_figures.p50_us.max(1e-9))
                } else {
                    String::new()
                };
                let ratio = if who == "netblk" && r.rounds > 1 {
                    format!("{:.2} ({:.2}-{:.2})", r.ratio, r.ratio_min, r.ratio_max)
                } else if who == "netblk" {
                    format!("{:.2}", r.ratio)
                } else {
                    String::new()
                };
                out.push_str(&format!(
                    "{:<14} {:<5} {:<8} {:>10.0} {:>9.1} {:>9.0} {:>9.0} {:>9.0} {:>10.2} {:>6}  {}\n",
                    r.workload,
                    r.mode.to_string(),
                    who,
                    f.iops(),
                    f.mib_s(),
                    f.p50_us,
                    f.p99_us,
                    f.p999_us,
                    f.cpu_s_per_gib(),
                    p50,
                    ratio
                ));
            }
        }
        out.push_str(
            "ratio: netblk's IOPS (MiB/s for 1 MiB) / the baseline's, median (lowest-highest) over the rounds; p50 x: netblk's p50 latency / the baseline's\n",
        );
        for o in &self.overhead {
            out.push_str(&format!(
                "recording figures: {} {}: {:.3} of the IOPS without (median of {} alternating pairs); {:.0} ns per request = {:.2}% of the {:.0} ns of CPU netblk spends on one\n",
                o.workload,
                o.mode,
                o.ratio,
                o.pairs,
                o.recording_ns,
                100.0 * o.recording_ns / o.cpu_ns_per_request.max(1e-9),
                o.cpu_ns_per_request
            ));
        }
        out
    }

    /// What a catch-up costs: random writes during one against all in sync.
    fn resync_text(&self) -> String {
        let mut out = format!(
            "netblk bench --resync: {} nodes, {} replicas, {} queue(s), depth {}, {:.1} s per run, {} round(s) (the median round shown), copy sends\n\n",
            self.nodes,
            self.options.replicas,
            self.options.queues,
            self.options.depth,
            self.options.duration.as_secs_f64(),
            self.options.rounds
        );
        out.push_str(&format!(
            "{:<14} {:<30} {:>10} {:>9} {:>9}  {}\n",
            "workload", "while", "IOPS", "p50 us", "p99 us", "ratio"
        ));
        for r in &self.resync {
            let (mid, lo, hi) = r.ratio;
            let ratio = if r.rounds > 1 {
                format!("{mid:.2} ({lo:.2}-{hi:.2})")
            } else {
                format!("{mid:.2}")
            };
            let during = format!("a catch-up at {} MiB/s", r.rate >> 20);
            for (who, f, ratio) in [
                ("all in sync", &r.baseline, String::new()),
                (during.as_str(), &r.during, ratio),
            ] {
                out.push_str(&format!(
                    "{:<14} {:<30} {:>10.0} {:>9.0} {:>9.0}  {}\n",
                    r.workload,
                    who,
                    f.iops(),
                    f.p50_us,
                    f.p99_us,
                    ratio
                ));
            }
            out.push_str(&format!(
                "the catch-up: {} MiB to copy, copied at {:.1} MiB/s while measured\n",
                r.backlog >> 20,
                r.copied_per_s / (1u64 << 20) as f64
            ));
        }
        out.push_str("ratio: IOPS during the catch-up / the better of the runs with every member in sync just before and after it, median (lowest-highest) over the rounds\n");
        out
    }

    /// What digests and TLS cost: each against plaintext.
    fn security_text(&self) -> String {
        let mut out = format!(
            "netblk bench --security: {} nodes, {} queue(s), depth {}, {:.1} s per run, {} round(s) per workload (the median round shown), copy sends\n\n",
            self.nodes,
            self.options.queues,
            self.options.depth,
            self.options.duration.as_secs_f64(),
            self.options.rounds
        );
        out.push_str(&format!(
            "{:<14} {:<22} {:>10} {:>9} {:>9} {:>10}  {}\n",
            "workload", "protection", "IOPS", "MiB/s", "p50 us", "CPU s/GiB", "ratio"
        ));
        for r in &self.security {
            let ratio = |(mid, lo, hi): (f64, f64, f64)| {
                if r.rounds > 1 {
                    format!("{mid:.2} ({lo:.2}-{hi:.2})")
                } else {
                    format!("{mid:.2}")
                }
            };
            let mut lines = vec![
                ("plaintext".to_string(), &r.plain, String::new()),
                (
                    "crc32c digests".to_string(),
                    &r.digest,
                    ratio(r.digest_ratio),
                ),
            ];
            if let Some((f, q)) = &r.tls {
                lines.push((format!("TLS ({})", r.transport), f, ratio(*q)));
            }
            for (who, f, ratio) in lines {
                out.push_str(&format!(
                    "{:<14} {:<22} {:>10.0} {:>9.1} {:>9.0} {:>10.2}  {}\n",
                    r.workload,
                    who,
                    f.iops(),
                    f.mib_s(),
                    f.p50_us,
                    f.cpu_s_per_gib(),
                    ratio
                ));
            }
        }
        out.push_str("ratio: IOPS (MiB/s for 1 MiB) with the protection / in plaintext in the same round, median (lowest-highest) over the rounds\n");
        out
    }

    /// A sweep's curve: per workload, netblk and its baseline at each
    /// queues/nodes point, with where the CPU went.
    fn sweep_text(&self) -> String {
        let mut out = format!(
            "netblk bench --sweep: depth {}, {:.1} s per run, {} round(s) per point (the median pair shown)\n\n",
            self.options.depth,
            self.options.duration.as_secs_f64(),
            self.options.rounds
        );
        out.push_str(&format!(
            "{:<14} {:<5} {:>6} {:>5} {:>13} {:>13} {:>6} {:>11} {:>10} {:>11} {:>10}\n",
            "workload",
            "mode",
            "queues",
            "nodes",
            "netblk",
            "wire",
            "ratio",
            "netblk CPU%",
            "its nodes%",
            "wire CPU%",
            "its nodes%"
        ));
        for r in &self.rows {
            let (figure, unit): (fn(&Figures) -> f64, &str) = if r.workload.ends_with("-1m") {
                (Figures::mib_s, "MiB/s")
            } else {
                (Figures::iops, "IOPS")
            };
            let (f, b) = (&r.figures, &r.baseline_figures);
            out.push_str(&format!(
                "{:<14} {:<5} {:>6} {:>5} {:>7.0} {:<5} {:>7.0} {:<5} {:>6.2} {:>11.0} {:>10.0} {:>11.0} {:>10.0}\n",
                r.workload,
                r.mode.to_string(),
                r.queues,
                r.nodes,
                figure(f),
                unit,
                figure(b),
                unit,
                r.ratio,
                f.cpu_pct(),
                f.node_cpu_pct,
                b.cpu_pct(),
                b.node_cpu_pct
            ));
        }
        out.push_str("CPU%: of one core, over the run: the client process, and the mock nodes it started together\n");
        out
    }

    /// One JSON object.
    pub fn to_json(&self) -> String {
        let fig = |f: &Figures| {
            format!(
                "{{\"iops\":{:.1},\"mib_s\":{:.2},\"p50_us\":{:.0},\"p99_us\":{:.0},\"p999_us\":{:.0},\"cpu_s_per_gib\":{:.3},\"cpu_pct\":{:.1},\"node_cpu_pct\":{:.1},\"ops\":{},\"seconds\":{:.3}}}",
                f.iops(),
                f.mib_s(),
                f.p50_us,
                f.p99_us,
                f.p999_us,
                f.cpu_s_per_gib(),
                f.cpu_pct(),
                f.node_cpu_pct,
                f.ops,
                f.seconds
            )
        };
        let rows: Vec<String> = self
            .rows
            .iter()
            .map(|r| {
                format!(
                    "{{\"workload\":\"{}\",\"mode\":\"{}\",\"queues\":{},\"nodes\":{},\"figures\":{},\"baseline\":\"{}\",\"baseline_figures\":{},\"ratio\":{:.3},\"ratio_min\":{:.3},\"ratio_max\":{:.3},\"rounds\":{}}}",
                    r.workload,
                    r.mode,
                    r.queues,
                    r.nodes,
                    fig(&r.figures),
                    r.baseline,
                    fig(&r.baseline_figures),
                    r.ratio,
                    r.ratio_min,
                    r.ratio_max,
                    r.rounds
                )
            })
            .collect();
        let overhead: Vec<String> = self
            .overhead
            .iter()
            .map(|o| {
                format!(
                    "{{\"workload\":\"{}\",\"mode\":\"{}\",\"ratio\":{:.4},\"pairs\":{},\"recording_ns\":{:.1},\"cpu_ns_per_request\":{:.0}}}",
                    o.workload, o.mode, o.ratio, o.pairs, o.recording_ns, o.cpu_ns_per_request
                )
            })
            .collect();
        let ratio = |(mid, lo, hi): (f64, f64, f64)| {
            format!("{{\"ratio\":{mid:.3},\"ratio_min\":{lo:.3},\"ratio_max\":{hi:.3}}}")
        };
        let security: Vec<String> = self
            .security
            .iter()
            .map(|r| {
                let tls = r.tls.as_ref().map_or("null".to_string(), |(f, q)| {
                    format!(
                        "{{\"transport\":\"{}\",\"figures\":{},\"vs_plaintext\":{}}}",
                        r.transport,
                        fig(f),
                        ratio(*q)
                    )
                });
                format!(
                    "{{\"workload\":\"{}\",\"mode\":\"{}\",\"rounds\":{},\"plaintext\":{},\"digest\":{{\"figures\":{},\"vs_plaintext\":{}}},\"tls\":{}}}",
                    r.workload,
                    r.mode,
                    r.rounds,
                    fig(&r.plain),
                    fig(&r.digest),
                    ratio(r.digest_ratio),
                    tls
                )
            })
            .collect();
        let resync: Vec<String> = self
            .resync
            .iter()
            .map(|r| {
                format!(
                    "{{\"workload\":\"{}\",\"rounds\":{},\"in_sync\":{},\"catching_up\":{},\"vs_in_sync\":{},\"rate_bytes_s\":{},\"copied_bytes_s\":{:.0},\"backlog_bytes\":{}}}",
                    r.workload,
                    r.rounds,
                    fig(&r.baseline),
                    fig(&r.during),
                    ratio(r.ratio),
                    r.rate,
                    r.copied_per_s,
                    r.backlog
                )
            })
            .collect();
        format!(
            "{{\"nodes\":{},\"queues\":{},\"connections\":{},\"depth\":{},\"duration_s\":{:.3},\"results\":[{}],\"metrics_overhead\":[{}],\"security\":[{}],\"resync\":[{}]}}",
            self.nodes,
            self.options.queues,
            self.connections,
            self.options.depth,
            self.options.duration.as_secs_f64(),
            rows.join(","),
            overhead.join(","),
            security.join(","),
            resync.join(",")
        )
    }
}

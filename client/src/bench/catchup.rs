//! `netblk bench --resync`: what a catch-up costs the application. On one
//! replicated volume over mock nodes, rounds of: random 4 KiB writes with
//! every member in sync (the baseline: the same operation over the same
//! connections with nothing else running, an upper bound); then one member
//! taken out and held out while a backlog is written (one pass of 1 MiB
//! writes over the volume: its whole column to copy back), let back, and
//! the same random writes while it catches up at the resync rate, and
//! again once it is back in sync. The catch-up must run for the whole
//! measured run, or the round is refused. The ratio: IOPS during the
//! catch-up over the better of the runs all in sync before and after it;
//! the median round reported.

use std::io;
use std::time::{Duration, Instant};

use super::{Attached, BenchOptions, Figures, Pass, Protect, Report, Workload, with_node_cpu};
use crate::membership::Membership;
use crate::mock::{mock_node_bin, start_mock_nodes};
use crate::resync::ResyncOptions;
use crate::uring::SendMode;

/// One round's figures (the median round's, in a report).
#[derive(Debug, Clone)]
pub struct ResyncRow {
    pub workload: &'static str,
    /// Every member in sync.
    pub baseline: Figures,
    /// While a member caught up.
    pub during: Figures,
    /// during / baseline: the median over the rounds, lowest, highest.
    pub ratio: (f64, f64, f64),
    /// The catch-up's rate limit, and the rate it copied at while measured.
    pub rate: u64,
    pub copied_per_s: f64,
    /// Bytes the catch-up had to copy.
    pub backlog: u64,
    pub rounds: usize,
}

/// How long the catch-up may take to start once the member is let back.
const START_WITHIN: Duration = Duration::from_secs(20);

/// Runs the comparison.
pub fn run(options: &BenchOptions, progress: &mut dyn FnMut(&str)) -> io::Result<Report> {
    let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
    if !options.nodes.is_empty() {
        return Err(invalid(
            "--resync starts its own mock nodes: leave out --nodes".into(),
        ));
    }
    if options.replicas < 2 {
        return Err(invalid(format!(
            "--resync needs a replicated volume: --replicas {} (at least 2)",
            options.replicas
        )));
    }
    let bin = mock_node_bin(options.mock_node_bin.as_ref())?;
    progress(&format!(
        "starting {} mock nodes (store {})",
        options.node_count, options.node_store
    ));
    let (nodes, addrs) = start_mock_nodes(options.node_count, &bin, &options.node_store, &[])?;
    let pids = nodes.pids();
    let spec = options.spec(addrs.clone());
    let resync = ResyncOptions {
        rate: options.resync_rate,
        // Found at once once let back: the wait is not what is measured.
        probe_every: Duration::from_millis(100),
        ..ResyncOptions::default()
    };
    let mode = SendMode::Copy;
    let attached = Attached::new(&spec, options, mode, &Protect::default(), Some(resync))?;
    let m = attached.membership();
    let workload = Workload::RandWrite4k;
    let measure = |pass: Pass| with_node_cpu(&pids, || attached.run(workload, pass, true, None));
    let columns = attached.layout().columns();
    // Every block written once first, unmeasured: a store's first write of
    // a block (a memory store allocating it) is not the baseline's alone.
    progress("warming up: one pass of 1 MiB writes");
    attached.run(Workload::SeqWrite1m, Pass::Once, false, None)?;
    let mut rounds: Vec<(f64, Figures, Figures, f64, u64)> = Vec::new();
    // The run all in sync after a round's catch-up is the next one's
    // before it.
    let mut in_sync = None;
    for round in 0..options.rounds {
        let of = workload.round_label(round, options.rounds);
        let before = match in_sync.take() {
            Some(figures) => figures,
            None => {
                progress(&format!("all in sync: {of}"));
                measure(Pass::For(options.duration))?
            }
        };
        // A member of the last row, column by round.
        let r = attached.layout().replication();
        let node = (r.replicas() as usize - 1) * columns + round % columns;
        progress(&format!(
            "node {node} taken out; backlog: one pass of 1 MiB writes"
        ));
        m.hold_out(node, true);
        m.report(node, "taken out by the benchmark", Instant::now());
        wait(m, "the member to leave", Duration::from_secs(30), |m| {
            !m.view().takes_writes(r.column_of(node), r.row_of(node))
        })?;
        attached.run(Workload::SeqWrite1m, Pass::Once, false, None)?;
        m.hold_out(node, false);
        wait(m, "the catch-up to start", START_WITHIN, |m| {
            m.progress().get(&node).is_some_and(|p| p.done > 0)
        })?;
        let (copied0, at0) = (
            m.resync_bytes.load(std::sync::atomic::Ordering::Relaxed),
            Instant::now(),
        );
        progress(&format!("node {node} catching up: {of}"));
        let during = measure(Pass::For(options.duration))?;
        let copied = m.resync_bytes.load(std::sync::atomic::Ordering::Relaxed) - copied0;
        let seconds = at0.elapsed().as_secs_f64();
        let Some(left) = m.progress().get(&node).map(|p| p.remaining()) else {
            return Err(io::Error::other(format!(
                "the catch-up ended before the measurement did ({copied} bytes copied in {seconds:.1} s): give a larger --size or a shorter --duration"
            )));
        };
        let backlog = m.progress().get(&node).map_or(0, |p| p.total);
        progress(&format!(
            "node {node}: {} MiB left to copy; waiting for it to be back in sync",
            left >> 20
        ));
        let limit = Duration::from_secs(60)
            + Duration::from_secs_f64(left as f64 / options.resync_rate.max(1) as f64 * 2.0);
        wait(m, "the member to be back in sync", limit, |m| {
            m.view().in_sync(r.column_of(node), r.row_of(node))
        })?;
        progress(&format!("all in sync again: {of}"));
        let after = measure(Pass::For(options.duration))?;
        in_sync = Some(after.clone());
        // The better of the runs all in sync around it: the upper bound.
        let baseline = if after.iops() > before.iops() {
            after
        } else {
            before
        };
        let ratio = during.iops() / baseline.iops().max(1e-9);
        rounds.push((ratio, baseline, during, copied as f64 / seconds, backlog));
    }
    rounds.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (lo, hi) = (rounds[0].0, rounds[rounds.len() - 1].0);
    let n = rounds.len();
    let (ratio, baseline, during, copied_per_s, backlog) = rounds.swap_remove(n / 2);
    Ok(Report {
        nodes: addrs.len(),
        connections: addrs.len() * options.queues,
        options: options.clone(),
        rows: Vec::new(),
        overhead: Vec::new(),
        security: Vec::new(),
        resync: vec![ResyncRow {
            workload: workload.name(),
            baseline,
            during,
            ratio: (ratio, lo, hi),
            rate: options.resync_rate,
            copied_per_s,
            backlog,
            rounds: n,
        }],
    })
}

/// Waits up to `limit` for `done` (the copier's own wait), or says what
/// did not happen.
fn wait(
    m: &Membership,
    what: &str,
    limit: Duration,
    done: impl Fn(&Membership) -> bool,
) -> io::Result<()> {
    if crate::regions::wait_until(limit, || done(m)) {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("waited {} s for {what}", limit.as_secs()),
    ))
}

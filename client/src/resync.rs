//! Catch-up and rebuild of members out of sync (docs/resync.md), on a
//! thread of the serving daemon: members out of their column's in-sync set
//! are probed; one that answers joins its column (it takes the column's
//! writes from then on, never reads), the regions it missed are copied to
//! it from an in-sync member, each under the region gate, throttled, and
//! it is back in sync once the copy is durable.
//!
//! - Catch-up: the member holds the volume identity it was connected with,
//!   and either the incarnation the device last saw or one that vouches
//!   for it (nothing it acknowledged was lost): the regions the in-sync
//!   members tracked as missed (their union) are copied.
//! - Rebuild: anything else (a new volume identity: its data is gone; an
//!   incarnation that does not vouch; an identity not known; bitmaps not
//!   kept): every region of its column. A member rebuilt under a new
//!   identity is held to that one from the join on (queues, records and
//!   the device record).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::layout::Layout;
use crate::membership::Membership;
use crate::records::{ManagerHandle, RecordStore};
use crate::regions::RESYNC_REGION;

/// Default `--resync-rate`, bytes a second: a 1 TiB column in under five
/// hours, and about a tenth of a 10 Gb/s link left to the application's
/// share of a node.
pub const DEFAULT_RATE: u64 = 64 << 20;

/// How often members out of sync are probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);

/// Regions copied under one hold (and one flush of the joiner).
const BATCH: usize = 4;

/// How far a copy to one member is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Copied in full (a rebuild) or only what it missed (a catch-up).
    pub rebuild: bool,
    /// Bytes to copy, and copied so far.
    pub total: u64,
    pub done: u64,
    pub started: Instant,
}

impl Progress {
    pub fn percent(&self) -> f64 {
        if self.total == 0 {
            return 100.0;
        }
        self.done as f64 * 100.0 / self.total as f64
    }

    /// Time left at the rate so far (None before anything was copied).
    pub fn eta(&self, now: Instant) -> Option<Duration> {
        let spent = now.saturating_duration_since(self.started).as_secs_f64();
        if self.done == 0 || spent <= 0.0 {
            return None;
        }
        let rate = self.done as f64 / spent;
        Some(Duration::from_secs_f64(
            (self.total - self.done.min(self.total)) as f64 / rate,
        ))
    }

    pub fn remaining(&self) -> u64 {
        self.total.saturating_sub(self.done)
    }
}

/// How the copies run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncOptions {
    /// Bytes a second copied at most (0: no limit).
    pub rate: u64,
    /// How often members out of sync are probed.
    pub probe_every: Duration,
    /// Bound of each wait for writes in flight (to a held region, or
    /// started before the copy).
    pub wait: Duration,
    /// The copy waits (a little, each batch) while the device has at
    /// least this many writes in flight: it yields to the application.
    pub busy: u64,
}

impl Default for ResyncOptions {
    fn default() -> ResyncOptions {
        ResyncOptions {
            rate: DEFAULT_RATE,
            probe_every: PROBE_EVERY,
            wait: Duration::from_secs(30),
            busy: 16,
        }
    }
}

/// A token bucket: at most `rate` bytes a second, bursts of a tenth of a
/// second.
struct Bucket {
    rate: u64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        Bucket {
            rate,
            tokens: 0.0,
            last: Instant::now(),
        }
    }

    /// Waits until `bytes` may go.
    fn take(&mut self, bytes: u64) {
        if self.rate == 0 {
            return;
        }
        let now = Instant::now();
        let rate = self.rate as f64;
        let burst = (rate / 10.0).max(bytes as f64);
        self.tokens = (self.tokens + now.saturating_duration_since(self.last).as_secs_f64() * rate)
            .min(burst);
        self.last = now;
        self.tokens -= bytes as f64;
        if self.tokens < 0.0 {
            std::thread::sleep(Duration::from_secs_f64(-self.tokens / rate));
        }
    }
}

/// What to do with a member out of sync that answered a probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Copy what it missed.
    CatchUp,
    /// Copy its whole column (why), holding it to `identity` from then on.
    Rebuild { why: String, identity: String },
}

/// Starts the thread that catches members up (until the membership is
/// dropped or the device fenced).
pub fn spawn(
    store: Box<dyn RecordStore>,
    layout: Layout,
    membership: &Arc<Membership>,
    manager: ManagerHandle,
    options: ResyncOptions,
) -> std::io::Result<()> {
    let weak = Arc::downgrade(membership);
    std::thread::Builder::new()
        .name("netblk-resync".into())
        .spawn(move || run(&*store, &layout, &weak, &manager, options))?;
    Ok(())
}

/// Sleeps `total` in short steps; false once the device is gone.
fn nap(weak: &Weak<Membership>, total: Duration) -> bool {
    let until = Instant::now() + total;
    while Instant::now() < until {
        if weak.strong_count() == 0 {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50).min(total));
    }
    weak.strong_count() > 0
}

fn run(
    store: &dyn RecordStore,
    layout: &Layout,
    weak: &Weak<Membership>,
    manager: &ManagerHandle,
    options: ResyncOptions,
) {
    while nap(weak, options.probe_every) {
        let Some(m) = weak.upgrade() else {
            return;
        };
        if m.view().fenced || m.stopping() {
            return;
        }
        let Some((node, plan)) = next_member(store, layout, &m) else {
            continue;
        };
        drop(m);
        if let Err(why) = copy_to(store, layout, weak, manager, node, &plan, options) {
            tracing::warn!(node, error = %why, "catch-up stopped; tried again later");
            if let Some(m) = weak.upgrade() {
                m.set_progress(node, None);
            }
        }
    }
}

/// The first member out of sync that answers, and what to copy to it.
fn next_member(store: &dyn RecordStore, layout: &Layout, m: &Membership) -> Option<(usize, Plan)> {
    let r = layout.replication();
    let view = m.view();
    let ledger = m.ledger()?;
    (0..layout.node_count())
        .filter(|n| {
            !view.takes_writes(r.column_of(*n), r.row_of(*n)) && !m.is_failed(*n) && !m.held_out(*n)
        })
        .find_map(|node| {
            let probe = match store.probe(node) {
                Ok(probe) => probe,
                Err(why) => {
                    tracing::debug!(node, error = %why, "member out of sync does not answer");
                    return None;
                }
            };
            let rebuild = |why: &str| Plan::Rebuild {
                why: why.into(),
                identity: probe.volume_id.clone(),
            };
            let plan = match m.pin(node) {
                Some(pin) if pin != probe.volume_id => {
                    rebuild("it holds the volume under a new identity: its data is gone")
                }
                None => rebuild("its volume identity was not known"),
                Some(_) => match ledger.incarnation(node) {
                    Some(seen)
                        if seen == probe.incarnation || seen == probe.durable_incarnation =>
                    {
                        Plan::CatchUp
                    }
                    Some(_) => rebuild("it restarted without vouching for what it acknowledged"),
                    None => rebuild("its incarnation was not known"),
                },
            };
            Some((node, plan))
        })
}

/// Replaces member `old` (an address of the device, as mapped or after an
/// earlier replacement; `mapped`: the addresses as mapped) with `new`: it
/// leaves its column's in-sync set first if it is in it (another member
/// must be), then the member is at `new` from then on, with no identity
/// known: the catch-up thread probes it there and rebuilds it in full.
/// Nothing more goes to `old`. Returns the member's index.
pub fn replace(
    m: &Membership,
    mapped: &[std::net::SocketAddr],
    old: std::net::SocketAddr,
    new: std::net::SocketAddr,
    wait: Duration,
) -> Result<usize, String> {
    let now = m.pins.addrs(mapped);
    let node = now
        .iter()
        .position(|a| *a == old)
        .ok_or_else(|| format!("{old} is not a member of this device"))?;
    if now.contains(&new) {
        return Err(format!("{new} is a member of this device already"));
    }
    let r = m.replication();
    let (column, row) = (r.column_of(node), r.row_of(node));
    m.hold_out(node, true);
    let view = m.view();
    if view.takes_writes(column, row) {
        let others = r
            .members(column)
            .any(|n| n != node && view.in_sync(column, r.row_of(n)) && !m.is_failed(n));
        if !others && view.in_sync(column, row) {
            m.hold_out(node, false);
            return Err(format!(
                "{old} is the only member in sync of column {column}: nothing to rebuild {new} from"
            ));
        }
        m.report(node, &format!("replaced by {new}"), Instant::now());
        if !wait_until(wait, || !m.view().takes_writes(column, row)) {
            m.hold_out(node, false);
            return Err(format!("{old} did not leave its column within {wait:?}"));
        }
    }
    m.pins.move_to(node, new);
    m.hold_out(node, false);
    tracing::info!(node, column, %old, %new, "member replaced: rebuilding the new one");
    Ok(node)
}

/// Releases what a copy holds, however it ends.
struct Holding<'a> {
    m: &'a Membership,
    regions: Vec<(usize, u64)>,
}

impl Holding<'_> {
    fn release(&mut self) {
        for (column, region) in self.regions.drain(..) {
            self.m.gate.unlock(column, region);
        }
    }
}

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.release();
        self.m.gate.deactivate();
    }
}

/// Polls `done` every millisecond until it holds or `limit` passes.
fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

/// The regions (of [`RESYNC_REGION`] node bytes) of `node`'s column it
/// missed: the union of what its in-sync members tracked; None when one of
/// them did not track it (then it is rebuilt).
fn missed_regions(
    store: &dyn RecordStore,
    layout: &Layout,
    m: &Membership,
    node: usize,
) -> Result<Option<BTreeSet<u64>>, String> {
    let r = layout.replication();
    let (column, row) = (r.column_of(node), r.row_of(node));
    let view = m.view();
    let mut union = BTreeSet::new();
    for member in r.members(column) {
        if !view.in_sync(column, r.row_of(member)) || m.is_failed(member) {
            continue;
        }
        let (regions, since) = store
            .missed(member, row as u32)
            .map_err(|why| format!("{}: {why}", store.name(member)))?;
        if since == 0 {
            return Ok(None);
        }
        union.extend(regions);
    }
    Ok(Some(union))
}

/// Joins `node` to its column, copies `plan`'s regions to it, and puts it
/// back in sync.
fn copy_to(
    store: &dyn RecordStore,
    layout: &Layout,
    weak: &Weak<Membership>,
    manager: &ManagerHandle,
    node: usize,
    plan: &Plan,
    options: ResyncOptions,
) -> Result<(), String> {
    let m = weak.upgrade().ok_or("the device stopped")?;
    let r = *layout.replication();
    let (column, row) = (r.column_of(node), r.row_of(node));
    // What it acknowledged before it left is copied anew: none of it can
    // be lost any more (nothing is sent to it before the join).
    if let Some(ledger) = m.ledger() {
        ledger.forget(node);
    }
    let mut rebuild = matches!(plan, Plan::Rebuild { .. });
    if let Plan::Rebuild { identity, .. } = plan
        && !identity.is_empty()
    {
        m.pins.set(node, identity.clone());
    }
    manager.join(&m, node, rebuild)?;
    m.gate.activate();
    let mut holding = Holding {
        m: &m,
        regions: Vec::new(),
    };
    // Writes started before the join did not go to it, and were not
    // counted by region: wait for them.
    let mut epoch = None;
    if !wait_until(options.wait, || {
        epoch = m.writes.flip();
        epoch.is_some()
    }) {
        return Err("writes of several epochs ago did not finish".into());
    }
    let epoch = epoch.unwrap_or_default();
    if !wait_until(options.wait, || m.writes.drained(epoch)) {
        return Err("writes started before the join did not finish".into());
    }
    let capacity = layout.node_capacity(node);
    let all = || (0..capacity.div_ceil(RESYNC_REGION)).collect::<BTreeSet<u64>>();
    let regions = if rebuild {
        all()
    } else {
        match missed_regions(store, layout, &m, node)? {
            Some(regions) => regions,
            None => {
                rebuild = true;
                all()
            }
        }
    };
    let why = match plan {
        Plan::Rebuild { why, .. } => why.as_str(),
        Plan::CatchUp if rebuild => "an in-sync member kept no record of what it missed",
        Plan::CatchUp => "",
    };
    let total: u64 = regions
        .iter()
        .map(|g| RESYNC_REGION.min(capacity.saturating_sub(g * RESYNC_REGION)))
        .sum();
    let started = Instant::now();
    let mut progress = Progress {
        rebuild,
        total,
        done: 0,
        started,
    };
    m.set_progress(node, Some(progress.clone()));
    tracing::info!(
        node,
        column,
        rebuild,
        why,
        regions = regions.len(),
        bytes = total,
        "catch-up started"
    );
    let mut bucket = Bucket::new(options.rate);
    let regions: Vec<u64> = regions.into_iter().collect();
    for batch in regions.chunks(BATCH) {
        let ranges: Vec<(u64, u64)> = batch
            .iter()
            .map(|g| {
                let offset = g * RESYNC_REGION;
                (offset, RESYNC_REGION.min(capacity.saturating_sub(offset)))
            })
            .filter(|(_, len)| *len > 0)
            .collect();
        let bytes: u64 = ranges.iter().map(|(_, len)| len).sum();
        bucket.take(bytes);
        // Yield to the application: a short wait while it is busy.
        wait_until(Duration::from_millis(20), || {
            m.writes.in_flight() < options.busy
        });
        let view = m.view();
        if view.fenced {
            return Err("the device was fenced".into());
        }
        if m.stopping() {
            return Err("the device is stopping".into());
        }
        if !view.joining(column, row) || m.is_failed(node) {
            return Err(format!("{} left while it caught up", store.name(node)));
        }
        let source = r
            .members(column)
            .find(|n| view.in_sync(column, r.row_of(*n)) && !m.is_failed(*n))
            .ok_or("no member of the column is in sync")?;
        for (offset, _) in &ranges {
            let region = offset / RESYNC_REGION;
            m.gate.lock(column, region);
            holding.regions.push((column, region));
        }
        if !wait_until(options.wait, || {
            holding.regions.iter().all(|(c, g)| m.gate.drained(*c, *g))
        }) {
            return Err("writes to a held region did not finish".into());
        }
        store.copy(view.owner_epoch, source, &[node], &ranges)?;
        holding.release();
        m.resync_bytes.fetch_add(bytes, Ordering::Relaxed);
        progress.done += bytes;
        m.set_progress(node, Some(progress.clone()));
    }
    drop(holding);
    // Durable on it (each copy flushed it); in sync from the record on.
    manager.promote(&m, node)?;
    m.set_progress(node, None);
    tracing::info!(
        node,
        column,
        rebuild,
        bytes = total,
        secs = started.elapsed().as_secs_f64(),
        "catch-up ended: back in sync"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_says_how_far_and_how_long_at_the_rate_so_far() {
        let t0 = Instant::now();
        let p = Progress {
            rebuild: false,
            total: 100 << 20,
            done: 25 << 20,
            started: t0,
        };
        assert_eq!(p.percent(), 25.0);
        assert_eq!(p.remaining(), 75 << 20);
        // 25 MiB in 5 s: 75 MiB more take 15 s.
        let eta = p.eta(t0 + Duration::from_secs(5)).expect("eta");
        assert!((eta.as_secs_f64() - 15.0).abs() < 0.01, "{eta:?}");
        let fresh = Progress { done: 0, ..p };
        assert_eq!(fresh.eta(t0 + Duration::from_secs(1)), None);
    }

    #[test]
    fn the_bucket_holds_the_rate() {
        let mut b = Bucket::new(100 << 20);
        let t0 = Instant::now();
        // 30 MiB at 100 MiB/s: about 0.3 s, less the first burst.
        for _ in 0..30 {
            b.take(1 << 20);
        }
        let spent = t0.elapsed().as_secs_f64();
        assert!((0.15..0.6).contains(&spent), "{spent} s");
        let mut free = Bucket::new(0);
        let t0 = Instant::now();
        free.take(1 << 40);
        assert!(t0.elapsed() < Duration::from_millis(50));
    }
}

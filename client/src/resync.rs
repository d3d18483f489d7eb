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
use crate::regions::{RESYNC_REGION, wait_until};

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
/// second (0: no limit).
struct Bucket {
    rate: u64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64, now: Instant) -> Bucket {
        Bucket {
            rate,
            tokens: 0.0,
            last: now,
        }
    }

    fn refill(&mut self, bytes: u64, now: Instant) {
        let rate = self.rate as f64;
        let burst = (rate / 10.0).max(bytes as f64);
        let spent = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + spent * rate).min(burst);
        self.last = now;
    }

    /// How long until `bytes` may go.
    fn delay(&mut self, bytes: u64, now: Instant) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        self.refill(bytes, now);
        let short = bytes as f64 - self.tokens;
        if short <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(short / self.rate as f64)
    }

    /// `bytes` go now.
    fn take(&mut self, bytes: u64, now: Instant) {
        if self.rate == 0 {
            return;
        }
        self.refill(bytes, now);
        self.tokens -= bytes as f64;
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

/// What a step of a [`Copier`] says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Not done: step again after this long (zero: at once).
    Again(Duration),
    /// Every region copied and durable on the joiner: promote it.
    Done,
    /// The copy cannot go on (the joiner left, the device was fenced or
    /// stops, a wait or the copies failed for too long).
    Failed(String),
}

#[derive(Debug)]
enum Phase {
    /// Waiting for the writes started before the join (not counted by
    /// region) to finish: the flip's epoch, once a flip was possible.
    Drain(Option<u64>),
    /// Copying `regions[next..]`.
    Copy,
}

/// Consecutive failed copies of a batch before a copy gives up.
const COPY_TRIES: u32 = 20;

/// The copy to one joining member, one step at a time (the catch-up
/// thread steps it, sleeping as told; the simulator steps it from its
/// event loop): drain, read what it missed, then per batch: hold its
/// regions, wait for their writes in flight, copy, release. Releases what
/// it holds when dropped, however it ends.
pub struct Copier {
    m: Arc<Membership>,
    node: usize,
    column: usize,
    row: usize,
    rebuild: bool,
    why: String,
    phase: Phase,
    regions: Vec<u64>,
    next: usize,
    /// Regions of the batch held now, since when.
    held: Vec<u64>,
    held_since: Option<Instant>,
    started: Instant,
    /// The drain or a copy waited since then.
    waiting_since: Instant,
    failures: u32,
    progress: Progress,
    bucket: Bucket,
    /// The application was busy at this instant (the copy yields a while).
    yielded_at: Option<Instant>,
    options: ResyncOptions,
    /// A planted bug for the simulator to find (never set outside tests):
    /// nothing is copied.
    #[doc(hidden)]
    pub plant_skip_copy: bool,
}

impl Drop for Copier {
    fn drop(&mut self) {
        for region in self.held.drain(..) {
            self.m.gate.unlock(self.column, region);
        }
        self.m.gate.deactivate();
    }
}

impl Copier {
    /// The copy to `node`, which just joined its column (`why`: why a
    /// rebuild, if it is one).
    pub fn new(
        m: Arc<Membership>,
        layout: &Layout,
        node: usize,
        rebuild: Option<String>,
        options: ResyncOptions,
        now: Instant,
    ) -> Copier {
        let r = layout.replication();
        m.gate.activate();
        Copier {
            m,
            node,
            column: r.column_of(node),
            row: r.row_of(node),
            rebuild: rebuild.is_some(),
            why: rebuild.unwrap_or_default(),
            phase: Phase::Drain(None),
            regions: Vec::new(),
            next: 0,
            held: Vec::new(),
            held_since: None,
            started: now,
            waiting_since: now,
            failures: 0,
            progress: Progress {
                rebuild: false,
                total: 0,
                done: 0,
                started: now,
            },
            bucket: Bucket::new(options.rate, now),
            yielded_at: None,
            options,
            plant_skip_copy: false,
        }
    }

    pub fn node(&self) -> usize {
        self.node
    }

    /// Bytes copied so far, and in all.
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    fn release(&mut self) {
        for region in self.held.drain(..) {
            self.m.gate.unlock(self.column, region);
        }
        self.held_since = None;
    }

    /// One step (see [`Step`]).
    pub fn step(&mut self, now: Instant, store: &dyn RecordStore, layout: &Layout) -> Step {
        let m = Arc::clone(&self.m);
        let view = m.view();
        if view.fenced {
            return Step::Failed("the device was fenced".into());
        }
        if m.stopping() {
            return Step::Failed("the device is stopping".into());
        }
        if !view.joining(self.column, self.row) || m.is_failed(self.node) {
            return Step::Failed(format!("{} left while it caught up", store.name(self.node)));
        }
        let waited = now.saturating_duration_since(self.waiting_since);
        match self.phase {
            Phase::Drain(None) => match m.writes.flip() {
                Some(epoch) => {
                    self.phase = Phase::Drain(Some(epoch));
                    Step::Again(Duration::ZERO)
                }
                None if waited > self.options.wait => {
                    Step::Failed("writes of several epochs ago did not finish".into())
                }
                None => Step::Again(Duration::from_millis(1)),
            },
            Phase::Drain(Some(epoch)) => {
                if !m.writes.drained(epoch) {
                    if waited > self.options.wait {
                        return Step::Failed(
                            "writes started before the join did not finish".into(),
                        );
                    }
                    return Step::Again(Duration::from_millis(1));
                }
                self.plan(store, layout, now)
            }
            Phase::Copy => self.copy_step(now, store, layout),
        }
    }

    /// What to copy: the missed regions, or every region of the column.
    fn plan(&mut self, store: &dyn RecordStore, layout: &Layout, now: Instant) -> Step {
        let capacity = layout.node_capacity(self.node);
        let all = || (0..capacity.div_ceil(RESYNC_REGION)).collect::<BTreeSet<u64>>();
        let regions = if self.rebuild {
            all()
        } else {
            match missed_regions(store, layout, &self.m, self.node) {
                Ok(Some(regions)) => regions,
                Ok(None) => {
                    self.rebuild = true;
                    self.why = "an in-sync member kept no record of what it missed".into();
                    all()
                }
                Err(why) => return Step::Failed(why),
            }
        };
        let total: u64 = regions
            .iter()
            .map(|g| RESYNC_REGION.min(capacity.saturating_sub(g * RESYNC_REGION)))
            .sum();
        self.regions = regions.into_iter().collect();
        self.progress = Progress {
            rebuild: self.rebuild,
            total,
            done: 0,
            started: now,
        };
        self.m.set_progress(self.node, Some(self.progress.clone()));
        tracing::info!(
            node = self.node,
            column = self.column,
            rebuild = self.rebuild,
            why = %self.why,
            regions = self.regions.len(),
            bytes = total,
            "catch-up started"
        );
        self.phase = Phase::Copy;
        self.waiting_since = now;
        Step::Again(Duration::ZERO)
    }

    fn copy_step(&mut self, now: Instant, store: &dyn RecordStore, layout: &Layout) -> Step {
        let m = Arc::clone(&self.m);
        let capacity = layout.node_capacity(self.node);
        let range = |g: u64| {
            let offset = g * RESYNC_REGION;
            (offset, RESYNC_REGION.min(capacity.saturating_sub(offset)))
        };
        if self.held.is_empty() {
            if self.next >= self.regions.len() {
                return Step::Done;
            }
            let batch: Vec<u64> = self.regions[self.next..]
                .iter()
                .take(BATCH)
                .copied()
                .collect();
            let bytes: u64 = batch.iter().map(|g| range(*g).1).sum();
            // The rate first, then a short yield to a busy application.
            let wait = self.bucket.delay(bytes, now);
            if !wait.is_zero() {
                return Step::Again(wait);
            }
            if m.writes.in_flight() >= self.options.busy {
                let since = *self.yielded_at.get_or_insert(now);
                if now.saturating_duration_since(since) < YIELD {
                    return Step::Again(Duration::from_millis(1));
                }
            }
            self.yielded_at = None;
            self.bucket.take(bytes, now);
            for g in &batch {
                m.gate.lock(self.column, *g);
            }
            self.held = batch;
            self.held_since = Some(now);
        }
        let column = self.column;
        if !self.held.iter().all(|g| m.gate.drained(column, *g)) {
            let since = self.held_since.unwrap_or(now);
            if now.saturating_duration_since(since) > self.options.wait {
                return Step::Failed("writes to a held region did not finish".into());
            }
            return Step::Again(Duration::from_millis(1));
        }
        let view = m.view();
        let r = layout.replication();
        let Some(source) = r
            .members(column)
            .find(|n| view.in_sync(column, r.row_of(*n)) && !m.is_failed(*n))
        else {
            return Step::Failed("no member of the column is in sync".into());
        };
        let ranges: Vec<(u64, u64)> = self
            .held
            .iter()
            .map(|g| range(*g))
            .filter(|(_, len)| *len > 0)
            .collect();
        let bytes: u64 = ranges.iter().map(|(_, len)| len).sum();
        let copied = if self.plant_skip_copy {
            Ok(())
        } else {
            store.copy(view.owner_epoch, source, &[self.node], &ranges)
        };
        let batch = self.held.len();
        self.release();
        if let Err(why) = copied {
            // The source may be failing (the queues take it out) or the
            // joiner (it leaves): tried again, for a while.
            self.failures += 1;
            if self.failures >= COPY_TRIES {
                return Step::Failed(why);
            }
            return Step::Again(Duration::from_millis(50));
        }
        self.failures = 0;
        self.next += batch;
        m.resync_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.progress.done += bytes;
        m.set_progress(self.node, Some(self.progress.clone()));
        Step::Again(Duration::ZERO)
    }

    /// How long the copy took so far.
    pub fn elapsed(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }

    pub fn rebuilding(&self) -> bool {
        self.rebuild
    }
}

/// How long a copy waits for a busy application before it copies anyway.
const YIELD: Duration = Duration::from_millis(20);

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
    // What it acknowledged before it left is copied anew: none of it can
    // be lost any more (nothing is sent to it before the join).
    if let Some(ledger) = m.ledger() {
        ledger.forget(node);
    }
    let rebuild = match plan {
        Plan::CatchUp => None,
        Plan::Rebuild { why, identity } => {
            if !identity.is_empty() {
                m.pins.set(node, identity.clone());
            }
            Some(why.clone())
        }
    };
    manager.join(&m, node, rebuild.is_some())?;
    let mut copier = Copier::new(
        Arc::clone(&m),
        layout,
        node,
        rebuild,
        options,
        Instant::now(),
    );
    loop {
        match copier.step(Instant::now(), store, layout) {
            Step::Again(pause) => {
                if !pause.is_zero() {
                    std::thread::sleep(pause);
                }
            }
            Step::Done => break,
            Step::Failed(why) => {
                // It leaves the joining set, to be probed and joined again.
                if !m.view().fenced && !m.stopping() {
                    m.report(node, &format!("catch-up failed: {why}"), Instant::now());
                }
                return Err(why);
            }
        }
    }
    let (rebuilt, bytes, spent) = (
        copier.rebuilding(),
        copier.progress().total,
        copier.elapsed(Instant::now()),
    );
    drop(copier);
    // Durable on it (each copy flushed it); in sync from the record on.
    manager.promote(&m, node)?;
    m.set_progress(node, None);
    tracing::info!(
        node,
        rebuild = rebuilt,
        bytes,
        secs = spent.as_secs_f64(),
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
        let t0 = Instant::now();
        let mut b = Bucket::new(100 << 20, t0);
        // 30 MiB at 100 MiB/s take 0.3 s: each MiB goes when its delay
        // has passed.
        let mut now = t0;
        for _ in 0..30 {
            now += b.delay(1 << 20, now);
            assert!(b.delay(1 << 20, now).is_zero());
            b.take(1 << 20, now);
        }
        let spent = now.duration_since(t0).as_secs_f64();
        assert!((0.29..0.31).contains(&spent), "{spent} s");
        // Idle for a second: one burst (a tenth of a second) at once, no
        // more.
        now += Duration::from_secs(1);
        b.take(10 << 20, now);
        assert!(!b.delay(1 << 20, now).is_zero());
        let mut free = Bucket::new(0, t0);
        assert!(free.delay(1 << 40, t0).is_zero());
    }
}

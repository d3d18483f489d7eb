//! A replicated device's membership as its queues see it: the current
//! record's in-sync sets (an immutable [`View`] swapped on every change),
//! and the members the queues found failed, waiting for the manager
//! (`replicas::manager`) to make their removal durable.
//!
//! The data path reads the view through [`Membership::version`] (one atomic
//! load) and takes a new snapshot only when it moved. A queue that finds a
//! member failed reports it ([`Membership::report`]) and holds the pieces
//! that member still owes; once the manager stored the shrunk record on
//! every remaining member of the column it publishes the new view, and the
//! queues complete those pieces without the member.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use netblk_protocol::pb::MembershipRecord;

use crate::activity::WriteEpochs;
use crate::layout::Replication;
use crate::ledger::Ledger;
use crate::reconcile::Reconciled;
use crate::regions::RegionGate;
use crate::resync::Progress;

/// The membership the data path works with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub generation: u64,
    pub owner_epoch: u64,
    /// Per column: bitmask of the replica rows in sync.
    pub iss: Vec<u32>,
    /// Per column (empty: none): rows catching up or rebuilding, which
    /// take writes but are not read (docs/resync.md).
    pub joining: Vec<u32>,
    /// Another owner took the volume over: every request fails with EIO.
    pub fenced: bool,
}

impl View {
    /// Every member of every column in sync (a volume's first record, and
    /// any unreplicated volume).
    pub fn all_in_sync(replication: &Replication) -> View {
        View {
            generation: 0,
            owner_epoch: 0,
            iss: vec![(1u32 << replication.replicas()) - 1; replication.columns() as usize],
            joining: Vec::new(),
            fenced: false,
        }
    }

    pub fn of_record(record: &MembershipRecord) -> View {
        View {
            generation: record.generation,
            owner_epoch: record.owner_epoch,
            iss: record.iss.clone(),
            joining: record.joining.clone(),
            fenced: false,
        }
    }

    /// True if replica row `row` of `column` is in sync.
    pub fn in_sync(&self, column: usize, row: usize) -> bool {
        self.iss.get(column).is_some_and(|m| m & (1 << row) != 0)
    }

    /// True if replica row `row` of `column` is catching up or rebuilding.
    pub fn joining(&self, column: usize, row: usize) -> bool {
        self.joining
            .get(column)
            .is_some_and(|m| m & (1 << row) != 0)
    }

    /// True if row `row` of `column` takes the column's writes: in sync or
    /// joining.
    pub fn takes_writes(&self, column: usize, row: usize) -> bool {
        self.in_sync(column, row) || self.joining(column, row)
    }

    /// Members of `column` in sync.
    pub fn in_sync_count(&self, column: usize) -> u32 {
        self.iss.get(column).map_or(0, |m| m.count_ones())
    }
}

/// Why a member failed (for the log and `status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: String,
    pub since: Instant,
}

/// A member out of its column's in-sync set (for `status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Departure {
    pub node: usize,
    pub reason: String,
    /// Seconds since the Unix epoch when the record that removed it was
    /// stored.
    pub at_unix: u64,
    pub generation: u64,
}

/// The volume identity each member is held to (empty: not known), and
/// the address of a member that replaced the one the device was mapped
/// with: shared by the device's record connections, its queues'
/// reconnects and its record, so that a member rebuilt under a new
/// identity, or at a new address, is reached and held to it everywhere at
/// once.
#[derive(Debug, Default)]
pub struct Pins {
    ids: Mutex<Vec<String>>,
    moved: Mutex<BTreeMap<usize, std::net::SocketAddr>>,
}

impl Pins {
    pub fn new(ids: Vec<String>) -> Arc<Pins> {
        Arc::new(Pins {
            ids: Mutex::new(ids),
            moved: Mutex::default(),
        })
    }

    /// The identity `node` is held to (None: any).
    pub fn get(&self, node: usize) -> Option<String> {
        lock(&self.ids).get(node).filter(|p| !p.is_empty()).cloned()
    }

    pub fn all(&self) -> Vec<String> {
        lock(&self.ids).clone()
    }

    pub fn set_all(&self, ids: Vec<String>) {
        *lock(&self.ids) = ids;
    }

    /// `node` is held to `id` from now on (empty: any).
    pub fn set(&self, node: usize, id: String) {
        let mut pins = lock(&self.ids);
        if pins.len() <= node {
            pins.resize(node + 1, String::new());
        }
        pins[node] = id;
    }

    /// Where member `node` is now, when not where the device was mapped.
    pub fn addr(&self, node: usize) -> Option<std::net::SocketAddr> {
        lock(&self.moved).get(&node).copied()
    }

    /// Member `node` is at `addr` from now on (a replacement): its identity
    /// is not known until it is probed.
    pub fn move_to(&self, node: usize, addr: std::net::SocketAddr) {
        lock(&self.moved).insert(node, addr);
        self.set(node, String::new());
    }

    /// `addrs` (as mapped) with every replacement in place.
    pub fn addrs(&self, mapped: &[std::net::SocketAddr]) -> Vec<std::net::SocketAddr> {
        let moved = lock(&self.moved);
        mapped
            .iter()
            .enumerate()
            .map(|(n, a)| moved.get(&n).copied().unwrap_or(*a))
            .collect()
    }
}

/// The device-wide membership; see the module docs.
pub struct Membership {
    replication: Replication,
    version: AtomicU64,
    view: Mutex<Arc<View>>,
    /// Members reported failed and still in the view's in-sync sets.
    failed: Mutex<BTreeMap<usize, Failure>>,
    /// Members removed by this daemon, newest last.
    departures: Mutex<Vec<Departure>>,
    /// Rung on every report (the manager waits on it).
    bell: crossbeam_channel::Sender<()>,
    rung: crossbeam_channel::Receiver<()>,
    /// Writes in flight on the device's queues (see `activity`).
    pub writes: WriteEpochs,
    /// Regions a copier holds, and the writes in flight to each (see
    /// `regions`).
    pub gate: RegionGate,
    /// What the attach reconciled (None: the last owner stopped cleanly,
    /// or one replica).
    reconciled: Mutex<Option<Reconciled>>,
    /// The device's durability ledger (set once its queues share one): a
    /// returning member's incarnation is judged by it.
    ledger: Mutex<Option<Arc<Ledger>>>,
    /// The volume identity each member is held to.
    pub pins: Arc<Pins>,
    /// Members catching up or rebuilding, and how far.
    resync: Mutex<BTreeMap<usize, Progress>>,
    /// Bytes copied by catch-ups and rebuilds since the device started.
    pub resync_bytes: AtomicU64,
    /// Chunks scrubs found differing since the device started.
    pub scrub_mismatches: AtomicU64,
    /// The device is stopping: background copies end.
    stopping: AtomicBool,
    /// Members being replaced: never probed nor joined again.
    held_out: Mutex<std::collections::BTreeSet<usize>>,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("view", &*self.view())
            .field("failed", &self.failed())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Membership {
    pub fn new(replication: Replication, view: View) -> Arc<Membership> {
        let (bell, rung) = crossbeam_channel::bounded(1);
        Arc::new(Membership {
            replication,
            version: AtomicU64::new(1),
            view: Mutex::new(Arc::new(view)),
            failed: Mutex::new(BTreeMap::new()),
            departures: Mutex::new(Vec::new()),
            bell,
            rung,
            writes: WriteEpochs::default(),
            gate: RegionGate::default(),
            reconciled: Mutex::new(None),
            ledger: Mutex::new(None),
            pins: Arc::new(Pins::default()),
            resync: Mutex::new(BTreeMap::new()),
            resync_bytes: AtomicU64::new(0),
            scrub_mismatches: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            held_out: Mutex::default(),
        })
    }

    /// An unreplicated (or not yet attached) device's: everyone in sync.
    pub fn all_in_sync(replication: Replication) -> Arc<Membership> {
        Membership::new(replication, View::all_in_sync(&replication))
    }

    pub fn replication(&self) -> &Replication {
        &self.replication
    }

    /// Moves on every time the view changes or a member is reported.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub fn view(&self) -> Arc<View> {
        Arc::clone(&lock(&self.view))
    }

    /// A queue found `node` failed (idempotent: the first reason stays).
    pub fn report(&self, node: usize, reason: &str, now: Instant) {
        let mut failed = lock(&self.failed);
        if failed.contains_key(&node) {
            return;
        }
        tracing::warn!(
            node,
            reason,
            "replica failed: taking it out of the in-sync set"
        );
        failed.insert(
            node,
            Failure {
                reason: reason.to_owned(),
                since: now,
            },
        );
        drop(failed);
        // The other queues stop sending to it at their next look.
        self.version.fetch_add(1, Ordering::AcqRel);
        // A full bell is already rung.
        let _ = self.bell.try_send(());
    }

    /// True if `node` was reported failed and is still waiting to leave.
    pub fn is_failed(&self, node: usize) -> bool {
        lock(&self.failed).contains_key(&node)
    }

    /// The members reported failed and not out yet.
    pub fn failed(&self) -> BTreeMap<usize, Failure> {
        lock(&self.failed).clone()
    }

    /// Waits up to `timeout` for a report (the manager's loop).
    pub fn wait_report(&self, timeout: std::time::Duration) {
        let _ = self.rung.recv_timeout(timeout);
    }

    /// The record stored durably says `view` now: the queues pick it up.
    /// Members no longer in sync stop being failures and become departures
    /// (with `reason`s from their reports).
    pub fn publish(&self, view: View) {
        let mut failed = lock(&self.failed);
        let mut departures = lock(&self.departures);
        let at_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        failed.retain(|node, failure| {
            let (column, row) = (
                self.replication.column_of(*node),
                self.replication.row_of(*node),
            );
            if view.takes_writes(column, row) {
                return true;
            }
            departures.push(Departure {
                node: *node,
                reason: failure.reason.clone(),
                at_unix,
                generation: view.generation,
            });
            false
        });
        *lock(&self.view) = Arc::new(view);
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    /// Another owner took over: every request fails from now on.
    pub fn fence(&self) {
        let mut view = (*self.view()).clone();
        view.fenced = true;
        *lock(&self.view) = Arc::new(view);
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    /// What the attach reconciled after an unclean stop.
    pub fn reconciled(&self) -> Option<Reconciled> {
        lock(&self.reconciled).clone()
    }

    pub fn set_reconciled(&self, done: Reconciled) {
        *lock(&self.reconciled) = Some(done);
    }

    /// `node` left at generation `generation` without a report (an attach
    /// that took it out), for `status`.
    pub fn departed(&self, node: usize, reason: &str, generation: u64) {
        let at_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        lock(&self.departures).push(Departure {
            node,
            reason: reason.to_owned(),
            at_unix,
            generation,
        });
    }

    /// Member `node` is being replaced (`hold`) or not any more: a member
    /// held out is never probed nor joined again.
    pub fn hold_out(&self, node: usize, hold: bool) {
        let mut held = lock(&self.held_out);
        if hold {
            held.insert(node);
        } else {
            held.remove(&node);
        }
    }

    pub fn held_out(&self, node: usize) -> bool {
        lock(&self.held_out).contains(&node)
    }

    /// The device is stopping: catch-ups and scrubs end at their next step.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// The queues' durability ledger is `ledger` now.
    pub fn set_ledger(&self, ledger: Arc<Ledger>) {
        *lock(&self.ledger) = Some(ledger);
    }

    pub fn ledger(&self) -> Option<Arc<Ledger>> {
        lock(&self.ledger).clone()
    }

    /// The identity `node` is held to (None: not known).
    pub fn pin(&self, node: usize) -> Option<String> {
        self.pins.get(node)
    }

    /// A copy to `node` started, moved on, or (None) ended.
    pub fn set_progress(&self, node: usize, progress: Option<Progress>) {
        let mut resync = lock(&self.resync);
        match progress {
            Some(p) => resync.insert(node, p),
            None => resync.remove(&node),
        };
    }

    /// The copies running, by member.
    pub fn progress(&self) -> BTreeMap<usize, Progress> {
        lock(&self.resync).clone()
    }

    /// Members this daemon took out, oldest first.
    pub fn departures(&self) -> Vec<Departure> {
        lock(&self.departures).clone()
    }
}

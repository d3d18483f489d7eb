//! Seeded deterministic simulation of a replicated device: the real
//! engines (several queues), the real membership and its manager
//! (`records::Manager`, `records::attach`), against simulated nodes that
//! keep the membership record and fence older owners as the mock node does.
//!
//! Faults: members crash and come back, are cut off (a silent peer: nothing
//! arrives either way until it heals), turn slow; the record path fails
//! now and then; the client crashes (its engines vanish, what it had sent
//! may still arrive) and attaches again. Every sector written carries the
//! id of its write, and the oracle checks every read: it returns the last
//! acknowledged write of each sector or a write that was in flight or
//! failed after it; with no client crash, two reads with no write between
//! them return the same; and at the end every in-sync member holds what
//! the model says. Members that left catch up as the daemon's catch-up
//! does (the real `resync::Copier`, stepped), racing the application's
//! writes, the source's faults and client crashes. Planted bugs (the
//! queues hear of a shrink before it is stored, an attach without
//! reconcile, a trim without the drain, a catch-up that copies nothing)
//! are found; the same seeds pass without them.
//!
//! `NETBLK_SIM_SEED=<seed>` replays one seed.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netblk::engine::{BlockRequest, Engine, EngineConfig, Op, Tag};
use netblk::layout::Layout;
use netblk::membership::Membership;
use netblk::records::{self, AttachOptions, Manager, PutError, RecordStore};
use netblk::regions::RESYNC_REGION;
use netblk::resync::{Copier, ResyncOptions, Step};
use netblk::rng::Rng;
use netblk_protocol::pb::{self, MembershipRecord, header::Kind, request::Op as WireOp};
use netblk_protocol::{Decoded, Limits, decode_frame, encode_frame};
use netblk_tests::sim::{deliver_reply, seeds};

const SECTOR: usize = 512;
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const REPLICA_TIMEOUT: Duration = Duration::from_secs(2);
/// The simulated nodes' activity-log region: one stripe unit, so that a
/// volume has several and a trim or reconcile of the wrong one shows.
const REGION: u64 = 4096;
/// How often the manager trims the logs.
const TRIM_EVERY: Duration = Duration::from_millis(300);
/// How often the client looks for a member to catch up, and steps the copy.
const RESYNC_EVERY: Duration = Duration::from_millis(50);

/// What the nodes hold and how they can be reached, shared with the record
/// store the manager and attach use.
struct Cluster {
    nodes: Vec<NodeState>,
    rng: Rng,
    /// Percent of record requests that fail (a flaky record path).
    flaky_percent: u64,
}

struct NodeState {
    store: Vec<u8>,
    record: MembershipRecord,
    /// The activity log (region of [`REGION`] bytes -> sequence number),
    /// kept across crashes as a node's store keeps it.
    activity: BTreeMap<u64, u64>,
    next_seq: u64,
    /// Crashed: nothing in or out until it restarts.
    down: bool,
    /// Cut off: nothing in or out until it heals (no reset either).
    cut: bool,
    /// Extra latency of everything it executes.
    slow: Duration,
    /// Per replica row of its column out of the in-sync set: the record
    /// generation it is tracked since and the regions (of the client's
    /// `RESYNC_REGION`) changed here since, as the mock node keeps them.
    missed: BTreeMap<u32, (u64, BTreeSet<u64>)>,
    /// Which column and row it is.
    column: usize,
    row: u32,
    replicas: u32,
}

impl NodeState {
    fn reachable(&self) -> bool {
        !self.down && !self.cut
    }

    /// Logs the regions of a change before it is applied, and marks them
    /// missed for every row out of sync.
    fn touch(&mut self, offset: u64, len: u64) {
        let last = offset + len.max(1) - 1;
        for region in offset / REGION..=last / REGION {
            self.next_seq += 1;
            self.activity.insert(region, self.next_seq);
        }
        for (_, regions) in self.missed.values_mut() {
            regions.extend(offset / RESYNC_REGION..=last / RESYNC_REGION);
        }
    }

    /// A record was stored: rows of its column out of sync are tracked
    /// from now on (seeded with the activity log), rows back are not.
    fn on_record(&mut self, record: &MembershipRecord) {
        let iss = record.iss.get(self.column).copied().unwrap_or(0);
        let seed: BTreeSet<u64> = self
            .activity
            .keys()
            .map(|r| r * REGION / RESYNC_REGION)
            .collect();
        for row in (0..self.replicas).filter(|r| *r != self.row) {
            if iss & (1 << row) != 0 {
                self.missed.remove(&row);
            } else {
                self.missed
                    .entry(row)
                    .or_insert_with(|| (record.generation, seed.clone()));
            }
        }
    }
}

struct SimRecords(Arc<Mutex<Cluster>>);

impl RecordStore for SimRecords {
    fn get(&self, node: usize) -> Result<(MembershipRecord, bool), String> {
        let mut c = self.0.lock().expect("cluster");
        let flaky = c.flaky_percent;
        if !c.nodes[node].reachable() || c.rng.below(100) < flaky {
            return Err("unreachable".into());
        }
        Ok((c.nodes[node].record.clone(), false))
    }

    fn put(&self, node: usize, expected: u64, record: &MembershipRecord) -> Result<(), PutError> {
        let mut c = self.0.lock().expect("cluster");
        let flaky = c.flaky_percent;
        if !c.nodes[node].reachable() || c.rng.below(100) < flaky {
            return Err(PutError::Failed("unreachable".into()));
        }
        let n = &mut c.nodes[node];
        if n.record.generation != expected || record.generation <= expected {
            return Err(PutError::Conflict(Box::new(n.record.clone())));
        }
        n.record = record.clone();
        n.on_record(record);
        Ok(())
    }

    fn activity(&self, node: usize) -> Result<Vec<(u64, u64)>, String> {
        let mut c = self.0.lock().expect("cluster");
        let flaky = c.flaky_percent;
        if !c.nodes[node].reachable() || c.rng.below(100) < flaky {
            return Err("unreachable".into());
        }
        Ok(c.nodes[node]
            .activity
            .iter()
            .map(|(r, s)| (*r, *s))
            .collect())
    }

    fn trim(&self, node: usize, owner_epoch: u64, entries: &[(u64, u64)]) -> Result<(), String> {
        let mut c = self.0.lock().expect("cluster");
        let flaky = c.flaky_percent;
        if !c.nodes[node].reachable() || c.rng.below(100) < flaky {
            return Err("unreachable".into());
        }
        let n = &mut c.nodes[node];
        if owner_epoch < n.record.owner_epoch {
            return Err("fenced".into());
        }
        for (region, seq) in entries {
            if n.activity.get(region) == Some(seq) {
                n.activity.remove(region);
            }
        }
        Ok(())
    }

    fn flush(&self, node: usize, _owner_epoch: u64) -> Result<(), String> {
        let c = self.0.lock().expect("cluster");
        if !c.nodes[node].reachable() {
            return Err("unreachable".into());
        }
        Ok(())
    }

    fn copy(
        &self,
        owner_epoch: u64,
        from: usize,
        to: &[usize],
        ranges: &[(u64, u64)],
    ) -> Result<(), String> {
        let mut c = self.0.lock().expect("cluster");
        if !c.nodes[from].reachable() || to.iter().any(|n| !c.nodes[*n].reachable()) {
            return Err("unreachable".into());
        }
        if to
            .iter()
            .any(|n| owner_epoch < c.nodes[*n].record.owner_epoch)
        {
            return Err("fenced".into());
        }
        for (offset, len) in ranges {
            let (at, n) = (*offset as usize, *len as usize);
            let data = c.nodes[from].store[at..at + n].to_vec();
            for node in to {
                let target = &mut c.nodes[*node];
                target.touch(*offset, *len);
                target.store[at..at + n].copy_from_slice(&data);
            }
        }
        Ok(())
    }

    fn digest(&self, node: usize, offset: u64, len: u64) -> Result<u32, String> {
        let c = self.0.lock().expect("cluster");
        if !c.nodes[node].reachable() {
            return Err("unreachable".into());
        }
        Ok(crc32c::crc32c(
            &c.nodes[node].store[offset as usize..][..len as usize],
        ))
    }

    fn activity_region(&self) -> u64 {
        REGION
    }

    // The simulator decides itself which member catches up (its nodes
    // keep their data across crashes): nothing is probed.
    fn probe(&self, _: usize) -> Result<netblk::records::Probe, String> {
        Err("the simulator does not probe its nodes".into())
    }

    fn missed(&self, node: usize, row: u32) -> Result<(Vec<u64>, u64), String> {
        let c = self.0.lock().expect("cluster");
        if !c.nodes[node].reachable() {
            return Err("unreachable".into());
        }
        Ok(match c.nodes[node].missed.get(&row) {
            Some((since, regions)) => (regions.iter().copied().collect(), *since),
            None => (Vec::new(), 0),
        })
    }
}

enum Event {
    /// The client looks for a member to catch up, or steps the copy.
    Resync {
        client: u64,
    },
    /// A frame arrives at a node on connection `cid`.
    ToNode {
        cid: u64,
        bytes: Vec<u8>,
    },
    /// A reply arrives at the client on connection `cid`.
    ToClient {
        cid: u64,
        bytes: Vec<u8>,
    },
    /// The buffer of `tag` is no longer used by a send to `node`.
    Release {
        client: u64,
        queue: usize,
        node: usize,
        tag: Tag,
    },
    Restore {
        client: u64,
        queue: usize,
        node: usize,
    },
    /// A crashed node starts again; a cut-off node heals; a slow one is
    /// fast again.
    NodeBack {
        node: usize,
    },
    ManagerStep {
        client: u64,
    },
    Timer,
    Reattach,
    /// The manager's background step (trimming the activity logs), then
    /// the next one.
    Tend {
        client: u64,
    },
    /// A member fault (see [`Sim::fault`]), then the next one is drawn.
    Fault,
    CrashClient,
    /// The record path fails for a while (every record request), then
    /// works again.
    RecordOutage {
        on: bool,
    },
}

/// One connection of one queue to one node.
struct Conn {
    client: u64,
    queue: usize,
    node: usize,
    /// The client's owner epoch (writes below the node's are refused).
    owner_epoch: u64,
    /// Torn down by the client (or the node crashed): nothing more is read
    /// from it by the client; what was sent may still arrive at the node
    /// unless it is fenced.
    up: bool,
    /// A newer session of the same client at the node: nothing more of it
    /// is executed.
    fenced: bool,
    session: u64,
    /// Frames held while the node is cut off, in order.
    held_to_node: Vec<Vec<u8>>,
    held_to_client: Vec<Vec<u8>>,
}

/// The device as one client process runs it.
struct Client {
    id: u64,
    engines: Vec<Engine>,
    membership: Arc<Membership>,
    manager: Manager,
    /// `conn[queue][node]`: the current connection id.
    conn: Vec<Vec<u64>>,
    sessions: Vec<u64>,
    buffers: Vec<Vec<Vec<u8>>>,
    pending_releases: Vec<Vec<u32>>,
    outstanding: HashMap<(usize, Tag), (BlockRequest, u64)>,
    /// The copy to a member catching up, if one runs.
    copier: Option<Copier>,
}

#[derive(Clone, Copy)]
struct Params {
    columns: u32,
    replicas: u32,
    queues: usize,
    depth: u16,
    requests: usize,
    /// Mean time between member faults (a crash, a cut, a slow spell; never
    /// the last reachable member of its column).
    fault_every: Duration,
    client_crashes: usize,
    /// Percent of record requests that fail at any time.
    flaky_percent: u64,
    /// Mean time between outages of the record path (each 50 to 800 ms).
    record_outage_every: Duration,
    plant: bool,
    /// Attach without reconciling (a planted bug).
    plant_no_reconcile: bool,
    /// Trim the activity logs without waiting for the writes in flight (a
    /// planted bug).
    plant_no_drain: bool,
    /// Nodes without owner fencing (they apply an older owner's writes):
    /// what the oracle must catch when the client crashes.
    no_owner_gate: bool,
    /// Catch-ups that copy nothing (a planted bug).
    plant_skip_copy: bool,
}

struct Sim {
    rng: Rng,
    p: Params,
    layout: Layout,
    base: Instant,
    now: Duration,
    seq: u64,
    events: BinaryHeap<Reverse<(Duration, u64)>>,
    payloads: HashMap<u64, Event>,
    cluster: Arc<Mutex<Cluster>>,
    /// Ordered, so that a run depends on its seed alone.
    conns: BTreeMap<u64, Conn>,
    next_cid: u64,
    client: Option<Client>,
    next_client: u64,
    /// Per sector of the volume: the ids it may hold (the last acknowledged
    /// write and any write in flight or failed after it), and the value the
    /// last read saw since the last write was submitted there.
    possible: Vec<BTreeSet<u64>>,
    last_read: Vec<Option<u64>>,
    next_write: u64,
    submitted: usize,
    completed: usize,
    errors: usize,
    manager_scheduled: bool,
    faults: usize,
    /// Per node, when its last fault ended (`Duration::MAX` while it
    /// lasts): a member found failed by a timeout must have had one lately.
    fault_ends: Vec<Option<Duration>>,
    /// Members caught up and back in sync.
    caught_up: usize,
    timer_at: Option<Duration>,
}

fn sector_ids(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes.chunks(SECTOR).map(|s| {
        let mut id = [0u8; 8];
        id.copy_from_slice(&s[..8]);
        u64::from_le_bytes(id)
    })
}

impl Sim {
    fn new(seed: u64, p: Params) -> Sim {
        let layout = Layout::replicated(
            4096 * u64::from(p.columns) * 6,
            4096,
            (p.columns * p.replicas) as usize,
            p.replicas,
        )
        .expect("layout");
        let cluster = Cluster {
            nodes: (0..layout.node_count())
                .map(|n| NodeState {
                    store: vec![0; layout.node_capacity(n) as usize],
                    record: MembershipRecord::default(),
                    activity: BTreeMap::new(),
                    next_seq: 0,
                    down: false,
                    cut: false,
                    slow: Duration::ZERO,
                    missed: BTreeMap::new(),
                    column: layout.replication().column_of(n),
                    row: layout.replication().row_of(n) as u32,
                    replicas: p.replicas,
                })
                .collect(),
            rng: Rng::new(seed ^ 0x5eed),
            flaky_percent: p.flaky_percent,
        };
        let sectors = layout.size() as usize / SECTOR;
        let mut sim = Sim {
            rng: Rng::new(seed),
            p,
            layout,
            base: Instant::now(),
            now: Duration::ZERO,
            seq: 0,
            events: BinaryHeap::new(),
            payloads: HashMap::new(),
            cluster: Arc::new(Mutex::new(cluster)),
            conns: BTreeMap::new(),
            next_cid: 1,
            client: None,
            next_client: 1,
            possible: vec![BTreeSet::from([0]); sectors],
            last_read: vec![None; sectors],
            next_write: 1,
            submitted: 0,
            completed: 0,
            errors: 0,
            manager_scheduled: false,
            faults: 0,
            fault_ends: vec![None; layout.node_count()],
            caught_up: 0,
            timer_at: None,
        };
        // The volume is made on a healthy record path.
        sim.cluster().flaky_percent = 0;
        assert!(sim.attach(), "the first attach finds every node");
        sim.cluster().flaky_percent = p.flaky_percent;
        sim.schedule(p.fault_every, Event::Fault);
        sim.schedule(p.record_outage_every, Event::RecordOutage { on: true });
        for _ in 0..p.client_crashes {
            let at = Duration::from_millis(200 + sim.rng.below(8_000));
            sim.schedule(at, Event::CrashClient);
        }
        sim
    }

    fn instant(&self) -> Instant {
        self.base + self.now
    }

    fn schedule(&mut self, after: Duration, event: Event) {
        self.seq += 1;
        self.payloads.insert(self.seq, event);
        self.events.push(Reverse((self.now + after, self.seq)));
    }

    fn cluster(&self) -> std::sync::MutexGuard<'_, Cluster> {
        self.cluster.lock().expect("cluster")
    }

    /// A new client attaches (the attach rule, owner epoch + 1) and
    /// connects every queue to every in-sync member. False if it may not
    /// yet (a member of the newest record's in-sync sets is unreachable).
    fn attach(&mut self) -> bool {
        let store = SimRecords(Arc::clone(&self.cluster));
        let options = AttachOptions {
            owner: format!("client-{}", self.next_client),
            force_degraded: false,
            takeover: true,
            wait: Duration::ZERO,
            // Simulated nodes have no addresses.
            members: Vec::new(),
            plant_no_reconcile: self.p.plant_no_reconcile,
        };
        // The flaky record path may make the attach fail: it is retried.
        let Ok(attached) = records::attach(&store, &self.layout, &options) else {
            return false;
        };
        if self.next_client > 1 && !self.p.plant_no_reconcile {
            self.check_reconciled(&attached.record);
        }
        let mut manager = Manager::new(Box::new(store), self.layout, &attached);
        manager.plant_publish_before_store = self.p.plant;
        manager.trimmer = netblk::activity::Trimmer::new(self.instant(), TRIM_EVERY);
        manager.trimmer.plant_no_drain = self.p.plant_no_drain;
        self.schedule(
            TRIM_EVERY / 3,
            Event::Tend {
                client: self.next_client,
            },
        );
        let id = self.next_client;
        self.next_client += 1;
        let ledger = Arc::new(netblk::ledger::Ledger::new(self.layout.node_count()));
        attached.membership.set_ledger(Arc::clone(&ledger));
        let now = self.instant();
        let engines = (0..self.p.queues)
            .map(|_| {
                let mut e = Engine::new(
                    self.layout,
                    EngineConfig {
                        depth: self.p.depth,
                        max_io: 8192,
                        max_in_flight_per_node: 16,
                        io_timeout: IO_TIMEOUT,
                        node_down_timeout: Duration::from_secs(20),
                        replica_timeout: REPLICA_TIMEOUT,
                        data_digest: false,
                    },
                );
                // Simulated time from the start (not the real clock).
                e.set_clock(now);
                e.share_ledger(Arc::clone(&ledger));
                e.share_membership(Arc::clone(&attached.membership));
                e
            })
            .collect();
        let nodes = self.layout.node_count();
        self.client = Some(Client {
            id,
            engines,
            membership: Arc::clone(&attached.membership),
            manager,
            conn: vec![vec![0; nodes]; self.p.queues],
            sessions: vec![1; nodes],
            buffers: vec![vec![vec![0; 8192]; usize::from(self.p.depth)]; self.p.queues],
            pending_releases: vec![vec![0; usize::from(self.p.depth)]; self.p.queues],
            outstanding: HashMap::new(),
            copier: None,
        });
        self.schedule(RESYNC_EVERY, Event::Resync { client: id });
        for queue in 0..self.p.queues {
            for node in 0..nodes {
                self.connect(queue, node);
            }
        }
        true
    }

    /// A new connection of the client's `queue` to `node`, if the node is
    /// reachable and in sync; a newer session fences the older ones.
    fn connect(&mut self, queue: usize, node: usize) {
        let Some(client) = self.client.as_mut() else {
            return;
        };
        if client.engines[queue].is_out(node) {
            return;
        }
        let reachable = self.cluster.lock().expect("cluster").nodes[node].reachable();
        if !reachable {
            let id = client.id;
            self.schedule(
                Duration::from_millis(100),
                Event::Restore {
                    client: id,
                    queue,
                    node,
                },
            );
            return;
        }
        let session = client.sessions[node];
        let owner_epoch = client.membership.view().owner_epoch;
        for c in self.conns.values_mut() {
            if c.client == client.id && c.node == node && c.session < session {
                c.fenced = true;
            }
        }
        let cid = self.next_cid;
        self.next_cid += 1;
        self.conns.insert(
            cid,
            Conn {
                client: client.id,
                queue,
                node,
                owner_epoch,
                up: true,
                fenced: false,
                session,
                held_to_node: Vec::new(),
                held_to_client: Vec::new(),
            },
        );
        client.conn[queue][node] = cid;
        client.engines[queue].handle_connection_restored(node);
    }

    /// The client's `queue` loses its connection to `node`.
    fn drop_conn(&mut self, queue: usize, node: usize) {
        let now = self.instant();
        let Some(client) = self.client.as_mut() else {
            return;
        };
        let cid = client.conn[queue][node];
        let Some(conn) = self.conns.get_mut(&cid) else {
            return;
        };
        if !conn.up {
            return;
        }
        conn.up = false;
        conn.held_to_client.clear();
        conn.held_to_node.clear();
        // The node's epoch moves on: the next connection fences this one.
        if client.sessions[node] == conn.session {
            client.sessions[node] += 1;
        }
        // (Buffers come back with their Release events, scheduled at send.)
        let id = client.id;
        client.engines[queue].handle_connection_lost(now, node);
        let wait = Duration::from_millis(10 + self.rng.below(200));
        self.schedule(
            wait,
            Event::Restore {
                client: id,
                queue,
                node,
            },
        );
    }

    fn submit(&mut self) {
        if self.client.is_none() || self.submitted >= self.p.requests {
            return;
        }
        for tag in 0..self.p.depth {
            let queue = self.rng.below(self.p.queues as u64) as usize;
            let client = self.client.as_ref().expect("client");
            if client.outstanding.contains_key(&(queue, tag))
                || client.pending_releases[queue][usize::from(tag)] > 0
                || self.submitted >= self.p.requests
                // Some tags idle for a while, never all of them.
                || (!client.outstanding.is_empty() && self.rng.below(100) < 30)
            {
                continue;
            }
            let sectors = self.layout.size() / SECTOR as u64;
            let len = SECTOR as u64 * (1 + self.rng.below(16));
            let offset = SECTOR as u64 * self.rng.below(sectors - len / SECTOR as u64 + 1);
            let op = match self.rng.below(10) {
                0..=4 => Op::Write {
                    fua: self.rng.below(5) == 0,
                },
                5..=8 => Op::Read,
                _ => Op::Flush,
            };
            let overlaps = client.outstanding.values().any(|(r, _)| {
                op == Op::Flush
                    || r.op == Op::Flush
                    || (offset < r.offset + r.len && r.offset < offset + len)
            });
            if overlaps {
                continue;
            }
            let write = self.next_write;
            let now = self.instant();
            let client = self.client.as_mut().expect("client");
            let buf = &mut client.buffers[queue][usize::from(tag)][..len as usize];
            let first = offset as usize / SECTOR;
            let count = len as usize / SECTOR;
            match op {
                Op::Write { .. } => {
                    self.next_write += 1;
                    buf.fill(0);
                    for s in buf.chunks_mut(SECTOR) {
                        s[..8].copy_from_slice(&write.to_le_bytes());
                    }
                    for s in first..first + count {
                        self.possible[s].insert(write);
                        self.last_read[s] = None;
                    }
                }
                Op::Read => buf.fill(0xee),
                _ => {}
            }
            let request = BlockRequest {
                tag,
                op,
                offset,
                len,
            };
            client.engines[queue]
                .handle_request(now, request)
                .expect("free tag");
            client.outstanding.insert((queue, tag), (request, write));
            self.submitted += 1;
        }
    }

    /// Moves what the engines send onto the network.
    fn transmit(&mut self) {
        let Some(client) = self.client.as_mut() else {
            return;
        };
        let mut out = Vec::new();
        for queue in 0..self.p.queues {
            for node in 0..self.layout.node_count() {
                while let Some(t) = client.engines[queue].poll_transmit(node) {
                    let mut bytes = t.head;
                    if let Some(slice) = t.payload {
                        let buf = &client.buffers[queue][usize::from(slice.tag)];
                        bytes
                            .extend_from_slice(&buf[slice.offset as usize..][..slice.len as usize]);
                        client.pending_releases[queue][usize::from(slice.tag)] += 1;
                        out.push((
                            Duration::from_micros(100),
                            Event::Release {
                                client: client.id,
                                queue,
                                node,
                                tag: slice.tag,
                            },
                        ));
                    }
                    let cid = client.conn[queue][node];
                    out.push((Duration::ZERO, Event::ToNode { cid, bytes }));
                }
            }
        }
        for (after, e) in out {
            let after = match &e {
                Event::ToNode { cid, .. } => {
                    let node = self.conns.get(cid).map_or(0, |c| c.node);
                    self.rng_delay(node)
                }
                _ => after,
            };
            self.schedule(after, e);
        }
    }

    fn rng_delay(&mut self, node: usize) -> Duration {
        let slow = self.cluster().nodes[node].slow;
        Duration::from_micros(50 + self.rng.below(2_000)) + slow
    }

    fn node_receive(&mut self, cid: u64, bytes: Vec<u8>) {
        let Some(conn) = self.conns.get_mut(&cid) else {
            return;
        };
        let node = conn.node;
        let (down, cut) = {
            let c = self.cluster.lock().expect("cluster");
            (c.nodes[node].down, c.nodes[node].cut)
        };
        if conn.fenced || down {
            return;
        }
        if cut {
            // Held until the node is reached again, unless the client
            // tears the connection down first (its kernel retransmits
            // nothing more).
            if conn.up {
                conn.held_to_node.push(bytes);
            }
            return;
        }
        let (used, header, payload) =
            match decode_frame(&bytes, &Limits::default()).expect("valid frame") {
                Decoded::Frame(f) => (f.len, f.header, f.payload.to_vec()),
                Decoded::NeedMore(_) => panic!("whole frames only"),
            };
        assert_eq!(used, bytes.len());
        let Some(Kind::Request(pb::Request { id, op: Some(op) })) = header.kind else {
            panic!("client sent {header:?}")
        };
        let owner_epoch = conn.owner_epoch;
        let mut status = pb::Status::Ok;
        let mut data = Vec::new();
        {
            let mut c = self.cluster.lock().expect("cluster");
            let n = &mut c.nodes[node];
            let gate = n.record.owner_epoch;
            match op {
                WireOp::Read(r) => {
                    data = n.store[r.offset as usize..][..r.length as usize].to_vec()
                }
                WireOp::Write(_) | WireOp::Discard(_) | WireOp::WriteZeroes(_)
                    if owner_epoch < gate && !self.p.no_owner_gate =>
                {
                    status = pb::Status::Refused;
                }
                WireOp::Write(w) => {
                    n.touch(w.offset, payload.len() as u64);
                    n.store[w.offset as usize..][..payload.len()].copy_from_slice(&payload)
                }
                _ => {}
            }
        }
        let live = self.conns.get(&cid).is_some_and(|c| c.up);
        if !live {
            return;
        }
        let mut reply = Vec::new();
        encode_frame(
            &pb::Header::reply(pb::Reply {
                id,
                status: status as i32,
                ..Default::default()
            }),
            &data,
            &mut reply,
        )
        .expect("encode");
        let after = self.rng_delay(node);
        self.schedule(after, Event::ToClient { cid, bytes: reply });
    }

    fn client_receive(&mut self, cid: u64, bytes: Vec<u8>) {
        let Some(conn) = self.conns.get_mut(&cid) else {
            return;
        };
        if !conn.up {
            return;
        }
        let (node, queue) = (conn.node, conn.queue);
        if self.cluster.lock().expect("cluster").nodes[node].cut {
            conn.held_to_client.push(bytes);
            return;
        }
        let Some(client) = self.client.as_mut() else {
            return;
        };
        if client.id != conn.client || client.conn[queue][node] != cid {
            return;
        }
        let Ok(Decoded::Frame(f)) = decode_frame(&bytes, &Limits::default()) else {
            panic!("valid reply");
        };
        let Some(Kind::Reply(reply)) = f.header.kind else {
            panic!("node sent {:?}", f.header)
        };
        deliver_reply(
            &mut client.engines[queue],
            &mut client.buffers[queue],
            node,
            &reply,
            f.payload,
        );
    }

    fn completions(&mut self) {
        let Some(client) = self.client.as_mut() else {
            return;
        };
        let mut done = Vec::new();
        for queue in 0..self.p.queues {
            while let Some(c) = client.engines[queue].poll_completion() {
                let (request, write) = client
                    .outstanding
                    .remove(&(queue, c.tag))
                    .expect("submitted");
                assert_eq!(
                    client.pending_releases[queue][usize::from(c.tag)],
                    0,
                    "completed while a send still uses the buffer"
                );
                let data =
                    client.buffers[queue][usize::from(c.tag)][..request.len as usize].to_vec();
                done.push((request, write, c.result, data, queue));
            }
        }
        for (request, write, result, data, queue) in done {
            self.completed += 1;
            let first = request.offset as usize / SECTOR;
            match (request.op, result) {
                (_, Err(errno)) => {
                    assert_eq!(errno, 5);
                    self.errors += 1;
                }
                (Op::Write { .. }, Ok(_)) => {
                    for s in first..first + request.len as usize / SECTOR {
                        self.possible[s] = BTreeSet::from([write]);
                    }
                }
                (Op::Read, Ok(_)) => {
                    for (i, got) in sector_ids(&data).enumerate() {
                        let s = first + i;
                        assert!(
                            self.possible[s].contains(&got),
                            "read through queue {queue} of sector {s} returned write {got}, which is neither its last acknowledged write nor one in flight after it: {:?}",
                            self.possible[s]
                        );
                        if let Some(before) = self.last_read[s] {
                            assert_eq!(
                                got, before,
                                "sector {s} flipped from write {before} to {got} with no write between"
                            );
                        }
                        self.last_read[s] = Some(got);
                    }
                }
                _ => {}
            }
        }
    }

    /// A member crashes, is cut off or turns slow, never the last
    /// reachable in-sync member of its column.
    fn fault(&mut self) {
        let Some(client) = self.client.as_ref() else {
            return;
        };
        let view = client.membership.view();
        let node = self.rng.below(self.layout.node_count() as u64) as usize;
        let r = *self.layout.replication();
        let column = r.column_of(node);
        let healthy_others = r
            .members(column)
            .filter(|m| *m != node && view.in_sync(column, r.row_of(*m)))
            .filter(|m| {
                let c = self.cluster();
                c.nodes[*m].reachable() && c.nodes[*m].slow.is_zero()
            })
            .count();
        if healthy_others == 0 || !self.cluster().nodes[node].reachable() {
            return;
        }
        self.faults += 1;
        self.fault_ends[node] = Some(Duration::MAX);
        let back = Duration::from_millis(500 + self.rng.below(6_000));
        match self.rng.below(3) {
            0 => {
                self.cluster().nodes[node].down = true;
                for queue in 0..self.p.queues {
                    self.drop_conn(queue, node);
                }
            }
            1 => self.cluster().nodes[node].cut = true,
            _ => {
                let slow = Duration::from_millis(self.rng.below(4_000));
                self.cluster().nodes[node].slow = slow;
            }
        }
        self.schedule(back, Event::NodeBack { node });
    }

    fn node_back(&mut self, node: usize) {
        let was_cut = {
            let mut c = self.cluster();
            let n = &mut c.nodes[node];
            let was_cut = n.cut;
            (n.down, n.cut, n.slow) = (false, false, Duration::ZERO);
            was_cut
        };
        self.fault_ends[node] = Some(self.now);
        if was_cut {
            // What waited on the cut links goes on, in order.
            let cids: Vec<u64> = self
                .conns
                .iter()
                .filter(|(_, c)| c.node == node)
                .map(|(cid, _)| *cid)
                .collect();
            for cid in cids {
                let (to_node, to_client) = {
                    let c = self.conns.get_mut(&cid).expect("conn");
                    (
                        std::mem::take(&mut c.held_to_node),
                        std::mem::take(&mut c.held_to_client),
                    )
                };
                for bytes in to_node {
                    self.schedule(Duration::from_micros(10), Event::ToNode { cid, bytes });
                }
                for bytes in to_client {
                    self.schedule(Duration::from_micros(20), Event::ToClient { cid, bytes });
                }
            }
        }
    }

    /// The client process dies: its engines are gone, what it sent may
    /// still arrive; a new one attaches as soon as the attach rule allows.
    fn crash_client(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        // A write in flight at the crash stays in flight for good: reads
        // before and after it may differ there, nowhere else.
        for (request, _) in client.outstanding.values() {
            if matches!(request.op, Op::Write { .. }) {
                let first = request.offset as usize / SECTOR;
                for s in first..first + request.len as usize / SECTOR {
                    self.last_read[s] = None;
                }
            }
        }
        for c in self.conns.values_mut() {
            if c.client == client.id {
                c.up = false;
            }
        }
        // Whatever was in flight may or may not have landed: it stays
        // possible (its ids are in `possible` already). What it had sent
        // and is still on the way arrives late (held in the network), when
        // a new owner may have written the same sectors since.
        self.completed += client.outstanding.len();
        let mine: BTreeSet<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.client == client.id)
            .map(|(cid, _)| *cid)
            .collect();
        let late: Vec<u64> = self
            .payloads
            .iter()
            .filter(|(_, e)| matches!(e, Event::ToNode { cid, .. } if mine.contains(cid)))
            .map(|(key, _)| *key)
            .collect();
        let mut late: Vec<u64> = late;
        late.sort_unstable();
        for key in late {
            if let Some(event) = self.payloads.remove(&key) {
                let after = Duration::from_millis(500 + self.rng.below(3_000));
                self.schedule(after, event);
            }
        }
        self.schedule(Duration::from_millis(50), Event::Reattach);
    }

    fn run(&mut self) {
        let mut steps = 0u64;
        loop {
            let now = self.instant();
            if let Some(client) = self.client.as_mut() {
                let mut aborts = Vec::new();
                for (queue, e) in client.engines.iter_mut().enumerate() {
                    e.handle_timeout(now);
                    while let Some(node) = e.poll_abort() {
                        aborts.push((queue, node));
                    }
                }
                for (queue, node) in aborts {
                    self.drop_conn(queue, node);
                }
                self.check_failed();
            }
            self.submit();
            self.transmit();
            self.completions();
            let finished = self.submitted >= self.p.requests
                && self
                    .client
                    .as_ref()
                    .is_some_and(|c| c.outstanding.is_empty());
            if finished {
                break;
            }
            if let Some(client) = self.client.as_ref()
                && !client.membership.failed().is_empty()
                && !self.manager_scheduled
            {
                self.manager_scheduled = true;
                let id = client.id;
                let after = Duration::from_millis(5 + self.rng.below(300));
                self.schedule(after, Event::ManagerStep { client: id });
            }
            self.arm_timer();
            let Some(Reverse((at, key))) = self.events.pop() else {
                panic!(
                    "stuck: {} submitted, client {}",
                    self.submitted,
                    self.client.is_some()
                );
            };
            steps += 1;
            if steps > 1_999_995 {
                let base = self.base;
                let dl: Vec<_> = self
                    .client
                    .as_mut()
                    .map(|c| {
                        c.engines
                            .iter_mut()
                            .map(|e| e.poll_timeout().map(|d| d.saturating_duration_since(base)))
                            .collect()
                    })
                    .unwrap_or_default();
                eprintln!(
                    "at {at:?} now {:?} timer at {:?} engine deadlines {dl:?}, copying {:?}",
                    self.now,
                    self.timer_at,
                    self.client
                        .as_ref()
                        .map(|c| c.copier.as_ref().map(|k| k.node()))
                );
            }
            if steps > 1_999_990 {
                let c = self.client.as_ref().map(|c| {
                    (
                        c.outstanding.len(),
                        c.membership.failed().keys().copied().collect::<Vec<_>>(),
                        c.membership.view(),
                        c.engines.iter().map(|e| e.stats()).collect::<Vec<_>>(),
                    )
                });
                eprintln!(
                    "step {steps} at {:?}: {} submitted, {} completed, client {c:?}, event {}",
                    self.now,
                    self.submitted,
                    self.completed,
                    match self.payloads.get(&key) {
                        Some(Event::Timer) => "timer",
                        Some(Event::ToNode { .. }) => "to node",
                        Some(Event::ToClient { .. }) => "to client",
                        Some(Event::Restore { .. }) => "restore",
                        Some(Event::ManagerStep { .. }) => "manager",
                        Some(Event::Tend { .. }) => "tend",
                        Some(Event::Release { .. }) => "release",
                        Some(Event::NodeBack { .. }) => "node back",
                        Some(Event::Reattach) => "reattach",
                        Some(Event::Fault) => "fault",
                        Some(Event::CrashClient) => "crash",
                        Some(Event::RecordOutage { .. }) => "record outage",
                        Some(Event::Resync { .. }) => "resync",
                        None => "gone",
                    }
                );
            }
            assert!(steps < 2_000_000, "runs away");
            self.now = self.now.max(at);
            let Some(event) = self.payloads.remove(&key) else {
                continue;
            };
            match event {
                Event::ToNode { cid, bytes } => self.node_receive(cid, bytes),
                Event::ToClient { cid, bytes } => self.client_receive(cid, bytes),
                Event::Release {
                    client,
                    queue,
                    node,
                    tag,
                } => {
                    if let Some(c) = self.client.as_mut().filter(|c| c.id == client) {
                        c.pending_releases[queue][usize::from(tag)] -= 1;
                        c.engines[queue].handle_buffer_released(node, tag);
                    }
                }
                Event::Restore {
                    client,
                    queue,
                    node,
                } => {
                    let current = self.client.as_ref().filter(|c| c.id == client).map(|c| {
                        let cid = c.conn[queue][node];
                        self.conns.get(&cid).is_some_and(|k| k.up)
                    });
                    if current == Some(false) {
                        self.connect(queue, node);
                    }
                }
                Event::NodeBack { node } => self.node_back(node),
                Event::ManagerStep { client } => {
                    self.manager_scheduled = false;
                    if let Some(c) = self.client.as_mut().filter(|c| c.id == client) {
                        c.manager.step(&c.membership);
                    }
                }
                Event::Tend { client } => {
                    let now = self.instant();
                    if let Some(c) = self.client.as_mut().filter(|c| c.id == client) {
                        c.manager.tend(&c.membership, now);
                        self.schedule(TRIM_EVERY / 3, Event::Tend { client });
                    }
                }
                // Only the timer armed last: one superseded since must not
                // disarm it (each would arm a new one, a flood of timers).
                Event::Timer if self.timer_at == Some(at) => self.timer_at = None,
                Event::Timer => {}
                Event::Fault => {
                    self.fault();
                    let mean = self.p.fault_every.as_millis() as u64;
                    let next = Duration::from_millis(mean / 2 + self.rng.below(mean));
                    self.schedule(next, Event::Fault);
                }
                Event::CrashClient => self.crash_client(),
                Event::RecordOutage { on } => {
                    self.cluster().flaky_percent = if on { 100 } else { self.p.flaky_percent };
                    let mean = self.p.record_outage_every.as_millis() as u64;
                    let next = if on {
                        Duration::from_millis(50 + self.rng.below(750))
                    } else {
                        Duration::from_millis(mean / 2 + self.rng.below(mean))
                    };
                    self.schedule(next, Event::RecordOutage { on: !on });
                }
                Event::Resync { client } => self.resync(client),
                Event::Reattach => {
                    if !self.attach() {
                        self.schedule(Duration::from_millis(200), Event::Reattach);
                    }
                }
            }
        }
    }

    /// The catch-up of the real daemon, stepped: a member out of sync
    /// whose node is reachable joins (its data survived: the nodes keep
    /// their stores across crashes), the copy is stepped, and the member is
    /// promoted once it is done.
    fn resync(&mut self, id: u64) {
        let now = self.instant();
        let layout = self.layout;
        let store = SimRecords(Arc::clone(&self.cluster));
        let reachable: Vec<bool> = self.cluster().nodes.iter().map(|n| n.reachable()).collect();
        let (queues, skip_copy) = (self.p.queues, self.p.plant_skip_copy);
        let Some(c) = self.client.as_mut().filter(|c| c.id == id) else {
            return;
        };
        let mut restore = None;
        if let Some(copier) = c.copier.as_mut() {
            let mut outcome = None;
            for _ in 0..16 {
                match copier.step(now, &store, &layout) {
                    Step::Again(pause) if pause.is_zero() => {}
                    Step::Again(_) => break,
                    Step::Done => {
                        outcome = Some(Ok(copier.node()));
                        break;
                    }
                    Step::Failed(why) => {
                        outcome = Some(Err((copier.node(), why)));
                        break;
                    }
                }
            }
            match outcome {
                // Promoted once the record says so; tried again otherwise.
                Some(Ok(node)) if c.manager.promote(&c.membership, node).is_ok() => {
                    c.copier = None;
                    self.caught_up += 1;
                }
                Some(Ok(_)) => {}
                Some(Err((node, why))) => {
                    c.copier = None;
                    if !c.membership.view().fenced {
                        c.membership.report(node, &why, now);
                    }
                }
                None => {}
            }
        } else if c.membership.failed().is_empty() {
            let view = c.membership.view();
            let r = *layout.replication();
            let candidate = (0..layout.node_count())
                .find(|n| !view.takes_writes(r.column_of(*n), r.row_of(*n)) && reachable[*n]);
            if let Some(node) = candidate {
                if let Some(ledger) = c.membership.ledger() {
                    ledger.forget(node);
                }
                if c.manager.join(&c.membership, node, false).is_ok() {
                    let options = ResyncOptions {
                        rate: 0,
                        busy: u64::MAX,
                        wait: IO_TIMEOUT,
                        ..Default::default()
                    };
                    let mut copier =
                        Copier::new(Arc::clone(&c.membership), &layout, node, None, options, now);
                    copier.plant_skip_copy = skip_copy;
                    c.copier = Some(copier);
                    restore = Some(node);
                }
            }
        }
        if let Some(node) = restore {
            // Its queues connect to it (the engines follow the join).
            for queue in 0..queues {
                self.schedule(
                    Duration::from_millis(1),
                    Event::Restore {
                        client: id,
                        queue,
                        node,
                    },
                );
            }
        }
        self.schedule(RESYNC_EVERY, Event::Resync { client: id });
    }

    fn arm_timer(&mut self) {
        let Some(client) = self.client.as_mut() else {
            return;
        };
        let Some(deadline) = client
            .engines
            .iter_mut()
            .filter_map(Engine::poll_timeout)
            .min()
        else {
            return;
        };
        let at = deadline.saturating_duration_since(self.base).max(self.now);
        if self.timer_at != Some(at) {
            self.timer_at = Some(at);
            self.seq += 1;
            self.payloads.insert(self.seq, Event::Timer);
            self.events.push(Reverse((at, self.seq)));
        }
    }

    /// After a new owner attached (and reconciled): the in-sync members of
    /// every column hold the same bytes, so reads spread over them agree.
    fn check_reconciled(&self, record: &MembershipRecord) {
        let view = netblk::membership::View::of_record(record);
        let r = *self.layout.replication();
        let c = self.cluster();
        for column in 0..r.columns() as usize {
            let members: Vec<usize> = r
                .members(column)
                .filter(|n| view.in_sync(column, r.row_of(*n)))
                .collect();
            for pair in members.windows(2) {
                let (a, b) = (&c.nodes[pair[0]].store, &c.nodes[pair[1]].store);
                if let Some(at) = (0..a.len())
                    .step_by(SECTOR)
                    .find(|at| a[*at..][..SECTOR] != b[*at..][..SECTOR])
                {
                    let id = |s: &[u8]| sector_ids(&s[at..at + SECTOR]).next();
                    panic!(
                        "in-sync members {} and {} of column {column} differ after reconcile at node offset {at}: writes {:?} and {:?}",
                        pair[0],
                        pair[1],
                        id(a),
                        id(b)
                    );
                }
            }
        }
    }

    /// A member found failed by a timeout had a fault lately (slow
    /// answers go on arriving for a while after one ends): a healthy
    /// member is never taken out.
    fn check_failed(&self) {
        const LATELY: Duration = Duration::from_secs(10);
        let Some(client) = self.client.as_ref() else {
            return;
        };
        for (node, failure) in client.membership.failed() {
            if !failure.reason.contains("timeout") {
                continue;
            }
            // When it was found failed: the failure stays reported until
            // the record without it is stored, which may take long.
            let at = failure.since.saturating_duration_since(self.base);
            let lately =
                self.fault_ends[node].is_some_and(|end| end == Duration::MAX || at < end + LATELY);
            assert!(
                lately,
                "healthy member {node} found failed at {at:?}: {}",
                failure.reason
            );
        }
    }

    /// Every in-sync member holds, for every sector whose content the model
    /// knows, what the model says.
    fn check_members(&self) {
        let Some(client) = self.client.as_ref() else {
            return;
        };
        let view = client.membership.view();
        let r = *self.layout.replication();
        let c = self.cluster();
        for p in self.layout.pieces(0, self.layout.size()) {
            for node in r.members(p.column) {
                if !view.in_sync(p.column, r.row_of(node)) {
                    continue;
                }
                let held = &c.nodes[node].store[p.node_offset as usize..][..p.len as usize];
                let first = p.buf_offset as usize / SECTOR;
                for (i, got) in sector_ids(held).enumerate() {
                    let possible = &self.possible[first + i];
                    if possible.len() == 1 {
                        assert!(
                            possible.contains(&got),
                            "in-sync node {node} holds write {got} at sector {}, the model {possible:?}",
                            first + i
                        );
                    }
                }
            }
        }
    }
}

fn params(seed: u64, client_crashes: usize, plant: bool) -> Params {
    let mut rng = Rng::new(seed ^ 0xfeed);
    Params {
        columns: 1 + rng.below(3) as u32,
        replicas: 2 + rng.below(2) as u32,
        queues: 1 + rng.below(2) as usize,
        depth: 2 + rng.below(7) as u16,
        requests: 600,
        fault_every: Duration::from_millis(400),
        client_crashes,
        flaky_percent: 10,
        record_outage_every: Duration::from_millis(if plant { 300 } else { 1500 }),
        plant,
        plant_no_reconcile: false,
        plant_no_drain: false,
        no_owner_gate: false,
        plant_skip_copy: false,
    }
}

/// Runs `seed`; the panic message if the oracle objected.
fn run(seed: u64, p: Params) -> Result<Sim, String> {
    std::panic::catch_unwind(move || {
        let mut sim = Sim::new(seed, p);
        sim.run();
        sim.check_members();
        sim
    })
    .map_err(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_string()))
            .unwrap_or_default()
    })
}

#[test]
fn replicas_lose_no_acknowledged_write_through_member_faults() {
    let (mut errors, mut faults, mut left, mut back) = (0, 0, 0, 0);
    for seed in seeds(0..40) {
        let sim = run(seed, params(seed, 0, false))
            .unwrap_or_else(|why| panic!("seed {seed} (NETBLK_SIM_SEED={seed}): {why}"));
        assert_eq!(sim.completed, sim.p.requests, "seed {seed}");
        errors += sim.errors;
        faults += sim.faults;
        back += sim.caught_up;
        left += sim
            .client
            .as_ref()
            .map_or(0, |c| c.membership.departures().len());
    }
    eprintln!(
        "{faults} member faults, {left} members left their in-sync sets, {back} caught up and back in sync, {errors} IO errors"
    );
    assert!(
        faults > 40 && left > 10 && back > 5,
        "the runs must exercise faults and catch-ups: {faults}, {left}, {back}"
    );
    assert_eq!(errors, 0, "a member fault costs a pause, never an error");
}

#[test]
fn a_client_that_crashes_and_attaches_again_loses_no_acknowledged_write() {
    let mut back = 0;
    for seed in seeds(100..130) {
        back += run(seed, params(seed, 2, false))
            .unwrap_or_else(|why| panic!("seed {seed} (NETBLK_SIM_SEED={seed}): {why}"))
            .caught_up;
    }
    eprintln!("{back} members caught up across client crashes");
    assert!(back > 5, "catch-ups ran across crashes: {back}");
}

/// A member that joins and is put back in sync without its copy: the
/// oracle finds reads of old data, or an in-sync member that differs from
/// the model; the same seeds pass with the copy.
#[test]
fn the_oracle_finds_a_catch_up_that_copies_nothing() {
    planted(
        500..540,
        |seed| Params {
            plant_skip_copy: true,
            ..params(seed, 0, false)
        },
        "a catch-up that copies nothing",
        &["returned write", "holds write", "flipped"],
    );
}

#[test]
fn the_oracle_finds_acknowledgements_before_the_shrink_is_stored() {
    planted(
        200..260,
        |seed| params(seed, 3, true),
        "publishing a shrink before it is stored",
        &["returned write", "holds write"],
    );
}

#[test]
fn without_owner_fencing_the_oracle_finds_an_old_owners_write() {
    let all = seeds(300..400);
    let found = all.iter().find(|seed| {
        let p = Params {
            no_owner_gate: true,
            ..params(**seed, 4, false)
        };
        run(**seed, p).is_err_and(|why| why.contains("returned write"))
    });
    assert!(
        found.is_some(),
        "writes of a crashed owner that land after the new owner attached went unnoticed"
    );
}

/// Runs the seeds of `range` with a planted bug (`planted_params`): some
/// must fail, each with one of the oracle's `findings` (not a run that went
/// wrong otherwise), and the same seeds pass without the plant.
fn planted(
    range: std::ops::Range<u64>,
    planted_params: fn(u64) -> Params,
    what: &str,
    findings: &[&str],
) {
    let all = seeds(range);
    let mut found = Vec::new();
    for seed in &all {
        if let Err(why) = run(*seed, planted_params(*seed)) {
            assert!(
                findings.iter().any(|f| why.contains(f)),
                "seed {seed} with {what} failed otherwise: {why}"
            );
            found.push((*seed, why));
        }
    }
    assert!(
        !found.is_empty(),
        "{what} went unnoticed over {} seeds",
        all.len()
    );
    eprintln!(
        "{what} found by {} of {} seeds, e.g. {:?}",
        found.len(),
        all.len(),
        found[0]
    );
    for (seed, _) in found.iter().take(5) {
        run(*seed, params(*seed, 3, false))
            .unwrap_or_else(|why| panic!("seed {seed} without {what}: {why}"));
    }
}

/// What reconcile and the trims must prevent: replicas that differ after
/// an attach, reads that flip, (a catch-up copying from a replica that
/// differs) reads of older data, and an in-sync member left with older
/// data at the end.
const DIVERGENCE: &[&str] = &[
    "differ after reconcile",
    "flipped",
    "returned write",
    "holds write",
];

#[test]
fn the_oracle_finds_an_attach_that_does_not_reconcile() {
    planted(
        500..560,
        |seed| Params {
            plant_no_reconcile: true,
            ..params(seed, 3, false)
        },
        "an attach without reconcile",
        DIVERGENCE,
    );
}

#[test]
fn the_oracle_finds_a_trim_that_does_not_wait_for_writes_in_flight() {
    planted(
        600..680,
        |seed| Params {
            plant_no_drain: true,
            ..params(seed, 3, false)
        },
        "a trim without the drain",
        DIVERGENCE,
    );
}

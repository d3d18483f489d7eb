//! Seeded deterministic simulation of the request engine.
//!
//! A fake network carries frames (through the real codec, split into random
//! chunks) between one engine and N simulated nodes. Nodes answer in random
//! order, replies sometimes arrive twice; connections drop and come back; zero-copy buffer
//! releases arrive late. A workload of random non-overlapping requests runs
//! against an in-memory reference model, and every read, every result and
//! finally every node's store are checked against it.
//!
//! A failure prints its seed; `NETBLK_SIM_SEED=<seed> cargo test -p
//! netblk-tests --test sim` replays exactly that run.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use netblk::engine::{BlockRequest, Engine, EngineConfig, Op, ReplySink, Tag};
use netblk::layout::Layout;
use netblk::rng::Rng;
use netblk_protocol::pb::{self, header::Kind, request::Op as WireOp};
use netblk_protocol::{Decoded, Limits, decode_frame, encode_frame};

/// What the simulation draws besides plain numbers.
trait Draw {
    fn chance(&mut self, percent: u64) -> bool;
    fn micros(&mut self, max: u64) -> Duration;
}

impl Draw for Rng {
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn micros(&mut self, max: u64) -> Duration {
        Duration::from_micros(self.below(max + 1))
    }
}

/// Takes the first whole frame off the front of `inbox`, if there is one.
fn take_frame(inbox: &mut Vec<u8>) -> Option<(pb::Header, Vec<u8>)> {
    let (used, frame) =
        match decode_frame(inbox, &Limits::default()).expect("peers send valid frames") {
            Decoded::NeedMore(_) => return None,
            Decoded::Frame(f) => (f.len, (f.header, f.payload.to_vec())),
        };
    inbox.drain(..used);
    Some(frame)
}

#[derive(Debug)]
enum Event {
    /// Bytes arrive at a node on connection generation `gen`.
    ToNode {
        node: usize,
        generation: u64,
        bytes: Vec<u8>,
    },
    /// A node executes a request it received.
    Execute {
        node: usize,
        generation: u64,
        id: u64,
        op: WireOp,
        payload: Vec<u8>,
    },
    /// Bytes arrive at the client.
    ToClient {
        node: usize,
        generation: u64,
        bytes: Vec<u8>,
    },
    /// A zero-copy notification: the buffer of `tag` is free again.
    Release {
        node: usize,
        tag: Tag,
    },
    ConnectionRestore {
        node: usize,
    },
    /// The engine's deadline timer.
    Timer,
}

struct SimNode {
    store: Vec<u8>,
    generation: u64,
    up: bool,
    /// Bytes received on the current connection, not yet a whole frame.
    inbox: Vec<u8>,
    /// When the last chunk of each direction is due, to keep byte order.
    last_to_node: Duration,
    last_to_client: Duration,
    /// Down for good (the node-down scenario).
    dead: bool,
}

struct Outstanding {
    request: BlockRequest,
    submitted: Duration,
}

struct Params {
    nodes: u32,
    stripe_unit: u32,
    size: u64,
    depth: u16,
    max_io: u32,
    requests: usize,
    drop_percent: u64,
    dup_percent: u64,
    zero_copy: bool,
    io_timeout: Duration,
    /// Node 0 dies for good after this many submissions (node-down scenario).
    kill_node0_after: Option<usize>,
}

struct Sim {
    rng: Rng,
    p: Params,
    base: Instant,
    now: Duration,
    seq: u64,
    events: BinaryHeap<Reverse<(Duration, u64, usize)>>,
    payloads: HashMap<usize, Event>,
    next_event: usize,
    engine: Engine,
    layout: Layout,
    nodes: Vec<SimNode>,
    client_inbox: Vec<Vec<u8>>,
    buffers: Vec<Vec<u8>>,
    /// Releases still to come, per tag: a tag is reused only when 0.
    pending_releases: Vec<u32>,
    model: Vec<u8>,
    outstanding: HashMap<Tag, Outstanding>,
    submitted: usize,
    completed: usize,
    errors: usize,
    max_error_latency: Duration,
}

impl Sim {
    fn new(seed: u64, p: Params) -> Sim {
        let layout = Layout::new(p.size, p.stripe_unit, p.nodes).expect("layout");
        let mut engine = Engine::new(
            layout,
            EngineConfig {
                depth: p.depth,
                max_io: p.max_io,
                max_in_flight_per_node: 16,
                io_timeout: p.io_timeout,
                node_down_timeout: Duration::from_secs(3600),
            },
        );
        let nodes = (0..p.nodes as usize)
            .map(|n| {
                engine.handle_connection_restored(n);
                SimNode {
                    store: vec![0; layout.node_capacity(n) as usize],
                    generation: 1,
                    up: true,
                    inbox: Vec::new(),
                    last_to_node: Duration::ZERO,
                    last_to_client: Duration::ZERO,
                    dead: false,
                }
            })
            .collect();
        Sim {
            rng: Rng::new(seed),
            base: Instant::now(),
            now: Duration::ZERO,
            seq: 0,
            events: BinaryHeap::new(),
            payloads: HashMap::new(),
            next_event: 0,
            engine,
            layout,
            nodes,
            client_inbox: vec![Vec::new(); p.nodes as usize],
            buffers: vec![vec![0; p.max_io as usize]; p.depth as usize],
            pending_releases: vec![0; p.depth as usize],
            model: vec![0; p.size as usize],
            outstanding: HashMap::new(),
            submitted: 0,
            completed: 0,
            errors: 0,
            max_error_latency: Duration::ZERO,
            p,
        }
    }

    fn instant(&self) -> Instant {
        self.base + self.now
    }

    fn schedule(&mut self, at: Duration, event: Event) {
        self.seq += 1;
        let key = self.next_event;
        self.next_event += 1;
        self.payloads.insert(key, event);
        self.events.push(Reverse((at, self.seq, key)));
    }

    /// Splits `bytes` into random chunks, delivered in order after random delays.
    fn send_stream(&mut self, node: usize, to_node: bool, bytes: Vec<u8>) {
        let generation = self.nodes[node].generation;
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let n = (1 + self.rng.below(rest.len() as u64 * 2) as usize).min(rest.len());
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            let delay = self.rng.micros(300);
            let last = if to_node {
                &mut self.nodes[node].last_to_node
            } else {
                &mut self.nodes[node].last_to_client
            };
            let at = (self.now + delay).max(*last);
            *last = at;
            let event = if to_node {
                Event::ToNode {
                    node,
                    generation,
                    bytes: chunk.to_vec(),
                }
            } else {
                Event::ToClient {
                    node,
                    generation,
                    bytes: chunk.to_vec(),
                }
            };
            self.schedule(at, event);
        }
    }

    /// Random requests on free tags, never overlapping one in flight.
    fn submit(&mut self) {
        for tag in 0..self.p.depth {
            if self.submitted >= self.p.requests {
                return;
            }
            if self.outstanding.contains_key(&tag) || self.pending_releases[usize::from(tag)] > 0 {
                continue;
            }
            // Leave some tags idle for a while, but never all of them.
            if !self.outstanding.is_empty() && self.rng.chance(30) {
                continue;
            }
            let sectors = self.p.size / 512;
            let max_sectors = u64::from(self.p.max_io) / 512;
            let len = 512 * (1 + self.rng.below(max_sectors.min(sectors)));
            let offset = 512 * self.rng.below(sectors - len / 512 + 1);
            let op = match self.rng.below(10) {
                0..=3 => Op::Write {
                    fua: self.rng.chance(20),
                },
                4..=7 => Op::Read,
                8 => Op::Flush,
                _ if self.rng.chance(50) => Op::Discard,
                _ => Op::WriteZeroes,
            };
            let overlaps = self.outstanding.values().any(|o| {
                let r = o.request;
                op == Op::Flush
                    || r.op == Op::Flush
                    || (offset < r.offset + r.len && r.offset < offset + len)
            });
            if overlaps {
                continue;
            }
            if let Op::Write { .. } = op {
                for (i, b) in self.buffers[usize::from(tag)][..len as usize]
                    .iter_mut()
                    .enumerate()
                {
                    *b = (self.submitted as u64)
                        .wrapping_mul(31)
                        .wrapping_add(i as u64 * 7) as u8;
                }
            } else if op == Op::Read {
                // Poison: a read must overwrite every byte it returns.
                self.buffers[usize::from(tag)][..len as usize].fill(0xee);
            }
            let request = BlockRequest {
                tag,
                op,
                offset,
                len,
            };
            self.engine
                .handle_request(self.instant(), request)
                .expect("free tag");
            self.outstanding.insert(
                tag,
                Outstanding {
                    request,
                    submitted: self.now,
                },
            );
            self.submitted += 1;
            if self.p.kill_node0_after == Some(self.submitted) {
                self.nodes[0].dead = true;
                self.drop_connection(0);
            }
        }
    }

    fn drop_connection(&mut self, node: usize) {
        if !self.nodes[node].up {
            return;
        }
        let n = &mut self.nodes[node];
        n.up = false;
        n.generation += 1;
        n.inbox.clear();
        self.client_inbox[node].clear();
        let now = self.instant();
        self.engine.handle_connection_lost(now, node);
        if !self.nodes[node].dead {
            let at = self.now + self.rng.micros(20_000);
            self.schedule(at, Event::ConnectionRestore { node });
        }
    }

    /// Moves everything the engine wants to send onto the network.
    fn transmit(&mut self) {
        for node in 0..self.nodes.len() {
            while let Some(t) = self.engine.poll_transmit(node) {
                let mut bytes = t.head;
                if let Some(slice) = t.payload {
                    let buf = &self.buffers[usize::from(slice.tag)];
                    bytes.extend_from_slice(&buf[slice.offset as usize..][..slice.len as usize]);
                    if self.p.zero_copy {
                        self.pending_releases[usize::from(slice.tag)] += 1;
                        let at = self.now + self.rng.micros(2_000);
                        self.schedule(
                            at,
                            Event::Release {
                                node,
                                tag: slice.tag,
                            },
                        );
                    } else {
                        self.engine.handle_buffer_released(node, slice.tag);
                    }
                }
                self.send_stream(node, true, bytes);
            }
        }
    }

    fn check_completions(&mut self) {
        while let Some(c) = self.engine.poll_completion() {
            let o = self
                .outstanding
                .remove(&c.tag)
                .expect("completion for a submitted tag");
            assert_eq!(
                self.pending_releases[usize::from(c.tag)],
                0,
                "tag {} completed while a zero-copy send still uses its buffer",
                c.tag
            );
            self.completed += 1;
            let r = o.request;
            match c.result {
                Err(errno) => {
                    self.errors += 1;
                    assert_eq!(errno, 5, "only EIO from timeouts");
                    self.max_error_latency = self.max_error_latency.max(self.now - o.submitted);
                    // The request may or may not have reached a node: the
                    // model cannot know, so take the range back from the nodes.
                    if matches!(r.op, Op::Write { .. } | Op::Discard | Op::WriteZeroes) {
                        self.resync(r.offset, r.len);
                    }
                }
                Ok(n) => {
                    let len = r.len as usize;
                    let at = r.offset as usize;
                    match r.op {
                        Op::Read => {
                            assert_eq!(n, r.len);
                            assert!(
                                self.buffers[usize::from(c.tag)][..len] == self.model[at..at + len],
                                "read of {len} bytes at {at} differs from the model"
                            );
                        }
                        Op::Write { .. } => {
                            assert_eq!(n, r.len);
                            self.model[at..at + len]
                                .copy_from_slice(&self.buffers[usize::from(c.tag)][..len]);
                        }
                        Op::Discard | Op::WriteZeroes => self.model[at..at + len].fill(0),
                        Op::Flush => assert_eq!(n, 0),
                    }
                }
            }
        }
    }

    /// Copies what the nodes hold for a range back into the model.
    fn resync(&mut self, offset: u64, len: u64) {
        for p in self.layout.pieces(offset, len) {
            let src = &self.nodes[p.node].store[p.node_offset as usize..][..p.len as usize];
            self.model[(offset + p.buf_offset) as usize..][..p.len as usize].copy_from_slice(src);
        }
    }

    fn node_receive(&mut self, node: usize, bytes: Vec<u8>) {
        self.nodes[node].inbox.extend_from_slice(&bytes);
        while let Some((header, payload)) = take_frame(&mut self.nodes[node].inbox) {
            let Some(Kind::Request(pb::Request { id, op: Some(op) })) = header.kind else {
                panic!("client sent {header:?}");
            };
            let generation = self.nodes[node].generation;
            // Nodes execute in any order.
            let at = self.now + self.rng.micros(3_000);
            self.schedule(
                at,
                Event::Execute {
                    node,
                    generation,
                    id,
                    op,
                    payload,
                },
            );
        }
    }

    fn node_execute(&mut self, node: usize, id: u64, op: WireOp, payload: Vec<u8>) {
        let store = &mut self.nodes[node].store;
        let mut data = Vec::new();
        match op {
            WireOp::Read(r) => data = store[r.offset as usize..][..r.length as usize].to_vec(),
            WireOp::Write(w) => {
                store[w.offset as usize..][..payload.len()].copy_from_slice(&payload)
            }
            WireOp::Discard(pb::Discard { offset, length })
            | WireOp::WriteZeroes(pb::WriteZeroes { offset, length }) => {
                store[offset as usize..][..length as usize].fill(0)
            }
            WireOp::Flush(_) | WireOp::Ping(_) => {}
        }
        let mut bytes = Vec::new();
        encode_frame(
            &pb::Header::reply(pb::Reply {
                id,
                ..Default::default()
            }),
            &data,
            &mut bytes,
        )
        .expect("encode reply");
        // A duplicated delivery: the engine must take the second copy as stale.
        // (A node never executes one request twice on one connection; that
        // hazard belongs to reconnects and is fenced by connection generation.)
        if self.rng.chance(self.p.dup_percent) {
            let copy = bytes.clone();
            bytes.extend_from_slice(&copy);
        }
        self.send_stream(node, false, bytes);
    }

    fn client_receive(&mut self, node: usize, bytes: Vec<u8>) {
        self.client_inbox[node].extend_from_slice(&bytes);
        while let Some((header, payload)) = take_frame(&mut self.client_inbox[node]) {
            let Some(Kind::Reply(reply)) = header.kind else {
                panic!("node sent {header:?}")
            };
            match self
                .engine
                .handle_reply(node, &reply, payload.len() as u32)
                .expect("valid reply")
            {
                ReplySink::Buffer { id, slice } => {
                    self.buffers[usize::from(slice.tag)][slice.offset as usize..]
                        [..slice.len as usize]
                        .copy_from_slice(&payload);
                    self.engine.handle_payload(id, true);
                }
                ReplySink::Done | ReplySink::Discard => {}
            }
        }
    }

    fn run(&mut self) {
        let mut timer_at = None;
        let mut steps = 0u64;
        loop {
            self.engine.handle_timeout(self.instant());
            while let Some(node) = self.engine.poll_abort() {
                self.drop_connection(node);
            }
            self.submit();
            self.transmit();
            self.check_completions();
            if self.submitted >= self.p.requests && self.outstanding.is_empty() {
                break;
            }
            if let Some(deadline) = self.engine.poll_timeout() {
                let at = deadline.saturating_duration_since(self.base);
                if timer_at != Some(at) {
                    timer_at = Some(at);
                    self.schedule(at, Event::Timer);
                }
            }
            // Sometimes a connection breaks.
            if self.rng.chance(self.p.drop_percent) {
                let node = self.rng.below(self.nodes.len() as u64) as usize;
                self.drop_connection(node);
            }
            let Some(Reverse((at, _, key))) = self.events.pop() else {
                panic!(
                    "simulation stuck: {} outstanding, {} submitted, engine idle: {}",
                    self.outstanding.len(),
                    self.submitted,
                    self.engine.is_idle()
                );
            };
            steps += 1;
            assert!(steps < 5_000_000, "simulation runs away");
            self.now = self.now.max(at);
            let Some(event) = self.payloads.remove(&key) else {
                continue;
            };
            match event {
                Event::ToNode {
                    node,
                    generation,
                    bytes,
                } if generation == self.nodes[node].generation => self.node_receive(node, bytes),
                Event::Execute {
                    node,
                    generation,
                    id,
                    op,
                    payload,
                } if generation == self.nodes[node].generation => {
                    self.node_execute(node, id, op, payload)
                }
                Event::ToClient {
                    node,
                    generation,
                    bytes,
                } if generation == self.nodes[node].generation => self.client_receive(node, bytes),
                Event::Release { node, tag } => {
                    self.pending_releases[usize::from(tag)] -= 1;
                    self.engine.handle_buffer_released(node, tag);
                }
                Event::ConnectionRestore { node } => {
                    let n = &mut self.nodes[node];
                    if !n.up && !n.dead {
                        n.up = true;
                        n.last_to_node = self.now;
                        n.last_to_client = self.now;
                        self.engine.handle_connection_restored(node);
                    }
                }
                Event::Timer => timer_at = None,
                // Bytes and work of a connection that no longer exists.
                Event::ToNode { .. } | Event::Execute { .. } | Event::ToClient { .. } => {}
            }
        }
    }

    /// Every node holds exactly its stripes of the model.
    fn check_nodes(&self) {
        for p in self.layout.pieces(0, self.p.size) {
            let held = &self.nodes[p.node].store[p.node_offset as usize..][..p.len as usize];
            let want = &self.model[p.buf_offset as usize..][..p.len as usize];
            assert!(
                held == want,
                "node {} at {} differs from the model",
                p.node,
                p.node_offset
            );
        }
    }
}

fn seeds(default: std::ops::Range<u64>) -> Vec<u64> {
    match std::env::var("NETBLK_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(seed) => vec![seed],
        None => default.collect(),
    }
}

/// Runs `f(seed)` and names the seed if it panics.
fn with_seed(seed: u64, f: impl FnOnce(u64) + std::panic::UnwindSafe) {
    if let Err(panic) = std::panic::catch_unwind(move || f(seed)) {
        eprintln!("simulation failed with seed {seed}: replay with NETBLK_SIM_SEED={seed}");
        std::panic::resume_unwind(panic);
    }
}

#[test]
fn engine_survives_reordering_splits_duplicates_and_reconnects() {
    let all = seeds(0..60);
    let replaying = all.len() == 1;
    let (mut resent, mut stale) = (0, 0);
    for seed in all {
        let stats = std::panic::AssertUnwindSafe((&mut resent, &mut stale));
        with_seed(seed, move |seed| {
            let stats = stats;
            let mut rng = Rng::new(seed ^ 0xabcdef);
            let nodes = [1u32, 2, 3, 5, 8][rng.below(5) as usize];
            let stripe_unit = 4096 << rng.below(3);
            let p = Params {
                nodes,
                stripe_unit,
                size: u64::from(stripe_unit) * u64::from(nodes) * (3 + rng.below(6)),
                depth: 1 + rng.below(16) as u16,
                max_io: 65536,
                requests: 400,
                drop_percent: if rng.chance(50) { 1 } else { 0 },
                dup_percent: 5,
                zero_copy: rng.chance(50),
                io_timeout: Duration::from_secs(30),
                kill_node0_after: None,
            };
            let mut sim = Sim::new(seed, p);
            sim.run();
            assert_eq!(sim.completed, sim.p.requests);
            assert_eq!(
                sim.errors, 0,
                "no errors while every node comes back in time"
            );
            sim.check_nodes();
            let (resent, stale) = stats.0;
            *resent += sim.engine.stats().pieces_resent;
            *stale += sim.engine.stats().stale_replies;
        });
    }
    if !replaying {
        assert!(resent > 0, "the seeds exercise resends after reconnects");
        assert!(stale > 0, "the seeds exercise duplicate (stale) replies");
    }
}

#[test]
fn a_dead_node_fails_its_requests_with_eio_within_the_timeout() {
    for seed in seeds(100..120) {
        with_seed(seed, |seed| {
            let timeout = Duration::from_millis(500);
            let p = Params {
                nodes: 3,
                stripe_unit: 4096,
                size: 4096 * 3 * 8,
                depth: 8,
                max_io: 16384,
                requests: 300,
                drop_percent: 0,
                dup_percent: 0,
                zero_copy: true,
                io_timeout: timeout,
                kill_node0_after: Some(100),
            };
            let mut sim = Sim::new(seed, p);
            sim.run();
            assert_eq!(sim.completed, sim.p.requests, "nothing hangs");
            assert!(sim.errors > 0, "requests touching the dead node fail");
            assert!(
                sim.max_error_latency <= timeout + Duration::from_millis(10),
                "failed within the timeout: {:?}",
                sim.max_error_latency
            );
        });
    }
}

//! Seeded deterministic simulation of the request engine.
//!
//! A fake network carries frames (through the real codec, split into random
//! chunks: payloads arrive in pieces) between one engine and N simulated
//! nodes. Nodes answer in random order, replies sometimes arrive twice;
//! connections drop and come back. As on a real socket, a send holds its
//! buffer until the peer has read the bytes (plus a delay for zero-copy
//! notifications), so a node that stops reading holds the request's buffer
//! until the connection is torn down. A node executes what it read even
//! after the connection is gone, late, until a newer session of the client
//! fences the older ones (the mock node's rule). A workload of random
//! non-overlapping requests runs against an in-memory reference model, and
//! every read, every result and finally every node's store are checked
//! against it.
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
    /// Bytes arrive at a node on connection generation `generation`.
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
    /// A node stops reading its connection for a while, then goes on.
    Stall {
        node: usize,
        until: Duration,
    },
    Unstall {
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
    /// Requests of connections below this generation are never executed
    /// (a newer session fenced them); above it they run, however late.
    fenced_below: u64,
    /// Not reading: what arrives waits here, and senders wait with it.
    stalled: bool,
    held: Vec<u8>,
    /// Bytes of the current connection sent to / read by the node, and the
    /// sends that wait for the node to read up to a point: (end, tag).
    sent: u64,
    read: u64,
    unread_sends: Vec<(u64, Tag)>,
    /// Ranges (node offset, length) of writes that failed while this node's
    /// connection was torn down: what the node holds there is known only
    /// once the next session fenced the old one.
    resync_at_restore: Vec<(u64, u64)>,
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
    /// Percent of requests a node executes late: after 1 to 3 IO timeouts.
    slow_percent: u64,
    /// Per-mille of steps at which a node stops reading for 1 to 4 IO timeouts.
    stall_permille: u64,
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
    max_latency: Duration,
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
                data_digest: false,
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
                    fenced_below: 1,
                    stalled: false,
                    held: Vec::new(),
                    sent: 0,
                    read: 0,
                    unread_sends: Vec::new(),
                    resync_at_restore: Vec::new(),
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
            max_latency: Duration::ZERO,
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

    /// Splits `bytes` into random chunks, delivered in order after random
    /// delays, on connection `generation`.
    fn send_stream(&mut self, node: usize, generation: u64, to_node: bool, bytes: Vec<u8>) {
        if to_node {
            self.nodes[node].sent += bytes.len() as u64;
        }
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
        n.held.clear();
        (n.sent, n.read) = (0, 0);
        // The kernel lets go of every buffer of a torn-down connection.
        let unread = std::mem::take(&mut n.unread_sends);
        for (_, tag) in unread {
            self.release(node, tag);
        }
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
                    // Held until the node has read it all.
                    self.pending_releases[usize::from(slice.tag)] += 1;
                    let n = &mut self.nodes[node];
                    let end = n.sent + bytes.len() as u64;
                    n.unread_sends.push((end, slice.tag));
                }
                let generation = self.nodes[node].generation;
                self.send_stream(node, generation, true, bytes);
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
            self.max_latency = self.max_latency.max(self.now - o.submitted);
            let r = o.request;
            match c.result {
                Err(errno) => {
                    self.errors += 1;
                    assert_eq!(errno, 5, "only EIO from timeouts");
                    self.max_error_latency = self.max_error_latency.max(self.now - o.submitted);
                    // The request may or may not have reached a node: the
                    // model cannot know, so take the range back from the
                    // nodes: now where the connection is up (nothing of the
                    // request is left in it), else once the next session
                    // fenced what the old one may still run.
                    if matches!(r.op, Op::Write { .. } | Op::Discard | Op::WriteZeroes) {
                        for p in self.layout.pieces(r.offset, r.len) {
                            if self.nodes[p.node].up {
                                self.resync(p.node, p.node_offset, p.len);
                            } else {
                                self.nodes[p.node]
                                    .resync_at_restore
                                    .push((p.node_offset, p.len));
                            }
                        }
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

    /// Copies what `node` holds for a range of its store back into the model.
    fn resync(&mut self, node: usize, node_offset: u64, len: u64) {
        for p in self.layout.pieces(0, self.p.size) {
            if p.node != node {
                continue;
            }
            let (start, end) = (
                p.node_offset.max(node_offset),
                (p.node_offset + p.len).min(node_offset + len),
            );
            if start < end {
                let src = &self.nodes[node].store[start as usize..end as usize];
                let at = (p.buf_offset + start - p.node_offset) as usize;
                self.model[at..at + src.len()].copy_from_slice(src);
            }
        }
    }

    /// A send of `tag`'s buffer to `node` is done with it: now for a plain
    /// send, after the notification's delay for a zero-copy one.
    fn release(&mut self, node: usize, tag: Tag) {
        let at = if self.p.zero_copy {
            self.now + self.rng.micros(2_000)
        } else {
            self.now
        };
        self.schedule(at, Event::Release { node, tag });
    }

    fn node_receive(&mut self, node: usize, bytes: Vec<u8>) {
        let n = &mut self.nodes[node];
        if n.stalled || !n.held.is_empty() {
            n.held.extend_from_slice(&bytes);
            return;
        }
        n.read += bytes.len() as u64;
        let read = n.read;
        let mut done = Vec::new();
        n.unread_sends.retain(|(end, tag)| {
            let read_all = *end <= read;
            if read_all {
                done.push(*tag);
            }
            !read_all
        });
        for tag in done {
            self.release(node, tag);
        }
        self.nodes[node].inbox.extend_from_slice(&bytes);
        while let Some((header, payload)) = take_frame(&mut self.nodes[node].inbox) {
            let Some(Kind::Request(pb::Request { id, op: Some(op) })) = header.kind else {
                panic!("client sent {header:?}");
            };
            let generation = self.nodes[node].generation;
            // Nodes execute in any order, some requests very late.
            let at = if self.rng.chance(self.p.slow_percent) {
                let timeout = self.p.io_timeout.as_micros() as u64;
                self.now + Duration::from_micros(timeout + self.rng.below(2 * timeout))
            } else {
                self.now + self.rng.micros(3_000)
            };
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

    fn node_execute(
        &mut self,
        node: usize,
        generation: u64,
        id: u64,
        op: WireOp,
        payload: Vec<u8>,
    ) {
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
            WireOp::Flush(_) | WireOp::Ping(_) | WireOp::Resize(_) | WireOp::Delete(_) => {}
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
        self.send_stream(node, generation, false, bytes);
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
                ReplySink::Buffer { id, slice, .. } => {
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
            let finished = self.submitted >= self.p.requests && self.outstanding.is_empty();
            // Then what the network and the nodes still hold plays out: late
            // executions, fences at reconnects.
            if finished && self.events.is_empty() {
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
            if !finished && self.rng.chance(self.p.drop_percent) {
                let node = self.rng.below(self.nodes.len() as u64) as usize;
                self.drop_connection(node);
            }
            // Sometimes a node stops reading.
            if !finished && self.rng.below(1000) < self.p.stall_permille {
                let node = self.rng.below(self.nodes.len() as u64) as usize;
                let timeout = self.p.io_timeout.as_micros() as u64;
                let until = self.now + Duration::from_micros(timeout + self.rng.below(3 * timeout));
                self.schedule(self.now, Event::Stall { node, until });
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
                // Run late, even for a connection that is gone, unless a
                // newer session fenced it.
                Event::Execute {
                    node,
                    generation,
                    id,
                    op,
                    payload,
                } if generation >= self.nodes[node].fenced_below => {
                    self.node_execute(node, generation, id, op, payload)
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
                        // The new session fences the older ones.
                        n.fenced_below = n.generation;
                        for (offset, len) in std::mem::take(&mut n.resync_at_restore) {
                            self.resync(node, offset, len);
                        }
                        self.engine.handle_connection_restored(node);
                    }
                }
                Event::Stall { node, until } => {
                    if !self.nodes[node].stalled {
                        self.nodes[node].stalled = true;
                        self.schedule(until, Event::Unstall { node });
                    }
                }
                Event::Unstall { node } => {
                    let n = &mut self.nodes[node];
                    n.stalled = false;
                    let held = std::mem::take(&mut n.held);
                    if !held.is_empty() {
                        self.node_receive(node, held);
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
                slow_percent: 0,
                stall_permille: 0,
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
                slow_percent: 0,
                stall_permille: 0,
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

/// Nodes that run requests very late and stop reading for longer than the
/// IO timeout: every request ends within its deadline (plus the time to
/// hand back buffers), and a write that timed out never lands over what
/// came after it: the volume always matches the model.
#[test]
fn late_and_stalled_nodes_never_hold_a_request_past_its_deadline_or_land_a_stale_write() {
    let all = seeds(200..240);
    let replaying = all.len() == 1;
    let (mut errors, mut aborts) = (0, 0);
    for seed in all {
        let stats = std::panic::AssertUnwindSafe((&mut errors, &mut aborts));
        with_seed(seed, move |seed| {
            let stats = stats;
            let mut rng = Rng::new(seed ^ 0x5eed);
            let timeout = Duration::from_millis(50);
            let nodes = [1u32, 2, 3][rng.below(3) as usize];
            let p = Params {
                nodes,
                stripe_unit: 4096,
                size: 4096 * u64::from(nodes) * 4,
                depth: 1 + rng.below(8) as u16,
                max_io: 16384,
                requests: 400,
                drop_percent: 0,
                dup_percent: 5,
                zero_copy: rng.chance(50),
                io_timeout: timeout,
                kill_node0_after: None,
                slow_percent: 3,
                stall_permille: 2,
            };
            let mut sim = Sim::new(seed, p);
            sim.run();
            assert_eq!(sim.completed, sim.p.requests, "nothing hangs");
            assert!(
                sim.max_latency <= timeout + Duration::from_millis(5),
                "a request took {:?} with a {timeout:?} deadline",
                sim.max_latency
            );
            sim.check_nodes();
            let (errors, aborts) = stats.0;
            *errors += sim.errors;
            *aborts += sim.engine.stats().aborts;
        });
    }
    if !replaying {
        assert!(errors > 0, "the seeds exercise timeouts");
        assert!(aborts > 0, "the seeds exercise torn-down connections");
    }
}

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
use std::sync::Arc;
use std::time::{Duration, Instant};

use netblk::engine::{BlockRequest, Engine, EngineConfig, Op, Tag};
use netblk::epochs::Epochs;
use netblk::layout::Layout;
use netblk::ledger::Ledger;
use netblk::rng::Rng;
use netblk_protocol::pb::{self, header::Kind, request::Op as WireOp};
use netblk_protocol::{Decoded, Limits, decode_frame, encode_frame};
use netblk_tests::sim::{deliver_reply, seeds};

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
    /// Bytes arrive at a node on connection `cid`.
    ToNode {
        at: Link,
        bytes: Vec<u8>,
    },
    /// A node executes a request it received on connection `cid`.
    Execute {
        at: Link,
        id: u64,
        op: WireOp,
        payload: Vec<u8>,
    },
    /// Bytes arrive at the client on connection `cid`.
    ToClient {
        at: Link,
        bytes: Vec<u8>,
    },
    /// A zero-copy notification: the buffer of `tag` is free again.
    Release {
        queue: usize,
        node: usize,
        tag: Tag,
    },
    /// A queue's connection to a node is made again.
    ConnectionRestore {
        queue: usize,
        node: usize,
    },
    /// A node stops reading one connection for a while, then goes on (a
    /// path stalled for that connection only).
    Stall {
        queue: usize,
        node: usize,
        until: Duration,
    },
    Unstall {
        queue: usize,
        node: usize,
    },
    /// The engines' deadline timer.
    Timer,
}

/// One connection: which queue and node, and which incarnation of that
/// connection (`cid`, unique over the run).
#[derive(Debug, Clone, Copy)]
struct Link {
    queue: usize,
    node: usize,
    cid: u64,
}

/// How nodes fence a client's older connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fencing {
    /// One fencing epoch per node for the whole device, shared by its
    /// queues (`netblk::epochs`): a connection that ends moves it on, no
    /// queue sends on an older one, and admitting a newer one fences every
    /// older connection of any queue.
    DeviceEpochs,
    /// What netblk did before: each queue its own client with its own
    /// sessions; a reconnect fences only that queue's older connections.
    PerQueueSessions,
}

/// A queue's connection to a node, both ends.
struct Conn {
    cid: u64,
    /// Its handshake session: the node's epoch, or the queue's own session.
    session: u64,
    up: bool,
    /// Bytes received by the node, not yet a whole frame.
    inbox: Vec<u8>,
    /// Bytes received by the client, not yet a whole frame.
    client_inbox: Vec<u8>,
    /// When the last chunk of each direction is due, to keep byte order.
    last_to_node: Duration,
    last_to_client: Duration,
    /// The node does not read it: what arrives waits here, and senders wait
    /// with it.
    stalled: bool,
    held: Vec<u8>,
    /// Bytes sent to / read by the node, and the sends that wait for the
    /// node to read up to a point: (end, tag).
    sent: u64,
    read: u64,
    unread_sends: Vec<(u64, Tag)>,
}

/// Every connection ever made, as the node remembers it for fencing.
struct Past {
    queue: usize,
    node: usize,
    session: u64,
    up: bool,
    fenced: bool,
}

struct SimNode {
    store: Vec<u8>,
    /// Down for good (the node-down scenario).
    dead: bool,
}

/// A range of a node's store whose content the model cannot know: a write
/// there failed while connections that may still hold a copy of it
/// (`holders`) were not yet fenced. Known again once they all are.
struct Uncertain {
    node: usize,
    offset: u64,
    len: u64,
    holders: Vec<u64>,
}

struct Outstanding {
    request: BlockRequest,
    submitted: Duration,
}

struct Params {
    nodes: u32,
    queues: usize,
    fencing: Fencing,
    stripe_unit: u32,
    size: u64,
    depth: u16,
    max_io: u32,
    requests: usize,
    /// Percent of steps at which one connection (one queue to one node)
    /// breaks.
    drop_percent: u64,
    dup_percent: u64,
    zero_copy: bool,
    io_timeout: Duration,
    /// Node 0 dies for good after this many submissions (node-down scenario).
    kill_node0_after: Option<usize>,
    /// Percent of requests a node executes late: after 1 to 3 IO timeouts.
    slow_percent: u64,
    /// Per-mille of steps at which one connection stops being read for 1 to
    /// 4 IO timeouts.
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
    engines: Vec<Engine>,
    epochs: Arc<Epochs>,
    layout: Layout,
    nodes: Vec<SimNode>,
    /// `conns[queue][node]`.
    conns: Vec<Vec<Conn>>,
    past: HashMap<u64, Past>,
    next_cid: u64,
    uncertain: Vec<Uncertain>,
    /// `buffers[queue][tag]`.
    buffers: Vec<Vec<Vec<u8>>>,
    /// Releases still to come, per queue and tag: a tag is reused only when 0.
    pending_releases: Vec<Vec<u32>>,
    model: Vec<u8>,
    outstanding: HashMap<(usize, Tag), Outstanding>,
    submitted: usize,
    completed: usize,
    errors: usize,
    max_error_latency: Duration,
    max_latency: Duration,
}

impl Sim {
    fn new(seed: u64, p: Params) -> Sim {
        let layout = Layout::new(p.size, p.stripe_unit, p.nodes).expect("layout");
        let ledger = Arc::new(Ledger::new(p.nodes as usize));
        let engines = (0..p.queues)
            .map(|_| {
                let mut engine = Engine::new(
                    layout,
                    EngineConfig {
                        depth: p.depth,
                        max_io: p.max_io,
                        max_in_flight_per_node: 16,
                        io_timeout: p.io_timeout,
                        node_down_timeout: Duration::from_secs(3600),
                        replica_timeout: Duration::from_secs(5),
                        data_digest: false,
                    },
                );
                engine.share_ledger(Arc::clone(&ledger));
                engine
            })
            .collect();
        let mut sim = Sim {
            rng: Rng::new(seed),
            base: Instant::now(),
            now: Duration::ZERO,
            seq: 0,
            events: BinaryHeap::new(),
            payloads: HashMap::new(),
            next_event: 0,
            engines,
            epochs: Arc::new(Epochs::new(p.nodes as usize, 1)),
            layout,
            nodes: (0..p.nodes as usize)
                .map(|n| SimNode {
                    store: vec![0; layout.node_capacity(n) as usize],
                    dead: false,
                })
                .collect(),
            conns: Vec::new(),
            past: HashMap::new(),
            next_cid: 1,
            uncertain: Vec::new(),
            buffers: vec![vec![vec![0; p.max_io as usize]; p.depth as usize]; p.queues],
            pending_releases: vec![vec![0; p.depth as usize]; p.queues],
            model: vec![0; p.size as usize],
            outstanding: HashMap::new(),
            submitted: 0,
            completed: 0,
            errors: 0,
            max_error_latency: Duration::ZERO,
            max_latency: Duration::ZERO,
            p,
        };
        for queue in 0..sim.p.queues {
            let row = (0..sim.p.nodes as usize)
                .map(|node| sim.new_conn(queue, node, 1))
                .collect();
            sim.conns.push(row);
            for node in 0..sim.p.nodes as usize {
                sim.engines[queue].handle_connection_restored(node);
            }
        }
        sim
    }

    fn new_conn(&mut self, queue: usize, node: usize, session: u64) -> Conn {
        let cid = self.next_cid;
        self.next_cid += 1;
        self.past.insert(
            cid,
            Past {
                queue,
                node,
                session,
                up: true,
                fenced: false,
            },
        );
        Conn {
            cid,
            session,
            up: true,
            inbox: Vec::new(),
            client_inbox: Vec::new(),
            last_to_node: self.now,
            last_to_client: self.now,
            stalled: false,
            held: Vec::new(),
            sent: 0,
            read: 0,
            unread_sends: Vec::new(),
        }
    }

    fn instant(&self) -> Instant {
        self.base + self.now
    }

    fn link(&self, queue: usize, node: usize) -> Link {
        Link {
            queue,
            node,
            cid: self.conns[queue][node].cid,
        }
    }

    /// True if `at` is still the live connection of its queue and node.
    fn live(&self, at: Link) -> bool {
        let c = &self.conns[at.queue][at.node];
        c.cid == at.cid && c.up
    }

    fn schedule(&mut self, at: Duration, event: Event) {
        self.seq += 1;
        let key = self.next_event;
        self.next_event += 1;
        self.payloads.insert(key, event);
        self.events.push(Reverse((at, self.seq, key)));
    }

    /// Splits `bytes` into random chunks, delivered in order after random
    /// delays, on connection `at`.
    fn send_stream(&mut self, at: Link, to_node: bool, bytes: Vec<u8>) {
        if to_node {
            self.conns[at.queue][at.node].sent += bytes.len() as u64;
        }
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let n = (1 + self.rng.below(rest.len() as u64 * 2) as usize).min(rest.len());
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            let delay = self.rng.micros(300);
            let conn = &mut self.conns[at.queue][at.node];
            let last = if to_node {
                &mut conn.last_to_node
            } else {
                &mut conn.last_to_client
            };
            let when = (self.now + delay).max(*last);
            *last = when;
            let bytes = chunk.to_vec();
            let event = if to_node {
                Event::ToNode { at, bytes }
            } else {
                Event::ToClient { at, bytes }
            };
            self.schedule(when, event);
        }
    }

    /// Random requests on free tags of random queues, never overlapping one
    /// in flight.
    fn submit(&mut self) {
        for tag in 0..self.p.depth {
            let queue = self.rng.below(self.p.queues as u64) as usize;
            if self.submitted >= self.p.requests {
                return;
            }
            if self.outstanding.contains_key(&(queue, tag))
                || self.pending_releases[queue][usize::from(tag)] > 0
            {
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
            let buf = &mut self.buffers[queue][usize::from(tag)][..len as usize];
            if let Op::Write { .. } = op {
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = (self.submitted as u64)
                        .wrapping_mul(31)
                        .wrapping_add(i as u64 * 7) as u8;
                }
            } else if op == Op::Read {
                // Poison: a read must overwrite every byte it returns.
                buf.fill(0xee);
            }
            let request = BlockRequest {
                tag,
                op,
                offset,
                len,
            };
            let now = self.instant();
            self.engines[queue]
                .handle_request(now, request)
                .expect("free tag");
            self.outstanding.insert(
                (queue, tag),
                Outstanding {
                    request,
                    submitted: self.now,
                },
            );
            self.submitted += 1;
            if self.p.kill_node0_after == Some(self.submitted) {
                self.nodes[0].dead = true;
                for queue in 0..self.p.queues {
                    self.drop_connection(queue, 0);
                }
            }
        }
    }

    /// `queue`'s connection to `node` breaks (or is torn down by the client).
    fn drop_connection(&mut self, queue: usize, node: usize) {
        if !self.conns[queue][node].up {
            return;
        }
        let conn = &mut self.conns[queue][node];
        conn.up = false;
        conn.inbox.clear();
        conn.client_inbox.clear();
        conn.held.clear();
        conn.stalled = false;
        (conn.sent, conn.read) = (0, 0);
        let (cid, session) = (conn.cid, conn.session);
        // The kernel lets go of every buffer of a torn-down connection.
        let unread = std::mem::take(&mut conn.unread_sends);
        if let Some(past) = self.past.get_mut(&cid) {
            past.up = false;
        }
        for (_, tag) in unread {
            self.release(queue, node, tag);
        }
        if self.p.fencing == Fencing::DeviceEpochs {
            self.epochs.ended(node, session);
        }
        let now = self.instant();
        self.engines[queue].handle_connection_lost(now, node);
        if !self.nodes[node].dead {
            let at = self.now + self.rng.micros(20_000);
            self.schedule(at, Event::ConnectionRestore { queue, node });
        }
    }

    /// A new connection of `queue` to `node` is admitted: the node fences
    /// the client's older connections first (and closes those still open).
    fn restore(&mut self, queue: usize, node: usize) {
        if self.conns[queue][node].up || self.nodes[node].dead {
            return;
        }
        let session = match self.p.fencing {
            Fencing::DeviceEpochs => self.epochs.current(node),
            Fencing::PerQueueSessions => self.conns[queue][node].session + 1,
        };
        let mut close = Vec::new();
        for (cid, past) in &mut self.past {
            let older = past.node == node
                && !past.fenced
                && past.session < session
                && (self.p.fencing == Fencing::DeviceEpochs || past.queue == queue);
            if older {
                past.fenced = true;
                if past.up {
                    close.push((past.queue, *cid));
                }
            }
        }
        for (q, cid) in close {
            if self.conns[q][node].cid == cid {
                self.drop_connection(q, node);
            }
        }
        self.conns[queue][node] = self.new_conn(queue, node, session);
        self.engines[queue].handle_connection_restored(node);
        self.settle_uncertain();
    }

    /// Ranges whose possible stale copies are all fenced now are what the
    /// node holds: the model takes them from it.
    fn settle_uncertain(&mut self) {
        let past = &self.past;
        let (known, still): (Vec<Uncertain>, Vec<Uncertain>) = std::mem::take(&mut self.uncertain)
            .into_iter()
            .partition(|u| u.holders.iter().all(|cid| past[cid].fenced));
        self.uncertain = still;
        for u in known {
            self.resync(u.node, u.offset, u.len);
        }
    }

    /// A request completed successfully over `node`'s range: the model knows
    /// what is there now, whatever failed there before.
    fn forget_uncertain(&mut self, node: usize, offset: u64, len: u64) {
        let mut kept = Vec::new();
        for u in std::mem::take(&mut self.uncertain) {
            let (end, u_end) = (offset + len, u.offset + u.len);
            if u.node != node || u_end <= offset || end <= u.offset {
                kept.push(u);
                continue;
            }
            if u.offset < offset {
                kept.push(Uncertain {
                    len: offset - u.offset,
                    holders: u.holders.clone(),
                    ..u
                });
            }
            if end < u_end {
                kept.push(Uncertain {
                    offset: end,
                    len: u_end - end,
                    ..u
                });
            }
        }
        self.uncertain = kept;
    }

    /// Moves everything the engines want to send onto the network.
    fn transmit(&mut self) {
        for queue in 0..self.p.queues {
            for node in 0..self.nodes.len() {
                let conn = &self.conns[queue][node];
                if self.p.fencing == Fencing::DeviceEpochs
                    && conn.up
                    && !self.epochs.may_send(node, conn.session)
                {
                    // The node's epoch moved on: this connection may carry
                    // nothing more (the driver breaks it the same way).
                    self.drop_connection(queue, node);
                    continue;
                }
                while let Some(t) = self.engines[queue].poll_transmit(node) {
                    let mut bytes = t.head;
                    if let Some(slice) = t.payload {
                        let buf = &self.buffers[queue][usize::from(slice.tag)];
                        bytes
                            .extend_from_slice(&buf[slice.offset as usize..][..slice.len as usize]);
                        // Held until the node has read it all.
                        self.pending_releases[queue][usize::from(slice.tag)] += 1;
                        let conn = &mut self.conns[queue][node];
                        let end = conn.sent + bytes.len() as u64;
                        conn.unread_sends.push((end, slice.tag));
                    }
                    let at = self.link(queue, node);
                    self.send_stream(at, true, bytes);
                }
            }
        }
    }

    fn check_completions(&mut self) {
        for queue in 0..self.p.queues {
            while let Some(c) = self.engines[queue].poll_completion() {
                self.completed_one(queue, c.tag, c.result);
            }
        }
    }

    fn completed_one(&mut self, queue: usize, tag: Tag, result: Result<u64, i32>) {
        let o = self
            .outstanding
            .remove(&(queue, tag))
            .expect("completion for a submitted tag");
        assert_eq!(
            self.pending_releases[queue][usize::from(tag)],
            0,
            "tag {tag} of queue {queue} completed while a zero-copy send still uses its buffer"
        );
        self.completed += 1;
        self.max_latency = self.max_latency.max(self.now - o.submitted);
        let r = o.request;
        let writes = matches!(r.op, Op::Write { .. } | Op::Discard | Op::WriteZeroes);
        match result {
            Err(errno) => {
                self.errors += 1;
                assert_eq!(errno, 5, "only EIO from timeouts");
                self.max_error_latency = self.max_error_latency.max(self.now - o.submitted);
                // The request may or may not have reached a node: the model
                // cannot know. What the node holds there is known once every
                // connection of this queue that was lost or torn down and
                // may still hold a copy is fenced (nothing of the request is
                // left in a connection that is up: it completed).
                if writes {
                    for p in self.layout.pieces(r.offset, r.len) {
                        let holders: Vec<u64> = self
                            .past
                            .iter()
                            .filter(|(_, c)| {
                                c.queue == queue && c.node == p.column && !c.up && !c.fenced
                            })
                            .map(|(cid, _)| *cid)
                            .collect();
                        self.uncertain.push(Uncertain {
                            node: p.column,
                            offset: p.node_offset,
                            len: p.len,
                            holders,
                        });
                    }
                    self.settle_uncertain();
                }
            }
            Ok(n) => {
                let len = r.len as usize;
                let at = r.offset as usize;
                let buf = &self.buffers[queue][usize::from(tag)][..len];
                match r.op {
                    Op::Read => {
                        assert_eq!(n, r.len);
                        assert!(
                            buf == &self.model[at..at + len],
                            "read of {len} bytes at {at} through queue {queue} differs from the model"
                        );
                    }
                    Op::Write { .. } => {
                        assert_eq!(n, r.len);
                        self.model[at..at + len].copy_from_slice(buf);
                    }
                    Op::Discard | Op::WriteZeroes => self.model[at..at + len].fill(0),
                    Op::Flush => assert_eq!(n, 0),
                }
                if writes {
                    for p in self.layout.pieces(r.offset, r.len) {
                        self.forget_uncertain(p.column, p.node_offset, p.len);
                    }
                }
            }
        }
    }

    /// Copies what `node` holds for a range of its store back into the model.
    fn resync(&mut self, node: usize, node_offset: u64, len: u64) {
        for p in self.layout.pieces(0, self.p.size) {
            if p.column != node {
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
    fn release(&mut self, queue: usize, node: usize, tag: Tag) {
        let at = if self.p.zero_copy {
            self.now + self.rng.micros(2_000)
        } else {
            self.now
        };
        self.schedule(at, Event::Release { queue, node, tag });
    }

    fn node_receive(&mut self, at: Link, bytes: Vec<u8>) {
        let conn = &mut self.conns[at.queue][at.node];
        if conn.stalled || !conn.held.is_empty() {
            conn.held.extend_from_slice(&bytes);
            return;
        }
        conn.read += bytes.len() as u64;
        let read = conn.read;
        let mut done = Vec::new();
        conn.unread_sends.retain(|(end, tag)| {
            let read_all = *end <= read;
            if read_all {
                done.push(*tag);
            }
            !read_all
        });
        for tag in done {
            self.release(at.queue, at.node, tag);
        }
        self.conns[at.queue][at.node]
            .inbox
            .extend_from_slice(&bytes);
        while let Some((header, payload)) = take_frame(&mut self.conns[at.queue][at.node].inbox) {
            let Some(Kind::Request(pb::Request { id, op: Some(op) })) = header.kind else {
                panic!("client sent {header:?}");
            };
            // Nodes execute in any order, some requests very late.
            let when = if self.rng.chance(self.p.slow_percent) {
                let timeout = self.p.io_timeout.as_micros() as u64;
                self.now + Duration::from_micros(timeout + self.rng.below(2 * timeout))
            } else {
                self.now + self.rng.micros(3_000)
            };
            self.schedule(
                when,
                Event::Execute {
                    at,
                    id,
                    op,
                    payload,
                },
            );
        }
    }

    fn node_execute(&mut self, at: Link, id: u64, op: WireOp, payload: Vec<u8>) {
        let store = &mut self.nodes[at.node].store;
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
            WireOp::Flush(_)
            | WireOp::Ping(_)
            | WireOp::Resize(_)
            | WireOp::Delete(_)
            | WireOp::GetRecord(_)
            | WireOp::PutRecord(_)
            | WireOp::GetActivity(_)
            | WireOp::TrimActivity(_)
            | WireOp::Digest(_)
            | WireOp::GetMissed(_) => {}
        }
        if !self.live(at) {
            // Executed late for a connection that is gone: no one hears of it.
            return;
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
        // hazard belongs to reconnects and is fenced by the sessions.)
        if self.rng.chance(self.p.dup_percent) {
            let copy = bytes.clone();
            bytes.extend_from_slice(&copy);
        }
        self.send_stream(at, false, bytes);
    }

    fn client_receive(&mut self, at: Link, bytes: Vec<u8>) {
        let (queue, node) = (at.queue, at.node);
        self.conns[queue][node]
            .client_inbox
            .extend_from_slice(&bytes);
        while let Some((header, payload)) = take_frame(&mut self.conns[queue][node].client_inbox) {
            let Some(Kind::Reply(reply)) = header.kind else {
                panic!("node sent {header:?}")
            };
            deliver_reply(
                &mut self.engines[queue],
                &mut self.buffers[queue],
                node,
                &reply,
                &payload,
            );
        }
    }

    fn next_deadline(&mut self) -> Option<Instant> {
        self.engines
            .iter_mut()
            .filter_map(|e| e.poll_timeout())
            .min()
    }

    fn run(&mut self) {
        let mut timer_at = None;
        let mut steps = 0u64;
        loop {
            let now = self.instant();
            for queue in 0..self.p.queues {
                self.engines[queue].handle_timeout(now);
                while let Some(node) = self.engines[queue].poll_abort() {
                    self.drop_connection(queue, node);
                }
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
            if let Some(deadline) = self.next_deadline() {
                let at = deadline.saturating_duration_since(self.base);
                if timer_at != Some(at) {
                    timer_at = Some(at);
                    self.schedule(at, Event::Timer);
                }
            }
            // Sometimes one connection breaks (a path lost for it alone).
            if !finished && self.rng.chance(self.p.drop_percent) {
                let queue = self.rng.below(self.p.queues as u64) as usize;
                let node = self.rng.below(self.nodes.len() as u64) as usize;
                self.drop_connection(queue, node);
            }
            // Sometimes a node stops reading one connection.
            if !finished && self.rng.below(1000) < self.p.stall_permille {
                let queue = self.rng.below(self.p.queues as u64) as usize;
                let node = self.rng.below(self.nodes.len() as u64) as usize;
                let timeout = self.p.io_timeout.as_micros() as u64;
                let until = self.now + Duration::from_micros(timeout + self.rng.below(3 * timeout));
                self.schedule(self.now, Event::Stall { queue, node, until });
            }
            let Some(Reverse((at, _, key))) = self.events.pop() else {
                panic!(
                    "simulation stuck: {} outstanding, {} submitted, engines idle: {:?}",
                    self.outstanding.len(),
                    self.submitted,
                    self.engines.iter().map(Engine::is_idle).collect::<Vec<_>>()
                );
            };
            steps += 1;
            assert!(steps < 5_000_000, "simulation runs away");
            self.now = self.now.max(at);
            let Some(event) = self.payloads.remove(&key) else {
                continue;
            };
            match event {
                Event::ToNode { at, bytes } if self.live(at) => self.node_receive(at, bytes),
                // Run late, even for a connection that is gone, unless a
                // newer session fenced it.
                Event::Execute {
                    at,
                    id,
                    op,
                    payload,
                } if !self.past[&at.cid].fenced => self.node_execute(at, id, op, payload),
                Event::ToClient { at, bytes } if self.live(at) => self.client_receive(at, bytes),
                Event::Release { queue, node, tag } => {
                    self.pending_releases[queue][usize::from(tag)] -= 1;
                    self.engines[queue].handle_buffer_released(node, tag);
                }
                Event::ConnectionRestore { queue, node } => self.restore(queue, node),
                Event::Stall { queue, node, until } => {
                    let conn = &mut self.conns[queue][node];
                    if conn.up && !conn.stalled {
                        conn.stalled = true;
                        self.schedule(until, Event::Unstall { queue, node });
                    }
                }
                Event::Unstall { queue, node } => {
                    let conn = &mut self.conns[queue][node];
                    conn.stalled = false;
                    let held = std::mem::take(&mut conn.held);
                    if !held.is_empty() {
                        let at = self.link(queue, node);
                        self.node_receive(at, held);
                    }
                }
                Event::Timer => timer_at = None,
                // Bytes and work of a connection that no longer exists.
                Event::ToNode { .. } | Event::Execute { .. } | Event::ToClient { .. } => {}
            }
        }
        // Whatever the run left unknown is what the nodes hold: late
        // executions have all played out.
        for u in std::mem::take(&mut self.uncertain) {
            self.resync(u.node, u.offset, u.len);
        }
    }

    /// Every node holds exactly its stripes of the model.
    fn check_nodes(&self) {
        for p in self.layout.pieces(0, self.p.size) {
            let held = &self.nodes[p.column].store[p.node_offset as usize..][..p.len as usize];
            let want = &self.model[p.buf_offset as usize..][..p.len as usize];
            assert!(
                held == want,
                "node {} at {} differs from the model",
                p.column,
                p.node_offset
            );
        }
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
                queues: 1 + rng.below(3) as usize,
                fencing: Fencing::DeviceEpochs,
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
            *resent += sim
                .engines
                .iter()
                .map(|e| e.stats().pieces_resent)
                .sum::<u64>();
            *stale += sim
                .engines
                .iter()
                .map(|e| e.stats().stale_replies)
                .sum::<u64>();
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
                queues: 2,
                fencing: Fencing::DeviceEpochs,
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
    deadlines_hold_and_nothing_stale_lands(seeds(200..240), |seed| {
        let mut rng = Rng::new(seed ^ 0x5eed);
        let nodes = [1u32, 2, 3][rng.below(3) as usize];
        Params {
            nodes,
            queues: 1 + rng.below(2) as usize,
            fencing: Fencing::DeviceEpochs,
            stripe_unit: 4096,
            size: 4096 * u64::from(nodes) * 4,
            depth: 1 + rng.below(8) as u16,
            max_io: 16384,
            requests: 400,
            drop_percent: 0,
            dup_percent: 5,
            zero_copy: rng.chance(50),
            io_timeout: Duration::from_millis(50),
            kill_node0_after: None,
            slow_percent: 3,
            stall_permille: 2,
        }
    });
}

/// Runs every seed with `params(seed)`: every request ends within its
/// deadline (plus 5 ms to hand back buffers), and the nodes hold exactly
/// the model at the end (no stale write landed); over all seeds, some
/// requests timed out and some connections were torn down.
fn deadlines_hold_and_nothing_stale_lands(all: Vec<u64>, params: fn(u64) -> Params) {
    let replaying = all.len() == 1;
    let (mut errors, mut aborts) = (0, 0);
    for seed in all {
        let stats = std::panic::AssertUnwindSafe((&mut errors, &mut aborts));
        with_seed(seed, move |seed| {
            let stats = stats;
            let mut sim = Sim::new(seed, params(seed));
            sim.run();
            assert_eq!(sim.completed, sim.p.requests, "nothing hangs");
            assert!(
                sim.max_latency <= sim.p.io_timeout + Duration::from_millis(5),
                "a request took {:?} with a {:?} deadline",
                sim.max_latency,
                sim.p.io_timeout
            );
            sim.check_nodes();
            let (errors, aborts) = stats.0;
            *errors += sim.errors;
            *aborts += sim.engines.iter().map(|e| e.stats().aborts).sum::<u64>();
        });
    }
    if !replaying {
        assert!(errors > 0, "the seeds exercise timeouts");
        assert!(aborts > 0, "the seeds exercise torn-down connections");
    }
}

/// The parameters of the multi-queue scenario: several queues over a few
/// nodes, single connections lost or stalled (a path partitioned for one
/// connection and not another), nodes that run requests late, queues that
/// reconnect at different times.
fn partitioned(seed: u64, fencing: Fencing) -> Params {
    let mut rng = Rng::new(seed ^ 0x9a57);
    let nodes = [1u32, 2, 3][rng.below(3) as usize];
    Params {
        nodes,
        queues: 2 + rng.below(2) as usize,
        fencing,
        stripe_unit: 4096,
        size: 4096 * u64::from(nodes) * 2,
        depth: 1 + rng.below(6) as u16,
        max_io: 8192,
        requests: 400,
        drop_percent: 1,
        dup_percent: 5,
        zero_copy: rng.chance(50),
        io_timeout: Duration::from_millis(50),
        kill_node0_after: None,
        slow_percent: 5,
        stall_permille: 3,
    }
}

/// Issue 21, point 2: with several queues per node, a write that timed out
/// (or was lost) in one queue's connection never lands after a newer write
/// sent through another queue: one fencing epoch per node and device, and
/// no queue sends on an older one.
#[test]
fn several_queues_with_partitioned_connections_never_land_a_stale_write() {
    deadlines_hold_and_nothing_stale_lands(seeds(300..360), |seed| {
        partitioned(seed, Fencing::DeviceEpochs)
    });
}

/// The oracle above is not blind: with each queue fencing only its own
/// older connections (netblk before the device-wide epoch), the same
/// scenario lands a stale write on some seed, and the simulation says so.
#[test]
fn without_the_device_epoch_the_oracle_finds_a_stale_write() {
    let caught = (300..360).find(|&seed| {
        let run = std::panic::catch_unwind(|| {
            let mut sim = Sim::new(seed, partitioned(seed, Fencing::PerQueueSessions));
            sim.run();
            sim.check_nodes();
        });
        // Only the oracle's verdict counts: a read or a node that differs
        // from the model.
        run.err().is_some_and(|panic| {
            panic
                .downcast_ref::<String>()
                .is_some_and(|m| m.contains("differs from the model"))
        })
    });
    assert!(
        caught.is_some(),
        "no seed found the stale write of per-queue sessions"
    );
}

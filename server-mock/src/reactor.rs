//! The node's workers: a few threads, each with an epoll instance, serve
//! every data connection (no thread per connection). A worker reads what a
//! readable connection holds into its buffer, takes every whole frame in
//! it (the handshake first, then requests), and writes the batched replies
//! before it waits again; replies the socket cannot take yet wait for
//! `EPOLLOUT` ([`ReplyWriter`]).
//!
//! Nothing a worker does waits on a client: requests held by a latency or
//! stall fault go to the node's delay thread; a connection that ends waits
//! for its held requests and unsent replies on the worker's ticks, bounded
//! by the drain timeout.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use netblk_protocol::pb::header::Kind;
use tracing::{debug, warn};

use crate::conn::{self, Conn, ConnError};
use crate::exec::Scratch;
use crate::frames::{Fill, FrameReader};
use crate::node::{Broken, Node};
use crate::peer::Peer;
use crate::reply::ReplyWriter;

/// The token of a worker's wake-up eventfd (connection ids start at 1).
const WAKE: u64 = 0;

/// How often a worker looks at deadlines (handshakes, stuck replies) with
/// nothing else to do, and while connections are closing.
const TICK: Duration = Duration::from_millis(100);
const CLOSING_TICK: Duration = Duration::from_millis(5);
const IDLE_TICK: Duration = Duration::from_secs(1);

/// Receive buffers a worker keeps for its connections, at most (a
/// connection holds one only while a frame is partly received).
const POOL_MAX: usize = 8;

/// A worker's idle receive buffers.
#[derive(Default)]
struct Pool(Vec<Vec<u8>>);

/// Reads of one connection per wake-up, at most.
const READS_PER_WAKE: usize = 16;

/// A connection handed to a worker: accepted, TLS done, registered.
pub struct Incoming {
    pub stream: TcpStream,
    pub id: u64,
    pub peer: SocketAddr,
    pub client: Peer,
}

struct Worker {
    epoll: OwnedFd,
    wake: OwnedFd,
    inbox: Mutex<Vec<Incoming>>,
}

/// The node's workers.
pub struct Reactor {
    workers: Vec<Arc<Worker>>,
    next: AtomicUsize,
}

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn epoll_add(epoll: RawFd, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
    let mut event = libc::epoll_event { events, u64: token };
    // SAFETY: epoll_ctl reads `event`, a live local; the caller keeps both
    // descriptors open.
    cvt(unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut event) }).map(|_| ())
}

impl Reactor {
    /// Starts `threads` workers (at least one) serving `node`.
    pub fn start(node: &Arc<Node>, threads: usize) -> io::Result<Reactor> {
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            // SAFETY: plain system calls; the descriptors they return are
            // checked and owned right away.
            let epoll = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
            // SAFETY: `epoll` is a new descriptor nobody else owns.
            let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
            // SAFETY: as above.
            let wake = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
            // SAFETY: `wake` is a new descriptor nobody else owns.
            let wake = unsafe { OwnedFd::from_raw_fd(wake) };
            epoll_add(
                epoll.as_raw_fd(),
                wake.as_raw_fd(),
                libc::EPOLLIN as u32,
                WAKE,
            )?;
            let worker = Arc::new(Worker {
                epoll,
                wake,
                inbox: Mutex::new(Vec::new()),
            });
            let (node, mine) = (Arc::clone(node), Arc::clone(&worker));
            thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || {
                    let _abort = AbortOnPanic;
                    run(&node, &mine)
                })?;
            workers.push(worker);
        }
        Ok(Reactor {
            workers,
            next: AtomicUsize::new(0),
        })
    }

    /// Hands a new data connection to the next worker.
    pub fn add(&self, incoming: Incoming) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        let worker = &self.workers[i];
        worker
            .inbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(incoming);
        worker.wake();
    }
}

impl Worker {
    fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local to the worker's eventfd.
        // A full counter (EAGAIN) still leaves the worker woken.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    fn woken(&self) {
        let mut count = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live local.
        unsafe {
            libc::read(
                self.wake.as_raw_fd(),
                count.as_mut_ptr().cast(),
                count.len(),
            )
        };
    }
}

/// A worker that panics takes the node down (its connections would
/// otherwise hang unanswered, which no client can tell from a slow node).
struct AbortOnPanic;

impl Drop for AbortOnPanic {
    fn drop(&mut self) {
        if thread::panicking() {
            tracing::error!("a worker panicked: the node stops");
            std::process::abort();
        }
    }
}

/// Where a connection is in its life.
enum Phase {
    /// Waiting for its first frame, a handshake, until the deadline.
    Handshake {
        deadline: Instant,
    },
    Serving(Arc<Conn>),
    /// Broken on purpose: bad input left the connection open; whatever
    /// comes is read and ignored until the client closes it.
    Sink,
    /// Ended: takes nothing more; waits (bounded) for its held requests
    /// and unsent replies, then closes.
    Closing {
        conn: Option<Arc<Conn>>,
        deadline: Instant,
    },
}

struct Slot {
    id: u64,
    stream: TcpStream,
    peer: SocketAddr,
    client: Peer,
    reader: FrameReader,
    writer: Arc<ReplyWriter>,
    phase: Phase,
}

fn run(node: &Arc<Node>, worker: &Worker) {
    let epoll = worker.epoll.as_raw_fd();
    let mut slots: HashMap<u64, Slot> = HashMap::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
    let mut scratch = Scratch::default();
    let mut pool = Pool::default();
    let mut last_tick = Instant::now();
    loop {
        let tick = next_tick(&slots);
        // SAFETY: epoll_wait writes at most `events.len()` entries into the
        // live, exclusively borrowed buffer.
        let n = unsafe {
            libc::epoll_wait(
                epoll,
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                tick.map_or(-1, |t| t.as_millis() as libc::c_int),
            )
        };
        let n = if n < 0 { 0 } else { n as usize };
        for event in &events[..n] {
            let (token, flags) = (event.u64, event.events);
            if token == WAKE {
                worker.woken();
                let incoming =
                    std::mem::take(&mut *worker.inbox.lock().unwrap_or_else(|p| p.into_inner()));
                for new in incoming {
                    if let Some(slot) = admit(node, epoll, new) {
                        slots.insert(slot.id, slot);
                    }
                }
                continue;
            }
            let Some(slot) = slots.get_mut(&token) else {
                continue;
            };
            if flags & libc::EPOLLOUT as u32 != 0 {
                slot.writer.flush();
                if slot.writer.held() && !slot.writer.hold_back() {
                    readable(node, slot, &mut scratch, &mut pool);
                }
            }
            if flags & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
                readable(node, slot, &mut scratch, &mut pool);
            }
        }
        if tick.is_some_and(|t| last_tick.elapsed() >= t) {
            last_tick = Instant::now();
            slots.retain(|_, slot| !tick_slot(node, slot));
        }
        if node.stopping() && slots.is_empty() {
            let inbox = worker.inbox.lock().unwrap_or_else(|p| p.into_inner());
            if inbox.is_empty() {
                return;
            }
        }
    }
}

/// How soon the worker must look at its deadlines: often while a
/// connection closes, now and then while one waits for its handshake or
/// has replies waiting, once a second otherwise (replies the delay thread
/// queued meanwhile), never without connections.
fn next_tick(slots: &HashMap<u64, Slot>) -> Option<Duration> {
    let mut tick = (!slots.is_empty()).then_some(IDLE_TICK);
    for slot in slots.values() {
        match slot.phase {
            Phase::Closing { .. } => return Some(CLOSING_TICK),
            Phase::Handshake { .. } => tick = Some(TICK),
            Phase::Serving(_) if slot.writer.pending() => tick = Some(TICK),
            Phase::Serving(_) | Phase::Sink => {}
        }
    }
    tick
}

/// Registers a new connection with this worker's epoll instance.
fn admit(node: &Arc<Node>, epoll: RawFd, new: Incoming) -> Option<Slot> {
    let Incoming {
        stream,
        id,
        peer,
        client,
    } = new;
    debug!(%peer, id, %client, "connection accepted");
    let ready = stream
        .set_nonblocking(true)
        .and_then(|()| stream.set_nodelay(true))
        .and_then(|()| stream.try_clone())
        .and_then(|clone| {
            // The writer's descriptor is the one in the epoll set: the
            // writer changes its interest (epoll keys on the descriptor).
            epoll_add(epoll, clone.as_raw_fd(), libc::EPOLLIN as u32, id).map(|()| clone)
        });
    let clone = match ready {
        Ok(clone) => clone,
        Err(err) => {
            warn!(%peer, "cannot serve a new connection: {err}");
            let _ = stream.shutdown(std::net::Shutdown::Both);
            node.unregister(id);
            return None;
        }
    };
    Some(Slot {
        id,
        writer: Arc::new(ReplyWriter::new(
            clone,
            epoll,
            id,
            node.config.reply_backlog,
        )),
        stream,
        peer,
        client,
        reader: FrameReader::new(node),
        phase: Phase::Handshake {
            deadline: Instant::now() + node.config.handshake_timeout,
        },
    })
}

/// Takes what a readable connection holds: every whole frame already
/// received, then reads and takes frames until the socket has nothing
/// more (at most [`READS_PER_WAKE`] reads: one busy connection does not
/// starve the others, epoll reports it again); then writes the replies
/// batched meanwhile.
fn readable(node: &Arc<Node>, slot: &mut Slot, scratch: &mut Scratch, pool: &mut Pool) {
    slot.reader.adopt(|| pool.0.pop());
    serve_readable(node, slot, scratch);
    if let Some(buf) = slot.reader.give_back()
        && pool.0.len() < POOL_MAX
    {
        pool.0.push(buf);
    }
}

fn serve_readable(node: &Arc<Node>, slot: &mut Slot, scratch: &mut Scratch) {
    if matches!(slot.phase, Phase::Sink) {
        let mut sink = [0u8; 4096];
        loop {
            match std::io::Read::read(&mut &slot.stream, &mut sink) {
                Ok(0) => return end(node, slot, Ok(())),
                Ok(_) => continue,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) => return end(node, slot, Err(err.into())),
            }
        }
    }
    let result = take_frames(node, slot, scratch).and_then(|()| {
        for _ in 0..READS_PER_WAKE {
            if slot.writer.held() {
                break;
            }
            match slot.reader.fill(&slot.stream)? {
                Fill::Eof => return Err(ConnError::Io(io::ErrorKind::UnexpectedEof.into())),
                Fill::WouldBlock => break,
                Fill::Got { drained } => {
                    take_frames(node, slot, scratch)?;
                    if drained {
                        break;
                    }
                }
            }
        }
        Ok(())
    });
    match result {
        Ok(()) => slot.writer.flush(),
        // A clean end of stream between frames.
        Err(ConnError::Io(err)) if err.kind() == io::ErrorKind::UnexpectedEof => {
            end(node, slot, Ok(()))
        }
        Err(err) => end(node, slot, Err(err)),
    }
}

/// Takes every whole frame in the connection's buffer, while it serves.
fn take_frames(node: &Arc<Node>, slot: &mut Slot, scratch: &mut Scratch) -> Result<(), ConnError> {
    loop {
        if !matches!(slot.phase, Phase::Handshake { .. } | Phase::Serving(_)) {
            return Ok(());
        }
        // A client that does not read its replies gets no more of them
        // until it does: bounded memory, whatever it sends.
        if slot.writer.hold_back() {
            return Ok(());
        }
        let Some((header, range)) = slot.reader.decode()? else {
            return Ok(());
        };
        match &slot.phase {
            Phase::Handshake { .. } => {
                let conn = match header.kind {
                    Some(Kind::Handshake(handshake)) => conn::open(
                        node,
                        &slot.stream,
                        slot.id,
                        handshake,
                        slot.client.clone(),
                        &slot.writer,
                    )?,
                    Some(Kind::Inquiry(inquiry)) => {
                        let reply = crate::inquiry::answer(node, &inquiry, &slot.client);
                        slot.writer.send_header(
                            node,
                            &netblk_protocol::pb::Header {
                                kind: Some(Kind::InquiryReply(reply)),
                            },
                        );
                        return Err(ConnError::Answered);
                    }
                    Some(Kind::Admin(_)) => {
                        return Err(ConnError::Violation(
                            "admin requests are not accepted on the data port (only on the node's --admin-listen address)"
                                .into(),
                        ));
                    }
                    other => {
                        return Err(ConnError::Violation(format!(
                            "expected a handshake first, got {}",
                            conn::kind_name(other.as_ref())
                        )));
                    }
                };
                slot.reader.limits.header_digest = conn.digest;
                slot.phase = Phase::Serving(conn);
            }
            Phase::Serving(conn) => {
                let request = match header.kind {
                    Some(Kind::Request(request)) => request,
                    other => {
                        return Err(ConnError::Violation(format!(
                            "expected a request, got {}",
                            conn::kind_name(other.as_ref())
                        )));
                    }
                };
                let payload = slot.reader.payload(range);
                conn::take_request(conn, request, payload, scratch)?;
            }
            Phase::Sink | Phase::Closing { .. } => return Ok(()),
        }
    }
}

/// The connection ended (`result` says how): counted and logged, then it
/// takes nothing more and closes once its held requests and replies are
/// done ([`tick_slot`]).
fn end(node: &Arc<Node>, slot: &mut Slot, result: Result<(), ConnError>) {
    if !matches!(
        slot.phase,
        Phase::Handshake { .. } | Phase::Serving(_) | Phase::Sink
    ) {
        return;
    }
    let bad_input = log_once(node, slot, &result);
    if bad_input && node.breaks(Broken::KeepBadConnections) && !matches!(slot.phase, Phase::Sink) {
        slot.phase = Phase::Sink;
        return;
    }
    let conn = match &slot.phase {
        Phase::Serving(conn) => Some(Arc::clone(conn)),
        _ => None,
    };
    slot.phase = Phase::Closing {
        conn,
        deadline: Instant::now() + node.config.drain_timeout,
    };
    slot.writer.stop_reading();
    slot.writer.flush();
}

/// Logs why the connection ended, unless the Sink already did.
fn log_once(node: &Node, slot: &Slot, result: &Result<(), ConnError>) -> bool {
    if matches!(slot.phase, Phase::Sink) {
        return false;
    }
    conn::log_end(node, slot.peer, slot.id, result)
}

/// Deadlines and closing, now and then. True when the slot is done.
fn tick_slot(node: &Arc<Node>, slot: &mut Slot) -> bool {
    match &slot.phase {
        Phase::Handshake { deadline } if Instant::now() >= *deadline => {
            let timeout = node.config.handshake_timeout;
            end(node, slot, Err(ConnError::HandshakeTimeout(timeout)));
            false
        }
        Phase::Serving(_)
            if slot
                .writer
                .stuck_for()
                .is_some_and(|d| d >= node.config.write_timeout) =>
        {
            let stuck = io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client read none of its replies for {:?}",
                    node.config.write_timeout
                ),
            );
            end(node, slot, Err(stuck.into()));
            false
        }
        Phase::Closing { conn, deadline } => {
            slot.writer.flush();
            let held = conn.as_ref().map_or(0, |c| c.delayed());
            // Unsent replies of a failed connection are dropped: not pending.
            let done = (held == 0 && !slot.writer.pending()) || Instant::now() >= *deadline;
            if done {
                if let Some(conn) = conn {
                    conn.leave();
                }
                slot.writer.close();
                node.unregister(slot.id);
            }
            done
        }
        _ => false,
    }
}

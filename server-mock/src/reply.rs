//! The sending half of a data connection, shared by its worker and the
//! node's delay thread. The socket never blocks: replies are batched while
//! the worker takes requests off the socket and written when it runs out of
//! them; a large read payload goes out with its header (and the batch) in
//! one `writev` straight from where the store put it, and only what the
//! socket did not take is copied, to be sent when it is writable again
//! (the worker's epoll interest follows what is pending).

use std::io::{self, IoSlice, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use netblk_protocol::pb;
use netblk_protocol::{encode_head, encode_head_as};
use tracing::{debug, info, warn};

use crate::node::{Node, bump};

/// Replies batched before they are written, bytes.
const REPLY_BATCH: usize = 256 << 10;

/// Payloads at least this large are written from where they are, not
/// through the batch.
const DIRECT_WRITE_MIN: usize = 32 << 10;

pub struct ReplyWriter {
    out: Mutex<Out>,
    stream: TcpStream,
    /// Replies carry a header digest (the connection has data digests).
    digest: AtomicBool,
    /// The worker's epoll instance and this connection's token in it.
    epoll: RawFd,
    token: u64,
    /// Unsent reply bytes above which the worker takes no more requests
    /// from the connection until the client reads its replies.
    backlog: usize,
}

struct Out {
    pending: Vec<u8>,
    /// Bytes of `pending` already written.
    sent: usize,
    /// The epoll events asked for now.
    mask: u32,
    /// The worker takes requests (off while closing).
    reading: bool,
    /// Still in the worker's epoll set.
    registered: bool,
    /// The worker holds requests back until the backlog drains: it must
    /// hear when it has, whoever drains it (see [`ReplyWriter::hold_back`]).
    held: bool,
    /// A write failed: nothing more is sent.
    failed: bool,
    /// Since when replies wait for the socket with no progress.
    stuck_since: Option<Instant>,
    /// Times the epoll interest was changed.
    rearms: u64,
}

impl Out {
    fn unsent(&self) -> usize {
        self.pending.len() - self.sent
    }
}

/// Writes what `parts` hold, as much as the socket takes now; returns the
/// bytes written (fewer than all when it would block).
fn write_now(stream: &TcpStream, parts: &[&[u8]]) -> io::Result<usize> {
    let mut slices: Vec<IoSlice<'_>> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| IoSlice::new(p))
        .collect();
    let mut slices = &mut slices[..];
    let mut written = 0;
    while !slices.is_empty() {
        match (&*stream).write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                written += n;
                IoSlice::advance_slices(&mut slices, n);
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
            Err(err) => return Err(err),
        }
    }
    Ok(written)
}

impl ReplyWriter {
    /// The writer of `stream` (non-blocking), registered in `epoll` as
    /// `token` with `EPOLLIN` by the caller; requests wait while more than
    /// `backlog` reply bytes are unsent.
    pub fn new(stream: TcpStream, epoll: RawFd, token: u64, backlog: usize) -> Self {
        ReplyWriter {
            out: Mutex::new(Out {
                pending: Vec::new(),
                sent: 0,
                mask: libc::EPOLLIN as u32,
                reading: true,
                registered: true,
                held: false,
                failed: false,
                stuck_since: None,
                rearms: 0,
            }),
            stream,
            digest: AtomicBool::new(false),
            epoll,
            token,
            backlog,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Out> {
        self.out.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// From the next reply on, frames carry a header digest.
    pub fn set_digest(&self, on: bool) {
        self.digest.store(on, Ordering::Release);
    }

    /// A handshake reply (never with a header digest), sent at once.
    pub fn send_header(&self, node: &Node, header: &pb::Header) {
        let mut head = Vec::with_capacity(128);
        if let Err(err) = encode_head(header, 0, &mut head) {
            warn!("cannot encode a handshake reply: {err}");
            self.fail();
            return;
        }
        self.queue(node, &head, &[], 0, true);
    }

    /// Sends `reply` with its payload in `parts`: batched unless `flush` or
    /// the batch is full. A reply-corruption fault may flip a byte of it.
    pub fn send(&self, node: &Node, reply: pb::Reply, parts: &[&[u8]], flush: bool) {
        let payload_len = parts.iter().map(|p| p.len()).sum();
        let mut head = Vec::with_capacity(64);
        if let Err(err) = encode_head_as(
            &pb::Header::reply(reply),
            payload_len,
            self.digest.load(Ordering::Acquire),
            &mut head,
        ) {
            warn!("cannot encode a reply: {err}");
            self.fail();
            return;
        }
        let mut corrupted_payload = None;
        if let Some(corruption) = node.faults.take_corrupt(&head, payload_len, &node.limits) {
            // Rare (a fault): the payload is gathered into one copy first.
            corrupted_payload = corruption.apply(&mut head, &parts.concat());
            bump(&node.counters.corrupted_replies, 1);
            info!(
                part = ?corruption.part,
                at = corruption.at,
                mask = corruption.mask,
                "corrupting a reply frame (fault)"
            );
        }
        let corrupted = [corrupted_payload.as_deref().unwrap_or_default()];
        let parts = if corrupted_payload.is_some() {
            &corrupted[..]
        } else {
            parts
        };
        self.queue(node, &head, parts, payload_len, flush);
    }

    fn queue(&self, node: &Node, head: &[u8], parts: &[&[u8]], payload_len: usize, flush: bool) {
        let mut out = self.lock();
        if out.failed {
            return;
        }
        bump(&node.counters.wire_out, (head.len() + payload_len) as u64);
        if payload_len >= DIRECT_WRITE_MIN {
            // The batch, the header and the data in one writev; only what
            // the socket does not take now is copied.
            let written = {
                let mut all: Vec<&[u8]> = Vec::with_capacity(parts.len() + 2);
                all.push(&out.pending[out.sent..]);
                all.push(head);
                all.extend_from_slice(parts);
                match write_now(&self.stream, &all) {
                    Ok(n) => n,
                    Err(err) => return self.failed(&mut out, &err),
                }
            };
            let before = out.unsent();
            let mut skip = if written >= before {
                out.pending.clear();
                out.sent = 0;
                written - before
            } else {
                out.sent += written;
                0
            };
            for part in std::iter::once(head).chain(parts.iter().copied()) {
                let keep = &part[skip.min(part.len())..];
                skip = skip.saturating_sub(part.len());
                out.pending.extend_from_slice(keep);
            }
            self.progress(&mut out, written > 0);
        } else {
            out.pending.extend_from_slice(head);
            for part in parts {
                out.pending.extend_from_slice(part);
            }
            if !flush && out.unsent() < REPLY_BATCH {
                // Batched: whoever queued it without `flush` flushes once
                // its batch is done (the worker, after each wake-up), and
                // arms epoll then. Arming now would ask for writability
                // only to take it back at that flush: two `epoll_ctl`s per
                // request at depth 1.
                return;
            }
            self.write_pending(&mut out);
        }
        self.arm(&mut out);
    }

    /// Writes what is batched, as far as the socket takes it.
    pub fn flush(&self) {
        let mut out = self.lock();
        if out.failed {
            return;
        }
        self.write_pending(&mut out);
        self.arm(&mut out);
    }

    fn write_pending(&self, out: &mut Out) {
        if out.unsent() == 0 {
            return;
        }
        let written = match write_now(&self.stream, &[&out.pending[out.sent..]]) {
            Ok(n) => n,
            Err(err) => return self.failed(out, &err),
        };
        out.sent += written;
        self.progress(out, written > 0);
    }

    /// Keeps the buffer short and notes whether the socket took anything.
    fn progress(&self, out: &mut Out, moved: bool) {
        if out.unsent() == 0 {
            out.pending.clear();
            out.sent = 0;
            out.stuck_since = None;
            if out.pending.capacity() > 2 * REPLY_BATCH {
                out.pending.shrink_to(REPLY_BATCH);
            }
        } else if moved || out.stuck_since.is_none() {
            out.stuck_since = Some(Instant::now());
        }
    }

    fn failed(&self, out: &mut Out, err: &io::Error) {
        debug!("reply not sent, closing: {err}");
        out.failed = true;
        out.pending.clear();
        out.sent = 0;
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    fn fail(&self) {
        let mut out = self.lock();
        self.failed(&mut out, &io::Error::other("encoding failed"));
    }

    /// Asks epoll for what the connection needs now: requests while it
    /// reads and replies do not pile up, writability while replies wait.
    fn arm(&self, out: &mut Out) {
        if !out.registered {
            return;
        }
        let mut mask = 0u32;
        if out.reading && !out.failed && out.unsent() < self.backlog {
            mask |= libc::EPOLLIN as u32;
        }
        // Writability while replies wait, and while the worker holds
        // requests back: a flush that drains the backlog at once (the
        // worker's own, or the delay thread's) leaves nothing to wait for,
        // and the socket, writable, reports it at the next wait.
        if (out.unsent() > 0 || out.held) && !out.failed {
            mask |= libc::EPOLLOUT as u32;
        }
        if mask == out.mask {
            return;
        }
        let mut event = libc::epoll_event {
            events: mask,
            u64: self.token,
        };
        // SAFETY: epoll_ctl reads `event`, a live local; both descriptors
        // stay open while this writer exists (the worker owns the epoll
        // instance for the life of the process, `self.stream` the socket).
        let rc = unsafe {
            libc::epoll_ctl(
                self.epoll,
                libc::EPOLL_CTL_MOD,
                self.stream.as_raw_fd(),
                &mut event,
            )
        };
        if rc == 0 {
            out.mask = mask;
            out.rearms += 1;
        } else {
            debug!("epoll interest not changed: {}", io::Error::last_os_error());
        }
    }

    /// The worker takes no more requests from this connection and leaves
    /// its epoll set; replies still go out when [`ReplyWriter::flush`]ed.
    pub fn stop_reading(&self) {
        let mut out = self.lock();
        out.reading = false;
        if out.registered {
            out.registered = false;
            // SAFETY: EPOLL_CTL_DEL ignores the event pointer (null is
            // allowed since Linux 2.6.9); the descriptors are open.
            unsafe {
                libc::epoll_ctl(
                    self.epoll,
                    libc::EPOLL_CTL_DEL,
                    self.stream.as_raw_fd(),
                    std::ptr::null_mut(),
                );
            }
        }
    }

    /// Whether the worker must hold the connection's requests back now:
    /// so many replies wait for the client to read them that no more
    /// requests should be taken. While it does, the connection stays
    /// in the epoll set for writability even once nothing is left to write,
    /// so that the worker comes back for the requests it held.
    pub fn hold_back(&self) -> bool {
        let mut out = self.lock();
        let held = !out.failed && out.unsent() >= self.backlog;
        if held != out.held {
            out.held = held;
            self.arm(&mut out);
        }
        held
    }

    /// Whether the worker holds the connection's requests back (as the
    /// last [`ReplyWriter::hold_back`] said).
    pub fn held(&self) -> bool {
        self.lock().held
    }

    /// Whether replies wait to be written (and could still be).
    pub fn pending(&self) -> bool {
        let out = self.lock();
        !out.failed && out.unsent() > 0
    }

    /// How long replies have waited for the client to read them without
    /// any progress.
    pub fn stuck_for(&self) -> Option<Duration> {
        self.lock().stuck_since.map(|since| since.elapsed())
    }

    /// Ends the connection both ways.
    pub fn close(&self) {
        let mut out = self.lock();
        out.failed = true;
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::os::fd::{FromRawFd, OwnedFd};

    use super::*;
    use crate::node::{Config, Server};
    use crate::store::StoreKind;

    /// A node (unstarted) whose counters and faults the writer uses.
    fn server() -> Server {
        Server::bind(Config::new(
            "127.0.0.1:0".parse().expect("addr"),
            StoreKind::Memory,
        ))
        .expect("bind")
    }

    fn writer() -> (ReplyWriter, TcpStream, OwnedFd) {
        writer_with_backlog(8 << 20)
    }

    /// A writer on the node side of a fresh loopback connection, in an
    /// epoll instance of its own; the client side and the instance too.
    fn writer_with_backlog(backlog: usize) -> (ReplyWriter, TcpStream, OwnedFd) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (stream, _) = listener.accept().expect("accept");
        stream.set_nonblocking(true).expect("nonblocking");
        // SAFETY: epoll_create1 takes a flag; the result is checked before
        // it is owned.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(fd >= 0, "epoll_create1");
        // SAFETY: a fresh descriptor nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: 7,
        };
        // SAFETY: `event` is a live local; both descriptors are open.
        let rc = unsafe {
            libc::epoll_ctl(
                epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                stream.as_raw_fd(),
                &mut event,
            )
        };
        assert_eq!(rc, 0, "epoll_ctl add");
        (
            ReplyWriter::new(stream, epoll.as_raw_fd(), 7, backlog),
            client,
            epoll,
        )
    }

    #[test]
    fn one_request_at_a_time_leaves_the_epoll_interest_alone() {
        let server = server();
        let node = server.node();
        let (writer, mut client, _epoll) = writer();
        let data = [5u8; 4096];
        for id in 0..100 {
            // As the worker does: the reply batched, the batch flushed.
            let reply = pb::Reply {
                id,
                ..Default::default()
            };
            writer.send(node, reply, &[&data], false);
            writer.flush();
            assert!(!writer.pending(), "reply {id} not written at the flush");
        }
        assert_eq!(writer.lock().rearms, 0, "epoll interest changed per reply");
        // A reply the socket cannot take asks for writability, and gives it
        // back once the client read it all.
        let big = vec![1u8; 8 << 20];
        writer.send(node, pb::Reply::default(), &[&big], false);
        assert!(writer.pending());
        assert_eq!(
            writer.lock().mask & libc::EPOLLOUT as u32,
            libc::EPOLLOUT as u32
        );
        client
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let mut sink = vec![0u8; 1 << 20];
        let deadline = Instant::now() + Duration::from_secs(10);
        while writer.pending() && Instant::now() < deadline {
            let _ = io::Read::read(&mut client, &mut sink);
            writer.flush();
        }
        assert!(!writer.pending(), "the big reply never went out");
        assert_eq!(writer.lock().mask, libc::EPOLLIN as u32);
    }

    /// While the worker holds requests back, the connection asks for
    /// writability even after a flush wrote everything: that event is how
    /// the worker comes back for the requests it held.
    #[test]
    fn a_held_connection_asks_for_writability_until_the_worker_takes_it_back() {
        let server = server();
        let node = server.node();
        let (writer, _client, _epoll) = writer_with_backlog(64 << 10);
        let data = [5u8; 4096];
        let out = libc::EPOLLOUT as u32;
        for id in 0..20 {
            let reply = pb::Reply {
                id,
                ..Default::default()
            };
            writer.send(node, reply, &[&data], false);
        }
        assert!(writer.hold_back(), "80 KiB batched over a 64 KiB backlog");
        writer.flush();
        assert!(!writer.pending(), "the socket took the batch");
        assert_eq!(
            writer.lock().mask & out,
            out,
            "nothing to write, still held"
        );
        assert!(!writer.hold_back());
        assert_eq!(writer.lock().mask, libc::EPOLLIN as u32);
    }
}

//! The per-queue io_uring driver: thin glue that moves bytes and time in and
//! out of the [`Engine`].
//!
//! One thread per queue, one ring per thread; the ring owns one TCP
//! connection per node. Request buffers ([`TagBuffers`]) are registered as
//! fixed buffers, one per tag (buffer index = tag). Write payloads go out with
//! `IORING_OP_SEND_ZC` from the fixed buffer, the header linked before it;
//! a buffer is handed back to the engine only at the zero-copy notification.
//! Read replies: the header is received into the connection's buffer, the
//! payload straight into the request buffer at its offset.
//!
//! All `unsafe` of the client's data path lives here.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use netblk_protocol::PREAMBLE_LEN;

use crate::engine::{Completion, Engine, Tag};
use crate::layout::Layout;
use crate::recv::{DIRECT_RECV_MIN, RecvMode, ReplyReader};

/// How write payloads leave the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendMode {
    /// `IORING_OP_SEND_ZC` from the registered buffer.
    ZeroCopy,
    /// Plain `IORING_OP_SEND`: the kernel copies (for comparison, and TLS later).
    Copy,
}

impl std::fmt::Display for SendMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SendMode::ZeroCopy => "zc",
            SendMode::Copy => "copy",
        })
    }
}

/// Where request data lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferMode {
    /// In [`TagBuffers`], registered as the ring's fixed buffers.
    User,
    /// In the block request's own pages, which the ublk driver registers in
    /// the ring's (sparse) buffer table at index = tag (`UBLK_F_AUTO_BUF_REG`).
    /// Userspace cannot touch them: payloads go out with `SEND_ZC` and come
    /// in with a receive into the fixed buffer (`recv_fixed`, Linux 7.2+) or
    /// `READ_FIXED` on the socket.
    Kernel { recv_fixed: bool },
}

/// One buffer per tag, in one anonymous mapping allocated at start-up.
///
/// Ownership protocol: a tag's buffer belongs either to the frontend (no IO
/// in flight: it fills or drains it) or to the queue thread and the kernel
/// (from submission until the engine completes the request). The tag itself
/// is the token passed between them.
pub struct TagBuffers {
    base: NonNull<u8>,
    len: usize,
    tag_size: usize,
    depth: u16,
}

// SAFETY: the mapping is plain memory that lives as long as the value; who
// may touch which tag's bytes is governed by the ownership protocol above,
// which hands a tag to one thread at a time through channels (which order
// the memory accesses).
unsafe impl Send for TagBuffers {}
// SAFETY: as for Send: shared references only give out raw pointers, and
// the unsafe accessors require the caller to own the tag.
unsafe impl Sync for TagBuffers {}

impl TagBuffers {
    /// `depth` buffers of `tag_size` bytes each.
    pub fn new(depth: u16, tag_size: u32) -> io::Result<TagBuffers> {
        let tag_size = tag_size as usize;
        let len = usize::from(depth)
            .checked_mul(tag_size)
            .filter(|len| *len > 0)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad buffer geometry"))?;
        // SAFETY: an anonymous private mapping with no address hint touches no
        // existing memory; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "mmap returned null"))?;
        Ok(TagBuffers {
            base,
            len,
            tag_size,
            depth,
        })
    }

    pub fn depth(&self) -> u16 {
        self.depth
    }

    /// Start of `tag`'s buffer.
    pub fn tag_ptr(&self, tag: Tag) -> *mut u8 {
        assert!(tag < self.depth, "tag {tag} beyond depth {}", self.depth);
        // SAFETY: tag < depth, so the offset stays inside the mapping.
        unsafe { self.base.as_ptr().add(usize::from(tag) * self.tag_size) }
    }

    /// Start of `len` bytes at `offset` in `tag`'s buffer.
    ///
    /// # Panics
    /// If the range is not inside the buffer.
    pub fn slice_ptr(&self, tag: Tag, offset: u32, len: u32) -> *mut u8 {
        let end = offset as usize + len as usize;
        assert!(end <= self.tag_size, "{offset}+{len} beyond the tag buffer");
        // SAFETY: offset <= end <= tag_size: inside this tag's buffer.
        unsafe { self.tag_ptr(tag).add(offset as usize) }
    }

    /// The whole of `tag`'s buffer.
    ///
    /// # Safety
    /// The caller owns `tag` (see the type's docs): no IO on it is in flight
    /// and no other reference to its bytes exists while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn tag_slice(&self, tag: Tag) -> &mut [u8] {
        // SAFETY: the pointer and length stay inside the mapping; exclusive
        // access is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.tag_ptr(tag), self.tag_size) }
    }

    fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.depth)
            .map(|tag| libc::iovec {
                iov_base: self.tag_ptr(tag).cast(),
                iov_len: self.tag_size,
            })
            .collect()
    }
}

impl Drop for TagBuffers {
    fn drop(&mut self) {
        // SAFETY: base/len are exactly what mmap returned; nothing refers to
        // the mapping any more (the rings that registered it are gone first).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// An eventfd that wakes a queue thread from another thread.
pub struct Doorbell(OwnedFd);

impl Doorbell {
    pub fn new() -> io::Result<Doorbell> {
        // SAFETY: eventfd takes integers and returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        Ok(Doorbell(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Wakes the queue thread.
    pub fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd. A full
        // counter (EAGAIN) means the thread is being woken anyway.
        unsafe {
            libc::write(
                self.0.as_raw_fd(),
                (&raw const one).cast(),
                std::mem::size_of::<u64>(),
            );
        }
    }

    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Where a queue's block requests come from and where they complete: the
/// seam between the driver and a frontend (in-process, generator, ublk).
pub trait Frontend {
    /// Hands new requests to the engine. Returns false once the frontend has
    /// no more to give: the queue then stops as soon as the engine is idle.
    fn poll(&mut self, engine: &mut Engine, buffers: &TagBuffers, now: Instant) -> bool;
    /// A request finished; its tag and buffer belong to the frontend again.
    fn complete(&mut self, completion: Completion, buffers: &TagBuffers);
    /// A descriptor whose readability means "call poll": the driver keeps a
    /// read posted on it.
    fn wake_fd(&self) -> Option<RawFd> {
        None
    }
    /// The queue failed and its ring is gone; `tags` were in flight.
    fn fail(&mut self, tags: &[Tag]);
    /// Operations of the frontend's own (ublk commands) to submit on the
    /// queue's ring. Their user data must come from [`frontend_user_data`],
    /// and any memory they point at must stay valid until their completion
    /// reaches [`Frontend::on_cqe`].
    fn take_sqes(&mut self, _out: &mut Vec<squeue::Entry>) {}
    /// The completion of one of the frontend's own operations.
    fn on_cqe(&mut self, _detail: u64, _result: i32, _engine: &mut Engine, _now: Instant) {}
}

/// User data for a frontend's own operation; `detail` (40 bits) comes back
/// in [`Frontend::on_cqe`].
pub fn frontend_user_data(detail: u64) -> u64 {
    user_data(K_FRONTEND, 0, detail)
}

/// Sets `SO_ZEROCOPY` on a socket, so the kernel may send from user pages.
pub fn enable_zerocopy(socket: &TcpStream) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live c_int;
    // the descriptor belongs to `socket`, open for the whole call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ZEROCOPY,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether this kernel's plain `RECV` honours `IORING_RECVSEND_FIXED_BUF`
/// (Linux 7.2+): tried for real on a socketpair with a registered buffer.
pub fn probe_recv_fixed() -> bool {
    let attempt = || -> io::Result<bool> {
        let (a, b) = std::os::unix::net::UnixStream::pair()?;
        // Declared before the ring, so dropped after it on every path.
        let mut buf = vec![0u8; 4096];
        let mut ring = IoUring::new(4)?;
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: `buf` is declared before the ring, so it outlives the ring
        // (and with it the registration) on every path out of this closure.
        unsafe { ring.submitter().register_buffers(&iov)? };
        std::io::Write::write_all(&mut &a, b"netblk")?;
        let entry = opcode::Recv::new(types::Fd(b.as_raw_fd()), buf.as_mut_ptr(), 6)
            .ioprio(IORING_RECVSEND_FIXED_BUF)
            .buf_group(0)
            .build()
            .user_data(1);
        // SAFETY: the entry points into `buf`, registered above and alive
        // until the ring is gone; we wait for the completion below.
        unsafe { ring.submission().push(&entry) }.map_err(|_| io::Error::other("sq full"))?;
        ring.submit_and_wait(1)?;
        let res = ring.completion().next().map_or(-1, |c| c.result());
        drop(ring);
        Ok(res == 6 && &buf[..6] == b"netblk")
    };
    attempt().unwrap_or(false)
}

/// Checks that this kernel's io_uring has what `mode` needs.
pub fn probe(mode: SendMode) -> io::Result<()> {
    let ring = IoUring::new(8)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    let needed: &[(u8, &str)] = match mode {
        SendMode::ZeroCopy => &[
            (opcode::Send::CODE, "SEND"),
            (opcode::SendZc::CODE, "SEND_ZC"),
            (opcode::Recv::CODE, "RECV"),
        ],
        SendMode::Copy => &[(opcode::Send::CODE, "SEND"), (opcode::Recv::CODE, "RECV")],
    };
    for (code, name) in needed {
        if !probe.is_supported(*code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("this kernel's io_uring lacks IORING_OP_{name} (needed for {mode} mode)"),
            ));
        }
    }
    Ok(())
}

// user_data: kind in the top byte, connection index below it, detail below that.
const K_HEAD: u64 = 1;
const K_DATA: u64 = 2;
const K_RECV: u64 = 3;
const K_RECV_PAYLOAD: u64 = 4;
const K_WAKE: u64 = 5;
const K_CANCEL: u64 = 6;
const K_FRONTEND: u64 = 7;

/// `IORING_RECVSEND_FIXED_BUF`: the receive's buffer is a registered one.
const IORING_RECVSEND_FIXED_BUF: u16 = 1 << 2;

/// The connection field of user data: node index (12 bits) and the
/// connection's generation (4 bits), so that a completion from a connection
/// that was replaced is never taken for one of its successor's.
fn conn_id(node: usize, generation: u8) -> usize {
    (usize::from(generation & 0xf) << 12) | (node & 0xfff)
}

fn user_data(kind: u64, conn: usize, detail: u64) -> u64 {
    (kind << 56) | ((conn as u64 & 0xffff) << 40) | (detail & 0xff_ffff_ffff)
}

fn split_user_data(ud: u64) -> (u64, usize, u64) {
    (
        ud >> 56,
        ((ud >> 40) & 0xffff) as usize,
        ud & 0xff_ffff_ffff,
    )
}

/// Most transmits in one linked send chain.
const MAX_CHAIN: usize = 32;
/// Receive buffer per connection: headers and small payloads.
const RECV_BUF: usize = 256 << 10;
/// How much to receive into the connection buffer when a header (and a large
/// payload) is expected next: a preamble and the largest header.
const HEADER_RECV: usize = PREAMBLE_LEN + netblk_protocol::MAX_HEADER_LEN as usize;

struct Conn {
    stream: TcpStream,
    fd: RawFd,
    /// Handshake session of this connection; grows with each reconnect.
    session: u64,
    /// Bumped when the connection is replaced (see `conn_id`).
    generation: u8,
    /// While lost: when the next reconnect may start, and the wait after it.
    next_attempt: Instant,
    backoff: Duration,
    connecting: bool,
    /// Head bytes of the send chain in flight; kept alive until it completes.
    heads: Vec<Vec<u8>>,
    /// CQEs (other than notifications) the chain still owes.
    chain_left: u32,
    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    reader: ReplyReader,
    recv_posted: bool,
    /// Operations the kernel still holds, notifications included.
    ops: u32,
    broken: bool,
    lost_reported: bool,
}

/// One queue's driver; see the module docs.
pub struct QueueDriver<F: Frontend> {
    // Declared first: dropped before the buffers it has registered.
    ring: IoUring,
    engine: Engine,
    conns: Vec<Conn>,
    buffers: Arc<TagBuffers>,
    frontend: F,
    mode: SendMode,
    buffer_mode: BufferMode,
    wake_buf: Box<u64>,
    wake_posted: bool,
    frontend_sqes: Vec<squeue::Entry>,
    reconnect: Option<Reconnect>,
    reconnected: (Sender<Reconnected>, Receiver<Reconnected>),
}

/// How a queue re-establishes a lost node connection (in the background,
/// with a bounded exponential backoff); in-flight pieces are sent again
/// once it is back.
#[derive(Debug, Clone)]
pub struct Reconnect {
    pub addrs: Vec<SocketAddr>,
    pub layout: Layout,
    pub client_id: String,
    /// The session the first connections were made with.
    pub session: u64,
    pub volume: String,
    /// For one connect + handshake.
    pub timeout: Duration,
}

/// A reconnect attempt's outcome: node, session, the new connection.
type Reconnected = (usize, u64, Result<TcpStream, String>);

const RECONNECT_MIN: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(2);

/// Everything a queue is made of: its engine, one connected socket per node
/// (in node order), its tag buffers, where its requests come from, how data
/// moves, and how it reconnects (`None`: a lost node stays lost).
pub struct QueueParts<F> {
    pub engine: Engine,
    pub streams: Vec<TcpStream>,
    pub buffers: Arc<TagBuffers>,
    pub frontend: F,
    pub mode: SendMode,
    pub buffer_mode: BufferMode,
    pub reconnect: Option<Reconnect>,
}

impl<F: Frontend> QueueDriver<F> {
    /// Makes the ring (call this on the thread that will run it) and
    /// registers the buffers.
    pub fn new(parts: QueueParts<F>) -> io::Result<QueueDriver<F>> {
        let QueueParts {
            engine,
            streams,
            buffers,
            frontend,
            mode,
            buffer_mode,
            reconnect,
        } = parts;
        let entries = (4 * MAX_CHAIN as u32 * streams.len() as u32)
            .clamp(64, 4096)
            .next_power_of_two();
        // Deferred task work (6.1+): completions are processed when this
        // thread asks for them, in batches, instead of interrupting it.
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries)
            .or_else(|_| {
                IoUring::builder()
                    .setup_single_issuer()
                    .setup_coop_taskrun()
                    .build(entries)
            })
            .or_else(|_| IoUring::new(entries))?;
        match buffer_mode {
            BufferMode::User => {
                let iovecs = buffers.iovecs();
                // SAFETY: the iovecs describe the buffer mapping, which `buffers`
                // keeps alive for longer than the ring (the ring is dropped
                // first, and the shutdown path waits for every operation
                // before that).
                unsafe { ring.submitter().register_buffers(&iovecs)? };
            }
            BufferMode::Kernel { .. } => {
                ring.submitter()
                    .register_buffers_sparse(buffers.depth().into())?;
            }
        }
        let first_session = reconnect.as_ref().map_or(1, |r| r.session);
        let conns = streams
            .into_iter()
            .map(|stream| Conn {
                fd: stream.as_raw_fd(),
                stream,
                session: first_session,
                generation: 0,
                next_attempt: Instant::now(),
                backoff: RECONNECT_MIN,
                connecting: false,
                heads: Vec::with_capacity(MAX_CHAIN),
                chain_left: 0,
                rbuf: vec![0u8; RECV_BUF].into_boxed_slice(),
                rstart: 0,
                rend: 0,
                reader: ReplyReader::new(),
                recv_posted: false,
                ops: 0,
                broken: false,
                lost_reported: false,
            })
            .collect();
        Ok(QueueDriver {
            ring,
            engine,
            conns,
            buffers,
            frontend,
            mode,
            buffer_mode,
            wake_buf: Box::new(0),
            wake_posted: false,
            frontend_sqes: Vec::new(),
            reconnect,
            reconnected: crossbeam_channel::unbounded(),
        })
    }

    /// Serves until the frontend has no more requests and every request
    /// finished, then closes the connections. Gives the frontend back. If the
    /// ring fails, the frontend hears of it through [`Frontend::fail`].
    pub fn run(mut self) -> (F, io::Result<()>) {
        let result = self.serve().and_then(|()| self.shutdown());
        if let Err(err) = &result {
            eprintln!("netblk: queue failed: {err}");
        }
        let tags = self.engine.active_tags();
        let QueueDriver {
            ring, mut frontend, ..
        } = self;
        // Tearing the ring down cancels what the kernel still holds; only then
        // may the frontend reuse the buffers of requests still in flight.
        drop(ring);
        if result.is_err() {
            frontend.fail(&tags);
        }
        (frontend, result)
    }

    fn serve(&mut self) -> io::Result<()> {
        for node in 0..self.conns.len() {
            self.engine.handle_connection_restored(node);
        }
        loop {
            let now = Instant::now();
            self.engine.handle_timeout(now);
            // Before sending: a connection that came back goes to work now.
            let nodes_down = self.reconnect_step(now);
            self.deliver_completions();
            // After completions: a frontend refills the tags they freed.
            let more = self.frontend.poll(&mut self.engine, &self.buffers, now);
            self.post_frontend()?;
            for node in 0..self.conns.len() {
                self.post_sends(node)?;
                self.post_recv(node)?;
                self.check_lost(node);
            }
            self.post_wake()?;
            if self.deliver_completions() {
                self.post_frontend()?;
                // Some finished without IO (invalid, or lost): poll again
                // before sleeping.
                self.ring.submit()?;
                continue;
            }
            if !more && self.engine.is_idle() {
                return Ok(());
            }
            let mut timeout = self
                .engine
                .poll_timeout()
                .map(|d| d.saturating_duration_since(now));
            if nodes_down || self.conns.iter().any(|c| c.lost_reported) {
                // A reconnect may be due or finish any moment: look again soon.
                timeout = Some(timeout.map_or(RECONNECT_MIN, |t| t.min(RECONNECT_MIN)));
            }
            self.submit_and_wait(timeout)?;
            self.reap()?;
        }
    }

    /// Installs finished reconnects and starts due ones. True while a node is down.
    fn reconnect_step(&mut self, now: Instant) -> bool {
        let Some(reconnect) = &self.reconnect else {
            return false;
        };
        while let Ok((node, session, result)) = self.reconnected.1.try_recv() {
            let conn = &mut self.conns[node];
            conn.connecting = false;
            match result {
                Ok(stream) => {
                    eprintln!(
                        "netblk: node {node} ({}) is back (session {session})",
                        reconnect.addrs[node]
                    );
                    conn.fd = stream.as_raw_fd();
                    conn.stream = stream;
                    conn.session = session;
                    conn.generation = conn.generation.wrapping_add(1);
                    conn.ops = 0;
                    conn.heads.clear();
                    conn.chain_left = 0;
                    conn.rstart = 0;
                    conn.rend = 0;
                    conn.reader = ReplyReader::new();
                    conn.recv_posted = false;
                    conn.broken = false;
                    conn.lost_reported = false;
                    conn.backoff = RECONNECT_MIN;
                    self.engine.handle_connection_restored(node);
                }
                Err(why) => {
                    if conn.backoff >= RECONNECT_MAX {
                        eprintln!("netblk: node {node}: still down: {why}");
                    }
                    conn.next_attempt = now + conn.backoff;
                    conn.backoff = (conn.backoff * 2).min(RECONNECT_MAX);
                }
            }
        }
        let mut down = false;
        for (node, conn) in self.conns.iter_mut().enumerate() {
            if !conn.lost_reported {
                continue;
            }
            down = true;
            if conn.connecting || now < conn.next_attempt {
                continue;
            }
            conn.connecting = true;
            let session = conn.session + 1;
            let (addr, layout, timeout) =
                (reconnect.addrs[node], reconnect.layout, reconnect.timeout);
            let (client_id, volume) = (reconnect.client_id.clone(), reconnect.volume.clone());
            let done = self.reconnected.0.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("reconnect-{node}"))
                .spawn(move || {
                    let who = crate::net::Identity {
                        client_id: &client_id,
                        volume: &volume,
                        session,
                    };
                    let result = crate::net::connect(addr, node, &layout, &who, timeout)
                        .map(|(stream, _)| stream)
                        .map_err(|e| e.to_string());
                    let _ = done.send((node, session, result));
                });
            if spawned.is_err() {
                conn.connecting = false;
                conn.next_attempt = now + conn.backoff;
            }
        }
        down
    }

    /// Hands finished requests to the frontend; true if there were any.
    fn deliver_completions(&mut self) -> bool {
        let mut any = false;
        while let Some(c) = self.engine.poll_completion() {
            self.frontend.complete(c, &self.buffers);
            any = true;
        }
        any
    }

    fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every entry built by this driver points only at memory
            // that outlives the operation: connection buffers and head vectors
            // (kept until their CQE), tag buffers (owned by the queue until
            // the engine completes the request, which waits for every CQE and
            // notification), and `wake_buf` (lives as long as the driver).
            // Frontend entries (ublk commands) carry integers and tag buffer
            // addresses, under the same rule (see Frontend::take_sqes).
            let pushed = unsafe { self.ring.submission().push(entry) };
            if pushed.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn submit_and_wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        if !self.ring.completion().is_empty() {
            self.ring.submit()?;
            return Ok(());
        }
        let result = match timeout {
            Some(t) => {
                let ts = types::Timespec::from(t.max(Duration::from_micros(1)));
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submit_and_wait(1),
        };
        match result {
            Ok(_) => Ok(()),
            Err(err)
                if matches!(
                    err.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(err) => Err(err),
        }
    }

    fn post_frontend(&mut self) -> io::Result<()> {
        let mut sqes = std::mem::take(&mut self.frontend_sqes);
        self.frontend.take_sqes(&mut sqes);
        for entry in sqes.drain(..) {
            self.push(&entry)?;
        }
        self.frontend_sqes = sqes;
        Ok(())
    }

    fn post_wake(&mut self) -> io::Result<()> {
        if self.wake_posted {
            return Ok(());
        }
        let Some(fd) = self.frontend.wake_fd() else {
            return Ok(());
        };
        let entry = opcode::Read::new(types::Fd(fd), (&raw mut *self.wake_buf).cast::<u8>(), 8)
            .build()
            .user_data(user_data(K_WAKE, 0, 0));
        self.push(&entry)?;
        self.wake_posted = true;
        Ok(())
    }

    /// Starts a send chain on `node` if none is in flight.
    fn post_sends(&mut self, node: usize) -> io::Result<()> {
        let conn = &mut self.conns[node];
        if conn.broken || conn.chain_left > 0 {
            return Ok(());
        }
        conn.heads.clear();
        let mut plan: Vec<(usize, Option<crate::engine::BufSlice>)> = Vec::new();
        let mut batch: Vec<u8> = Vec::new();
        for _ in 0..MAX_CHAIN {
            let Some(t) = self.engine.poll_transmit(node) else {
                break;
            };
            batch.extend_from_slice(&t.head);
            if t.payload.is_some() {
                let conn = &mut self.conns[node];
                conn.heads.push(std::mem::take(&mut batch));
                plan.push((conn.heads.len() - 1, t.payload));
            }
        }
        let conn = &mut self.conns[node];
        if !batch.is_empty() {
            conn.heads.push(batch);
            plan.push((conn.heads.len() - 1, None));
        }
        if plan.is_empty() {
            return Ok(());
        }
        let cid = conn_id(node, conn.generation);
        let mut entries = Vec::with_capacity(plan.len() * 2);
        let transmits = plan.len();
        for (i, (head, payload)) in plan.into_iter().enumerate() {
            let bytes = &conn.heads[head];
            // MSG_MORE: more of this chain follows; let TCP put a header and
            // its payload (and the next frame) in the same segments.
            let more = |last: bool| if last { 0 } else { libc::MSG_MORE };
            entries.push(
                opcode::Send::new(types::Fd(conn.fd), bytes.as_ptr(), bytes.len() as u32)
                    .flags(libc::MSG_WAITALL | more(payload.is_none() && i + 1 == transmits))
                    .build()
                    .user_data(user_data(K_HEAD, cid, head as u64)),
            );
            if let Some(slice) = payload {
                let flags = libc::MSG_WAITALL | more(i + 1 == transmits);
                let ptr = match self.buffer_mode {
                    BufferMode::User => self.buffers.slice_ptr(slice.tag, slice.offset, slice.len),
                    // A kernel-registered buffer is addressed by offset.
                    BufferMode::Kernel { .. } => slice.offset as usize as *mut u8,
                };
                // tag (13 bits) and length (27 bits: at most 64 MiB) in 40 bits.
                let detail = (u64::from(slice.tag) << 27) | u64::from(slice.len);
                let entry = match self.mode {
                    SendMode::ZeroCopy => opcode::SendZc::new(types::Fd(conn.fd), ptr, slice.len)
                        .buf_index(Some(slice.tag))
                        .flags(flags)
                        .build(),
                    SendMode::Copy => opcode::Send::new(types::Fd(conn.fd), ptr, slice.len)
                        .flags(flags)
                        .build(),
                };
                entries.push(entry.user_data(user_data(K_DATA, cid, detail)));
            }
        }
        let last = entries.len() - 1;
        conn.chain_left = entries.len() as u32;
        conn.ops += entries.len() as u32;
        for (i, entry) in entries.into_iter().enumerate() {
            let entry = if i < last {
                // A hard link keeps the order without cancelling the rest
                // when one fails: a cancelled SEND_ZC would still post a
                // notification, after a CQE without F_MORE.
                entry.flags(squeue::Flags::IO_HARDLINK)
            } else {
                entry
            };
            self.push(&entry)?;
        }
        Ok(())
    }

    /// Keeps one receive posted on `node`.
    fn post_recv(&mut self, node: usize) -> io::Result<()> {
        let conn = &mut self.conns[node];
        if conn.broken || conn.recv_posted {
            return Ok(());
        }
        let cid = conn_id(node, conn.generation);
        let kernel = match self.buffer_mode {
            BufferMode::Kernel { recv_fixed } => Some(recv_fixed),
            BufferMode::User => None,
        };
        let entry = match (conn.reader.mode(), kernel) {
            (
                RecvMode::Payload {
                    tag, offset, left, ..
                },
                Some(recv_fixed),
            ) => {
                // Straight into the request's pages: offset addressing.
                debug_assert_eq!(conn.rstart, conn.rend, "kernel mode reads headers exactly");
                let at = offset as usize as *mut u8;
                if recv_fixed {
                    opcode::Recv::new(types::Fd(conn.fd), at, left)
                        .ioprio(IORING_RECVSEND_FIXED_BUF)
                        .buf_group(tag)
                        .flags(libc::MSG_WAITALL)
                        .build()
                        .user_data(user_data(K_RECV_PAYLOAD, cid, 0))
                } else {
                    opcode::ReadFixed::new(types::Fd(conn.fd), at, left, tag)
                        .build()
                        .user_data(user_data(K_RECV_PAYLOAD, cid, 0))
                }
            }
            (
                RecvMode::Payload {
                    tag, offset, left, ..
                },
                None,
            ) if conn.rstart == conn.rend && left >= DIRECT_RECV_MIN => {
                let at = self.buffers.slice_ptr(tag, offset, left);
                opcode::Recv::new(types::Fd(conn.fd), at, left)
                    .flags(libc::MSG_WAITALL)
                    .build()
                    .user_data(user_data(K_RECV_PAYLOAD, cid, 0))
            }
            _ => {
                if conn.rstart == conn.rend {
                    conn.rstart = 0;
                    conn.rend = 0;
                } else if conn.rbuf.len() - conn.rend < 64 << 10 {
                    conn.rbuf.copy_within(conn.rstart..conn.rend, 0);
                    conn.rend -= conn.rstart;
                    conn.rstart = 0;
                }
                let want = if kernel.is_some() {
                    // Exactly the rest of the preamble, or of the header: no
                    // payload byte may land here, it belongs in the pages.
                    let have = conn.rend - conn.rstart;
                    match conn.rbuf[conn.rstart..conn.rend].first_chunk::<PREAMBLE_LEN>() {
                        None => PREAMBLE_LEN - have,
                        Some(p) => {
                            let header_len =
                                u32::from_be_bytes([p[8], p[9], p[10], p[11]]) as usize;
                            (PREAMBLE_LEN + header_len).saturating_sub(have).max(1)
                        }
                    }
                } else if conn.reader.large_payloads() {
                    // After a large payload, expect another: take only about a
                    // header, so that most of the next payload is received
                    // straight into its request buffer rather than copied.
                    HEADER_RECV
                } else {
                    conn.rbuf.len() - conn.rend
                };
                let want = want.min(conn.rbuf.len() - conn.rend);
                let free = &mut conn.rbuf[conn.rend..conn.rend + want];
                let flags = if kernel.is_some() {
                    libc::MSG_WAITALL
                } else {
                    0
                };
                opcode::Recv::new(types::Fd(conn.fd), free.as_mut_ptr(), free.len() as u32)
                    .flags(flags)
                    .build()
                    .user_data(user_data(K_RECV, cid, 0))
            }
        };
        conn.recv_posted = true;
        conn.ops += 1;
        self.push(&entry)
    }

    fn reap(&mut self) -> io::Result<()> {
        let cqes: Vec<(u64, i32, u32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result(), c.flags()))
            .collect();
        for (ud, res, flags) in cqes {
            let (kind, cid, detail) = split_user_data(ud);
            let node = cid & 0xfff;
            let current = self
                .conns
                .get(node)
                .is_some_and(|c| conn_id(node, c.generation) == cid);
            if matches!(kind, K_HEAD | K_DATA | K_RECV | K_RECV_PAYLOAD) && !current {
                // From a connection already replaced: only a buffer it held
                // matters now.
                if kind == K_DATA && (cqueue::notif(flags) || !cqueue::more(flags)) {
                    self.engine.handle_buffer_released((detail >> 27) as Tag);
                }
                continue;
            }
            match kind {
                K_WAKE => {
                    self.wake_posted = false;
                }
                K_CANCEL => {}
                K_FRONTEND => self
                    .frontend
                    .on_cqe(detail, res, &mut self.engine, Instant::now()),
                K_HEAD => {
                    let conn = &mut self.conns[node];
                    conn.ops = conn.ops.saturating_sub(1);
                    conn.chain_left = conn.chain_left.saturating_sub(1);
                    let expected = conn.heads.get(detail as usize).map_or(0, Vec::len);
                    if res < 0 || res as usize != expected {
                        self.break_conn(node, "send failed", res);
                    }
                }
                K_DATA => self.on_data_sent(node, detail, res, flags),
                K_RECV => self.on_recv(node, res),
                K_RECV_PAYLOAD => self.on_recv_payload(node, res),
                _ => {}
            }
        }
        Ok(())
    }

    fn on_data_sent(&mut self, node: usize, detail: u64, res: i32, flags: u32) {
        let tag = (detail >> 27) as Tag;
        let len = (detail & ((1 << 27) - 1)) as i32;
        let conn = &mut self.conns[node];
        if cqueue::notif(flags) {
            // The zero-copy notification: the kernel is done with the buffer.
            conn.ops = conn.ops.saturating_sub(1);
            self.engine.handle_buffer_released(tag);
            return;
        }
        conn.chain_left = conn.chain_left.saturating_sub(1);
        if !cqueue::more(flags) {
            conn.ops = conn.ops.saturating_sub(1);
            self.engine.handle_buffer_released(tag);
        }
        if res != len {
            self.break_conn(node, "payload send failed", res);
        }
    }

    /// Books a finished receive on `node`; false (and the connection broken)
    /// if it brought nothing.
    fn recv_done(&mut self, node: usize, res: i32, what: &str) -> bool {
        let conn = &mut self.conns[node];
        conn.ops = conn.ops.saturating_sub(1);
        conn.recv_posted = false;
        if res <= 0 {
            self.break_conn(node, what, res);
            return false;
        }
        true
    }

    fn on_recv(&mut self, node: usize, res: i32) {
        if !self.recv_done(node, res, "connection closed by node") {
            return;
        }
        self.conns[node].rend += res as usize;
        if let Err(why) = self.parse(node) {
            self.break_conn(node, &why, 0);
        }
    }

    fn on_recv_payload(&mut self, node: usize, res: i32) {
        if !self.recv_done(node, res, "connection closed by node mid-payload") {
            return;
        }
        self.conns[node]
            .reader
            .payload_received(&mut self.engine, res as u32);
    }

    /// Consumes whole frames and payload bytes from the receive buffer.
    fn parse(&mut self, node: usize) -> Result<(), String> {
        let conn = &mut self.conns[node];
        let buffers = &self.buffers;
        let consumed = conn.reader.feed(
            node,
            &conn.rbuf[conn.rstart..conn.rend],
            &mut self.engine,
            |tag, offset, bytes| {
                let at = buffers.slice_ptr(tag, offset, bytes.len() as u32);
                // SAFETY: `at..at+len` is part of the slice the engine handed
                // out for this payload, inside the tag's buffer, which the
                // queue owns while the request is in flight; the source is the
                // connection's receive buffer, which does not overlap it.
                unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), at, bytes.len()) };
            },
        );
        conn.rstart += consumed.as_ref().copied().unwrap_or(0);
        consumed.map(|_| ())
    }

    fn break_conn(&mut self, node: usize, why: &str, res: i32) {
        let conn = &mut self.conns[node];
        if !conn.broken {
            conn.broken = true;
            let detail = if res < 0 {
                format!(": {}", io::Error::from_raw_os_error(-res))
            } else {
                String::new()
            };
            eprintln!("netblk: connection to node {node} lost ({why}{detail})");
            // Makes the operations still in the kernel finish.
            let _ = conn.stream.shutdown(Shutdown::Both);
        }
    }

    /// Once every operation of a broken connection is back, tells the engine.
    fn check_lost(&mut self, node: usize) {
        let conn = &mut self.conns[node];
        if !conn.broken || conn.lost_reported || conn.ops > 0 {
            return;
        }
        conn.lost_reported = true;
        conn.reader.reset(&mut self.engine);
        self.engine.handle_connection_lost(Instant::now(), node);
    }

    /// Closes the connections and waits until the kernel holds nothing of ours.
    fn shutdown(&mut self) -> io::Result<()> {
        for conn in &mut self.conns {
            conn.broken = true;
            let _ = conn.stream.shutdown(Shutdown::Both);
        }
        if self.wake_posted {
            let cancel = opcode::AsyncCancel::new(user_data(K_WAKE, 0, 0))
                .build()
                .user_data(user_data(K_CANCEL, 0, 0));
            self.push(&cancel)?;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while (self.wake_posted || self.conns.iter().any(|c| c.ops > 0))
            && Instant::now() < deadline
        {
            self.submit_and_wait(Some(Duration::from_millis(100)))?;
            self.reap()?;
        }
        self.deliver_completions();
        Ok(())
    }
}

//! The per-queue io_uring driver: thin glue that moves bytes and time in and
//! out of the [`Engine`].
//!
//! One thread per queue, one ring per thread; the ring owns one TCP
//! connection per node. Request buffers ([`TagBuffers`]) are registered as
//! fixed buffers, one per tag (buffer index = tag). What a connection has
//! ready goes out as one linked chain (see `send`): heads and copied payloads
//! gathered in a `SENDMSG`, large write payloads as `IORING_OP_SEND_ZC` from
//! the fixed buffer, or, where the kernel can (6.15+) and the payloads are
//! in [`TagBuffers`], the whole chain as one vectored `SENDMSG_ZC` from the
//! registered mapping; a buffer is handed back to the engine only once the
//! kernel is done with it (for zero copy: at the notification).
//! Read replies: the header is received into the connection's buffer, the
//! payload straight into the request buffer at its offset.
//!
//! All `unsafe` of the client's data path lives here.

mod buffers;
mod conn;
mod ids;
mod receive;
mod reconnect;
mod ring;
mod send;
mod sys;

use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use io_uring::{cqueue, opcode, squeue, types};

pub use buffers::TagBuffers;
pub use reconnect::Reconnect;
pub use sys::{
    Doorbell, enable_zerocopy, probe, probe_recv_fixed, probe_send_fixed, probe_sendmsg_zc_fixed,
};

use crate::engine::{Completion, Engine, Tag};
use crate::recv::ReplyReader;
use conn::Conn;
use ids::{
    K_CANCEL, K_DATA, K_FRONTEND, K_HEAD, K_RECV, K_RECV_PAYLOAD, K_VEC, K_WAKE, conn_id,
    split_user_data, user_data,
};
use receive::RECV_BUF;
use reconnect::{RECONNECT_MIN, Reconnected};
use ring::Ring;
pub(crate) use send::{MAX_CHAIN, ZC_MIN};
use send::{MAX_CHAIN_OPS, SendChain};

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
    /// `READ_FIXED` on the socket. With `user_copy` (the device has
    /// `UBLK_F_USER_COPY` too), write payloads below [`ZC_MIN`] are copied
    /// out of the request with the frontend's [`Frontend::copy_out`] into the
    /// tag's buffer instead, and join the batch's one `SENDMSG`; and while no
    /// big read is in flight on a connection, its replies are received in
    /// bulk like in user buffer mode, their payloads copied in with
    /// [`Frontend::copy_in`]. With `send_fixed` (a plain `SEND` takes a
    /// fixed buffer, Linux 7.2+), large write payloads to a node on this
    /// host are copied by the kernel straight from the request's pages.
    Kernel {
        recv_fixed: bool,
        user_copy: bool,
        send_fixed: bool,
    },
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
    /// Copies `dst.len()` bytes of the data of request `tag`, from byte
    /// `offset`, into `dst` (kernel buffer mode with `user_copy`).
    fn copy_out(&self, _tag: Tag, _offset: u32, _dst: &mut [u8]) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Copies `src` into the data of request `tag` at byte `offset` (kernel
    /// buffer mode with `user_copy`).
    fn copy_in(&self, _tag: Tag, _offset: u32, _src: &[u8]) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

impl<F: Frontend> QueueDriver<F> {
    /// The frontend refused a user copy (`what` failed): this queue uses
    /// the request's pages directly from now on; said once.
    pub(super) fn stop_user_copy(&mut self, what: &str) {
        if let BufferMode::Kernel {
            recv_fixed,
            user_copy: true,
            send_fixed,
        } = self.buffer_mode
        {
            tracing::warn!("{what}; this queue no longer copies small payloads");
            self.buffer_mode = BufferMode::Kernel {
                recv_fixed,
                user_copy: false,
                send_fixed,
            };
        }
    }
}

/// User data for a frontend's own operation; `detail` (40 bits) comes back
/// in [`Frontend::on_cqe`].
pub fn frontend_user_data(detail: u64) -> u64 {
    user_data(K_FRONTEND, 0, detail)
}

/// One queue's driver; see the module docs.
pub struct QueueDriver<F: Frontend> {
    // Declared first: dropped before the buffers it has registered.
    ring: Ring,
    engine: Engine,
    conns: Vec<Conn>,
    buffers: Arc<TagBuffers>,
    frontend: F,
    mode: SendMode,
    buffer_mode: BufferMode,
    /// Chains with a zero-copy payload go as one vectored `SENDMSG_ZC`
    /// (see `send`): the whole buffer mapping is registered at index
    /// `depth` for it.
    vectored: bool,
    /// Sends ask io_uring to send all (`MSG_WAITALL`); not on TLS
    /// connections, whose kernel TLS refuses the flag: a short send is
    /// continued by the driver instead (see `send`).
    send_waitall: bool,
    wake_buf: Box<u64>,
    wake_posted: bool,
    frontend_sqes: Vec<squeue::Entry>,
    reconnect: Option<Reconnect>,
    reconnected: (Sender<Reconnected>, Receiver<Reconnected>),
}

/// Everything a queue is made of: its engine, one connected socket per node
/// (in node order), its tag buffers, where its requests come from, how data
/// moves, and how it reconnects (`None`: a lost node stays lost).
pub struct QueueParts<F> {
    pub engine: Engine,
    /// One per node; None for a node not connected (a replica out of
    /// sync): it starts lost.
    pub streams: Vec<Option<TcpStream>>,
    pub buffers: Arc<TagBuffers>,
    pub frontend: F,
    pub mode: SendMode,
    pub buffer_mode: BufferMode,
    pub reconnect: Option<Reconnect>,
    /// The queue thread runs inside it: its fields (volume, device, queue)
    /// go with every log event of the queue.
    pub span: tracing::Span,
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
            span: _,
        } = parts;
        let depth = engine.config().depth;
        let (sq, cq) = ring::ring_sizes(depth, streams.len(), MAX_CHAIN_OPS);
        let ring = Ring::new(sq, cq)?;
        let mut vectored = false;
        match buffer_mode {
            BufferMode::User => {
                let mut iovecs = buffers.iovecs();
                // One registered buffer may not exceed 1 GiB.
                if mode == SendMode::ZeroCopy
                    && buffers.whole().iov_len <= 1 << 30
                    && sys::probe_sendmsg_zc_fixed()
                {
                    iovecs.push(buffers.whole());
                    // SAFETY: as below.
                    vectored = unsafe { ring.submitter().register_buffers(&iovecs) }.is_ok();
                    iovecs.pop();
                }
                if !vectored {
                    // SAFETY: the iovecs describe the buffer mapping, which
                    // `buffers` keeps alive for longer than the ring (the ring
                    // is dropped first, and the shutdown path waits for every
                    // operation before that).
                    unsafe { ring.submitter().register_buffers(&iovecs)? };
                }
            }
            BufferMode::Kernel { .. } => {
                ring.submitter()
                    .register_buffers_sparse(buffers.depth().into())?;
                buffers.small_pages();
            }
        }
        let conns: Vec<Conn> = streams
            .into_iter()
            .enumerate()
            .map(|(node, stream)| Conn {
                fd: stream.as_ref().map_or(-1, |s| s.as_raw_fd()),
                local: stream.as_ref().is_some_and(crate::net::delivered_locally),
                broken: stream.is_none(),
                lost_reported: stream.is_none(),
                stream,
                epoch: reconnect.as_ref().map_or(1, |r| r.epochs.current(node)),
                generation: 0,
                next_attempt: Instant::now(),
                backoff: RECONNECT_MIN,
                connecting: false,
                chain: SendChain::default(),
                chain_left: 0,
                head_slots: Default::default(),
                rbuf: vec![0u8; RECV_BUF].into_boxed_slice(),
                rstart: 0,
                rend: 0,
                reader: ReplyReader::new(),
                recv_posted: false,
                ops: 0,
                outage: None,
            })
            .collect();
        // Every connection is up from here: said before the queue is
        // reported ready, so figures read after that see them up.
        let mut engine = engine;
        for (node, conn) in conns.iter().enumerate() {
            if conn.stream.is_none() {
                engine.handle_connection_lost(Instant::now(), node);
                continue;
            }
            engine.handle_connection_restored(node);
            if let Some(f) = engine.figures() {
                f.node_up(node, conn.epoch, false);
            }
        }
        Ok(QueueDriver {
            ring,
            engine,
            conns,
            buffers,
            frontend,
            mode,
            buffer_mode,
            vectored,
            send_waitall: reconnect.as_ref().is_none_or(|r| r.tls.is_none()),
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
            tracing::error!(error = %err, "queue failed");
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
        loop {
            let now = Instant::now();
            self.engine.handle_timeout(now);
            while let Some(node) = self.engine.poll_abort() {
                self.break_conn(node, "a request timed out on it", 0);
            }
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
            self.engine.set_clock(Instant::now());
            self.reap()?;
        }
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
        // SAFETY: see `push_chain`.
        unsafe { self.push_chain(std::slice::from_ref(entry)) }
    }

    /// Pushes a linked chain whole (see [`Ring::push_chain`]).
    ///
    /// # Safety
    /// Every entry built by this driver points only at memory that outlives
    /// the operation: connection buffers and head vectors (kept until their
    /// CQE), tag buffers (owned by the queue until the engine completes the
    /// request, which waits for every CQE and notification), and `wake_buf`
    /// (lives as long as the driver). Frontend entries (ublk commands) carry
    /// integers and tag buffer addresses, under the same rule (see
    /// [`Frontend::take_sqes`]).
    unsafe fn push_chain(&mut self, entries: &[squeue::Entry]) -> io::Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { self.ring.push_chain(entries) }
    }

    fn submit_and_wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.ring.submit_and_wait(timeout)
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

    fn reap(&mut self) -> io::Result<()> {
        let cqes = self.ring.completions()?;
        for (ud, res, flags) in cqes {
            let (kind, cid, detail) = split_user_data(ud);
            let node = cid & 0xfff;
            let current = self
                .conns
                .get(node)
                .is_some_and(|c| conn_id(node, c.generation) == cid);
            if matches!(kind, K_HEAD | K_DATA | K_VEC | K_RECV | K_RECV_PAYLOAD) && !current {
                // From a connection already replaced: only a buffer it held
                // matters now. (A connection is replaced only once it holds
                // no operation, so this is a safety net; a `SENDMSG`'s
                // copied payloads went with its chain.)
                let last = cqueue::notif(flags) || !cqueue::more(flags);
                if kind == K_DATA && last {
                    self.engine
                        .handle_buffer_released(node, send::split_data_detail(detail).0);
                }
                if kind == K_VEC && last && node < self.conns.len() {
                    self.release_head_slot(node, detail as usize);
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
                K_HEAD => self.on_msg_sent(node, detail, res),
                K_DATA => self.on_data_sent(node, detail, res, flags),
                K_VEC => self.on_vectored_sent(node, detail, res, flags),
                K_RECV => self.on_recv(node, res),
                K_RECV_PAYLOAD => self.on_recv_payload(node, res),
                _ => {}
            }
        }
        Ok(())
    }

    /// Closes the connections and waits until the kernel holds nothing of ours.
    fn shutdown(&mut self) -> io::Result<()> {
        for conn in &mut self.conns {
            conn.broken = true;
            if let Some(stream) = &conn.stream {
                let _ = stream.shutdown(Shutdown::Both);
            }
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

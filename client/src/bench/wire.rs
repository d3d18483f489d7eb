//! The upper-bound baseline of `netblk bench`: the same operation netblk
//! does, done as cheaply as this machine allows.
//!
//! Same node processes, same connections (one per queue and node, with the
//! real handshake), same direction, same piece size and the same number of
//! pieces in flight; but no engine, no layout, no protobuf encoding: every
//! request is a prebuilt frame (preamble, header, and a write's payload) in
//! one buffer, and whatever a connection has ready goes out in one
//! `SENDMSG`, one at a time per connection so frames never interleave (for a
//! zero-copy row with pieces netblk sends zero-copy: one `SENDMSG_ZC` from
//! the frame buffer registered as a fixed buffer, or, before Linux 6.15,
//! with its pages pinned per send); every connection of a queue is
//! driven from that queue's one ring with batched submissions. Replies are only measured
//! (their preamble says how long they are), never decoded. The mock node
//! answers a connection's requests in order, so a reply closes the oldest
//! request of its connection.

use std::collections::VecDeque;
use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, types};

use netblk_protocol::pb::{self, request::Op as WireOp};
use netblk_protocol::{PREAMBLE_LEN, encode_head};

use crate::layout::VolumeSpec;
use crate::net::{self, Identity, Timeouts};
use crate::uring::{MAX_CHAIN, SendMode, ZC_MIN};

/// What one baseline run does: `piece`-sized reads or writes, `in_flight`
/// of them outstanding per queue, spread over the queue's connections.
#[derive(Debug, Clone, Copy)]
pub struct WireLoad {
    pub write: bool,
    pub piece: u32,
    pub queues: usize,
    pub in_flight: usize,
    pub mode: SendMode,
    pub duration: Duration,
    /// Each new piece goes to a random connection (random offsets: the
    /// stripe unit's node is any), else to the one that freed its slot
    /// (sequential requests spread their pieces evenly).
    pub random: bool,
}

/// What a baseline run measured: pieces done, payload bytes, per-piece
/// round trips in microseconds, wall seconds.
#[derive(Debug, Default)]
pub struct WireResult {
    pub pieces: u64,
    pub bytes: u64,
    pub latencies_us: Vec<u32>,
    pub seconds: f64,
}

/// Runs `load` against `spec`'s nodes: one thread and ring per queue.
pub fn run(spec: &VolumeSpec, load: WireLoad) -> io::Result<WireResult> {
    let layout = spec.layout().map_err(|e| io::Error::other(e.to_string()))?;
    let mut queues = Vec::with_capacity(load.queues);
    for q in 0..load.queues {
        let mut conns = Vec::with_capacity(spec.nodes.len());
        for (node, addr) in spec.nodes.iter().enumerate() {
            let client_id = format!("netblk-baseline-{}-q{q}", std::process::id());
            let who = Identity {
                owner_epoch: 0,
                client_id: &client_id,
                volume: &spec.name,
                session: 1,
                volume_id: None,
                digest: false,
                tls: None,
            };
            let timeouts = Timeouts {
                connect: Duration::from_secs(10),
                io: IO_TIMEOUT,
            };
            let (stream, _) = net::connect(*addr, node, &layout, &who, timeouts)
                .map_err(|e| io::Error::other(e.to_string()))?;
            conns.push(stream);
        }
        queues.push(conns);
    }
    // Offsets within what every node holds.
    let capacity = (0..spec.nodes.len())
        .map(|n| layout.node_capacity(n))
        .min()
        .unwrap_or(0);
    let threads: Vec<_> = queues
        .into_iter()
        .map(|conns| std::thread::spawn(move || drive(conns, load, capacity, IO_TIMEOUT)))
        .collect();
    let mut total = WireResult::default();
    for t in threads {
        let r = t
            .join()
            .map_err(|_| io::Error::other("baseline thread panicked"))??;
        total.pieces += r.pieces;
        total.bytes += r.bytes;
        total.latencies_us.extend(r.latencies_us);
        total.seconds = total.seconds.max(r.seconds);
    }
    Ok(total)
}

/// How long a baseline run waits for a node that answers nothing before
/// it fails (as netblk's own requests time out): a stalled node is an
/// error, never a benchmark that does not end.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the ring wakes with nothing else to do, so that a stall is
/// noticed: one timeout kept posted, not a timer armed at every wait (the
/// baseline's waits stay as cheap as a wait can be).
const TICK: Duration = Duration::from_millis(500);

// user_data: kind in the top byte, connection below.
const SEND: u64 = 1;
const RECV: u64 = 2;
const TICK_KIND: u64 = 3;

struct Conn {
    stream: TcpStream,
    /// The send in flight: its frames' iovecs and header, kept alive until
    /// its last completion.
    iovs: Vec<libc::iovec>,
    msg: Box<libc::msghdr>,
    sending: bool,
    /// Send times of the requests in flight, oldest first.
    sent: VecDeque<Instant>,
    /// Frames (indexes into the frame buffer) ready to go out.
    idle: Vec<usize>,
    /// Replies land here, at `rlen`, sweeping the whole buffer (sized as
    /// the connection's replies in flight, as netblk's requests' buffers
    /// are) before starting over; `rstart` is where parsing resumes.
    rbuf: Vec<u8>,
    rstart: usize,
    rlen: usize,
    /// Bytes of a reply still to skip (its payload, past the buffer).
    skip: usize,
}

/// One queue's ring over its connections, until `load.duration` has passed
/// and every request is answered; an error once no node has answered
/// anything for `stall`.
fn drive(
    conns: Vec<TcpStream>,
    load: WireLoad,
    capacity: u64,
    stall: Duration,
) -> io::Result<WireResult> {
    let n = conns.len().max(1);
    // Exactly `in_flight` pieces outstanding (at depth 1, one, not one per
    // connection); `per_conn` only sizes buffers.
    let slots = load.in_flight.max(1);
    let per_conn = slots.div_ceil(n);
    // Prebuilt frames, one per request slot, back to back in one buffer.
    let mut frames: Vec<(usize, usize)> = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let pieces_per_node = (capacity / u64::from(load.piece)).max(1);
    for slot in 0..slots {
        let offset = (slot as u64 * 7919 % pieces_per_node) * u64::from(load.piece);
        let op = if load.write {
            WireOp::Write(pb::Write {
                offset,
                length: load.piece,
                fua: false,
                crc32c: None,
            })
        } else {
            WireOp::Read(pb::Read {
                offset,
                length: load.piece,
            })
        };
        let start = buf.len();
        let payload = if load.write { load.piece as usize } else { 0 };
        encode_head(&pb::Header::request(slot as u64 + 1, op), payload, &mut buf)
            .map_err(|e| io::Error::other(e.to_string()))?;
        buf.resize(buf.len() + payload, 0x5a);
        frames.push((start, buf.len() - start));
    }
    let mut ring = IoUring::new((4 * n).next_power_of_two().max(64) as u32)?;
    // Zero copy as netblk does it: only payloads of ZC_MIN and more, and
    // from a registered buffer (no page pinning per send) where the kernel
    // allows a vectored send from one (6.15+); else with pinning.
    let zero_copy = load.mode == SendMode::ZeroCopy && load.piece >= ZC_MIN;
    let mut fixed = zero_copy && buf.len() <= 1 << 30 && {
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: `buf` is neither moved nor freed until the ring is
        // dropped (below, before it), and the kernel only reads from it.
        unsafe { ring.submitter().register_buffers(&[iov]) }.is_ok()
    };
    // Room for every reply the connection may have outstanding, so that one
    // receive takes whatever has arrived (fewer, larger receives).
    let recv_size = if load.write {
        64 << 10
    } else {
        ((load.piece as usize + 4096) * per_conn).clamp(256 << 10, 8 << 20)
    };
    let mut conns: Vec<Conn> = conns
        .into_iter()
        .enumerate()
        .map(|(i, stream)| Conn {
            stream,
            iovs: Vec::with_capacity(per_conn),
            // SAFETY: msghdr is plain data; all zeroes is a valid empty one.
            msg: Box::new(unsafe { std::mem::zeroed() }),
            sending: false,
            sent: VecDeque::new(),
            idle: (i..slots).step_by(n).collect(),
            rbuf: vec![0u8; recv_size],
            rstart: 0,
            rlen: 0,
            skip: 0,
        })
        .collect();
    let mut result = WireResult::default();
    let start = Instant::now();
    let deadline = start + load.duration;
    let mut recv_posted = vec![false; conns.len()];
    let mut rng = crate::rng::Rng::new(0x5eed_0001);
    let mut next_frame = 0;
    let mut sends_out = 0usize;
    let mut last_progress = Instant::now();
    let tick = types::Timespec::from(TICK);
    let mut tick_posted = false;
    loop {
        let stopping = Instant::now() >= deadline;
        for (i, c) in conns.iter_mut().enumerate() {
            if !stopping && !c.sending && !c.idle.is_empty() {
                // Everything ready goes out in one message.
                c.iovs.clear();
                // At most as many frames as one netblk send chain.
                let take = c.idle.len().min(MAX_CHAIN);
                for f in c.idle.drain(..take) {
                    let (at, len) = frames[f];
                    c.iovs.push(libc::iovec {
                        // The kernel only reads from it.
                        iov_base: buf[at..].as_ptr() as *mut libc::c_void,
                        iov_len: len,
                    });
                    c.sent.push_back(Instant::now());
                }
                c.msg.msg_iov = c.iovs.as_mut_ptr();
                c.msg.msg_iovlen = c.iovs.len();
                let fd = types::Fd(c.stream.as_raw_fd());
                let msg: *const libc::msghdr = &*c.msg;
                let entry = if zero_copy {
                    opcode::SendMsgZc::new(fd, msg)
                        .flags(libc::MSG_WAITALL as u32)
                        .buf_index(fixed.then_some(0))
                        .build()
                } else {
                    opcode::SendMsg::new(fd, msg)
                        .flags(libc::MSG_WAITALL as u32)
                        .build()
                };
                let entry = entry.user_data((SEND << 56) | ((i as u64) << 32));
                // SAFETY: the message, its iovecs and the frames they point
                // at (in `buf`, never written again) stay alive and unchanged
                // until this send's last completion.
                while unsafe { ring.submission().push(&entry) }.is_err() {
                    ring.submit()?;
                }
                c.sending = true;
                sends_out += 1;
            }
            if !recv_posted[i] && !c.sent.is_empty() {
                let free = &mut c.rbuf[c.rlen..];
                let entry = opcode::Recv::new(
                    types::Fd(c.stream.as_raw_fd()),
                    free.as_mut_ptr(),
                    free.len() as u32,
                )
                .build()
                .user_data((RECV << 56) | ((i as u64) << 32));
                // SAFETY: the receive buffer is the connection's, not moved
                // or touched until this receive completes.
                while unsafe { ring.submission().push(&entry) }.is_err() {
                    ring.submit()?;
                }
                recv_posted[i] = true;
            }
        }
        if stopping && conns.iter().all(|c| c.sent.is_empty()) && sends_out == 0 {
            break;
        }
        if !tick_posted {
            let entry = opcode::Timeout::new(&tick)
                .build()
                .user_data(TICK_KIND << 56);
            // SAFETY: the timespec is read when the entry is submitted, and
            // lives until the ring is dropped anyway.
            while unsafe { ring.submission().push(&entry) }.is_err() {
                ring.submit()?;
            }
            tick_posted = true;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(err) if err.raw_os_error() == Some(libc::EINTR) => {}
            Err(err) => return Err(err),
        }
        let cqes: Vec<(u64, i32, u32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result(), c.flags()))
            .filter(|&(ud, _, _)| {
                let is_tick = ud >> 56 == TICK_KIND;
                tick_posted &= !is_tick;
                !is_tick
            })
            .collect();
        if cqes.is_empty() {
            if last_progress.elapsed() >= stall {
                let silent: Vec<usize> = (0..conns.len())
                    .filter(|&i| !conns[i].sent.is_empty())
                    .collect();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "baseline: node(s) {silent:?} answered nothing for {stall:?} ({} requests outstanding)",
                        conns.iter().map(|c| c.sent.len()).sum::<usize>()
                    ),
                ));
            }
            continue;
        }
        last_progress = Instant::now();
        for (ud, res, flags) in cqes {
            let i = ((ud >> 32) & 0xff_ffff) as usize;
            let c = &mut conns[i];
            if ud >> 56 == SEND {
                if fixed && (res == -libc::EINVAL || res == -libc::EFAULT) {
                    // This kernel has no vectored send from a registered
                    // buffer (before 6.15), and refused it before sending
                    // anything: the same message goes again, with pinning.
                    fixed = false;
                    let fd = types::Fd(c.stream.as_raw_fd());
                    let entry = opcode::SendMsgZc::new(fd, &raw const *c.msg)
                        .flags(libc::MSG_WAITALL as u32)
                        .build()
                        .user_data(ud);
                    // SAFETY: as for the first submission of this message.
                    while unsafe { ring.submission().push(&entry) }.is_err() {
                        ring.submit()?;
                    }
                    continue;
                }
                if res < 0 {
                    return Err(io::Error::from_raw_os_error(-res));
                }
                // A zero-copy send posts twice: its result (the data is
                // queued: the next send of the connection may start, as
                // netblk's next chain does), then the notification (the
                // kernel let go of the frames: the send is over).
                if !cqueue::notif(flags) {
                    c.sending = false;
                }
                if !cqueue::more(flags) {
                    sends_out -= 1;
                }
                continue;
            }
            recv_posted[i] = false;
            let mut freed = 0;
            if res <= 0 {
                return Err(io::Error::other(format!(
                    "node closed the connection ({res})"
                )));
            }
            c.rlen += res as usize;
            // Whole replies: skip payloads, count one piece each.
            let mut at = c.rstart;
            loop {
                if c.skip > 0 {
                    let n = c.skip.min(c.rlen - at);
                    c.skip -= n;
                    at += n;
                    if c.skip > 0 {
                        break;
                    }
                    continue;
                }
                if c.rlen - at < PREAMBLE_LEN {
                    break;
                }
                let p = &c.rbuf[at..at + PREAMBLE_LEN];
                let header = u32::from_be_bytes([p[8], p[9], p[10], p[11]]) as usize;
                let payload = u32::from_be_bytes([p[12], p[13], p[14], p[15]]) as usize;
                if c.rlen - at < PREAMBLE_LEN + header {
                    break;
                }
                at += PREAMBLE_LEN + header;
                c.skip = payload;
                let Some(sent) = c.sent.pop_front() else {
                    return Err(io::Error::other("a reply nobody asked for"));
                };
                result
                    .latencies_us
                    .push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                result.pieces += 1;
                result.bytes += u64::from(load.piece);
                freed += 1;
            }
            c.rstart = at;
            if c.rbuf.len() - c.rlen < (c.rbuf.len() / 4).min(256 << 10) {
                // Near the end: what is left of a reply moves to the start.
                c.rbuf.copy_within(at..c.rlen, 0);
                c.rlen -= at;
                c.rstart = 0;
            }
            // A slot is free again: on this connection, or, for random
            // pieces, on any (as a random offset's stripe unit is on any
            // node). Frames are never written after they are built, so any
            // may go, even one a zero-copy send still reads.
            for _ in 0..freed {
                let j = if load.random {
                    rng.below(n as u64) as usize
                } else {
                    i
                };
                // Any frame will do: they are never written.
                next_frame = (next_frame + 1) % slots;
                conns[j].idle.push(next_frame);
            }
        }
    }
    result.seconds = start.elapsed().as_secs_f64();
    drop(ring);
    drop(buf);
    Ok(result)
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    /// A node that takes requests and never answers fails the baseline
    /// once the stall limit has passed; it once waited for ever (a
    /// `netblk bench` that never ended, with the CI run around it).
    #[test]
    fn a_node_that_never_answers_fails_the_run_in_bounded_time() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        // Held open, never read from and never written to.
        let (_silent, _) = listener.accept().expect("accept");
        let load = WireLoad {
            write: false,
            piece: 4096,
            queues: 1,
            in_flight: 4,
            mode: SendMode::Copy,
            duration: Duration::from_millis(100),
            random: false,
        };
        let started = Instant::now();
        let err = drive(vec![client], load, 1 << 20, Duration::from_secs(1))
            .expect_err("a silent node is an error");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(err.to_string().contains("[0]"), "names the node: {err}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "took {:?}",
            started.elapsed()
        );
    }
}

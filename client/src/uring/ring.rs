//! The queue's ring: sized from what can be in flight, entries pushed so
//! that a linked chain never straddles two submissions, and completions
//! never lost to a full completion queue.
//!
//! io_uring ends a link at the end of each submission: a chain cut in two by
//! a submit in its middle runs as two independent chains, and on one socket
//! the second may start while the first still sends, interleaving frames.
//! So a chain is pushed only once the submission queue has room for all of
//! it. Completions are drained into a backlog whenever the kernel pushes
//! back (`EBUSY`: its overflow list is not yet flushed into the ring), and a
//! ring that ever dropped one (`EBADR`, or the overflow counter of a kernel
//! without `IORING_FEAT_NODROP`) fails the queue rather than hang a request.
//!
//! The kernel may take fewer entries than were queued. At a chain's end
//! that is harmless (the rest goes with the next submit); in a chain's
//! middle (it ran out of memory for requests there) it has already started
//! the first part as a chain of its own, and the rest would run as
//! another, so the queue fails instead. `EAGAIN` (no memory for requests,
//! nothing taken) is tried again after a pause that doubles, for a bounded
//! time, never in a busy loop.

use std::collections::VecDeque;
use std::io;
use std::time::Duration;

use io_uring::{IoUring, squeue, types};

/// The kernel's limits on ring sizes (`IORING_MAX_ENTRIES`, `IORING_MAX_CQ_ENTRIES`).
const MAX_SQ: u32 = 32768;
const MAX_CQ: u32 = 2 * MAX_SQ;

/// Submission and completion queue sizes for a queue of `depth` tags over
/// `nodes` connections whose send chains are at most `chain` entries long.
///
/// The submission queue holds a whole round of the driver loop: a frontend
/// command per tag (ublk: COMMIT_AND_FETCH), a chain and a receive per
/// connection, the doorbell read and a cancel. The completion queue holds
/// twice that, since every zero-copy send completes twice (the send, then
/// its notification); beyond it the kernel keeps overflowing completions
/// (`IORING_FEAT_NODROP`) until they are reaped.
pub(super) fn ring_sizes(depth: u16, nodes: usize, chain: usize) -> (u32, u32) {
    let per_conn = chain as u64 + 2;
    let round = u64::from(depth) + nodes as u64 * per_conn + 4;
    let sq = round
        .max(2 * chain as u64)
        .clamp(64, u64::from(MAX_SQ))
        .next_power_of_two() as u32;
    let cq = (2 * u64::from(sq)).min(u64::from(MAX_CQ)) as u32;
    (sq, cq)
}

/// A completion as the driver handles it: user data, result, flags.
pub(super) type Cqe = (u64, i32, u32);

/// The pause after the first `EAGAIN`; each next one doubles it, up to
/// `PAUSE_MAX`, and after `EAGAIN_MAX` in a row the queue fails (about
/// 6 s of a kernel that cannot take a single request).
const PAUSE_MIN: Duration = Duration::from_millis(1);
const PAUSE_MAX: Duration = Duration::from_millis(64);
const EAGAIN_MAX: u32 = 100;

pub(super) struct Ring {
    ring: IoUring,
    /// Completions taken off the ring while submitting, not yet handled.
    backlog: VecDeque<Cqe>,
    /// The lengths of the chains queued and not yet taken by the kernel,
    /// oldest first (the first one may have lost its taken part already:
    /// never, since a chain taken in part fails the ring).
    chains: VecDeque<usize>,
    /// `EAGAIN`s in a row.
    pushed_back: u32,
}

impl Ring {
    /// A ring with `sq` submission and `cq` completion entries, for one
    /// thread (deferred task work where the kernel has it, 6.1+).
    pub(super) fn new(sq: u32, cq: u32) -> io::Result<Ring> {
        let ring = IoUring::builder()
            .setup_cqsize(cq)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(sq)
            .or_else(|_| {
                IoUring::builder()
                    .setup_cqsize(cq)
                    .setup_single_issuer()
                    .setup_coop_taskrun()
                    .build(sq)
            })
            .or_else(|_| IoUring::builder().setup_cqsize(cq).build(sq))?;
        if !ring.params().is_feature_nodrop() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this kernel's io_uring may drop completions (no IORING_FEAT_NODROP)",
            ));
        }
        Ok(Ring {
            ring,
            backlog: VecDeque::new(),
            chains: VecDeque::new(),
            pushed_back: 0,
        })
    }

    pub(super) fn submitter(&self) -> io_uring::Submitter<'_> {
        self.ring.submitter()
    }

    /// Pushes `entries`, a linked chain (every entry but the last carries
    /// `IO_LINK` or `IO_HARDLINK`), into one submission: if the submission
    /// queue has no room for all of them, what is queued is submitted first.
    ///
    /// # Safety
    /// Whatever the entries point at stays valid until their completions
    /// (and, for zero-copy sends, their notifications) have been reaped.
    pub(super) unsafe fn push_chain(&mut self, entries: &[squeue::Entry]) -> io::Result<()> {
        let capacity = self.ring.submission().capacity();
        if entries.len() > capacity {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a chain of {} entries does not fit a submission queue of {capacity}",
                    entries.len()
                ),
            ));
        }
        while capacity - self.ring.submission().len() < entries.len() {
            self.submit()?;
        }
        let mut sq = self.ring.submission();
        // SAFETY: the caller keeps what the entries point at alive until
        // their completions; there is room for all of them (checked above),
        // so the chain goes into the queue whole.
        unsafe { sq.push_multiple(entries) }
            .map_err(|_| io::Error::other("submission queue full after making room"))?;
        drop(sq);
        if !entries.is_empty() {
            self.chains.push_back(entries.len());
        }
        Ok(())
    }

    /// Submits what is queued. A kernel that pushes back because completions
    /// are waiting (`EBUSY`) gets them taken into the backlog first.
    pub(super) fn submit(&mut self) -> io::Result<()> {
        self.submit_by(IoUring::submit)
    }

    /// [`Ring::submit`] with `enter` as the `io_uring_enter` that submits
    /// (a stand-in in tests: the kernel's refusals are hard to provoke).
    fn submit_by(
        &mut self,
        mut enter: impl FnMut(&IoUring) -> io::Result<usize>,
    ) -> io::Result<()> {
        loop {
            match enter(&self.ring) {
                Ok(taken) => return self.taken(taken),
                Err(err) => match err.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EAGAIN) => self.pause()?,
                    Some(libc::EBUSY) => self.drain()?,
                    _ => return Err(self.explain(err)),
                },
            }
        }
    }

    /// The kernel took the `taken` oldest queued entries: whole chains, or
    /// the queue cannot go on (the rest of a chain would run on its own).
    fn taken(&mut self, mut taken: usize) -> io::Result<()> {
        self.pushed_back = 0;
        while taken > 0 {
            let Some(&len) = self.chains.front() else {
                return Ok(());
            };
            if taken < len {
                return Err(io::Error::other(format!(
                    "io_uring took {taken} of a linked chain's {len} entries (out of memory for requests?): the rest would run as a chain of its own, so the queue cannot go on"
                )));
            }
            taken -= len;
            self.chains.pop_front();
        }
        Ok(())
    }

    /// After an `EAGAIN` (nothing taken: no memory for requests): waiting
    /// completions moved out, then a pause that doubles with every `EAGAIN`
    /// in a row; too many in a row fail the queue.
    fn pause(&mut self) -> io::Result<()> {
        self.pushed_back += 1;
        if self.pushed_back > EAGAIN_MAX {
            return Err(io::Error::other(format!(
                "io_uring refused every submission (EAGAIN: no memory for requests) {EAGAIN_MAX} times in a row"
            )));
        }
        self.drain()?;
        let pause = PAUSE_MIN
            .saturating_mul(1 << (self.pushed_back - 1).min(6))
            .min(PAUSE_MAX);
        std::thread::sleep(pause);
        Ok(())
    }

    /// Submits, then waits for at least one completion or `timeout`.
    pub(super) fn submit_and_wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        if !self.backlog.is_empty() || !self.ring.completion().is_empty() {
            return self.submit();
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
            // What was taken is counted even when the wait was cut short.
            Ok(taken) => self.taken(taken),
            Err(err) => match err.raw_os_error() {
                // Nothing was taken (else its count would be the answer).
                Some(libc::ETIME | libc::EINTR) => Ok(()),
                // The caller's loop comes back: after a pause, not at once.
                Some(libc::EAGAIN) => self.pause(),
                // Completions are waiting in the kernel's overflow list:
                // reaping makes room for them.
                Some(libc::EBUSY) => self.drain(),
                _ => Err(self.explain(err)),
            },
        }
    }

    /// Every completion available now, backlog first.
    pub(super) fn completions(&mut self) -> io::Result<Vec<Cqe>> {
        self.drain()?;
        Ok(self.backlog.drain(..).collect())
    }

    /// Moves the ring's completions into the backlog.
    fn drain(&mut self) -> io::Result<()> {
        let mut cq = self.ring.completion();
        if cq.overflow() > 0 {
            return Err(io::Error::other(format!(
                "io_uring dropped {} completions",
                cq.overflow()
            )));
        }
        self.backlog
            .extend(cq.by_ref().map(|c| (c.user_data(), c.result(), c.flags())));
        cq.sync();
        Ok(())
    }

    fn explain(&self, err: io::Error) -> io::Error {
        if err.raw_os_error() == Some(libc::EBADR) {
            io::Error::other("io_uring dropped a completion (EBADR): the queue cannot go on")
        } else {
            err
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::opcode;

    #[test]
    fn sizes_grow_with_depth_and_nodes_and_stay_within_the_kernel_limits() {
        let (sq, cq) = ring_sizes(64, 1, 64);
        assert!(sq >= 64 + 66 && sq.is_power_of_two(), "{sq}");
        assert_eq!(cq, 2 * sq);
        let (sq, _) = ring_sizes(4096, 16, 64);
        assert!(sq >= 4096 + 16 * 66, "{sq}");
        let (sq, cq) = ring_sizes(u16::MAX, 4096, 64);
        assert_eq!((sq, cq), (MAX_SQ, MAX_CQ));
        let (sq, _) = ring_sizes(1, 1, 200);
        assert!(sq >= 400);
    }

    /// A linked chain pushed into a nearly full submission queue goes out
    /// whole: when its head fails, every linked entry after it is cancelled.
    /// Cut in two by a submit, the tail would run on its own and succeed.
    #[test]
    fn a_chain_is_never_split_across_submissions() {
        let mut ring = Ring::new(8, 16).expect("ring");
        let nop = |ud: u64| opcode::Nop::new().build().user_data(ud);
        for ud in 0..6 {
            // SAFETY: a NOP points at nothing.
            unsafe { ring.push_chain(&[nop(ud)]) }.expect("push");
        }
        // A read from a descriptor that is not open fails with EBADF.
        let mut byte = 0u8;
        let head = opcode::Read::new(types::Fd(-1), &raw mut byte, 1)
            .build()
            .user_data(100)
            .flags(squeue::Flags::IO_LINK);
        let chain = [
            head,
            nop(101).flags(squeue::Flags::IO_LINK),
            nop(102).flags(squeue::Flags::IO_LINK),
            nop(103),
        ];
        // SAFETY: `byte` outlives the ring's use of it: the test waits for
        // every completion below before it goes out of scope.
        unsafe { ring.push_chain(&chain) }.expect("push chain");
        ring.submit().expect("submit");
        let mut seen = Vec::new();
        while seen.len() < 10 {
            ring.submit_and_wait(Some(Duration::from_secs(5)))
                .expect("wait");
            seen.extend(ring.completions().expect("completions"));
        }
        seen.sort_unstable();
        let results: Vec<(u64, i32)> = seen.iter().map(|(ud, res, _)| (*ud, *res)).collect();
        assert_eq!(
            &results[..6],
            &[(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (5, 0)]
        );
        assert_eq!(results[6], (100, -libc::EBADF));
        for (ud, res) in &results[7..] {
            assert_eq!(*res, -libc::ECANCELED, "entry {ud} ran outside its chain");
        }
    }

    #[test]
    fn a_chain_longer_than_the_queue_is_refused() {
        let mut ring = Ring::new(4, 8).expect("ring");
        let nops: Vec<squeue::Entry> = (0..5).map(|_| opcode::Nop::new().build()).collect();
        // SAFETY: NOPs point at nothing.
        let err = unsafe { ring.push_chain(&nops) }.expect_err("too long");
        assert!(err.to_string().contains("does not fit"), "{err}");
    }

    /// More completions than the completion queue holds, without reaping in
    /// between: none is lost.
    #[test]
    fn completions_beyond_the_queue_size_are_all_delivered() {
        let mut ring = Ring::new(16, 32).expect("ring");
        let total = 500u64;
        for ud in 0..total {
            // SAFETY: a NOP points at nothing.
            unsafe { ring.push_chain(&[opcode::Nop::new().build().user_data(ud)]) }.expect("push");
        }
        ring.submit().expect("submit");
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while (seen.len() as u64) < total && std::time::Instant::now() < deadline {
            ring.submit_and_wait(Some(Duration::from_millis(100)))
                .expect("wait");
            seen.extend(ring.completions().expect("completions"));
        }
        let mut ids: Vec<u64> = seen.iter().map(|c| c.0).collect();
        ids.sort_unstable();
        assert_eq!(ids, (0..total).collect::<Vec<_>>());
    }

    /// The kernel took part of a chain (it ran out of memory for requests
    /// in its middle): the rest must not go out as a chain of its own.
    #[test]
    fn a_chain_the_kernel_took_in_part_fails_the_ring() {
        let mut ring = Ring::new(8, 16).expect("ring");
        let nop = |ud: u64| opcode::Nop::new().build().user_data(ud);
        let chain = [
            nop(1).flags(squeue::Flags::IO_LINK),
            nop(2).flags(squeue::Flags::IO_LINK),
            nop(3),
        ];
        // SAFETY: NOPs point at nothing.
        unsafe { ring.push_chain(&[nop(0)]) }.expect("push");
        // SAFETY: as above.
        unsafe { ring.push_chain(&chain) }.expect("push chain");
        let err = ring.submit_by(|_| Ok(3)).expect_err("a split chain");
        assert!(err.to_string().contains("linked chain"), "{err}");
    }

    /// `EAGAIN` (no memory for requests): tried again after a pause that
    /// grows, not at once in a loop.
    #[test]
    fn eagain_is_tried_again_after_a_pause() {
        let mut ring = Ring::new(8, 16).expect("ring");
        let start = std::time::Instant::now();
        let mut calls = 0u32;
        ring.submit_by(|_| {
            calls += 1;
            if start.elapsed() < Duration::from_millis(30) {
                Err(io::Error::from_raw_os_error(libc::EAGAIN))
            } else {
                Ok(0)
            }
        })
        .expect("submitted once the kernel took it");
        assert!(calls <= 8, "{calls} calls in 30 ms: a busy loop");
    }
}

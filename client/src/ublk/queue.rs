//! One ublk queue as a [`Frontend`]: FETCH / COMMIT_AND_FETCH commands on
//! the queue's ring, request descriptors read from the driver's shared
//! array, requests handed to the engine.
//!
//! Copy mode: each tag's buffer is ours (the registered tag buffer); the
//! driver copies write data into it before a request arrives and read data
//! out of it at commit. Zero-copy mode (`UBLK_F_AUTO_BUF_REG`): the driver
//! registers the request's own pages in the ring at index = tag before the
//! request arrives, and unregisters them at commit.
//!
//! A queue that gives up (a ublk command failed, or the test hook's
//! [`FailSwitch`] was pulled) says why in [`UblkQueue::failure`], which the
//! daemon's supervisor reads once the queue thread has ended.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use io_uring::{opcode, squeue, types};

use super::sys::{self, IoCmd, IoDesc};
use crate::engine::{BlockRequest, Completion, Engine, Op, Tag};
use crate::uring::{BufferMode, Doorbell, Frontend, TagBuffers, frontend_user_data};

/// The driver's request descriptors of one queue, mapped read-only.
struct Descriptors {
    base: NonNull<IoDesc>,
    len: usize,
    depth: u16,
}

// SAFETY: the mapping is owned by this value and only read; the queue thread
// that owns it is the only reader.
unsafe impl Send for Descriptors {}

impl Descriptors {
    fn map(cdev: &File, queue: u16, depth: u16) -> io::Result<Descriptors> {
        // SAFETY: sysconf takes an integer and returns one.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let bytes = usize::from(depth) * std::mem::size_of::<IoDesc>();
        let len = bytes.div_ceil(page) * page;
        let max_depth_bytes =
            usize::from(sys::UBLK_MAX_QUEUE_DEPTH) * std::mem::size_of::<IoDesc>();
        let stride = max_depth_bytes.div_ceil(page) * page;
        let offset = sys::UBLKSRV_CMD_BUF_OFFSET + (usize::from(queue) * stride) as i64;
        // SAFETY: maps `len` bytes of the ublk char device at the queue's
        // descriptor offset, read-only and shared; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                cdev.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(ptr.cast::<IoDesc>())
            .ok_or_else(|| io::Error::other("mmap of ublk descriptors returned null"))?;
        Ok(Descriptors { base, len, depth })
    }

    /// The descriptor of `tag`, as the driver wrote it before completing the
    /// tag's FETCH.
    fn get(&self, tag: Tag) -> IoDesc {
        assert!(tag < self.depth);
        // SAFETY: tag < depth, so the element lies inside the mapping; the
        // driver wrote it before the FETCH completion we are handling, and
        // does not change it until we commit the tag. read_volatile because
        // the memory is shared with the kernel.
        unsafe { std::ptr::read_volatile(self.base.as_ptr().add(usize::from(tag))) }
    }
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `map`.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// Test hook only (`NETBLK_TEST_FAIL_QUEUE`, see
/// [`super::device::FailQueue`]): pulled, it makes its queue fail as if its
/// ring had broken: the queue takes no more requests (those the kernel hands
/// it stay unanswered and go to the next daemon at recovery) and its thread
/// ends once the requests it already has are done. Only a queue armed with
/// one has a wake descriptor; the others' data path is unchanged.
pub struct FailSwitch {
    pulled: AtomicBool,
    doorbell: Doorbell,
}

impl FailSwitch {
    pub fn new() -> io::Result<Arc<FailSwitch>> {
        Ok(Arc::new(FailSwitch {
            pulled: AtomicBool::new(false),
            doorbell: Doorbell::new()?,
        }))
    }

    /// Makes the queue fail; it notices at once, even when idle.
    pub fn pull(&self) {
        self.pulled.store(true, Ordering::Release);
        self.doorbell.ring();
    }

    fn is_pulled(&self) -> bool {
        self.pulled.load(Ordering::Acquire)
    }
}

/// One ublk queue in copy mode.
pub struct UblkQueue {
    cdev: File,
    queue: u16,
    descriptors: Descriptors,
    /// What each tag's commands carry in `addr`: the tag buffer's address
    /// (copy mode), or the auto buffer registration (index = tag).
    buffer_addrs: Vec<u64>,
    sqes: Vec<squeue::Entry>,
    /// Tags whose command the driver holds (fetch outstanding).
    outstanding: u16,
    /// The device is going away: do not fetch again.
    aborting: bool,
    auto_buf_reg: bool,
    /// The device has `UBLK_F_USER_COPY`: request data can be read and
    /// written on the char device.
    user_copy: bool,
    pub requests: u64,
    /// Why this queue gave up, if it did: the first ublk command that
    /// failed, or the test hook.
    failure: Option<String>,
    /// The queue takes no more requests and ends as soon as the engine is
    /// idle (test hook).
    given_up: bool,
    fail_switch: Option<Arc<FailSwitch>>,
}

impl UblkQueue {
    /// Opens the device's char device (`/dev/ublkcN`); the driver allows one
    /// open, which every queue shares.
    pub fn open_cdev(dev_id: u32) -> io::Result<File> {
        let path = format!("/dev/ublkc{dev_id}");
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))
    }

    /// Sets up queue `queue` on the open char device; its FETCH commands go
    /// out with the first poll.
    pub fn new(
        cdev: &File,
        queue: u16,
        depth: u16,
        buffers: &TagBuffers,
        mode: BufferMode,
    ) -> io::Result<UblkQueue> {
        let auto_buf_reg = mode != BufferMode::User;
        let user_copy = matches!(
            mode,
            BufferMode::Kernel {
                user_copy: true,
                ..
            }
        );
        let cdev = cdev.try_clone()?;
        let descriptors = Descriptors::map(&cdev, queue, depth)?;
        let buffer_addrs = (0..depth)
            .map(|tag| {
                if auto_buf_reg {
                    // struct ublk_auto_buf_reg { index: tag, flags: 0 }
                    u64::from(tag)
                } else {
                    buffers.tag_ptr(tag) as u64
                }
            })
            .collect();
        let mut q = UblkQueue {
            cdev,
            queue,
            descriptors,
            buffer_addrs,
            sqes: Vec::with_capacity(usize::from(depth)),
            outstanding: 0,
            aborting: false,
            auto_buf_reg,
            user_copy,
            requests: 0,
            failure: None,
            given_up: false,
            fail_switch: None,
        };
        for tag in 0..depth {
            q.command(sys::UBLK_U_IO_FETCH_REQ, tag, 0);
        }
        Ok(q)
    }

    /// Arms the test hook's switch on this queue (before its thread starts).
    pub fn arm_fail_switch(&mut self, switch: Arc<FailSwitch>) {
        self.fail_switch = Some(switch);
    }

    /// Why the queue gave up, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    fn command(&mut self, op: u32, tag: Tag, result: i32) {
        let addr = self.buffer_addrs[usize::from(tag)];
        let cmd = IoCmd {
            q_id: self.queue,
            tag,
            result,
            // With auto registration the command's addr must be 0; the
            // registration travels in the SQE's addr instead.
            addr: if self.auto_buf_reg { 0 } else { addr },
        };
        let mut bytes = [0u8; 16];
        bytes[0..2].copy_from_slice(&cmd.q_id.to_ne_bytes());
        bytes[2..4].copy_from_slice(&cmd.tag.to_ne_bytes());
        bytes[4..8].copy_from_slice(&cmd.result.to_ne_bytes());
        bytes[8..16].copy_from_slice(&cmd.addr.to_ne_bytes());
        let mut entry = opcode::UringCmd16::new(types::Fd(self.cdev.as_raw_fd()), op).cmd(bytes);
        if self.auto_buf_reg {
            // The driver reads the auto registration from the SQE's addr.
            entry = entry.addr(Some(addr));
        }
        let entry = entry.build().user_data(frontend_user_data(u64::from(tag)));
        self.sqes.push(entry);
        self.outstanding += 1;
    }

    /// The engine request for a descriptor, or the errno to answer it with.
    fn request(&self, tag: Tag, desc: &IoDesc) -> Result<BlockRequest, i32> {
        let offset = desc.start_sector << 9;
        let len = u64::from(desc.nr_sectors) << 9;
        let op = match desc.op() {
            sys::UBLK_IO_OP_READ => Op::Read,
            sys::UBLK_IO_OP_WRITE => Op::Write {
                fua: desc.flags() & (sys::UBLK_IO_F_FUA >> 8) != 0,
            },
            sys::UBLK_IO_OP_FLUSH => Op::Flush,
            sys::UBLK_IO_OP_DISCARD => Op::Discard,
            sys::UBLK_IO_OP_WRITE_ZEROES => Op::WriteZeroes,
            _ => return Err(libc::EOPNOTSUPP),
        };
        Ok(BlockRequest {
            tag,
            op,
            offset,
            len,
        })
    }
}

impl UblkQueue {
    /// Where a read or write on the char device reaches byte `offset` of
    /// `tag`'s data, if the device allows user copy.
    fn user_copy_at(&self, tag: Tag, offset: u32) -> io::Result<u64> {
        if !self.user_copy {
            return Err(io::ErrorKind::Unsupported.into());
        }
        Ok(sys::user_copy_offset(self.queue, tag, offset))
    }
}

/// A user copy that moved fewer bytes than asked failed.
fn whole(moved: usize, len: usize, tag: Tag) -> io::Result<()> {
    if moved == len {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "user copy of tag {tag} moved {moved} of {len} bytes"
        )))
    }
}

impl Frontend for UblkQueue {
    fn poll(&mut self, _: &mut Engine, _: &TagBuffers, _: Instant) -> bool {
        if let Some(switch) = &self.fail_switch
            && switch.is_pulled()
            && !self.given_up
        {
            self.given_up = true;
            self.failure.get_or_insert_with(|| {
                format!(
                    "made to fail by the {} test hook",
                    super::device::FAIL_QUEUE_ENV
                )
            });
        }
        let done = self.given_up || (self.aborting && self.outstanding == 0);
        !done
    }

    fn wake_fd(&self) -> Option<RawFd> {
        self.fail_switch.as_ref().map(|s| s.doorbell.fd())
    }

    fn take_sqes(&mut self, out: &mut Vec<squeue::Entry>) {
        out.append(&mut self.sqes);
    }

    fn copy_in(&self, tag: Tag, offset: u32, src: &[u8]) -> io::Result<()> {
        let moved = self.cdev.write_at(src, self.user_copy_at(tag, offset)?)?;
        whole(moved, src.len(), tag)
    }

    fn copy_out(&self, tag: Tag, offset: u32, dst: &mut [u8]) -> io::Result<()> {
        let moved = self.cdev.read_at(dst, self.user_copy_at(tag, offset)?)?;
        whole(moved, dst.len(), tag)
    }

    fn on_cqe(&mut self, detail: u64, result: i32, engine: &mut Engine, now: Instant) {
        let tag = detail as Tag;
        self.outstanding = self.outstanding.saturating_sub(1);
        if result == sys::UBLK_IO_RES_ABORT || result < 0 {
            // The device is stopping (or the command failed): this tag is done.
            if result != sys::UBLK_IO_RES_ABORT && !self.aborting {
                let why = format!(
                    "ublk command of tag {tag} failed: {}",
                    io::Error::from_raw_os_error(-result)
                );
                tracing::error!(queue = self.queue, "{why}");
                self.failure.get_or_insert(why);
            }
            self.aborting = true;
            return;
        }
        if self.given_up {
            // As with a broken ring: the request stays unanswered; the
            // kernel requeues it for the next daemon (or fails it) once
            // this one is gone.
            return;
        }
        let desc = self.descriptors.get(tag);
        self.requests += 1;
        match self.request(tag, &desc) {
            Ok(request) => {
                if engine.handle_request(now, request).is_err() {
                    self.command(sys::UBLK_U_IO_COMMIT_AND_FETCH_REQ, tag, -libc::EIO);
                }
            }
            Err(errno) => self.command(sys::UBLK_U_IO_COMMIT_AND_FETCH_REQ, tag, -errno),
        }
    }

    fn complete(&mut self, c: Completion, _: &TagBuffers) {
        let result = match c.result {
            Ok(bytes) => i32::try_from(bytes).unwrap_or(i32::MAX),
            Err(errno) => -errno,
        };
        // Even while the device stops, a request we took must be committed;
        // the driver then answers the re-fetch with ABORT.
        self.command(sys::UBLK_U_IO_COMMIT_AND_FETCH_REQ, c.tag, result);
    }

    fn fail(&mut self, _tags: &[Tag]) {
        self.aborting = true;
    }
}

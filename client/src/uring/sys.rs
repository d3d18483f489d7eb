//! Kernel facilities around the ring: the doorbell eventfd, socket options,
//! and probes of what this kernel's io_uring can do.

use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use io_uring::{IoUring, opcode, squeue, types};

use super::SendMode;

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

/// Runs one operation on a fresh ring with `buf` registered as buffer 0,
/// built by `op` from the buffer's address; its result.
fn on_registered(buf: &mut [u8], op: impl FnOnce(*mut u8) -> squeue::Entry) -> io::Result<i32> {
    let mut ring = IoUring::new(4)?;
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: `buf` is borrowed for this whole function, so it outlives the
    // ring (and with it the registration), dropped before we return.
    unsafe { ring.submitter().register_buffers(&iov)? };
    let entry = op(buf.as_mut_ptr()).user_data(1);
    // SAFETY: the entry points into `buf` (its caller's contract), which is
    // registered above and alive until the ring is gone; we wait for the
    // completion below.
    unsafe { ring.submission().push(&entry) }.map_err(|_| io::Error::other("sq full"))?;
    ring.submit_and_wait(1)?;
    let res = ring.completion().next().map_or(-1, |c| c.result());
    drop(ring);
    Ok(res)
}

/// Whether this kernel's plain `RECV` honours `IORING_RECVSEND_FIXED_BUF`
/// (Linux 7.2+): tried for real on a socketpair with a registered buffer.
pub fn probe_recv_fixed() -> bool {
    let attempt = || -> io::Result<bool> {
        let (a, b) = std::os::unix::net::UnixStream::pair()?;
        std::io::Write::write_all(&mut &a, b"netblk")?;
        let mut buf = vec![0u8; 4096];
        let res = on_registered(&mut buf, |at| {
            opcode::Recv::new(types::Fd(b.as_raw_fd()), at, 6)
                .ioprio(IORING_RECVSEND_FIXED_BUF)
                .buf_group(0)
                .build()
        })?;
        Ok(res == 6 && &buf[..6] == b"netblk")
    };
    attempt().unwrap_or(false)
}

/// Whether this kernel's plain `SEND` honours `IORING_RECVSEND_FIXED_BUF`
/// (Linux 7.2+, with the fixed `RECV`): tried once for real on a
/// socketpair with a registered buffer, and remembered.
pub fn probe_send_fixed() -> bool {
    static PROBED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PROBED.get_or_init(|| {
        let attempt = || -> io::Result<bool> {
            let (a, b) = std::os::unix::net::UnixStream::pair()?;
            let mut buf = b"netblk".to_vec();
            let res = on_registered(&mut buf, |at| {
                opcode::Send::new(types::Fd(a.as_raw_fd()), at.cast_const(), 6)
                    .ioprio(IORING_RECVSEND_FIXED_BUF)
                    .buf_group(0)
                    .build()
            })?;
            if res != 6 {
                return Ok(false);
            }
            b.set_nonblocking(true)?;
            let mut got = [0u8; 6];
            let n = std::io::Read::read(&mut &b, &mut got)?;
            Ok(n == 6 && &got == b"netblk")
        };
        attempt().unwrap_or(false)
    })
}

/// Whether this kernel sends a vectored `SENDMSG_ZC` from a registered
/// buffer (`IORING_RECVSEND_FIXED_BUF`, Linux 6.15+): tried once for real, a
/// UDP datagram to itself on 127.0.0.1, and remembered.
pub fn probe_sendmsg_zc_fixed() -> bool {
    static PROBED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PROBED.get_or_init(|| {
        let works = try_sendmsg_zc_fixed().unwrap_or(false);
        tracing::debug!(works, "vectored zero-copy send from a registered buffer");
        works
    })
}

fn try_sendmsg_zc_fixed() -> io::Result<bool> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    socket.connect(socket.local_addr()?)?;
    socket.set_read_timeout(Some(std::time::Duration::from_secs(1)))?;
    // Declared before the ring, so dropped after it on every path.
    let mut buf = *b"..netblk..";
    let iov = [libc::iovec {
        iov_base: buf[2..].as_mut_ptr().cast(),
        iov_len: 6,
    }];
    // SAFETY: msghdr is plain data; all zeroes is an empty message.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr().cast_mut();
    msg.msg_iovlen = 1;
    let mut ring = IoUring::new(4)?;
    let whole = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: `buf` is declared before the ring, so it outlives the ring
    // (and with it the registration) on every path out of this function.
    unsafe { ring.submitter().register_buffers(&whole)? };
    let entry = opcode::SendMsgZc::new(types::Fd(socket.as_raw_fd()), &raw const msg)
        .buf_index(Some(0))
        .build()
        .user_data(1);
    // SAFETY: the message, its iovec and the bytes live until the ring is
    // gone; every completion is waited for below.
    unsafe { ring.submission().push(&entry) }.map_err(|_| io::Error::other("sq full"))?;
    let mut sent = -1;
    // The result, then (if it sent) the notification.
    for _ in 0..2 {
        ring.submit_and_wait(1)?;
        let Some(cqe) = ring.completion().next() else {
            break;
        };
        if !io_uring::cqueue::notif(cqe.flags()) {
            sent = cqe.result();
        }
        if !io_uring::cqueue::more(cqe.flags()) {
            break;
        }
    }
    drop(ring);
    let mut got = [0u8; 16];
    Ok(sent == 6 && socket.recv(&mut got).ok() == Some(6) && &got[..6] == b"netblk")
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

/// `IORING_RECVSEND_FIXED_BUF`: the receive's buffer is a registered one.
pub(super) const IORING_RECVSEND_FIXED_BUF: u16 = 1 << 2;

/// Tears a TCP connection down at once, whatever the peer does: shuts it
/// down (operations waiting on it finish) and resets it (`connect` with
/// `AF_UNSPEC`: the kernel sends a RST and frees its send queue, so every
/// zero-copy notification comes back even when the peer stopped reading or
/// vanished). The descriptor stays open; the ring may still hold it. A
/// kernel TLS socket refuses the reset (newer kernels): it gets linger 0
/// here like every socket, and the driver closes it as soon as the ring
/// holds none of its operations, which resets it then.
pub fn abort(socket: &TcpStream) {
    let _ = socket2::SockRef::from(socket).set_linger(Some(std::time::Duration::ZERO));
    let _ = socket.shutdown(std::net::Shutdown::Both);
    // SAFETY: a zeroed sockaddr with family AF_UNSPEC, its size passed with
    // it; the descriptor belongs to `socket`, open for the whole call.
    let rc = unsafe {
        let mut addr: libc::sockaddr = std::mem::zeroed();
        addr.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
        libc::connect(
            socket.as_raw_fd(),
            &raw const addr,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "no reset by AF_UNSPEC (kernel TLS?): reset at close"
        );
    }
}

//! Userspace TLS where the kernel has none: a thread moves bytes between
//! the TLS connection and one end of a loopback TCP pair, decrypting and
//! encrypting with rustls; the other end is what the caller uses, as if
//! the connection were plaintext (so the node's connection code and the
//! client's ring need no second kind of socket).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;

use rustls::Connection;

use crate::handshake::pending_plaintext;

/// Most decrypted bytes held for the inner socket before the relay stops
/// reading the outer one.
const HOLD: usize = 4 << 20;

/// A loopback TCP pair: (ours, theirs). Connections to the temporary
/// listener from anyone but `ours` are turned away.
fn pair() -> io::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind(("127.0.0.1", 0))?;
    let ours = TcpStream::connect(listener.local_addr()?)?;
    let me = ours.local_addr()?;
    for _ in 0..16 {
        let (theirs, peer) = listener.accept()?;
        if peer == me {
            ours.set_nodelay(true)?;
            theirs.set_nodelay(true)?;
            return Ok((ours, theirs));
        }
        tracing::warn!(%peer, "a stranger connected to a TLS relay's private listener: turned away");
    }
    Err(io::Error::other("could not pair a TLS relay's sockets"))
}

/// Relays `tls` over `outer` (its handshake done; `pending` is plaintext
/// it already decrypted) and returns the plaintext end. The relay ends,
/// closing both, when either side is done or fails.
pub fn relay(outer: TcpStream, tls: Connection, pending: Vec<u8>) -> io::Result<TcpStream> {
    let (ours, theirs) = pair()?;
    std::thread::Builder::new()
        .name("tls-relay".into())
        .spawn(move || {
            match pump(&outer, tls, &theirs, pending) {
                Ok(()) => {
                    let _ = outer.shutdown(Shutdown::Both);
                    let _ = theirs.shutdown(Shutdown::Both);
                }
                Err(err) => {
                    // A side failed or was reset (the client tearing a
                    // connection down at a deadline): reset the other at
                    // once too. A graceful close would still send what is
                    // queued, stale requests included.
                    tracing::debug!(error = %err, "TLS relay ended");
                    reset(&outer);
                    reset(&theirs);
                }
            }
        })?;
    Ok(ours)
}

/// Closes `socket` with a reset when its last descriptor goes (linger 0),
/// and wakes whatever waits on it.
fn reset(socket: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a linger struct that lives across the call, its size passed
    // with it; the descriptor belongs to `socket`, open for the call.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    let _ = socket.shutdown(Shutdown::Read);
}

fn would_block(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::WouldBlock
}

fn pump(
    outer: &TcpStream,
    mut tls: Connection,
    inner: &TcpStream,
    mut to_inner: Vec<u8>,
) -> io::Result<()> {
    outer.set_nonblocking(true)?;
    inner.set_nonblocking(true)?;
    tls.set_buffer_limit(None);
    let mut buf = vec![0u8; 64 << 10];
    let (mut outer_eof, mut inner_eof) = (false, false);
    let (mut inner_shut, mut close_sent, mut outer_shut) = (false, false, false);
    loop {
        if to_inner.len() < HOLD {
            pending_plaintext(&mut tls, &mut to_inner)?;
        }
        while !to_inner.is_empty() {
            match (&*inner).write(&to_inner) {
                Ok(n) => {
                    to_inner.drain(..n);
                }
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(e),
            }
        }
        if outer_eof && to_inner.is_empty() && !inner_shut {
            let _ = inner.shutdown(Shutdown::Write);
            inner_shut = true;
        }
        if inner_eof && !close_sent {
            tls.send_close_notify();
            close_sent = true;
        }
        while tls.wants_write() {
            match tls.write_tls(&mut &*outer) {
                Ok(_) => {}
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(e),
            }
        }
        if close_sent && !tls.wants_write() && !outer_shut {
            let _ = outer.shutdown(Shutdown::Write);
            outer_shut = true;
        }
        if inner_shut && outer_shut {
            return Ok(());
        }
        let mut fds = [
            libc::pollfd {
                fd: outer.as_raw_fd(),
                events: if !outer_eof && to_inner.len() < HOLD {
                    libc::POLLIN
                } else {
                    0
                } | if tls.wants_write() { libc::POLLOUT } else { 0 },
                revents: 0,
            },
            libc::pollfd {
                fd: inner.as_raw_fd(),
                events: if !inner_eof && !tls.wants_write() {
                    libc::POLLIN
                } else {
                    0
                } | if to_inner.is_empty() {
                    0
                } else {
                    libc::POLLOUT
                },
                revents: 0,
            },
        ];
        // SAFETY: two pollfd structs that live across the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        let ready =
            |f: &libc::pollfd| f.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
        if !outer_eof && ready(&fds[0]) {
            loop {
                match tls.read_tls(&mut &*outer) {
                    Ok(0) => {
                        outer_eof = true;
                        break;
                    }
                    Ok(_) => {
                        if let Err(err) = tls.process_new_packets() {
                            // Tell the peer why, if we still can.
                            let _ = tls.write_tls(&mut &*outer);
                            return Err(io::Error::new(io::ErrorKind::InvalidData, err));
                        }
                        // rustls holds little decrypted data: take it out
                        // before reading more.
                        pending_plaintext(&mut tls, &mut to_inner)?;
                    }
                    Err(e) if would_block(&e) => break,
                    Err(e) => return Err(e),
                }
                if to_inner.len() >= HOLD {
                    break;
                }
            }
        }
        if !inner_eof && ready(&fds[1]) {
            match (&*inner).read(&mut buf) {
                Ok(0) => inner_eof = true,
                Ok(n) => tls.writer().write_all(&buf[..n])?,
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
        }
        if fds[0].revents & libc::POLLERR != 0 && outer_eof && inner_eof {
            return Ok(());
        }
    }
}

//! The userspace TLS relay when the client tears a connection down (issue
//! 21, point 2): the client resets its end at a request's deadline, and the
//! relay must reset the TLS connection at once too. A graceful close would
//! still send what is queued, stale requests included, to a node that has
//! not read them yet.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::thread;
use std::time::{Duration, Instant};

use netblk_tls::config::{self, ClientFiles, ServerFiles};
use netblk_tls::testpki;
use netblk_tls::{handshake, secure};

/// Closes `stream` with a reset (linger 0), as the client's abort does.
fn reset(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a linger struct that lives across the call, its size passed
    // with it; the descriptor belongs to `stream`, open for the call.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER");
    drop(stream);
}

#[test]
fn a_reset_plaintext_end_resets_the_tls_connection_and_sends_nothing_queued() {
    let dir = tempfile::tempdir().expect("dir");
    let (ca, node, client) = testpki::standard(dir.path()).expect("pki");
    let server = config::server_config(&ServerFiles {
        cert: node.cert,
        key: node.key,
        client_ca: ca.clone(),
    })
    .expect("server config");
    let client = config::client_config(&ClientFiles {
        ca,
        cert: client.cert,
        key: client.key,
        danger_skip_server_name: false,
    })
    .expect("client config");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    // The node: handshakes, then reads nothing (a stalled disk) until the
    // client has reset its end; then reads the raw socket to its end.
    let node = thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let _tls = handshake::server(&stream, server).expect("node handshake");
        ready_tx.send(()).expect("ready");
        go_rx.recv().expect("go");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0usize;
        loop {
            match (&stream).read(&mut buf) {
                Ok(0) => return (got, Ok(())),
                Ok(n) => got += n,
                Err(e) => return (got, Err(e.kind())),
            }
        }
    });
    let stream = TcpStream::connect(addr).expect("connect");
    let tls = handshake::client(&stream, client, config::server_name(addr)).expect("handshake");
    let (plain, _) = secure(stream, tls.into(), false).expect("relay");
    ready_rx.recv().expect("node ready");
    // Requests queue up behind the stalled node: in our socket, the relay,
    // and the kernel's buffers on both sides.
    plain.set_nonblocking(true).expect("nonblocking");
    let chunk = vec![0x5a; 64 << 10];
    let (mut sent, start) = (0usize, Instant::now());
    while start.elapsed() < Duration::from_secs(2) {
        match (&plain).write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("write: {e}"),
        }
    }
    assert!(sent > 1 << 20, "only {sent} bytes queued");
    reset(plain);
    // Give the relay a moment to see the reset before the node reads.
    thread::sleep(Duration::from_millis(300));
    go_tx.send(()).expect("go");
    let (got, end) = node.join().expect("node");
    assert_eq!(
        end,
        Err(ErrorKind::ConnectionReset),
        "the TLS connection must be reset, not closed after the queued bytes ({got} of {sent} read)"
    );
    assert!(got < sent, "{got} of {sent} bytes still reached the node");
}

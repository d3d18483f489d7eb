//! Helpers for netblk's integration tests: start `netblk-mock-node`
//! processes on 127.0.0.1, and talk to them with a small blocking client for
//! the data protocol ([`NodeClient`]) and the admin protocol ([`AdminClient`]).
//!
//! Everything here has a bounded wait: a test fails, it never hangs.

pub mod cluster;
pub mod csi;
pub mod netns;
pub mod sim;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use netblk_protocol::pb::{self, admin::Cmd, header::Kind, request::Op};
use netblk_protocol::{FrameError, Limits, PREAMBLE_LEN, Preamble, decode_header, encode_frame_as};

/// How long a helper waits for a reply or an event before it gives up.
pub const WAIT: Duration = Duration::from_secs(10);

/// The `netblk-mock-node` binary: `$NETBLK_MOCK_NODE`, or the one cargo
/// built beside this test binary (`target/<profile>/`).
pub fn mock_node_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("NETBLK_MOCK_NODE") {
        return PathBuf::from(path);
    }
    built_bin("netblk-mock-node", "netblk-mock-node")
}

/// A device record of `/dev/ublkb7` (volume `pgdata` on one node) for
/// tests of what reads records: `pid` names its daemon.
pub fn sample_record(pid: u32) -> netblk::state::DeviceRecord {
    netblk::state::DeviceRecord {
        id: 7,
        volume: "pgdata".into(),
        size: 1 << 30,
        stripe_unit: 128 << 10,
        nodes: vec![SocketAddr::from(([127, 0, 0, 1], 7001))],
        queues: 1,
        depth: 64,
        block_size: 512,
        data_path: "copy".into(),
        pid,
        pid_start: 1,
        client_id: "host-a".into(),
        generation: 0,
        io_timeout_secs: 30,
        node_down_timeout_secs: 15,
        replicas: 1,
        replica_timeout_secs: 5,
        resync_rate: netblk::resync::DEFAULT_RATE,
        send: "copy".into(),
        volume_ids: Vec::new(),
        data_digest: false,
        tls: None,
        durability: vec![Default::default()],
    }
}

/// The `netblk-node-check` binary cargo built beside this test binary.
pub fn node_check_bin() -> PathBuf {
    built_bin("netblk-node-check", "netblk-node-check")
}

/// The `netblk` binary cargo built beside this test binary.
pub fn netblk_bin() -> PathBuf {
    built_bin("netblk", "netblk")
}

/// Binary `name` of package `package` in `target/<profile>/`.
fn built_bin(name: &str, package: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test binary> -> target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in target/<profile>/deps");
    let bin = profile_dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p {package}` (cargo test --workspace does)",
        bin.display()
    );
    bin
}

/// A `netblk-mock-node` child process listening on 127.0.0.1, with an
/// admin listener on the same address's IP (unless `args` say
/// `--no-admin-listener`). Killed on drop.
pub struct MockNode {
    child: Child,
    pub addr: SocketAddr,
    /// Where the node takes admin requests.
    pub admin_addr: Option<SocketAddr>,
    log: Arc<Mutex<String>>,
}

impl MockNode {
    /// Starts a node on 127.0.0.1 port 0 with these extra arguments and waits
    /// for its `listening on` line.
    pub fn start(args: &[&str]) -> MockNode {
        MockNode::start_at("127.0.0.1:0", args)
    }

    /// Starts a node on 127.0.0.1 port 0 with `args`, with glibc's malloc
    /// held to one arena (`MALLOC_ARENA_MAX=1`): a thread's first allocation
    /// then reserves no 64 MiB arena of its own, so the node's address space
    /// shows what it allocates, whichever of its threads has run yet.
    pub fn start_one_arena(args: &[&str]) -> MockNode {
        let mut command = Command::new(mock_node_bin());
        command.env("MALLOC_ARENA_MAX", "1");
        MockNode::spawn(command, "127.0.0.1:0", args)
    }

    /// Starts a node listening on `listen` (for example the address of a
    /// node that was stopped, to restart it in place).
    pub fn start_at(listen: &str, args: &[&str]) -> MockNode {
        MockNode::spawn(Command::new(mock_node_bin()), listen, args)
    }

    /// Starts a node inside network namespace `netns` (made by the test),
    /// listening on `listen` there.
    pub fn start_in_netns(netns: &str, listen: &str, args: &[&str]) -> MockNode {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", netns]).arg(mock_node_bin());
        MockNode::spawn(command, listen, args)
    }

    fn spawn(mut command: Command, listen: &str, args: &[&str]) -> MockNode {
        // `--no-admin-listener` is this helper's: a node without one.
        let with_admin = !args.contains(&"--no-admin-listener");
        let args: Vec<&str> = args
            .iter()
            .copied()
            .filter(|a| *a != "--no-admin-listener")
            .collect();
        let ip = listen.rsplit_once(':').map_or("127.0.0.1", |(ip, _)| ip);
        let admin_listen = format!("{ip}:0");
        if with_admin && !args.contains(&"--admin-listen") {
            command.args(["--admin-listen", &admin_listen]);
        }
        let mut child = command
            .args(["--listen", listen])
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("NODE_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start netblk-mock-node");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr piped");
        let sink = Arc::clone(&log);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap_or_else(|p| p.into_inner());
                log.push_str(&line);
                log.push('\n');
            }
        });
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next().and_then(Result::ok);
            let admin = match first {
                Some(_) if with_admin => lines.next().and_then(Result::ok),
                _ => None,
            };
            let _ = tx.send(first.map(|f| (f, admin)));
            for _ in lines {}
        });
        let (line, admin) = match rx.recv_timeout(WAIT) {
            Ok(Some(lines)) => lines,
            other => {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "netblk-mock-node {args:?} did not say where it listens ({other:?}, {status:?}); log:\n{}",
                    log.lock().map(|l| l.clone()).unwrap_or_default()
                );
            }
        };
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        let admin_addr = admin.map(|line| {
            line.strip_prefix("admin listening on ")
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("unexpected second line {line:?}"))
        });
        MockNode {
            child,
            addr,
            admin_addr,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the node logged so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str) -> bool {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Sends a signal to the node.
    pub fn signal(&self, signal: i32) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill() takes plain integers; the pid is our own child, which
        // has not been reaped (we hold its `Child`), so it names no other process.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal})");
    }

    /// Waits (bounded) for the node to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit(WAIT)
            .unwrap_or_else(|| panic!("node did not exit after SIGTERM; log:\n{}", self.log()))
    }

    pub fn admin(&self) -> AdminClient {
        let addr = self
            .admin_addr
            .expect("this node was started without an admin listener");
        AdminClient::connect(addr).expect("admin connection")
    }

    pub fn client(&self) -> NodeClient {
        NodeClient::connect(self.addr).expect("data connection")
    }
}

impl Drop for MockNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a helper client can run into.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    #[error("the node closed the connection")]
    Closed,
    #[error("unexpected message: {0}")]
    Unexpected(String),
}

impl ClientError {
    /// True for a read that timed out (nothing arrived in time).
    pub fn is_timeout(&self) -> bool {
        matches!(self, ClientError::Io(err)
            if matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}

/// A handshake for `volume` with a given geometry, as a client of its own
/// (a fresh client id, session 1): helper clients never fence each other.
pub fn handshake(
    volume: &str,
    volume_size: u64,
    stripe_unit: u32,
    node_count: u32,
    node_index: u32,
) -> pb::Handshake {
    pb::Handshake {
        protocol_version: u32::from(netblk_protocol::PROTOCOL_VERSION),
        revision: netblk_protocol::PROTOCOL_REVISION,
        client_id: format!(
            "netblk-tests-{}-{}",
            std::process::id(),
            NEXT_CLIENT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ),
        volume: volume.into(),
        volume_size,
        layout: Some(pb::Layout {
            stripe_unit,
            node_count,
            node_index,
            replicas: 1,
            replica_index: 0,
        }),
        session: 1,
        existing: false,
        at_least: false,
        data_digest: 0,
        owner_epoch: 0,
    }
}

static NEXT_CLIENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Reads and writes whole frames on a blocking socket with a read timeout.
struct Framed {
    stream: TcpStream,
    /// Frames carry header digests (the handshake agreed on data digests).
    digest: bool,
}

impl Framed {
    fn connect(addr: SocketAddr) -> io::Result<Framed> {
        let stream = TcpStream::connect_timeout(&addr, WAIT)?;
        stream.set_read_timeout(Some(WAIT))?;
        stream.set_write_timeout(Some(WAIT))?;
        stream.set_nodelay(true)?;
        Ok(Framed {
            stream,
            digest: false,
        })
    }

    fn send(&mut self, header: &pb::Header, payload: &[u8]) -> Result<(), ClientError> {
        let mut bytes = Vec::with_capacity(64 + payload.len());
        encode_frame_as(header, payload, self.digest, &mut bytes)?;
        self.stream.write_all(&bytes)?;
        Ok(())
    }

    fn recv(&mut self) -> Result<(pb::Header, Vec<u8>), ClientError> {
        let mut preamble = [0u8; PREAMBLE_LEN];
        match self.stream.read_exact(&mut preamble) {
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(ClientError::Closed);
            }
            other => other?,
        }
        let limits = Limits {
            header_digest: self.digest,
            ..Limits::default()
        };
        let preamble = Preamble::parse(&preamble, &limits)?;
        let mut header = vec![0u8; preamble.header_len as usize];
        self.stream.read_exact(&mut header)?;
        let header = decode_header(&preamble, &header)?;
        let mut payload = vec![0u8; preamble.payload_len as usize];
        self.stream.read_exact(&mut payload)?;
        Ok((header, payload))
    }
}

/// A blocking data-protocol client: handshake, then pipelined requests.
pub struct NodeClient {
    framed: Framed,
    next_id: u64,
}

impl NodeClient {
    pub fn connect(addr: SocketAddr) -> io::Result<NodeClient> {
        Ok(NodeClient {
            framed: Framed::connect(addr)?,
            next_id: 1,
        })
    }

    /// The same connection, for another thread to receive on while this
    /// one sends.
    pub fn try_clone(&self) -> io::Result<NodeClient> {
        Ok(NodeClient {
            framed: Framed {
                stream: self.framed.stream.try_clone()?,
                digest: self.framed.digest,
            },
            next_id: 1 << 40,
        })
    }

    /// Connects and completes a handshake that must be accepted.
    pub fn open(addr: SocketAddr, hs: pb::Handshake) -> NodeClient {
        let mut client = NodeClient::connect(addr).expect("connect");
        let reply = client.handshake(hs).expect("handshake reply");
        assert_eq!(
            reply.status,
            pb::Status::Ok as i32,
            "handshake: {}",
            reply.message
        );
        client
    }

    /// The reply to `hs` on a fresh connection to `addr` (accepted or not).
    pub fn handshake_reply(addr: SocketAddr, hs: pb::Handshake) -> pb::HandshakeReply {
        NodeClient::connect(addr)
            .expect("connect")
            .handshake(hs)
            .expect("a handshake reply")
    }

    pub fn handshake(&mut self, hs: pb::Handshake) -> Result<pb::HandshakeReply, ClientError> {
        self.framed.send(
            &pb::Header {
                kind: Some(Kind::Handshake(hs)),
            },
            &[],
        )?;
        match self.framed.recv()? {
            (
                pb::Header {
                    kind: Some(Kind::HandshakeReply(reply)),
                },
                _,
            ) => {
                // Data digests bring header digests on every later frame.
                self.framed.digest = reply.status == pb::Status::Ok as i32
                    && reply.data_digest == pb::DataDigest::Crc32c as i32;
                Ok(reply)
            }
            (other, _) => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Sends one request without waiting; returns its id.
    pub fn send(&mut self, op: Op, payload: &[u8]) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        self.framed.send(&pb::Header::request(id, op), payload)?;
        Ok(id)
    }

    /// The next reply, whichever request it answers.
    pub fn recv(&mut self) -> Result<(pb::Reply, Vec<u8>), ClientError> {
        match self.framed.recv()? {
            (
                pb::Header {
                    kind: Some(Kind::Reply(reply)),
                },
                payload,
            ) => Ok((reply, payload)),
            (other, _) => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// One request, one reply.
    pub fn call(&mut self, op: Op, payload: &[u8]) -> Result<(pb::Reply, Vec<u8>), ClientError> {
        let id = self.send(op, payload)?;
        let (reply, data) = self.recv()?;
        if reply.id != id {
            return Err(ClientError::Unexpected(format!(
                "reply for {} while only {id} was outstanding",
                reply.id
            )));
        }
        Ok((reply, data))
    }

    /// Writes `data` at `offset` and checks the reply is OK.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) {
        let (reply, _) = self
            .call(
                Op::Write(pb::Write {
                    offset,
                    length: u32::try_from(data.len()).expect("small write"),
                    fua,
                    crc32c: None,
                }),
                data,
            )
            .expect("write");
        assert_eq!(
            reply.status,
            pb::Status::Ok as i32,
            "write: {}",
            reply.message
        );
    }

    /// Reads `length` bytes at `offset` and checks the reply is OK.
    pub fn read(&mut self, offset: u64, length: u32) -> Vec<u8> {
        let (reply, data) = self
            .call(Op::Read(pb::Read { offset, length }), &[])
            .expect("read");
        assert_eq!(
            reply.status,
            pb::Status::Ok as i32,
            "read: {}",
            reply.message
        );
        assert_eq!(data.len(), length as usize);
        data
    }

    /// Sends a request and returns just its status.
    pub fn status_of(&mut self, op: Op, payload: &[u8]) -> i32 {
        self.call(op, payload).expect("reply").0.status
    }

    pub fn ping(&mut self) -> Result<pb::Reply, ClientError> {
        Ok(self.call(Op::Ping(pb::Ping { nonce: 7 }), &[])?.0)
    }

    /// Reads exactly `len` raw bytes, whatever they are (for tests of
    /// corrupted replies).
    pub fn recv_raw(&mut self, len: usize) -> io::Result<Vec<u8>> {
        let mut bytes = vec![0u8; len];
        self.framed.stream.read_exact(&mut bytes)?;
        Ok(bytes)
    }

    /// Writes raw bytes, for tests of malformed input.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.framed.stream.write_all(bytes)
    }

    /// Closes the sending side (the node sees end of stream).
    pub fn finish_sending(&self) -> io::Result<()> {
        self.framed.stream.shutdown(Shutdown::Write)
    }

    pub fn set_read_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.framed.stream.set_read_timeout(Some(timeout))
    }

    /// True if the node closed this connection (end of stream within the
    /// read timeout, or a reset).
    pub fn is_closed_by_node(&mut self) -> bool {
        let mut byte = [0u8; 1];
        match self.framed.stream.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(err) => err.kind() == io::ErrorKind::ConnectionReset,
        }
    }
}

/// A client for the mock node's admin protocol.
pub struct AdminClient {
    framed: Framed,
}

impl AdminClient {
    pub fn connect(addr: SocketAddr) -> io::Result<AdminClient> {
        Ok(AdminClient {
            framed: Framed::connect(addr)?,
        })
    }

    fn call(&mut self, cmd: Cmd) -> Result<pb::AdminReply, ClientError> {
        self.framed.send(
            &pb::Header {
                kind: Some(Kind::Admin(pb::Admin { cmd: Some(cmd) })),
            },
            &[],
        )?;
        match self.framed.recv()? {
            (
                pb::Header {
                    kind: Some(Kind::AdminReply(reply)),
                },
                _,
            ) => Ok(reply),
            (other, _) => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Replaces the node's faults; the reply says whether they were accepted.
    pub fn try_set_faults(&mut self, faults: pb::Faults) -> Result<pb::AdminReply, ClientError> {
        self.call(Cmd::SetFaults(faults))
    }

    /// Replaces the node's faults, which must be accepted.
    pub fn set_faults(&mut self, faults: pb::Faults) {
        let reply = self.try_set_faults(faults).expect("admin reply");
        assert_eq!(
            reply.status,
            pb::Status::Ok as i32,
            "set faults: {}",
            reply.message
        );
    }

    /// The node's current faults.
    pub fn faults(&mut self) -> pb::Faults {
        self.call(Cmd::GetStats(pb::GetStats {}))
            .expect("admin reply")
            .faults
            .unwrap_or_default()
    }

    pub fn stats(&mut self) -> pb::Stats {
        self.call(Cmd::GetStats(pb::GetStats {}))
            .expect("admin reply")
            .stats
            .unwrap_or_default()
    }

    /// Asks the node to crash; it exits without replying.
    pub fn crash(&mut self) {
        let _ = self.call(Cmd::Crash(pb::Crash {}));
    }
}

/// A recognisable pattern for a write: byte `i` of write `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Volume `name` as the node at `addr` describes it (an inquiry, plaintext;
/// None: the node holds none of that name).
pub fn described(addr: SocketAddr, name: &str) -> Option<pb::VolumeDescription> {
    netblk::inquiry::Asker {
        tls: None,
        timeout: Duration::from_secs(5),
    }
    .describe(addr, name)
    .expect("the node answers an inquiry")
}

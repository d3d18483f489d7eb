//! What every check gets: the node, the options, fresh volume names, and
//! the handshakes and requests most checks start from.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use netblk_protocol::pb::{self, request::Op};
use netblk_protocol::{PROTOCOL_REVISION, PROTOCOL_VERSION};

use crate::wire::{Conn, Target};

/// How a check ended, when it did not pass.
#[derive(Debug)]
pub enum Verdict {
    Fail(String),
    Skip(String),
}

impl From<String> for Verdict {
    fn from(why: String) -> Verdict {
        Verdict::Fail(why)
    }
}

pub type Outcome = Result<(), Verdict>;

/// Fails the check with a message unless `cond` holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($why:tt)+) => {
        if !$cond {
            return Err($crate::ctx::Verdict::Fail(format!($($why)+)));
        }
    };
}

/// The volumes' size the checks use, bytes.
pub const SIZE: u64 = 16 << 20;
/// Their stripe unit.
pub const UNIT: u32 = 64 << 10;

pub struct Ctx {
    pub target: Target,
    pub admin: Option<SocketAddr>,
    pub restart: Option<String>,
    prefix: String,
    next: AtomicU64,
    made: Mutex<Vec<String>>,
}

impl Ctx {
    pub fn new(target: Target, admin: Option<SocketAddr>, restart: Option<String>) -> Ctx {
        Ctx {
            target,
            admin,
            restart,
            prefix: format!("node-check-{}", std::process::id()),
            next: AtomicU64::new(1),
            made: Mutex::new(Vec::new()),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.target.timeout
    }

    /// A volume name no other check uses (deleted at the end of the run).
    pub fn volume(&self) -> String {
        let name = format!(
            "{}-{}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        if let Ok(mut made) = self.made.lock() {
            made.push(name.clone());
        }
        name
    }

    /// A client id no other check uses.
    pub fn client_id(&self) -> String {
        format!(
            "{}-c{}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// A handshake that creates (or opens) `volume`: SIZE bytes, one
    /// column, one copy, a client of its own at session 1.
    pub fn hs(&self, volume: &str) -> pb::Handshake {
        pb::Handshake {
            protocol_version: u32::from(PROTOCOL_VERSION),
            revision: PROTOCOL_REVISION,
            client_id: self.client_id(),
            volume: volume.into(),
            volume_size: SIZE,
            layout: Some(layout(1)),
            session: 1,
            existing: false,
            at_least: false,
            data_digest: pb::DataDigest::None as i32,
            owner_epoch: 0,
        }
    }

    /// A connection whose handshake `hs` must be accepted.
    pub fn open(&self, hs: pb::Handshake) -> Result<(Conn, pb::HandshakeReply), Verdict> {
        let mut conn = self.target.connect()?;
        let reply = conn.handshake(hs)?;
        if reply.status != pb::Status::Ok as i32 {
            return Err(Verdict::Fail(format!(
                "a valid handshake was refused ({}): {}",
                status_name(reply.status),
                reply.message
            )));
        }
        Ok((conn, reply))
    }

    /// A fresh volume, opened.
    pub fn fresh(&self) -> Result<(Conn, pb::HandshakeReply, String), Verdict> {
        let volume = self.volume();
        let (conn, reply) = self.open(self.hs(&volume))?;
        Ok((conn, reply, volume))
    }

    /// The reply to `hs` on a new connection (accepted or not).
    pub fn try_handshake(&self, hs: pb::Handshake) -> Result<pb::HandshakeReply, Verdict> {
        let mut conn = self.target.connect()?;
        let reply = conn.handshake(hs)?;
        conn.close();
        Ok(reply)
    }

    /// Deletes what the run made (best effort).
    pub fn clean_up(&self) {
        let made = self.made.lock().map(|m| m.clone()).unwrap_or_default();
        for volume in made {
            let Ok(mut conn) = self.target.connect() else {
                return;
            };
            let hs = pb::Handshake {
                existing: true,
                volume_size: 0,
                at_least: true,
                ..self.hs(&volume)
            };
            let layouts = [layout(1), replicated(0)];
            for layout in layouts {
                let hs = pb::Handshake {
                    layout: Some(layout),
                    ..hs.clone()
                };
                if conn
                    .handshake(hs)
                    .is_ok_and(|r| r.status == pb::Status::Ok as i32)
                {
                    let _ = conn.call(Op::Delete(pb::Delete {}), &[]);
                    break;
                }
                match self.target.connect() {
                    Ok(c) => conn = c,
                    Err(_) => return,
                }
            }
        }
    }
}

/// One column, `replicas` copies, this node the first copy.
pub fn layout(replicas: u32) -> pb::Layout {
    pb::Layout {
        stripe_unit: UNIT,
        node_count: 1,
        node_index: 0,
        replicas,
        replica_index: 0,
    }
}

/// One column of two copies, this node copy `row`.
pub fn replicated(row: u32) -> pb::Layout {
    pb::Layout {
        replica_index: row,
        ..layout(2)
    }
}

pub fn status_name(status: i32) -> String {
    pb::Status::try_from(status).map_or_else(
        |_| format!("status {status}"),
        |s| s.as_str_name().trim_start_matches("STATUS_").to_string(),
    )
}

/// Fails unless `reply` has `want`.
pub fn expect_status(reply: &pb::Reply, want: pb::Status, what: &str) -> Outcome {
    if reply.status == want as i32 {
        return Ok(());
    }
    Err(Verdict::Fail(format!(
        "{what}: {} ({}), the spec says {}",
        status_name(reply.status),
        reply.message,
        status_name(want as i32)
    )))
}

/// A write request of `data` at `offset`.
pub fn write(offset: u64, data: &[u8], fua: bool) -> Op {
    Op::Write(pb::Write {
        offset,
        length: data.len() as u32,
        fua,
        crc32c: None,
    })
}

pub fn read(offset: u64, length: u32) -> Op {
    Op::Read(pb::Read { offset, length })
}

/// Bytes that say where they are and which `round` wrote them.
pub fn pattern(round: u8, offset: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((offset as usize + i) as u8) ^ round.wrapping_mul(37))
        .collect()
}

/// Writes and checks the reply is OK.
pub fn put(conn: &mut Conn, offset: u64, data: &[u8]) -> Outcome {
    let (reply, _) = conn.call(write(offset, data, false), data)?;
    expect_status(&reply, pb::Status::Ok, "a write within the volume")
}

/// Reads `len` bytes that must come back OK.
pub fn get(conn: &mut Conn, offset: u64, len: u32) -> Result<Vec<u8>, Verdict> {
    let (reply, data) = conn.call(read(offset, len), &[])?;
    expect_status(&reply, pb::Status::Ok, "a read within the volume")?;
    ensure!(
        data.len() == len as usize,
        "a read of {len} bytes returned {}",
        data.len()
    );
    Ok(data)
}

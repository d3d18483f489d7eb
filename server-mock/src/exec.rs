//! Executing one request against its volume: ranges, the store, data
//! digests, records and the activity log; the reply and its payload.

use std::io;

use netblk_protocol::geometry::{ACTIVITY_PAGE, MAX_DIGEST_LEN};
use netblk_protocol::pb::{self, Status, request::Op};
use tracing::warn;

use crate::conn::Conn;
use crate::node::{Broken, Node, Volume, bump};
use crate::policy;
use crate::store::Lent;

/// Checks that `[offset, offset + len)` lies within the node's part of the volume.
fn in_range(volume: &Volume, offset: u64, len: u64) -> Result<(), (Status, String)> {
    match offset.checked_add(len) {
        Some(end) if end <= volume.capacity() => Ok(()),
        _ => Err((
            Status::OutOfRange,
            format!(
                "range {offset}+{len} is beyond this node's {} bytes of volume '{}'",
                volume.capacity(),
                volume.name
            ),
        )),
    }
}

/// A reply's payload: read data lent by the store (sent from where it
/// lies), or staged in a buffer reused from request to request. The buffer
/// only grows and its bytes stay initialized, so a read does not zero-fill
/// it again (a guest profile of 1 MiB reads from a memory store showed that
/// fill at 9% of all samples, as much as the store's own copy).
#[derive(Default)]
pub struct Scratch {
    buf: Vec<u8>,
    len: usize,
    lent: Vec<Lent>,
}

impl Scratch {
    /// No payload.
    fn clear(&mut self) {
        self.len = 0;
        self.lent.clear();
    }

    /// The payload is these pieces of the store.
    fn lend(&mut self, pieces: Vec<Lent>) {
        self.len = 0;
        self.lent = pieces;
    }

    /// The payload's pieces, in order.
    pub fn parts(&self) -> Vec<&[u8]> {
        if self.lent.is_empty() {
            vec![&self.buf[..self.len]]
        } else {
            self.lent.iter().map(Lent::bytes).collect()
        }
    }

    fn crc32c(&self) -> u32 {
        self.parts()
            .iter()
            .fold(0, |crc, part| crc32c::crc32c_append(crc, part))
    }

    /// A payload of `len` bytes, to be filled: its old contents are not
    /// cleared, the store overwrites all of them.
    fn take(&mut self, len: usize) -> &mut [u8] {
        self.lent.clear();
        if self.buf.len() < len {
            self.buf.resize(len, 0);
        }
        self.len = len;
        &mut self.buf[..len]
    }

    #[cfg(test)]
    fn payload(&self) -> Vec<u8> {
        self.parts().concat()
    }
}

/// Executes one request and returns its reply; the reply's payload (a
/// read's data) is left in `data`, which is empty otherwise.
pub fn execute(
    node: &Node,
    conn: &Conn,
    faults: &pb::Faults,
    request: &pb::Request,
    payload: &[u8],
    data: &mut Scratch,
) -> pb::Reply {
    data.clear();
    let mut reply = pb::Reply {
        id: request.id,
        ..Default::default()
    };
    if let Some(status) = node.faults.draw_error(faults) {
        bump(&node.counters.injected_errors, 1);
        reply.status = status as i32;
        reply.message = "injected error (fault)".into();
        node.counters.reply(request, &reply);
        return reply;
    }
    if let Err((status, message)) = apply(node, conn, request, payload, &mut reply, data) {
        data.clear();
        let status = if status == Status::OutOfRange && node.breaks(Broken::RangesInvalid) {
            Status::Invalid
        } else {
            status
        };
        reply.status = status as i32;
        reply.message = message;
    }
    if node.breaks(Broken::WriteReplyPayload)
        && reply.status == Status::Ok as i32
        && matches!(request.op, Some(Op::Write(_)))
    {
        data.take(8).fill(0);
    }
    node.counters.reply(request, &reply);
    reply
}

fn io_failure(what: &str, err: io::Error) -> (Status, String) {
    let status = netblk_protocol::status_of_errno(err.raw_os_error().unwrap_or(libc::EIO));
    let status = if status == Status::Ok {
        Status::IoError
    } else {
        status
    };
    (status, format!("{what} failed: {err}"))
}

fn apply(
    node: &Node,
    conn: &Conn,
    request: &pb::Request,
    payload: &[u8],
    reply: &mut pb::Reply,
    data: &mut Scratch,
) -> Result<(), (Status, String)> {
    let volume = &*conn.volume;
    let backend = &volume.backend;
    if volume.deleted() {
        return Err((
            Status::NotFound,
            format!("volume '{}' was deleted", volume.name),
        ));
    }
    let Some(op) = &request.op else {
        // The codec refuses requests without an operation; be safe anyway.
        return Err((Status::NotSupported, "no operation".into()));
    };
    let refused_on_purpose = match op {
        Op::Read(pb::Read { length: 0, .. }) | Op::Write(pb::Write { length: 0, .. }) => node
            .breaks(Broken::ZeroLengthInvalid)
            .then_some(Status::Invalid),
        Op::Write(pb::Write { fua: true, .. }) => node
            .breaks(Broken::FuaUnsupported)
            .then_some(Status::NotSupported),
        Op::Flush(_) => node
            .breaks(Broken::FlushUnsupported)
            .then_some(Status::NotSupported),
        _ => None,
    };
    if let Some(status) = refused_on_purpose {
        return Err((status, "refused (broken on purpose)".into()));
    }
    match op {
        Op::Read(read) => {
            if read.length > node.config.max_io_size && !node.breaks(Broken::NoReadLimit) {
                return Err((
                    Status::Invalid,
                    format!(
                        "read of {} bytes exceeds the max IO size {}",
                        read.length, node.config.max_io_size
                    ),
                ));
            }
            in_range(volume, read.offset, u64::from(read.length))?;
            let len = read.length as usize;
            match backend.lend(read.offset, len) {
                Some(pieces) => data.lend(pieces),
                None => backend
                    .read(read.offset, data.take(len))
                    .map_err(|err| io_failure("read", err))?,
            }
            bump(&node.counters.bytes_read, u64::from(read.length));
            if conn.digest {
                reply.crc32c = Some(data.crc32c());
            }
            Ok(())
        }
        Op::Write(write) => {
            if conn.digest && !node.breaks(Broken::AcceptBadDigest) {
                check_digest(node, write, payload)?;
            }
            in_range(volume, write.offset, payload.len() as u64)?;
            let _owner = volume
                .admit_write(conn.owner_epoch)
                .map_err(|why| (Status::Refused, why))?;
            volume
                .note_change(write.offset, payload.len() as u64)
                .map_err(|err| io_failure("activity log", err))?;
            let offset = if node.breaks(Broken::UnalignedWrites) {
                write.offset & !4095
            } else {
                write.offset
            };
            let fua = write.fua && !node.breaks(Broken::FuaWithoutSync);
            backend
                .write(offset, payload, fua)
                .map_err(|err| io_failure("write", err))?;
            bump(&node.counters.bytes_written, payload.len() as u64);
            Ok(())
        }
        Op::Flush(_) => {
            if !node.breaks(Broken::AckFlushWithoutSync) {
                backend.flush().map_err(|err| io_failure("flush", err))?;
            }
            Ok(())
        }
        Op::Discard(pb::Discard { offset, length })
        | Op::WriteZeroes(pb::WriteZeroes { offset, length }) => {
            in_range(volume, *offset, *length)?;
            let _owner = volume
                .admit_write(conn.owner_epoch)
                .map_err(|why| (Status::Refused, why))?;
            volume
                .note_change(*offset, *length)
                .map_err(|err| io_failure("activity log", err))?;
            if !volume.breaks(Broken::DiscardKeepsData) {
                backend
                    .zero(*offset, *length)
                    .map_err(|err| io_failure("discard", err))?;
            }
            Ok(())
        }
        Op::Ping(ping) => {
            reply.nonce = if node.breaks(Broken::PingNoEcho) {
                0
            } else {
                ping.nonce
            };
            Ok(())
        }
        Op::Resize(resize) => {
            node.authorize(&conn.peer, &volume.name, policy::Op::Resize)
                .map_err(|why| (Status::Refused, why))?;
            node.resize(volume, resize.volume_size)
                .map_err(|why| (Status::Invalid, why))
        }
        Op::Delete(_) => {
            node.authorize(&conn.peer, &volume.name, policy::Op::Delete)
                .map_err(|why| (Status::Refused, why))?;
            node.delete(volume).map_err(|why| (Status::IoError, why))
        }
        Op::GetRecord(_) => {
            reply.record = Some(volume.record());
            reply.owner_connected = volume.owner_connected();
            Ok(())
        }
        Op::Digest(digest) => {
            if digest.length > MAX_DIGEST_LEN {
                return Err((
                    Status::Invalid,
                    format!(
                        "a digest of {} bytes exceeds {MAX_DIGEST_LEN}",
                        digest.length
                    ),
                ));
            }
            in_range(volume, digest.offset, digest.length)?;
            let chunk = u64::from(node.config.max_io_size).clamp(4096, 1 << 20);
            let mut crc = 0u32;
            let mut done = 0u64;
            while done < digest.length {
                let n = (digest.length - done).min(chunk);
                let buf = data.take(n as usize);
                backend
                    .read(digest.offset + done, buf)
                    .map_err(|err| io_failure("digest", err))?;
                crc = crc32c::crc32c_append(crc, buf);
                done += n;
            }
            // Nothing of it goes back as payload.
            data.clear();
            reply.crc32c = Some(if node.breaks(Broken::WrongDigest) {
                crc ^ 1
            } else {
                crc
            });
            Ok(())
        }
        Op::GetMissed(get) => {
            let (regions, more, since) = volume.missed.page(get.row, get.from);
            reply.missed_regions = regions;
            reply.missed_more = more;
            reply.missed_since = since;
            Ok(())
        }
        Op::GetActivity(get) => {
            let (page, more) = volume.activity.page(get.from);
            (reply.activity_regions, reply.activity_seqs) = page.into_iter().unzip();
            reply.activity_more = more;
            Ok(())
        }
        Op::TrimActivity(trim) => {
            if trim.regions.len() != trim.seqs.len() || trim.regions.len() > ACTIVITY_PAGE {
                return Err((
                    Status::Invalid,
                    format!(
                        "a trim names {} regions and {} sequence numbers (at most {ACTIVITY_PAGE}, one each)",
                        trim.regions.len(),
                        trim.seqs.len()
                    ),
                ));
            }
            // Only the owner: an older owner or a tool must not make the
            // log forget where replicas may differ.
            let _owner = volume
                .admit_write(conn.owner_epoch)
                .map_err(|why| (Status::Refused, why))?;
            if conn.owner_epoch == 0 {
                return Err((
                    Status::Refused,
                    "only the volume's owner (a connection with an owner epoch) may trim its activity log".into(),
                ));
            }
            // The missed bitmaps first: the regions about to leave the log
            // may hold their newest marks.
            volume
                .missed
                .persist(&**backend)
                .map_err(|err| io_failure("missed bitmaps", err))?;
            let entries: Vec<(u64, u64)> = trim
                .regions
                .iter()
                .copied()
                .zip(trim.seqs.iter().copied())
                .collect();
            volume
                .activity
                .trim(&**backend, &entries)
                .map_err(|err| io_failure("activity log trim", err))?;
            Ok(())
        }
        Op::PutRecord(put) => {
            let record = put.record.clone().unwrap_or_default();
            match volume.put_record(put.expected_generation, record) {
                Ok(()) => Ok(()),
                Err(crate::node::RecordError::Conflict(stored)) => {
                    let why = format!(
                        "membership record generation {} is stored, not {}",
                        stored.generation, put.expected_generation
                    );
                    reply.record = Some(*stored);
                    Err((Status::Conflict, why))
                }
                Err(crate::node::RecordError::Store(why)) => Err((
                    Status::IoError,
                    format!("cannot store the membership record: {why}"),
                )),
                Err(crate::node::RecordError::Invalid(why)) => Err((
                    Status::Invalid,
                    format!("not a membership record of this volume: {why}"),
                )),
            }
        }
    }
}

/// A write's payload against its crc32c (data digests): a mismatch writes
/// nothing and tells the client to send it again.
fn check_digest(node: &Node, write: &pb::Write, payload: &[u8]) -> Result<(), (Status, String)> {
    let Some(want) = write.crc32c else {
        return Err((
            Status::Invalid,
            "data digests are on: a write without its crc32c".into(),
        ));
    };
    let got = crc32c::crc32c(payload);
    if got == want {
        return Ok(());
    }
    bump(&node.counters.digest_errors, 1);
    warn!(
        offset = write.offset,
        len = payload.len(),
        "write payload does not match its crc32c: refused (sent again by the client)"
    );
    Err((
        Status::DigestMismatch,
        format!("payload crc32c {got:#010x}, the request says {want:#010x}: nothing written"),
    ))
}

#[cfg(test)]
mod tests {
    use super::Scratch;
    use crate::store::Lent;

    #[test]
    fn scratch_is_sized_per_reply_and_never_filled_again() {
        let mut scratch = Scratch::default();
        assert!(scratch.payload().is_empty());
        scratch.take(8).fill(7);
        assert_eq!(scratch.payload(), vec![7; 8]);
        // A reply without data has no payload.
        scratch.clear();
        assert!(scratch.payload().is_empty());
        // A shorter read gets exactly its length, and the bytes are the
        // old ones (the store overwrites them): no zero-fill per request.
        assert_eq!(scratch.take(4), &[7; 4]);
        assert_eq!(scratch.payload().len(), 4);
        // Growing adds initialized bytes.
        assert_eq!(scratch.take(12).len(), 12);
        assert_eq!(&scratch.payload()[8..], &[0; 4]);
        // Lent pieces are the payload, in order, until the next request.
        scratch.lend(vec![Lent::Zeros(3), Lent::Zeros(2)]);
        assert_eq!(scratch.parts(), vec![&[0u8; 3][..], &[0u8; 2][..]]);
        assert_eq!(scratch.crc32c(), crc32c::crc32c(&[0; 5]));
        scratch.clear();
        assert!(scratch.payload().is_empty());
    }
}

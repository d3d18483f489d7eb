//! What the engine's callers see: requests, frames to send, replies,
//! completions, the engine's settings and its errors.

use std::time::Duration;

/// Index of a request buffer, as a ublk tag.
pub type Tag = u16;

/// Most requests one queue may have in flight.
pub const MAX_DEPTH: u16 = 4096;

/// A block operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write { fua: bool },
    Flush,
    Discard,
    WriteZeroes,
}

impl Op {
    pub(super) fn has_data(self) -> bool {
        matches!(self, Op::Read | Op::Write { .. })
    }

    /// It changes the volume's data (what replicas must agree on).
    pub(super) fn changes(self) -> bool {
        matches!(self, Op::Write { .. } | Op::Discard | Op::WriteZeroes)
    }
}

/// A block request as a frontend hands it over. `tag` names its buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRequest {
    pub tag: Tag,
    pub op: Op,
    /// Byte offset in the volume (ignored by flush).
    pub offset: u64,
    /// Bytes (ignored by flush).
    pub len: u64,
}

/// Bounds and timeouts of one engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tags 0..depth may be used; at most [`MAX_DEPTH`].
    pub depth: u16,
    /// Largest data request (read or write), bytes: the size of a tag's buffer.
    pub max_io: u32,
    /// Most pieces sent and not yet answered on one connection.
    pub max_in_flight_per_node: usize,
    /// A request not complete after this long fails with EIO.
    pub io_timeout: Duration,
    /// A node down longer than this fails IO to its stripes at once with
    /// EIO instead of queueing it, until it is back.
    pub node_down_timeout: Duration,
    /// Replicated volumes: a member disconnected this long, or owing a
    /// piece this long, has failed and leaves its column's in-sync set
    /// (while another member is left). Below `io_timeout`.
    pub replica_timeout: Duration,
    /// Payloads carry a CRC-32C (data digests): writes get theirs from
    /// the driver at transmit, read replies are checked by it on receipt;
    /// a mismatch is retried [`DIGEST_RETRIES`] times, then EIO.
    pub data_digest: bool,
}

/// How often a piece whose payload failed its digest is sent again before
/// its request fails with EIO.
pub const DIGEST_RETRIES: u8 = 3;

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            depth: 128,
            max_io: 1 << 20,
            max_in_flight_per_node: 1024,
            io_timeout: Duration::from_secs(30),
            node_down_timeout: Duration::from_secs(15),
            replica_timeout: Duration::from_secs(5),
            data_digest: false,
        }
    }
}

/// Part of a tag's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufSlice {
    pub tag: Tag,
    pub offset: u32,
    pub len: u32,
}

/// A frame to send to one node: `head` (preamble and header), then, for a
/// write, `payload` from the request's buffer. The caller reports
/// [`Engine::handle_buffer_released`] once the payload's buffer is no longer
/// used by the send (for zero-copy sends: at the notification).
#[derive(Debug)]
pub struct Transmit {
    pub id: u64,
    pub head: Vec<u8>,
    pub payload: Option<BufSlice>,
}

/// What to do with the payload of a reply whose header was handed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplySink {
    /// Nothing follows the header.
    Done,
    /// Receive the payload into this slice, then call [`Engine::handle_payload`].
    Buffer {
        id: u64,
        slice: BufSlice,
        /// With data digests: the payload's CRC-32C, to check on receipt.
        crc32c: Option<u32>,
    },
    /// A stale reply (its request timed out or was resent): read and drop
    /// its payload, if any.
    Discard,
}

/// How a read's payload announced by [`ReplySink::Buffer`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// Received whole (and, with data digests, it matched).
    Ok,
    /// Its connection failed first.
    Lost,
    /// Received whole, but not what its crc32c says.
    DigestMismatch,
}

/// A reply that breaks the protocol: the connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply {id} arrived from node {got}, but its request went to node {sent}")]
    WrongNode { id: u64, sent: usize, got: usize },
    #[error("reply {id} carries {got} payload bytes, expected {expected}")]
    PayloadLength { id: u64, expected: u64, got: u32 },
    #[error("second reply for request {id} while its payload is being received")]
    Duplicate { id: u64 },
    #[error("reply for request {id}, which was never sent")]
    NeverSent { id: u64 },
    #[error("read reply {id} carries no crc32c, but data digests are on")]
    MissingDigest { id: u64 },
}

/// Misuse of tags by a frontend: a bug, not an IO error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    #[error("tag {tag} is outside the queue depth {depth}")]
    OutOfRange { tag: Tag, depth: u16 },
    #[error("tag {0} is still in use")]
    Busy(Tag),
}

/// A finished block request: bytes transferred, or an errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub tag: Tag,
    pub result: Result<u64, i32>,
}

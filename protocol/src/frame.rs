//! Sans-IO frame codec.
//!
//! A frame is a 16-byte preamble, a protobuf [`pb::Header`], then a raw
//! payload:
//!
//! ```text
//! 0      4        6      8            12            16
//! | NBLK | version | flags | header len | payload len | header ... | payload ... |
//! ```
//!
//! All integers are big-endian. Every length is checked against [`Limits`]
//! before the caller allocates anything for it, and no input makes the
//! decoder panic.

use prost::Message;

use crate::pb;
use crate::pb::header::Kind;
use crate::pb::request::Op;

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"NBLK";
/// The protocol version this crate speaks, carried in every preamble and in
/// the handshake.
pub const PROTOCOL_VERSION: u16 = 1;
/// Size of the fixed preamble in bytes.
pub const PREAMBLE_LEN: usize = 16;
/// Largest protobuf header accepted, in bytes.
pub const MAX_HEADER_LEN: u32 = 4096;
/// Default largest payload (one IO), in bytes.
pub const DEFAULT_MAX_PAYLOAD_LEN: u32 = 4 << 20;

/// Bounds a decoder enforces before allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload accepted, in bytes (the max IO size).
    pub max_payload_len: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_len: DEFAULT_MAX_PAYLOAD_LEN,
        }
    }
}

/// Why a frame was rejected. Every variant means the byte stream can no longer
/// be trusted: the connection that produced it should be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad magic {0:02x?}: not a netblk frame")]
    BadMagic([u8; 4]),
    #[error("unsupported protocol version {0} (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u16),
    #[error("reserved preamble flags set: {0:#06x}")]
    ReservedFlags(u16),
    #[error("header of {len} bytes exceeds the limit of {max}")]
    HeaderTooLong { len: u32, max: u32 },
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    PayloadTooLong { len: u64, max: u32 },
    #[error("malformed protobuf header: {0}")]
    Protobuf(String),
    #[error("header carries no known message")]
    UnknownMessage,
    #[error("request {id} carries no known operation")]
    UnknownOp { id: u64 },
    #[error("{what} must not carry a payload, got {len} bytes")]
    UnexpectedPayload { what: &'static str, len: u32 },
    #[error("write of {declared} bytes arrived with a payload of {actual} bytes")]
    WriteLengthMismatch { declared: u32, actual: u32 },
}

/// The fixed-size start of every frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preamble {
    pub header_len: u32,
    pub payload_len: u32,
}

impl Preamble {
    /// Parses and bounds-checks a preamble.
    pub fn parse(bytes: &[u8; PREAMBLE_LEN], limits: &Limits) -> Result<Preamble, FrameError> {
        let [
            m0,
            m1,
            m2,
            m3,
            v0,
            v1,
            f0,
            f1,
            h0,
            h1,
            h2,
            h3,
            p0,
            p1,
            p2,
            p3,
        ] = *bytes;
        let magic = [m0, m1, m2, m3];
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let version = u16::from_be_bytes([v0, v1]);
        if version != PROTOCOL_VERSION {
            return Err(FrameError::UnsupportedVersion(version));
        }
        let flags = u16::from_be_bytes([f0, f1]);
        if flags != 0 {
            return Err(FrameError::ReservedFlags(flags));
        }
        let header_len = u32::from_be_bytes([h0, h1, h2, h3]);
        if header_len > MAX_HEADER_LEN {
            return Err(FrameError::HeaderTooLong {
                len: header_len,
                max: MAX_HEADER_LEN,
            });
        }
        let payload_len = u32::from_be_bytes([p0, p1, p2, p3]);
        if payload_len > limits.max_payload_len {
            return Err(FrameError::PayloadTooLong {
                len: u64::from(payload_len),
                max: limits.max_payload_len,
            });
        }
        Ok(Preamble {
            header_len,
            payload_len,
        })
    }

    /// The wire form of this preamble.
    pub fn to_bytes(&self) -> [u8; PREAMBLE_LEN] {
        let mut out = [0u8; PREAMBLE_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&PROTOCOL_VERSION.to_be_bytes());
        out[8..12].copy_from_slice(&self.header_len.to_be_bytes());
        out[12..16].copy_from_slice(&self.payload_len.to_be_bytes());
        out
    }

    /// Header plus payload length: the bytes that follow the preamble.
    pub fn body_len(&self) -> usize {
        self.header_len as usize + self.payload_len as usize
    }
}

/// A decoded frame borrowing its payload from the input buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame<'a> {
    pub header: pb::Header,
    pub payload: &'a [u8],
    /// Bytes of the input this frame used: the caller drops these.
    pub len: usize,
}

/// Result of [`decode_frame`] on a possibly partial buffer.
// Returned by value and consumed at once: boxing the header would cost an
// allocation per frame for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded<'a> {
    /// The buffer holds no whole frame yet: at least this many more bytes are
    /// needed (never 0). The count is bounded by the limits, so the caller can
    /// reserve it safely.
    NeedMore(usize),
    Frame(Frame<'a>),
}

/// Decodes the first frame of `buf`, which may hold a partial frame, one
/// frame, or several.
pub fn decode_frame<'a>(buf: &'a [u8], limits: &Limits) -> Result<Decoded<'a>, FrameError> {
    let Some((preamble_bytes, rest)) = buf.split_first_chunk::<PREAMBLE_LEN>() else {
        return Ok(Decoded::NeedMore(PREAMBLE_LEN - buf.len()));
    };
    let preamble = Preamble::parse(preamble_bytes, limits)?;
    let body_len = preamble.body_len();
    if rest.len() < body_len {
        return Ok(Decoded::NeedMore(body_len - rest.len()));
    }
    let (header_bytes, rest) = rest.split_at(preamble.header_len as usize);
    let payload = &rest[..preamble.payload_len as usize];
    let header = decode_header(header_bytes, preamble.payload_len)?;
    Ok(Decoded::Frame(Frame {
        header,
        payload,
        len: PREAMBLE_LEN + body_len,
    }))
}

/// Decodes and checks a header whose preamble announced `payload_len`.
///
/// For callers that read the preamble, the header and the payload separately
/// (for example straight into a request buffer).
pub fn decode_header(bytes: &[u8], payload_len: u32) -> Result<pb::Header, FrameError> {
    let header = pb::Header::decode(bytes).map_err(|err| FrameError::Protobuf(err.to_string()))?;
    check_payload(&header, payload_len)?;
    Ok(header)
}

/// Which headers may carry a payload, and how much.
fn check_payload(header: &pb::Header, payload_len: u32) -> Result<(), FrameError> {
    let no_payload = |what: &'static str| {
        if payload_len == 0 {
            Ok(())
        } else {
            Err(FrameError::UnexpectedPayload {
                what,
                len: payload_len,
            })
        }
    };
    match &header.kind {
        None => Err(FrameError::UnknownMessage),
        Some(Kind::Request(request)) => match &request.op {
            None => Err(FrameError::UnknownOp { id: request.id }),
            Some(Op::Write(write)) if write.length != payload_len => {
                Err(FrameError::WriteLengthMismatch {
                    declared: write.length,
                    actual: payload_len,
                })
            }
            Some(Op::Write(_)) => Ok(()),
            Some(_) => no_payload("a request other than write"),
        },
        // A read's data. Only the requester knows the expected length.
        Some(Kind::Reply(_)) => Ok(()),
        Some(Kind::Handshake(_)) => no_payload("a handshake"),
        Some(Kind::HandshakeReply(_)) => no_payload("a handshake reply"),
        Some(Kind::Admin(_)) => no_payload("an admin request"),
        Some(Kind::AdminReply(_)) => no_payload("an admin reply"),
    }
}

/// Appends the preamble and the encoded `header` of a frame whose payload of
/// `payload_len` bytes the caller sends separately (for example zero-copy
/// from a request buffer).
pub fn encode_head(
    header: &pb::Header,
    payload_len: usize,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let header_len = header.encoded_len();
    let header_len = u32::try_from(header_len)
        .ok()
        .filter(|len| *len <= MAX_HEADER_LEN)
        .ok_or(FrameError::HeaderTooLong {
            len: u32::try_from(header_len).unwrap_or(u32::MAX),
            max: MAX_HEADER_LEN,
        })?;
    let payload_len = u32::try_from(payload_len).map_err(|_| FrameError::PayloadTooLong {
        len: payload_len as u64,
        max: u32::MAX,
    })?;
    check_payload(header, payload_len)?;
    out.reserve(PREAMBLE_LEN + header_len as usize);
    out.extend_from_slice(
        &Preamble {
            header_len,
            payload_len,
        }
        .to_bytes(),
    );
    // Encoding into a Vec cannot run out of room: reserve() made space above.
    header
        .encode(out)
        .map_err(|err| FrameError::Protobuf(err.to_string()))
}

/// Appends a whole frame (preamble, header, payload) to `out`.
pub fn encode_frame(
    header: &pb::Header,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    encode_head(header, payload.len(), out)?;
    out.extend_from_slice(payload);
    Ok(())
}

/// Shorthands for building headers.
impl pb::Header {
    pub fn request(id: u64, op: Op) -> pb::Header {
        pb::Header {
            kind: Some(Kind::Request(pb::Request { id, op: Some(op) })),
        }
    }

    pub fn reply(reply: pb::Reply) -> pb::Header {
        pb::Header {
            kind: Some(Kind::Reply(reply)),
        }
    }
}

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
//!
//! Header digests: a frame whose preamble has [`FLAG_HEADER_DIGEST`] ends
//! its header with a CRC-32C (4 bytes, big-endian, counted in the header
//! length) over the preamble and the protobuf bytes before it. Connections
//! that negotiated data digests carry one on every frame after the
//! handshake, in both directions ([`Limits::header_digest`] makes a frame
//! without one an error): the header says which request, where and how
//! long, and holds the payload's CRC, so one flipped bit anywhere in a
//! frame is caught, never taken for another request's answer.

use prost::Message;

use crate::pb;
use crate::pb::header::Kind;
use crate::pb::request::Op;

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"NBLK";
/// The protocol version this crate speaks, carried in every preamble and in
/// the handshake.
pub const PROTOCOL_VERSION: u16 = 1;
/// The protocol revision this crate speaks, stated in every handshake and
/// its reply (see the schema's `Handshake.revision`): peers of another
/// revision refuse each other by name instead of misreading each other.
pub const PROTOCOL_REVISION: u32 = 3;
/// Size of the fixed preamble in bytes.
pub const PREAMBLE_LEN: usize = 16;
/// Largest protobuf header accepted, in bytes.
pub const MAX_HEADER_LEN: u32 = 4096;
/// Default largest payload (one IO), in bytes.
pub const DEFAULT_MAX_PAYLOAD_LEN: u32 = 4 << 20;
/// Preamble flag: the header ends with its CRC-32C (see the module docs).
pub const FLAG_HEADER_DIGEST: u16 = 1;
/// Bytes of a header digest.
pub const HEADER_DIGEST_LEN: u32 = 4;

/// Bounds a decoder enforces before allocating, and what it requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload accepted, in bytes (the max IO size).
    pub max_payload_len: u32,
    /// Every frame must carry a header digest (the connection negotiated
    /// data digests).
    pub header_digest: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_len: DEFAULT_MAX_PAYLOAD_LEN,
            header_digest: false,
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
    #[error("frame without a header digest on a connection that requires one")]
    MissingHeaderDigest,
    #[error(
        "header digest {got:#010x} does not match the frame's {computed:#010x}: corrupted on the way"
    )]
    HeaderDigest { got: u32, computed: u32 },
}

/// The fixed-size start of every frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preamble {
    /// Header bytes, its digest included.
    pub header_len: u32,
    pub payload_len: u32,
    /// The header ends with its CRC-32C ([`FLAG_HEADER_DIGEST`]).
    pub header_digest: bool,
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
        if flags & !FLAG_HEADER_DIGEST != 0 {
            return Err(FrameError::ReservedFlags(flags));
        }
        let header_digest = flags & FLAG_HEADER_DIGEST != 0;
        if limits.header_digest && !header_digest {
            return Err(FrameError::MissingHeaderDigest);
        }
        let header_len = u32::from_be_bytes([h0, h1, h2, h3]);
        let max = MAX_HEADER_LEN + if header_digest { HEADER_DIGEST_LEN } else { 0 };
        if header_len > max {
            return Err(FrameError::HeaderTooLong {
                len: header_len,
                max,
            });
        }
        if header_digest && header_len < HEADER_DIGEST_LEN {
            return Err(FrameError::Protobuf(format!(
                "a header of {header_len} bytes cannot hold its digest"
            )));
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
            header_digest,
        })
    }

    /// The wire form of this preamble.
    pub fn to_bytes(&self) -> [u8; PREAMBLE_LEN] {
        let mut out = [0u8; PREAMBLE_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&PROTOCOL_VERSION.to_be_bytes());
        if self.header_digest {
            out[6..8].copy_from_slice(&FLAG_HEADER_DIGEST.to_be_bytes());
        }
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
    let header = decode_header(&preamble, header_bytes)?;
    Ok(Decoded::Frame(Frame {
        header,
        payload,
        len: PREAMBLE_LEN + body_len,
    }))
}

/// Decodes and checks the `preamble.header_len` header bytes that follow
/// `preamble` (checking their digest, if it has one).
///
/// For callers that read the preamble, the header and the payload separately
/// (for example straight into a request buffer).
pub fn decode_header(preamble: &Preamble, bytes: &[u8]) -> Result<pb::Header, FrameError> {
    let bytes = if preamble.header_digest {
        let (proto, digest) = bytes
            .split_last_chunk::<4>()
            .ok_or(FrameError::MissingHeaderDigest)?;
        let got = u32::from_be_bytes(*digest);
        let computed = header_crc(preamble, proto);
        if got != computed {
            return Err(FrameError::HeaderDigest { got, computed });
        }
        proto
    } else {
        bytes
    };
    let header = pb::Header::decode(bytes).map_err(|err| FrameError::Protobuf(err.to_string()))?;
    check_payload(&header, preamble.payload_len)?;
    Ok(header)
}

/// The header digest: CRC-32C over the preamble and the protobuf bytes.
fn header_crc(preamble: &Preamble, proto: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&preamble.to_bytes()), proto)
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
        Some(Kind::Inquiry(_)) => no_payload("an inquiry"),
        Some(Kind::InquiryReply(_)) => no_payload("an inquiry reply"),
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
    encode_head_as(header, payload_len, false, out)
}

/// As [`encode_head`], with a header digest when `digest` is set.
pub fn encode_head_as(
    header: &pb::Header,
    payload_len: usize,
    digest: bool,
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
    let preamble = Preamble {
        header_len: header_len + if digest { HEADER_DIGEST_LEN } else { 0 },
        payload_len,
        header_digest: digest,
    };
    out.reserve(PREAMBLE_LEN + preamble.header_len as usize);
    out.extend_from_slice(&preamble.to_bytes());
    let start = out.len();
    // Encoding into a Vec cannot run out of room: reserve() made space above.
    header
        .encode(out)
        .map_err(|err| FrameError::Protobuf(err.to_string()))?;
    if digest {
        let crc = header_crc(&preamble, &out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    Ok(())
}

/// Appends a whole frame (preamble, header, payload) to `out`.
pub fn encode_frame(
    header: &pb::Header,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    encode_frame_as(header, payload, false, out)
}

/// As [`encode_frame`], with a header digest when `digest` is set.
pub fn encode_frame_as(
    header: &pb::Header,
    payload: &[u8],
    digest: bool,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    encode_head_as(header, payload.len(), digest, out)?;
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

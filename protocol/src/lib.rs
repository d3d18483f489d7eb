//! The netblk wire protocol, version 1.
//!
//! - [`pb`]: the message types generated from `proto/netblk.proto`.
//! - [`frame`]: the sans-IO frame codec (preamble, protobuf header, raw payload).
//! - [`status`]: status codes and their errno mapping.
//!
//! Architecture invariant: this crate does no I/O and owns no clock; it turns
//! bytes into checked messages and back.

pub mod frame;
pub mod geometry;
pub mod status;
pub mod units;

/// Message types generated from `proto/netblk.proto` (package `netblk.v1`).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/netblk.v1.rs"));
}

pub use frame::{
    DEFAULT_MAX_PAYLOAD_LEN, Decoded, FLAG_HEADER_DIGEST, Frame, FrameError, HEADER_DIGEST_LEN,
    Limits, MAGIC, MAX_HEADER_LEN, PREAMBLE_LEN, PROTOCOL_REVISION, PROTOCOL_VERSION, Preamble,
    decode_frame, decode_header, encode_frame, encode_frame_as, encode_head, encode_head_as,
};
pub use status::{Status, errno_of_status, status_of_errno};

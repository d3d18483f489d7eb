//! Frames off a socket into a receive buffer: whole frames are decoded
//! where they landed, and a write's payload is handed to the store straight
//! from that buffer (no copy per request). A connection holds a buffer only
//! while it has bytes in it: between requests it goes back to its worker's
//! pool ([`FrameReader::adopt`], [`FrameReader::give_back`]), so idle
//! connections cost no buffer.

use std::io::{self, Read};
use std::net::TcpStream;
use std::ops::Range;
use std::sync::Arc;

use netblk_protocol::pb;
use netblk_protocol::{Decoded, Limits, PREAMBLE_LEN, decode_frame};
use prost::Message;

use crate::conn::ConnError;
use crate::node::{Broken, Node, bump};

/// Initial read buffer; it grows up to one whole frame at most. Large, so
/// that a partial frame at its end (moved to the front before the next
/// read) is rare: with 256 KiB and 128 KiB write frames, moving them copied
/// about half the bytes a second time (seen in a guest profile: the node's
/// memmove above its receive copy).
const READ_BUF: usize = 4 << 20;

/// What a read from the socket gave.
pub enum Fill {
    /// Bytes arrived; `drained`: fewer than there was room for, so the
    /// socket had no more just now (another read would likely find none).
    Got { drained: bool },
    /// Nothing now (a non-blocking socket), or nothing within the read
    /// timeout (a blocking one).
    WouldBlock,
    /// The peer closed its side at a frame boundary.
    Eof,
}

/// A connection's received bytes and the frames in them.
pub struct FrameReader {
    /// Counts what arrives (`wire_in`).
    node: Arc<Node>,
    /// Empty while the connection holds no buffer.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes the frame at `start` still lacks (from the last decode).
    need: usize,
    pub limits: Limits,
}

impl FrameReader {
    pub fn new(node: &Arc<Node>) -> Self {
        FrameReader {
            node: Arc::clone(node),
            limits: node.limits,
            buf: Vec::new(),
            start: 0,
            end: 0,
            need: PREAMBLE_LEN,
        }
    }

    /// The next whole frame already received: its header and where its
    /// payload is ([`FrameReader::payload`]); `None` until more arrives.
    pub fn decode(&mut self) -> Result<Option<(pb::Header, Range<usize>)>, ConnError> {
        match decode_frame(&self.buf[self.start..self.end], &self.limits)? {
            Decoded::Frame(frame) => {
                let payload_len = frame.payload.len();
                if self.node.breaks(Broken::RejectUnknownFields) {
                    // Broken on purpose: a header longer than its known
                    // fields re-encode to is refused.
                    let digest = if self.limits.header_digest { 4 } else { 0 };
                    let header_len = frame.len - PREAMBLE_LEN - payload_len - digest;
                    if frame.header.encoded_len() != header_len {
                        return Err(ConnError::Violation("a header with unknown fields".into()));
                    }
                }
                let payload_end = self.start + frame.len;
                let payload = payload_end - payload_len..payload_end;
                self.start = payload_end;
                self.need = PREAMBLE_LEN;
                Ok(Some((frame.header, payload)))
            }
            Decoded::NeedMore(need) => {
                self.need = need;
                Ok(None)
            }
        }
    }

    /// Takes `buf` (from a pool: [`READ_BUF`] bytes) if this reader holds
    /// none.
    pub fn adopt(&mut self, buf: impl FnOnce() -> Option<Vec<u8>>) {
        if self.buf.is_empty()
            && let Some(buf) = buf()
        {
            self.buf = buf;
            self.start = 0;
            self.end = 0;
        }
    }

    /// The buffer, for a pool, if it holds no bytes of a frame and has its
    /// usual size (one grown for a large frame is freed instead).
    pub fn give_back(&mut self) -> Option<Vec<u8>> {
        if self.start != self.end || self.buf.is_empty() {
            return None;
        }
        let buf = std::mem::take(&mut self.buf);
        self.start = 0;
        self.end = 0;
        (buf.len() == READ_BUF).then_some(buf)
    }

    /// The bytes of a payload [`FrameReader::decode`] pointed at (valid
    /// until the next [`FrameReader::fill`]).
    pub fn payload(&self, range: Range<usize>) -> &[u8] {
        &self.buf[range]
    }

    /// One read from `stream` into the buffer, with room for at least the
    /// rest of the frame being received (bounded by the limits).
    pub fn fill(&mut self, stream: &TcpStream) -> Result<Fill, ConnError> {
        if self.buf.is_empty() {
            self.buf = vec![0; READ_BUF];
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let need = self.need.max(1);
        if self.end + need > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.end + need > self.buf.len() {
                self.buf.resize(self.end + need, 0);
            }
        }
        let room = self.buf.len() - self.end;
        let n = loop {
            match (&*stream).read(&mut self.buf[self.end..]) {
                Ok(n) => break n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(Fill::WouldBlock);
                }
                Err(err) => return Err(err.into()),
            }
        };
        if n == 0 {
            let buffered = self.end - self.start;
            return if buffered == 0 {
                Ok(Fill::Eof)
            } else {
                Err(ConnError::Truncated(buffered))
            };
        }
        bump(&self.node.counters.wire_in, n as u64);
        self.end += n;
        Ok(Fill::Got { drained: n < room })
    }

    /// On a blocking socket: the next frame, `None` at a clean end of
    /// stream; a read timeout is an `io::ErrorKind::TimedOut` error.
    pub fn next_blocking(
        &mut self,
        stream: &TcpStream,
    ) -> Result<Option<(pb::Header, Range<usize>)>, ConnError> {
        loop {
            if let Some(frame) = self.decode()? {
                return Ok(Some(frame));
            }
            match self.fill(stream)? {
                Fill::Got { .. } => {}
                Fill::Eof => return Ok(None),
                Fill::WouldBlock => return Err(io::Error::from(io::ErrorKind::TimedOut).into()),
            }
        }
    }
}

//! Reading replies off one node connection, sans IO: bytes a receive
//! returned go in, the engine hears of each reply, and a read's payload bytes
//! come out addressed to their place in the request buffer.
//!
//! Anything a node sends, however broken, ends in `Ok` or in an `Err` that
//! closes the connection (the engine then resends what was in flight on it);
//! nothing here panics on input. `tests` below feed corrupted streams.

use netblk_protocol::pb::header::Kind;
use netblk_protocol::{Limits, PREAMBLE_LEN, Preamble, decode_header};

use crate::engine::{Engine, Payload, ReplySink, Tag};

/// What the next bytes on the connection are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvMode {
    /// A frame: preamble, header, maybe a payload.
    Frames,
    /// A read's payload, going to `tag`'s buffer at `offset`; with data
    /// digests, `digest` is the CRC-32C it must have and the one of the
    /// bytes delivered so far.
    Payload {
        id: u64,
        tag: Tag,
        offset: u32,
        left: u32,
        digest: Option<Digest>,
    },
    /// A payload nobody wants (its request timed out or was resent).
    Skip { left: u64 },
}

/// A payload's CRC-32C: what the reply says, and what came so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    pub want: u32,
    pub got: u32,
}

impl Digest {
    fn outcome(self) -> Payload {
        if self.got == self.want {
            Payload::Ok
        } else {
            Payload::DigestMismatch
        }
    }
}

/// One connection's reply parser.
#[derive(Debug)]
pub struct ReplyReader {
    mode: RecvMode,
}

impl Default for ReplyReader {
    fn default() -> Self {
        ReplyReader::new()
    }
}

impl ReplyReader {
    pub fn new() -> ReplyReader {
        ReplyReader {
            mode: RecvMode::Frames,
        }
    }

    pub fn mode(&self) -> RecvMode {
        self.mode
    }

    /// Consumes whole frames and payload bytes from the start of `buf`, the
    /// bytes received from `node`. Payload bytes of a read are handed to
    /// `deliver(tag, offset, bytes)`. Returns how many bytes were consumed;
    /// the rest (an incomplete frame) must be offered again with more.
    /// An error means the node broke the protocol, or `deliver` failed (the
    /// payload is then not reported received): close the connection.
    pub fn feed(
        &mut self,
        node: usize,
        buf: &[u8],
        engine: &mut Engine,
        mut deliver: impl FnMut(Tag, u32, &[u8]) -> Result<(), String>,
    ) -> Result<usize, String> {
        let mut at = 0usize;
        loop {
            let avail = &buf[at..];
            match self.mode {
                RecvMode::Frames => {
                    let Some(preamble) = avail.first_chunk::<PREAMBLE_LEN>() else {
                        return Ok(at);
                    };
                    // The engine checks each reply's payload length against
                    // its request; no other limit applies here.
                    let preamble = Preamble::parse(
                        preamble,
                        &Limits {
                            max_payload_len: u32::MAX,
                            // Data digests bring header digests with them.
                            header_digest: engine.config().data_digest,
                        },
                    )
                    .map_err(|e| e.to_string())?;
                    let need = PREAMBLE_LEN + preamble.header_len as usize;
                    let Some(header) = avail.get(PREAMBLE_LEN..need) else {
                        return Ok(at);
                    };
                    let header = decode_header(&preamble, header).map_err(|e| e.to_string())?;
                    at += need;
                    let Some(Kind::Reply(reply)) = header.kind else {
                        return Err("the node sent something other than a reply".into());
                    };
                    let sink = engine
                        .handle_reply(node, &reply, preamble.payload_len)
                        .map_err(|e| e.to_string())?;
                    self.mode = match sink {
                        ReplySink::Done => RecvMode::Frames,
                        ReplySink::Discard if preamble.payload_len == 0 => RecvMode::Frames,
                        ReplySink::Discard => RecvMode::Skip {
                            left: u64::from(preamble.payload_len),
                        },
                        ReplySink::Buffer { id, slice, crc32c } => RecvMode::Payload {
                            id,
                            tag: slice.tag,
                            offset: slice.offset,
                            left: slice.len,
                            digest: crc32c.map(|want| Digest { want, got: 0 }),
                        },
                    };
                }
                RecvMode::Skip { left } => {
                    let take = (avail.len() as u64).min(left);
                    at += take as usize;
                    if take < left {
                        self.mode = RecvMode::Skip { left: left - take };
                        return Ok(at);
                    }
                    self.mode = RecvMode::Frames;
                }
                RecvMode::Payload {
                    id,
                    tag,
                    offset,
                    left,
                    digest,
                } => {
                    let take = avail.len().min(left as usize);
                    let bytes = &avail[..take];
                    deliver(tag, offset, bytes)?;
                    let digest = digest.map(|d| Digest {
                        got: crc32c::crc32c_append(d.got, bytes),
                        ..d
                    });
                    at += take;
                    if take < left as usize {
                        self.mode = RecvMode::Payload {
                            id,
                            tag,
                            offset: offset + take as u32,
                            left: left - take as u32,
                            digest,
                        };
                        return Ok(at);
                    }
                    self.mode = RecvMode::Frames;
                    engine.handle_payload_as(id, digest.map_or(Payload::Ok, Digest::outcome));
                }
            }
        }
    }

    /// `got` payload bytes were received straight into the request buffer
    /// (at the place [`RecvMode::Payload`] names). Only kernel buffer mode
    /// does this, and data digests use user buffers: were it reached with
    /// a digest, the bytes not seen here count as a mismatch (read again),
    /// never as checked.
    pub fn payload_received(&mut self, engine: &mut Engine, got: u32) {
        if let RecvMode::Payload {
            id,
            tag,
            offset,
            left,
            digest,
        } = self.mode
        {
            let got = got.min(left);
            if got == left {
                self.mode = RecvMode::Frames;
                engine.handle_payload_as(id, digest.map_or(Payload::Ok, Digest::outcome));
            } else {
                self.mode = RecvMode::Payload {
                    id,
                    tag,
                    offset: offset + got,
                    left: left - got,
                    digest,
                };
            }
        }
    }

    /// The connection is gone: a payload being received is abandoned.
    pub fn reset(&mut self, engine: &mut Engine) {
        if let RecvMode::Payload { id, .. } = self.mode {
            engine.handle_payload(id, false);
        }
        *self = ReplyReader::new();
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use netblk_protocol::encode_frame;
    use netblk_protocol::pb::{self, Status};
    use proptest::prelude::*;

    use super::*;
    use crate::engine::{BlockRequest, Completion, EngineConfig, Op};
    use crate::layout::Layout;

    const DEPTH: u16 = 8;
    const UNIT: u64 = 4096;

    fn engine() -> Engine {
        let mut e = Engine::new(
            Layout::new(1 << 20, UNIT as u32, 2).expect("layout"),
            EngineConfig {
                depth: DEPTH,
                max_io: 65536,
                max_in_flight_per_node: 64,
                io_timeout: Duration::from_secs(30),
                node_down_timeout: Duration::from_secs(30),
                replica_timeout: Duration::from_secs(5),
                data_digest: false,
            },
        );
        e.handle_connection_restored(0);
        e.handle_connection_restored(1);
        e
    }

    /// Reads on both nodes: every tag reads 2 stripe units from its own
    /// offset, one piece per node. Returns the ids sent to node 0 and their
    /// lengths.
    fn submit_reads(e: &mut Engine, now: Instant) -> Vec<(u64, u32)> {
        for tag in 0..DEPTH {
            e.handle_request(
                now,
                BlockRequest {
                    tag,
                    op: Op::Read,
                    offset: u64::from(tag) * 2 * UNIT,
                    len: 2 * UNIT,
                },
            )
            .expect("submit");
        }
        let mut sent = Vec::new();
        while let Some(t) = e.poll_transmit(0) {
            sent.push((t.id, UNIT as u32));
        }
        while e.poll_transmit(1).is_some() {}
        sent
    }

    /// Node 0's replies to `sent`, in order, as bytes: payload byte = tag.
    fn reply_stream(sent: &[(u64, u32)], error_every: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, &(id, len)) in sent.iter().enumerate() {
            let failed = error_every > 0 && i % error_every == 0;
            let reply = pb::Reply {
                id,
                status: if failed {
                    Status::IoError as i32
                } else {
                    Status::Ok as i32
                },
                ..Default::default()
            };
            let payload = if failed {
                Vec::new()
            } else {
                vec![i as u8; len as usize]
            };
            encode_frame(&pb::Header::reply(reply), &payload, &mut out).expect("encode");
        }
        out
    }

    /// Feeds `stream` in `chunks`-sized pieces the way the driver does (an
    /// unconsumed tail is offered again with the next bytes). Returns
    /// whether the reader gave up on the connection.
    fn feed_all(
        node: usize,
        reader: &mut ReplyReader,
        e: &mut Engine,
        stream: &[u8],
        chunks: &[usize],
        buffers: &mut [Vec<u8>],
    ) -> bool {
        let mut pending: Vec<u8> = Vec::new();
        let mut at = 0;
        let mut sizes = chunks.iter().cycle();
        while at < stream.len() {
            let n = (*sizes.next().unwrap_or(&1)).clamp(1, stream.len() - at);
            pending.extend_from_slice(&stream[at..at + n]);
            at += n;
            let consumed = reader.feed(node, &pending, e, |tag, offset, bytes| {
                // The engine hands out slices inside the tag's buffer only.
                let buf = &mut buffers[usize::from(tag)];
                let range = offset as usize..offset as usize + bytes.len();
                assert!(range.end <= buf.len(), "payload outside its tag buffer");
                buf[range].copy_from_slice(bytes);
                Ok(())
            });
            match consumed {
                Ok(n) => {
                    assert!(n <= pending.len());
                    pending.drain(..n);
                }
                Err(_) => return true,
            }
        }
        false
    }

    #[test]
    fn clean_stream_in_any_chunking_completes_every_read() {
        for chunk in [1usize, 7, 16, 100, 4096, 1 << 20] {
            let now = Instant::now();
            let mut e = engine();
            let sent = submit_reads(&mut e, now);
            let stream = reply_stream(&sent, 0);
            let mut buffers = vec![vec![0u8; 2 * UNIT as usize]; usize::from(DEPTH)];
            let mut reader = ReplyReader::new();
            assert!(!feed_all(
                0,
                &mut reader,
                &mut e,
                &stream,
                &[chunk],
                &mut buffers
            ));
            assert_eq!(reader.mode(), RecvMode::Frames);
            // Node 0's half of every tag holds its reply's bytes.
            for (i, buf) in buffers.iter().enumerate() {
                assert!(
                    buf[..UNIT as usize].iter().all(|&b| b == i as u8),
                    "chunk {chunk}"
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever a node sends, the reader neither panics nor writes
        /// outside a request's buffer; after it gives up, a clean resend on
        /// a new connection still completes every request exactly once.
        #[test]
        fn corrupted_reply_streams_never_panic_and_recovery_is_clean(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
            cut in proptest::option::of(any::<prop::sample::Index>()),
            garbage in proptest::collection::vec(any::<u8>(), 0..64),
            garbage_at in any::<prop::sample::Index>(),
            chunks in proptest::collection::vec(1usize..5000, 1..8),
            error_every in 0usize..4,
        ) {
            let now = Instant::now();
            let mut e = engine();
            let sent = submit_reads(&mut e, now);
            let mut stream = reply_stream(&sent, error_every);
            for (at, x) in &flips {
                let i = at.index(stream.len());
                stream[i] ^= x | 1;
            }
            let at = garbage_at.index(stream.len() + 1);
            stream.splice(at..at, garbage.iter().copied());
            if let Some(cut) = cut {
                stream.truncate(cut.index(stream.len() + 1));
            }
            let mut buffers = vec![vec![0u8; 2 * UNIT as usize]; usize::from(DEPTH)];
            let mut reader = ReplyReader::new();
            feed_all(0, &mut reader, &mut e, &stream, &chunks, &mut buffers);

            // The connection is dropped either way; node 1 answers cleanly.
            reader.reset(&mut e);
            e.handle_connection_lost(now, 0);
            e.handle_connection_restored(0);
            let mut resent = Vec::new();
            while let Some(t) = e.poll_transmit(0) {
                resent.push((t.id, UNIT as u32));
            }
            let stream = reply_stream(&resent, 0);
            let mut reader = ReplyReader::new();
            prop_assert!(!feed_all(0, &mut reader, &mut e, &stream, &chunks, &mut buffers));
            // Node 1's pieces, sent before: resent after a reconnect too,
            // which is how this test learns their ids.
            e.handle_connection_lost(now, 1);
            e.handle_connection_restored(1);
            let mut node1 = Vec::new();
            while let Some(t) = e.poll_transmit(1) {
                node1.push((t.id, UNIT as u32));
            }
            let stream = reply_stream(&node1, 0);
            let mut reader = ReplyReader::new();
            prop_assert!(!feed_all(1, &mut reader, &mut e, &stream, &chunks, &mut buffers));
            let mut done = std::collections::HashMap::new();
            while let Some(Completion { tag, result }) = e.poll_completion() {
                prop_assert!(done.insert(tag, result).is_none(), "tag {} completed twice", tag);
            }
            // Every request completed, with its length or with the errno of
            // an error reply (which a corrupted status may also produce).
            prop_assert_eq!(done.len(), usize::from(DEPTH));
            for (tag, result) in done {
                prop_assert!(
                    result == Ok(2 * UNIT) || matches!(result, Err(errno) if errno > 0),
                    "tag {}: {:?}", tag, result
                );
            }
        }
    }
}

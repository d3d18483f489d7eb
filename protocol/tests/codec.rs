//! Property tests for the frame codec: every message round-trips, and no byte
//! stream (random, mutated, truncated, split anywhere) makes the decoder panic.
//! Behind valid preambles, random or rule-breaking headers get typed header
//! errors (or exactly the verdict of the frame rules), partial frames ask for
//! exactly the missing bytes, and a valid frame after garbage comes out
//! intact.

use netblk_protocol::pb::{self, admin::Cmd, header::Kind, request::Op};
use netblk_protocol::{
    DEFAULT_MAX_PAYLOAD_LEN, Decoded, FrameError, Limits, MAX_HEADER_LEN, PREAMBLE_LEN, Preamble,
    decode_frame, decode_header, encode_frame, encode_frame_as, encode_head,
};
use proptest::prelude::*;

fn status() -> impl Strategy<Value = i32> {
    prop_oneof![0..=9i32, any::<i32>()]
}

fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 ._:/-]{0,64}"
}

fn layout() -> impl Strategy<Value = Option<pb::Layout>> {
    proptest::option::of((any::<u32>(), any::<u32>(), any::<u32>()).prop_map(
        |(stripe_unit, node_count, node_index)| pb::Layout {
            stripe_unit,
            node_count,
            node_index,
            replicas: node_index % 7,
            replica_index: node_count % 5,
        },
    ))
}

fn handshake() -> impl Strategy<Value = pb::Handshake> {
    (
        any::<u32>(),
        text(),
        text(),
        any::<u64>(),
        layout(),
        any::<u64>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                protocol_version,
                client_id,
                volume,
                volume_size,
                layout,
                session,
                existing,
                at_least,
            )| {
                pb::Handshake {
                    protocol_version,
                    client_id,
                    volume,
                    volume_size,
                    layout,
                    session,
                    existing,
                    at_least,
                    // The new fields ride on drawn values.
                    data_digest: (session % 2) as i32,
                    revision: protocol_version.rotate_left(7),
                    owner_epoch: session.rotate_left(3),
                }
            },
        )
}

fn handshake_reply() -> impl Strategy<Value = pb::HandshakeReply> {
    (
        (status(), text(), any::<u32>(), any::<u32>(), text()),
        (text(), any::<u64>(), any::<u64>(), any::<u64>()),
    )
        .prop_map(
            |(
                (status, message, protocol_version, max_io_size, node_id),
                (volume_id, incarnation, durable_incarnation, volume_size),
            )| pb::HandshakeReply {
                status,
                message,
                protocol_version,
                max_io_size,
                node_id,
                volume_id,
                incarnation,
                durable_incarnation,
                volume_size,
                data_digest: (incarnation % 2) as i32,
                revision: max_io_size.rotate_left(3),
            },
        )
}

/// A request and the payload length it must carry.
fn request() -> impl Strategy<Value = (pb::Request, u32)> {
    let op = prop_oneof![
        (any::<u64>(), any::<u32>())
            .prop_map(|(offset, length)| (Op::Read(pb::Read { offset, length }), 0)),
        (any::<u64>(), 0u32..70_000, any::<bool>()).prop_map(|(offset, length, fua)| (
            Op::Write(pb::Write {
                offset,
                length,
                fua,
                crc32c: fua.then_some(offset as u32),
            }),
            length
        )),
        Just((Op::Flush(pb::Flush {}), 0)),
        (any::<u64>(), any::<u64>())
            .prop_map(|(offset, length)| (Op::Discard(pb::Discard { offset, length }), 0)),
        (any::<u64>(), any::<u64>())
            .prop_map(|(offset, length)| (Op::WriteZeroes(pb::WriteZeroes { offset, length }), 0)),
        any::<u64>().prop_map(|nonce| (Op::Ping(pb::Ping { nonce }), 0)),
        any::<u64>().prop_map(|from| (Op::GetActivity(pb::GetActivity { from }), 0)),
        (any::<u64>(), any::<u64>())
            .prop_map(|(offset, length)| (Op::Digest(pb::Digest { offset, length }), 0)),
        (any::<u32>(), any::<u64>())
            .prop_map(|(row, from)| (Op::GetMissed(pb::GetMissed { row, from }), 0)),
        (any::<u64>(), 0usize..128).prop_map(|(seq, n)| (
            Op::TrimActivity(pb::TrimActivity {
                regions: (0..n as u64).collect(),
                seqs: vec![seq; n],
            }),
            0
        )),
    ];
    (any::<u64>(), op)
        .prop_map(|(id, (op, payload_len))| (pb::Request { id, op: Some(op) }, payload_len))
}

fn reply() -> impl Strategy<Value = pb::Reply> {
    (any::<u64>(), status(), text(), any::<u64>()).prop_map(|(id, status, message, nonce)| {
        pb::Reply {
            id,
            status,
            message,
            nonce,
            crc32c: (nonce % 3 != 0).then_some(nonce as u32),
            // The record rides on drawn values.
            record: (nonce % 5 == 0).then(|| pb::MembershipRecord {
                generation: nonce,
                owner_epoch: id,
                owner: format!("owner-{id}"),
                clean: nonce % 2 == 0,
                iss: vec![(nonce % 4) as u32; (id % 4) as usize],
                joining: vec![(nonce % 3) as u32; (id % 3) as usize],
                rebuild: vec![(nonce % 2) as u32; (id % 2) as usize],
                members: vec![format!("127.0.0.1:{}", 7000 + id % 100); (id % 3) as usize],
            }),
            owner_connected: nonce % 7 == 0,
            activity_regions: vec![nonce / 3; (id % 5) as usize],
            activity_seqs: vec![id; (id % 5) as usize],
            activity_more: id % 2 == 0,
            missed_regions: vec![id / 7; (nonce % 3) as usize],
            missed_more: nonce % 2 == 1,
            missed_since: nonce / 5,
        }
    })
}

fn faults() -> impl Strategy<Value = pb::Faults> {
    (
        any::<u64>(),
        any::<u64>(),
        0.0f64..=1.0,
        status(),
        any::<u64>(),
        any::<bool>(),
        any::<u32>(),
        any::<u64>(),
        status(),
    )
        .prop_map(
            |(
                latency_us,
                jitter_us,
                error_probability,
                error_status,
                drop_after,
                stall,
                corrupt_replies,
                crash_after,
                corrupt_part,
            )| pb::Faults {
                latency_us,
                jitter_us,
                error_probability,
                error_status,
                drop_after,
                stall,
                corrupt_replies,
                crash_after,
                stall_open_only: stall,
                corrupt_part,
                corrupt_writes: corrupt_replies / 2,
            },
        )
}

fn stats() -> impl Strategy<Value = pb::Stats> {
    proptest::collection::vec(any::<u64>(), 17).prop_map(|v| pb::Stats {
        connections_accepted: v[0],
        connections_open: v[1],
        connections_refused: v[2],
        protocol_errors: v[3],
        requests: v[4],
        bytes_read: v[5],
        bytes_written: v[6],
        injected_errors: v[7],
        dropped_connections: v[8],
        corrupted_replies: v[9],
        volumes: v[10],
        stored_bytes: v[11],
        digest_errors: v[12],
        corrupted_writes: v[13],
        policy_refusals: v[14],
        wire_in_bytes: v[15],
        wire_out_bytes: v[16],
    })
}

fn admin() -> impl Strategy<Value = pb::Admin> {
    prop_oneof![
        faults().prop_map(Cmd::SetFaults),
        Just(Cmd::GetStats(pb::GetStats {})),
        Just(Cmd::Crash(pb::Crash {})),
    ]
    .prop_map(|cmd| pb::Admin { cmd: Some(cmd) })
}

fn admin_reply() -> impl Strategy<Value = pb::AdminReply> {
    (
        status(),
        text(),
        proptest::option::of(faults()),
        proptest::option::of(stats()),
    )
        .prop_map(|(status, message, faults, stats)| pb::AdminReply {
            status,
            message,
            faults,
            stats,
        })
}

fn inquiry() -> impl Strategy<Value = pb::Inquiry> {
    use pb::inquiry::What;
    (
        any::<u32>(),
        any::<u32>(),
        prop_oneof![
            Just(What::List(pb::ListVolumes {})),
            text().prop_map(|volume| What::Describe(pb::DescribeVolume { volume })),
        ],
    )
        .prop_map(|(protocol_version, revision, what)| pb::Inquiry {
            protocol_version,
            revision,
            what: Some(what),
        })
}

fn inquiry_reply() -> impl Strategy<Value = pb::InquiryReply> {
    let described = (text(), any::<u64>(), layout(), reply()).prop_map(
        |(volume, volume_size, layout, reply)| pb::VolumeDescription {
            volume,
            volume_size,
            layout,
            volume_id: format!("{:x}", reply.id),
            record: reply.record,
        },
    );
    (
        status(),
        text(),
        any::<u32>(),
        proptest::collection::vec(described, 0..4),
    )
        .prop_map(|(status, message, revision, volumes)| pb::InquiryReply {
            status,
            message,
            protocol_version: 1,
            revision,
            node_id: String::new(),
            volumes,
        })
}

/// Any valid frame: a header and a payload that fits it.
fn frame() -> impl Strategy<Value = (pb::Header, Vec<u8>)> {
    let kind = prop_oneof![
        handshake().prop_map(|m| (Kind::Handshake(m), 0)),
        handshake_reply().prop_map(|m| (Kind::HandshakeReply(m), 0)),
        request().prop_map(|(m, len)| (Kind::Request(m), len)),
        (reply(), 0u32..70_000).prop_map(|(m, len)| (Kind::Reply(m), len)),
        admin().prop_map(|m| (Kind::Admin(m), 0)),
        admin_reply().prop_map(|m| (Kind::AdminReply(m), 0)),
        inquiry().prop_map(|m| (Kind::Inquiry(m), 0)),
        inquiry_reply().prop_map(|m| (Kind::InquiryReply(m), 0)),
    ];
    (kind, any::<u8>()).prop_map(|((kind, len), fill)| {
        let payload = (0..len).map(|i| fill.wrapping_add(i as u8)).collect();
        (pb::Header { kind: Some(kind) }, payload)
    })
}

/// Decodes every frame of `stream`, feeding it in chunks of the given sizes
/// the way a socket would, and returns the frames or the first error.
fn decode_stream(
    stream: &[u8],
    chunks: &[usize],
    limits: &Limits,
) -> Result<Vec<(pb::Header, Vec<u8>)>, FrameError> {
    let mut frames = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut fed = 0;
    let mut chunk_sizes = chunks.iter().copied().cycle();
    loop {
        match decode_frame(&buf, limits)? {
            Decoded::Frame(frame) => {
                frames.push((frame.header, frame.payload.to_vec()));
                let len = frame.len;
                assert!(len >= PREAMBLE_LEN && len <= buf.len());
                buf.drain(..len);
            }
            Decoded::NeedMore(need) => {
                assert!(need > 0, "NeedMore(0) would make a reader spin");
                assert!(
                    need <= PREAMBLE_LEN
                        + MAX_HEADER_LEN as usize
                        + limits.max_payload_len as usize,
                    "NeedMore({need}) exceeds the limits"
                );
                if fed == stream.len() {
                    return Ok(frames);
                }
                let step = chunk_sizes.next().unwrap_or(1).max(1);
                let end = (fed + step).min(stream.len());
                buf.extend_from_slice(&stream[fed..end]);
                fed = end;
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_message_round_trips(frames in proptest::collection::vec(frame(), 1..6),
                                 chunks in proptest::collection::vec(1usize..9000, 1..8)) {
        let mut stream = Vec::new();
        for (header, payload) in &frames {
            encode_frame(header, payload, &mut stream).expect("valid frame encodes");
        }
        let decoded = decode_stream(&stream, &chunks, &Limits::default()).expect("decodes");
        prop_assert_eq!(decoded, frames);
    }

    #[test]
    fn head_and_header_decode_separately((header, payload) in frame()) {
        let mut head = Vec::new();
        encode_head(&header, payload.len(), &mut head).expect("encodes");
        let preamble_bytes: &[u8; PREAMBLE_LEN] = head[..PREAMBLE_LEN].try_into().expect("16 bytes");
        let preamble = Preamble::parse(preamble_bytes, &Limits::default()).expect("parses");
        prop_assert_eq!(preamble.payload_len as usize, payload.len());
        prop_assert_eq!(preamble.header_len as usize, head.len() - PREAMBLE_LEN);
        let decoded = decode_header(&preamble, &head[PREAMBLE_LEN..]).expect("decodes");
        prop_assert_eq!(decoded, header);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..20_000),
                                chunks in proptest::collection::vec(1usize..300, 1..8),
                                max_payload in 0u32..100_000) {
        let _ = decode_stream(&bytes, &chunks, &Limits { max_payload_len: max_payload, header_digest: false });
    }

    #[test]
    fn random_bytes_after_a_valid_preamble_never_panic(
        header_len in 0u32..=MAX_HEADER_LEN,
        body in proptest::collection::vec(any::<u8>(), 0..5000),
    ) {
        let mut stream = Preamble { header_len, payload_len: 0, header_digest: false }.to_bytes().to_vec();
        stream.extend_from_slice(&body);
        let _ = decode_stream(&stream, &[7, 300, 4096], &Limits::default());
    }

    #[test]
    fn mutated_streams_never_panic(frames in proptest::collection::vec(frame(), 1..4),
                                   mutations in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..12),
                                   cut in any::<prop::sample::Index>(),
                                   chunks in proptest::collection::vec(1usize..3000, 1..8)) {
        let mut stream = Vec::new();
        for (header, payload) in &frames {
            encode_frame(header, payload, &mut stream).expect("valid frame encodes");
        }
        for (at, byte) in mutations {
            let i = at.index(stream.len());
            stream[i] ^= byte | 1;
        }
        stream.truncate(cut.index(stream.len() + 1));
        let _ = decode_stream(&stream, &chunks, &Limits::default());
    }
}

/// The errors a frame can have once its preamble is valid: they are about
/// the header, never the framing.
fn is_header_error(err: &FrameError) -> bool {
    match err {
        FrameError::Protobuf(why) => !why.is_empty(),
        FrameError::UnknownMessage
        | FrameError::UnknownOp { .. }
        | FrameError::UnexpectedPayload { .. }
        | FrameError::WriteLengthMismatch { .. }
        | FrameError::HeaderDigest { .. } => true,
        FrameError::BadMagic(_)
        | FrameError::UnsupportedVersion(_)
        | FrameError::ReservedFlags(_)
        | FrameError::HeaderTooLong { .. }
        | FrameError::PayloadTooLong { .. }
        | FrameError::MissingHeaderDigest => false,
    }
}

/// The preamble of a frame without a header digest.
fn plain(header_len: u32, payload_len: u32) -> Preamble {
    Preamble {
        header_len,
        payload_len,
        header_digest: false,
    }
}

/// A valid preamble for `header` and `payload`, then both.
fn framed(header: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = Preamble {
        header_len: header.len() as u32,
        payload_len: payload.len() as u32,
        header_digest: false,
    }
    .to_bytes()
    .to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(payload);
    out
}

/// Checks what the decoder makes of one frame whose preamble is valid and
/// announces exactly the bytes that follow: every prefix needs exactly the
/// missing bytes (never 0), and the whole either decodes as one frame of
/// exactly that length, agreeing with `decode_header`, or fails with a
/// header error. Returns the decoded header (`None` after an error).
fn check_one_frame(
    bytes: &[u8],
    header_len: usize,
    limits: &Limits,
) -> Result<Option<pb::Header>, TestCaseError> {
    for cut in 0..bytes.len() {
        let want = if cut < PREAMBLE_LEN {
            PREAMBLE_LEN - cut
        } else {
            bytes.len() - cut
        };
        prop_assert_eq!(
            decode_frame(&bytes[..cut], limits),
            Ok(Decoded::NeedMore(want)),
            "prefix of {} bytes",
            cut
        );
    }
    let payload_len = (bytes.len() - PREAMBLE_LEN - header_len) as u32;
    let alone = decode_header(
        &plain(header_len as u32, payload_len),
        &bytes[PREAMBLE_LEN..PREAMBLE_LEN + header_len],
    );
    match decode_frame(bytes, limits) {
        Ok(Decoded::Frame(frame)) => {
            prop_assert_eq!(frame.len, bytes.len());
            prop_assert_eq!(frame.payload, &bytes[PREAMBLE_LEN + header_len..]);
            prop_assert_eq!(alone, Ok(frame.header.clone()));
            Ok(Some(frame.header))
        }
        Ok(Decoded::NeedMore(need)) => Err(TestCaseError::fail(format!(
            "whole frame still needs {need}"
        ))),
        Err(err) => {
            prop_assert!(is_header_error(&err), "{:?}", err);
            prop_assert_eq!(alone, Err(err));
            Ok(None)
        }
    }
}

/// Any header kind, or none, with fields anywhere in their range: unknown
/// status codes, requests without an operation, extreme ids and lengths.
fn any_kind() -> impl Strategy<Value = Option<Kind>> {
    let op = proptest::option::of(prop_oneof![
        (any::<u64>(), any::<u32>())
            .prop_map(|(offset, length)| Op::Read(pb::Read { offset, length })),
        (
            any::<u64>(),
            prop_oneof![0u32..5000, any::<u32>()],
            any::<bool>()
        )
            .prop_map(|(offset, length, fua)| Op::Write(pb::Write {
                offset,
                length,
                fua,
                crc32c: None,
            })),
        Just(Op::Flush(pb::Flush {})),
        (any::<u64>(), any::<u64>())
            .prop_map(|(offset, length)| Op::Discard(pb::Discard { offset, length })),
        (any::<u64>(), any::<u64>())
            .prop_map(|(offset, length)| Op::WriteZeroes(pb::WriteZeroes { offset, length })),
        any::<u64>().prop_map(|nonce| Op::Ping(pb::Ping { nonce })),
    ]);
    proptest::option::of(prop_oneof![
        handshake().prop_map(Kind::Handshake),
        handshake_reply().prop_map(Kind::HandshakeReply),
        (any::<u64>(), op).prop_map(|(id, op)| Kind::Request(pb::Request { id, op })),
        reply().prop_map(Kind::Reply),
        admin().prop_map(Kind::Admin),
        admin_reply().prop_map(Kind::AdminReply),
        inquiry().prop_map(Kind::Inquiry),
        inquiry_reply().prop_map(Kind::InquiryReply),
    ])
}

/// Protobuf fields this schema does not know (numbers above the `Header`'s),
/// in every wire type: a decoder skips them.
fn unknown_fields() -> impl Strategy<Value = Vec<u8>> {
    let field = (
        9u32..=1000,
        prop_oneof![
            any::<u64>().prop_map(|v| (0u8, v.to_le_bytes().to_vec())),
            any::<[u8; 8]>().prop_map(|v| (1u8, v.to_vec())),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(|v| (2u8, v)),
            any::<[u8; 4]>().prop_map(|v| (5u8, v.to_vec())),
        ],
    )
        .prop_map(|(number, (wire_type, value))| {
            let mut out = Vec::new();
            prost::encoding::encode_key(
                number,
                match wire_type {
                    0 => prost::encoding::WireType::Varint,
                    1 => prost::encoding::WireType::SixtyFourBit,
                    2 => prost::encoding::WireType::LengthDelimited,
                    _ => prost::encoding::WireType::ThirtyTwoBit,
                },
                &mut out,
            );
            match wire_type {
                0 => prost::encoding::encode_varint(
                    u64::from_le_bytes(value.try_into().unwrap_or_default()),
                    &mut out,
                ),
                2 => {
                    prost::encoding::encode_varint(value.len() as u64, &mut out);
                    out.extend_from_slice(&value);
                }
                _ => out.extend_from_slice(&value),
            }
            out
        });
    proptest::collection::vec(field, 0..4).prop_map(|fields| fields.concat())
}

/// What the decoder must say of a well-formed `header` whose preamble
/// announced `payload_len`.
fn verdict(header: &pb::Header, payload_len: u32) -> Result<(), FrameError> {
    let unexpected = |what| {
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
        Some(Kind::Request(pb::Request { id, op: None })) => Err(FrameError::UnknownOp { id: *id }),
        Some(Kind::Request(pb::Request {
            op: Some(Op::Write(write)),
            ..
        })) if write.length != payload_len => Err(FrameError::WriteLengthMismatch {
            declared: write.length,
            actual: payload_len,
        }),
        Some(Kind::Request(pb::Request {
            op: Some(Op::Write(_)),
            ..
        })) => Ok(()),
        Some(Kind::Request(_)) => unexpected("a request other than write"),
        Some(Kind::Reply(_)) => Ok(()),
        Some(Kind::Handshake(_)) => unexpected("a handshake"),
        Some(Kind::HandshakeReply(_)) => unexpected("a handshake reply"),
        Some(Kind::Admin(_)) => unexpected("an admin request"),
        Some(Kind::AdminReply(_)) => unexpected("an admin reply"),
        Some(Kind::Inquiry(_)) => unexpected("an inquiry"),
        Some(Kind::InquiryReply(_)) => unexpected("an inquiry reply"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// A valid preamble, then any bytes where the header should be, and a
    /// payload: the frame decodes (agreeing with `decode_header`) or fails
    /// with a header error, and every prefix asks for exactly what is
    /// missing.
    #[test]
    fn random_headers_behind_valid_preambles_fail_typed(
        header in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::collection::vec(any::<u8>(), 0..=MAX_HEADER_LEN as usize),
        ],
        payload in proptest::collection::vec(any::<u8>(), 0..3000),
        max_payload in 3000u32..100_000,
    ) {
        let limits = Limits { max_payload_len: max_payload, header_digest: false };
        let bytes = framed(&header, &payload);
        check_one_frame(&bytes, header.len(), &limits)?;
        let _ = decode_stream(&bytes, &[1, 17, 300], &limits);
    }

    /// Well-formed headers of every kind (and of none), fields anywhere in
    /// their range, unknown fields added, behind valid preambles with a
    /// payload that may not fit them: the decoder gives exactly the verdict
    /// the frame rules give, and the header it decodes is the one encoded.
    #[test]
    fn well_formed_headers_get_exactly_the_rule_verdict(
        kind in any_kind(),
        extra in unknown_fields(),
        extra_first in any::<bool>(),
        payload_len in prop_oneof![Just(None), (0u32..5000).prop_map(Some)],
        fill in any::<u8>(),
    ) {
        let header = pb::Header { kind };
        let encoded = prost::Message::encode_to_vec(&header);
        let bytes = if extra_first {
            [extra.clone(), encoded].concat()
        } else {
            [encoded, extra.clone()].concat()
        };
        prop_assume!(bytes.len() <= MAX_HEADER_LEN as usize);
        // By default, the payload the header asks for (a write's length).
        let fitting = match &header.kind {
            Some(Kind::Request(pb::Request { op: Some(Op::Write(w)), .. })) => w.length.min(5000),
            _ => 0,
        };
        let payload_len = payload_len.unwrap_or(fitting);
        let payload: Vec<u8> = (0..payload_len).map(|i| fill ^ i as u8).collect();
        let frame = framed(&bytes, &payload);
        let decoded = check_one_frame(&frame, bytes.len(), &Limits::default())?;
        match verdict(&header, payload_len) {
            Ok(()) => prop_assert_eq!(decoded, Some(header)),
            Err(want) => {
                prop_assert_eq!(decoded, None);
                prop_assert_eq!(decode_header(&plain(bytes.len() as u32, payload_len), &bytes), Err(want));
            }
        }
    }

    /// A frame of garbage (valid preamble, random or rule-breaking header,
    /// random payload) followed by a valid frame: the garbage fails with a
    /// header error or decodes as exactly its own bytes, and then the valid
    /// frame comes out intact: never swallowed, shifted or taken for
    /// something else.
    #[test]
    fn a_valid_frame_after_garbage_is_not_mis_decoded(
        garbage_header in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            (any_kind(), unknown_fields()).prop_map(|(kind, extra)| {
                [prost::Message::encode_to_vec(&pb::Header { kind }), extra].concat()
            }),
        ],
        garbage_payload in proptest::collection::vec(any::<u8>(), 0..2000),
        (header, payload) in frame(),
        chunks in proptest::collection::vec(1usize..3000, 1..6),
    ) {
        prop_assume!(garbage_header.len() <= MAX_HEADER_LEN as usize);
        let limits = Limits::default();
        let mut stream = framed(&garbage_header, &garbage_payload);
        let garbage_len = stream.len();
        encode_frame(&header, &payload, &mut stream).expect("valid frame encodes");
        match decode_frame(&stream, &limits) {
            Err(err) => {
                prop_assert!(is_header_error(&err), "{:?}", err);
                prop_assert_eq!(decode_stream(&stream, &chunks, &limits), Err(err));
            }
            Ok(Decoded::NeedMore(need)) => {
                return Err(TestCaseError::fail(format!("garbage frame needs {need} more")));
            }
            Ok(Decoded::Frame(first)) => {
                prop_assert_eq!(first.len, garbage_len);
                prop_assert_eq!(first.payload, &garbage_payload[..]);
                let first_header = first.header.clone();
                let Ok(Decoded::Frame(second)) = decode_frame(&stream[garbage_len..], &limits) else {
                    return Err(TestCaseError::fail("the valid frame did not decode"));
                };
                prop_assert_eq!(&second.header, &header);
                prop_assert_eq!(second.payload, &payload[..]);
                prop_assert_eq!(second.len, stream.len() - garbage_len);
                let streamed = decode_stream(&stream, &chunks, &limits);
                prop_assert_eq!(
                    streamed,
                    Ok(vec![(first_header, garbage_payload.clone()), (header, payload)])
                );
            }
        }
    }
}

fn one_frame(header: &pb::Header, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(header, payload, &mut out).expect("encodes");
    out
}

#[test]
fn lengths_are_checked_before_the_body_arrives() {
    let limits = Limits {
        max_payload_len: 1024,
        header_digest: false,
    };
    // Only the preamble is there: an oversized payload is refused at once,
    // before anybody reserves room for it.
    let preamble = Preamble {
        header_len: 10,
        payload_len: 1025,
        header_digest: false,
    }
    .to_bytes();
    assert_eq!(
        decode_frame(&preamble, &limits),
        Err(FrameError::PayloadTooLong {
            len: 1025,
            max: 1024
        })
    );
    let preamble = Preamble {
        header_len: MAX_HEADER_LEN + 1,
        payload_len: 0,
        header_digest: false,
    }
    .to_bytes();
    assert_eq!(
        decode_frame(&preamble, &limits),
        Err(FrameError::HeaderTooLong {
            len: MAX_HEADER_LEN + 1,
            max: MAX_HEADER_LEN
        })
    );
}

#[test]
fn partial_input_reports_what_is_missing() {
    let header = pb::Header::request(
        7,
        Op::Write(pb::Write {
            offset: 4096,
            length: 100,
            fua: true,
            crc32c: None,
        }),
    );
    let bytes = one_frame(&header, &[0xab; 100]);
    assert_eq!(
        decode_frame(&bytes[..3], &Limits::default()),
        Ok(Decoded::NeedMore(PREAMBLE_LEN - 3))
    );
    assert_eq!(
        decode_frame(&bytes[..PREAMBLE_LEN], &Limits::default()),
        Ok(Decoded::NeedMore(bytes.len() - PREAMBLE_LEN))
    );
    assert_eq!(
        decode_frame(&bytes[..bytes.len() - 1], &Limits::default()),
        Ok(Decoded::NeedMore(1))
    );
    let Ok(Decoded::Frame(frame)) = decode_frame(&bytes, &Limits::default()) else {
        panic!("whole frame must decode");
    };
    assert_eq!(frame.header, header);
    assert_eq!(frame.payload, &[0xab; 100][..]);
    assert_eq!(frame.len, bytes.len());
}

#[test]
fn typed_errors_for_bad_frames() {
    let limits = Limits::default();
    let ping = pb::Header::request(1, Op::Ping(pb::Ping { nonce: 9 }));
    let good = one_frame(&ping, &[]);

    let mut bad = good.clone();
    bad[0] = b'X';
    assert!(matches!(
        decode_frame(&bad, &limits),
        Err(FrameError::BadMagic(_))
    ));

    let mut bad = good.clone();
    bad[5] = 9;
    assert_eq!(
        decode_frame(&bad, &limits),
        Err(FrameError::UnsupportedVersion(9))
    );

    let mut bad = good.clone();
    bad[7] = 2;
    assert_eq!(
        decode_frame(&bad, &limits),
        Err(FrameError::ReservedFlags(2))
    );

    // A header with nothing we know in it (an empty protobuf message).
    let empty = Preamble {
        header_len: 0,
        payload_len: 0,
        header_digest: false,
    }
    .to_bytes();
    assert_eq!(
        decode_frame(&empty, &limits),
        Err(FrameError::UnknownMessage)
    );

    // A request without an operation.
    let no_op = pb::Header {
        kind: Some(Kind::Request(pb::Request { id: 3, op: None })),
    };
    let mut bytes = Vec::new();
    assert_eq!(
        encode_head(&no_op, 0, &mut bytes),
        Err(FrameError::UnknownOp { id: 3 })
    );

    // A ping with a payload, and a write whose payload disagrees with it.
    assert!(matches!(
        encode_frame(&ping, &[1, 2, 3], &mut bytes),
        Err(FrameError::UnexpectedPayload { len: 3, .. })
    ));
    let write = pb::Header::request(
        2,
        Op::Write(pb::Write {
            offset: 0,
            length: 8,
            fua: false,
            crc32c: None,
        }),
    );
    assert_eq!(
        encode_frame(&write, &[0; 4], &mut bytes),
        Err(FrameError::WriteLengthMismatch {
            declared: 8,
            actual: 4
        })
    );

    // Garbage where the protobuf header should be.
    let mut garbage = Preamble {
        header_len: 4,
        payload_len: 0,
        header_digest: false,
    }
    .to_bytes()
    .to_vec();
    garbage.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    assert!(matches!(
        decode_frame(&garbage, &limits),
        Err(FrameError::Protobuf(_))
    ));
}

#[test]
fn errno_mapping_matches_libc() {
    use netblk_protocol::{Status, errno_of_status, status_of_errno};
    let pairs = [
        (Status::Ok, 0),
        (Status::IoError, libc::EIO),
        (Status::NoSpace, libc::ENOSPC),
        (Status::Invalid, libc::EINVAL),
        (Status::NotSupported, libc::EOPNOTSUPP),
        (Status::OutOfRange, libc::ERANGE),
        (Status::Busy, libc::EAGAIN),
        (Status::TimedOut, libc::ETIMEDOUT),
        (Status::Refused, libc::EPERM),
        (Status::NotFound, libc::ENOENT),
        (Status::Conflict, libc::ESTALE),
    ];
    for (status, errno) in pairs {
        assert_eq!(errno_of_status(status as i32), errno, "{status:?}");
        assert_eq!(status_of_errno(errno), status, "errno {errno}");
    }
    // Unknown codes from a newer peer are errors, never success.
    assert_eq!(errno_of_status(1000), libc::EIO);
    assert_eq!(errno_of_status(-1), libc::EIO);
    assert_eq!(status_of_errno(libc::EBADF), Status::IoError);
}

// ---- header digests (issue 21, point 5) ----

fn digested_write(id: u64, offset: u64, payload: &[u8]) -> Vec<u8> {
    let header = pb::Header::request(
        id,
        pb::request::Op::Write(pb::Write {
            offset,
            length: payload.len() as u32,
            fua: false,
            crc32c: Some(0x1234_5678),
        }),
    );
    let mut bytes = Vec::new();
    encode_frame_as(&header, payload, true, &mut bytes).expect("encodes");
    bytes
}

const DIGESTS: Limits = Limits {
    max_payload_len: DEFAULT_MAX_PAYLOAD_LEN,
    header_digest: true,
};

#[test]
fn a_digested_frame_round_trips_and_an_undigested_one_is_refused_where_required() {
    let bytes = digested_write(7, 4096, &[9; 512]);
    let Ok(Decoded::Frame(frame)) = decode_frame(&bytes, &DIGESTS) else {
        panic!("a digested frame decodes");
    };
    assert_eq!(frame.len, bytes.len());
    assert_eq!(frame.payload, &[9; 512][..]);
    // Readers that do not require digests check one that is there.
    assert!(matches!(
        decode_frame(&bytes, &Limits::default()),
        Ok(Decoded::Frame(_))
    ));
    let mut plain_frame = Vec::new();
    encode_frame(&frame.header, frame.payload, &mut plain_frame).expect("encodes");
    assert_eq!(
        decode_frame(&plain_frame, &DIGESTS),
        Err(FrameError::MissingHeaderDigest)
    );
}

/// With a header digest, no single flipped bit of the preamble or header
/// yields a frame: not another request id, offset or status.
#[test]
fn every_flipped_bit_of_a_digested_head_is_caught() {
    let bytes = digested_write(0x0102_0304, 65536, &[5; 64]);
    let head_len = bytes.len() - 64;
    for at in 0..head_len {
        for bit in 0..8 {
            let mut bad = bytes.clone();
            bad[at] ^= 1 << bit;
            for limits in [DIGESTS, Limits::default()] {
                match decode_frame(&bad, &limits) {
                    Ok(Decoded::Frame(f)) => {
                        panic!("byte {at} bit {bit} decoded as {:?}", f.header)
                    }
                    Ok(Decoded::NeedMore(_)) | Err(_) => {}
                }
            }
        }
    }
}

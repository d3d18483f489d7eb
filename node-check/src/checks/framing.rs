//! docs/protocol.md section 3: frames, limits, and bad input.

use netblk_protocol::pb::{self, header::Kind, request::Op};
use netblk_protocol::{PROTOCOL_VERSION, encode_frame};
use prost::Message;

use super::Check;
use crate::ctx::{Ctx, Outcome, get, pattern, put, read, write};
use crate::ensure;
use crate::wire::{raw_frame, with_unknown_field};

pub const CHECKS: &[Check] = &[
    Check::new(
        "3.1",
        "a frame with another magic is closed without a reply",
        bad_magic,
    ),
    Check::new(
        "3.1",
        "a frame of another version is closed without a reply",
        bad_version,
    ),
    Check::new(
        "3.1",
        "a reserved preamble flag closes the connection",
        reserved_flag,
    ),
    Check::new(
        "3.2",
        "a header over 4 KiB closes the connection before it is read",
        long_header,
    ),
    Check::new(
        "3.3",
        "a payload on a read request closes the connection",
        payload_on_read,
    ),
    Check::new(
        "3.3",
        "a write whose length is not its payload's closes the connection",
        write_length,
    ),
    Check::new(
        "3.3",
        "a reply carries a payload only when it answers a read, exactly its length",
        reply_payloads,
    ),
    Check::new(
        "3.4",
        "a write payload over max_io_size closes the connection",
        long_payload,
    ),
    Check::new(
        "3.6",
        "bad input on one connection leaves the others serving",
        isolation,
    ),
    Check::new("3.6", "unknown protobuf fields are ignored", unknown_fields),
    Check::new(
        "3.7",
        "a request before the handshake closes the connection",
        request_first,
    ),
    Check::new(
        "3.7",
        "a second handshake closes the connection",
        second_handshake,
    ),
];

fn handshake_bytes(ctx: &Ctx) -> Vec<u8> {
    pb::Header {
        kind: Some(Kind::Handshake(ctx.hs(&ctx.volume()))),
    }
    .encode_to_vec()
}

fn bad_magic(ctx: &Ctx) -> Outcome {
    let mut conn = ctx.target.connect()?;
    let mut bytes = raw_frame(PROTOCOL_VERSION, 0, &handshake_bytes(ctx), &[]);
    bytes[0..4].copy_from_slice(b"NBD!");
    conn.raw(&bytes)?;
    Ok(conn.closed_without_reply()?)
}

fn bad_version(ctx: &Ctx) -> Outcome {
    let mut conn = ctx.target.connect()?;
    conn.raw(&raw_frame(
        PROTOCOL_VERSION + 1,
        0,
        &handshake_bytes(ctx),
        &[],
    ))?;
    Ok(conn.closed_without_reply()?)
}

fn reserved_flag(ctx: &Ctx) -> Outcome {
    let mut conn = ctx.target.connect()?;
    conn.raw(&raw_frame(
        PROTOCOL_VERSION,
        0x4,
        &handshake_bytes(ctx),
        &[],
    ))?;
    Ok(conn.closed_without_reply()?)
}

fn long_header(ctx: &Ctx) -> Outcome {
    let mut conn = ctx.target.connect()?;
    // Only the preamble: a node that waits for the 8 KiB header is wrong.
    let mut preamble = raw_frame(PROTOCOL_VERSION, 0, &[], &[]);
    preamble[8..12].copy_from_slice(&8192u32.to_be_bytes());
    conn.raw(&preamble)?;
    Ok(conn.closed_without_reply()?)
}

fn payload_on_read(ctx: &Ctx) -> Outcome {
    let (mut conn, _, _) = ctx.fresh()?;
    let header = pb::Header::request(1, read(0, 512)).encode_to_vec();
    conn.raw(&raw_frame(PROTOCOL_VERSION, 0, &header, &[0u8; 512]))?;
    Ok(conn.closed_without_reply()?)
}

fn write_length(ctx: &Ctx) -> Outcome {
    let (mut conn, _, _) = ctx.fresh()?;
    let header = pb::Header::request(1, write(0, &[0u8; 4096], false)).encode_to_vec();
    conn.raw(&raw_frame(PROTOCOL_VERSION, 0, &header, &[7u8; 512]))?;
    Ok(conn.closed_without_reply()?)
}

fn long_payload(ctx: &Ctx) -> Outcome {
    let (mut conn, reply, _) = ctx.fresh()?;
    let len = reply.max_io_size.saturating_add(4096);
    let header = pb::Header::request(
        1,
        pb::request::Op::Write(pb::Write {
            offset: 0,
            length: len,
            fua: false,
            crc32c: None,
        }),
    )
    .encode_to_vec();
    // The preamble and header only: the node must not wait for the payload.
    let mut bytes = raw_frame(PROTOCOL_VERSION, 0, &header, &[]);
    bytes[12..16].copy_from_slice(&len.to_be_bytes());
    conn.raw(&bytes)?;
    Ok(conn.closed_without_reply()?)
}

fn isolation(ctx: &Ctx) -> Outcome {
    let (mut good, _, _) = ctx.fresh()?;
    put(&mut good, 0, &pattern(1, 0, 4096))?;
    let mut bad = ctx.target.connect()?;
    bad.raw(b"GET / HTTP/1.1\r\nHost: node\r\n\r\n")?;
    bad.closed_without_reply()?;
    let back = get(&mut good, 0, 4096)?;
    ensure!(
        back == pattern(1, 0, 4096),
        "another connection's data changed"
    );
    Ok(())
}

fn unknown_fields(ctx: &Ctx) -> Outcome {
    let mut conn = ctx.target.connect()?;
    let volume = ctx.volume();
    let header = pb::Header {
        kind: Some(Kind::Handshake(ctx.hs(&volume))),
    };
    conn.raw(&raw_frame(
        PROTOCOL_VERSION,
        0,
        &with_unknown_field(&header),
        &[],
    ))?;
    match conn.recv()? {
        crate::wire::Recv::Frame(header, _) => match header.kind {
            Some(Kind::HandshakeReply(reply)) => {
                ensure!(
                    reply.status == pb::Status::Ok as i32,
                    "a handshake with an unknown field was refused: {}",
                    reply.message
                );
                Ok(())
            }
            other => Err(format!("a handshake with an unknown field got {other:?}").into()),
        },
        other => Err(format!("a handshake with an unknown field got {other:?}").into()),
    }
}

fn reply_payloads(ctx: &Ctx) -> Outcome {
    let (mut conn, _, _) = ctx.fresh()?;
    let data = pattern(5, 0, 4096);
    let requests = [
        (write(0, &data, false), &data[..], 0, "a write"),
        (write(4096, &data, true), &data[..], 0, "a FUA write"),
        (read(0, 4096), &[][..], 4096, "a read"),
        (read(512, 1536), &[][..], 1536, "a read of 1536 bytes"),
        (Op::Flush(pb::Flush {}), &[][..], 0, "a flush"),
        (Op::Ping(pb::Ping { nonce: 7 }), &[][..], 0, "a ping"),
        (
            Op::WriteZeroes(pb::WriteZeroes {
                offset: 0,
                length: 4096,
            }),
            &[][..],
            0,
            "write-zeroes",
        ),
        (read(u64::MAX - 4096, 4096), &[][..], 0, "a refused read"),
    ];
    for (op, payload, want, what) in requests {
        let (reply, got) = conn.call(op, payload)?;
        ensure!(
            got.len() == want,
            "the reply to {what} ({}) carried {} payload bytes, the spec says {want}",
            crate::ctx::status_name(reply.status),
            got.len()
        );
    }
    Ok(())
}

fn request_first(ctx: &Ctx) -> Outcome {
    let mut conn = ctx.target.connect()?;
    let mut bytes = Vec::new();
    encode_frame(&pb::Header::request(1, read(0, 512)), &[], &mut bytes)
        .map_err(|e| e.to_string())?;
    conn.raw(&bytes)?;
    Ok(conn.closed_without_reply()?)
}

fn second_handshake(ctx: &Ctx) -> Outcome {
    let (mut conn, _, volume) = ctx.fresh()?;
    conn.frame(
        &pb::Header {
            kind: Some(Kind::Handshake(ctx.hs(&volume))),
        },
        &[],
    )?;
    Ok(conn.closed_without_reply()?)
}

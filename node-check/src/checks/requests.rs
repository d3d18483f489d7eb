//! docs/protocol.md sections 5.7 and 6: requests, and data digests.

use netblk_protocol::pb::{self, request::Op};

use super::Check;
use crate::ctx::{Ctx, Outcome, SIZE, Verdict, expect_status, get, pattern, put, read, write};
use crate::ensure;

pub const CHECKS: &[Check] = &[
    Check::new(
        "6.5",
        "reads return what was written, and zeroes where nothing was",
        read_after_write,
    ),
    Check::new(
        "6.2",
        "64 pipelined writes are each answered once, whatever the order",
        pipelined,
    ),
    Check::new(
        "6.3",
        "a request beyond the node's capacity is OUT_OF_RANGE and changes nothing",
        out_of_range,
    ),
    Check::new("6.3", "a zero-length read and write succeed", zero_length),
    Check::new(
        "3.4",
        "a read longer than max_io_size is INVALID",
        long_read,
    ),
    Check::new("6.6", "a FUA write succeeds and reads back", fua),
    Check::new(
        "6.7",
        "a flush succeeds after writes on two connections",
        flush,
    ),
    Check::new(
        "6.8",
        "discard and write-zeroes make the range read as zeroes",
        zeroing,
    ),
    Check::new("6.9", "ping echoes its nonce", ping),
    Check::new(
        "6.10",
        "a resize grows the capacity at once and later handshakes need the new size",
        resize,
    ),
    Check::new(
        "6.11",
        "after a delete, the volume's other connections get NOT_FOUND",
        delete,
    ),
    Check::new(
        "6.12",
        "digest is the CRC-32C of the range, and over 64 MiB is INVALID",
        digest,
    ),
    Check::new(
        "5.7",
        "data digests: echoed, a wrong write CRC writes nothing, reads carry their CRC",
        data_digests,
    ),
];

fn read_after_write(ctx: &Ctx) -> Outcome {
    let (mut conn, _, _) = ctx.fresh()?;
    let writes = [(0u64, 4096usize), (65536 - 512, 1024), (SIZE - 8192, 8192)];
    for (i, (offset, len)) in writes.iter().enumerate() {
        put(&mut conn, *offset, &pattern(i as u8 + 1, *offset, *len))?;
    }
    for (i, (offset, len)) in writes.iter().enumerate() {
        let back = get(&mut conn, *offset, *len as u32)?;
        ensure!(
            back == pattern(i as u8 + 1, *offset, *len),
            "the {len} bytes written at {offset} read back otherwise"
        );
    }
    let untouched = get(&mut conn, 1 << 20, 4096)?;
    ensure!(
        untouched.iter().all(|b| *b == 0),
        "bytes never written do not read as zeroes"
    );
    Ok(())
}

fn pipelined(ctx: &Ctx) -> Outcome {
    let (mut conn, _, _) = ctx.fresh()?;
    let mut ids = std::collections::BTreeSet::new();
    for i in 0..64u64 {
        let data = pattern(i as u8, i * 4096, 4096);
        ids.insert(conn.send(write(i * 4096, &data, false), &data)?);
    }
    for _ in 0..64 {
        let (reply, _) = conn.reply()?;
        expect_status(&reply, pb::Status::Ok, "a pipelined write")?;
        ensure!(
            ids.remove(&reply.id),
            "a reply for request {} that was not outstanding (or answered twice)",
            reply.id
        );
    }
    let back = get(&mut conn, 63 * 4096, 4096)?;
    ensure!(
        back == pattern(63, 63 * 4096, 4096),
        "the last write reads back otherwise"
    );
    Ok(())
}

fn out_of_range(ctx: &Ctx) -> Outcome {
    let (mut conn, _, _) = ctx.fresh()?;
    let data = pattern(9, 0, 8192);
    let (reply, _) = conn.call(write(SIZE - 4096, &data, false), &data)?;
    expect_status(&reply, pb::Status::OutOfRange, "a write past the end")?;
    ensure!(
        get(&mut conn, SIZE - 4096, 4096)?.iter().all(|b| *b == 0),
        "a write refused as out of range changed the last bytes"
    );
    let (reply, data) = conn.call(read(SIZE, 512), &[])?;
    expect_status(&reply, pb::Status::OutOfRange, "a read past the end")?;
    ensure!(data.is_empty(), "a refused read carried a payload");
    let (reply, _) = conn.call(read(u64::MAX - 100, 512), &[])?;
    expect_status(&reply, pb::Status::OutOfRange, "a read whose end overflows")?;
    let (reply, _) = conn.call(
        Op::Discard(pb::Discard {
            offset: SIZE - 512,
            length: 1024,
        }),
        &[],
    )?;
    expect_status(&reply, pb::Status::OutOfRange, "a discard past the end")?;
    Ok(())
}

fn zero_length(ctx: &Ctx) -> Outcome {
    let (mut conn, _, _) = ctx.fresh()?;
    let (reply, data) = conn.call(read(4096, 0), &[])?;
    expect_status(&reply, pb::Status::Ok, "a zero-length read")?;
    ensure!(
        data.is_empty(),
        "a zero-length read returned {} bytes",
        data.len()
    );
    let (reply, _) = conn.call(write(4096, &[], false), &[])?;
    expect_status(&reply, pb::Status::Ok, "a zero-length write")
}

fn long_read(ctx: &Ctx) -> Outcome {
    let (mut conn, hs, _) = ctx.fresh()?;
    let (reply, data) = conn.call(read(0, hs.max_io_size.saturating_add(512)), &[])?;
    expect_status(&reply, pb::Status::Invalid, "a read over max_io_size")?;
    ensure!(data.is_empty(), "a refused read carried a payload");
    Ok(())
}

fn fua(ctx: &Ctx) -> Outcome {
    let (mut conn, _, _) = ctx.fresh()?;
    let data = pattern(3, 8192, 4096);
    let (reply, _) = conn.call(write(8192, &data, true), &data)?;
    expect_status(&reply, pb::Status::Ok, "a FUA write")?;
    ensure!(
        get(&mut conn, 8192, 4096)? == data,
        "a FUA write reads back otherwise"
    );
    Ok(())
}

fn flush(ctx: &Ctx) -> Outcome {
    let (mut a, _, volume) = ctx.fresh()?;
    let (mut b, _) = ctx.open(ctx.hs(&volume))?;
    put(&mut a, 0, &pattern(1, 0, 4096))?;
    put(&mut b, 4096, &pattern(2, 4096, 4096))?;
    let (reply, _) = a.call(Op::Flush(pb::Flush {}), &[])?;
    expect_status(&reply, pb::Status::Ok, "a flush")
}

fn zeroing(ctx: &Ctx) -> Outcome {
    let (mut conn, _, _) = ctx.fresh()?;
    put(&mut conn, 0, &pattern(4, 0, 65536))?;
    let ops = [
        (
            Op::Discard(pb::Discard {
                offset: 4096,
                length: 8192,
            }),
            4096u64,
            "discard",
        ),
        (
            Op::WriteZeroes(pb::WriteZeroes {
                offset: 32768,
                length: 4096,
            }),
            32768,
            "write-zeroes",
        ),
    ];
    for (op, offset, what) in ops {
        let (reply, _) = conn.call(op, &[])?;
        expect_status(&reply, pb::Status::Ok, what)?;
        ensure!(
            get(&mut conn, offset, 4096)?.iter().all(|b| *b == 0),
            "after {what} the range does not read as zeroes"
        );
    }
    let kept = get(&mut conn, 16384, 4096)?;
    ensure!(
        kept == pattern(4, 16384, 4096),
        "bytes outside the zeroed ranges changed"
    );
    Ok(())
}

fn ping(ctx: &Ctx) -> Outcome {
    let (mut conn, _, _) = ctx.fresh()?;
    let (reply, _) = conn.call(Op::Ping(pb::Ping { nonce: 0x5eed_f00d }), &[])?;
    expect_status(&reply, pb::Status::Ok, "ping")?;
    ensure!(reply.nonce == 0x5eed_f00d, "ping echoed {:#x}", reply.nonce);
    Ok(())
}

fn resize(ctx: &Ctx) -> Outcome {
    let (mut conn, _, volume) = ctx.fresh()?;
    let (reply, _) = conn.call(
        Op::Resize(pb::Resize {
            volume_size: SIZE * 2,
        }),
        &[],
    )?;
    if reply.status == pb::Status::Refused as i32 {
        return Err(Verdict::Skip(format!(
            "the node's policy refuses resizes: {}",
            reply.message
        )));
    }
    expect_status(&reply, pb::Status::Ok, "a resize to twice the size")?;
    let data = pattern(5, SIZE, 4096);
    put(&mut conn, SIZE, &data)?;
    ensure!(
        get(&mut conn, SIZE, 4096)? == data,
        "the grown part reads back otherwise"
    );
    let old = ctx.try_handshake(ctx.hs(&volume))?;
    ensure!(
        old.status == pb::Status::Refused as i32,
        "a handshake with the old size after a grow: {}",
        crate::ctx::status_name(old.status)
    );
    let (_, grown) = ctx.open(pb::Handshake {
        volume_size: SIZE * 2,
        ..ctx.hs(&volume)
    })?;
    ensure!(
        grown.volume_size == SIZE * 2,
        "the new size is stated as {}",
        grown.volume_size
    );
    Ok(())
}

fn delete(ctx: &Ctx) -> Outcome {
    let (mut a, _, volume) = ctx.fresh()?;
    let (mut b, _) = ctx.open(ctx.hs(&volume))?;
    let (reply, _) = a.call(Op::Delete(pb::Delete {}), &[])?;
    if reply.status == pb::Status::Refused as i32 {
        return Err(Verdict::Skip(format!(
            "the node's policy refuses deletes: {}",
            reply.message
        )));
    }
    expect_status(&reply, pb::Status::Ok, "delete")?;
    let data = pattern(6, 0, 4096);
    match b.call(write(0, &data, false), &data) {
        Ok((reply, _)) => expect_status(
            &reply,
            pb::Status::NotFound,
            "a write on another connection after a delete",
        ),
        // Closing the other connections is as good.
        Err(_) => Ok(()),
    }
}

fn digest(ctx: &Ctx) -> Outcome {
    let (mut conn, _, _) = ctx.fresh()?;
    let data = pattern(7, 4096, 65536);
    put(&mut conn, 4096, &data)?;
    let (reply, payload) = conn.call(
        Op::Digest(pb::Digest {
            offset: 4096,
            length: 65536,
        }),
        &[],
    )?;
    expect_status(&reply, pb::Status::Ok, "a digest")?;
    ensure!(payload.is_empty(), "a digest carried a payload");
    ensure!(
        reply.crc32c == Some(crc32c::crc32c(&data)),
        "digest {:?}, the CRC-32C of the bytes is {:#010x}",
        reply.crc32c,
        crc32c::crc32c(&data)
    );
    let (reply, _) = conn.call(
        Op::Digest(pb::Digest {
            offset: 0,
            length: (64 << 20) + 512,
        }),
        &[],
    )?;
    expect_status(&reply, pb::Status::Invalid, "a digest over 64 MiB")
}

fn data_digests(ctx: &Ctx) -> Outcome {
    let volume = ctx.volume();
    let (mut conn, reply) = ctx.open(pb::Handshake {
        data_digest: pb::DataDigest::Crc32c as i32,
        ..ctx.hs(&volume)
    })?;
    if reply.data_digest != pb::DataDigest::Crc32c as i32 {
        return Err(Verdict::Fail(
            "the node does not echo CRC-32C data digests".into(),
        ));
    }
    let data = pattern(8, 0, 4096);
    let crc = crc32c::crc32c(&data);
    let op = |crc32c| {
        Op::Write(pb::Write {
            offset: 0,
            length: 4096,
            fua: false,
            crc32c,
        })
    };
    let (reply, _) = conn.call(op(Some(crc)), &data)?;
    expect_status(&reply, pb::Status::Ok, "a write with its CRC")?;
    let other = pattern(9, 0, 4096);
    let (reply, _) = conn.call(op(Some(crc)), &other)?;
    expect_status(
        &reply,
        pb::Status::DigestMismatch,
        "a write whose CRC is another payload's",
    )?;
    let (reply, _) = conn.call(op(None), &other)?;
    expect_status(&reply, pb::Status::Invalid, "a write without its CRC")?;
    let (reply, back) = conn.call(read(0, 4096), &[])?;
    expect_status(&reply, pb::Status::Ok, "a read")?;
    ensure!(back == data, "a refused write changed the data");
    ensure!(
        reply.crc32c == Some(crc),
        "a read reply's CRC is {:?}, its payload's {crc:#010x}",
        reply.crc32c
    );
    Ok(())
}

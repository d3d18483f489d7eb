//! docs/protocol.md sections 8 to 10: owner epochs, the membership record,
//! the activity log.

use netblk_protocol::pb::{self, request::Op};

use super::Check;
use crate::ctx::{Ctx, Outcome, SIZE, expect_status, pattern, replicated, status_name, write};
use crate::ensure;
use crate::wire::Conn;

pub const CHECKS: &[Check] = &[
    Check::new(
        "9.2",
        "PutRecord is a compare-and-set on the generation, a loser sees the stored record",
        compare_and_set,
    ),
    Check::new(
        "9.3",
        "a record that cannot be the volume's is refused and nothing is stored",
        invalid_record,
    ),
    Check::new(
        "8.1",
        "below the stored owner epoch, handshakes and writes are refused",
        owner_epoch,
    ),
    Check::new(
        "10.1",
        "a write logs its 4 MiB region, and only the owner may trim",
        activity,
    ),
    Check::new(
        "10.3",
        "a row out of sync has its missed regions, seeded from the log, forgotten when it is back",
        missed,
    ),
];

/// A connection to a fresh volume of two copies (this node the first), at
/// `owner_epoch`.
fn replica(ctx: &Ctx, owner_epoch: u64) -> Result<(Conn, String), crate::ctx::Verdict> {
    let volume = ctx.volume();
    let (conn, _) = ctx.open(pb::Handshake {
        layout: Some(replicated(0)),
        owner_epoch,
        ..ctx.hs(&volume)
    })?;
    Ok((conn, volume))
}

fn record(generation: u64, owner_epoch: u64) -> pb::MembershipRecord {
    pb::MembershipRecord {
        generation,
        owner_epoch,
        owner: "node-check".into(),
        clean: false,
        iss: vec![0b11],
        ..Default::default()
    }
}

fn put_record(
    conn: &mut Conn,
    expected: u64,
    record: pb::MembershipRecord,
) -> Result<pb::Reply, crate::ctx::Verdict> {
    let (reply, _) = conn.call(
        Op::PutRecord(pb::PutRecord {
            expected_generation: expected,
            record: Some(record),
        }),
        &[],
    )?;
    Ok(reply)
}

fn stored(conn: &mut Conn) -> Result<pb::MembershipRecord, crate::ctx::Verdict> {
    let (reply, _) = conn.call(Op::GetRecord(pb::GetRecord {}), &[])?;
    expect_status(&reply, pb::Status::Ok, "GetRecord")?;
    Ok(reply.record.unwrap_or_default())
}

fn compare_and_set(ctx: &Ctx) -> Outcome {
    let (mut conn, _) = replica(ctx, 0)?;
    ensure!(
        stored(&mut conn)?.generation == 0,
        "a new volume has a record"
    );
    expect_status(
        &put_record(&mut conn, 0, record(1, 0))?,
        pb::Status::Ok,
        "the first record",
    )?;
    let lost = put_record(&mut conn, 0, record(1, 0))?;
    expect_status(
        &lost,
        pb::Status::Conflict,
        "a record expecting a generation no longer stored",
    )?;
    ensure!(
        lost.record.as_ref().map(|r| r.generation) == Some(1),
        "the conflict does not carry the stored record: {:?}",
        lost.record
    );
    let backwards = put_record(&mut conn, 1, record(1, 0))?;
    expect_status(
        &backwards,
        pb::Status::Conflict,
        "a record that does not move the generation forward",
    )?;
    expect_status(
        &put_record(&mut conn, 1, record(2, 0))?,
        pb::Status::Ok,
        "the next record",
    )?;
    ensure!(
        stored(&mut conn)? == record(2, 0),
        "GetRecord does not return the record stored"
    );
    Ok(())
}

fn invalid_record(ctx: &Ctx) -> Outcome {
    let (mut conn, _) = replica(ctx, 0)?;
    let bad = [
        (
            pb::MembershipRecord {
                iss: vec![0b100],
                ..record(1, 0)
            },
            "a row beyond two replicas",
        ),
        (
            pb::MembershipRecord {
                iss: vec![0b01],
                joining: vec![0b01],
                ..record(1, 0)
            },
            "a row in sync and joining",
        ),
        (
            pb::MembershipRecord {
                iss: vec![0b01],
                rebuild: vec![0b10],
                ..record(1, 0)
            },
            "a row rebuilt but not joining",
        ),
        (
            pb::MembershipRecord {
                members: vec!["a:1".into()],
                ..record(1, 0)
            },
            "one member address for two rows",
        ),
    ];
    for (record, what) in bad {
        let reply = put_record(&mut conn, 0, record)?;
        expect_status(&reply, pb::Status::Invalid, what)?;
    }
    ensure!(
        stored(&mut conn)?.generation == 0,
        "an invalid record was stored"
    );
    Ok(())
}

fn owner_epoch(ctx: &Ctx) -> Outcome {
    let (mut owner, volume) = replica(ctx, 2)?;
    expect_status(
        &put_record(&mut owner, 0, record(1, 2))?,
        pb::Status::Ok,
        "the owner's record",
    )?;
    let older = ctx.try_handshake(pb::Handshake {
        layout: Some(replicated(0)),
        owner_epoch: 1,
        ..ctx.hs(&volume)
    })?;
    ensure!(
        older.status == pb::Status::Refused as i32,
        "a handshake at owner epoch 1 under a record of epoch 2: {}",
        status_name(older.status)
    );
    let (mut tool, _) = ctx.open(pb::Handshake {
        layout: Some(replicated(0)),
        owner_epoch: 0,
        ..ctx.hs(&volume)
    })?;
    let data = pattern(1, 0, 4096);
    let (reply, _) = tool.call(write(0, &data, false), &data)?;
    expect_status(
        &reply,
        pb::Status::Refused,
        "a write of a connection without the owner epoch",
    )?;
    let (reply, _) = owner.call(write(0, &data, false), &data)?;
    expect_status(&reply, pb::Status::Ok, "the owner's write")
}

fn activity(ctx: &Ctx) -> Outcome {
    let (mut owner, volume) = replica(ctx, 1)?;
    expect_status(
        &put_record(&mut owner, 0, record(1, 1))?,
        pb::Status::Ok,
        "the owner's record",
    )?;
    let region = 4u64 << 20;
    let at = 2 * region + 4096;
    ensure!(at + 4096 <= SIZE, "the volume is too small for the check");
    let data = pattern(2, at, 4096);
    let (reply, _) = owner.call(write(at, &data, false), &data)?;
    expect_status(&reply, pb::Status::Ok, "the owner's write")?;
    let (reply, _) = owner.call(Op::GetActivity(pb::GetActivity { from: 0 }), &[])?;
    expect_status(&reply, pb::Status::Ok, "GetActivity")?;
    let Some(i) = reply.activity_regions.iter().position(|r| *r == 2) else {
        return Err(format!(
            "the write at {at} did not log region 2: {:?}",
            reply.activity_regions
        )
        .into());
    };
    let seq = reply.activity_seqs.get(i).copied().unwrap_or_default();
    let (mut tool, _) = ctx.open(pb::Handshake {
        layout: Some(replicated(0)),
        owner_epoch: 0,
        ..ctx.hs(&volume)
    })?;
    let trim = Op::TrimActivity(pb::TrimActivity {
        regions: vec![2],
        seqs: vec![seq],
    });
    let (reply, _) = tool.call(trim.clone(), &[])?;
    expect_status(
        &reply,
        pb::Status::Refused,
        "a trim by a connection without the owner epoch",
    )?;
    let (reply, _) = owner.call(trim, &[])?;
    expect_status(&reply, pb::Status::Ok, "the owner's trim")?;
    let (reply, _) = owner.call(Op::GetActivity(pb::GetActivity { from: 0 }), &[])?;
    ensure!(
        !reply.activity_regions.contains(&2),
        "a trimmed region with an unchanged sequence number is still logged"
    );
    Ok(())
}

/// Every missed region the node states for `row`, and `missed_since`.
fn missed_regions(conn: &mut Conn, row: u32) -> Result<(Vec<u64>, u64), crate::ctx::Verdict> {
    let mut regions = Vec::new();
    let mut from = 0;
    // The check's volume has 16 regions of 1 MiB: a page or two at most.
    for _ in 0..16 {
        let (reply, _) = conn.call(Op::GetMissed(pb::GetMissed { row, from }), &[])?;
        expect_status(&reply, pb::Status::Ok, "GetMissed")?;
        ensure!(
            reply.missed_regions.windows(2).all(|w| w[0] < w[1])
                && reply.missed_regions.first().is_none_or(|r| *r >= from),
            "missed regions not ascending from {from}: {:?}",
            reply.missed_regions
        );
        regions.extend(&reply.missed_regions);
        match reply.missed_regions.last() {
            Some(last) if reply.missed_more => from = last + 1,
            _ => return Ok((regions, reply.missed_since)),
        }
    }
    Err("GetMissed kept saying more follow".to_string().into())
}

fn missed(ctx: &Ctx) -> Outcome {
    const MIB: u64 = 1 << 20;
    let (mut owner, _) = replica(ctx, 1)?;
    expect_status(
        &put_record(&mut owner, 0, record(1, 1))?,
        pb::Status::Ok,
        "the owner's record",
    )?;
    // Logged while both rows are in sync: still in the activity log when
    // row 1 leaves, so it seeds row 1's missed regions.
    let before = 3 * MIB + 4096;
    let data = pattern(6, before, 4096);
    let (reply, _) = owner.call(write(before, &data, false), &data)?;
    expect_status(&reply, pb::Status::Ok, "a write before row 1 leaves")?;
    let out = pb::MembershipRecord {
        iss: vec![0b01],
        ..record(2, 1)
    };
    expect_status(
        &put_record(&mut owner, 1, out)?,
        pb::Status::Ok,
        "the record that takes row 1 out",
    )?;
    let during = 9 * MIB + 512;
    let data = pattern(7, during, 2048);
    let (reply, _) = owner.call(write(during, &data, false), &data)?;
    expect_status(&reply, pb::Status::Ok, "a write while row 1 is out")?;
    let (reply, _) = owner.call(
        Op::Discard(pb::Discard {
            offset: 13 * MIB,
            length: 4096,
        }),
        &[],
    )?;
    expect_status(&reply, pb::Status::Ok, "a discard while row 1 is out")?;
    let (regions, since) = missed_regions(&mut owner, 1)?;
    ensure!(
        since == 2,
        "missed_since is {since}, not the generation that took the row out (2)"
    );
    for (region, what) in [
        (3, "the region logged before the row left"),
        (9, "the region written while it was out"),
        (13, "the region discarded while it was out"),
    ] {
        ensure!(
            regions.contains(&region),
            "{what} ({region}) is not among row 1's missed regions {regions:?}"
        );
    }
    expect_status(
        &put_record(&mut owner, 2, record(3, 1))?,
        pb::Status::Ok,
        "the record that puts row 1 back",
    )?;
    let (regions, since) = missed_regions(&mut owner, 1)?;
    ensure!(
        since == 0 && regions.is_empty(),
        "row 1 is back in sync, yet the node states missed regions {regions:?} since {since}"
    );
    Ok(())
}

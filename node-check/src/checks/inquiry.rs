//! docs/protocol.md section 13: inquiries (describe a volume, list them).

use netblk_protocol::pb::{self, header::Kind, inquiry::What, request::Op};
use netblk_protocol::{PROTOCOL_REVISION, PROTOCOL_VERSION};

use super::Check;
use crate::ctx::{Ctx, Outcome, SIZE, Verdict, replicated, status_name};
use crate::ensure;
use crate::wire::Recv;

pub const CHECKS: &[Check] = &[
    Check::new(
        "13.1",
        "describe states the layout, size and identity a volume was created with, and its record",
        describe,
    ),
    Check::new(
        "13.1",
        "describing a volume the node lacks is NOT_FOUND and makes nothing",
        describe_absent,
    ),
    Check::new("13.2", "a listing names every volume the node holds", list),
    Check::new(
        "13.3",
        "an inquiry of another revision is refused; the node closes the connection after one answer",
        revision_and_close,
    ),
];

/// The node's answer to an inquiry of `revision` asking `what`, and
/// whether it closed the connection after it.
fn ask(ctx: &Ctx, revision: u32, what: What) -> Result<(pb::InquiryReply, bool), Verdict> {
    let mut conn = ctx.target.connect()?;
    conn.frame(
        &pb::Header {
            kind: Some(Kind::Inquiry(pb::Inquiry {
                protocol_version: u32::from(PROTOCOL_VERSION),
                revision,
                what: Some(what),
            })),
        },
        &[],
    )?;
    let reply = match conn.recv()? {
        Recv::Frame(header, payload) => match header.kind {
            Some(Kind::InquiryReply(reply)) if payload.is_empty() => reply,
            other => {
                return Err(Verdict::Fail(format!(
                    "an inquiry answered with {other:?} and {} payload bytes",
                    payload.len()
                )));
            }
        },
        Recv::Closed => {
            return Err(Verdict::Fail(
                "the node closed an inquiry unanswered".into(),
            ));
        }
        Recv::Silent => return Err(Verdict::Fail("no answer to an inquiry in time".into())),
    };
    let closed = matches!(conn.recv()?, Recv::Closed);
    Ok((reply, closed))
}

fn describe_of(ctx: &Ctx, volume: &str) -> Result<pb::InquiryReply, Verdict> {
    let what = What::Describe(pb::DescribeVolume {
        volume: volume.into(),
    });
    Ok(ask(ctx, PROTOCOL_REVISION, what)?.0)
}

fn describe(ctx: &Ctx) -> Outcome {
    let volume = ctx.volume();
    let layout = replicated(1);
    let (mut conn, opened) = ctx.open(pb::Handshake {
        layout: Some(layout),
        ..ctx.hs(&volume)
    })?;
    let record = pb::MembershipRecord {
        generation: 1,
        clean: true,
        iss: vec![0b11],
        members: vec!["192.0.2.1:7000".into(), "192.0.2.2:7000".into()],
        ..Default::default()
    };
    let (put, _) = conn.call(
        Op::PutRecord(pb::PutRecord {
            expected_generation: 0,
            record: Some(record.clone()),
        }),
        &[],
    )?;
    ensure!(
        put.status == pb::Status::Ok as i32,
        "PutRecord of a first record: {} ({})",
        status_name(put.status),
        put.message
    );
    let reply = describe_of(ctx, &volume)?;
    ensure!(
        reply.status == pb::Status::Ok as i32,
        "describe of a volume just made: {} ({})",
        status_name(reply.status),
        reply.message
    );
    let [described] = reply.volumes.as_slice() else {
        return Err(Verdict::Fail(format!(
            "describe answered {} volumes, not one",
            reply.volumes.len()
        )));
    };
    ensure!(
        described.volume == volume,
        "described '{}'",
        described.volume
    );
    ensure!(
        described.layout == Some(layout),
        "described layout {:?}, created with {layout:?}",
        described.layout
    );
    ensure!(
        described.volume_size == SIZE,
        "described size {}, created with {SIZE}",
        described.volume_size
    );
    ensure!(
        described.volume_id == opened.volume_id,
        "described identity '{}', the handshake stated '{}'",
        described.volume_id,
        opened.volume_id
    );
    ensure!(
        described.record.as_ref() == Some(&record),
        "described record {:?}, stored {record:?}",
        described.record
    );
    Ok(())
}

fn describe_absent(ctx: &Ctx) -> Outcome {
    let volume = ctx.volume();
    for attempt in ["first", "second"] {
        let reply = describe_of(ctx, &volume)?;
        ensure!(
            reply.status == pb::Status::NotFound as i32 && reply.volumes.is_empty(),
            "the {attempt} describe of a volume never made: {} with {} volumes ({})",
            status_name(reply.status),
            reply.volumes.len(),
            reply.message
        );
    }
    let (listed, _) = ask(ctx, PROTOCOL_REVISION, What::List(pb::ListVolumes {}))?;
    ensure!(
        !listed.volumes.iter().any(|d| d.volume == volume),
        "after describes of a volume never made, the node lists it"
    );
    Ok(())
}

fn list(ctx: &Ctx) -> Outcome {
    let (a, b) = (ctx.volume(), ctx.volume());
    ctx.open(ctx.hs(&a))?;
    ctx.open(pb::Handshake {
        layout: Some(replicated(0)),
        ..ctx.hs(&b)
    })?;
    let (reply, _) = ask(ctx, PROTOCOL_REVISION, What::List(pb::ListVolumes {}))?;
    ensure!(
        reply.status == pb::Status::Ok as i32,
        "list: {} ({})",
        status_name(reply.status),
        reply.message
    );
    for (name, replicas) in [(&a, 1), (&b, 2)] {
        let Some(described) = reply.volumes.iter().find(|d| &d.volume == name) else {
            return Err(Verdict::Fail(format!("the listing leaves out '{name}'")));
        };
        ensure!(
            described.layout.is_some_and(|l| l.replicas == replicas),
            "listed '{name}' with layout {:?}",
            described.layout
        );
    }
    Ok(())
}

fn revision_and_close(ctx: &Ctx) -> Outcome {
    let (reply, closed) = ask(ctx, PROTOCOL_REVISION + 1, What::List(pb::ListVolumes {}))?;
    ensure!(
        reply.status == pb::Status::Refused as i32 && reply.volumes.is_empty(),
        "an inquiry of revision {}: {} with {} volumes",
        PROTOCOL_REVISION + 1,
        status_name(reply.status),
        reply.volumes.len()
    );
    ensure!(
        reply.revision == PROTOCOL_REVISION,
        "the refusal states revision {}",
        reply.revision
    );
    ensure!(closed, "the connection stayed open after a refused inquiry");
    let (_, closed) = ask(ctx, PROTOCOL_REVISION, What::List(pb::ListVolumes {}))?;
    ensure!(
        closed,
        "the connection stayed open after an answered inquiry"
    );
    Ok(())
}

//! docs/protocol.md sections 1, 4 and 5: versions, volumes and the
//! handshake.

use netblk_protocol::PROTOCOL_REVISION;
use netblk_protocol::pb::{self, request::Op};

use super::Check;
use crate::ctx::{Ctx, Outcome, SIZE, UNIT, Verdict, layout, status_name};
use crate::ensure;

pub const CHECKS: &[Check] = &[
    Check::new(
        "1.2",
        "another protocol version is refused, the reply stating the revision",
        version,
    ),
    Check::new("1.2", "another revision is refused naming both", revision),
    Check::new("4.1", "a bad volume name is refused", bad_name),
    Check::new(
        "4.2",
        "a new volume of a bad geometry is refused",
        bad_geometry,
    ),
    Check::new(
        "4.3",
        "the volume identity is stable across connections and new after a delete",
        identity,
    ),
    Check::new(
        "4.4",
        "a handshake with another layout is refused",
        other_layout,
    ),
    Check::new("5.1", "a handshake without a layout is refused", no_layout),
    Check::new(
        "5.2",
        "existing: no such volume is NOT_FOUND and nothing is made",
        existing,
    ),
    Check::new(
        "5.3",
        "an accepted handshake states a nonzero incarnation, the same on every connection",
        incarnation,
    ),
    Check::new(
        "5.4",
        "another size is refused; at_least takes a larger volume and states its size",
        size,
    ),
    Check::new(
        "5.6",
        "an accepted reply states max_io_size (at least 4 KiB) and a node id",
        reply_fields,
    ),
];

fn refused(ctx: &Ctx, hs: pb::Handshake, what: &str) -> Result<pb::HandshakeReply, Verdict> {
    let reply = ctx.try_handshake(hs)?;
    ensure!(
        reply.status == pb::Status::Refused as i32,
        "{what}: {} ({}), the spec says REFUSED",
        status_name(reply.status),
        reply.message
    );
    Ok(reply)
}

fn version(ctx: &Ctx) -> Outcome {
    let hs = pb::Handshake {
        protocol_version: 2,
        ..ctx.hs(&ctx.volume())
    };
    let reply = refused(ctx, hs, "protocol version 2")?;
    ensure!(
        reply.revision == PROTOCOL_REVISION,
        "a refusal states revision {}, not {PROTOCOL_REVISION}",
        reply.revision
    );
    Ok(())
}

fn revision(ctx: &Ctx) -> Outcome {
    let other = PROTOCOL_REVISION + 7;
    let hs = pb::Handshake {
        revision: other,
        ..ctx.hs(&ctx.volume())
    };
    let reply = refused(ctx, hs, "another revision")?;
    ensure!(
        reply.message.contains(&other.to_string())
            && reply.message.contains(&PROTOCOL_REVISION.to_string()),
        "the refusal does not name both revisions: {:?}",
        reply.message
    );
    ensure!(
        reply.revision == PROTOCOL_REVISION,
        "a refusal states revision {}",
        reply.revision
    );
    Ok(())
}

fn bad_name(ctx: &Ctx) -> Outcome {
    for name in ["", ".hidden", "a/b", &"x".repeat(129)] {
        let hs = pb::Handshake {
            volume: name.to_string(),
            ..ctx.hs("unused")
        };
        refused(ctx, hs, &format!("volume name {name:?}"))?;
    }
    Ok(())
}

fn bad_geometry(ctx: &Ctx) -> Outcome {
    let cases = [
        (SIZE + 100, layout(1), "a size not a multiple of 512"),
        (0, layout(1), "size 0"),
        (
            SIZE,
            pb::Layout {
                stripe_unit: 3000,
                ..layout(1)
            },
            "a stripe unit not a power of two",
        ),
        (
            SIZE,
            pb::Layout {
                node_index: 1,
                ..layout(1)
            },
            "a column beyond the column count",
        ),
        (SIZE, layout(0), "0 replicas"),
        (SIZE, layout(6), "6 replicas"),
    ];
    for (size, layout, what) in cases {
        let hs = pb::Handshake {
            volume_size: size,
            layout: Some(layout),
            ..ctx.hs(&ctx.volume())
        };
        refused(ctx, hs, what)?;
    }
    Ok(())
}

fn identity(ctx: &Ctx) -> Outcome {
    let (mut conn, first, volume) = ctx.fresh()?;
    ensure!(!first.volume_id.is_empty(), "no volume identity");
    let (_, again) = ctx.open(ctx.hs(&volume))?;
    ensure!(
        again.volume_id == first.volume_id,
        "the identity changed between connections: {} then {}",
        first.volume_id,
        again.volume_id
    );
    let (reply, _) = conn.call(Op::Delete(pb::Delete {}), &[])?;
    if reply.status == pb::Status::Refused as i32 {
        return Err(Verdict::Skip(format!(
            "the node's policy refuses deletes: {}",
            reply.message
        )));
    }
    crate::ctx::expect_status(&reply, pb::Status::Ok, "delete")?;
    let (_, made) = ctx.open(ctx.hs(&volume))?;
    ensure!(
        made.volume_id != first.volume_id,
        "a volume made again under the name has the old identity {}",
        made.volume_id
    );
    Ok(())
}

fn other_layout(ctx: &Ctx) -> Outcome {
    let (_, _, volume) = ctx.fresh()?;
    let cases = [
        (
            pb::Layout {
                stripe_unit: UNIT * 2,
                ..layout(1)
            },
            "another stripe unit",
        ),
        (
            pb::Layout {
                node_count: 2,
                node_index: 1,
                ..layout(1)
            },
            "another column",
        ),
        (layout(2), "another replica count"),
    ];
    for (layout, what) in cases {
        let hs = pb::Handshake {
            layout: Some(layout),
            ..ctx.hs(&volume)
        };
        refused(ctx, hs, what)?;
    }
    Ok(())
}

fn no_layout(ctx: &Ctx) -> Outcome {
    let hs = pb::Handshake {
        layout: None,
        ..ctx.hs(&ctx.volume())
    };
    refused(ctx, hs, "a handshake without a layout")?;
    Ok(())
}

fn existing(ctx: &Ctx) -> Outcome {
    let volume = ctx.volume();
    let hs = pb::Handshake {
        existing: true,
        ..ctx.hs(&volume)
    };
    for attempt in ["first", "second"] {
        let reply = ctx.try_handshake(hs.clone())?;
        ensure!(
            reply.status == pb::Status::NotFound as i32,
            "the {attempt} existing-only handshake for a volume never made: {} ({})",
            status_name(reply.status),
            reply.message
        );
    }
    // Made, then found with size 0 standing for its size.
    ctx.open(ctx.hs(&volume))?;
    let (_, found) = ctx.open(pb::Handshake {
        volume_size: 0,
        ..hs
    })?;
    ensure!(
        found.volume_size == SIZE,
        "an existing-only handshake with size 0 was told size {}",
        found.volume_size
    );
    Ok(())
}

fn incarnation(ctx: &Ctx) -> Outcome {
    let (_, first, volume) = ctx.fresh()?;
    ensure!(first.incarnation != 0, "incarnation 0");
    let (_, again) = ctx.open(ctx.hs(&volume))?;
    ensure!(
        again.incarnation == first.incarnation,
        "one node process stated incarnations {} and {}",
        first.incarnation,
        again.incarnation
    );
    Ok(())
}

fn size(ctx: &Ctx) -> Outcome {
    let (_, _, volume) = ctx.fresh()?;
    refused(
        ctx,
        pb::Handshake {
            volume_size: SIZE * 2,
            ..ctx.hs(&volume)
        },
        "a larger size",
    )?;
    let (_, reply) = ctx.open(pb::Handshake {
        volume_size: SIZE / 2,
        at_least: true,
        ..ctx.hs(&volume)
    })?;
    ensure!(
        reply.volume_size == SIZE,
        "at_least with a smaller size was told size {}",
        reply.volume_size
    );
    Ok(())
}

fn reply_fields(ctx: &Ctx) -> Outcome {
    let (_, reply, _) = ctx.fresh()?;
    ensure!(
        reply.max_io_size >= 4096,
        "max_io_size {} is below 4 KiB",
        reply.max_io_size
    );
    ensure!(!reply.node_id.is_empty(), "no node id");
    ensure!(
        reply.volume_size == SIZE,
        "volume_size {} for a volume of {SIZE}",
        reply.volume_size
    );
    ensure!(
        reply.revision == PROTOCOL_REVISION,
        "revision {}",
        reply.revision
    );
    Ok(())
}

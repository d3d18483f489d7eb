//! docs/protocol.md sections 5.3 (across a restart) and 7: sessions and
//! fencing.

use std::time::Duration;

use netblk_protocol::pb;

use super::Check;
use crate::ctx::{Ctx, Outcome, Verdict, get, pattern, put, status_name, write};
use crate::ensure;
use crate::wire::set_faults;

pub const CHECKS: &[Check] = &[
    Check::new(
        "7.2",
        "a session below the newest is refused as stale",
        stale,
    ),
    Check::new(
        "7.2",
        "a session more than 2^40 above the newest is refused",
        too_far,
    ),
    Check::new(
        "7.3",
        "a newer session closes the older session's connections",
        newer_closes_older,
    ),
    Check::new(
        "7.3",
        "a write held in an older session is never applied once a newer one is admitted",
        held_write_fenced,
    ),
    Check::new(
        "5.3",
        "a restarted node states a new incarnation and keeps flushed (on any connection) and FUA writes",
        restart,
    ),
];

/// The handshake of client `client` at `session` for `volume`.
fn at(ctx: &Ctx, volume: &str, client: &str, session: u64) -> pb::Handshake {
    pb::Handshake {
        client_id: client.into(),
        session,
        ..ctx.hs(volume)
    }
}

fn stale(ctx: &Ctx) -> Outcome {
    let volume = ctx.volume();
    let client = ctx.client_id();
    ctx.open(at(ctx, &volume, &client, 5))?;
    let reply = ctx.try_handshake(at(ctx, &volume, &client, 4))?;
    ensure!(
        reply.status == pb::Status::Refused as i32,
        "session 4 after session 5: {} ({})",
        status_name(reply.status),
        reply.message
    );
    Ok(())
}

fn too_far(ctx: &Ctx) -> Outcome {
    let volume = ctx.volume();
    let client = ctx.client_id();
    ctx.open(at(ctx, &volume, &client, 1))?;
    let reply = ctx.try_handshake(at(ctx, &volume, &client, 2 + (1 << 40)))?;
    ensure!(
        reply.status == pb::Status::Refused as i32,
        "a session 2^40 + 1 above the newest: {} ({})",
        status_name(reply.status),
        reply.message
    );
    Ok(())
}

fn newer_closes_older(ctx: &Ctx) -> Outcome {
    let volume = ctx.volume();
    let client = ctx.client_id();
    let (mut old, _) = ctx.open(at(ctx, &volume, &client, 1))?;
    let (mut new, _) = ctx.open(at(ctx, &volume, &client, 2))?;
    let data = pattern(1, 0, 4096);
    // The old connection is closed: a request there is never answered OK.
    if let Ok((reply, _)) = old.call(write(0, &data, false), &data) {
        ensure!(
            reply.status != pb::Status::Ok as i32,
            "a write on the older session's connection succeeded after a newer session was admitted"
        );
    }
    ensure!(
        get(&mut new, 0, 4096)?.iter().all(|b| *b == 0),
        "the older session's write was applied"
    );
    Ok(())
}

fn held_write_fenced(ctx: &Ctx) -> Outcome {
    let Some(admin) = ctx.admin else {
        return Err(Verdict::Skip(
            "holding a request needs the node's admin listener (--admin)".into(),
        ));
    };
    let volume = ctx.volume();
    let client = ctx.client_id();
    let (mut old, _) = ctx.open(at(ctx, &volume, &client, 1))?;
    let hold = |stall: bool| {
        set_faults(
            admin,
            pb::Faults {
                stall,
                stall_open_only: stall,
                ..Default::default()
            },
            ctx.timeout(),
        )
    };
    hold(true)?;
    let data = pattern(2, 0, 4096);
    let sent = old.send(write(0, &data, false), &data);
    // Let the node take it into its queues.
    std::thread::sleep(Duration::from_millis(300));
    let admitted = ctx.open(at(ctx, &volume, &client, 2));
    hold(false)?;
    sent?;
    let (mut new, _) = admitted?;
    std::thread::sleep(Duration::from_millis(300));
    ensure!(
        get(&mut new, 0, 4096)?.iter().all(|b| *b == 0),
        "a write held in the older session was applied after the newer one was admitted"
    );
    Ok(())
}

fn restart(ctx: &Ctx) -> Outcome {
    let Some(command) = &ctx.restart else {
        return Err(Verdict::Skip(
            "restarting the node needs --restart-cmd".into(),
        ));
    };
    let (mut conn, before, volume) = ctx.fresh()?;
    let data = pattern(3, 0, 4096);
    put(&mut conn, 0, &data)?;
    // A flush covers writes acknowledged on any connection of the volume.
    let (mut other, _) = ctx.open(ctx.hs(&volume))?;
    let elsewhere = pattern(5, 16384, 4096);
    put(&mut other, 16384, &elsewhere)?;
    let (reply, _) = conn.call(pb::request::Op::Flush(pb::Flush {}), &[])?;
    crate::ctx::expect_status(&reply, pb::Status::Ok, "a flush")?;
    // A FUA write is durable at its reply, with no flush after it (6.6).
    let forced = pattern(4, 8192, 4096);
    let (reply, _) = conn.call(crate::ctx::write(8192, &forced, true), &forced)?;
    crate::ctx::expect_status(&reply, pb::Status::Ok, "a FUA write")?;
    conn.close();
    other.close();
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .status()
        .map_err(|e| format!("--restart-cmd: {e}"))?;
    ensure!(status.success(), "--restart-cmd failed: {status}");
    // The node may take a moment to listen again.
    let existing = pb::Handshake {
        existing: true,
        ..ctx.hs(&volume)
    };
    let until = std::time::Instant::now() + ctx.timeout() * 3;
    loop {
        match ctx.try_handshake(existing.clone()) {
            Ok(reply) if reply.status == pb::Status::NotFound as i32 => {
                return Err(Verdict::Skip(
                    "the node does not keep volumes across restarts (a memory store?)".into(),
                ));
            }
            Ok(_) => break,
            Err(_) if std::time::Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e),
        }
    }
    let (mut conn, after) = ctx.open(existing)?;
    ensure!(
        after.incarnation != before.incarnation,
        "the restarted node states the same incarnation {}",
        after.incarnation
    );
    ensure!(
        after.volume_id == before.volume_id,
        "the volume's identity changed across a restart"
    );
    ensure!(
        get(&mut conn, 0, 4096)? == data,
        "flushed data did not survive the restart"
    );
    ensure!(
        get(&mut conn, 8192, 4096)? == forced,
        "an acknowledged FUA write did not survive the restart"
    );
    ensure!(
        get(&mut conn, 16384, 4096)? == elsewhere,
        "a write on another connection, acknowledged before a flush, did not survive the restart"
    );
    Ok(())
}

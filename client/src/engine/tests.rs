use super::*;
use netblk_protocol::pb::{self, Status};
use std::time::Duration;

fn engine(nodes: u32) -> Engine {
    let mut e = Engine::new(
        Layout::new(1 << 20, 4096, nodes).expect("layout"),
        EngineConfig {
            depth: 4,
            max_io: 65536,
            max_in_flight_per_node: 8,
            io_timeout: Duration::from_secs(1),
            node_down_timeout: Duration::from_secs(10),
            replica_timeout: Duration::from_secs(5),
            data_digest: false,
        },
    );
    for n in 0..nodes as usize {
        e.handle_connection_restored(n);
    }
    e
}

pub(super) fn submit(e: &mut Engine, now: Instant, tag: Tag, op: Op, offset: u64, len: u64) {
    e.handle_request(
        now,
        BlockRequest {
            tag,
            op,
            offset,
            len,
        },
    )
    .expect("submit");
}

fn ok(id: u64) -> pb::Reply {
    pb::Reply {
        id,
        ..Default::default()
    }
}

#[test]
fn requests_are_checked_against_the_shared_size_after_a_resize() {
    let mut e = engine(2);
    let size = LiveSize::new(1 << 20);
    e.share_size(size.clone());
    let now = Instant::now();
    submit(&mut e, now, 0, Op::Read, 1 << 20, 4096);
    assert_eq!(
        e.poll_completion(),
        Some(Completion {
            tag: 0,
            result: Err(EINVAL)
        }),
        "past the end before the resize"
    );
    size.set(2 << 20);
    submit(&mut e, now, 0, Op::Read, 1 << 20, 4096);
    assert_eq!(e.poll_completion(), None, "in range once grown");
    assert!(e.poll_transmit(0).is_some() || e.poll_transmit(1).is_some());
}

#[test]
fn big_reads_in_flight_are_counted_per_node() {
    let mut e = Engine::new(
        Layout::new(1 << 20, 65536, 2).expect("layout"),
        EngineConfig {
            depth: 8,
            max_io: 65536,
            max_in_flight_per_node: 8,
            io_timeout: Duration::from_secs(1),
            node_down_timeout: Duration::from_secs(10),
            replica_timeout: Duration::from_secs(5),
            data_digest: false,
        },
    );
    e.handle_connection_restored(0);
    e.handle_connection_restored(1);
    let now = Instant::now();
    // Stripe units of 64 KiB: node 0, node 1, node 0.
    submit(&mut e, now, 0, Op::Read, 0, 65536);
    submit(&mut e, now, 1, Op::Read, 65536, 4096);
    submit(&mut e, now, 2, Op::Write { fua: false }, 2 * 65536, 65536);
    assert_eq!(e.big_reads_in_flight(0), 0, "nothing sent yet");
    let big = e.poll_transmit(0).expect("big read");
    e.poll_transmit(0).expect("write");
    e.poll_transmit(1).expect("small read");
    assert_eq!((e.big_reads_in_flight(0), e.big_reads_in_flight(1)), (1, 0));
    match e.handle_reply(0, &ok(big.id), 65536) {
        Ok(ReplySink::Buffer { id, .. }) => e.handle_payload(id, true),
        other => panic!("{other:?}"),
    }
    assert_eq!(e.big_reads_in_flight(0), 0, "answered");
    // Lost with the connection, counted again when sent again.
    submit(&mut e, now, 3, Op::Read, 0, 32768);
    e.poll_transmit(0).expect("big read");
    assert_eq!(e.big_reads_in_flight(0), 1);
    e.handle_connection_lost(now, 0);
    assert_eq!(e.big_reads_in_flight(0), 0);
    e.handle_connection_restored(0);
    while e.poll_transmit(0).is_some() {}
    assert_eq!(e.big_reads_in_flight(0), 1, "resent");
    // Timed out: gone.
    e.handle_timeout(now + Duration::from_secs(2));
    assert_eq!(e.big_reads_in_flight(0), 0);
}

#[test]
fn a_write_completes_after_replies_and_buffer_release() {
    let mut e = engine(2);
    let now = Instant::now();
    submit(&mut e, now, 1, Op::Write { fua: true }, 0, 8192);
    let a = e.poll_transmit(0).expect("piece for node 0");
    let b = e.poll_transmit(1).expect("piece for node 1");
    assert_eq!(
        a.payload,
        Some(BufSlice {
            tag: 1,
            offset: 0,
            len: 4096
        })
    );
    assert_eq!(
        b.payload,
        Some(BufSlice {
            tag: 1,
            offset: 4096,
            len: 4096
        })
    );
    assert_eq!(e.handle_reply(0, &ok(a.id), 0), Ok(ReplySink::Done));
    assert_eq!(e.handle_reply(1, &ok(b.id), 0), Ok(ReplySink::Done));
    assert_eq!(e.poll_completion(), None, "zero-copy buffers still in use");
    e.handle_buffer_released(0, 1);
    assert_eq!(e.poll_completion(), None);
    e.handle_buffer_released(1, 1);
    assert_eq!(
        e.poll_completion(),
        Some(Completion {
            tag: 1,
            result: Ok(8192)
        })
    );
}

#[test]
fn first_error_wins_and_maps_to_errno() {
    let mut e = engine(2);
    e.handle_request(
        Instant::now(),
        BlockRequest {
            tag: 0,
            op: Op::Read,
            offset: 0,
            len: 8192,
        },
    )
    .expect("submit");
    let a = e.poll_transmit(0).expect("a");
    let b = e.poll_transmit(1).expect("b");
    let nospc = pb::Reply {
        id: a.id,
        status: Status::NoSpace as i32,
        ..Default::default()
    };
    assert_eq!(e.handle_reply(0, &nospc, 0), Ok(ReplySink::Done));
    let sink = e.handle_reply(1, &ok(b.id), 4096).expect("sink");
    assert_eq!(
        sink,
        ReplySink::Buffer {
            id: b.id,
            slice: BufSlice {
                tag: 0,
                offset: 4096,
                len: 4096
            },
            crc32c: None,
        }
    );
    assert_eq!(e.poll_completion(), None, "payload still being received");
    e.handle_payload(b.id, true);
    assert_eq!(
        e.poll_completion(),
        Some(Completion {
            tag: 0,
            result: Err(28)
        })
    );
}

#[test]
fn protocol_violations_are_reported() {
    let mut e = engine(2);
    e.handle_request(
        Instant::now(),
        BlockRequest {
            tag: 0,
            op: Op::Read,
            offset: 0,
            len: 4096,
        },
    )
    .expect("submit");
    let a = e.poll_transmit(0).expect("a");
    assert!(matches!(
        e.handle_reply(1, &ok(a.id), 4096),
        Err(ReplyError::WrongNode { .. })
    ));
    assert!(matches!(
        e.handle_reply(0, &ok(a.id), 100),
        Err(ReplyError::PayloadLength { .. })
    ));
    assert_eq!(
        e.handle_reply(0, &ok(999), 0),
        Err(ReplyError::NeverSent { id: 999 }),
        "an id never given out breaks the connection"
    );
    assert!(matches!(
        e.handle_reply(0, &ok(0), 0),
        Err(ReplyError::NeverSent { .. })
    ));
}

#[test]
fn flush_fans_out_and_bad_requests_fail_fast() {
    let mut e = engine(3);
    let now = Instant::now();
    e.handle_request(
        now,
        BlockRequest {
            tag: 0,
            op: Op::Flush,
            offset: 0,
            len: 0,
        },
    )
    .expect("flush");
    let ids: Vec<u64> = (0..3)
        .map(|n| e.poll_transmit(n).expect("flush piece").id)
        .collect();
    for (n, id) in ids.iter().enumerate() {
        assert_eq!(e.poll_completion(), None);
        e.handle_reply(n, &ok(*id), 0).expect("reply");
    }
    assert_eq!(
        e.poll_completion(),
        Some(Completion {
            tag: 0,
            result: Ok(0)
        })
    );

    submit(&mut e, now, 1, Op::Read, 1 << 20, 512);
    assert_eq!(
        e.poll_completion(),
        Some(Completion {
            tag: 1,
            result: Err(EINVAL)
        })
    );
    submit(&mut e, now, 1, Op::Write { fua: false }, 0, 65537);
    assert_eq!(
        e.poll_completion(),
        Some(Completion {
            tag: 1,
            result: Err(EINVAL)
        })
    );
    assert_eq!(
        e.handle_request(
            now,
            BlockRequest {
                tag: 9,
                op: Op::Flush,
                offset: 0,
                len: 0
            }
        ),
        Err(TagError::OutOfRange { tag: 9, depth: 4 })
    );
}

#[test]
fn lost_connection_resends_and_timeout_fails_with_eio() {
    let mut e = engine(1);
    let t0 = Instant::now();
    submit(&mut e, t0, 0, Op::Write { fua: false }, 0, 4096);
    let first = e.poll_transmit(0).expect("sent");
    e.handle_connection_lost(t0, 0);
    e.handle_buffer_released(0, 0);
    assert!(e.poll_transmit(0).is_none(), "nothing goes out while down");
    e.handle_connection_restored(0);
    let again = e.poll_transmit(0).expect("resent");
    assert_eq!(again.id, first.id);
    e.handle_buffer_released(0, 0);
    assert_eq!(e.stats().pieces_resent, 1);

    assert_eq!(e.poll_timeout(), Some(t0 + Duration::from_secs(1)));
    e.handle_timeout(t0 + Duration::from_millis(999));
    assert_eq!(e.poll_completion(), None);
    e.handle_timeout(t0 + Duration::from_secs(1));
    assert_eq!(
        e.poll_completion(),
        Some(Completion {
            tag: 0,
            result: Err(EIO)
        })
    );
    assert_eq!(
        e.handle_reply(0, &ok(again.id), 0),
        Ok(ReplySink::Discard),
        "late reply is stale"
    );
    assert_eq!(e.poll_timeout(), None);
}

#[test]
fn a_timeout_aborts_the_connections_that_hold_its_pieces() {
    let mut e = engine(3);
    let t0 = Instant::now();
    // Pieces on nodes 0, 1 and 2.
    submit(&mut e, t0, 0, Op::Write { fua: false }, 0, 3 * 4096);
    let a = e.poll_transmit(0).expect("a");
    let b = e.poll_transmit(1).expect("b");
    let c = e.poll_transmit(2).expect("c");
    // Node 1 answered and its send is done; node 2 answered but its
    // zero-copy notification is still out; node 0 is silent.
    e.handle_reply(1, &ok(b.id), 0).expect("b reply");
    e.handle_buffer_released(1, 0);
    e.handle_reply(2, &ok(c.id), 0).expect("c reply");
    assert_eq!(e.poll_abort(), None);
    e.handle_timeout(t0 + Duration::from_secs(1));
    assert_eq!(e.poll_abort(), Some(0), "the silent node holds a piece");
    assert_eq!(e.poll_abort(), Some(2), "node 2 still holds the buffer");
    assert_eq!(e.poll_abort(), None);
    assert_eq!(e.stats().aborts, 2);
    assert_eq!(e.poll_completion(), None, "buffers still in the kernel");
    // The aborts give the buffers back.
    e.handle_buffer_released(0, 0);
    e.handle_buffer_released(2, 0);
    assert_eq!(
        e.poll_completion(),
        Some(Completion {
            tag: 0,
            result: Err(EIO)
        })
    );
    assert_eq!(e.handle_reply(0, &ok(a.id), 0), Ok(ReplySink::Discard));
}

fn flush(e: &mut Engine, now: Instant, tag: Tag) -> Vec<u64> {
    submit(e, now, tag, Op::Flush, 0, 0);
    (0..e.layout().node_count())
        .map(|n| e.poll_transmit(n).expect("flush piece").id)
        .collect()
}

fn write_acked(e: &mut Engine, now: Instant, tag: Tag, node: usize, fua: bool) {
    submit(e, now, tag, Op::Write { fua }, node as u64 * 4096, 4096);
    let t = e.poll_transmit(node).expect("write piece");
    e.handle_reply(node, &ok(t.id), 0).expect("reply");
    e.handle_buffer_released(node, tag);
    assert_eq!(e.poll_completion().map(|c| c.result), Some(Ok(4096)));
}

#[test]
fn a_node_that_lost_acknowledged_writes_fails_the_next_flush_once() {
    let mut e = engine(2);
    let now = Instant::now();
    e.handle_incarnation(0, 7, 0);
    e.handle_incarnation(1, 9, 0);
    write_acked(&mut e, now, 0, 0, false);
    // Node 0 restarts as incarnation 8, nothing vouched for.
    e.handle_connection_lost(now, 0);
    e.handle_incarnation(0, 8, 0);
    e.handle_connection_restored(0);
    // A FUA write in that window fails too.
    submit(&mut e, now, 1, Op::Write { fua: true }, 0, 4096);
    let t = e.poll_transmit(0).expect("fua piece");
    e.handle_reply(0, &ok(t.id), 0).expect("reply");
    e.handle_buffer_released(0, 1);
    assert_eq!(e.poll_completion().map(|c| c.result), Some(Err(EIO)));
    let ids = flush(&mut e, now, 2);
    for (n, id) in ids.iter().enumerate() {
        e.handle_reply(n, &ok(*id), 0).expect("reply");
    }
    assert_eq!(e.poll_completion().map(|c| c.result), Some(Err(EIO)));
    assert_eq!(e.stats().failed_flushes, 1);
    // Reported once: the next flush is fine.
    let ids = flush(&mut e, now, 2);
    for (n, id) in ids.iter().enumerate() {
        e.handle_reply(n, &ok(*id), 0).expect("reply");
    }
    assert_eq!(e.poll_completion().map(|c| c.result), Some(Ok(0)));
}

/// Issue 21, point 1: the acknowledged writes, what flushes cover and
/// the lost mark belong to the device, not to the queue that saw them.
#[test]
fn a_flush_through_another_queue_fails_over_writes_the_node_lost() {
    let ledger = Arc::new(Ledger::new(1));
    let (mut q0, mut q1) = (engine(1), engine(1));
    q0.share_ledger(Arc::clone(&ledger));
    q1.share_ledger(Arc::clone(&ledger));
    let now = Instant::now();
    q0.handle_incarnation(0, 7, 0);
    q1.handle_incarnation(0, 7, 0);
    write_acked(&mut q0, now, 0, 0, false);
    // The node restarts (a volatile cache: not vouched for); queue 1
    // reconnects first and flushes.
    q1.handle_connection_lost(now, 0);
    q1.handle_incarnation(0, 8, 0);
    q1.handle_connection_restored(0);
    let ids = flush(&mut q1, now, 0);
    q1.handle_reply(0, &ok(ids[0]), 0).expect("reply");
    assert_eq!(
        q1.poll_completion().map(|c| c.result),
        Some(Err(EIO)),
        "queue 0's acknowledged write is gone"
    );
    // Queue 0 comes back too: reported once for the device, so its
    // FUA writes and flushes, which queue 1's flush covered, succeed.
    q0.handle_connection_lost(now, 0);
    q0.handle_incarnation(0, 8, 0);
    q0.handle_connection_restored(0);
    write_acked(&mut q0, now, 1, 0, true);
    let ids = flush(&mut q0, now, 2);
    q0.handle_reply(0, &ok(ids[0]), 0).expect("reply");
    assert_eq!(q0.poll_completion().map(|c| c.result), Some(Ok(0)));
    assert_eq!(
        q0.stats().lost_incarnations + q1.stats().lost_incarnations,
        1
    );
}

/// Issue 21, point 3: a read whose payload was arriving at its deadline
/// is finished with its request; the connection's reset must not put
/// it back, so a node that then stalls cannot hold it forever.
#[test]
fn a_read_that_timed_out_mid_payload_is_never_sent_again() {
    let mut e = engine(1);
    let t0 = Instant::now();
    submit(&mut e, t0, 0, Op::Read, 0, 4096);
    let t = e.poll_transmit(0).expect("read piece");
    let sink = e.handle_reply(0, &ok(t.id), 4096).expect("reply");
    assert!(matches!(sink, ReplySink::Buffer { .. }));
    e.handle_timeout(t0 + Duration::from_secs(1));
    assert_eq!(e.poll_abort(), Some(0), "the receive holds the buffer");
    assert_eq!(e.poll_completion(), None, "the buffer is still in use");
    // The abort ends the receive, then the connection is reported lost.
    e.handle_payload(t.id, false);
    e.handle_connection_lost(t0 + Duration::from_secs(1), 0);
    assert_eq!(
        e.poll_completion(),
        Some(Completion {
            tag: 0,
            result: Err(EIO)
        })
    );
    e.handle_connection_restored(0);
    assert!(e.poll_transmit(0).is_none(), "nothing goes out again");
    assert!(e.is_idle());
    assert_eq!(e.poll_timeout(), None);
    // Also when the payload completes after the deadline.
    submit(&mut e, t0, 1, Op::Read, 0, 4096);
    let t = e.poll_transmit(0).expect("read piece");
    e.handle_reply(0, &ok(t.id), 4096).expect("reply");
    e.handle_timeout(t0 + Duration::from_secs(1));
    e.handle_payload(t.id, true);
    assert_eq!(e.poll_completion().map(|c| c.result), Some(Err(EIO)));
    e.handle_connection_lost(t0 + Duration::from_secs(1), 0);
    e.handle_connection_restored(0);
    assert!(e.poll_transmit(0).is_none());
}

#[test]
fn a_restart_after_a_flush_or_vouched_for_loses_nothing() {
    let mut e = engine(1);
    let now = Instant::now();
    e.handle_incarnation(0, 1, 0);
    write_acked(&mut e, now, 0, 0, false);
    let ids = flush(&mut e, now, 1);
    e.handle_reply(0, &ok(ids[0]), 0).expect("reply");
    assert_eq!(e.poll_completion().map(|c| c.result), Some(Ok(0)));
    // Restart after the flush: nothing was unflushed.
    e.handle_incarnation(0, 2, 0);
    // A write, then a restart whose store made incarnation 2 durable.
    write_acked(&mut e, now, 0, 0, false);
    e.handle_incarnation(0, 3, 2);
    // A write acknowledged after a flush was sent is not covered by it.
    let ids = flush(&mut e, now, 1);
    write_acked(&mut e, now, 0, 0, false);
    e.handle_reply(0, &ok(ids[0]), 0).expect("reply");
    assert_eq!(e.poll_completion().map(|c| c.result), Some(Ok(0)));
    e.handle_incarnation(0, 4, 0);
    let ids = flush(&mut e, now, 1);
    e.handle_reply(0, &ok(ids[0]), 0).expect("reply");
    assert_eq!(
        e.poll_completion().map(|c| c.result),
        Some(Err(EIO)),
        "the write after the flush was lost with incarnation 3"
    );
    assert_eq!(e.stats().lost_incarnations, 1);
}

#[test]
fn a_refused_node_fails_its_stripes_at_once() {
    let mut e = engine(2);
    let now = Instant::now();
    e.handle_connection_lost(now, 1);
    e.handle_node_refused(1);
    submit(&mut e, now, 0, Op::Write { fua: false }, 4096, 4096);
    assert_eq!(e.poll_completion().map(|c| c.result), Some(Err(EIO)));
    submit(&mut e, now, 0, Op::Read, 0, 4096);
    assert!(e.poll_transmit(0).is_some(), "node 0 still serves");
    e.handle_incarnation(1, 5, 0);
    assert!(!e.node_given_up(1, now));
}

//! The widest legal settings, with verified data: a queue at the engine's
//! maximum depth over one node and over many, and IOs that split into
//! hundreds of pieces. The frontend submits every tag at once and, like the
//! ublk frontend (one COMMIT_AND_FETCH per request), puts an operation of its
//! own on the queue's ring for each completed request, so the submission
//! queue fills up around the send chains.
//!
//! A send chain split across two submissions runs as two chains on one
//! socket, and once the socket is full their frames interleave: the node
//! then sees garbage (a protocol error, a dropped connection, resent
//! pieces) or, worse, applies the wrong bytes. So besides the data, the test
//! asserts that no node saw a protocol error and nothing was resent.

use std::time::Instant;

use io_uring::{opcode, squeue};
use netblk::engine::{BlockRequest, Completion, Engine, MAX_DEPTH, Op, Tag};
use netblk::frontend::{
    DeviceWide, VolumeOptions, connect_queue, engine_config, reconnect_for, spawn_queue,
};
use netblk::layout::VolumeSpec;
use netblk::uring::{BufferMode, Frontend, QueueParts, SendMode, TagBuffers, frontend_user_data};
use netblk_tests::MockNode;

/// Writes every tag's region at once, then reads every region back at once
/// and checks it.
struct AllAtOnce {
    depth: u16,
    io_size: u64,
    /// Regions start this far past a multiple of `io_size`, so requests do
    /// not line up with the stripe unit.
    skew: u64,
    phase: Phase,
    done: u16,
    /// Operations of our own to put on the ring (one per completion).
    nops: usize,
    errors: Vec<(Tag, i32)>,
    mismatches: Vec<Tag>,
    resent: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Write,
    Writing,
    Read,
    Reading,
    Done,
}

fn byte_at(volume_offset: u64) -> u8 {
    let x = volume_offset
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .rotate_left(17);
    (x >> 56) as u8 ^ (volume_offset as u8)
}

impl AllAtOnce {
    fn offset(&self, tag: Tag) -> u64 {
        u64::from(tag) * self.io_size + self.skew
    }

    fn submit_all(&mut self, engine: &mut Engine, buffers: &TagBuffers, now: Instant, op: Op) {
        for tag in 0..self.depth {
            let offset = self.offset(tag);
            if op != Op::Read {
                // SAFETY: no request is in flight on `tag`: this frontend
                // owns its buffer until it hands the tag to the engine below.
                let buf = unsafe { buffers.tag_slice(tag) };
                for (i, b) in buf[..self.io_size as usize].iter_mut().enumerate() {
                    *b = byte_at(offset + i as u64);
                }
            }
            engine
                .handle_request(
                    now,
                    BlockRequest {
                        tag,
                        op,
                        offset,
                        len: self.io_size,
                    },
                )
                .expect("free tag");
        }
        self.done = 0;
    }
}

impl Frontend for AllAtOnce {
    fn poll(&mut self, engine: &mut Engine, buffers: &TagBuffers, now: Instant) -> bool {
        match self.phase {
            Phase::Write => {
                self.submit_all(engine, buffers, now, Op::Write { fua: false });
                self.phase = Phase::Writing;
            }
            Phase::Read => {
                self.submit_all(engine, buffers, now, Op::Read);
                self.phase = Phase::Reading;
            }
            Phase::Done => {
                self.resent = engine.stats().pieces_resent;
                return false;
            }
            Phase::Writing | Phase::Reading => {}
        }
        true
    }

    fn complete(&mut self, completion: Completion, buffers: &TagBuffers) {
        let tag = completion.tag;
        self.nops += 1;
        match completion.result {
            Ok(n) => assert_eq!(n, self.io_size),
            Err(errno) => self.errors.push((tag, errno)),
        }
        if self.phase == Phase::Reading && completion.result.is_ok() {
            let offset = self.offset(tag);
            // SAFETY: the request on `tag` completed: its buffer is ours.
            let buf = unsafe { buffers.tag_slice(tag) };
            let right = buf[..self.io_size as usize]
                .iter()
                .enumerate()
                .all(|(i, b)| *b == byte_at(offset + i as u64));
            if !right {
                self.mismatches.push(tag);
            }
        }
        self.done += 1;
        if self.done == self.depth {
            self.phase = match self.phase {
                Phase::Writing => Phase::Read,
                _ => Phase::Done,
            };
        }
    }

    fn fail(&mut self, tags: &[Tag]) {
        panic!("queue failed with {} tags in flight", tags.len());
    }

    fn take_sqes(&mut self, out: &mut Vec<squeue::Entry>) {
        for _ in 0..std::mem::take(&mut self.nops) {
            out.push(opcode::Nop::new().build().user_data(frontend_user_data(0)));
        }
    }
}

fn run(nodes: usize, depth: u16, io_size: u64, stripe_unit: u32, mode: SendMode) {
    let nodes: Vec<MockNode> = (0..nodes)
        .map(|_| MockNode::start(&["--store", "memory"]))
        .collect();
    let skew = 512;
    let spec = VolumeSpec {
        replicas: 1,
        name: format!("deep-{}-{depth}-{io_size}", nodes.len()),
        size: (u64::from(depth) + 1) * io_size,
        stripe_unit,
        nodes: nodes.iter().map(|n| n.addr).collect(),
    };
    let layout = spec.layout().expect("layout");
    let options = VolumeOptions {
        depth,
        max_io: io_size as u32,
        send_mode: mode,
        ..VolumeOptions::default()
    };
    let (streams, _) = connect_queue(&spec, &layout, &options).expect("connect");
    let buffers = std::sync::Arc::new(TagBuffers::new(depth, io_size as u32).expect("buffers"));
    let frontend = AllAtOnce {
        depth,
        io_size,
        skew,
        phase: Phase::Write,
        done: 0,
        nops: 0,
        errors: Vec::new(),
        mismatches: Vec::new(),
        resent: 0,
    };
    let thread = spawn_queue(
        "deep".into(),
        QueueParts {
            engine: Engine::new(layout, engine_config(&options)),
            streams,
            buffers,
            frontend,
            mode,
            buffer_mode: BufferMode::User,
            reconnect: Some(reconnect_for(
                &spec,
                &layout,
                &options,
                &DeviceWide::new(&layout, &options),
            )),
            span: tracing::Span::none(),
        },
    )
    .expect("queue");
    let (frontend, result) = thread.join().expect("queue thread");
    result.expect("queue ran");
    let frontend = frontend.expect("frontend back");
    assert_eq!(frontend.phase, Phase::Done);
    assert!(frontend.errors.is_empty(), "errors: {:?}", &frontend.errors);
    assert!(
        frontend.mismatches.is_empty(),
        "{} of {depth} regions read back wrong, first tags {:?}",
        frontend.mismatches.len(),
        &frontend.mismatches[..frontend.mismatches.len().min(8)]
    );
    for (i, node) in nodes.iter().enumerate() {
        let stats = node.admin().stats();
        assert_eq!(stats.protocol_errors, 0, "node {i} saw garbage");
    }
    assert_eq!(frontend.resent, 0, "pieces were resent");
}

#[test]
fn maximum_depth_one_node() {
    run(1, MAX_DEPTH, 16 << 10, 4096, SendMode::ZeroCopy);
}

#[test]
fn maximum_depth_many_nodes() {
    run(12, MAX_DEPTH, 64 << 10, 4096, SendMode::Copy);
}

#[test]
fn large_ios_split_into_hundreds_of_pieces() {
    run(3, 128, 1 << 20, 4096, SendMode::ZeroCopy);
}

use super::*;

fn spec(size: u64, stripe_unit: u32, nodes: u16) -> VolumeSpec {
    VolumeSpec {
        name: "v".into(),
        size,
        stripe_unit,
        nodes: (1..=nodes)
            .map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], p)))
            .collect(),
        replicas: 1,
    }
}

fn options(change: impl FnOnce(&mut MapOptions)) -> MapOptions {
    let mut options = MapOptions {
        volume: VolumeOptions::default(),
        block_size: 512,
        zero_copy: ZeroCopy::Auto,
        fail_queue: None,
    };
    change(&mut options);
    options
}

type Change<'a> = &'a dyn Fn(&mut MapOptions);

#[test]
fn every_number_is_checked_before_anything_starts() {
    let good = spec(1 << 30, 128 << 10, 3);
    assert!(check(&good, &options(|_| {})).is_ok());
    // The bounds themselves are fine.
    assert!(
        check(
            &spec(1 << 60, 4 << 20, 1024),
            &options(|o| {
                o.block_size = 4096;
                o.volume.queues = 64;
                o.volume.depth = 4096;
                o.volume.io_timeout = Duration::from_secs(3600);
                o.volume.node_down_timeout = Duration::from_secs(1);
            })
        )
        .is_ok()
    );
    let secs = Duration::from_secs;
    let bad_options: [(Change, &str); 13] = [
        (
            &|o| o.block_size = 1024,
            "block size 1024 must be 512 or 4096",
        ),
        (&|o| o.block_size = u32::MAX, "must be 512 or 4096"),
        (&|o| o.volume.queues = 0, "queues 0 must be from 1 to 64"),
        (&|o| o.volume.queues = 65, "queues 65 must be from 1 to 64"),
        (&|o| o.volume.queues = usize::MAX, "must be from 1 to 64"),
        (&|o| o.volume.depth = 0, "depth 0 must be from 1 to 4096"),
        (
            &|o| o.volume.depth = u16::MAX,
            "depth 65535 must be from 1 to 4096",
        ),
        (
            &|o| o.volume.io_timeout = secs(0),
            "io timeout 0 s must be from 1 to 3600 seconds",
        ),
        (&|o| o.volume.io_timeout = secs(3601), "io timeout 3601 s"),
        (
            &|o| o.volume.io_timeout = secs(u64::MAX),
            "io timeout 18446744073709551615 s",
        ),
        (
            &|o| o.volume.node_down_timeout = secs(0),
            "node-down timeout 0 s must be from 1 to 3600 seconds",
        ),
        (
            &|o| o.volume.node_down_timeout = Duration::MAX,
            "node-down timeout",
        ),
        (
            &|o| {
                o.volume.data_digest = true;
                o.zero_copy = ZeroCopy::On;
            },
            "data digests need the copy data path",
        ),
    ];
    for (change, says) in bad_options {
        let err = check(&good, &options(change)).expect_err(says).to_string();
        assert!(err.contains(says), "{err}");
    }
    let bad_specs = [
        (
            spec(0, 128 << 10, 3),
            "volume size 0 must be a non-zero multiple of 512",
        ),
        (spec(1000, 128 << 10, 3), "volume size 1000"),
        (spec(u64::MAX, 128 << 10, 3), "at most 1152921504606846976"),
        (spec((1 << 60) + 512, 128 << 10, 3), "at most"),
        (
            spec(1 << 30, 3 << 10, 3),
            "stripe unit 3072 must be a power of two",
        ),
        (spec(1 << 30, 8 << 20, 3), "stripe unit 8388608"),
        (spec(1 << 30, u32::MAX, 3), "stripe unit 4294967295"),
        (spec(1 << 30, 128 << 10, 0), "at least one node"),
        (
            spec(1 << 30, 128 << 10, 1025),
            "node count 1025 must be from 1 to 1024",
        ),
    ];
    for (spec, says) in bad_specs {
        let err = check(&spec, &options(|_| {})).expect_err(says).to_string();
        assert!(err.contains(says), "{err}");
    }
    let err = check(
        &spec((1 << 20) + 512, 128 << 10, 3),
        &options(|o| o.block_size = 4096),
    )
    .expect_err("unaligned")
    .to_string();
    assert!(
        err.contains("not a multiple of the block size 4096"),
        "{err}"
    );
}

/// A scripted kernel and node side of a recovery, logging each step.
struct Script {
    /// The device states the kernel reports, in turn; the last repeats.
    states: std::collections::VecDeque<u16>,
    /// START results (errno, 0 for success), in turn; the last repeats.
    starts: std::collections::VecDeque<i32>,
    /// How many pauses pass before one is interrupted.
    pauses_left: usize,
    log: Vec<String>,
}

impl Script {
    fn new(states: &[u16], starts: &[i32]) -> Script {
        Script {
            states: states.iter().copied().collect(),
            starts: starts.iter().copied().collect(),
            pauses_left: usize::MAX,
            log: Vec::new(),
        }
    }

    fn next<T: Copy>(queue: &mut std::collections::VecDeque<T>) -> T {
        if queue.len() > 1 {
            queue.pop_front().expect("scripted")
        } else {
            *queue.front().expect("scripted")
        }
    }

    fn count(&self, step: &str) -> usize {
        self.log.iter().filter(|s| *s == step).count()
    }
}

impl RecoverySteps for Script {
    fn state(&mut self) -> Result<u16, MapError> {
        self.log.push("state".into());
        Ok(Script::next(&mut self.states))
    }
    fn pause(&mut self) -> bool {
        self.log.push("pause".into());
        if self.pauses_left == 0 {
            return false;
        }
        self.pauses_left -= 1;
        true
    }
    fn waiting(&mut self, state: &str) {
        self.log.push(format!("waiting {state}"));
    }
    fn connect(&mut self) -> Result<(), MapError> {
        self.log.push("connect".into());
        Ok(())
    }
    fn start(&mut self) -> Result<(), CtrlError> {
        self.log.push("start".into());
        match Script::next(&mut self.starts) {
            0 => Ok(()),
            errno => Err(CtrlError::Command {
                what: "START_USER_RECOVERY",
                err: io::Error::from_raw_os_error(errno),
            }),
        }
    }
    fn bring_up(&mut self) -> Result<(), MapError> {
        self.log.push("bring_up".into());
        Ok(())
    }
}

const LIVE: u16 = sys::UBLK_S_DEV_LIVE;
const QUIESCED: u16 = sys::UBLK_S_DEV_QUIESCED;

#[test]
fn what_the_device_state_says_about_a_takeover() {
    assert_eq!(takeover(sys::UBLK_S_DEV_LIVE), Takeover::Wait);
    assert_eq!(takeover(sys::UBLK_S_DEV_QUIESCED), Takeover::Go);
    assert_eq!(takeover(sys::UBLK_S_DEV_FAIL_IO), Takeover::Go);
    assert_eq!(takeover(sys::UBLK_S_DEV_DEAD), Takeover::Refuse);
    assert_eq!(takeover(9), Takeover::Refuse);
    assert_eq!(state_name(LIVE), "LIVE");
    assert_eq!(state_name(9), "in unknown state 9");
}

#[test]
fn no_node_is_touched_while_the_kernel_still_counts_the_old_daemon() {
    // A live daemon the pid check missed: the device stays LIVE.
    let mut script = Script::new(&[LIVE], &[0]);
    let err = run_recovery(&mut script, 3, 5).expect_err("never let go");
    let text = err.to_string();
    assert!(matches!(err, MapError::DaemonNotGone { .. }), "{text}");
    assert!(
        text.contains("/dev/ublkb3 is still LIVE after 90 s"),
        "{text}"
    );
    assert!(text.contains("nothing was touched"), "{text}");
    assert_eq!(script.count("state"), 5, "bounded: {:?}", script.log);
    assert_eq!(script.count("connect"), 0, "{:?}", script.log);
    assert_eq!(script.count("start"), 0, "{:?}", script.log);
    assert_eq!(script.count("bring_up"), 0, "{:?}", script.log);
}

#[test]
fn recovery_waits_for_the_kernel_then_connects_then_starts() {
    let mut script = Script::new(&[LIVE, LIVE, QUIESCED], &[0]);
    run_recovery(&mut script, 0, 100).expect("recovered");
    assert_eq!(
        script.log,
        [
            "state",
            "waiting LIVE",
            "pause",
            "state",
            "pause",
            "state",
            "connect",
            "start",
            "bring_up"
        ]
    );
    // FAIL_IO is a daemon gone too (devices made with that flag).
    let mut script = Script::new(&[sys::UBLK_S_DEV_FAIL_IO], &[0]);
    run_recovery(&mut script, 0, 100).expect("recovered");
    assert_eq!(script.log, ["state", "connect", "start", "bring_up"]);
}

#[test]
fn start_is_retried_while_busy_and_only_after_the_nodes_answered() {
    let busy = libc::EBUSY;
    let mut script = Script::new(&[QUIESCED], &[busy, busy, 0]);
    run_recovery(&mut script, 0, 100).expect("recovered");
    assert_eq!(
        script.log,
        [
            "state", "connect", "start", "pause", "start", "pause", "start", "bring_up"
        ]
    );
    // Still busy at the bound: an error naming the device's state, and
    // the queues are never brought up.
    let mut script = Script::new(&[QUIESCED], &[busy]);
    let err = run_recovery(&mut script, 4, 3).expect_err("busy");
    let text = err.to_string();
    assert!(matches!(err, MapError::Busy { .. }), "{text}");
    assert!(text.contains("/dev/ublkb4 (QUIESCED)"), "{text}");
    assert!(text.contains("/dev/ublkc4 is still open"), "{text}");
    assert_eq!(script.count("start"), 3);
    assert_eq!(script.count("bring_up"), 0);
}

#[test]
fn a_refused_start_is_not_retried() {
    let mut script = Script::new(&[QUIESCED], &[libc::EINVAL, 0]);
    let err = run_recovery(&mut script, 2, 100).expect_err("refused");
    let text = err.to_string();
    assert!(matches!(err, MapError::StartRefused { .. }), "{text}");
    assert!(text.contains("6.12"), "{text}");
    assert_eq!(script.count("start"), 1, "a second START: {:?}", script.log);
    assert_eq!(script.count("bring_up"), 0);
}

#[test]
fn a_stopped_or_unknown_device_is_refused_at_once() {
    for (state, says) in [
        (sys::UBLK_S_DEV_DEAD, "/dev/ublkb1 is DEAD"),
        (9, "/dev/ublkb1 is in unknown state 9"),
    ] {
        let mut script = Script::new(&[state], &[0]);
        let err = run_recovery(&mut script, 1, 100).expect_err("refused");
        let text = err.to_string();
        assert!(matches!(err, MapError::CannotRecover { .. }), "{text}");
        assert!(text.contains(says), "{text}");
        assert!(text.contains("unmap it"), "{text}");
        assert_eq!(script.log, ["state"], "no wait, nothing touched");
    }
}

#[test]
fn an_interrupted_wait_touches_nothing() {
    let mut script = Script::new(&[LIVE], &[0]);
    script.pauses_left = 2;
    let err = run_recovery(&mut script, 5, 100).expect_err("interrupted");
    assert!(matches!(err, MapError::Interrupted { dev_id: 5 }), "{err}");
    assert_eq!(script.count("state"), 3);
    assert_eq!(script.count("connect"), 0);
    assert_eq!(script.count("start"), 0);
}

type Outcome = std::thread::Result<(Option<String>, io::Result<()>)>;

#[test]
fn how_a_queue_thread_ended() {
    let panicked: Outcome = std::thread::spawn(|| -> (Option<String>, io::Result<()>) {
        panic!("ring broke at {}", 7)
    })
    .join();
    let end = QueueEnd::classify(1, panicked);
    assert_eq!(end.to_string(), "queue 1 panicked: ring broke at 7");
    let panicked: Outcome = Err(Box::new("plain"));
    assert!(matches!(QueueEnd::classify(0, panicked).how, Ended::Panicked(m) if m == "plain"));
    let failed: Outcome = Ok((None, Err(io::Error::other("io_uring_enter: EBADF"))));
    assert_eq!(
        QueueEnd::classify(2, failed).to_string(),
        "queue 2 failed: io_uring_enter: EBADF"
    );
    // The queue gave up by itself (a ublk command failed, or the test
    // hook): the driver ended cleanly, the queue says why.
    let gave_up: Outcome = Ok((Some("it was made to fail".into()), Ok(())));
    assert_eq!(
        QueueEnd::classify(0, gave_up).to_string(),
        "queue 0 failed: it was made to fail"
    );
    let aborted: Outcome = Ok((None, Ok(())));
    let end = QueueEnd::classify(3, aborted);
    assert!(matches!(end.how, Ended::Aborted));
    assert!(
        end.to_string().contains("aborted its ublk commands"),
        "{end}"
    );
}

#[test]
fn an_ended_queue_makes_the_daemon_leave_the_device_for_recovery() {
    let end = |queue, how| QueueEnd { queue, how };
    assert_eq!(supervise(false, &[]), Supervision::Serve);
    assert_eq!(supervise(true, &[]), Supervision::Stop);
    // A stop asked for wins: the device goes anyway.
    assert_eq!(
        supervise(true, &[end(0, Ended::Aborted)]),
        Supervision::Stop
    );
    // Any queue that ends by itself, even cleanly, means the device no
    // longer serves through it.
    assert_eq!(
        supervise(false, &[end(0, Ended::Aborted)]),
        Supervision::Abandon(end(0, Ended::Aborted).to_string())
    );
    // The queue that failed is named before one that was aborted.
    let ended = [
        end(0, Ended::Aborted),
        end(2, Ended::Failed("ring: EIO".into())),
        end(1, Ended::Panicked("boom".into())),
    ];
    let Supervision::Abandon(why) = supervise(false, &ended) else {
        panic!("not abandoned");
    };
    assert!(
        why.starts_with("queue 1 panicked: boom; queue 2 failed: ring: EIO; queue 0 ended"),
        "{why}"
    );
}

#[test]
fn the_test_hook_is_parsed_and_checked() {
    assert_eq!(
        FailQueue::parse("1:500"),
        Ok(FailQueue {
            queue: 1,
            after: Duration::from_millis(500)
        })
    );
    assert_eq!(
        FailQueue::parse(" 0 : 0 ").map(|h| h.after),
        Ok(Duration::ZERO)
    );
    for bad in [
        "", "1", ":5", "1:", "x:1", "1:-5", "-1:5", "70000:1", "1:1.5",
    ] {
        let err = FailQueue::parse(bad).expect_err(bad);
        assert!(err.contains("is not <queue>:<millis>"), "{bad}: {err}");
    }
    let err = FailQueue::parse("1:3600001").expect_err("too long");
    assert!(err.contains("at most 3600000 ms"), "{err}");
    // The queue must exist; checked with every other option.
    let hooked = |queue| {
        options(|o| {
            o.volume.queues = 2;
            o.fail_queue = Some(FailQueue {
                queue,
                after: Duration::ZERO,
            });
        })
    };
    assert!(hooked(1).check().is_ok());
    let err = hooked(2).check().expect_err("no queue 2").to_string();
    assert_eq!(
        err,
        "NETBLK_TEST_FAIL_QUEUE: queue 2 does not exist: the device has 2 queue(s)"
    );
}

#[test]
fn the_data_path_follows_the_kernel() {
    let zc = sys::UBLK_F_AUTO_BUF_REG | sys::UBLK_F_SUPPORT_ZERO_COPY;
    assert_eq!(
        choose_path(0x1fe, false, ZeroCopy::Auto).ok(),
        Some(DataPath::Copy)
    );
    assert_eq!(
        choose_path(zc, false, ZeroCopy::Auto).ok(),
        Some(DataPath::PartialZeroCopy)
    );
    assert_eq!(
        choose_path(zc, true, ZeroCopy::Auto).ok(),
        Some(DataPath::FullZeroCopy)
    );
    assert_eq!(
        choose_path(zc, true, ZeroCopy::Off).ok(),
        Some(DataPath::Copy)
    );
    assert!(matches!(
        choose_path(0x1fe, true, ZeroCopy::On),
        Err(MapError::NoZeroCopy)
    ));
}

/// A raw-device database opens without `O_EXCL`: no claim, but in use
/// all the same. (A regular file stands in for the device here: the
/// exclusive open it is also tried with succeeds on it.)
#[test]
fn a_device_a_process_holds_open_is_in_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("disk");
    std::fs::write(&path, b"data").expect("write");
    let path = path.to_str().expect("utf-8 path");
    assert_eq!(block_in_use(path), None, "nobody holds it");
    let held = std::fs::File::open(path).expect("open");
    let why = block_in_use(path).expect("held open by this process");
    assert!(
        why.contains(&format!("pid {} (", std::process::id())),
        "{why}"
    );
    drop(held);
    assert_eq!(block_in_use(path), None, "closed again");
}

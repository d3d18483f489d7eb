//! A striped volume served as `/dev/ublkbN`: connect every queue to every
//! node, add and configure the device, start one queue thread per hardware
//! queue, start the device, and tear it all down again. Also: taking over a
//! device whose daemon died ([`recover`]), and what the daemon does when one
//! of its queues ends while it serves ([`supervise`]).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use super::ctrl::{Control, CtrlError};
use super::queue::{FailSwitch, UblkQueue};
use super::sys::{self, DevInfo, ParamBasic, ParamDiscard, Params};
use crate::frontend::{
    ConnectedQueue, DeviceWide, OpenError, QueueThread, VolumeOptions, connect_queues,
    queue_engine, queue_span, reconnect_for, spawn_queue,
};
use crate::layout::{Layout, LiveSize, VolumeSpec};
use crate::stats::QueueStats;
use crate::uring::{BufferMode, QueueParts, SendMode, TagBuffers};

/// Why a device could not be served.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Ctrl(#[from] CtrlError),
    #[error("block size {0} must be 512 or 4096")]
    BlockSize(u32),
    #[error("volume size {size} is not a multiple of the block size {block}")]
    Unaligned { size: u64, block: u32 },
    #[error("ublk queue: {0}")]
    Queue(io::Error),
    #[error(
        "/dev/ublkb{0} was created without UBLK_F_USER_RECOVERY (this kernel lacks it?): it cannot be recovered; unmap it"
    )]
    NotRecoverable(u32),
    #[error("the device does not match its record: {0}")]
    Mismatch(String),
    #[error(
        "/dev/ublkb{dev_id} is still {state} after {secs} s: the kernel has not let go of its daemon, which may still be serving it (in another pid namespace?); nothing was touched"
    )]
    DaemonNotGone {
        dev_id: u32,
        state: String,
        secs: u64,
    },
    #[error(
        "/dev/ublkb{dev_id} is {state} (never started, or stopped): it cannot be recovered; unmap it"
    )]
    CannotRecover { dev_id: u32, state: String },
    #[error(
        "interrupted while waiting for the kernel to let go of the daemon of /dev/ublkb{dev_id}; nothing was started"
    )]
    Interrupted { dev_id: u32 },
    #[error(
        "/dev/ublkb{dev_id} ({state}): START_USER_RECOVERY still says EBUSY after {secs} s: /dev/ublkc{dev_id} is still open (the old daemon's last threads, or a process that inherited the descriptor?)"
    )]
    Busy {
        dev_id: u32,
        state: String,
        secs: u64,
    },
    #[error(
        "/dev/ublkb{dev_id}: the kernel refused START_USER_RECOVERY: {err} (on Linux 6.12 a recovery that failed after this step leaves the device unrecoverable: unmap it)"
    )]
    StartRefused { dev_id: u32, err: io::Error },
    #[error("{FAIL_QUEUE_ENV}: {0}")]
    TestHook(String),
    #[error(
        "zero copy needs ublk with UBLK_F_AUTO_BUF_REG (Linux 6.16 or newer); this kernel has none: use --zero-copy auto or off"
    )]
    NoZeroCopy,
    #[error(
        "data digests need the copy data path (under zero copy the request's pages are not mapped in userspace, so no digest can be computed or checked): use --zero-copy auto or off with --data-digest"
    )]
    DigestNeedsCopy,
    #[error(
        "TLS needs the copy data path (the kernel's TLS takes neither zero-copy sends nor fixed-buffer receives): use --zero-copy auto or off with TLS"
    )]
    TlsNeedsCopy,
}

/// Whether to move data zero-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroCopy {
    /// The best this kernel can do.
    Auto,
    /// Zero copy or fail.
    On,
    /// Copy mode.
    Off,
}

/// The data path chosen for a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    /// ublk copies between the request and our buffers.
    Copy,
    /// Request pages registered in the ring; writes leave with SEND_ZC from
    /// them; reads are received with READ_FIXED into them.
    PartialZeroCopy,
    /// As partial, and reads are received with RECV into the fixed buffer.
    FullZeroCopy,
}

impl DataPath {
    pub fn name(self) -> &'static str {
        match self {
            DataPath::Copy => "copy",
            DataPath::PartialZeroCopy => "partial zero copy",
            DataPath::FullZeroCopy => "full zero copy",
        }
    }
}

/// What the kernel offers, and what that means for the data path.
pub fn choose_path(features: u64, recv_fixed: bool, want: ZeroCopy) -> Result<DataPath, MapError> {
    let auto_buf_reg =
        features & sys::UBLK_F_AUTO_BUF_REG != 0 && features & sys::UBLK_F_SUPPORT_ZERO_COPY != 0;
    match (want, auto_buf_reg) {
        (ZeroCopy::Off, _) | (ZeroCopy::Auto, false) => Ok(DataPath::Copy),
        (ZeroCopy::On, false) => Err(MapError::NoZeroCopy),
        (_, true) if recv_fixed => Ok(DataPath::FullZeroCopy),
        (_, true) => Ok(DataPath::PartialZeroCopy),
    }
}

/// How a device is made.
#[derive(Debug, Clone)]
pub struct MapOptions {
    pub volume: VolumeOptions,
    /// Logical block size: 512 or 4096.
    pub block_size: u32,
    pub zero_copy: ZeroCopy,
    /// Test hook only: see [`FailQueue`]. `None` outside tests.
    pub fail_queue: Option<FailQueue>,
}

impl MapOptions {
    /// Checks every number of the options against its bounds (the volume
    /// options' own, the block size, and the test hook's queue).
    pub fn check(&self) -> Result<(), MapError> {
        if self.block_size != 512 && self.block_size != 4096 {
            return Err(MapError::BlockSize(self.block_size));
        }
        self.volume.check()?;
        if self.volume.data_digest && self.zero_copy == ZeroCopy::On {
            return Err(MapError::DigestNeedsCopy);
        }
        if self.volume.tls.is_some() && self.zero_copy == ZeroCopy::On {
            return Err(MapError::TlsNeedsCopy);
        }
        if let Some(hook) = self.fail_queue
            && usize::from(hook.queue) >= self.volume.queues
        {
            return Err(MapError::TestHook(format!(
                "queue {} does not exist: the device has {} queue(s)",
                hook.queue, self.volume.queues
            )));
        }
        Ok(())
    }
}

/// The environment variable of the test hook that makes a queue fail
/// (for the VM scenario; see [`FailQueue`]).
pub const FAIL_QUEUE_ENV: &str = "NETBLK_TEST_FAIL_QUEUE";

/// Longest delay of the test hook: one hour.
const FAIL_QUEUE_MAX_MILLIS: u64 = 3_600_000;

/// Test hook only: `NETBLK_TEST_FAIL_QUEUE=<queue>:<millis>`, read once when
/// `netblk map` starts, makes queue `<queue>` fail `<millis>` ms after the
/// device is served, as if its ring had broken, so that a test can see the
/// daemon exit and the device wait for `map --recover`. The timer runs in
/// the daemon's supervisor, which pulls the queue's [`FailSwitch`]; the
/// queue's data path is not touched unless the hook is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailQueue {
    pub queue: u16,
    pub after: Duration,
}

impl FailQueue {
    /// Parses `<queue>:<millis>`.
    pub fn parse(text: &str) -> Result<FailQueue, String> {
        let bad = || format!("'{text}' is not <queue>:<millis>");
        let (queue, millis) = text.split_once(':').ok_or_else(bad)?;
        let queue: u16 = queue.trim().parse().map_err(|_| bad())?;
        let millis: u64 = millis.trim().parse().map_err(|_| bad())?;
        if millis > FAIL_QUEUE_MAX_MILLIS {
            return Err(format!(
                "delay {millis} ms must be at most {FAIL_QUEUE_MAX_MILLIS} ms"
            ));
        }
        Ok(FailQueue {
            queue,
            after: Duration::from_millis(millis),
        })
    }

    /// The hook as the environment sets it (`None`: not set).
    pub fn from_env() -> Result<Option<FailQueue>, MapError> {
        match std::env::var_os(FAIL_QUEUE_ENV) {
            None => Ok(None),
            Some(value) => {
                let text = value
                    .to_str()
                    .ok_or_else(|| MapError::TestHook("not UTF-8".into()))?;
                FailQueue::parse(text).map(Some).map_err(MapError::TestHook)
            }
        }
    }
}

/// Checks a volume and how it is to be mapped before anything is touched:
/// the volume's name, nodes and geometry, the options, and that the volume
/// is whole blocks. Returns the volume's layout.
pub fn check(spec: &VolumeSpec, options: &MapOptions) -> Result<Layout, MapError> {
    let layout = spec.layout().map_err(OpenError::from)?;
    options.check()?;
    crate::frontend::check_volume_ids(&options.volume.volume_ids, spec.nodes.len())
        .map_err(OpenError::Options)?;
    if !spec.size.is_multiple_of(u64::from(options.block_size)) {
        return Err(MapError::Unaligned {
            size: spec.size,
            block: options.block_size,
        });
    }
    Ok(layout)
}

/// A started device; [`Device::stop`] takes it down. Dropping it instead
/// leaves the device to the kernel: once this process is gone, it is
/// quiesced (`UBLK_F_USER_RECOVERY`) until `map --recover`.
pub struct Device {
    pub dev_id: u32,
    pub path: DataPath,
    /// The volume identity of each node, as pinned at the first connect.
    pub volume_ids: Vec<String>,
    /// What each queue measured.
    pub figures: Vec<Arc<QueueStats>>,
    /// The volume's size, shared by every queue (see [`Device::resize`]).
    pub size: LiveSize,
    /// The durability ledger and fencing epochs its queues share.
    pub wide: DeviceWide,
    ctrl: Control,
    /// The running queue threads, by queue index.
    queues: Vec<(usize, QueueThread<UblkQueue>)>,
    /// The test hook's switch, on the queue it names.
    fail_switch: Option<Arc<FailSwitch>>,
}

impl Device {
    pub fn block_path(&self) -> String {
        format!("/dev/ublkb{}", self.dev_id)
    }

    /// Stops the device (in-flight requests are finished by the queues),
    /// waits for the queue threads, and deletes the device.
    pub fn stop(mut self) -> Result<(), MapError> {
        let stopped = self.ctrl.stop(self.dev_id);
        let mut queue_error = None;
        for (queue, thread) in self.queues.drain(..) {
            match thread.join() {
                Ok((_, Ok(()))) => {}
                Ok((_, Err(err))) => {
                    queue_error = Some(io::Error::new(err.kind(), format!("queue {queue}: {err}")));
                }
                Err(_) => queue_error = Some(io::Error::other(format!("queue {queue} panicked"))),
            }
        }
        self.ctrl.delete(self.dev_id)?;
        stopped?;
        match queue_error {
            Some(err) => Err(MapError::Queue(err)),
            None => Ok(()),
        }
    }

    /// Joins every queue thread that has ended, and says how each ended.
    /// While the device serves, none should have.
    pub fn ended_queues(&mut self) -> Vec<QueueEnd> {
        let (ended, running): (Vec<_>, Vec<_>) = std::mem::take(&mut self.queues)
            .into_iter()
            .partition(|(_, thread)| thread.is_finished());
        self.queues = running;
        ended
            .into_iter()
            .map(|(queue, thread)| QueueEnd::joined(queue, thread.join()))
            .collect()
    }

    /// Test hook: makes the queue named by [`MapOptions::fail_queue`] fail
    /// now. Nothing happens without the hook.
    pub fn fail_queue_now(&self) {
        if let Some(switch) = &self.fail_switch {
            switch.pull();
        }
    }
}

/// How a queue thread ended.
#[derive(Debug)]
pub enum Ended {
    /// Its thread panicked (with this message).
    Panicked(String),
    /// Its ring or driver failed, or the queue gave up (why).
    Failed(String),
    /// It ended without an error: the kernel aborted its commands, as it
    /// does when the device is stopped.
    Aborted,
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Panicked(why) => write!(f, "panicked: {why}"),
            Ended::Failed(why) => write!(f, "failed: {why}"),
            Ended::Aborted => f.write_str(
                "ended: the kernel aborted its ublk commands (the device was stopped from outside, or another queue failed)",
            ),
        }
    }
}

/// One queue thread that ended, and how.
#[derive(Debug)]
pub struct QueueEnd {
    pub queue: usize,
    pub how: Ended,
}

impl std::fmt::Display for QueueEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "queue {} {}", self.queue, self.how)
    }
}

impl QueueEnd {
    /// From what joining the queue's thread gave back.
    fn joined(
        queue: usize,
        joined: std::thread::Result<(Option<UblkQueue>, io::Result<()>)>,
    ) -> QueueEnd {
        QueueEnd::classify(
            queue,
            joined.map(|(frontend, result)| {
                (
                    frontend.and_then(|q| q.failure().map(str::to_owned)),
                    result,
                )
            }),
        )
    }

    /// How a queue ended, from its thread's outcome: a panic (with its
    /// payload), or the queue's own account of why it gave up (if it did)
    /// and the driver's result.
    pub fn classify(
        queue: usize,
        outcome: std::thread::Result<(Option<String>, io::Result<()>)>,
    ) -> QueueEnd {
        let how = match outcome {
            Err(payload) => Ended::Panicked(
                payload
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".into()),
            ),
            Ok((_, Err(err))) => Ended::Failed(err.to_string()),
            Ok((Some(why), Ok(()))) => Ended::Failed(why),
            Ok((None, Ok(()))) => Ended::Aborted,
        };
        QueueEnd { queue, how }
    }
}

/// What the daemon does next while it serves.
#[derive(Debug, PartialEq, Eq)]
pub enum Supervision {
    /// Go on serving.
    Serve,
    /// Stop and delete the device, as asked (SIGINT/SIGTERM).
    Stop,
    /// A queue ended by itself: the device serves nothing through it any
    /// more. Exit with this error, leaving the device as it is (not stopped,
    /// not deleted): once the daemon is gone the kernel quiesces it, and
    /// `map --recover` takes over.
    Abandon(String),
}

/// The supervisor's decision, from whether a stop was asked for and which
/// queues have ended. A stop asked for wins: the device is going anyway.
/// Queues that failed are named before queues that were merely aborted
/// (the kernel aborts the others' commands when one queue's ring dies).
pub fn supervise(stop_requested: bool, ended: &[QueueEnd]) -> Supervision {
    if stop_requested {
        return Supervision::Stop;
    }
    if ended.is_empty() {
        return Supervision::Serve;
    }
    let mut ordered: Vec<&QueueEnd> = ended.iter().collect();
    ordered.sort_by_key(|e| (matches!(e.how, Ended::Aborted), e.queue));
    let named: Vec<String> = ordered.iter().map(ToString::to_string).collect();
    Supervision::Abandon(named.join("; "))
}

fn params(size: u64, block_size: u32, max_io: u32) -> Params {
    let shift = block_size.trailing_zeros() as u8;
    Params {
        len: std::mem::offset_of!(Params, devt) as u32,
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic: ParamBasic {
            // A volatile cache and FUA: the kernel sends FLUSH and FUA writes.
            attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
            logical_bs_shift: shift,
            physical_bs_shift: shift.max(12),
            io_opt_shift: 12,
            io_min_shift: shift,
            max_sectors: max_io >> 9,
            dev_sectors: size >> 9,
            ..ParamBasic::default()
        },
        discard: ParamDiscard {
            discard_granularity: block_size.max(4096),
            max_discard_sectors: 1 << 21,
            max_write_zeroes_sectors: 1 << 21,
            max_discard_segments: 1,
            ..ParamDiscard::default()
        },
        ..Params::default()
    }
}

/// The buffer and send modes of a data path, and the device flags it needs.
/// `user_copy`: the kernel has `UBLK_F_USER_COPY` (or, recovering, the
/// device was made with it): zero-copy devices get it too, so small write
/// payloads can be copied out and gathered with the heads.
fn path_setup(
    path: DataPath,
    send: SendMode,
    user_copy: bool,
) -> Result<(BufferMode, SendMode, u64), MapError> {
    Ok(match path {
        DataPath::Copy => (BufferMode::User, send, 0),
        DataPath::PartialZeroCopy | DataPath::FullZeroCopy => {
            crate::uring::probe(SendMode::ZeroCopy).map_err(OpenError::Uring)?;
            (
                BufferMode::Kernel {
                    recv_fixed: path == DataPath::FullZeroCopy,
                    user_copy,
                },
                // Request pages have no user address: SEND_ZC sends them
                // (or user copy brings small payloads out).
                SendMode::ZeroCopy,
                sys::UBLK_F_SUPPORT_ZERO_COPY
                    | sys::UBLK_F_AUTO_BUF_REG
                    | if user_copy { sys::UBLK_F_USER_COPY } else { 0 },
            )
        }
    })
}

/// Every queue connected to every node (in queue order), and what each
/// node said; pins the nodes' volume identities in `vopts` unless it has.
fn connect_all(
    spec: &VolumeSpec,
    layout: &Layout,
    vopts: &mut VolumeOptions,
) -> Result<Vec<ConnectedQueue>, MapError> {
    Ok(connect_queues(spec, layout, vopts)?)
}

/// What each queue is started with: its node connections and its tag
/// buffers (in queue order).
type QueueMakings = (Vec<ConnectedQueue>, Vec<Arc<TagBuffers>>);

/// Every queue's tag buffers (in queue order): made before the device is
/// touched, so that running out of memory fails early.
fn tag_buffers(vopts: &VolumeOptions) -> Result<Vec<Arc<TagBuffers>>, MapError> {
    (0..vopts.queues)
        .map(|_| {
            TagBuffers::new(vopts.depth, vopts.max_io)
                .map(Arc::new)
                .map_err(MapError::Queue)
        })
        .collect()
}

/// Opens the char device and starts one queue thread per hardware queue;
/// their FETCH commands go out at once. The test hook's switch, if set, is
/// armed on the queue it names.
fn start_queues(
    device: &mut Device,
    spec: &VolumeSpec,
    layout: &Layout,
    options: &MapOptions,
    vopts: &VolumeOptions,
    (connected, buffers): QueueMakings,
    (buffer_mode, send_mode): (BufferMode, SendMode),
) -> Result<(), MapError> {
    let dev_id = device.dev_id;
    let cdev = UblkQueue::open_cdev(dev_id).map_err(MapError::Queue)?;
    device.volume_ids = vopts.volume_ids.clone();
    for (q, ((streams, nodes), buffers)) in connected.into_iter().zip(buffers).enumerate() {
        let mut queue = UblkQueue::new(&cdev, q as u16, vopts.depth, &buffers, buffer_mode)
            .map_err(MapError::Queue)?;
        if options
            .fail_queue
            .is_some_and(|hook| usize::from(hook.queue) == q)
        {
            let switch = FailSwitch::new().map_err(MapError::Queue)?;
            queue.arm_fail_switch(Arc::clone(&switch));
            device.fail_switch = Some(switch);
        }
        let (mut engine, figures) = queue_engine(layout, vopts, &nodes, &device.wide);
        engine.share_size(device.size.clone());
        let mut reconnect = reconnect_for(spec, layout, vopts, &device.wide);
        reconnect.size = device.size.clone();
        device.figures.push(figures);
        let thread = spawn_queue(
            format!("ublk{dev_id}-q{q}"),
            QueueParts {
                engine,
                streams,
                buffers,
                frontend: queue,
                mode: send_mode,
                buffer_mode,
                reconnect: Some(reconnect),
                span: queue_span(&spec.name, &format!("/dev/ublkb{dev_id}"), q),
            },
        )?;
        device.queues.push((q, thread));
    }
    Ok(())
}

/// Whether the block device at `path` is in use, and by what: claimed
/// (mounted, or held by another device (dm, md, swap) or an exclusive
/// opener: an exclusive open is refused with EBUSY exactly then), or open
/// by any process at all (a database on the raw device opens it without
/// `O_EXCL`), as `fuser` finds it. None: free to stop.
pub fn block_in_use(path: &str) -> Option<String> {
    let c_path = std::ffi::CString::new(path).ok()?;
    // SAFETY: a NUL-terminated path and flags; the descriptor returned is
    // closed at once below.
    let fd = unsafe {
        libc::open(
            c_path.as_ptr(),
            libc::O_RDONLY | libc::O_EXCL | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if fd >= 0 {
        // SAFETY: fd was just opened here and nothing else holds it.
        unsafe { libc::close(fd) };
    } else if io::Error::last_os_error().raw_os_error() == Some(libc::EBUSY) {
        return Some("mounted, or held by another device or an exclusive opener".into());
    }
    match crate::openers::openers(std::path::Path::new(path)) {
        Ok(found) if found.is_empty() => None,
        Ok(found) => Some(format!(
            "open by {}",
            found
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )),
        // Gone (no such device): nothing holds it.
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        // Not knowing is not knowing it is free.
        Err(e) => Some(format!("cannot tell who holds it open: {e}")),
    }
}

/// Connects, adds, configures and starts the device. Nothing is left behind
/// on failure. The device survives its daemon (`UBLK_F_USER_RECOVERY`,
/// with reissue where the kernel has it): see [`recover`].
pub fn map(spec: &VolumeSpec, options: &MapOptions) -> Result<Device, MapError> {
    let layout = check(spec, options)?;
    let vopts = &options.volume;
    let mut ctrl = Control::open()?;
    let features = ctrl.features()?;
    crate::uring::probe(SendMode::Copy).map_err(OpenError::Uring)?;
    let recv_fixed = crate::uring::probe_recv_fixed();
    // Digests are computed and checked on our own buffers: the copy path.
    let want = if vopts.data_digest || vopts.tls.is_some() {
        ZeroCopy::Off
    } else {
        options.zero_copy
    };
    let path = choose_path(features, recv_fixed, want)?;
    let (buffer_mode, send_mode, zc_flags) =
        path_setup(path, vopts.sends(), features & sys::UBLK_F_USER_COPY != 0)?;
    let buffers = tag_buffers(vopts)?;
    // Every node must answer before a device exists.
    let vopts = &mut vopts.clone();
    let streams = connect_all(spec, &layout, vopts)?;
    let info = DevInfo {
        nr_hw_queues: vopts.queues as u16,
        queue_depth: vopts.depth,
        max_io_buf_bytes: vopts.max_io,
        dev_id: u32::MAX,
        flags: (features & sys::UBLK_F_CMD_IOCTL_ENCODE) | recovery_flags(features) | zc_flags,
        ..DevInfo::default()
    };
    let added = ctrl.add(info)?;
    let dev_id = added.dev_id;
    let mut device = Device {
        dev_id,
        path,
        volume_ids: Vec::new(),
        figures: Vec::new(),
        size: LiveSize::new(spec.size),
        wide: DeviceWide::new(spec.nodes.len(), vopts),
        ctrl,
        queues: Vec::new(),
        fail_switch: None,
    };
    let started = (|| -> Result<(), MapError> {
        device
            .ctrl
            .set_params(dev_id, &params(spec.size, options.block_size, vopts.max_io))?;
        start_queues(
            &mut device,
            spec,
            &layout,
            options,
            vopts,
            (streams, buffers),
            (buffer_mode, send_mode),
        )?;
        device.ctrl.start(dev_id, std::process::id() as i32)?;
        Ok(())
    })();
    match started {
        Ok(()) => Ok(device),
        Err(err) => {
            // Best effort: the queues see ABORT once the device is stopped.
            let _ = device.stop();
            Err(err)
        }
    }
}

/// The recovery flags a device is created with, from what the kernel has:
/// user recovery, plus reissue (in-flight requests go to the new daemon
/// instead of failing) where available.
pub fn recovery_flags(features: u64) -> u64 {
    let wanted = sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE;
    if features & sys::UBLK_F_USER_RECOVERY == 0 {
        0
    } else {
        features & wanted
    }
}

/// How long recovery waits for the kernel to let go of the dead daemon.
/// Usually well under a second; on 6.12, when the dead daemon held every
/// tag, the device is only quiesced once the block layer's request timeout
/// (30 s) fires, hence the margin.
const RECOVERY_WAIT: Duration = Duration::from_secs(90);

/// How often recovery asks the kernel again.
const RECOVERY_POLL: Duration = Duration::from_millis(100);

/// A device state (`UBLK_S_DEV_*`) by its name, for messages.
pub fn state_name(state: u16) -> String {
    match state {
        sys::UBLK_S_DEV_DEAD => "DEAD".into(),
        sys::UBLK_S_DEV_LIVE => "LIVE".into(),
        sys::UBLK_S_DEV_QUIESCED => "QUIESCED".into(),
        sys::UBLK_S_DEV_FAIL_IO => "FAIL_IO".into(),
        other => format!("in unknown state {other}"),
    }
}

/// What the kernel's state of a device says about taking it over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takeover {
    /// The kernel still counts the old daemon as the device's server: it
    /// may be alive and serving (a pid check cannot tell across pid
    /// namespaces or after pid reuse), or dead and not yet let go of. Touch
    /// nothing (no node session: it would fence a live daemon out) and ask
    /// again.
    Wait,
    /// The kernel is done with the old daemon: the device holds its requests
    /// (QUIESCED) or fails them (FAIL_IO), and no request is with the old
    /// daemon any more. Its connections may be fenced; recover.
    Go,
    /// Not recoverable: DEAD (never started, or stopped), or a state this
    /// program does not know.
    Refuse,
}

/// The takeover decision for a device in kernel state `state`. What the
/// states mean (ublk_drv of Linux 6.12, 6.17 and 7.x):
/// - LIVE: a daemon serves the device, or one died and the kernel has not
///   finished with it. 6.12 leaves LIVE when the dead daemon's io_uring
///   commands are cancelled (its quiesce work, or the block layer's timeout
///   when the daemon held every tag); 6.17 and 7.x only once its char
///   device is released (all its descriptors and io_uring commands gone).
/// - QUIESCED: the daemon is gone (USER_RECOVERY devices, which netblk's
///   are). On 6.12 it is set once the dead daemon's commands are cancelled
///   and every request is requeued or failed, possibly before its char
///   device is closed, so START_USER_RECOVERY may still say EBUSY a while;
///   on 6.17 and 7.x just before the char device is let go.
/// - FAIL_IO: as QUIESCED for devices made with USER_RECOVERY_FAIL_IO (6.13
///   and later; 6.12 has no such state): IO fails until recovery. netblk
///   never asks for it, but the kernel would recover such a device too.
/// - DEAD: not started yet, or stopped.
pub fn takeover(state: u16) -> Takeover {
    match state {
        sys::UBLK_S_DEV_QUIESCED | sys::UBLK_S_DEV_FAIL_IO => Takeover::Go,
        sys::UBLK_S_DEV_LIVE => Takeover::Wait,
        _ => Takeover::Refuse,
    }
}

/// The steps of a recovery: a trait so that tests can script the kernel and
/// check the order [`run_recovery`] takes them in.
trait RecoverySteps {
    /// The device's state (`UBLK_S_DEV_*`), as the kernel has it now.
    fn state(&mut self) -> Result<u16, MapError>;
    /// Waits a moment before asking again; false if interrupted.
    fn pause(&mut self) -> bool;
    /// Told once, when the kernel first says to wait.
    fn waiting(&mut self, state: &str);
    /// Connects every queue to every node (the new sessions fence the old
    /// daemon's connections), and prepares what can fail before START.
    fn connect(&mut self) -> Result<(), MapError>;
    /// START_USER_RECOVERY, once.
    fn start(&mut self) -> Result<(), CtrlError>;
    /// Queues up (FETCH), then END_USER_RECOVERY.
    fn bring_up(&mut self) -> Result<(), MapError>;
}

/// A recovery, in its only safe order: the kernel's word that the old
/// daemon is gone, then the nodes, then START (retried while EBUSY), then
/// the queues and END. Each wait is bounded by `tries` asks.
fn run_recovery(steps: &mut impl RecoverySteps, dev_id: u32, tries: u32) -> Result<(), MapError> {
    await_takeover(steps, dev_id, tries)?;
    steps.connect()?;
    start_recovery_retrying(steps, dev_id, tries)?;
    steps.bring_up()
}

/// Asks for the device's state until the kernel says its old daemon is
/// gone ([`takeover`]), at most `tries` times.
fn await_takeover(steps: &mut impl RecoverySteps, dev_id: u32, tries: u32) -> Result<(), MapError> {
    let tries = tries.max(1);
    for attempt in 1..=tries {
        let state = steps.state()?;
        match takeover(state) {
            Takeover::Go => return Ok(()),
            Takeover::Refuse => {
                return Err(MapError::CannotRecover {
                    dev_id,
                    state: state_name(state),
                });
            }
            Takeover::Wait if attempt == tries => {
                return Err(MapError::DaemonNotGone {
                    dev_id,
                    state: state_name(state),
                    secs: RECOVERY_WAIT.as_secs(),
                });
            }
            Takeover::Wait => {
                if attempt == 1 {
                    steps.waiting(&state_name(state));
                }
                if !steps.pause() {
                    return Err(MapError::Interrupted { dev_id });
                }
            }
        }
    }
    unreachable!("the last attempt returns")
}

/// START_USER_RECOVERY, retried while the kernel says EBUSY (the old
/// daemon's char device not yet released), at most `tries` times. Called
/// only once everything is ready to bring the queues up: on 6.12 a
/// successful START resets the device's ready queues to none, and a second
/// START fails (EINVAL) until new queues are ready, so an attempt that fails
/// after it leaves the device unrecoverable.
fn start_recovery_retrying(
    steps: &mut impl RecoverySteps,
    dev_id: u32,
    tries: u32,
) -> Result<(), MapError> {
    let tries = tries.max(1);
    for attempt in 1..=tries {
        match steps.start() {
            Ok(()) => return Ok(()),
            Err(CtrlError::Command { err, .. }) if err.raw_os_error() == Some(libc::EBUSY) => {
                if attempt == tries {
                    let state = steps
                        .state()
                        .map_or_else(|e| format!("state unknown: {e}"), state_name);
                    return Err(MapError::Busy {
                        dev_id,
                        state,
                        secs: RECOVERY_WAIT.as_secs(),
                    });
                }
                if !steps.pause() {
                    return Err(MapError::Interrupted { dev_id });
                }
            }
            Err(CtrlError::Command { err, .. }) if err.raw_os_error() == Some(libc::EINVAL) => {
                return Err(MapError::StartRefused { dev_id, err });
            }
            Err(err) => return Err(err.into()),
        }
    }
    unreachable!("the last attempt returns")
}

/// [`RecoverySteps`] on the real kernel and nodes.
struct LiveRecovery<'a> {
    dev_id: u32,
    /// Until `bring_up` hands it to the device.
    ctrl: Option<Control>,
    spec: &'a VolumeSpec,
    layout: Layout,
    options: &'a MapOptions,
    /// The volume options, with the nodes' volume identities once pinned.
    vopts: VolumeOptions,
    path: DataPath,
    modes: (BufferMode, SendMode),
    interrupted: &'a mut dyn FnMut() -> bool,
    prepared: Option<QueueMakings>,
    device: Option<Device>,
}

impl LiveRecovery<'_> {
    fn ctrl(&mut self) -> Result<&mut Control, MapError> {
        self.ctrl
            .as_mut()
            .ok_or_else(|| MapError::Queue(io::Error::other("the control device moved on")))
    }
}

impl RecoverySteps for LiveRecovery<'_> {
    fn state(&mut self) -> Result<u16, MapError> {
        let dev_id = self.dev_id;
        Ok(self.ctrl()?.info(dev_id)?.state)
    }

    fn pause(&mut self) -> bool {
        if (self.interrupted)() {
            return false;
        }
        std::thread::sleep(RECOVERY_POLL);
        !(self.interrupted)()
    }

    fn waiting(&mut self, state: &str) {
        tracing::warn!(
            "/dev/ublkb{} is still {state}: waiting up to {} s for the kernel to let go of its old daemon",
            self.dev_id,
            RECOVERY_WAIT.as_secs()
        );
    }

    fn connect(&mut self) -> Result<(), MapError> {
        tracing::info!(
            device = self.dev_id,
            "recovery: the old daemon is gone; connecting to the nodes"
        );
        let vopts = &mut self.vopts;
        let buffers = tag_buffers(vopts)?;
        let streams = connect_all(self.spec, &self.layout, vopts)?;
        self.prepared = Some((streams, buffers));
        Ok(())
    }

    fn start(&mut self) -> Result<(), CtrlError> {
        tracing::info!(device = self.dev_id, "recovery: START_USER_RECOVERY");
        match self.ctrl.as_mut() {
            Some(ctrl) => ctrl.start_recovery(self.dev_id),
            None => Err(CtrlError::Broken {
                what: "START_USER_RECOVERY",
            }),
        }
    }

    fn bring_up(&mut self) -> Result<(), MapError> {
        let prepared = self
            .prepared
            .take()
            .ok_or_else(|| MapError::Queue(io::Error::other("queues started unconnected")))?;
        let ctrl = self
            .ctrl
            .take()
            .ok_or_else(|| MapError::Queue(io::Error::other("the control device moved on")))?;
        let mut device = Device {
            dev_id: self.dev_id,
            path: self.path,
            volume_ids: Vec::new(),
            figures: Vec::new(),
            size: LiveSize::new(self.spec.size),
            wide: DeviceWide::new(self.spec.nodes.len(), &self.vopts),
            ctrl,
            queues: Vec::new(),
            fail_switch: None,
        };
        start_queues(
            &mut device,
            self.spec,
            &self.layout,
            self.options,
            &self.vopts,
            prepared,
            self.modes,
        )?;
        device
            .ctrl
            .end_recovery(self.dev_id, std::process::id() as i32)?;
        self.device = Some(device);
        Ok(())
    }
}

/// Attaches this process as the new daemon of device `dev_id`, whose daemon
/// died: the device (and any filesystem on it) stayed; its IO waited, and
/// resumes here. `spec` and `options` must be what the device was mapped
/// with (the state record holds them). `interrupted` is asked while waiting
/// (true: give up). On failure before START_USER_RECOVERY the device is
/// left as it was, waiting for another attempt.
///
/// The order is the safety ([`run_recovery`]): first the kernel's word that
/// the old daemon is gone (the device's state, see [`takeover`]), then the
/// nodes (each new session fences the old daemon's connections, which would
/// cut off a daemon that still served), then START_USER_RECOVERY, the
/// queues, and END_USER_RECOVERY. Each of the two waits (for the state, and
/// for START while it says EBUSY) lasts at most [`RECOVERY_WAIT`].
pub fn recover(
    spec: &VolumeSpec,
    options: &MapOptions,
    dev_id: u32,
    interrupted: &mut dyn FnMut() -> bool,
) -> Result<Device, MapError> {
    let layout = check(spec, options)?;
    let vopts = &options.volume;
    let mut ctrl = Control::open()?;
    let info = ctrl.info(dev_id)?;
    if info.flags & sys::UBLK_F_USER_RECOVERY == 0 {
        return Err(MapError::NotRecoverable(dev_id));
    }
    if usize::from(info.nr_hw_queues) != vopts.queues || info.queue_depth != vopts.depth {
        return Err(MapError::Mismatch(format!(
            "/dev/ublkb{dev_id} has {} queues of depth {}, the record says {} of {}",
            info.nr_hw_queues, info.queue_depth, vopts.queues, vopts.depth
        )));
    }
    crate::uring::probe(SendMode::Copy).map_err(OpenError::Uring)?;
    // The device's flags fix its data path: zero copy if it was made so.
    let path = choose_path(info.flags, crate::uring::probe_recv_fixed(), ZeroCopy::Auto)?;
    if vopts.data_digest && path != DataPath::Copy {
        return Err(MapError::DigestNeedsCopy);
    }
    if vopts.tls.is_some() && path != DataPath::Copy {
        return Err(MapError::TlsNeedsCopy);
    }
    let (buffer_mode, send_mode, _) =
        path_setup(path, vopts.sends(), info.flags & sys::UBLK_F_USER_COPY != 0)?;
    let mut steps = LiveRecovery {
        dev_id,
        ctrl: Some(ctrl),
        spec,
        layout,
        options,
        vopts: vopts.clone(),
        path,
        modes: (buffer_mode, send_mode),
        interrupted,
        prepared: None,
        device: None,
    };
    let tries = (RECOVERY_WAIT.as_millis() / RECOVERY_POLL.as_millis()) as u32;
    run_recovery(&mut steps, dev_id, tries)?;
    steps
        .device
        .take()
        .ok_or_else(|| MapError::Queue(io::Error::other("recovery ended without a device")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(size: u64, stripe_unit: u32, nodes: u16) -> VolumeSpec {
        VolumeSpec {
            name: "v".into(),
            size,
            stripe_unit,
            nodes: (1..=nodes)
                .map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], p)))
                .collect(),
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
}

#[cfg(test)]
mod in_use_tests {
    use super::*;

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
}

//! A striped volume served as `/dev/ublkbN`: connect every queue to every
//! node, add and configure the device, start one queue thread per hardware
//! queue, start the device, and tear it all down again. Also: taking over a
//! device whose daemon died ([`recover`]), and what the daemon does when one
//! of its queues ends while it serves ([`supervise`]).

mod recovery;
mod supervise;
#[cfg(test)]
mod tests;

pub use recovery::*;
pub use supervise::*;

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
                    send_fixed: path == DataPath::FullZeroCopy && crate::uring::probe_send_fixed(),
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
    // A replicated volume's owner first: the queues present its epoch.
    crate::frontend::attach_replicas(spec, layout, vopts)?;
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
        wide: DeviceWide::new(&layout, vopts),
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

//! A striped volume served as `/dev/ublkbN`: connect every queue to every
//! node, add and configure the device, start one queue thread per hardware
//! queue, start the device, and tear it all down again.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ctrl::{Control, CtrlError};
use super::queue::UblkQueue;
use super::sys::{self, DevInfo, ParamBasic, ParamDiscard, Params};
use crate::frontend::{
    ConnectedQueue, OpenError, QueueThread, VolumeOptions, connect_queues, queue_engine,
    reconnect_for, spawn_queue,
};
use crate::layout::{Layout, VolumeSpec};
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
        "/dev/ublkb{dev_id} is not ready for recovery (state {state}): is its old daemon still running or exiting?"
    )]
    Busy { dev_id: u32, state: u16 },
    #[error(
        "zero copy needs ublk with UBLK_F_AUTO_BUF_REG (Linux 6.16 or newer); this kernel has none: use --zero-copy auto or off"
    )]
    NoZeroCopy,
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
}

impl MapOptions {
    /// Checks every number of the options against its bounds (the volume
    /// options' own, and the block size).
    pub fn check(&self) -> Result<(), MapError> {
        if self.block_size != 512 && self.block_size != 4096 {
            return Err(MapError::BlockSize(self.block_size));
        }
        self.volume.check()?;
        Ok(())
    }
}

/// Checks a volume and how it is to be mapped before anything is touched:
/// the volume's name, nodes and geometry, the options, and that the volume
/// is whole blocks. Returns the volume's layout.
pub fn check(spec: &VolumeSpec, options: &MapOptions) -> Result<Layout, MapError> {
    let layout = spec.layout().map_err(OpenError::from)?;
    options.check()?;
    if !spec.size.is_multiple_of(u64::from(options.block_size)) {
        return Err(MapError::Unaligned {
            size: spec.size,
            block: options.block_size,
        });
    }
    Ok(layout)
}

/// A started device; [`Device::stop`] takes it down.
pub struct Device {
    pub dev_id: u32,
    pub path: DataPath,
    /// The volume identity of each node, as pinned at the first connect.
    pub volume_ids: Vec<String>,
    ctrl: Control,
    queues: Vec<QueueThread<UblkQueue>>,
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
        for thread in self.queues.drain(..) {
            match thread.join() {
                Ok((_, Ok(()))) => {}
                Ok((_, Err(err))) => queue_error = Some(err),
                Err(_) => queue_error = Some(io::Error::other("queue thread panicked")),
            }
        }
        self.ctrl.delete(self.dev_id)?;
        stopped?;
        match queue_error {
            Some(err) => Err(MapError::Queue(err)),
            None => Ok(()),
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
fn path_setup(path: DataPath, send: SendMode) -> Result<(BufferMode, SendMode, u64), MapError> {
    Ok(match path {
        DataPath::Copy => (BufferMode::User, send, 0),
        DataPath::PartialZeroCopy | DataPath::FullZeroCopy => {
            crate::uring::probe(SendMode::ZeroCopy).map_err(OpenError::Uring)?;
            (
                BufferMode::Kernel {
                    recv_fixed: path == DataPath::FullZeroCopy,
                },
                // Request pages have no user address: only SEND_ZC can send them.
                SendMode::ZeroCopy,
                sys::UBLK_F_SUPPORT_ZERO_COPY | sys::UBLK_F_AUTO_BUF_REG,
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

/// Opens the char device and starts one queue thread per hardware queue;
/// their FETCH commands go out at once.
fn start_queues(
    device: &mut Device,
    spec: &VolumeSpec,
    layout: &Layout,
    vopts: &VolumeOptions,
    connected: Vec<ConnectedQueue>,
    (buffer_mode, send_mode): (BufferMode, SendMode),
) -> Result<(), MapError> {
    let dev_id = device.dev_id;
    let cdev = UblkQueue::open_cdev(dev_id).map_err(MapError::Queue)?;
    device.volume_ids = vopts.volume_ids.clone();
    for (q, (streams, nodes)) in connected.into_iter().enumerate() {
        let buffers =
            Arc::new(TagBuffers::new(vopts.depth, vopts.max_io).map_err(MapError::Queue)?);
        let queue = UblkQueue::new(
            &cdev,
            q as u16,
            vopts.depth,
            &buffers,
            buffer_mode != BufferMode::User,
        )
        .map_err(MapError::Queue)?;
        let engine = queue_engine(layout, vopts, &nodes);
        let thread = spawn_queue(
            format!("ublk{dev_id}-q{q}"),
            QueueParts {
                engine,
                streams,
                buffers,
                frontend: queue,
                mode: send_mode,
                buffer_mode,
                reconnect: Some(reconnect_for(spec, layout, vopts, q)),
            },
        )?;
        device.queues.push(thread);
    }
    Ok(())
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
    let path = choose_path(features, recv_fixed, options.zero_copy)?;
    let (buffer_mode, send_mode, zc_flags) = path_setup(path, vopts.send_mode)?;
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
        ctrl,
        queues: Vec::new(),
    };
    let started = (|| -> Result<(), MapError> {
        device
            .ctrl
            .set_params(dev_id, &params(spec.size, options.block_size, vopts.max_io))?;
        start_queues(
            &mut device,
            spec,
            &layout,
            vopts,
            streams,
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

/// Attaches this process as the new daemon of device `dev_id`, whose daemon
/// died: the device (and any filesystem on it) stayed; its IO waited, and
/// resumes here. `spec` and `options` must be what the device was mapped
/// with (the state record holds them). On failure the device is left as it
/// was, waiting for another attempt.
pub fn recover(spec: &VolumeSpec, options: &MapOptions, dev_id: u32) -> Result<Device, MapError> {
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
    let (buffer_mode, send_mode, _) = path_setup(path, vopts.send_mode)?;
    // The nodes first: nothing is touched unless they all answer.
    let vopts = &mut vopts.clone();
    let streams = connect_all(spec, &layout, vopts)?;
    // The kernel quiesces the device once the dead daemon's files are
    // released; until then START_USER_RECOVERY says EBUSY.
    let deadline = Instant::now() + RECOVERY_WAIT;
    loop {
        match ctrl.start_recovery(dev_id) {
            Ok(()) => break,
            Err(CtrlError::Command { err, .. })
                if err.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(CtrlError::Command { err, .. }) if err.raw_os_error() == Some(libc::EBUSY) => {
                let state = ctrl.info(dev_id).map(|i| i.state).unwrap_or(u16::MAX);
                return Err(MapError::Busy { dev_id, state });
            }
            Err(err) => return Err(err.into()),
        }
    }
    let mut device = Device {
        dev_id,
        path,
        volume_ids: Vec::new(),
        ctrl,
        queues: Vec::new(),
    };
    start_queues(
        &mut device,
        spec,
        &layout,
        vopts,
        streams,
        (buffer_mode, send_mode),
    )?;
    device
        .ctrl
        .end_recovery(dev_id, std::process::id() as i32)?;
    Ok(device)
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
        let bad_options: [(Change, &str); 12] = [
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

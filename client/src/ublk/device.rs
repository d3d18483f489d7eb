//! A striped volume served as `/dev/ublkbN`: connect every queue to every
//! node, add and configure the device, start one queue thread per hardware
//! queue, start the device, and tear it all down again.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ctrl::{Control, CtrlError};
use super::queue::UblkQueue;
use super::sys::{self, DevInfo, ParamBasic, ParamDiscard, Params};
use crate::engine::Engine;
use crate::frontend::{
    OpenError, QueueThread, VolumeOptions, connect_queue, engine_config, reconnect_for, spawn_queue,
};
use crate::layout::VolumeSpec;
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

/// A started device; [`Device::stop`] takes it down.
pub struct Device {
    pub dev_id: u32,
    pub path: DataPath,
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

/// Every queue connected to every node (in queue order).
fn connect_all(
    spec: &VolumeSpec,
    layout: &crate::layout::Layout,
    vopts: &VolumeOptions,
) -> Result<Vec<Vec<std::net::TcpStream>>, MapError> {
    let mut streams = Vec::with_capacity(vopts.queues);
    for q in 0..vopts.queues {
        streams.push(connect_queue(spec, layout, vopts, q)?.0);
    }
    Ok(streams)
}

/// Opens the char device and starts one queue thread per hardware queue;
/// their FETCH commands go out at once.
fn start_queues(
    device: &mut Device,
    spec: &VolumeSpec,
    layout: &crate::layout::Layout,
    vopts: &VolumeOptions,
    streams: Vec<Vec<std::net::TcpStream>>,
    (buffer_mode, send_mode): (BufferMode, SendMode),
) -> Result<(), MapError> {
    let dev_id = device.dev_id;
    let cdev = UblkQueue::open_cdev(dev_id).map_err(MapError::Queue)?;
    for (q, streams) in streams.into_iter().enumerate() {
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
        let engine = Engine::new(*layout, engine_config(vopts));
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
    let layout = spec.layout().map_err(OpenError::from)?;
    if options.block_size != 512 && options.block_size != 4096 {
        return Err(MapError::BlockSize(options.block_size));
    }
    if !spec.size.is_multiple_of(u64::from(options.block_size)) {
        return Err(MapError::Unaligned {
            size: spec.size,
            block: options.block_size,
        });
    }
    let vopts = &options.volume;
    let mut ctrl = Control::open()?;
    let features = ctrl.features()?;
    crate::uring::probe(SendMode::Copy).map_err(OpenError::Uring)?;
    let recv_fixed = crate::uring::probe_recv_fixed();
    let path = choose_path(features, recv_fixed, options.zero_copy)?;
    let (buffer_mode, send_mode, zc_flags) = path_setup(path, vopts.send_mode)?;
    // Every node must answer before a device exists.
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
    let layout = spec.layout().map_err(OpenError::from)?;
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

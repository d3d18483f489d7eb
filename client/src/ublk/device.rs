//! A striped volume served as `/dev/ublkbN`: connect every queue to every
//! node, add and configure the device, start one queue thread per hardware
//! queue, start the device, and tear it all down again.

use std::io;
use std::sync::Arc;

use super::ctrl::{Control, CtrlError};
use super::queue::UblkQueue;
use super::sys::{self, DevInfo, ParamBasic, ParamDiscard, Params};
use crate::engine::Engine;
use crate::frontend::{
    OpenError, QueueThread, VolumeOptions, connect_queue, engine_config, reconnect_for, spawn_queue,
};
use crate::layout::VolumeSpec;
use crate::uring::{BufferMode, SendMode, TagBuffers};

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

/// Connects, adds, configures and starts the device. Nothing is left behind
/// on failure.
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
    let (buffer_mode, send_mode, zc_flags) = match path {
        DataPath::Copy => (BufferMode::User, vopts.send_mode, 0),
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
    };
    // Every node must answer before a device exists.
    let mut streams = Vec::with_capacity(vopts.queues);
    for q in 0..vopts.queues {
        streams.push(connect_queue(spec, &layout, vopts, q)?.0);
    }
    let info = DevInfo {
        nr_hw_queues: vopts.queues as u16,
        queue_depth: vopts.depth,
        max_io_buf_bytes: vopts.max_io,
        dev_id: u32::MAX,
        flags: (features & sys::UBLK_F_CMD_IOCTL_ENCODE) | zc_flags,
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
            let engine = Engine::new(layout, engine_config(vopts));
            let thread = spawn_queue(
                format!("ublk{dev_id}-q{q}"),
                engine,
                streams,
                buffers,
                queue,
                send_mode,
                buffer_mode,
                Some(reconnect_for(spec, &layout, vopts, q)),
            )?;
            device.queues.push(thread);
        }
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

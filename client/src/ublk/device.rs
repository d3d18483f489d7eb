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
    OpenError, QueueThread, VolumeOptions, connect_queue, engine_config, spawn_queue,
};
use crate::layout::VolumeSpec;
use crate::uring::{SendMode, TagBuffers};

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
}

/// How a device is made.
#[derive(Debug, Clone)]
pub struct MapOptions {
    pub volume: VolumeOptions,
    /// Logical block size: 512 or 4096.
    pub block_size: u32,
}

/// A started device; [`Device::stop`] takes it down.
pub struct Device {
    pub dev_id: u32,
    pub mode: &'static str,
    ctrl: Control,
    queues: Vec<QueueThread<UblkQueue>>,
}

impl Device {
    pub fn path(&self) -> String {
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
    // Every node must answer before a device exists.
    let mut streams = Vec::with_capacity(vopts.queues);
    for _ in 0..vopts.queues {
        streams.push(connect_queue(spec, &layout, vopts)?.0);
    }
    let info = DevInfo {
        nr_hw_queues: vopts.queues as u16,
        queue_depth: vopts.depth,
        max_io_buf_bytes: vopts.max_io,
        dev_id: u32::MAX,
        flags: features & sys::UBLK_F_CMD_IOCTL_ENCODE,
        ..DevInfo::default()
    };
    let added = ctrl.add(info)?;
    let dev_id = added.dev_id;
    let mut device = Device {
        dev_id,
        mode: "copy",
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
            let queue =
                UblkQueue::new(&cdev, q as u16, vopts.depth, &buffers).map_err(MapError::Queue)?;
            let engine = Engine::new(layout, engine_config(vopts));
            let thread = spawn_queue(
                format!("ublk{dev_id}-q{q}"),
                engine,
                streams,
                buffers,
                queue,
                vopts.send_mode,
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

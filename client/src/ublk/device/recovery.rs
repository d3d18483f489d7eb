//! Taking over a device whose daemon died: wait for the kernel to say the
//! old daemon is gone, connect, then START/END_USER_RECOVERY.

use super::*;

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
pub(super) const RECOVERY_WAIT: Duration = Duration::from_secs(90);

/// How often recovery asks the kernel again.
pub(super) const RECOVERY_POLL: Duration = Duration::from_millis(100);

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
pub(super) trait RecoverySteps {
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
pub(super) fn run_recovery(
    steps: &mut impl RecoverySteps,
    dev_id: u32,
    tries: u32,
) -> Result<(), MapError> {
    await_takeover(steps, dev_id, tries)?;
    steps.connect()?;
    start_recovery_retrying(steps, dev_id, tries)?;
    steps.bring_up()
}

/// Asks for the device's state until the kernel says its old daemon is
/// gone ([`takeover`]), at most `tries` times.
pub(super) fn await_takeover(
    steps: &mut impl RecoverySteps,
    dev_id: u32,
    tries: u32,
) -> Result<(), MapError> {
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
pub(super) fn start_recovery_retrying(
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
pub(super) struct LiveRecovery<'a> {
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
            wide: DeviceWide::new(&self.layout, &self.vopts),
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

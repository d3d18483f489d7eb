//! The ublk control device (`/dev/ublk-control`): feature query, adding,
//! configuring, starting, stopping and deleting devices. Commands are
//! `IORING_OP_URING_CMD`s on a small ring of 128-byte entries, one at a time.
//!
//! Each command has its own `user_data`, and a command returns only once
//! its own completion is reaped (an interrupted wait is waited again;
//! completions of anything else are skipped). A buffer the driver reads or
//! writes by address lives on the heap and is handed over with the command,
//! which gives it back after the completion; if the wait fails otherwise,
//! the command may still be in flight, so the buffer is leaked (never freed
//! under the driver) and the ring is not used again.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use super::sys::{self, CtrlCmd, DevInfo, Params};

/// Where the control device lives.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// Why the control device could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CtrlError {
    #[error(
        "{CONTROL_PATH} does not exist: the ublk driver is not loaded (run `modprobe ublk_drv`)"
    )]
    NoDriver,
    #[error("no permission to open {CONTROL_PATH}: run as root (or with CAP_SYS_ADMIN)")]
    NoPermission,
    #[error("{CONTROL_PATH}: {0}")]
    Open(io::Error),
    #[error("io_uring for ublk control: {0}")]
    Ring(io::Error),
    #[error("ublk {what} failed: {err}")]
    Command { what: &'static str, err: io::Error },
    #[error(
        "ublk {what}: the control ring is unusable since a command's wait failed while it may have been in flight"
    )]
    Broken { what: &'static str },
}

/// An open control device.
pub struct Control {
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    file: File,
    /// The `user_data` of the previous command: each has its own.
    last_user_data: u64,
    /// A command may still be in flight after its wait failed: the ring is
    /// not used again.
    broken: bool,
}

/// Where a ring's completions come from: the control ring, or a scripted
/// one in tests.
trait Completions {
    /// Submits what is queued and waits for at least one completion.
    fn submit_and_wait(&mut self) -> io::Result<()>;
    /// The next completion reaped: `(user_data, result)`.
    fn next_completion(&mut self) -> Option<(u64, i32)>;
}

impl Completions for IoUring<squeue::Entry128, cqueue::Entry> {
    fn submit_and_wait(&mut self) -> io::Result<()> {
        IoUring::submit_and_wait(self, 1).map(drop)
    }

    fn next_completion(&mut self) -> Option<(u64, i32)> {
        self.completion()
            .next()
            .map(|c| (c.user_data(), c.result()))
    }
}

/// Waits for the completion of the command submitted with `user_data`
/// and returns its result. Completions of anything else (there should be
/// none: commands run one at a time) are reaped and skipped. An
/// interrupted wait (EINTR) is waited again, since the command may be in
/// flight. Any other failure of the wait is returned: the command may then
/// still be in flight.
fn wait_for(ring: &mut impl Completions, user_data: u64) -> io::Result<i32> {
    loop {
        while let Some((got, result)) = ring.next_completion() {
            if got == user_data {
                return Ok(result);
            }
        }
        match ring.submit_and_wait() {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
}

impl Control {
    pub fn open() -> Result<Control, CtrlError> {
        Control::open_at(Path::new(CONTROL_PATH))
    }

    pub fn open_at(path: &Path) -> Result<Control, CtrlError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|err| match err.kind() {
                io::ErrorKind::NotFound => CtrlError::NoDriver,
                io::ErrorKind::PermissionDenied => CtrlError::NoPermission,
                _ => CtrlError::Open(err),
            })?;
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build(8)
            .map_err(CtrlError::Ring)?;
        Ok(Control {
            ring,
            file,
            last_user_data: 0,
            broken: false,
        })
    }

    /// Runs one command whose buffer (`cmd.addr` and `cmd.len` are set to
    /// it) is `buf`, and returns its (non-negative) result and the buffer,
    /// which the driver may have written. If the command's completion could
    /// not be reaped, the driver may still use the buffer: it is leaked.
    fn run_with<T>(
        &mut self,
        what: &'static str,
        cmd_op: u32,
        mut cmd: CtrlCmd,
        mut buf: Box<T>,
    ) -> Result<(i32, Box<T>), CtrlError> {
        if self.broken {
            return Err(CtrlError::Broken { what });
        }
        cmd.addr = std::ptr::from_mut::<T>(&mut *buf) as u64;
        cmd.len = u16::try_from(std::mem::size_of::<T>()).map_err(|_| CtrlError::Command {
            what,
            err: io::Error::other("command buffer too large"),
        })?;
        match self.run(what, cmd_op, cmd) {
            Ok(res) => Ok((res, buf)),
            Err(err) => {
                if self.broken {
                    // Never freed under the driver.
                    std::mem::forget(buf);
                }
                Err(err)
            }
        }
    }

    /// Runs one command and returns its (non-negative) result, once its
    /// completion is reaped. If the wait fails other than by an interrupt,
    /// the command may still be in flight: the ring is then marked broken
    /// and not used again.
    fn run(&mut self, what: &'static str, cmd_op: u32, cmd: CtrlCmd) -> Result<i32, CtrlError> {
        let fail = |err| CtrlError::Command { what, err };
        if self.broken {
            return Err(CtrlError::Broken { what });
        }
        let mut bytes = [0u8; 80];
        // SAFETY: CtrlCmd is a plain repr(C) struct of integers, 32 bytes
        // long without padding (checked at compile time in sys.rs), so
        // viewing it as bytes reads only initialised memory within it.
        let raw = unsafe {
            std::slice::from_raw_parts(
                (&raw const cmd).cast::<u8>(),
                std::mem::size_of::<CtrlCmd>(),
            )
        };
        bytes[..raw.len()].copy_from_slice(raw);
        self.last_user_data = self.last_user_data.wrapping_add(1);
        let user_data = self.last_user_data;
        let entry = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), cmd_op)
            .cmd(bytes)
            .build()
            .user_data(user_data);
        // SAFETY: the command's buffer (`cmd.addr`, if any) is the heap
        // allocation `run_with` holds, which it gives back to its caller
        // only after this function reaped the command's completion, and
        // leaks otherwise; the command bytes are copied into the entry.
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| fail(io::Error::other("control ring full")))?;
        match wait_for(&mut self.ring, user_data) {
            Ok(res) if res < 0 => Err(fail(io::Error::from_raw_os_error(-res))),
            Ok(res) => Ok(res),
            Err(err) => {
                self.broken = true;
                Err(fail(err))
            }
        }
    }

    /// The driver's feature bits (`UBLK_F_*`).
    pub fn features(&mut self) -> Result<u64, CtrlError> {
        let cmd = CtrlCmd {
            dev_id: u32::MAX,
            queue_id: u16::MAX,
            ..CtrlCmd::default()
        };
        let (_, features) = self.run_with(
            "GET_FEATURES",
            sys::UBLK_U_CMD_GET_FEATURES,
            cmd,
            Box::new(0u64),
        )?;
        Ok(*features)
    }

    /// Adds a device; `info.dev_id` may be `u32::MAX` for "any". Returns the
    /// device info as the driver completed it (with the id chosen).
    pub fn add(&mut self, info: DevInfo) -> Result<DevInfo, CtrlError> {
        let cmd = CtrlCmd {
            dev_id: info.dev_id,
            queue_id: u16::MAX,
            ..CtrlCmd::default()
        };
        let (_, added) = self.run_with("ADD_DEV", sys::UBLK_U_CMD_ADD_DEV, cmd, Box::new(info))?;
        Ok(*added)
    }

    pub fn set_params(&mut self, dev_id: u32, params: &Params) -> Result<(), CtrlError> {
        let cmd = CtrlCmd {
            dev_id,
            queue_id: u16::MAX,
            ..CtrlCmd::default()
        };
        self.run_with(
            "SET_PARAMS",
            sys::UBLK_U_CMD_SET_PARAMS,
            cmd,
            Box::new(*params),
        )
        .map(drop)
    }

    /// Starts the device once every queue has fetched its requests;
    /// `pid` is the serving process.
    pub fn start(&mut self, dev_id: u32, pid: i32) -> Result<(), CtrlError> {
        let cmd = CtrlCmd {
            dev_id,
            queue_id: u16::MAX,
            data: [pid as u64],
            ..CtrlCmd::default()
        };
        self.run("START_DEV", sys::UBLK_U_CMD_START_DEV, cmd)
            .map(drop)
    }

    /// Begins attaching a new server to a device whose server died
    /// (`UBLK_F_USER_RECOVERY`): the device must be quiesced and its char
    /// device released by the dead server (EBUSY until then).
    pub fn start_recovery(&mut self, dev_id: u32) -> Result<(), CtrlError> {
        let cmd = CtrlCmd {
            dev_id,
            queue_id: u16::MAX,
            ..CtrlCmd::default()
        };
        self.run(
            "START_USER_RECOVERY",
            sys::UBLK_U_CMD_START_USER_RECOVERY,
            cmd,
        )
        .map(drop)
    }

    /// Ends a recovery once every queue of the new server (`pid`) has
    /// fetched its requests: the device is live again, and the requests
    /// held meanwhile (and, with reissue, those the dead server had) are
    /// issued to the new server.
    pub fn end_recovery(&mut self, dev_id: u32, pid: i32) -> Result<(), CtrlError> {
        let cmd = CtrlCmd {
            dev_id,
            queue_id: u16::MAX,
            data: [pid as u64],
            ..CtrlCmd::default()
        };
        self.run("END_USER_RECOVERY", sys::UBLK_U_CMD_END_USER_RECOVERY, cmd)
            .map(drop)
    }

    /// Gives a started device a new size, in 512-byte sectors (Linux 6.16+,
    /// `UBLK_F_UPDATE_SIZE`); the block layer tells its users (a resize
    /// uevent).
    pub fn update_size(&mut self, dev_id: u32, sectors: u64) -> Result<(), CtrlError> {
        let cmd = CtrlCmd {
            dev_id,
            queue_id: u16::MAX,
            data: [sectors],
            ..CtrlCmd::default()
        };
        self.run("UPDATE_SIZE", sys::UBLK_U_CMD_UPDATE_SIZE, cmd)
            .map(drop)
    }

    pub fn stop(&mut self, dev_id: u32) -> Result<(), CtrlError> {
        let cmd = CtrlCmd {
            dev_id,
            queue_id: u16::MAX,
            ..CtrlCmd::default()
        };
        self.run("STOP_DEV", sys::UBLK_U_CMD_STOP_DEV, cmd)
            .map(drop)
    }

    pub fn delete(&mut self, dev_id: u32) -> Result<(), CtrlError> {
        let cmd = CtrlCmd {
            dev_id,
            queue_id: u16::MAX,
            ..CtrlCmd::default()
        };
        self.run("DEL_DEV", sys::UBLK_U_CMD_DEL_DEV, cmd).map(drop)
    }

    /// The device's current info (state, flags, serving pid, ...).
    ///
    /// GET_DEV_INFO2 takes the device's char device path at the start of
    /// the buffer (the driver checks permissions on it) and writes the info
    /// right after it.
    pub fn info(&mut self, dev_id: u32) -> Result<DevInfo, CtrlError> {
        #[repr(C, align(8))]
        struct Buf([u8; 128]);
        let mut buf = Box::new(Buf([0; 128]));
        let path = format!("/dev/ublkc{dev_id}");
        buf.0[..path.len()].copy_from_slice(path.as_bytes());
        let cmd = CtrlCmd {
            dev_id,
            queue_id: u16::MAX,
            dev_path_len: path.len() as u16,
            ..CtrlCmd::default()
        };
        let (_, buf) = self.run_with("GET_DEV_INFO2", sys::UBLK_U_CMD_GET_DEV_INFO2, cmd, buf)?;
        let at = path.len();
        debug_assert!(at + std::mem::size_of::<DevInfo>() <= buf.0.len());
        // SAFETY: the driver wrote a DevInfo (64 bytes of plain integers)
        // at offset `at` of the 128-byte buffer, and at + 64 <= 128 since a
        // device path is at most 21 bytes; the read tolerates misalignment.
        Ok(unsafe { std::ptr::read_unaligned(buf.0.as_ptr().add(at).cast::<DevInfo>()) })
    }
}

/// The names of the feature bits set in `features`.
pub fn feature_names(features: u64) -> Vec<&'static str> {
    sys::FEATURE_NAMES
        .iter()
        .filter(|(bit, _)| features & bit != 0)
        .map(|(_, name)| *name)
        .collect()
}

/// True if process `pid` exists (signal 0 probes without sending anything).
pub fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 sends nothing; it only checks that the
    // process exists and may be signalled. It takes plain integers.
    let rc = unsafe { libc::kill(pid, 0) };
    let exists = rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    // A zombie (killed, not yet reaped by its parent) serves nothing.
    exists && !is_zombie(pid)
}

/// When process `pid` started (clock ticks since boot, `/proc/PID/stat`
/// field 22): with the pid, it names one process even after pids wrap.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts at field 3 (state); field 22 is the 20th from there.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// True if the daemon recorded as (`pid`, `start`) still runs: the pid is
/// alive and is the same process, not a later one that got the same pid.
pub fn daemon_alive(pid: u32, start: u64) -> bool {
    // A start of 0 was not known when recorded: the pid alone decides.
    process_alive(pid) && process_start_time(pid).is_none_or(|now| start == 0 || now == start)
}

/// True if `/proc` says `pid` has exited and waits to be reaped.
fn is_zombie(pid: libc::pid_t) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // "pid (comm) S ...": the state follows the last ')'.
            let (_, rest) = stat.rsplit_once(')')?;
            rest.trim_start().chars().next()
        })
        .is_some_and(|state| matches!(state, 'Z' | 'X'))
}

/// This process's effective user id: the owner of the files it creates.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid takes no arguments, touches no memory and cannot fail.
    unsafe { libc::geteuid() }
}

/// Asks the daemon `pid` to stop (SIGTERM).
pub fn terminate(pid: u32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: kill takes plain integers; pid is positive, so it names one
    // process (never a group).
    if unsafe { libc::kill(pid, libc::SIGTERM) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::VecDeque;

    /// A ring whose waits and completions follow a script.
    #[derive(Default)]
    struct Script {
        /// What each wait does: fail, or deliver these completions.
        waits: VecDeque<io::Result<Vec<(u64, i32)>>>,
        ready: VecDeque<(u64, i32)>,
        waited: usize,
    }

    impl Completions for Script {
        fn submit_and_wait(&mut self) -> io::Result<()> {
            self.waited += 1;
            match self.waits.pop_front() {
                Some(Ok(completions)) => {
                    self.ready.extend(completions);
                    Ok(())
                }
                Some(Err(err)) => Err(err),
                None => panic!("waited again after the script ended"),
            }
        }

        fn next_completion(&mut self) -> Option<(u64, i32)> {
            self.ready.pop_front()
        }
    }

    #[test]
    fn completions_of_other_commands_are_skipped() {
        let mut ring = Script {
            // Left over from before, and one arriving with ours.
            ready: VecDeque::from([(3, -libc::EIO)]),
            waits: VecDeque::from([Ok(vec![(4, -libc::EINVAL)]), Ok(vec![(5, 7)])]),
            ..Script::default()
        };
        assert_eq!(wait_for(&mut ring, 5).ok(), Some(7));
        assert_eq!(ring.waited, 2, "waited until its own completion came");
    }

    #[test]
    fn an_interrupted_wait_is_waited_again() {
        let eintr = || Err(io::Error::from_raw_os_error(libc::EINTR));
        let mut ring = Script {
            waits: VecDeque::from([eintr(), eintr(), Ok(vec![(9, 0)])]),
            ..Script::default()
        };
        // Returning at the interrupt would leave the command in flight on
        // a buffer its caller then frees.
        assert_eq!(wait_for(&mut ring, 9).ok(), Some(0));
        assert_eq!(ring.waited, 3);
    }

    #[test]
    fn a_failed_wait_is_an_error() {
        let mut ring = Script {
            waits: VecDeque::from([Err(io::Error::from_raw_os_error(libc::EBADF))]),
            ..Script::default()
        };
        let err = wait_for(&mut ring, 1).expect_err("the wait failed");
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }

    #[test]
    fn commands_have_their_own_user_data_and_a_broken_ring_is_not_used() {
        // /dev/null is no ublk control device, but its commands complete
        // at once (with whatever result), which drives the real ring.
        let mut ctrl = match Control::open_at(Path::new("/dev/null")) {
            Ok(ctrl) => ctrl,
            Err(err) => {
                eprintln!("skipped: no io_uring here ({err})");
                return;
            }
        };
        for expected in 1..=3 {
            if let Err(err) = ctrl.features() {
                assert!(matches!(err, CtrlError::Command { .. }), "{err}");
            }
            assert_eq!(ctrl.last_user_data, expected);
            assert!(!ctrl.broken);
        }
        assert!(ctrl.ring.completion().is_empty(), "every completion reaped");
        ctrl.broken = true;
        let err = ctrl.info(0).expect_err("broken");
        assert!(matches!(err, CtrlError::Broken { .. }), "{err}");
        assert_eq!(ctrl.last_user_data, 3, "nothing was submitted");
    }

    #[test]
    fn a_missing_control_device_says_what_to_do() {
        let err = Control::open_at(Path::new("/nonexistent/ublk-control"))
            .err()
            .expect("no such device");
        assert!(err.to_string().contains("modprobe ublk_drv"), "{err}");
    }

    #[test]
    fn a_zombie_is_not_alive() {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = child.id();
        // Exited but not reaped yet: a zombie.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while process_alive(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!process_alive(pid), "a zombie counts as alive");
        assert!(process_alive(std::process::id()));
        child.wait().expect("reap");
    }

    #[test]
    fn a_daemon_is_its_pid_and_start_time() {
        let me = std::process::id();
        let start = process_start_time(me).expect("own start time");
        assert!(daemon_alive(me, start));
        // Same pid, another start: a different process that reused the pid.
        assert!(!daemon_alive(me, start + 1));
    }

    #[test]
    fn feature_bits_have_names() {
        let names = feature_names(sys::UBLK_F_AUTO_BUF_REG | sys::UBLK_F_USER_RECOVERY);
        assert_eq!(names, vec!["USER_RECOVERY", "AUTO_BUF_REG"]);
    }
}

//! The `netblk map` daemons that serve this host's volumes. The plugin
//! starts them detached (their own process group, output to a log file,
//! readiness over a notify socket), so they keep serving when the plugin
//! exits; their device records (`/run/netblk`) are how a plugin started
//! later finds them again, and recovers the devices whose daemon is gone.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use netblk::state::{self, DeviceRecord};
use netblk::ublk::ctrl::{Control, daemon_alive};
use netblk::ublk::sys;

use crate::busy::Busy;
use crate::volume::{Context, VolumeHandle};

/// How long a daemon may take to serve its device: a recovery waits up to
/// 90 s for the kernel to let go of the old daemon.
pub const READY_TIMEOUT: Duration = Duration::from_secs(150);

/// Starts, finds, resizes and stops the map daemons.
#[derive(Debug, Clone)]
pub struct Daemons {
    /// The `netblk` binary.
    pub netblk: PathBuf,
    /// Where each daemon's output goes (`NAME.log`).
    pub log_dir: PathBuf,
    /// Mutual TLS to the storage nodes: its files are passed to every
    /// `netblk map` (`--tls-ca/--tls-cert/--tls-key`, kept in the device
    /// record for recoveries), and used for lookups (None: plaintext).
    pub tls: Option<crate::volume::Tls>,
    /// Where StorageClasses' pools are (a pool's volume is mapped with
    /// `--pool`, its nodes read from its placement record).
    pub pools: crate::pools::Pools,
}

/// A device of this host's, as its record and the kernel say.
#[derive(Debug, Clone)]
pub struct Mapped {
    pub record: DeviceRecord,
    /// Its daemon runs.
    pub alive: bool,
    /// The kernel's state of the device.
    pub kernel_state: u16,
}

impl Mapped {
    pub fn path(&self) -> String {
        format!("/dev/ublkb{}", self.record.id)
    }
}

static NEXT_SOCKET: AtomicU64 = AtomicU64::new(0);

impl Daemons {
    /// Every device with a record that the kernel still has.
    pub fn mapped(&self) -> Vec<Mapped> {
        let Ok(mut ctrl) = Control::open() else {
            return Vec::new();
        };
        state::list(&state::state_dir())
            .into_iter()
            .flatten()
            .filter_map(|record| {
                let info = ctrl.info(record.id).ok()?;
                let alive = daemon_alive(record.pid, record.pid_start);
                Some(Mapped {
                    record,
                    alive,
                    kernel_state: info.state,
                })
            })
            .collect()
    }

    /// The device serving `handle`'s volume on this host, if any.
    pub fn find(&self, handle: &VolumeHandle) -> Option<Mapped> {
        self.mapped().into_iter().find(|m| {
            m.record.volume == handle.name
                && (handle.pool.is_some() || m.record.nodes == handle.nodes)
        })
    }

    /// Maps `handle`'s volume at `size` bytes as its `context` says (queues,
    /// and the nodes' volume identities pinned if it has them) and returns
    /// its device once it serves.
    pub fn map(
        &self,
        handle: &VolumeHandle,
        size: u64,
        context: &Context,
    ) -> Result<Mapped, String> {
        let mut args = vec![
            "map".to_string(),
            "--volume".into(),
            handle.name.clone(),
            "--size".into(),
            size.to_string(),
            "--queues".into(),
            context.queues.to_string(),
        ];
        match &handle.pool {
            // Nodes, stripe unit and replicas from its placement record.
            Some(pool) => args.extend([
                "--pool".into(),
                self.pools.path(pool)?.display().to_string(),
            ]),
            None => {
                let nodes: Vec<String> = handle.nodes.iter().map(ToString::to_string).collect();
                args.extend([
                    "--stripe-unit".into(),
                    handle.stripe_unit.to_string(),
                    "--nodes".into(),
                    nodes.join(","),
                ]);
            }
        }
        if handle.replicas > 1 {
            // A pod that moved off a host that died: its daemon there may
            // still look alive to the nodes; this host's is the owner now.
            args.extend(["--replicas".into(), handle.replicas.to_string()]);
            args.push("--takeover".into());
        }
        if let Some(ids) = &context.volume_ids {
            args.push("--volume-ids".into());
            args.push(ids.join(","));
        }
        if let Some(tls) = &self.tls {
            let files = tls.files();
            for (flag, path) in [
                ("--tls-ca", &files.ca),
                ("--tls-cert", &files.cert),
                ("--tls-key", &files.key),
            ] {
                args.push(flag.into());
                args.push(path.display().to_string());
            }
        }
        self.start(&handle.name, &args)?;
        self.find(handle)
            .ok_or_else(|| format!("volume '{}' served, but its record is missing", handle.name))
    }

    /// A new daemon for `mapped`, whose daemon is gone (ublk user recovery:
    /// the device and its users never notice but for the pause).
    pub fn recover(&self, mapped: &Mapped) -> Result<(), String> {
        let args = ["map".to_string(), "--recover".into(), mapped.path()];
        self.start(&mapped.record.volume, &args)
    }

    /// Recovers every device whose daemon is gone; returns what failed.
    /// Each under its volume's claim in `busy` (see [`recover_each`]).
    pub fn recover_all(&self, busy: &Busy) -> Vec<String> {
        recover_each(
            busy,
            RECOVERY_CLAIM_WAIT,
            || self.mapped(),
            |m| self.recover(m),
        )
    }

    /// Unmaps `mapped` (drained; refused while it is mounted or held).
    pub fn unmap(&self, mapped: &Mapped) -> Result<(), String> {
        self.run(&["unmap", &mapped.path()])
    }

    /// Resizes `mapped` to `size` bytes (its daemon grows the nodes, the
    /// queues and the kernel's device).
    pub fn resize(&self, mapped: &Mapped, size: u64) -> Result<(), String> {
        self.run(&["resize", &mapped.path(), &size.to_string()])
    }

    /// Runs a `netblk` command to its end; its error output on failure.
    fn run(&self, args: &[&str]) -> Result<(), String> {
        let out = Command::new(&self.netblk)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.netblk.display()))?;
        if out.status.success() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&out.stderr);
        let text = if text.trim().is_empty() {
            String::from_utf8_lossy(&out.stdout)
        } else {
            text
        };
        Err(format!(
            "netblk {}: {}",
            args.join(" "),
            text.trim().lines().last().unwrap_or("failed")
        ))
    }

    /// Starts a detached daemon `netblk ARGS` and waits for it to say
    /// READY=1; if it exits first (or takes too long), the error carries
    /// the end of its log.
    fn start(&self, name: &str, args: &[String]) -> Result<(), String> {
        fs::create_dir_all(&self.log_dir)
            .map_err(|e| format!("cannot create {}: {e}", self.log_dir.display()))?;
        let log_path = self.log_dir.join(format!("{name}.log"));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let err_log = log
            .try_clone()
            .map_err(|e| format!("{}: {e}", log_path.display()))?;
        let socket_name = format!(
            "netblk-csi-{}-{}",
            std::process::id(),
            NEXT_SOCKET.fetch_add(1, Ordering::Relaxed)
        );
        let ready = SocketAddr::from_abstract_name(socket_name.as_bytes())
            .and_then(|addr| UnixDatagram::bind_addr(&addr))
            .map_err(|e| format!("cannot make a notify socket: {e}"))?;
        let mut child = Command::new(&self.netblk)
            .args(args)
            .env("NOTIFY_SOCKET", format!("@{socket_name}"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            // Its own process group: a signal to the plugin's group (a
            // terminal's ^C, a supervisor stopping the plugin) is not its.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.netblk.display()))?;
        let pid = child.id();
        let log_tail = || tail(&log_path, start);
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut buf = [0u8; 512];
        ready
            .set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(|e| e.to_string())?;
        loop {
            if let Ok(n) = ready.recv(&mut buf)
                && String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "READY=1")
            {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "netblk {} exited ({status}): {}",
                    args.join(" "),
                    log_tail()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "netblk {} (pid {pid}) did not serve within {} s: {}",
                    args.join(" "),
                    READY_TIMEOUT.as_secs(),
                    log_tail()
                ));
            }
        }
        tracing::info!(pid, command = %args.join(" "), log = %log_path.display(), "daemon serving");
        // Reaped when it exits, so it never lingers as a zombie.
        let _ = std::thread::Builder::new()
            .name(format!("reap-{pid}"))
            .spawn(move || child.wait());
        Ok(())
    }
}

/// How long start-up recovery waits for an operation on a volume (which
/// may itself be a recovery, up to [`READY_TIMEOUT`]).
pub const RECOVERY_CLAIM_WAIT: Duration = Duration::from_secs(180);

/// A device as start-up recovery sees it.
pub trait Recoverable {
    fn id(&self) -> u32;
    fn volume(&self) -> &str;
    /// Its daemon is gone, and the kernel still lets it be recovered.
    fn needs_recovery(&self) -> bool;
}

impl Recoverable for Mapped {
    fn id(&self) -> u32 {
        self.record.id
    }

    fn volume(&self) -> &str {
        &self.record.volume
    }

    fn needs_recovery(&self) -> bool {
        !self.alive && self.kernel_state != sys::UBLK_S_DEV_DEAD
    }
}

/// Start-up recovery: `recover` for every device of `list` that needs it,
/// each under its volume's claim in `busy` (the one NodeStage takes, and
/// recovers under too: waited for up to `wait`), and only if it still
/// needs it once claimed (looked at again then). Returns what failed.
pub fn recover_each<D: Recoverable>(
    busy: &Busy,
    wait: Duration,
    list: impl Fn() -> Vec<D>,
    recover: impl Fn(&D) -> Result<(), String>,
) -> Vec<String> {
    let mut failed = Vec::new();
    for device in list() {
        if !device.needs_recovery() {
            continue;
        }
        let path = format!("/dev/ublkb{}", device.id());
        let claim = match busy.wait_claim(device.volume(), wait) {
            Ok(claim) => claim,
            Err(status) => {
                tracing::error!(device = %path, error = %status.message(), "not recovered");
                failed.push(format!("{path}: {}", status.message()));
                continue;
            }
        };
        // Looked at again under the claim: a NodeStage may have recovered
        // it (or unstaged it) while this waited.
        let Some(device) = list().into_iter().find(|d| d.id() == device.id()) else {
            continue;
        };
        if !device.needs_recovery() {
            tracing::info!(device = %path, "served again meanwhile: nothing to recover");
            continue;
        }
        tracing::info!(device = %path, volume = %device.volume(), "recovering a device whose daemon is gone");
        if let Err(why) = recover(&device) {
            tracing::error!(device = %path, error = %why, "recovery failed");
            failed.push(format!("{path}: {why}"));
        }
        drop(claim);
    }
    failed
}

/// The last lines a daemon wrote to `path` past `from`.
fn tail(path: &Path, from: u64) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        let _ = file.seek(SeekFrom::Start(from));
        let _ = file.take(64 << 10).read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    let last = &lines[lines.len().saturating_sub(5)..];
    if last.is_empty() {
        "(no output)".into()
    } else {
        last.join(" | ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex, PoisonError};

    /// A device: id, volume, whether its daemon runs.
    #[derive(Debug, Clone)]
    struct Device(u32, &'static str, bool);

    impl Recoverable for Device {
        fn id(&self) -> u32 {
            self.0
        }
        fn volume(&self) -> &str {
            self.1
        }
        fn needs_recovery(&self) -> bool {
            !self.2
        }
    }

    /// A NodeStage holds volume `a`'s claim and recovers its device while
    /// start-up recovery runs: start-up recovery waits for it, then finds
    /// the device served and leaves it; a NodeStage arriving while start-up
    /// recovery works on a volume is told to come back (ABORTED).
    #[test]
    fn start_up_recovery_and_node_stage_never_recover_one_device_together() {
        let busy = Busy::default();
        let host = Arc::new(Mutex::new(vec![
            Device(0, "a", false),
            Device(1, "b", false),
        ]));
        let recoveries = Arc::new(Mutex::new(Vec::new()));
        let stage = busy.claim("a").expect("NodeStage claims a");
        let staging = {
            let host = Arc::clone(&host);
            let recoveries = Arc::clone(&recoveries);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(300));
                recoveries
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(0);
                host.lock().unwrap_or_else(PoisonError::into_inner)[0].2 = true;
                drop(stage);
            })
        };
        let failed = recover_each(
            &busy,
            Duration::from_secs(10),
            || host.lock().unwrap_or_else(PoisonError::into_inner).clone(),
            |d: &Device| {
                // Meanwhile a NodeStage of the same volume is turned away.
                let code = busy.claim(d.volume()).map(drop).map_err(|s| s.code());
                assert_eq!(code, Err(tonic::Code::Aborted), "volume {}", d.volume());
                recoveries
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(d.id());
                host.lock().unwrap_or_else(PoisonError::into_inner)[d.id() as usize].2 = true;
                Ok(())
            },
        );
        staging.join().expect("NodeStage");
        assert!(failed.is_empty(), "{failed:?}");
        let mut done = recoveries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        done.sort_unstable();
        assert_eq!(done, [0, 1], "each device recovered once");
    }
}

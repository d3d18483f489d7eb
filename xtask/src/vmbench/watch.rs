//! The host side while the guest measures: other load on the host, and
//! pausing the guest (QEMU monitor) while it is busy.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::*;

/// The host's CPU time: (busy, total) jiffies over all CPUs, and the
/// number of CPUs, from the text of /proc/stat.
pub(super) fn host_cpu(stat: &str) -> Option<(u64, u64, u32)> {
    let first = stat.lines().next()?;
    let fields: Vec<u64> = first
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal ...
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4).unwrap_or(&0);
    let cpus = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .count();
    Some((
        total.checked_sub(idle)?,
        total,
        u32::try_from(cpus).ok()?.max(1),
    ))
}

/// A process's parent, name and CPU time (user + system jiffies), from the
/// text of /proc/PID/stat.
pub(super) fn process_cpu(stat: &str) -> Option<(u32, &str, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?;
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // After the name: state ppid ... utime (field 14) stime (15).
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, name, utime + stime))
}

/// The QEMU this process started, by its pid.
pub(super) fn our_qemu() -> Option<u32> {
    let me = std::process::id();
    fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
        let (ppid, name, _) = process_cpu(&stat)?;
        (ppid == me && name.starts_with("qemu-system")).then_some(pid)
    })
}

/// Host CPU figures at one moment: (busy, total, CPUs, QEMU's CPU time).
pub(super) fn host_now(qemu: Option<u32>) -> Option<(u64, u64, u32, u64)> {
    let (busy, total, cpus) = host_cpu(&fs::read_to_string("/proc/stat").ok()?)?;
    let stat = fs::read_to_string(format!("/proc/{}/stat", qemu?)).ok()?;
    let (_, _, qemu_cpu) = process_cpu(&stat)?;
    Some((busy, total, cpus, qemu_cpu))
}

/// How many host CPUs, on average, processes other than QEMU kept busy
/// between two moments.
pub(super) fn others_load(
    before: (u64, u64, u32, u64),
    after: (u64, u64, u32, u64),
) -> Option<f64> {
    let total = after.1.checked_sub(before.1).filter(|t| *t > 0)?;
    let busy = after.0.saturating_sub(before.0);
    let qemu = after.3.saturating_sub(before.3);
    Some(busy.saturating_sub(qemu) as f64 * f64::from(after.2) / total as f64)
}

/// What the watcher saw of the host while the guest measured.
#[derive(Debug, Default)]
pub struct HostWatch {
    /// Host CPUs that other processes used, on average while the guest ran
    /// (pauses left out), by run id.
    pub loads: BTreeMap<u32, f64>,
    /// The same over the whole measurement.
    pub overall: Option<f64>,
    /// How often, and how long in all, the guest was paused for other work.
    pub pauses: u32,
    pub paused: Duration,
    /// The host's CPUs.
    pub cpus: Option<u32>,
}

/// The guest is paused when other processes used this many host CPUs over
/// the last tick...
pub(super) const PAUSE_ABOVE: f64 = 0.5;
/// ...and resumed once they used less than this for `QUIET_FOR`, or after
/// `LONGEST_PAUSE`; pauses stop once they add up to `PAUSE_BUDGET`.
pub(super) const RESUME_BELOW: f64 = 0.3;
pub(super) const QUIET_FOR: Duration = Duration::from_secs(2);
pub(super) const LONGEST_PAUSE: Duration = Duration::from_secs(120);
pub(super) const PAUSE_BUDGET: Duration = Duration::from_secs(15 * 60);
pub(super) const TICK: Duration = Duration::from_millis(250);

/// QEMU's human monitor, for `stop` and `cont`.
pub(super) struct Monitor(UnixStream);

impl Monitor {
    fn connect(path: &Path) -> Option<Monitor> {
        let stream = UnixStream::connect(path).ok()?;
        stream.set_nonblocking(true).ok()?;
        let mut monitor = Monitor(stream);
        monitor.drain();
        Some(monitor)
    }

    /// Sends one command; its echo and prompt are read and dropped.
    fn command(&mut self, command: &str) -> bool {
        self.drain();
        let sent = self.0.write_all(format!("{command}\n").as_bytes()).is_ok();
        self.drain();
        sent
    }

    fn drain(&mut self) {
        let mut buf = [0u8; 4096];
        while matches!(self.0.read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// An average load over some time.
#[derive(Default)]
pub(super) struct Average {
    pub(super) cpu_seconds: f64,
    pub(super) seconds: f64,
}

impl Average {
    fn add(&mut self, load: f64, time: Duration) {
        self.cpu_seconds += load * time.as_secs_f64();
        self.seconds += time.as_secs_f64();
    }

    fn get(&self) -> Option<f64> {
        (self.seconds > 0.0).then(|| self.cpu_seconds / self.seconds)
    }
}

/// Follows the guest's console log while it runs and prints each run as it
/// is reported; measures how much host CPU other processes take meanwhile
/// and, with a `monitor`, pauses the guest (its clock too) while they take
/// much, so they do not slow the emulated CPUs in the middle of a run.
pub(super) fn watch(
    log: &Path,
    monitor: Option<&Path>,
    total: u64,
    stop: &AtomicBool,
) -> HostWatch {
    let mut seen = HostWatch::default();
    let (mut offset, mut partial, mut runs) = (0u64, String::new(), 0u64);
    let started = Instant::now();
    let (mut qemu, mut control) = (None, None);
    let mut last: Option<((u64, u64, u32, u64), Instant)> = None;
    let (mut measuring, mut run, mut whole) = (false, Average::default(), Average::default());
    let mut paused: Option<(Instant, Duration)> = None;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(TICK);
        if qemu.is_none() {
            qemu = our_qemu();
        }
        if let (None, Some(path)) = (&control, monitor) {
            control = Monitor::connect(path);
        }
        let now = Instant::now();
        let sample = host_now(qemu);
        let load = last
            .zip(sample)
            .and_then(|((before, _), after)| others_load(before, after));
        if let (Some(load), Some((_, at))) = (load, last) {
            let tick = now - at;
            match &mut paused {
                None => {
                    run.add(load, tick);
                    if measuring {
                        whole.add(load, tick);
                    }
                    if measuring
                        && load >= PAUSE_ABOVE
                        && seen.paused < PAUSE_BUDGET
                        && control.as_mut().is_some_and(|c| c.command("stop"))
                    {
                        paused = Some((now, Duration::ZERO));
                        seen.pauses += 1;
                    }
                }
                Some((since, quiet)) => {
                    *quiet = if load < RESUME_BELOW {
                        *quiet + tick
                    } else {
                        Duration::ZERO
                    };
                    let long = now - *since;
                    if (*quiet >= QUIET_FOR
                        || long >= LONGEST_PAUSE
                        || seen.paused + long >= PAUSE_BUDGET)
                        && control.as_mut().is_some_and(|c| c.command("cont"))
                    {
                        seen.paused += long;
                        eprintln!(
                            "    (guest paused {long:.1?} while the host was busy with other work)"
                        );
                        paused = None;
                    }
                }
            }
        }
        if let Some(sample) = sample {
            last = Some((sample, now));
            seen.cpus = Some(sample.2);
        }
        let Ok(mut file) = fs::File::open(log) else {
            continue;
        };
        let mut fresh = Vec::new();
        if file.seek(SeekFrom::Start(offset)).is_err() || file.read_to_end(&mut fresh).is_err() {
            continue;
        }
        offset += fresh.len() as u64;
        partial.push_str(&String::from_utf8_lossy(&fresh));
        while let Some(end) = partial.find('\n') {
            let line: String = partial.drain(..=end).collect();
            if let Some(rest) = marked(&line, "NETBLK-BENCH-RUN ") {
                runs += 1;
                let fields: Vec<&str> = rest.split_whitespace().collect();
                let load = run.get();
                if let (Some(id), Some(load)) = (fields.first().and_then(|f| f.parse().ok()), load)
                {
                    seen.loads.insert(id, load);
                }
                eprintln!(
                    "    [{runs}/{total} {:.0?}] {}{}",
                    started.elapsed(),
                    fields.get(1..5).unwrap_or_default().join(" "),
                    load.filter(|l| *l >= 0.05)
                        .map_or(String::new(), |l| format!("  (other host load {l:.1} CPU)"))
                );
                run = Average::default();
            } else if line.contains("NETBLK-BENCH-PLAN") {
                measuring = true;
            } else if line.contains("NETBLK-BENCH-DONE") {
                measuring = false;
            } else if line.starts_with("== ") || line.contains("NETBLK-BENCH-FAIL") {
                eprintln!("    {}", line.trim_end());
                if line.contains(": measuring") {
                    run = Average::default();
                }
            }
        }
    }
    if let (Some((since, _)), Some(c)) = (paused, control.as_mut()) {
        seen.paused += since.elapsed();
        c.command("cont");
    }
    seen.overall = whole.get();
    seen
}

//! Starting `netblk-mock-node`s as child processes on 127.0.0.1, for the
//! benchmark and the demo.

use std::io::{self, BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

/// Mock nodes started as child processes; stopped on drop.
pub struct MockNodes(Vec<Child>);

impl Drop for MockNodes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Finds `netblk-mock-node`: given, `$NETBLK_MOCK_NODE`, or beside this program.
pub fn mock_node_bin(given: Option<&PathBuf>) -> io::Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path.clone());
    }
    if let Some(path) = std::env::var_os("NETBLK_MOCK_NODE") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    let beside = exe.with_file_name("netblk-mock-node");
    if beside.exists() {
        return Ok(beside);
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "netblk-mock-node not found beside {}: build it (cargo build --release) or pass --mock-node",
            exe.display()
        ),
    ))
}

pub fn start_mock_nodes(
    count: usize,
    bin: &PathBuf,
    store: &str,
    extra: &[&str],
) -> io::Result<(MockNodes, Vec<SocketAddr>)> {
    let mut nodes = MockNodes(Vec::new());
    let mut addrs = Vec::new();
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    for _ in 0..count {
        let mut command = Command::new(bin);
        command
            .args(["--listen", "127.0.0.1:0", "--store", store])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // The nodes end with this program however it ends (killed too):
        // left running, they would hold its standard error open, and a
        // caller waiting for its output would wait for ever. The signal
        // follows the thread that starts them, which is the one that owns
        // (and drops) them.
        // SAFETY: between fork and exec the closure only makes
        // async-signal-safe calls (prctl, getppid, kill, getpid) and
        // touches no memory of the parent's but a copied integer.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have ended before the request took hold.
                if libc::getppid() != parent {
                    libc::kill(libc::getpid(), libc::SIGTERM);
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting {}: {e}", bin.display())))?;
        let stdout = child.stdout.take();
        nodes.0.push(child);
        let (tx, rx) = crossbeam_channel::bounded(1);
        thread::spawn(move || {
            let mut first = String::new();
            if let Some(out) = stdout {
                let mut lines = BufReader::new(out);
                let _ = lines.read_line(&mut first);
                let _ = tx.send(first);
                // Keep the pipe drained.
                let mut sink = Vec::new();
                let _ = lines.read_to_end(&mut sink);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "mock node did not start"))?;
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| {
                if line.is_empty() {
                    io::Error::other(format!(
                        "{} exited before it listened (its error is above)",
                        bin.display()
                    ))
                } else {
                    io::Error::other(format!("unexpected mock node output {line:?}"))
                }
            })?;
        addrs.push(addr);
    }
    Ok((nodes, addrs))
}

impl MockNodes {
    /// No nodes (the caller uses its own).
    pub fn none() -> MockNodes {
        MockNodes(Vec::new())
    }

    /// The nodes' process ids.
    pub fn pids(&self) -> Vec<u32> {
        self.0.iter().map(Child::id).collect()
    }
}

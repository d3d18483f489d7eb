//! `cargo xtask vm-test`: boots real Debian kernels that have `ublk_drv`
//! under QEMU (software emulation) and runs netblk's scenarios inside: shell
//! scripts in `scenarios/`, one per subject, after `scenarios/common.sh`.
//! How the guest is put together: docs/testing.md, "Real kernels".
//!
//! Downloads are cached outside the work tree (`$NETBLK_VM_CACHE`, default
//! `~/.cache/netblk-vm`), keyed by kernel version: a second run downloads
//! nothing.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A kernel the matrix boots, and what netblk should find in it.
pub struct Kernel {
    /// Short name for `--kernel`.
    pub name: &'static str,
    pub version: &'static str,
    /// Debian packages holding the image and the modules.
    pub packages: &'static [&'static str],
    /// What the kernel is in the zero-copy table of docs/design.md.
    pub expect: &'static str,
}

pub const KERNELS: &[Kernel] = &[
    Kernel {
        name: "6.12",
        version: "6.12.117+deb13-amd64",
        packages: &["linux-image-6.12.117+deb13-amd64"],
        expect: "copy",
    },
    Kernel {
        name: "6.17",
        version: "6.17.13+deb13-amd64",
        packages: &["linux-image-6.17.13+deb13-amd64"],
        expect: "partial zero copy",
    },
    Kernel {
        name: "7.3",
        version: "7.3.4+deb13-amd64",
        packages: &[
            "linux-binary-7.3.4+deb13-amd64",
            "linux-modules-7.3.4+deb13-amd64",
        ],
        expect: "full zero copy",
    },
];

const SOURCES: &str = "deb http://deb.debian.org/debian trixie main
deb http://deb.debian.org/debian trixie-backports main
deb http://deb.debian.org/debian sid main
";

/// What every guest script starts with: the helpers (`fail`, `wait_dev`,
/// `wait_listening`) and the state each scenario starts from.
const COMMON: &str = include_str!("scenarios/common.sh");

/// The scenarios by name, in the order every run takes them. Each starts
/// from what `common.sh` sets up and leaves no device behind, so any
/// selection of them runs on its own.
pub const SCENARIOS: &[(&str, &str)] = &[
    ("refusals", include_str!("scenarios/refusals.sh")),
    ("blocksize", include_str!("scenarios/blocksize.sh")),
    ("basic", include_str!("scenarios/basic.sh")),
    ("fs", include_str!("scenarios/fs.sh")),
    ("reliability", include_str!("scenarios/reliability.sh")),
    ("orphan", include_str!("scenarios/orphan.sh")),
    ("trust", include_str!("scenarios/trust.sh")),
    ("replicas", include_str!("scenarios/replicas.sh")),
    ("resync", include_str!("scenarios/resync.sh")),
    ("pool", include_str!("scenarios/pool.sh")),
    ("recovery", include_str!("scenarios/recovery.sh")),
    ("deploy", include_str!("scenarios/deploy.sh")),
    ("resize", include_str!("scenarios/resize.sh")),
    ("observe", include_str!("scenarios/observe.sh")),
    ("digest", include_str!("scenarios/digest.sh")),
    ("tls", include_str!("scenarios/tls.sh")),
    ("csi", include_str!("scenarios/csi.sh")),
];

/// The line a guest prints when every scenario passed.
const PASS: &str = "NETBLK-VM-RESULT: pass";

pub fn scenario_names() -> String {
    SCENARIOS
        .iter()
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The script the guest runs after boot: `common.sh`, then the scenarios
/// named in `only` (all if it is empty) in their fixed order, each announced
/// by an `== scenario NAME` line; its last line is the verdict.
pub fn scenario_script(only: &[String]) -> Result<String, String> {
    if let Some(unknown) = only
        .iter()
        .find(|name| !SCENARIOS.iter().any(|(n, _)| n == name))
    {
        return Err(format!(
            "unknown scenario '{unknown}'; choose from {}",
            scenario_names()
        ));
    }
    let mut script = String::from(COMMON);
    for (name, body) in SCENARIOS
        .iter()
        .filter(|(name, _)| only.is_empty() || only.iter().any(|o| o == name))
    {
        script.push_str(&format!(
            "\n# ---- scenarios/{name}.sh\necho \"== scenario {name}\"\n{body}"
        ));
    }
    script.push_str(&format!("\necho \"{PASS}\"\n"));
    Ok(script)
}

/// What a manual run adds to `vm-test`, from the environment (for tools
/// that are not part of the project, such as the CSI sanity suite; see
/// README, Test):
/// - `NETBLK_VM_EXTRA_BINS`: host programs (static binaries best),
///   `:`-separated absolute paths, copied to the guest's /bin;
/// - `NETBLK_VM_EXTRA_CMD`: a shell command the guest runs after the
///   chosen scenarios (their nodes and plugins still up), before the
///   verdict; the run fails if it fails;
/// - `NETBLK_VM_TIMEOUT`: seconds the guest may run (default 600).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Manual {
    pub bins: Vec<PathBuf>,
    pub command: Option<String>,
    pub timeout: Option<Duration>,
}

impl Manual {
    pub fn from_env() -> Result<Manual, String> {
        Manual::parse(|name| std::env::var(name).ok())
    }

    fn parse(var: impl Fn(&str) -> Option<String>) -> Result<Manual, String> {
        let bins = var("NETBLK_VM_EXTRA_BINS")
            .unwrap_or_default()
            .split(':')
            .filter(|f| !f.is_empty())
            .map(|f| {
                let path = PathBuf::from(f);
                if path.is_absolute() && path.is_file() {
                    Ok(path)
                } else {
                    Err(format!(
                        "NETBLK_VM_EXTRA_BINS: '{f}' is not an absolute path of a file"
                    ))
                }
            })
            .collect::<Result<_, _>>()?;
        let timeout = var("NETBLK_VM_TIMEOUT")
            .map(|t| {
                t.parse::<u64>()
                    .ok()
                    .filter(|s| (1..=86_400).contains(s))
                    .map(Duration::from_secs)
                    .ok_or_else(|| format!("NETBLK_VM_TIMEOUT: '{t}' is not 1 to 86400 seconds"))
            })
            .transpose()?;
        Ok(Manual {
            bins,
            command: var("NETBLK_VM_EXTRA_CMD").filter(|c| !c.trim().is_empty()),
            timeout,
        })
    }

    /// `script` with the command run before its verdict line.
    pub fn script(&self, script: String) -> String {
        let Some(command) = &self.command else {
            return script;
        };
        let verdict = format!("\necho \"{PASS}\"\n");
        let body = script.strip_suffix(&verdict).unwrap_or(&script);
        format!(
            "{body}\n# ---- NETBLK_VM_EXTRA_CMD\necho \"== extra command\"\n( {command}\n) || fail \"NETBLK_VM_EXTRA_CMD failed\"{verdict}"
        )
    }
}

fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed ({status})"))
    }
}

pub fn need_tools() -> Result<(), String> {
    let missing: Vec<&str> = [
        "qemu-system-x86_64",
        "busybox",
        "cpio",
        "gzip",
        "xz",
        "dpkg-deb",
        "apt-get",
    ]
    .into_iter()
    .filter(|tool| {
        !Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "missing host tools: {} (apt-get install qemu-system-x86 busybox-static cpio xz-utils fio e2fsprogs xfsprogs iproute2)",
            missing.join(", ")
        ))
    }
}

fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("NETBLK_VM_CACHE") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache/netblk-vm")
}

/// Downloads (once) and unpacks (once) a kernel; returns (vmlinuz, the
/// unpacked tree).
fn fetch_kernel(cache: &Path, kernel: &Kernel) -> Result<(PathBuf, PathBuf), String> {
    let apt = cache.join("apt");
    let lists = apt.join("lists");
    fs::create_dir_all(lists.join("partial")).map_err(|e| e.to_string())?;
    fs::write(apt.join("sources.list"), SOURCES).map_err(|e| e.to_string())?;
    let opts = [
        format!(
            "-oDir::Etc::SourceList={}",
            apt.join("sources.list").display()
        ),
        "-oDir::Etc::SourceParts=/dev/null".to_string(),
        format!("-oDir::State::Lists={}", lists.display()),
        format!("-oDir::Cache={}", apt.join("cache").display()),
    ];
    let debs = cache.join("debs").join(kernel.version);
    fs::create_dir_all(&debs).map_err(|e| e.to_string())?;
    let have = |pkg: &str| {
        fs::read_dir(&debs)
            .map(|entries| {
                entries.flatten().any(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&format!("{pkg}_"))
                })
            })
            .unwrap_or(false)
    };
    let missing: Vec<&str> = kernel
        .packages
        .iter()
        .copied()
        .filter(|p| !have(p))
        .collect();
    if !missing.is_empty() {
        let fresh = fs::read_dir(&lists).map(|d| d.count() > 1).unwrap_or(false);
        if !fresh {
            eprintln!("==> apt-get update (private state in {})", apt.display());
            run(
                Command::new("apt-get")
                    .args(&opts)
                    .arg("update")
                    .stdout(Stdio::null()),
                "apt-get update",
            )?;
        }
        eprintln!("==> downloading {}", missing.join(" "));
        run(
            Command::new("apt-get")
                .args(&opts)
                .arg("download")
                .args(&missing)
                .current_dir(&debs),
            "apt-get download",
        )?;
    }
    let root = cache.join("kernels").join(kernel.version);
    let marker = root.join(".unpacked");
    if !marker.exists() {
        fs::create_dir_all(&root).map_err(|e| e.to_string())?;
        for entry in fs::read_dir(&debs).map_err(|e| e.to_string())?.flatten() {
            run(
                Command::new("dpkg-deb")
                    .arg("-x")
                    .arg(entry.path())
                    .arg(&root),
                "dpkg-deb -x",
            )?;
        }
        fs::write(&marker, "").map_err(|e| e.to_string())?;
    }
    let vmlinuz = find_file(&root, &["vmlinuz", &format!("vmlinuz-{}", kernel.version)])
        .ok_or_else(|| format!("no vmlinuz in {}", root.display()))?;
    Ok((vmlinuz, root))
}

/// The first file under `root` with one of these names.
fn find_file(root: &Path, names: &[&str]) -> Option<PathBuf> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).ok()?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if names
                .iter()
                .any(|n| entry.file_name().to_string_lossy() == *n)
            {
                return Some(path);
            }
        }
    }
    None
}

/// A module's contents, decompressed.
fn module_bytes(path: &Path) -> Result<Vec<u8>, String> {
    if path.extension().is_some_and(|e| e == "xz") {
        let out = Command::new("xz")
            .arg("-dc")
            .arg(path)
            .output()
            .map_err(|e| format!("xz: {e}"))?;
        if !out.status.success() {
            return Err(format!("xz -d {} failed", path.display()));
        }
        Ok(out.stdout)
    } else {
        fs::read(path).map_err(|e| e.to_string())
    }
}

/// Module `name` and everything it depends on, dependencies first, read from
/// each module's `depends=` field (the packages ship no modules.dep).
fn modules_with_deps(
    root: &Path,
    name: &str,
    out: &mut Vec<(String, Vec<u8>)>,
) -> Result<(), String> {
    if out.iter().any(|(n, _)| n == name) {
        return Ok(());
    }
    let files = [
        format!("{name}.ko.xz"),
        format!("{name}.ko"),
        format!("{}.ko.xz", name.replace('_', "-")),
    ];
    let names: Vec<&str> = files.iter().map(String::as_str).collect();
    let path = find_file(root, &names).ok_or_else(|| format!("module {name} not found"))?;
    let bytes = module_bytes(&path)?;
    let depends = bytes
        .split(|b| *b == 0)
        .find_map(|field| field.strip_prefix(b"depends="))
        .map(|d| String::from_utf8_lossy(d).to_string())
        .unwrap_or_default();
    for dep in depends.split(',').filter(|d| !d.is_empty()) {
        modules_with_deps(root, dep, out)?;
    }
    out.push((name.to_string(), bytes));
    Ok(())
}

/// Builds the guest's binaries: static, so they need no libraries.
pub fn build_static(root: &Path) -> Result<PathBuf, String> {
    let target = "x86_64-unknown-linux-gnu";
    eprintln!("==> building static netblk binaries");
    run(
        Command::new(crate::cargo_bin())
            .args([
                "build",
                "--release",
                "--target",
                target,
                "-p",
                "netblk",
                "-p",
                "netblk-mock-node",
                "-p",
                "netblk-csi",
                "--bin",
                "netblk",
                "--bin",
                "netblk-mock-node",
                "--bin",
                "netblk-csi",
                "-p",
                "netblk-tests",
                "--bin",
                "netblk-csi-check",
            ])
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .current_dir(root),
        "static build",
    )?;
    Ok(target_dir(root).join(target).join("release"))
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` (relative to the workspace
/// root) if set, else `target/` in the workspace.
pub fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

/// What a guest carries beyond what every guest has (netblk, the mock node,
/// fio, e2fsprogs, `ublk_drv` and ext4).
#[derive(Default)]
pub struct Extras<'a> {
    /// Host programs copied to the guest's /bin, with the libraries they load.
    pub tools: &'a [&'a str],
    /// Host files (plugins) copied to the same path in the guest, with the
    /// libraries they load.
    pub files: &'a [PathBuf],
    /// Modules loaded at boot after the default ones: name and parameters
    /// (its dependencies are loaded first, without parameters).
    pub modules: &'a [(&'a str, String)],
    /// Host programs given by path, copied to the guest's /bin (with the
    /// libraries they load).
    pub bins: &'a [PathBuf],
}

fn make_initramfs(
    work: &Path,
    bins: &Path,
    kernel_root: &Path,
    expect: &str,
    script: &str,
    extras: &Extras,
) -> Result<PathBuf, String> {
    let stage = work.join("stage");
    let _ = fs::remove_dir_all(&stage);
    for dir in [
        "bin",
        "sbin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "lib/modules",
    ] {
        fs::create_dir_all(stage.join(dir)).map_err(|e| e.to_string())?;
    }
    let busybox = which("busybox")?;
    fs::copy(&busybox, stage.join("bin/busybox")).map_err(|e| format!("busybox: {e}"))?;
    for bin in [
        "netblk",
        "netblk-mock-node",
        "netblk-csi",
        "netblk-csi-check",
    ] {
        // The demo finds the mock node beside netblk, as in an install.
        fs::copy(bins.join(bin), stage.join("bin").join(bin)).map_err(|e| format!("{bin}: {e}"))?;
    }
    // Test tools from the host, with the libraries they load.
    for tool in [
        "fio",
        "mkfs.ext4",
        "e2fsck",
        "resize2fs",
        "mkfs.xfs",
        "xfs_growfs",
    ]
    .iter()
    .chain(extras.tools)
    {
        copy_with_libs(&which(tool)?, &stage)?;
    }
    for bin in extras.bins {
        copy_with_libs(bin, &stage)?;
    }
    // iproute2's ip (network namespaces and veth links of the scenarios'
    // own), beside busybox's smaller `ip`, which the init's applet links
    // keep.
    let ip = which("ip")?;
    fs::copy(&ip, stage.join("bin/ip-full")).map_err(|e| format!("{}: {e}", ip.display()))?;
    copy_libs(&ip, &stage)?;
    // Throwaway certificates for the TLS scenario: a CA, a node certificate
    // for 127.0.0.1 and a client certificate, in /etc/netblk/tls.
    let tls_dir = stage.join("etc/netblk/tls");
    fs::create_dir_all(&tls_dir).map_err(|e| e.to_string())?;
    netblk_tls::testpki::standard(&tls_dir).map_err(|e| format!("test certificates: {e}"))?;
    for file in extras.files {
        let dest = stage.join(file.strip_prefix("/").unwrap_or(file));
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        }
        fs::copy(file, &dest).map_err(|e| format!("{}: {e}", file.display()))?;
        copy_libs(file, &stage)?;
    }
    let mut modules = Vec::new();
    // ext4 and xfs (libcrc32c, when it loads) ask the crypto API for
    // crc32c; older kernels have it as a module, loaded first. The kernel's
    // TLS asks it for gcm(aes) (and chacha20poly1305): their templates and
    // implementations are modules too where the kernel has them so.
    for name in [
        "crc32c_generic",
        "crc32c_intel",
        "gcm",
        "ghash_generic",
        "ghash_clmulni_intel",
        "aesni_intel",
        "chacha20poly1305",
        "tls",
        "veth",
    ] {
        if modules_with_deps(kernel_root, name, &mut modules).is_err() {
            eprintln!("    (no {name} module in this kernel)");
        }
    }
    for name in ["ublk_drv", "ext4", "xfs"] {
        modules_with_deps(kernel_root, name, &mut modules)?;
    }
    for (name, _) in extras.modules {
        modules_with_deps(kernel_root, name, &mut modules)?;
    }
    let mut insmods = String::new();
    for (name, bytes) in &modules {
        fs::write(stage.join(format!("lib/modules/{name}.ko")), bytes)
            .map_err(|e| e.to_string())?;
        let params = extras
            .modules
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, p)| p.as_str());
        insmods.push_str(&format!(
            "insmod /lib/modules/{name}.ko {params} || echo 'NETBLK-VM-FAIL: insmod {name}'\n"
        ));
    }
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox echo {INIT_MARKER}\n/bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n\
         mount -t tmpfs tmp /tmp\nmount -t tmpfs run /run\nip link set lo up\n\
         mkdir -p /etc && echo 'root:x:0:0::/:/bin/sh' > /etc/passwd && \
         echo 'nobody:x:65534:65534::/:/bin/sh' >> /etc/passwd && \
         printf 'root:x:0:\\nnogroup:x:65534:\\n' > /etc/group\n\
         {insmods}export PATH=/bin:/sbin RUST_LOG=info EXPECT='{expect}'\n{script}\npoweroff -f\n"
    );
    let init_path = stage.join("init");
    fs::write(&init_path, init).map_err(|e| e.to_string())?;
    run(Command::new("chmod").arg("+x").arg(&init_path), "chmod")?;
    let initrd = work.join("initrd.gz");
    run(
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "find . | cpio -o -H newc 2>/dev/null | gzip -1 > {}",
                initrd.display()
            ))
            .current_dir(&stage),
        "cpio",
    )?;
    Ok(initrd)
}

/// Copies a dynamically linked program into the guest's /bin, and every
/// library `ldd` lists to the same path in the guest.
fn copy_with_libs(program: &Path, stage: &Path) -> Result<(), String> {
    let name = program.file_name().ok_or("program without a name")?;
    fs::copy(program, stage.join("bin").join(name))
        .map_err(|e| format!("{}: {e}", program.display()))?;
    copy_libs(program, stage)
}

/// Copies every library `ldd` lists for `program` (or a shared object) to
/// the same path in the guest.
fn copy_libs(program: &Path, stage: &Path) -> Result<(), String> {
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .map_err(|e| format!("ldd: {e}"))?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        let Some(path) = path.filter(|p| p.starts_with('/')) else {
            continue;
        };
        let dest = stage.join(path.trim_start_matches('/'));
        if dest.exists() {
            continue;
        }
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        }
        fs::copy(path, &dest).map_err(|e| format!("{path}: {e}"))?;
    }
    Ok(())
}

pub fn which(tool: &str) -> Result<PathBuf, String> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map_err(|e| e.to_string())?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if path.is_empty() {
        Err(format!("{tool} not found"))
    } else {
        Ok(PathBuf::from(path))
    }
}

/// Boots the kernel with the initramfs; returns the serial console output.
/// With a `monitor` path, QEMU's human monitor listens on that Unix socket
/// (`stop` and `cont` pause and resume the guest, its clock included).
fn boot(
    vmlinuz: &Path,
    initrd: &Path,
    log: &Path,
    timeout: Duration,
    monitor: Option<&Path>,
) -> Result<String, String> {
    let out = fs::File::create(log).map_err(|e| e.to_string())?;
    let mut qemu = Command::new("qemu-system-x86_64");
    if let Some(path) = monitor {
        let _ = fs::remove_file(path);
        qemu.arg("-monitor")
            .arg(format!("unix:{},server=on,wait=off", path.display()));
    }
    let mut child = qemu
        .args([
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            // 3 GiB: the scenarios' memory-store nodes and tmpfs stores
            // grew past 2 GiB (the kernel's OOM killer took the shared
            // mock nodes during the tls scenario, on 6.17 and 7.3).
            "-m",
            "3072",
            "-smp",
            "2",
        ])
        .args(["-nographic", "-no-reboot", "-kernel"])
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .stdin(Stdio::null())
        .stdout(out.try_clone().map_err(|e| e.to_string())?)
        .stderr(out)
        .spawn()
        .map_err(|e| format!("qemu: {e}"))?;
    let start = Instant::now();
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let text = fs::read_to_string(log).unwrap_or_default();
            return Err(format!(
                "the guest did not finish within {timeout:?}; its log:\n{text}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(fs::read_to_string(log).unwrap_or_default())
}

/// What the guest runs for `cargo xtask vm-demo`: `netblk demo`, used the way
/// its output suggests, then stopped with Ctrl-C (SIGINT).
const DEMO: &str = r##"
fail() { echo "NETBLK-VM-FAIL: $*"; cat /tmp/demo.log; echo "NETBLK-VM-RESULT: fail"; poweroff -f; }
echo "== netblk demo inside a $(uname -r) guest"
netblk demo >/tmp/demo.out 2>/tmp/demo.log &
DEMO=$!
for i in $(seq 100); do DEV=$(head -n1 /tmp/demo.out 2>/dev/null); [ -n "$DEV" ] && [ -b "$DEV" ] && break; sleep 0.1; done
[ -b "$DEV" ] || fail "demo did not print a device"
sed 1d /tmp/demo.out
echo "# mkfs.ext4 $DEV && mount $DEV /mnt/netblk"
mkfs.ext4 -q -F "$DEV" || fail mkfs
mkdir -p /mnt/netblk && mount -t ext4 "$DEV" /mnt/netblk || fail mount
echo "hello from netblk" > /mnt/netblk/hello.txt
dd if=/dev/urandom of=/mnt/netblk/blob bs=1M count=32 2>/dev/null
SUM=$(md5sum /mnt/netblk/blob | cut -d' ' -f1)
sync; umount /mnt/netblk; echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 "$DEV" /mnt/netblk || fail remount
echo "# cat /mnt/netblk/hello.txt"; cat /mnt/netblk/hello.txt
[ "$(md5sum /mnt/netblk/blob | cut -d' ' -f1)" = "$SUM" ] || fail "32 MiB blob changed"
echo "# 32 MiB written, unmounted, remounted: checksum matches"
df -h /mnt/netblk | tail -1
umount /mnt/netblk
netblk list
kill -INT $DEMO; wait $DEMO || fail "demo exited with an error"
cat /tmp/demo.out | tail -1
ls /dev/ublkb* 2>/dev/null && fail "the demo left a device"
echo "NETBLK-VM-RESULT: pass"
"##;

/// How a guest is booted.
pub struct Guest<'a> {
    pub extras: Extras<'a>,
    /// How long it may run (vm-test and vm-demo: 10 minutes).
    pub timeout: Duration,
    /// A Unix socket for QEMU's human monitor (see `boot`).
    pub monitor: Option<&'a Path>,
}

impl Default for Guest<'_> {
    fn default() -> Self {
        Guest {
            extras: Extras::default(),
            timeout: Duration::from_secs(600),
            monitor: None,
        }
    }
}

/// The first line the guest's init prints.
const INIT_MARKER: &str = "NETBLK-VM-INIT";

/// Fetches `kernel`, builds an initramfs running `script` (with `extras`) in
/// `work`, boots it, and returns the console output; the guest must be done
/// within `timeout`.
pub fn run_guest(
    work: &Path,
    bins: &Path,
    kernel: &Kernel,
    script: &str,
    guest: &Guest,
) -> Result<String, String> {
    let (vmlinuz, kernel_root) = fetch_kernel(&cache_dir(), kernel)?;
    fs::create_dir_all(work).map_err(|e| e.to_string())?;
    let initrd = make_initramfs(
        work,
        bins,
        &kernel_root,
        kernel.expect,
        script,
        &guest.extras,
    )?;
    // Under software emulation a guest kernel occasionally oopses while
    // booting (seen: int3 in sched_clock_cpu on 6.17), before any of our code
    // runs. That is the harness, not netblk: boot again, at most twice more.
    let mut attempt = 1;
    loop {
        let log = boot(
            &vmlinuz,
            &initrd,
            &work.join("console.log"),
            guest.timeout,
            guest.monitor,
        )?;
        if log.contains(INIT_MARKER) || attempt == 3 {
            return Ok(log);
        }
        eprintln!(
            "    the guest kernel died before reaching userspace (attempt {attempt}); booting again"
        );
        attempt += 1;
    }
}

/// Boots one kernel (7.3 by default) and runs `netblk demo` in it, showing
/// what a user would see.
pub fn vm_demo(root: &Path, only: Option<&str>) -> Result<(), String> {
    need_tools()?;
    let kernel = KERNELS
        .iter()
        .find(|k| k.name == only.unwrap_or("7.3"))
        .ok_or("unknown kernel")?;
    let bins = build_static(root)?;
    eprintln!(
        "==> booting {} under QEMU (software emulation)",
        kernel.version
    );
    let work = root.join("target/vm-demo").join(kernel.name);
    let log = run_guest(&work, &bins, kernel, DEMO, &Guest::default())?;
    let shown = log.lines().skip_while(|l| !l.contains("== netblk demo"));
    for line in shown.filter(|l| !l.contains("reboot: Power down")) {
        println!("{line}");
    }
    if log.contains(PASS) {
        Ok(())
    } else {
        Err(format!(
            "the demo failed; console log in {}",
            work.join("console.log").display()
        ))
    }
}

/// The kernel `name` at another Debian package version than the pinned one
/// (for example `7.3.5+deb13-amd64`).
pub fn with_version(name: &str, version: &str) -> Result<Kernel, String> {
    let pinned = KERNELS
        .iter()
        .find(|k| k.name == name)
        .ok_or_else(|| format!("--version needs --kernel, one of {}", kernel_names()))?;
    let version: &'static str = Box::leak(version.to_string().into_boxed_str());
    // 7.x packages split the image and the modules; 6.x ship one package.
    let packages: Vec<&'static str> = if version.starts_with("6.") {
        vec![Box::leak(format!("linux-image-{version}").into_boxed_str())]
    } else {
        vec![
            Box::leak(format!("linux-binary-{version}").into_boxed_str()),
            Box::leak(format!("linux-modules-{version}").into_boxed_str()),
        ]
    };
    Ok(Kernel {
        name: pinned.name,
        version,
        packages: Box::leak(packages.into_boxed_slice()),
        expect: pinned.expect,
    })
}

fn kernel_names() -> String {
    KERNELS
        .iter()
        .map(|k| k.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs the scenarios (`scenarios`, or all if empty) on the chosen kernels
/// (all by default), optionally at another package version than the pinned
/// one.
pub fn vm_test(
    root: &Path,
    only: Option<&str>,
    version: Option<&str>,
    scenarios: &[String],
) -> Result<(), String> {
    let manual = Manual::from_env()?;
    let script = manual.script(scenario_script(scenarios)?);
    need_tools()?;
    let overridden;
    let kernels: Vec<&Kernel> = match (only, version) {
        (Some(name), Some(version)) => {
            overridden = with_version(name, version)?;
            vec![&overridden]
        }
        (None, Some(_)) => {
            return Err(format!(
                "--version needs --kernel, one of {}",
                kernel_names()
            ));
        }
        _ => KERNELS
            .iter()
            .filter(|k| only.is_none_or(|o| o == k.name))
            .collect(),
    };
    if kernels.is_empty() {
        let names: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
        return Err(format!("unknown kernel; choose from {}", names.join(", ")));
    }
    let bins = build_static(root)?;
    let mut failed = Vec::new();
    for kernel in kernels {
        eprintln!(
            "==> kernel {} ({}, expected: {})",
            kernel.name, kernel.version, kernel.expect
        );
        let started = Instant::now();
        let log = run_guest(
            &root.join("target/vm").join(kernel.name),
            &bins,
            kernel,
            &script,
            &Guest {
                extras: Extras {
                    bins: &manual.bins,
                    ..Extras::default()
                },
                timeout: manual.timeout.unwrap_or(Guest::default().timeout),
                ..Guest::default()
            },
        )?;
        let verdict = if log.contains(PASS) { "pass" } else { "FAIL" };
        eprintln!(
            "<== kernel {}: {verdict} in {:.1?}",
            kernel.name,
            started.elapsed()
        );
        if verdict == "pass" {
            for line in log.lines().filter(|l| {
                l.starts_with("ublk") || l.starts_with("io_uring") || l.starts_with("csi:")
            }) {
                eprintln!("    {line}");
            }
            // What the kernel reported of itself (a guest that passed may
            // still have seen a kernel bug): said, not hidden; a bug or an
            // oops fails the run (warnings are only said).
            let complaints = kernel_complaints(&log);
            for line in &complaints {
                eprintln!("    kernel: {line}");
            }
            if let Some(bug) = complaints.iter().find(|l| is_kernel_bug(l)) {
                failed.push(format!("{} (the kernel reported: {bug})", kernel.name));
            }
        } else {
            eprintln!("---- guest log ({})\n{log}\n----", kernel.name);
            failed.push(format!("{} ({})", kernel.name, failure_reason(&log)));
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("vm-test failed on kernel(s) {}", failed.join(", ")))
    }
}

/// The console lines where the guest's kernel reported a bug or a warning
/// of its own ("BUG:", "WARNING:", "Oops").
fn kernel_complaints(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("BUG:") || l.contains("WARNING:") || l.contains("Oops"))
        .map(str::trim)
        .collect()
}

/// Whether a console line of [`kernel_complaints`] is a kernel bug or an
/// oops, not a warning.
fn is_kernel_bug(line: &str) -> bool {
    line.contains("BUG:") || line.contains("Oops")
}

/// What a failed guest said of its failure: its first `NETBLK-VM-FAIL`
/// line, so that the last lines of a long log still name it.
fn failure_reason(log: &str) -> String {
    log.lines()
        .find_map(|l| l.split_once("NETBLK-VM-FAIL:").map(|(_, r)| r))
        .map(|r| r.trim().to_string())
        .unwrap_or_else(|| "no verdict: the guest crashed, hung or ran out of time".into())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn kernel_bugs_are_picked_out_of_the_console() {
        let log = "[ 1.0] ok\n[ 363.1] BUG: Bad page state in process x  pfn:60800\nublk: fine\n";
        assert_eq!(
            kernel_complaints(log),
            vec!["[ 363.1] BUG: Bad page state in process x  pfn:60800"]
        );
        assert!(is_kernel_bug(kernel_complaints(log)[0]));
        assert!(!is_kernel_bug("[ 2.0] WARNING: CPU: 1 PID: 9 at mm/x.c:10"));
    }

    #[test]
    fn a_failure_is_named_by_the_guests_first_fail_line() {
        let log = "boot\n[ 1.0] NETBLK-VM-FAIL: the lost flush is not EIO\n--- /tmp/a.log\nNETBLK-VM-FAIL (again, after the logs): x\n";
        assert_eq!(failure_reason(log), "the lost flush is not EIO");
        assert!(failure_reason("boot\nKernel panic\n").contains("no verdict"));
    }

    #[test]
    fn every_scenario_file_is_listed() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/scenarios");
        let mut files: Vec<String> = fs::read_dir(&dir)
            .expect("scenarios directory")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        let mut listed: Vec<String> = SCENARIOS
            .iter()
            .map(|(name, _)| format!("{name}.sh"))
            .chain(["common.sh".to_string()])
            .collect();
        listed.sort();
        assert_eq!(files, listed);
    }

    #[test]
    fn a_selection_runs_after_common_in_the_fixed_order() {
        let script = scenario_script(&names(&["orphan", "basic"])).expect("known names");
        assert!(script.starts_with(COMMON));
        let basic = script.find("== scenario basic").expect("basic");
        let orphan = script.find("== scenario orphan").expect("orphan");
        assert!(basic < orphan, "fixed order, not the order given");
        assert!(!script.contains("== scenario reliability"));
        assert!(script.contains(SCENARIOS[2].1) && script.contains(SCENARIOS[5].1));
        assert!(script.trim_end().ends_with(&format!("echo \"{PASS}\"")));
        assert_eq!(script.matches(PASS).count(), 1);

        let all = scenario_script(&[]).expect("all");
        let mut at = 0;
        for (name, body) in SCENARIOS {
            let found = all[at..]
                .find(&format!("== scenario {name}\"\n{body}"))
                .unwrap_or_else(|| panic!("{name} missing or out of order"));
            at += found;
        }
    }

    #[test]
    fn a_manual_command_runs_after_the_scenarios_before_the_verdict() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let none = Manual::parse(env(&[])).expect("nothing set");
        assert_eq!(none, Manual::default());
        let plain = scenario_script(&names(&["csi"])).expect("csi");
        assert_eq!(none.script(plain.clone()), plain);
        let manual = Manual::parse(env(&[
            ("NETBLK_VM_EXTRA_BINS", "/bin/sh"),
            ("NETBLK_VM_EXTRA_CMD", "/bin/sh -c true"),
            ("NETBLK_VM_TIMEOUT", "1800"),
        ]))
        .expect("parses");
        assert_eq!(manual.bins, [PathBuf::from("/bin/sh")]);
        assert_eq!(manual.timeout, Some(Duration::from_secs(1800)));
        let script = manual.script(plain);
        let csi = script.find("== scenario csi").expect("csi");
        let extra = script.find("/bin/sh -c true").expect("command");
        let verdict = script.rfind(PASS).expect("verdict");
        assert!(csi < extra && extra < verdict, "{script}");
        assert!(script.trim_end().ends_with(&format!("echo \"{PASS}\"")));
        assert_valid_shell(&script);
        assert!(Manual::parse(env(&[("NETBLK_VM_EXTRA_BINS", "relative")])).is_err());
        assert!(Manual::parse(env(&[("NETBLK_VM_TIMEOUT", "0")])).is_err());
    }

    #[test]
    fn an_unknown_scenario_is_a_clear_error() {
        let err = scenario_script(&names(&["basic", "nosuch"])).expect_err("unknown");
        assert!(err.contains("'nosuch'"), "{err}");
        assert!(err.contains(&scenario_names()), "{err}");
        // `--scenario basic,` is no way to say "all".
        assert!(scenario_script(&names(&["basic", ""])).is_err());
    }

    /// `sh -n` accepts `script`.
    pub(crate) fn assert_valid_shell(script: &str) {
        let out = Command::new("sh")
            .args(["-n", "-c", script])
            .output()
            .expect("run sh -n");
        assert!(
            out.status.success(),
            "sh -n: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn the_whole_script_is_valid_shell() {
        assert_valid_shell(&scenario_script(&[]).expect("all"));
    }
}

//! `deploy/`: the systemd unit passes `systemd-analyze verify` (where
//! systemd is installed), the example volume file is a valid one, and the
//! udev rule's helper names a device after its record's volume.

use std::path::{Path, PathBuf};
use std::process::Command;

use netblk::state;
use netblk_tests::netblk_bin;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the workspace")
        .to_path_buf()
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/netblk@.service"))
        .expect("deploy/systemd/netblk@.service");
    // What the unit promises: the config file, restarts, ordering, a stop
    // timeout above the default --io-timeout (30 s).
    for line in [
        "ExecStart=/usr/local/bin/netblk map --config /etc/netblk/volumes/%i.toml",
        "Restart=on-failure",
        "Type=notify",
        "Before=remote-fs-pre.target",
        "TimeoutStopSec=60s",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line}");
    }
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: systemd-analyze is not installed");
        return;
    }
    // Verified as an instance, with the binary where this build has it (verify
    // checks that ExecStart is executable).
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("netblk@vol.service");
    let bin = netblk_bin();
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/netblk", &bin.display().to_string()),
    )
    .expect("write unit");
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Unknown keys are only warnings there: any output is a finding.
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
}

#[test]
fn the_example_volume_file_is_valid() {
    let file = netblk::config::load(&repo().join("deploy/volumes/example.toml"))
        .expect("deploy/volumes/example.toml");
    assert_eq!(file.volume, "example");
    assert_eq!(file.nodes.map(|n| n.len()), Some(3));
    assert_eq!(file.size, Some(100 << 30));
}

#[test]
fn the_udev_helper_prints_the_volume_of_a_device() {
    let rule = std::fs::read_to_string(repo().join("deploy/udev/60-netblk.rules"))
        .expect("deploy/udev/60-netblk.rules");
    assert!(rule.contains("PROGRAM=\"/usr/local/bin/netblk udev-name %k\""));
    assert!(rule.contains("SYMLINK+=\"netblk/%c\""));
    let dir = tempfile::tempdir().expect("dir");
    let record = netblk_tests::sample_record(1);
    state::save(dir.path(), &record).expect("save");
    let run = |device: &str| {
        Command::new(netblk_bin())
            .args(["udev-name", device])
            .env("NETBLK_STATE_DIR", dir.path())
            .output()
            .expect("netblk udev-name")
    };
    // As udev passes it (%k), and as a user would.
    for device in ["ublkb7", "/dev/ublkb7", "7"] {
        let out = run(device);
        assert!(out.status.success(), "{device}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "pgdata\n", "{device}");
    }
    let out = run("ublkb8");
    assert_eq!(out.status.code(), Some(1), "no record: exit 1");
    assert!(out.stdout.is_empty(), "no record: no name");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a netblk device"));
}

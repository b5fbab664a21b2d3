//! The systemd side: the units pass `systemd-analyze verify`, and the daemons speak the notify
//! protocol their `Type=notify` units rely on (ready, watchdog pings, stopping).

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

use burrow_tests::*;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn the_units_verify() {
    let dir = tempfile::tempdir().unwrap();
    for (unit, bin_name) in [
        ("burrow-agent.service", "burrow-agent"),
        ("burrow-proxy.service", "burrow-proxy"),
    ] {
        let text = std::fs::read_to_string(workspace().join("systemd").join(unit)).unwrap();
        // Point ExecStart at the built binary: verify checks that it exists.
        let local = text.replace(
            &format!("/usr/bin/{bin_name}"),
            bin_dir().join(bin_name).to_str().unwrap(),
        );
        std::fs::write(dir.path().join(unit), local).unwrap();
    }
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("burrow-agent.service"))
        .arg(dir.path().join("burrow-proxy.service"))
        .output()
        .expect("systemd-analyze runs (./scripts/install-deps.sh installs systemd)");
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let agent = std::fs::read_to_string(workspace().join("systemd/burrow-agent.service")).unwrap();
    for line in [
        "Type=notify",
        "Restart=on-failure",
        "ExecStart=/usr/bin/burrow-agent start --config /etc/burrow/agent.yaml",
        "StateDirectory=burrow",
        "WatchdogSec=",
    ] {
        assert!(agent.contains(line), "burrow-agent.service lacks {line}");
    }
}

#[test]
fn the_agent_notifies_ready_pings_the_watchdog_and_says_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&dir.path().join("proxy"), &[]);
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let token = token_file(dir.path(), &proxy.node_token(&[]));
    let mut cmd = bin("burrow-agent");
    cmd.args([
        "start",
        "--token",
        &token,
        "--proxy",
        &proxy.web_addr,
        "--ca-pin",
        &proxy.pin(),
        "--nodename",
        "unit",
    ])
    .arg("--data-dir")
    .arg(dir.path().join("agent"))
    .env("NOTIFY_SOCKET", &sock_path)
    .env("WATCHDOG_USEC", "400000");
    let mut agent = Daemon::spawn(cmd, "burrow-agent");
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    let got = |seen: &mut Vec<String>, buf: &mut [u8], want: &str| {
        eventually(WAIT, || {
            if let Ok(n) = sock.recv(buf) {
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            seen.iter().any(|m| m == want).then_some(())
        })
        .unwrap_or_else(|| panic!("no {want} in {seen:?}"));
    };
    got(&mut seen, &mut buf, "READY=1");
    assert!(
        agent.log().contains("joined the cluster"),
        "ready only once joined"
    );
    got(&mut seen, &mut buf, "WATCHDOG=1");
    assert_eq!(agent.stop().code(), Some(0));
    got(&mut seen, &mut buf, "STOPPING=1");
}

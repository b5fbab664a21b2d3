//! The static ARM agents (aarch64 and armv7, built by `cross/build.sh`) under qemu-user-static
//! against an x86_64 proxy on loopback: each joins with a token file, holds its tunnel, and
//! serves an SSH session through it.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use burrow_tests::*;

fn arm_agent(target: &str, machine: u16) -> PathBuf {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let path = workspace
        .join("target")
        .join(target)
        .join("release/burrow-agent");
    let elf = std::fs::read(&path).unwrap_or_else(|_| {
        panic!(
            "{} is missing: run ./cross/build.sh --agent-only {target}",
            path.display()
        )
    });
    // ELF e_machine at offset 18: the binary really is for that architecture.
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(
        u16::from_le_bytes([elf[18], elf[19]]),
        machine,
        "{target} binary"
    );
    path
}

fn run_under_qemu(qemu: &str, target: &str, machine: u16) {
    let agent = arm_agent(target, machine);
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = Proxy::start(&dir.path().join("proxy"), &[]);
    let ssh_addr = proxy.ssh_addr();
    let token = token_file(dir.path(), &proxy.node_token(&[]));
    let data = dir.path().join("agent");
    let name = format!("arm-{}", &target[..target.find('-').unwrap()]);
    let mut cmd = Command::new(qemu);
    cmd.arg(&agent)
        .args([
            "start",
            "--token",
            &token,
            "--proxy",
            &proxy.web_addr,
            "--ca-pin",
            &proxy.pin(),
            "--nodename",
            &name,
        ])
        .arg("--data-dir")
        .arg(&data)
        .env("NO_COLOR", "1");
    let mut node = Daemon::spawn(cmd, qemu);
    node.wait_for("joined the cluster");
    node.wait_for("tunnel up");
    let id = host_id(&data);
    eventually(WAIT, || nodes(&proxy).contains_key(&id).then_some(()))
        .expect("the ARM node in nodes ls");

    // An SSH session served by the emulated agent.
    let login = text(&Command::new("id").arg("-un").output().unwrap().stdout)
        .trim()
        .to_string();
    let key = dir.path().join("key");
    assert!(
        proxy
            .ctl(&[
                "auth",
                "sign",
                "--user",
                "t",
                "--logins",
                &login,
                "--out",
                key.to_str().unwrap()
            ])
            .status
            .success()
    );
    std::fs::write(
        dir.path().join("known_hosts"),
        proxy.ctl(&["auth", "export", "--type", "host"]).stdout,
    )
    .unwrap();
    let cfg = dir.path().join("ssh_config");
    std::fs::write(
        &cfg,
        format!(
            "Host *\n  UserKnownHostsFile {}\n  StrictHostKeyChecking yes\n  BatchMode yes\n  IdentityFile {}\n  IdentitiesOnly yes\n  LogLevel ERROR\n",
            dir.path().join("known_hosts").display(),
            key.display()
        ),
    )
    .unwrap();
    let (host, port) = ssh_addr.rsplit_once(':').unwrap();
    let mut ssh = Command::new("ssh")
        .arg("-F")
        .arg(&cfg)
        .args([
            "-J",
            &format!("t@{host}:{port}"),
            "-p",
            "3022",
            &format!("{login}@{name}"),
            "echo served by $0; exit 7",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = eventually(WAIT, || ssh.try_wait().ok().flatten());
    if status.is_none() {
        let _ = ssh.kill();
    }
    let out = ssh.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("served by"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(
        node.stop().code(),
        Some(0),
        "SIGTERM stops the emulated agent cleanly"
    );
}

#[test]
fn the_aarch64_agent_joins_tunnels_and_serves_ssh_under_qemu() {
    run_under_qemu("qemu-aarch64-static", "aarch64-unknown-linux-musl", 0xb7);
}

#[test]
fn the_armv7_agent_joins_tunnels_and_serves_ssh_under_qemu() {
    run_under_qemu("qemu-arm-static", "armv7-unknown-linux-musleabihf", 0x28);
}

//! The load tool (`burrow-bench agents`) at small N: real joins with one token, real tunnels on
//! both transports, identities kept for the next run, and dials through the proxy's SSH jump host
//! answered by the simulated agents.

use std::process::{Command, Stdio};

use burrow_tests::*;

/// `burrow-bench agents` for `count` agents of `proxy` kept in `data`, with a fresh token.
fn agents_args(proxy: &Proxy, data: &std::path::Path, count: &str) -> Vec<String> {
    let data = data.to_str().unwrap();
    let token = proxy.node_token(&[]);
    let args = [
        "agents",
        "--proxy",
        &proxy.web_addr,
        "--token",
        &token,
        "--ca-pin",
    ];
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    args.extend([
        proxy.pin(),
        "--count".into(),
        count.into(),
        "--data-dir".into(),
        data.into(),
    ]);
    args
}

fn bench(proxy: &Proxy, data: &std::path::Path, transport: &str, count: &str) -> (String, bool) {
    let out = bin("burrow-bench")
        .args(agents_args(proxy, data, count))
        .args(["--transport", transport, "--report-every", "200ms"])
        .args(["--run-for", "60s", "--exit-when-up"])
        .output()
        .unwrap();
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    (all, out.status.success())
}

#[test]
fn the_load_tool_joins_its_agents_once_and_brings_their_tunnels_up_on_both_transports() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&dir.path().join("proxy"), &[]);
    proxy.ready().unwrap();
    let data = dir.path().join("agents");

    let (out, ok) = bench(&proxy, &data, "tcp", "12");
    assert!(ok, "{out}");
    assert!(out.contains("joined 12 agents in"), "{out}");
    assert!(out.contains("all 12 agents up in"), "{out}");
    for i in 0..12 {
        assert!(
            data.join(format!("bench-{i}/identity.json")).exists(),
            "bench-{i} kept no identity"
        );
    }

    // A second run reuses the stored identities: nobody joins again.
    let (out, ok) = bench(&proxy, &data, "quic", "12");
    assert!(ok, "{out}");
    assert!(
        out.contains("joined 0 agents in") && out.contains("12 from stored identities"),
        "{out}"
    );
    assert!(out.contains("all 12 agents up in"), "{out}");
}

#[test]
fn simulated_agents_answer_dials_through_the_jump_host_with_an_echo() {
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = Proxy::start(&dir.path().join("proxy"), &[]);
    let ssh_addr = proxy.ssh_addr();
    // The reports go to stdout; the harness reads stderr.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "exec \"$0\" \"$@\" 1>&2"])
        .arg(bin_dir().join("burrow-bench"))
        .args(agents_args(&proxy, &dir.path().join("agents"), "3"))
        .args(["--serve", "echo"]);
    let mut agents = Daemon::spawn(cmd, "burrow-bench");
    agents.wait_for("all 3 agents up in");
    let listed = nodes(&proxy);
    let mut names: Vec<&str> = listed.values().filter_map(|n| n["name"].as_str()).collect();
    names.sort();
    assert_eq!(names, ["bench-0", "bench-1", "bench-2"]);

    let key = dir.path().join("alice");
    proxy.sign_user("alice", "bench", "10m", &key);
    let known = proxy.ctl(&["auth", "export", "--type", "host"]);
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(&known_hosts, &known.stdout).unwrap();
    let (host, port) = ssh_addr.rsplit_once(':').unwrap();
    for node in ["bench-0", "bench-2"] {
        let mut ssh = Command::new("ssh")
            .args([
                "-F",
                "/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "ConnectTimeout=20",
            ])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
            .arg("-i")
            .arg(&key)
            .args(["-p", port, "-W", &format!("{node}:3022")])
            .arg(format!("alice@{host}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        let payload = format!("hello {node}\n").repeat(1000);
        ssh.stdin
            .take()
            .unwrap()
            .write_all(payload.as_bytes())
            .unwrap();
        let out = ssh.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), payload, "the echo through {node}");
    }
    agents.stop();
}

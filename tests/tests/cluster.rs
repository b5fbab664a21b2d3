//! The cluster side from the command line: bootstrap, status, tokens, restarts, config.

use burrow_tests::*;

#[test]
fn first_start_creates_a_cluster_that_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("proxy");
    let mut proxy = Proxy::start(&data, &["--cluster-name", "lab"]);

    let out = proxy.ctl(&["status"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status = text(&out.stdout);
    assert!(status.contains("Cluster:  lab"), "{status}");
    assert!(
        status.contains(&format!("Version:  {}", env!("CARGO_PKG_VERSION"))),
        "{status}"
    );
    let pin = proxy.pin();
    assert!(pin.starts_with("sha256:") && pin.len() == 71, "{pin}");
    assert!(
        pin[7..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    assert!(status.contains(&format!("CA pin:   {pin}")), "{status}");
    assert!(
        proxy.daemon.log().contains(&pin),
        "the proxy logs its CA pin"
    );

    assert_eq!(mode(&data.join("admin-identity")), 0o600);
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("state.redb")), 0o600);

    let token = proxy.node_token(&["--ttl", "1h"]);
    assert_eq!(
        proxy.daemon.stop().code(),
        Some(0),
        "SIGTERM stops the proxy cleanly"
    );

    // A restart (without --cluster-name) keeps the cluster, its CAs and its tokens.
    let proxy = Proxy::start(&data, &[]);
    assert_eq!(proxy.pin(), pin);
    assert_eq!(proxy.ctl_json(&["status"])["cluster_name"], "lab");
    let tokens = proxy.ctl_json(&["tokens", "ls"]);
    assert_eq!(tokens["tokens"].as_array().unwrap().len(), 1);
    assert!(
        !tokens.to_string().contains(&token),
        "token values are never listed"
    );
}

#[test]
fn a_restart_with_another_cluster_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("proxy");
    let mut proxy = Proxy::start(&data, &["--cluster-name", "one"]);
    proxy.daemon.stop();
    let out = bin("burrow-proxy")
        .args([
            "start",
            "--web-listen",
            "127.0.0.1:0",
            "--cluster-name",
            "two",
            "--data-dir",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("holds cluster \"one\", not \"two\""), "{err}");
}

#[test]
fn tokens_add_prints_a_join_command_and_ls_rm_manage_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&dir.path().join("p"), &[]);
    let pin = proxy.pin();

    let out = proxy.ctl(&[
        "tokens",
        "add",
        "--type",
        "node",
        "--ttl",
        "5m",
        "--labels",
        "env=lab,rack=2",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let token = stdout
        .lines()
        .find_map(|l| l.strip_prefix("The invite token: "))
        .expect("the token is printed")
        .to_string();
    assert_eq!(token.len(), 32, "128 bits as hex");
    assert!(stdout.contains("expires in 5m"), "{stdout}");
    let command = format!(
        "burrow-agent start --token {token} --proxy {} --ca-pin {pin}",
        proxy.web_addr
    );
    assert!(stdout.contains(&command), "{stdout}\nwanted: {command}");

    let json = proxy.ctl_json(&[
        "tokens",
        "add",
        "--ttl",
        "1h",
        "--value",
        "chosen-token-value",
    ]);
    assert_eq!(json["token"], "chosen-token-value");
    assert_eq!(json["roles"], serde_json::json!(["node"]));
    assert!(
        json["join_command"]
            .as_str()
            .unwrap()
            .contains("--token chosen-token-value")
    );
    let dup = proxy.ctl(&["tokens", "add", "--value", "chosen-token-value"]);
    assert_eq!(dup.status.code(), Some(1));
    assert!(
        text(&dup.stderr).contains("already exists"),
        "{}",
        text(&dup.stderr)
    );

    let ls = proxy.ctl(&["tokens", "ls"]);
    let listing = text(&ls.stdout);
    assert!(listing.contains("env=lab,rack=2"), "{listing}");
    assert!(
        !listing.contains(&token) && !listing.contains("chosen-token-value"),
        "{listing}"
    );
    assert_eq!(listing.matches("***").count(), 2, "{listing}");

    let rm = proxy.ctl(&["tokens", "rm", &token]);
    assert!(rm.status.success(), "{}", text(&rm.stderr));
    let id = json["id"].as_str().unwrap();
    let rm_by_id = proxy.ctl_json(&["tokens", "rm", id]);
    assert_eq!(rm_by_id["removed"], id);
    assert_eq!(
        proxy.ctl_json(&["tokens", "ls"])["tokens"],
        serde_json::json!([])
    );
    let again = proxy.ctl(&["tokens", "rm", &token]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again.stderr).contains("not known"),
        "{}",
        text(&again.stderr)
    );

    let bad_ttl = proxy.ctl(&["tokens", "add", "--ttl", "soon"]);
    assert_eq!(bad_ttl.status.code(), Some(2));
    assert!(
        text(&bad_ttl.stderr).contains("--ttl \"soon\""),
        "{}",
        text(&bad_ttl.stderr)
    );
}

#[test]
fn static_tokens_from_flags_and_files_never_expire_and_cannot_be_removed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fleet-tokens");
    std::fs::write(&file, "# one per line\nfleet-token-one\nfleet-token-two\n").unwrap();
    let proxy = Proxy::start(
        &dir.path().join("p"),
        &[
            "--static-token",
            "node:static-node-token",
            "--static-token",
            &format!("node,proxy:{}", file.display()),
        ],
    );
    let ls = proxy.ctl_json(&["tokens", "ls"]);
    let tokens = ls["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 3);
    assert!(
        tokens
            .iter()
            .all(|t| t["kind"] == "static" && t["expires"].is_null() && t["value"].is_null())
    );
    let text_ls = text(&proxy.ctl(&["tokens", "ls"]).stdout);
    assert!(
        text_ls.contains("static") && text_ls.contains("never"),
        "{text_ls}"
    );
    let secrets = text(&proxy.ctl(&["tokens", "ls", "--with-secrets"]).stdout);
    for v in ["static-node-token", "fleet-token-one", "fleet-token-two"] {
        assert!(secrets.contains(v), "{secrets}");
    }
    let rm = proxy.ctl(&["tokens", "rm", "fleet-token-two"]);
    assert_eq!(rm.status.code(), Some(1));
    assert!(
        text(&rm.stderr).contains("is static"),
        "{}",
        text(&rm.stderr)
    );

    // A node joins with a token from the file.
    let agent_dir = dir.path().join("agent");
    let out_dir = dir.path();
    let mut agent = Daemon::spawn(
        {
            let mut c = bin("burrow-agent");
            c.args([
                "start",
                "--proxy",
                &proxy.web_addr,
                "--ca-pin",
                &proxy.pin(),
                "--nodename",
                "n1",
            ])
            .args(["--token", &token_file(out_dir, "fleet-token-two")])
            .arg("--data-dir")
            .arg(&agent_dir);
            c
        },
        "burrow-agent",
    );
    agent.wait_for("joined the cluster");
}

#[test]
fn bad_config_exits_2_with_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("proxy.yaml");
    std::fs::write(&cfg, "data_dir: /tmp/x\nweb_listn: 127.0.0.1:0\n").unwrap();
    let out = bin("burrow-proxy")
        .args(["start", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("unknown field `web_listn`"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let bad_token = bin("burrow-proxy")
        .args([
            "start",
            "--static-token",
            "node:/no/such/tokens",
            "--data-dir",
        ])
        .arg(dir.path().join("p"))
        .output()
        .unwrap();
    assert_eq!(bad_token.status.code(), Some(2));
    assert!(text(&bad_token.stderr).contains("cannot read static token file /no/such/tokens"));
    assert!(
        !dir.path().join("p").exists(),
        "nothing written on a config error"
    );

    let out = bin("burrow-proxy")
        .args(["start", "--storage", "floppy"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "clap usage errors exit 2");
}

#[test]
fn sample_configs_work_and_help_documents_every_flag() {
    let dir = tempfile::tempdir().unwrap();
    let sample = text(
        &bin("burrow-proxy")
            .arg("configure")
            .output()
            .unwrap()
            .stdout,
    );
    let data = dir.path().join("from-sample");
    let cfg = dir.path().join("proxy.yaml");
    std::fs::write(
        &cfg,
        sample
            .replace(
                "data_dir: /var/lib/burrow-proxy",
                &format!("data_dir: {}", data.display()),
            )
            .replace("web_listen: 0.0.0.0:3080", "web_listen: 127.0.0.1:0")
            .replace("ssh_listen: 0.0.0.0:3023", "ssh_listen: 127.0.0.1:0")
            .replace("#cluster_name: example", "cluster_name: sampled"),
    )
    .unwrap();
    let mut cmd = bin("burrow-proxy");
    cmd.args(["start", "--config"]).arg(&cfg);
    let mut d = Daemon::spawn(cmd, "burrow-proxy");
    d.wait_for("web API listening on https://");
    assert!(data.join("admin-identity").exists());
    assert!(d.log().contains("cluster=sampled"));

    let agent_sample = text(
        &bin("burrow-agent")
            .arg("configure")
            .output()
            .unwrap()
            .stdout,
    );
    assert!(agent_sample.contains("proxy: proxy.example.com:3080"));

    let help = text(
        &bin("burrow-proxy")
            .args(["start", "--help"])
            .output()
            .unwrap()
            .stdout,
    );
    for flag in [
        "--config",
        "--data-dir",
        "--cluster-name",
        "--web-listen",
        "--tunnel-listen",
        "--ssh-listen",
        "--public-addr",
        "--etcd-endpoint",
        "--static-token",
        "--storage",
        "--debug",
    ] {
        assert!(
            help.contains(flag),
            "burrow-proxy start --help lacks {flag}"
        );
    }
    let help = text(
        &bin("burrow-agent")
            .args(["start", "--help"])
            .output()
            .unwrap()
            .stdout,
    );
    for flag in [
        "--config",
        "--token",
        "--proxy",
        "--ca-pin",
        "--data-dir",
        "--nodename",
        "--insecure",
        "--debug",
    ] {
        assert!(
            help.contains(flag),
            "burrow-agent start --help lacks {flag}"
        );
    }
    let help = text(
        &bin("burrowctl")
            .args(["tokens", "add", "--help"])
            .output()
            .unwrap()
            .stdout,
    );
    for flag in [
        "--type",
        "--ttl",
        "--value",
        "--labels",
        "--format",
        "--proxy",
        "--identity",
    ] {
        assert!(
            help.contains(flag),
            "burrowctl tokens add --help lacks {flag}"
        );
    }
    for b in ["burrow-proxy", "burrow-agent", "burrowctl"] {
        let v = text(&bin(b).arg("version").output().unwrap().stdout);
        assert_eq!(v.trim(), format!("{b} {}", env!("CARGO_PKG_VERSION")));
    }
}

#[test]
fn burrowctl_without_identity_or_proxy_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin("burrowctl")
        .args(["status", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("cannot read the admin identity"),
        "{}",
        text(&out.stderr)
    );

    // The right identity but nothing listening at the address.
    let proxy = Proxy::start(&dir.path().join("p"), &[]);
    let identity = proxy.data_dir.join("admin-identity");
    let addr = format!("127.0.0.1:{}", closed_port());
    let out = bin("burrowctl")
        .args(["status", "--proxy", &addr, "--identity"])
        .arg(&identity)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(&format!("cannot reach the proxy at {addr}")),
        "{}",
        text(&out.stderr)
    );

    // From "elsewhere": --proxy and --identity instead of the data dir.
    let out = bin("burrowctl")
        .args([
            "--format",
            "json",
            "status",
            "--proxy",
            &proxy.web_addr,
            "--identity",
        ])
        .arg(&identity)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// Reads from `stream` until it is closed (or 20 s pass); returns what came and whether it closed.
fn read_until_closed(stream: &mut std::net::TcpStream) -> (Vec<u8>, bool) {
    use std::io::Read;
    stream
        .set_read_timeout(Some(std::time::Duration::from_millis(500)))
        .unwrap();
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut buf = [0u8; 1024];
    while std::time::Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (got, true),
            Err(_) => {}
        }
    }
    (got, false)
}

#[test]
fn anonymous_clients_get_bounded_time_and_places_on_the_ssh_and_web_ports() {
    use std::io::Read;
    use std::net::TcpStream;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.yaml");
    std::fs::write(
        &config,
        "limits:\n  ssh_login_grace_time: 2s\n  ssh_max_startups_per_source: 3\n  \
         web_request_timeout: 2s\n  web_max_connections_per_source: 3\n",
    )
    .unwrap();
    let mut proxy = Proxy::start(
        &dir.path().join("proxy"),
        &["--config", config.to_str().unwrap()],
    );
    let ssh_addr = proxy.ssh_addr();

    // SSH: three unauthenticated connections get a banner; a fourth from the same source is
    // dropped at once; the grace time then closes the three.
    let mut held: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut c = TcpStream::connect(&ssh_addr).unwrap();
            c.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .unwrap();
            let mut banner = [0u8; 7];
            c.read_exact(&mut banner).unwrap();
            assert_eq!(&banner, b"SSH-2.0");
            c
        })
        .collect();
    let mut fourth = TcpStream::connect(&ssh_addr).unwrap();
    let (got, closed) = read_until_closed(&mut fourth);
    assert!(
        closed && got.is_empty(),
        "a fourth startup was served: {got:?}"
    );
    for c in &mut held {
        let (_, closed) = read_until_closed(c);
        assert!(
            closed,
            "an idle unauthenticated connection outlived the grace time"
        );
    }
    proxy.daemon.wait_for("no login within the grace time");
    let mut again = TcpStream::connect(&ssh_addr).unwrap();
    again
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut banner = [0u8; 7];
    again.read_exact(&mut banner).unwrap();
    assert_eq!(&banner, b"SSH-2.0", "places are given back");
    drop(again);

    // Web: three idle connections from one source are all it may hold.
    let idle: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(&proxy.web_addr).unwrap())
        .collect();
    let refused = eventually(WAIT, || {
        let mut c = TcpStream::connect(&proxy.web_addr).ok()?;
        let (_, closed) = read_until_closed(&mut c);
        closed.then_some(())
    });
    assert!(refused.is_some(), "a fourth web connection was kept");
    drop(idle);
    assert!(
        eventually(WAIT, || proxy
            .ctl(&["status"])
            .status
            .success()
            .then_some(()))
        .is_some(),
        "the proxy serves again once the idle connections are gone"
    );

    // A body that never arrives in full gets 408 after the request timeout, not a held slot.
    let out = std::process::Command::new("curl")
        .args(["-sk", "--max-time", "20", "-H", "Content-Length: 1000"])
        .args(["-H", "Content-Type: application/json", "--data", "{"])
        .arg(format!("https://{}/v1/webapi/host/join", proxy.web_addr))
        .output()
        .unwrap();
    let body = text(&out.stdout);
    assert!(
        body.contains("request_timeout"),
        "{body} {}",
        text(&out.stderr)
    );
}

#[test]
fn admin_input_and_storage_settings_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&dir.path().join("proxy"), &[]);
    let out = proxy.ctl(&["tokens", "add", "--type", "node", "--ttl", "400d"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("at most 365 days"),
        "{}",
        text(&out.stderr)
    );
    let out = proxy.ctl(&["tokens", "add", "--type", "node", "--ttl", "500000y"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(proxy.ctl(&["tokens", "ls"]).status.success());

    // etcd over plain http to another host is refused before anything is contacted, as is
    // half an etcd login.
    for (yaml, why) in [
        (
            "storage:\n  type: etcd\n  endpoints: [\"http://etcd.example:2379\"]\n",
            "plain http to a host that is not loopback",
        ),
        (
            "storage:\n  type: etcd\n  endpoints: [\"http://127.0.0.1:1\"]\n  username: u\n",
            "username and storage.password_file together",
        ),
    ] {
        let config = dir.path().join("bad.yaml");
        std::fs::write(&config, yaml).unwrap();
        let out = bin("burrow-proxy")
            .args(["start", "--config", config.to_str().unwrap()])
            .arg("--data-dir")
            .arg(dir.path().join("never"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains(why), "{}", text(&out.stderr));
    }
}

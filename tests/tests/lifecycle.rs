//! Operating a fleet: the daemons' diagnostics listeners (`/metrics`, `/healthz`, `/readyz`)
//! scraped while tunnels and dials happen, and `burrow-agent status`.

use std::path::Path;
use std::process::Command;

use burrow_tests::*;

/// Scrapes `/metrics` at `addr` until sample `name` has `want`; returns the scrape.
fn until_metric(addr: &str, name: &str, want: f64) -> String {
    let mut last = String::new();
    eventually(WAIT, || {
        let (status, body) = http_get(addr, "/metrics");
        assert_eq!(status, 200, "{body}");
        let hit = metric(&body, name) == Some(want);
        last = body;
        hit.then_some(())
    })
    .unwrap_or_else(|| panic!("{name} never became {want}:\n{last}"));
    last
}

fn status_json(data: &Path) -> serde_json::Value {
    let out = run_bounded(
        bin("burrow-agent")
            .args(["status", "--format", "json", "--data-dir"])
            .arg(data),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A user with a certificate for this machine's login, the cluster's `@cert-authority` line in
/// `dir/known_hosts` and an ssh_config (`dir/ssh_config`) using both, jumping through `jump`.
struct Alice {
    config: std::path::PathBuf,
    jump: String,
}

impl Alice {
    fn new(proxy: &Proxy, dir: &Path, jump: &str) -> Alice {
        proxy.sign_user("alice", &whoami(), "1h", &dir.join("alice"));
        let known = proxy.ctl(&["auth", "export", "--type", "host"]);
        assert!(known.status.success(), "{}", text(&known.stderr));
        std::fs::write(dir.join("known_hosts"), &known.stdout).unwrap();
        let config = dir.join("ssh_config");
        write_ssh_config(&config, &dir.join("known_hosts"), &dir.join("alice"));
        let jump = match jump.rsplit_once(':') {
            Some((host, port)) => format!("alice@{host}:{port}"),
            None => String::new(),
        };
        Alice { config, jump }
    }

    /// `ssh -J` to `target`'s SSH port through the proxy, running `command`; output captured.
    fn ssh(&self, target: &str, command: &str) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.arg("-F")
            .arg(&self.config)
            .args(["-J", &self.jump, "-p", "3022", target, command])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd
    }
}

#[test]
fn metrics_readiness_and_status_follow_tunnels_dials_and_a_lost_proxy() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut proxy = Proxy::start(
        &dir.join("proxy"),
        &[
            "--diag-listen",
            "127.0.0.1:0",
            "--tunnel-listen",
            "127.0.0.1:0",
        ],
    );
    let ssh_addr = proxy
        .daemon
        .wait_for("SSH jump host listening on ")
        .trim()
        .to_string();
    let pdiag = diag_addr(&mut proxy.daemon);
    let (code, body) = http_get(&pdiag, "/healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, body) = http_get(&pdiag, "/readyz");
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["ready"],
        true
    );
    assert_eq!(http_get(&pdiag, "/nothing").0, 404);

    // A join with a token nobody issued, then a node that joins for real.
    let bad = agent_run(&[
        "--proxy",
        &proxy.web_addr,
        "--ca-pin",
        &proxy.pin(),
        "--token",
        "0123456789abcdef0123456789abcdef",
        "--nodename",
        "nobody",
        "--data-dir",
        dir.join("bad").to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    until_metric(
        &pdiag,
        "burrow_proxy_joins_total{result=\"token_not_found\"}",
        1.0,
    );

    let data = dir.join("agent");
    let mut agent = start_agent(
        &proxy,
        &data,
        "node1",
        &["--diag-listen", "127.0.0.1:0", "--transport", "tcp"],
    );
    let adiag = diag_addr(&mut agent);
    let proxy_id = proxy.ready().unwrap();

    // The agent: ready, naming its tunnel; metrics with the proxy and the transport.
    let (code, body) = http_get(&adiag, "/readyz");
    assert_eq!(code, 200, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["tunnels"][0]["proxy"], proxy_id.as_str(), "{body}");
    assert_eq!(ready["tunnels"][0]["transport"], "tcp", "{body}");
    let held = format!("burrow_agent_tunnels{{proxy=\"{proxy_id}\",transport=\"tcp\"}}");
    let scrape = until_metric(&adiag, &held, 1.0);
    assert_eq!(
        metric(
            &scrape,
            "burrow_agent_tunnel_connects_total{transport=\"tcp\"}"
        ),
        Some(1.0),
        "{scrape}"
    );
    assert!(
        scrape.contains("burrow_agent_build_info{version="),
        "{scrape}"
    );

    // The proxy: one TCP tunnel, one node, one good join, backend operations timed.
    let scrape = until_metric(&pdiag, "burrow_proxy_tunnels{transport=\"tcp\"}", 1.0);
    assert_eq!(metric(&scrape, "burrow_proxy_nodes"), Some(1.0), "{scrape}");
    assert_eq!(
        metric(&scrape, "burrow_proxy_joins_total{result=\"ok\"}"),
        Some(1.0),
        "{scrape}"
    );
    let puts = metric(
        &scrape,
        "burrow_proxy_backend_duration_seconds_count{op=\"put\"}",
    );
    assert!(puts.is_some_and(|n| n >= 1.0), "{scrape}");
    // Nothing secret in either scrape: no token, no key, no user.
    for text in [&scrape, &http_get(&adiag, "/metrics").1] {
        assert!(!text.contains("0123456789abcdef"), "{text}");
        assert!(!text.contains("PRIVATE"), "{text}");
    }

    // `burrow-agent status` while it runs (the agent writes its status within a second).
    let status = eventually(WAIT, || {
        let s = status_json(&data);
        s["tunnels"][0]["proxy"].is_string().then_some(s)
    })
    .expect("the status never showed the tunnel");
    assert_eq!(status["agent"], "running", "{status}");
    assert_eq!(status["node_name"], "node1", "{status}");
    assert_eq!(status["tunnels"][0]["proxy"], proxy_id.as_str(), "{status}");
    assert_eq!(status["diag_addr"], adiag.as_str(), "{status}");
    let out = run_bounded(
        bin("burrow-agent")
            .args(["status", "--data-dir"])
            .arg(&data),
    );
    assert!(out.status.success());
    let shown = text(&out.stdout);
    assert!(shown.contains("node1 (host id "), "{shown}");
    assert!(shown.contains("tunnels:    1"), "{shown}");

    // Two dials through the SSH jump host: one to the node (a real OpenSSH session), one to a
    // node nobody has.
    let alice = Alice::new(&proxy, dir, &ssh_addr);
    let ssh = |target: &str| run_bounded(&mut alice.ssh(target, "echo through"));
    let out = ssh("node1");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "through\n");
    assert!(!ssh("ghost").status.success());
    let scrape = until_metric(&pdiag, "burrow_proxy_dials_total{result=\"ok\"}", 1.0);
    assert_eq!(
        metric(&scrape, "burrow_proxy_dials_total{result=\"unknown_node\"}"),
        Some(1.0),
        "{scrape}"
    );
    assert_eq!(
        metric(&scrape, "burrow_proxy_dial_duration_seconds_count"),
        Some(1.0),
        "{scrape}"
    );
    // The session ended: no SSH session open at the proxy or the node.
    until_metric(&pdiag, "burrow_proxy_ssh_sessions", 0.0);
    let scrape = until_metric(&adiag, "burrow_agent_ssh_connections", 0.0);
    assert_eq!(
        metric(&scrape, "burrow_agent_dial_streams_total"),
        Some(1.0),
        "{scrape}"
    );

    // The proxy dies: the agent is not ready any more, and says why in its status.
    proxy.daemon.kill();
    eventually(WAIT, || {
        (http_get(&adiag, "/readyz").0 == 503).then_some(())
    })
    .expect("the agent stayed ready without a tunnel");
    let scrape = until_metric(
        &adiag,
        "burrow_agent_tunnel_disconnects_total{reason=\"lost\"}",
        1.0,
    );
    assert_eq!(metric(&scrape, &held), None, "{scrape}");
    let status = eventually(WAIT, || {
        let s = status_json(&data);
        (s["last_error"]["message"].is_string() && s["tunnels"] == serde_json::json!([]))
            .then_some(s)
    })
    .expect("the status never showed the lost proxy");
    let message = status["last_error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.starts_with("cannot open a tunnel: "), "{message}");
    let scrape = http_get(&adiag, "/metrics").1;
    assert!(
        metric(&scrape, "burrow_agent_tunnel_dial_failures_total").is_some_and(|n| n >= 1.0),
        "{scrape}"
    );

    // A clean stop: the status says so.
    agent.stop();
    let status = status_json(&data);
    assert_eq!(status["agent"], "stopped", "{status}");
}

fn whoami() -> String {
    text(&Command::new("id").arg("-un").output().unwrap().stdout)
        .trim()
        .to_string()
}

#[test]
fn status_of_a_node_that_never_ran_and_a_bad_diag_address() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run_bounded(
        bin("burrow-agent")
            .args(["status", "--data-dir"])
            .arg(tmp.path()),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(shown.contains("not joined yet"), "{shown}");
    assert!(shown.contains("not running"), "{shown}");

    let out = agent_run(&["--proxy", "127.0.0.1:1", "--diag-listen", "localhost:x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("diag_listen \"localhost:x\" is not an IP:PORT address or off"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn openssh_refuses_a_removed_nodes_host_certificate_through_the_exported_krl() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let proxy = Proxy::start(&dir.join("proxy"), &[]);
    let data = dir.join("node2");
    let mut agent = start_agent(&proxy, &data, "node2", &[]);
    let host_id = host_id(&data);
    agent.stop();
    let rm = proxy.ctl(&["nodes", "rm", &host_id]);
    assert!(rm.status.success(), "{}", text(&rm.stderr));

    // The removed node, cut off from the cluster (a stolen device, say), still holds its host key
    // and certificate and serves SSH on a local port.
    let port = closed_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let mut cmd = bin("burrow-agent");
    cmd.args(["start", "--proxy", &format!("127.0.0.1:{}", closed_port())])
        .args(["--ssh-listen", &listen, "--data-dir"])
        .arg(&data);
    let mut stolen = Daemon::spawn(cmd, "burrow-agent");
    stolen.wait_for("SSH listening on");

    Alice::new(&proxy, dir, "");
    let krl = proxy.ctl(&["auth", "export", "--type", "krl"]);
    assert!(krl.status.success(), "{}", text(&krl.stderr));
    assert!(krl.stdout.starts_with(b"SSHKRL\n\0"));
    std::fs::write(dir.join("burrow.krl"), &krl.stdout).unwrap();
    let json = proxy.ctl_json(&["auth", "export", "--type", "krl"]);
    assert_eq!(
        json["revoked_key_ids"],
        serde_json::json!([format!("host:{host_id}")])
    );

    let config = dir.join("ssh_config");
    let ssh = |revoked: bool| {
        write_ssh_config(&config, &dir.join("known_hosts"), &dir.join("alice"));
        let mut extra =
            format!("Host node2\n  HostName 127.0.0.1\n  HostKeyAlias node2\n  Port {port}\n");
        if revoked {
            extra.push_str(&format!(
                "  RevokedHostKeys {}\n",
                dir.join("burrow.krl").display()
            ));
        }
        let base = std::fs::read_to_string(&config).unwrap();
        std::fs::write(&config, format!("{extra}{base}")).unwrap();
        run_bounded(
            Command::new("ssh")
                .arg("-F")
                .arg(&config)
                .args(["node2", "echo served"]),
        )
    };
    // Without the list, the @cert-authority line alone trusts the removed node.
    let out = ssh(false);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "served\n");
    // With it, OpenSSH refuses the node's certificate before logging in.
    let out = ssh(true);
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("revoked by file"),
        "{}",
        text(&out.stderr)
    );
    assert!(text(&out.stdout).is_empty());

    // ssh-keygen reads the list too, and finds the node's certificate in it.
    let identity: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("identity.json")).unwrap()).unwrap();
    std::fs::write(
        dir.join("node2-cert.pub"),
        identity["ssh_cert"].as_str().unwrap(),
    )
    .unwrap();
    let query = run_bounded(
        Command::new("ssh-keygen")
            .arg("-Q")
            .arg("-f")
            .arg(dir.join("burrow.krl"))
            .arg(dir.join("node2-cert.pub")),
    );
    assert!(!query.status.success(), "{}", text(&query.stdout));
    assert!(
        text(&query.stdout).contains("REVOKED"),
        "{}",
        text(&query.stdout)
    );
    stolen.stop();
}

/// The validity `ssh-keygen -L` prints for an OpenSSH certificate ("from X to Y").
fn ssh_cert_validity(dir: &Path, cert: &str) -> String {
    let path = dir.join("cert-to-read-cert.pub");
    std::fs::write(&path, cert).unwrap();
    let out = run_bounded(Command::new("ssh-keygen").arg("-L").arg("-f").arg(&path));
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Valid: ").map(str::to_string))
        .unwrap()
}

fn identity_json(data: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(data.join("identity.json")).unwrap()).unwrap()
}

#[test]
fn node_certificates_renew_over_the_tunnel_with_an_ssh_session_open_across_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Renewed between half and two thirds of 20 s: 10 to 14 s after the join.
    std::fs::write(dir.join("proxy.yaml"), "node_cert_ttl: 20s\n").unwrap();
    let config = dir.join("proxy.yaml");
    let mut proxy = Proxy::start(&dir.join("proxy"), &["--config", config.to_str().unwrap()]);
    let ssh_addr = proxy
        .daemon
        .wait_for("SSH jump host listening on ")
        .trim()
        .to_string();
    let data = dir.join("agent");
    let mut agent = start_agent(&proxy, &data, "node1", &["--transport", "tcp"]);
    let before = identity_json(&data);
    let valid_before = ssh_cert_validity(dir, before["ssh_cert"].as_str().unwrap());
    assert!(!valid_before.contains("forever"), "{valid_before}");

    let alice = Alice::new(&proxy, dir, &ssh_addr);
    let ssh = |command: &str| alice.ssh("node1", command);
    // A session that outlives the renewal.
    let session = ssh("sleep 18; echo survived").spawn().unwrap();
    agent.wait_for("renewed the node's certificates");
    let out = finish_bounded(session);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "survived\n");

    // New certificates, stored, for the same node; the tunnel was never dropped for it.
    let after = identity_json(&data);
    assert_ne!(after["tls_cert"], before["tls_cert"]);
    assert_ne!(after["ssh_cert"], before["ssh_cert"]);
    assert_eq!(after["host_id"], before["host_id"]);
    assert_eq!(after["ssh_key"], before["ssh_key"]);
    assert_ne!(
        ssh_cert_validity(dir, after["ssh_cert"].as_str().unwrap()),
        valid_before
    );
    assert_eq!(proxy.daemon.log().matches("tunnel up").count(), 1);
    assert!(proxy.daemon.log().contains("renewed a node's certificates"));

    // A new connection verifies the renewed host certificate; a restarted agent tunnels with the
    // renewed TLS certificate.
    let out = run_bounded(&mut ssh("echo again"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "again\n");
    agent.stop();
    let mut cmd = bin("burrow-agent");
    cmd.args([
        "start",
        "--proxy",
        &proxy.web_addr,
        "--transport",
        "tcp",
        "--data-dir",
    ])
    .arg(&data);
    let mut again = Daemon::spawn(cmd, "burrow-agent");
    again.wait_for("tunnel up");
}

#[test]
fn an_agent_whose_certificates_expired_while_offline_says_so_and_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("proxy.yaml"), "node_cert_ttl: 10s\n").unwrap();
    let config = dir.join("proxy.yaml");
    let proxy = Proxy::start(&dir.join("proxy"), &["--config", config.to_str().unwrap()]);
    let data = dir.join("agent");
    // Stopped before its renewal (5 s at the earliest), then offline past the 10 s.
    let mut agent = start_agent(&proxy, &data, "node1", &["--transport", "tcp"]);
    agent.stop();
    std::thread::sleep(std::time::Duration::from_secs(11));
    let mut cmd = bin("burrow-agent");
    cmd.args(["start", "--proxy", &proxy.web_addr, "--data-dir"])
        .arg(&data);
    let out = run_bounded(&mut cmd);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("this node's certificates expired at ")
            && stderr.contains("identity.json away"),
        "{stderr}"
    );
}

#[test]
fn burrowctl_says_how_long_its_identity_lasts_and_renews_it() {
    let tmp = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&tmp.path().join("proxy"), &[]);
    let out = proxy.ctl(&["status"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    let line = shown
        .lines()
        .find(|l| l.starts_with("Admin identity: valid until "))
        .unwrap_or_else(|| panic!("{shown}"));
    // A year, issued at the proxy's first start: 364 or 365 days left.
    assert!(
        line.contains("(364 days left") || line.contains("(365 days left"),
        "{line}"
    );
    let before_expiry = proxy.ctl_json(&["status"])["admin_identity_expires"]
        .as_u64()
        .unwrap();

    let path = proxy.data_dir.join("admin-identity");
    let before = std::fs::read_to_string(&path).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let out = proxy.ctl(&["auth", "renew"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("Renewed the admin identity "),
        "{}",
        text(&out.stdout)
    );
    let after = std::fs::read_to_string(&path).unwrap();
    assert_ne!(after, before);
    assert_eq!(mode(&path), 0o600);
    // The new identity works, and lasts longer than the old one.
    let after_expiry = proxy.ctl_json(&["status"])["admin_identity_expires"]
        .as_u64()
        .unwrap();
    assert!(
        after_expiry > before_expiry,
        "{after_expiry} <= {before_expiry}"
    );
    assert!(!proxy.daemon.log().contains("PRIVATE KEY"));
}

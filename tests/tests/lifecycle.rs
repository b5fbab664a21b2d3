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
    user: SshUser,
    jump: String,
}

impl Alice {
    fn new(proxy: &Proxy, dir: &Path, jump: &str) -> Alice {
        Alice {
            user: SshUser::new(proxy, dir),
            jump: jump.to_string(),
        }
    }

    /// `ssh -J` to `target`'s SSH port through the proxy, running `command`; output captured.
    fn ssh(&self, target: &str, command: &str) -> Command {
        let mut cmd = self.user.ssh(&self.jump, target, &[]);
        cmd.arg(command).stdin(std::process::Stdio::null());
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
    let ssh_addr = proxy.ssh_addr();
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
/// `burrow-agent start` for a node that has joined already (its identity is in `data`).
fn joined_agent(proxy: &str, data: &Path, extra: &[&str]) -> Command {
    let mut cmd = bin("burrow-agent");
    cmd.args(["start", "--proxy", proxy, "--data-dir"])
        .arg(data)
        .args(extra);
    cmd
}

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
    let ssh_addr = proxy.ssh_addr();
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
    let mut again = Daemon::spawn(
        joined_agent(&proxy.web_addr, &data, &["--transport", "tcp"]),
        "burrow-agent",
    );
    again.wait_for("tunnel up");

    // The proxy renews its own certificates (they live as long as the nodes'): twice means the
    // first ones have expired, and burrowctl, the agent and OpenSSH still reach it.
    eventually(std::time::Duration::from_secs(40), || {
        let log = proxy.daemon.log();
        (log.matches("issued the proxy's certificate again").count() >= 2
            && log
                .matches("issued the SSH jump host's host certificate again")
                .count()
                >= 2)
            .then_some(())
    })
    .unwrap_or_else(|| panic!("{}", proxy.daemon.log()));
    assert!(proxy.ctl(&["status"]).status.success());
    let out = run_bounded(&mut ssh("echo late"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "late\n");
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
    let out = run_bounded(&mut joined_agent(&proxy.web_addr, &data, &[]));
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

fn rotate(proxy: &Proxy, kind: &str, phase: &str) -> serde_json::Value {
    proxy.ctl_json(&["auth", "rotate", "--type", kind, "--phase", phase])
}

/// Waits until every agent's identity file satisfies `done`.
fn until_identities(datas: &[&Path], what: &str, done: impl Fn(&serde_json::Value) -> bool) {
    eventually(WAIT, || {
        datas.iter().all(|d| done(&identity_json(d))).then_some(())
    })
    .unwrap_or_else(|| panic!("the agents' identities never showed {what}"));
}

/// `ssh-keygen -L`'s "Signing CA" line of an SSH certificate.
fn ssh_cert_signer(dir: &Path, cert: &str) -> String {
    let path = dir.join("signer-cert.pub");
    std::fs::write(&path, cert).unwrap();
    let out = run_bounded(Command::new("ssh-keygen").arg("-L").arg("-f").arg(&path));
    text(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Signing CA: ").map(str::to_string))
        .unwrap()
}

/// The SHA256 fingerprint `ssh-keygen -l` gives an OpenSSH public key line.
fn fingerprint(dir: &Path, key: &str) -> String {
    let path = dir.join("fp.pub");
    std::fs::write(&path, key).unwrap();
    let out = run_bounded(Command::new("ssh-keygen").arg("-l").arg("-f").arg(&path));
    text(&out.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string()
}

#[test]
fn a_host_ca_rotation_keeps_three_agents_and_an_open_ssh_session() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut proxy = Proxy::start(&dir.join("proxy"), &[]);
    let ssh_addr = proxy.ssh_addr();
    let old_pin = proxy.pin();
    let datas: Vec<_> = (1..=3).map(|i| dir.join(format!("a{i}"))).collect();
    let data_refs: Vec<&Path> = datas.iter().map(|d| d.as_path()).collect();
    let mut agents: Vec<Daemon> = [("node1", "tcp"), ("node2", "quic"), ("node3", "auto")]
        .iter()
        .zip(&datas)
        .map(|((name, t), data)| start_agent(&proxy, data, name, &["--transport", t]))
        .collect();
    // A node that stays offline through the whole rotation.
    let away = dir.join("away");
    start_agent(&proxy, &away, "node4", &["--transport", "tcp"]).stop();

    let alice = Alice::new(&proxy, dir, &ssh_addr);
    let old_known = std::fs::read(dir.join("known_hosts")).unwrap();
    let release = dir.join("release");
    let session = alice
        .ssh(
            "node1",
            &format!(
                "for i in $(seq 900); do [ -e {0} ] && break; sleep 0.1; done; echo survived",
                release.display()
            ),
        )
        .spawn()
        .unwrap();

    // init: a new CA, trusted beside the old one, which still signs.
    let init = rotate(&proxy, "host", "init");
    assert_eq!(init["rotation"]["phase"], "init");
    let pins = init["ca_pins"].as_array().unwrap().clone();
    assert_eq!(pins.len(), 2, "{init}");
    assert_eq!(pins[0], old_pin.as_str());
    let new_pin = pins[1].as_str().unwrap().to_string();
    let status = proxy.ctl(&["status"]);
    let status_text = text(&status.stdout);
    assert!(
        status_text.contains(&format!("CA pin:   {old_pin} (signs)"))
            && status_text.contains(&format!(
                "CA pin:   {new_pin} (trusted during the rotation)"
            ))
            && status_text.contains("Rotation: host CA, phase init"),
        "{status_text}"
    );
    until_identities(&data_refs, "both host CAs", |i| {
        i["host_ca_certs"].as_array().unwrap().len() == 2
    });
    let export = proxy.ctl(&["auth", "export", "--type", "host"]);
    let both = text(&export.stdout);
    assert_eq!(both.matches("@cert-authority * ").count(), 2, "{both}");
    std::fs::write(dir.join("known_hosts"), &both).unwrap();
    let new_ca_line = both.lines().nth(1).unwrap().to_string();
    let new_ca_key = new_ca_line
        .trim_start_matches("@cert-authority * ")
        .to_string();

    // update_clients: the new CA signs; every node renews at once over its tunnel.
    let before: Vec<_> = data_refs.iter().map(|d| identity_json(d)).collect();
    rotate(&proxy, "host", "update_clients");
    let new_fp = fingerprint(dir, &new_ca_key);
    until_identities(&data_refs, "certificates from the new CA", |i| {
        ssh_cert_signer(dir, i["ssh_cert"].as_str().unwrap()).contains(&new_fp)
    });
    for (data, old) in data_refs.iter().zip(&before) {
        let now = identity_json(data);
        assert_ne!(now["tls_cert"], old["tls_cert"]);
        assert_eq!(now["host_id"], old["host_id"]);
    }
    // update_servers, then standby: the old CA is gone.
    rotate(&proxy, "host", "update_servers");
    let done = rotate(&proxy, "host", "standby");
    assert_eq!(done["ca_pins"], serde_json::json!([new_pin]), "{done}");
    assert!(done["rotation"].is_null(), "{done}");
    until_identities(&data_refs, "only the new host CA", |i| {
        i["host_ca_certs"].as_array().unwrap().len() == 1
    });
    assert_eq!(proxy.pin(), new_pin);
    let export = proxy.ctl(&["auth", "export", "--type", "host"]);
    assert_eq!(text(&export.stdout).trim(), new_ca_line);

    // The session opened before the rotation is still there, and no tunnel was dropped for it.
    std::fs::write(&release, "").unwrap();
    let out = finish_bounded(session);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "survived\n");
    assert_eq!(proxy.daemon.log().matches("tunnel up").count(), 4);

    // Users who trust only the new CA reach every node (the proxy's own SSH certificate is from
    // it too); users who trust only the old one do not.
    std::fs::write(dir.join("known_hosts"), format!("{new_ca_line}\n")).unwrap();
    for node in ["node1", "node2", "node3"] {
        let out = run_bounded(&mut alice.ssh(node, "echo hi"));
        assert!(out.status.success(), "{node}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "hi\n");
    }
    std::fs::write(dir.join("known_hosts"), &old_known).unwrap();
    let out = run_bounded(&mut alice.ssh("node2", "echo hi"));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("Host key verification failed"),
        "{}",
        text(&out.stderr)
    );

    // A restarted agent tunnels with what it learnt.
    agents[0].stop();
    agents[0] = Daemon::spawn(
        joined_agent(&proxy.web_addr, &datas[0], &[]),
        "burrow-agent",
    );
    agents[0].wait_for("tunnel up");

    // The node that was away cannot come back by itself, and says what to do; joined again with
    // a fresh token and the new pin, it is back.
    let mut stale = Daemon::spawn(
        joined_agent(&proxy.web_addr, &away, &["--transport", "tcp"]),
        "burrow-agent",
    );
    stale.wait_for("is not from a CA this node trusts; if the cluster's CA was rotated");
    stale.stop();
    let old_id = host_id(&away);
    assert!(proxy.ctl(&["nodes", "rm", &old_id]).status.success());
    std::fs::rename(away.join("identity.json"), dir.join("old-identity.json")).unwrap();
    let token = proxy.node_token(&[]);
    let mut cmd = bin("burrow-agent");
    cmd.args([
        "start",
        "--proxy",
        &proxy.web_addr,
        "--ca-pin",
        &new_pin,
        "--nodename",
        "node4",
        "--token",
        &token,
        "--transport",
        "tcp",
        "--data-dir",
    ])
    .arg(&away);
    let mut back = Daemon::spawn(cmd, "burrow-agent");
    back.wait_for("tunnel up");
    assert_ne!(host_id(&away), old_id);
}

#[test]
fn a_user_ca_rotation_rolls_back_and_an_automatic_one_runs_its_phases() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut proxy = Proxy::start(&dir.join("proxy"), &[]);
    let ssh_addr = proxy.ssh_addr();
    let data = dir.join("agent");
    let _agent = start_agent(&proxy, &data, "node1", &["--transport", "tcp"]);
    let alice = Alice::new(&proxy, dir, &ssh_addr);
    let old_user_ca = text(&proxy.ctl(&["auth", "export", "--type", "user"]).stdout);

    // Another rotation cannot start while one is under way, and phases go in order.
    rotate(&proxy, "user", "init");
    let refused = proxy.ctl(&["auth", "rotate", "--type", "host", "--phase", "init"]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("a user CA rotation is under way"),
        "{}",
        text(&refused.stderr)
    );
    let refused = proxy.ctl(&["auth", "rotate", "--type", "user", "--phase", "standby"]);
    assert!(
        text(&refused.stderr).contains("cannot move to standby (next: update_clients)"),
        "{}",
        text(&refused.stderr)
    );
    let both = text(&proxy.ctl(&["auth", "export", "--type", "user"]).stdout);
    assert_eq!(both.lines().count(), 2, "{both}");
    until_identities(&[&data], "both user CAs", |i| {
        i["user_ca_ssh"].as_array().unwrap().len() == 2
    });

    // update_clients: certificates come from the new user CA and the node takes them.
    rotate(&proxy, "user", "update_clients");
    let bob = dir.join("bob");
    proxy.sign_user("bob", &whoami(), "1h", &bob);
    let bob_cert = std::fs::read_to_string(format!("{}-cert.pub", bob.display())).unwrap();
    let new_user_ca = both.lines().nth(1).unwrap();
    assert!(ssh_cert_signer(dir, &bob_cert).contains(&fingerprint(dir, new_user_ca)));
    let config = dir.join("bob_config");
    write_ssh_config(&config, &dir.join("known_hosts"), &bob);
    let bob_to = |node: &str| {
        let mut cmd = Command::new("ssh");
        cmd.arg("-F")
            .arg(&config)
            .args([
                "-J",
                &format!("bob@{ssh_addr}"),
                "-p",
                "3022",
                node,
                "echo bob",
            ])
            .stdin(std::process::Stdio::null());
        cmd
    };
    let out = run_bounded(&mut bob_to("node1"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "bob\n");

    // Rolled back: the old CA signs again; at standby the new one is gone, and so are its
    // certificates.
    rotate(&proxy, "user", "rollback");
    let done = rotate(&proxy, "user", "standby");
    assert!(done["rotation"].is_null(), "{done}");
    assert_eq!(
        text(&proxy.ctl(&["auth", "export", "--type", "user"]).stdout),
        old_user_ca
    );
    until_identities(&[&data], "the old user CA only", |i| {
        i["user_ca_ssh"].as_array().unwrap().len() == 1
    });
    let out = run_bounded(&mut bob_to("node1"));
    assert!(!out.status.success(), "a certificate from the retired CA");
    let out = run_bounded(&mut alice.ssh("node1", "echo alice"));
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Automatic: over a 15 s grace period, the proxy moves it through every phase by itself.
    let auto = proxy.ctl_json(&["auth", "rotate", "--type", "host", "--grace-period", "15s"]);
    assert_eq!(auto["rotation"]["phase"], "init");
    assert!(
        auto["rotation"]["next_phase_at"].as_u64().is_some(),
        "{auto}"
    );
    let old_pin = auto["ca_pins"][0].as_str().unwrap().to_string();
    let finished = eventually(std::time::Duration::from_secs(40), || {
        let s = proxy.ctl_json(&["status"]);
        s["rotation"].is_null().then_some(s)
    })
    .expect("the automatic rotation never finished");
    assert_ne!(finished["ca_pin"].as_str().unwrap(), old_pin);
    for phase in ["update_clients", "update_servers"] {
        assert!(
            proxy.daemon.log().contains(&format!("phase={phase}")),
            "{}",
            proxy.daemon.log()
        );
    }
    until_identities(&[&data], "the new host CA only", |i| {
        i["host_ca_certs"].as_array().unwrap().len() == 1
    });
    let out = run_bounded(&mut alice.ssh("node1", "echo after"));
    assert!(
        text(&out.stderr).contains("Host key verification failed"),
        "known_hosts names the retired host CA only: {}",
        text(&out.stderr)
    );
}

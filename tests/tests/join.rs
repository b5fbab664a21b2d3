//! The agent's join through the proxy's web port, and every way it can be refused.

use std::path::Path;

use burrow_tests::*;

fn agent_daemon(args: &[&str], data_dir: &Path) -> Daemon {
    let mut cmd = bin("burrow-agent");
    cmd.arg("start").args(args).arg("--data-dir").arg(data_dir);
    Daemon::spawn(cmd, "burrow-agent")
}

#[test]
fn agent_joins_with_a_token_file_and_restarts_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&dir.path().join("proxy"), &["--cluster-name", "edge"]);
    let pin = proxy.pin();
    let token = proxy.node_token(&["--ttl", "5m", "--labels", "site=lab"]);
    let token_path = token_file(dir.path(), &token);
    let data = dir.path().join("agent");

    let mut agent = agent_daemon(
        &[
            "--token",
            &token_path,
            "--proxy",
            &proxy.web_addr,
            "--ca-pin",
            &pin,
            "--nodename",
            "pi-1",
        ],
        &data,
    );
    let joined = agent.wait_for("joined the cluster host_id=");
    let host_id = joined.split_whitespace().next().unwrap().to_string();
    assert_eq!(host_id.len(), 36, "{joined}");
    assert!(
        !agent.log().contains("WARN"),
        "a pinned join warns about nothing:\n{}",
        agent.log()
    );
    assert!(
        !agent.log().contains(&token),
        "the token never reaches a log line"
    );
    agent.wait_for("agent ready");
    assert!(
        proxy
            .daemon
            .log()
            .contains(&format!("node joined host_id={host_id} node=pi-1")),
        "{}",
        proxy.daemon.log()
    );
    assert!(!proxy.daemon.log().contains(&token));

    assert_eq!(mode(&data), 0o700);
    let identity_path = data.join("identity.json");
    assert_eq!(mode(&identity_path), 0o600);
    let identity: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&identity_path).unwrap()).unwrap();
    assert_eq!(identity["host_id"], host_id.as_str());
    assert_eq!(identity["cluster_name"], "edge");
    assert_eq!(identity["node_name"], "pi-1");
    assert_eq!(identity["labels"]["site"], "lab");
    assert!(
        identity["ssh_cert"]
            .as_str()
            .unwrap()
            .starts_with("ssh-ed25519-cert-v01@openssh.com ")
    );
    // The identity and the running agent's status (`burrow-agent status`), nothing else.
    assert_eq!(files_in(&data), vec!["identity.json", "status.json"]);
    assert_eq!(agent.stop().code(), Some(0));

    // The token is gone (revoked, file deleted): the second start needs none.
    std::fs::remove_file(&token_path).unwrap();
    assert!(proxy.ctl(&["tokens", "rm", &token]).status.success());
    let mut again = agent_daemon(&["--proxy", &proxy.web_addr, "--ca-pin", &pin], &data);
    let loaded = again.wait_for("loaded the node's identity; no token needed host_id=");
    assert!(loaded.starts_with(&host_id), "{loaded}");
    again.wait_for("agent ready");
    assert!(!again.log().contains("joining"), "{}", again.log());
}

#[test]
fn a_join_without_a_pin_warns_loudly_and_the_default_token_file_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&dir.path().join("proxy"), &[]);
    let data = dir.path().join("agent");
    std::fs::create_dir(&data).unwrap();
    // No --token: DATA_DIR/token, as on a freshly flashed image.
    token_file(&data, &proxy.node_token(&[]));
    let mut agent = agent_daemon(
        &["--proxy", &proxy.web_addr, "--nodename", "unpinned"],
        &data,
    );
    agent.wait_for("joined the cluster");
    let log = agent.log();
    let warn = log.lines().find(|l| l.contains("WARN")).expect("a warning");
    assert!(
        warn.contains("cannot verify the identity of the cluster"),
        "{warn}"
    );
}

/// Runs a join that must fail; checks the exit code, the one-sentence message and that the
/// data dir holds no identity afterwards.
fn refused(args: &[&str], data: &Path, code: i32, message: &str) {
    let before = files_in(data);
    let out = agent_run(
        &[
            args,
            &["--data-dir", data.to_str().unwrap(), "--nodename", "n"],
        ]
        .concat(),
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    let last = err.trim().lines().last().unwrap_or("");
    assert!(
        last.starts_with("burrow-agent: ") && last.contains(message),
        "{args:?}: wanted {message:?} in:\n{err}"
    );
    assert_eq!(files_in(data), before, "{args:?} left files behind");
    assert!(!data.join("identity.json").exists());
}

#[test]
fn every_bad_token_is_refused_precisely_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&dir.path().join("proxy"), &[]);
    let pin = proxy.pin();
    let data = dir.path().join("agent");
    let base = ["--proxy", proxy.web_addr.as_str(), "--ca-pin", pin.as_str()];
    let with_token = |t: &str| -> Vec<String> {
        base.iter()
            .map(|s| s.to_string())
            .chain(["--token".to_string(), t.to_string()])
            .collect()
    };
    let run = |t: &str, code: i32, msg: &str| {
        let args = with_token(t);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(&args, &data, code, msg);
    };

    run(
        "0123456789abcdef0123456789abcdef",
        1,
        "the proxy refused the join: the join token is not known to this cluster",
    );

    let short = proxy.node_token(&["--ttl", "1s"]);
    eventually(WAIT, || {
        proxy.ctl_json(&["tokens", "ls"])["tokens"]
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    })
    .expect("the 1s token expires");
    run(
        &short,
        1,
        "the proxy refused the join: the join token expired at ",
    );

    let revoked = proxy.node_token(&[]);
    assert!(proxy.ctl(&["tokens", "rm", &revoked]).status.success());
    run(
        &revoked,
        1,
        "the proxy refused the join: the join token was revoked",
    );

    let proxy_only = proxy.ctl_json(&["tokens", "add", "--type", "proxy"])["token"]
        .as_str()
        .unwrap()
        .to_string();
    run(
        &proxy_only,
        1,
        "the proxy refused the join: the join token allows role proxy, not node",
    );

    let missing = dir.path().join("no-such-token");
    run(
        missing.to_str().unwrap(),
        2,
        &format!("cannot read token file {}", missing.display()),
    );
    let empty = dir.path().join("empty-token");
    std::fs::write(&empty, "\n").unwrap();
    run(
        empty.to_str().unwrap(),
        2,
        &format!("token file {} is empty", empty.display()),
    );

    // No token at all, and no DATA_DIR/token.
    refused(
        &base,
        &data,
        2,
        "has no join token: pass --token or write one to",
    );

    // The proxy kept serving through all of it, and a good token still works.
    let good = proxy.node_token(&[]);
    let mut agent = agent_daemon(
        &[&base[..], &["--token", &good, "--nodename", "n"]].concat(),
        &data,
    );
    agent.wait_for("joined the cluster");
}

#[test]
fn a_pin_mismatch_or_an_unreachable_proxy_sends_no_token_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ours = Proxy::start(&dir.path().join("ours"), &["--cluster-name", "ours"]);
    let theirs = Proxy::start(&dir.path().join("theirs"), &["--cluster-name", "theirs"]);
    let token = ours.node_token(&[]);
    let data = dir.path().join("agent");

    // Another cluster's proxy answers at the address the agent was given.
    let our_pin = ours.pin();
    refused(
        &[
            "--token",
            &token,
            "--proxy",
            &theirs.web_addr,
            "--ca-pin",
            &our_pin,
        ],
        &data,
        1,
        &format!(
            "CA pin mismatch: the proxy at {} presented a host CA with pin {}, but --ca-pin is {our_pin}",
            theirs.web_addr,
            theirs.pin()
        ),
    );
    assert!(
        !theirs.daemon.log().contains("join refused"),
        "the token never reached the impostor"
    );

    let nowhere = format!("127.0.0.1:{}", closed_port());
    refused(
        &["--token", &token, "--proxy", &nowhere, "--ca-pin", &our_pin],
        &data,
        1,
        &format!("cannot reach the proxy at {nowhere}"),
    );

    refused(
        &[
            "--token",
            &token,
            "--proxy",
            &ours.web_addr,
            "--ca-pin",
            "sha256:1234",
        ],
        &data,
        2,
        "is malformed",
    );

    let cfg = dir.path().join("agent.yaml");
    std::fs::write(
        &cfg,
        format!(
            "proxy: {}
token: {token}
ca_pins: [\"{our_pin}\"]\n",
            ours.web_addr
        ),
    )
    .unwrap();
    refused(
        &["--config", cfg.to_str().unwrap()],
        &data,
        2,
        "unknown field `ca_pins`",
    );
    assert!(
        !data.exists(),
        "a refused join does not even create the data dir"
    );
}

#[test]
fn malformed_join_requests_get_json_errors_and_the_proxy_keeps_serving() {
    use burrow_net::tls::{self, ALPN_HTTP1};
    use burrow_net::web::{WebClient, WebError};
    use tunnel_proto::api::{self, JoinRequest, Role};
    use tunnel_proto::secret::Secret;

    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&dir.path().join("proxy"), &[]);
    let token = proxy.node_token(&[]);
    let client = WebClient::new(
        &proxy.web_addr,
        tls::unverified_client_config(&[ALPN_HTTP1]).unwrap(),
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let post = |body: &serde_json::Value| -> WebError {
        rt.block_on(client.post::<_, serde_json::Value>(api::JOIN_PATH, body))
            .unwrap_err()
    };
    let expect = |e: WebError, status: u16, code: &str, message: &str| match e {
        WebError::Api { status: s, error } => {
            assert_eq!(
                (s, error.code.as_str()),
                (status, code),
                "{}",
                error.message
            );
            assert!(error.message.contains(message), "{}", error.message);
        }
        other => panic!("wanted an API error, got {other}"),
    };

    let request = |key: &str, csr: &str| {
        serde_json::to_value(JoinRequest {
            token: Secret::new(token.clone()),
            node_name: "n".into(),
            role: Role::Node,
            ssh_public_key: key.into(),
            tls_csr: csr.into(),
        })
        .unwrap()
    };
    expect(
        post(&request("ssh-ed25519 AAAAnot-a-key", "x")),
        400,
        "bad_request",
        "ssh_public_key is not an OpenSSH public key",
    );
    let real_key =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGeWL2WnpbOs0y1n1J9yXhcEx0TsB8hqB71CUkQeyrHZ";
    expect(
        post(&request(
            real_key,
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        )),
        400,
        "bad_request",
        "tls_csr is not a valid",
    );
    expect(
        post(&serde_json::json!({"token": token})),
        400,
        "bad_request",
        "the join request is malformed",
    );
    let huge = "A".repeat(api::MAX_BODY_BYTES * 2);
    expect(
        post(&request(&huge, "x")),
        413,
        "payload_too_large",
        "larger than",
    );
    let find: serde_json::Value = rt.block_on(client.get(api::FIND_PATH)).unwrap();
    assert_eq!(find["server_version"], env!("CARGO_PKG_VERSION"));
    // Admin endpoints need the admin identity.
    let e = rt
        .block_on(client.get::<serde_json::Value>(api::STATUS_PATH))
        .unwrap_err();
    expect(e, 401, "unauthorized", "admin identity");
    assert!(
        proxy.ctl(&["status"]).status.success(),
        "the proxy still serves"
    );
}

#[test]
fn a_burst_of_bad_joins_from_one_address_is_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&dir.path().join("proxy"), &[]);
    let pin = proxy.pin();
    let data = dir.path().join("agent");
    let mut limited = None;
    for attempt in 0..30 {
        let out = agent_run(&[
            "--token",
            "guess-guess-guess",
            "--proxy",
            &proxy.web_addr,
            "--ca-pin",
            &pin,
            "--nodename",
            "n",
            "--data-dir",
            data.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(1));
        if text(&out.stderr).contains("too many failed join attempts from this address") {
            limited = Some(attempt);
            break;
        }
    }
    let limited = limited.expect("30 bad joins in a row are rate limited");
    assert!(
        limited >= 5,
        "honest mistakes are not limited at once (limited after {limited})"
    );
    // Even a good token waits now, and the proxy is fine.
    let good = proxy.node_token(&[]);
    let out = agent_run(&[
        "--token",
        &good,
        "--proxy",
        &proxy.web_addr,
        "--ca-pin",
        &pin,
        "--nodename",
        "n",
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(
        text(&out.stderr).contains("too many failed join attempts"),
        "{}",
        text(&out.stderr)
    );
    assert!(proxy.ctl(&["status"]).status.success());
    assert!(
        proxy
            .daemon
            .log()
            .contains("join refused: too many failed attempts")
    );
}

#[test]
fn node_names_are_hostnames_unique_and_never_the_clusters_own() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&dir.path().join("proxy"), &["--cluster-name", "edge"]);
    let _first = start_agent(&proxy, &dir.path().join("first"), "node1", &[]);
    let first_id = host_id(&dir.path().join("first"));
    let pin = proxy.pin();
    let token = proxy.node_token(&[]);
    let hostname = text(
        &std::process::Command::new("hostname")
            .output()
            .unwrap()
            .stdout,
    )
    .trim()
    .to_ascii_lowercase();
    let join_as = |name: &str| {
        let data = dir.path().join("tries");
        let out = agent_run(&[
            "--proxy",
            &proxy.web_addr,
            "--ca-pin",
            &pin,
            "--token",
            &token,
            &format!("--nodename={name}"),
            "--data-dir",
            data.to_str().unwrap(),
        ]);
        assert!(
            !data.join("identity.json").exists(),
            "{name}: a refused join wrote an identity"
        );
        (out.status.code(), text(&out.stderr))
    };
    // Not hostname-shaped: refused before anything is sent (a usage error).
    for bad in [
        "a_b",
        "Edge",
        "-x",
        "10.1.2.3",
        "0b5e0c2a-7d4e-4f3b-9a61-2c8f4e1d9b07",
    ] {
        let (code, err) = join_as(bad);
        assert_eq!(code, Some(2), "{bad}: {err}");
        assert!(err.contains("is invalid"), "{bad}: {err}");
    }
    // The cluster's own names: what clients verify proxies by, the proxies' names, the cluster's.
    for reserved in [
        "burrow.cluster.local",
        "localhost",
        "edge",
        hostname.as_str(),
    ] {
        let (code, err) = join_as(reserved);
        assert_eq!(code, Some(1), "{reserved}: {err}");
        assert!(
            err.contains("belongs to the cluster itself"),
            "{reserved}: {err}"
        );
    }
    // Another node's name.
    let (code, err) = join_as("node1");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("node name \"node1\" is taken by node {first_id}")),
        "{err}"
    );
    // Removing the node frees its name.
    let out = proxy.ctl(&["nodes", "rm", &first_id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let _second = start_agent(&proxy, &dir.path().join("second"), "node1", &[]);
}

#[test]
fn a_node_certificate_cannot_pass_for_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&dir.path().join("proxy"), &[]);
    let agent_dir = dir.path().join("agent");
    let _agent = start_agent(&proxy, &agent_dir, "mallory", &[]);
    // The node turns its own identity into a web server at an address it controls, answering
    // burrowctl's status request with a cluster of its choosing.
    let identity: serde_json::Value =
        serde_json::from_slice(&std::fs::read(agent_dir.join("identity.json")).unwrap()).unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir_all(www.join("v1/admin")).unwrap();
    std::fs::write(www.join("cert.pem"), identity["tls_cert"].as_str().unwrap()).unwrap();
    std::fs::write(www.join("key.pem"), identity["tls_key"].as_str().unwrap()).unwrap();
    std::fs::write(
        www.join("v1/admin/status"),
        r#"{"cluster_name":"forged","version":"0","ca_pins":["sha256:00"],"public_addr":null}"#,
    )
    .unwrap();
    let port = closed_port();
    let mut server = std::process::Command::new("openssl")
        .args(["s_server", "-quiet", "-WWW", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["-cert", "cert.pem", "-key", "key.pem"])
        .current_dir(&www)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // (s_server serves one connection at a time: the probe is closed at once.)
    let listening = eventually(WAIT, || {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .ok()
            .map(drop)
    });
    assert!(listening.is_some(), "openssl s_server did not start");
    let out = proxy.ctl(&["--proxy", &format!("127.0.0.1:{port}"), "status"]);
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(!text(&out.stdout).contains("forged"));
    assert!(
        text(&out.stderr).contains("certificate"),
        "{}",
        text(&out.stderr)
    );
}

//! Several proxies sharing one cluster through a real etcd.

use std::path::Path;

use burrow_tests::*;

fn etcd_args(etcd: &Etcd) -> Vec<String> {
    vec![
        "--storage".into(),
        "etcd".into(),
        "--etcd-endpoint".into(),
        etcd.url.clone(),
    ]
}

/// Joins a node through `proxy`; `Err` holds the agent's log if it did not join.
fn join(proxy: &Proxy, token: &str, pin: &str, data: &Path, name: &str) -> Result<(), String> {
    let mut cmd = bin("burrow-agent");
    cmd.args([
        "start",
        "--proxy",
        &proxy.web_addr,
        "--ca-pin",
        pin,
        "--nodename",
        name,
        "--token",
        token,
    ])
    .arg("--data-dir")
    .arg(data);
    let mut agent = Daemon::spawn(cmd, "burrow-agent");
    agent.try_wait_for("joined the cluster").map(|_| ())
}

#[test]
fn three_proxies_started_at_once_on_an_empty_etcd_form_one_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path());
    let args = etcd_args(&etcd);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let dirs: Vec<_> = (0..3)
        .map(|i| dir.path().join(format!("proxy{i}")))
        .collect();
    let specs: Vec<(&Path, &[&str])> = dirs.iter().map(|d| (d.as_path(), &args[..])).collect();
    let proxies = Proxy::start_many(&specs);

    let pins: Vec<String> = proxies.iter().map(Proxy::pin).collect();
    assert!(
        pins.iter().all(|p| p == &pins[0]),
        "one CA for all: {pins:?}"
    );
    let names: Vec<serde_json::Value> = proxies
        .iter()
        .map(|p| p.ctl_json(&["status"])["cluster_name"].clone())
        .collect();
    assert!(names.iter().all(|n| n == &names[0]), "{names:?}");
    let created = proxies
        .iter()
        .filter(|p| p.daemon.log().contains("created a new cluster"))
        .count();
    assert_eq!(created, 1, "exactly one proxy created the cluster");

    let ids: Vec<String> = proxies.iter().map(|p| p.ready().unwrap()).collect();
    let listed = eventually(WAIT, || {
        let ls = proxies[0].ctl_json(&["proxies", "ls"]);
        let mut seen: Vec<String> = ls["proxies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_str().unwrap().to_string())
            .collect();
        seen.sort();
        let mut want = ids.clone();
        want.sort();
        (seen == want).then_some(())
    });
    assert!(listed.is_some(), "proxies ls shows all three");

    // A token made through one proxy joins through another; a revoke through a third is seen by all.
    let pin = &pins[0];
    let token = proxies[0].node_token(&[]);
    join(&proxies[1], &token, pin, &dir.path().join("agent1"), "n1").unwrap();
    assert!(proxies[2].ctl(&["tokens", "rm", &token]).status.success());
    let refused = agent_run(&[
        "--proxy",
        &proxies[1].web_addr,
        "--ca-pin",
        pin,
        "--token",
        &token,
        "--nodename",
        "n2",
        "--data-dir",
        dir.path().join("agent2").to_str().unwrap(),
    ]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        text(&refused.stderr).contains("the join token was revoked"),
        "{}",
        text(&refused.stderr)
    );
    let tokens = proxies[1].ctl_json(&["tokens", "ls"]);
    assert_eq!(tokens["tokens"], serde_json::json!([]));
}

#[test]
fn a_proxy_that_loses_etcd_reports_not_ready_keeps_serving_and_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start(dir.path());
    let args = etcd_args(&etcd);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proxy = Proxy::start(&dir.path().join("proxy"), &args);
    let pin = proxy.pin();
    let token = proxy.node_token(&["--ttl", "1h"]);
    let id = eventually(WAIT, || proxy.ready().ok()).expect("ready with etcd up");

    etcd.kill();
    let why = eventually(WAIT, || proxy.ready().err()).expect("not ready without etcd");
    assert!(
        why.contains("not ready: the state backend is unreachable"),
        "{why}"
    );
    // What needs no backend still works: find answers, the admin gets a clear error.
    let out = proxy.ctl(&["tokens", "add"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("the state backend is unreachable"),
        "{}",
        text(&out.stderr)
    );
    let found = agent_run(&[
        "--proxy",
        &proxy.web_addr,
        "--ca-pin",
        &pin,
        "--token",
        &token,
        "--nodename",
        "n",
        "--data-dir",
        dir.path().join("a0").to_str().unwrap(),
    ]);
    assert_eq!(found.status.code(), Some(1));
    assert!(
        text(&found.stderr).contains("unreachable"),
        "find worked, join said why: {}",
        text(&found.stderr)
    );
    assert!(proxy.daemon.log().contains("reporting not ready"));

    etcd.restart();
    let back = eventually(WAIT, || proxy.ready().ok()).expect("ready again once etcd is back");
    assert_eq!(back, id);
    assert!(proxy.daemon.log().contains("reachable again"));
    let proxies = proxy.ctl_json(&["proxies", "ls"]);
    let ids: Vec<&str> = proxies["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec![id.as_str()],
        "registered once, not lost, not duplicated"
    );
    join(&proxy, &token, &pin, &dir.path().join("a1"), "n1")
        .expect("the token written before the outage still works");
}

#[test]
fn a_proxy_logs_in_to_an_etcd_with_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path());
    // Turn on etcd's authentication through its JSON gateway: a root user, then auth.
    for (path, body) in [
        (
            "/v3/auth/user/add",
            r#"{"name":"root","password":"s3cret pw"}"#,
        ),
        ("/v3/auth/user/grant", r#"{"user":"root","role":"root"}"#),
        ("/v3/auth/enable", "{}"),
    ] {
        let out = std::process::Command::new("curl")
            .args(["-sf", "--max-time", "10", "-d", body])
            .arg(format!("{}{path}", etcd.url))
            .output()
            .unwrap();
        assert!(out.status.success(), "{path}: {}", text(&out.stdout));
    }
    std::fs::write(dir.path().join("password"), "s3cret pw\n").unwrap();
    let config = |name: &str, login: bool| {
        let path = dir.path().join(format!("{name}.yaml"));
        let mut yaml = format!("storage:\n  type: etcd\n  endpoints: [\"{}\"]\n", etcd.url);
        if login {
            yaml.push_str(&format!(
                "  username: root\n  password_file: {}\n",
                dir.path().join("password").display()
            ));
        }
        std::fs::write(&path, yaml).unwrap();
        path
    };
    let with = config("with", true);
    let proxy = Proxy::start(
        &dir.path().join("p1"),
        &["--config", with.to_str().unwrap()],
    );
    eventually(WAIT, || proxy.ready().ok()).expect("ready on an etcd with authentication");
    assert!(
        proxy
            .ctl(&["tokens", "add", "--type", "node"])
            .status
            .success()
    );
    assert!(
        !proxy.daemon.log().contains("s3cret"),
        "the password reached the log"
    );

    let without = config("without", false);
    let out = bin("burrow-proxy")
        .args(["start", "--config", without.to_str().unwrap()])
        .args(["--web-listen", "127.0.0.1:0", "--ssh-listen", "off"])
        .arg("--data-dir")
        .arg(dir.path().join("p2"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("user name is empty"),
        "{}",
        text(&out.stderr)
    );
}

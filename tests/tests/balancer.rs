//! Tunnels through a balancer that terminates TLS and speaks HTTP: a real haproxy in HTTP mode,
//! with a certificate from a test CA the agent trusts as a public one, opening HTTPS again to two
//! proxies round-robin. Neither ALPN nor a client certificate gets through it; the agent's
//! tunnels ride an HTTP/1.1 Upgrade, with the node's mutual TLS inside.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use burrow_tests::*;

/// A test CA and the balancer's certificate from it (for 127.0.0.1), made with openssl: returns
/// the CA's PEM (what the agent trusts) and the balancer's certificate and key in one PEM.
fn balancer_certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let dir = dir.join("lb-ca");
    std::fs::create_dir_all(&dir).unwrap();
    let openssl = |args: &[&str]| {
        let out = run_bounded(Command::new("openssl").current_dir(&dir).args(args));
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            text(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"],
            &["-subj", "/CN=Burrow test balancer CA"],
            &["-addext", "basicConstraints=critical,CA:TRUE"],
            &["-addext", "keyUsage=critical,keyCertSign"],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "lb.key",
                "-out",
                "lb.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "lb.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "lb.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    let mut pem = std::fs::read(dir.join("lb.crt")).unwrap();
    pem.extend(std::fs::read(dir.join("lb.key")).unwrap());
    std::fs::write(dir.join("lb.pem"), pem).unwrap();
    (dir.join("ca.pem"), dir.join("lb.pem"))
}

/// An agent joined through `addr` (the balancer), trusting `ca` as a public root, named as its
/// data directory.
fn start_agent_trusting(
    proxy: &Proxy,
    addr: &str,
    ca: &Path,
    data: &Path,
    extra: &[&str],
) -> Daemon {
    let name = data.file_name().unwrap().to_str().unwrap();
    let token = proxy.node_token(&[]);
    let mut cmd = bin("burrow-agent");
    cmd.env("SSL_CERT_FILE", ca)
        .args(["start", "--proxy", addr, "--ca-pin", &proxy.pin()])
        .args(["--nodename", name, "--token", &token])
        .arg("--trust-public-web-cert")
        .arg("--data-dir")
        .arg(data)
        .args(extra);
    Daemon::spawn(cmd, "burrow-agent")
}

#[test]
fn a_balancer_that_terminates_tls_carries_upgraded_tunnels_to_both_proxies() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let etcd = Etcd::start(dir);
    let addrs: Vec<String> = (0..2)
        .map(|_| format!("127.0.0.1:{}", closed_port()))
        .collect();
    let (ca, lb_pem) = balancer_certificate(dir);
    // The balancer closes an upgraded connection idle for 12 s.
    let lb = Haproxy::start_http(
        dir,
        &addrs.iter().map(String::as_str).collect::<Vec<_>>(),
        &lb_pem,
        Duration::from_secs(12),
    );
    let args = [
        "--storage",
        "etcd",
        "--etcd-endpoint",
        &etcd.url,
        "--public-addr",
        &lb.addr,
    ];
    let start = |i: usize| Proxy::start_at(&dir.join(format!("proxy{i}")), &addrs[i], &args);
    let mut a = start(0);
    let mut b = start(1);
    let (a_id, b_id) = (a.ready().unwrap(), b.ready().unwrap());
    wait_balanced(&lb.addr, 2);

    // The web API through the balancer: the tunnel endpoint wants the Upgrade.
    let plain = ready_get(&lb.addr, tunnel_proto::api::TUNNEL_UPGRADE_PATH);
    assert!(
        plain.contains("426") && plain.contains("Upgrade: burrow-tunnel/1"),
        "{plain}"
    );

    // auto: QUIC gets no answer, TLS over TCP meets the balancer's certificate without the
    // tunnel protocol, the upgrade gets through; the agent joined through the balancer too.
    let data = dir.join("node1");
    let mut agent = start_agent_trusting(&a, &lb.addr, &ca, &data, &["--keepalive", "5s"]);
    agent.wait_for("tunnel up");
    let host = host_id(&data);
    let both: std::collections::BTreeSet<String> = [a_id.clone(), b_id.clone()].into();
    eventually(WAIT, || (tunnels_of(&b, &host) == both).then_some(()))
        .unwrap_or_else(|| panic!("a tunnel to each proxy; the agent:\n{}", agent.log()));
    let log = agent.log();
    assert!(
        log.contains("TLS over TCP does not get through") && log.contains("using the HTTP upgrade"),
        "{log}"
    );
    // Inside the upgrade or not, a tunnel trusts only the cluster's CA: the balancer's
    // certificate, trusted for the web API, does not pass for a proxy.
    assert!(log.contains("UnknownIssuer"), "{log}");
    let node = &nodes(&a)[&host];
    assert_eq!(node["name"], "node1", "{node}");
    assert_eq!(
        node["transports"],
        serde_json::json!(["upgrade", "upgrade"]),
        "{node}"
    );

    // OpenSSH through either proxy's jump host reaches the node through its upgraded tunnel.
    let user = SshUser::new(&a, dir);
    let (jump_a, jump_b) = (a.ssh_addr(), b.ssh_addr());
    assert_eq!(user.echo(&jump_a, "node1", "via-a"), "via-a\n");
    assert_eq!(user.echo(&jump_b, "node1", "via-b"), "via-b\n");

    // Idle for longer than the balancer keeps an idle upgraded connection: the pings keep both
    // tunnels open.
    let ups = agent.log().matches("tunnel up").count();
    std::thread::sleep(Duration::from_secs(20));
    let log = agent.log();
    assert_eq!(log.matches("tunnel up").count(), ups, "{log}");
    assert!(!log.contains("the tunnel closed"), "{log}");
    assert_eq!(tunnels_of(&a, &host), both);

    // B dies: its tunnel goes, A's stays and still carries SSH.
    b.daemon.kill();
    agent.wait_for("the tunnel closed");
    assert_eq!(user.echo(&jump_a, "node1", "still-a"), "still-a\n");
}

/// `GET path` at `addr` over HTTPS (any certificate), returning the raw answer head and body.
fn ready_get(addr: &str, path: &str) -> String {
    let out = run_bounded(Command::new("curl").args([
        "-sk",
        "--http1.1",
        "-i",
        "--max-time",
        "10",
        &format!("https://{addr}{path}"),
    ]));
    text(&out.stdout)
}

#[test]
fn an_upgraded_tunnel_is_the_nodes_mutual_tls_and_a_removed_node_is_refused_through_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let proxy = Proxy::start(&dir.join("proxy"), &[]);

    // Without a node certificate inside the upgrade, no tunnel: the proxy ends the handshake.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let anonymous = rt.block_on(async {
        use burrow_net::tls::{ALPN_HTTP1, unverified_client_config};
        let tls = burrow_tunnel::TunnelTls {
            web: std::sync::Arc::new(unverified_client_config(&[ALPN_HTTP1]).unwrap()),
            tunnel: std::sync::Arc::new(
                unverified_client_config(&[tunnel_proto::wire::ALPN_TUNNEL]).unwrap(),
            ),
        };
        let keepalive = burrow_tunnel::Keepalive::default_for(burrow_tunnel::Transport::Upgrade);
        let session = burrow_tunnel::connect_upgrade(&proxy.web_addr, &tls, keepalive).await?;
        let mut control = burrow_tunnel::Framed::new(session.open().await?);
        let hello = tunnel_proto::wire::Message::Ping { seq: 1 };
        let _ = control.write(&hello).await;
        let answer = tokio::time::timeout(Duration::from_secs(10), control.read()).await;
        Ok::<_, burrow_tunnel::TransportError>(format!("{answer:?}"))
    });
    match &anonymous {
        Err(e) => assert!(e.to_string().contains("handshake"), "{e}"),
        Ok(answer) => assert!(
            !answer.contains("Pong") && !answer.contains("Elapsed"),
            "the proxy answered a tunnel without a node certificate: {answer}"
        ),
    }
    assert!(nodes(&proxy).is_empty());

    // A node on --transport upgrade straight to the proxy's web port.
    let data = dir.join("agent");
    let mut agent = start_agent(&proxy, &data, "node1", &["--transport", "upgrade"]);
    let host = host_id(&data);
    assert_eq!(
        nodes(&proxy)[&host]["transports"],
        serde_json::json!(["upgrade"])
    );
    // Who the node is comes from the certificate inside the upgrade: removed, it is refused.
    let rm = proxy.ctl(&["nodes", "rm", &host]);
    assert!(rm.status.success(), "{}", text(&rm.stderr));
    let status = agent.wait_exit().expect("the agent stops");
    assert_eq!(status.code(), Some(3), "{}", agent.log());
    assert!(
        agent.log().contains("removed from the cluster"),
        "{}",
        agent.log()
    );
}

/// A balancer (or anyone) with a certificate the agent trusts for the web API answers the
/// upgrade and then offers that same certificate inside it, to pass for a proxy: the agent
/// refuses the inner handshake, as it trusts only the cluster's CA for a tunnel.
#[test]
fn a_balancer_cannot_pass_for_a_proxy_inside_the_upgrade() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let proxy = Proxy::start(&dir.join("proxy"), &[]);
    let (ca, lb_pem) = balancer_certificate(dir);
    // The node joins the real cluster first.
    let data = dir.join("node1");
    let mut agent =
        start_agent_trusting(&proxy, &proxy.web_addr, &ca, &data, &["--transport", "tcp"]);
    agent.wait_for("tunnel up");
    agent.stop();

    let pem = std::fs::read_to_string(&lb_pem).unwrap();
    let chain = burrow_net::tls::parse_certs(&pem, "lb").unwrap();
    let key = burrow_net::tls::parse_key(&pem, "lb").unwrap();
    let config = std::sync::Arc::new(
        rustls::ServerConfig::builder_with_provider(burrow_net::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap(),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fake = listener.local_addr().unwrap().to_string();
    // Answers `find` with a 404, then takes the first upgrade (at most ten connections).
    let seen = std::thread::spawn(move || {
        use std::io::{Read, Write};
        for _ in 0..10 {
            let (tcp, _) = listener.accept().unwrap();
            tcp.set_read_timeout(Some(WAIT)).unwrap();
            let outer = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut outer = rustls::StreamOwned::new(outer, tcp);
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                if outer.read_exact(&mut byte).is_err() {
                    break;
                }
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            if !head.starts_with("GET /v1/webapi/tunnel ") {
                let _ = outer.write_all(
                    b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
                continue;
            }
            outer
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: burrow-tunnel/1\r\n\r\n")
                .unwrap();
            outer.flush().unwrap();
            let mut inner = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut done = Ok(());
            while inner.is_handshaking() && done.is_ok() {
                done = inner.complete_io(&mut outer).map(drop);
            }
            return (head, done.err().map(|e| e.to_string()));
        }
        panic!("no upgrade in ten connections");
    });
    let mut cmd = bin("burrow-agent");
    cmd.env("SSL_CERT_FILE", &ca)
        .args(["start", "--proxy", &fake, "--transport", "upgrade"])
        .arg("--trust-public-web-cert")
        .arg("--data-dir")
        .arg(&data);
    let mut agent = Daemon::spawn(cmd, "burrow-agent");
    let (head, inner) = seen.join().unwrap();
    assert!(head.contains("Upgrade: burrow-tunnel/1"), "{head}");
    assert!(
        inner.is_some(),
        "the agent finished a handshake with the balancer's certificate"
    );
    agent.wait_for("inside the upgraded connection");
    let log = agent.log();
    assert!(log.contains("UnknownIssuer"), "{log}");
    assert!(!log.contains("tunnel up"), "{log}");
}

/// A proxy whose web port has a certificate from public PKI (`https_cert_file`) shows it to
/// HTTPS clients, and its cluster certificate to tunnels, which trust nothing else: an agent
/// trusting the public certificate for the join tunnels over TCP and QUIC alike, and burrowctl
/// (which trusts only the cluster's CA) still gets the cluster certificate (it makes the tokens).
#[test]
fn a_proxy_with_a_public_web_certificate_shows_tunnels_its_cluster_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (ca, _) = balancer_certificate(dir);
    let certs = dir.join("lb-ca");
    let config = dir.join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "https_cert_file: {}\nhttps_key_file: {}\n",
            certs.join("lb.crt").display(),
            certs.join("lb.key").display()
        ),
    )
    .unwrap();
    let proxy = Proxy::start(&dir.join("proxy"), &["--config", config.to_str().unwrap()]);
    // HTTPS clients get the public certificate: curl checks it against the test CA.
    let out = run_bounded(Command::new("curl").args([
        "-s",
        "--cacert",
        ca.to_str().unwrap(),
        "--max-time",
        "10",
        &format!("https://{}/readyz", proxy.web_addr),
    ]));
    assert!(
        text(&out.stdout).contains("\"status\":\"ready\""),
        "curl: {:?} {} {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    for transport in ["tcp", "quic"] {
        let data = dir.join(transport);
        let extra = ["--transport", transport];
        let mut agent = start_agent_trusting(&proxy, &proxy.web_addr, &ca, &data, &extra);
        agent.wait_for("tunnel up");
        assert!(
            agent.log().contains(&format!("transport={transport}")),
            "{}",
            agent.log()
        );
    }
}

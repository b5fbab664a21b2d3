//! Tunnels from the agent to one proxy: both transports, the inventory, labels, revocation and
//! peers that misbehave.

use std::time::Duration;

use burrow_net::tls::{self, ClientIdentity};
use burrow_tests::*;
use burrow_tunnel as transport;
use tunnel_proto::wire::ALPN_TUNNEL;

fn check_transport(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&dir.path().join("proxy"), &[]);
    let proxy_id = proxy.ready().unwrap();
    let state = dir.path().join("state");
    std::fs::write(&state, "one\n").unwrap();
    let labels = format!("env=lab,state=[1s:cat {}]", state.display());
    let data = dir.path().join("agent");
    let agent = start_agent(
        &proxy,
        &data,
        "edge-1",
        &["--transport", mode, "--labels", &labels],
    );
    assert!(
        agent.log().contains(&format!("transport={mode}")),
        "{}",
        agent.log()
    );
    let id = host_id(&data);

    let node = eventually(WAIT, || {
        nodes(&proxy)
            .remove(&id)
            .filter(|n| n["labels"]["state"] == "one")
    })
    .unwrap_or_else(|| panic!("node in nodes ls with its labels: {:?}", nodes(&proxy)));
    assert_eq!(node["name"], "edge-1");
    assert_eq!(node["labels"]["env"], "lab");
    assert_eq!(node["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(node["proxies"], serde_json::json!([proxy_id]));
    assert_eq!(node["transports"], serde_json::json!([mode]));

    // The command label is re-run every period; the inventory follows.
    std::fs::write(&state, "two\n").unwrap();
    eventually(WAIT, || {
        nodes(&proxy)
            .remove(&id)
            .filter(|n| n["labels"]["state"] == "two")
    })
    .expect("the command label's new value reaches nodes ls");
    let text = text(&proxy.ctl(&["nodes", "ls"]).stdout);
    assert!(
        text.contains("edge-1") && text.contains(&id) && text.contains("state=two"),
        "{text}"
    );
    let filtered = proxy.ctl_json(&["nodes", "ls", "--labels", "env=prod"]);
    assert_eq!(filtered["nodes"], serde_json::json!([]));
    let ours = proxy.ctl_json(&["nodes", "ls", "--labels", "env=lab"]);
    assert_eq!(ours["nodes"].as_array().unwrap().len(), 1);
    // One tunnel, held the whole time: no flapping, no reconnects.
    assert_eq!(
        agent.log().matches("tunnel up").count(),
        1,
        "{}",
        agent.log()
    );
    assert_eq!(
        proxy.daemon.log().matches("tunnel up").count(),
        1,
        "{}",
        proxy.daemon.log()
    );

    // A proxy that stops gracefully tells its agents to come back later.
    let (mut proxy, mut agent) = (proxy, agent);
    assert_eq!(proxy.daemon.stop().code(), Some(0));
    agent.wait_for("the proxy asks to reconnect later");
}

#[test]
fn an_agent_holds_a_tunnel_over_quic() {
    check_transport("quic");
}

#[test]
fn an_agent_holds_a_tunnel_over_tcp() {
    check_transport("tcp");
}

#[test]
fn a_removed_node_is_disconnected_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&dir.path().join("proxy"), &[]);
    let data = dir.path().join("agent");
    let mut agent = start_agent(&proxy, &data, "doomed", &["--transport", "tcp"]);
    let other_data = dir.path().join("other");
    let _other = start_agent(&proxy, &other_data, "bystander", &[]);
    let id = host_id(&data);
    eventually(WAIT, || nodes(&proxy).contains_key(&id).then_some(())).unwrap();

    let out = proxy.ctl(&["nodes", "rm", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("revoked"));
    agent.wait_for("tunnel down");
    // It keeps trying, and is refused every time.
    eventually(WAIT, || {
        (proxy
            .daemon
            .log()
            .matches(&format!("node {id} was removed from the cluster"))
            .count()
            >= 1)
            .then_some(())
    })
    .expect("the proxy refuses the revoked node's new tunnels");
    assert!(!nodes(&proxy).contains_key(&id));
    // The refusal is typed: the agent stops for good, with its own exit status (3), which the
    // systemd unit does not restart.
    let status = agent.wait_exit().expect("a revoked agent exits");
    assert_eq!(status.code(), Some(3), "{}", agent.log());
    assert!(
        agent
            .log()
            .contains("this node was removed from the cluster and its identity is revoked"),
        "{}",
        agent.log()
    );
    let other = host_id(&other_data);
    assert!(
        nodes(&proxy).contains_key(&other),
        "the other node is untouched"
    );

    let again = proxy.ctl(&["nodes", "rm", &id]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again.stderr).contains("no node with host id"),
        "{}",
        text(&again.stderr)
    );
}

fn identity_of(data: &std::path::Path) -> ClientIdentity {
    let identity: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("identity.json")).unwrap()).unwrap();
    ClientIdentity {
        chain: tls::parse_certs(identity["tls_cert"].as_str().unwrap(), "cert").unwrap(),
        key: tls::parse_key(identity["tls_key"].as_str().unwrap(), "key").unwrap(),
    }
}

#[test]
fn a_node_certificate_from_another_cluster_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut ours = Proxy::start(&dir.path().join("ours"), &["--debug"]);
    let theirs = Proxy::start(&dir.path().join("theirs"), &[]);
    let foreign = dir.path().join("foreign");
    drop(start_agent(&theirs, &foreign, "foreign", &[]));

    let (config, rt) = rogue(&foreign);
    rt.block_on(async {
        // In TLS 1.3 the server checks the client's certificate after the client has finished
        // its side of the handshake: the refusal shows as the tunnel dying before any stream.
        for quic in [false, true] {
            let Ok(session) = dial(&ours.web_addr, &config, quic).await else {
                continue;
            };
            let used = tokio::time::timeout(Duration::from_secs(10), async {
                let stream = session.open().await.ok()?;
                let mut f = transport::Framed::new(stream);
                f.write(&hello("x")).await.ok()?;
                f.read().await.ok().flatten()
            })
            .await;
            assert!(
                matches!(used, Ok(None)),
                "a foreign node's tunnel (quic: {quic}) carried a message: {used:?}"
            );
        }
    });
    // Both refusals happened in the TLS handshake, before any tunnel logic ran.
    ours.daemon.wait_for("TLS handshake failed");
    ours.daemon.wait_for("QUIC handshake failed");
    let log = ours.daemon.log();
    assert!(
        log.matches("invalid peer certificate").count() >= 2,
        "{log}"
    );
    assert!(!log.contains("tunnel refused or ended"), "{log}");
    assert!(!log.contains("tunnel up"), "{log}");
    assert!(nodes(&ours).is_empty());
}

/// A client that speaks for the node whose data dir is `data`, without the agent's manners: its
/// TLS config (any server accepted) and a runtime to drive it.
fn rogue(
    data: &std::path::Path,
) -> (
    std::sync::Arc<rustls::ClientConfig>,
    tokio::runtime::Runtime,
) {
    let config =
        tls::unverified_client_config_with(Some(identity_of(data)), &[ALPN_TUNNEL]).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    (std::sync::Arc::new(config), rt)
}

/// Opens a tunnel to `addr` over QUIC or TLS + yamux, as a (possibly misbehaving) node would.
async fn dial(
    addr: &str,
    config: &std::sync::Arc<rustls::ClientConfig>,
    quic: bool,
) -> Result<transport::Session, transport::TransportError> {
    if quic {
        let endpoint = transport::quic_client_endpoint(Default::default()).unwrap();
        let keepalive = transport::Keepalive::default_for(transport::Transport::Quic);
        let window = transport::Window::DEFAULT;
        transport::connect_quic(&endpoint, addr, config.clone(), keepalive, window).await
    } else {
        let keepalive = transport::Keepalive::default_for(transport::Transport::Tcp);
        transport::connect_tcp(addr, config.clone(), keepalive).await
    }
}

fn hello(host_id: &str) -> tunnel_proto::wire::Message {
    tunnel_proto::wire::Message::Hello(tunnel_proto::wire::Hello {
        protocol: tunnel_proto::wire::PROTOCOL_VERSION,
        version: "test".into(),
        host_id: host_id.into(),
        node_name: "x".into(),
        labels: Default::default(),
        keepalive_ms: None,
        trust_updates: false,
    })
}

#[test]
fn garbage_and_oversized_frames_close_only_that_tunnel() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&dir.path().join("proxy"), &[]);
    let good = dir.path().join("good");
    let _agent = start_agent(&proxy, &good, "good", &[]);
    let good_id = host_id(&good);
    // A second, legitimate node identity that will misbehave on the wire.
    let bad = dir.path().join("bad");
    drop(start_agent(&proxy, &bad, "bad", &["--transport", "tcp"]));
    let (config, rt) = rogue(&bad);
    for (what, bytes) in [
        ("garbage", b"\x00\x00\x00\x05\xff\xfe{]x".to_vec()),
        ("oversized", u32::MAX.to_be_bytes().to_vec()),
    ] {
        rt.block_on(async {
            for quic in [false, true] {
                let session = dial(&proxy.web_addr, &config, quic).await.unwrap();
                let mut stream = session.open().await.unwrap();
                stream.write_all(&bytes).await.unwrap();
                stream.flush().await.unwrap();
                tokio::time::timeout(Duration::from_secs(10), session.closed())
                    .await
                    .unwrap_or_else(|_| panic!("{what} (quic: {quic}) closes the tunnel"));
            }
        });
    }
    let log = proxy.daemon.log();
    assert!(log.contains("bad hello"), "{log}");
    assert!(log.contains("larger than"), "{log}");
    // The good node's tunnel is untouched and the proxy serves on.
    let listed = nodes(&proxy);
    assert!(listed.contains_key(&good_id), "{listed:?}");
    assert!(proxy.ctl(&["status"]).status.success());
}

#[test]
fn auto_falls_back_to_tcp_when_udp_is_blocked_and_returns_to_quic() {
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&dir.path().join("proxy"), &[]);
    let relay = Relay::start(&proxy.web_addr);
    relay.block_udp(true);
    let token = proxy.node_token(&[]);
    let data = dir.path().join("agent");
    let mut cmd = bin("burrow-agent");
    cmd.args([
        "start",
        "--proxy",
        &relay.addr,
        "--ca-pin",
        &proxy.pin(),
        "--nodename",
        "firewalled",
        "--token",
        &token,
    ])
    .args(["--transport", "auto"])
    .arg("--data-dir")
    .arg(&data);
    let mut agent = Daemon::spawn(cmd, "burrow-agent");
    agent.wait_for("QUIC does not get through");
    agent.wait_for("tunnel up");
    let id = host_id(&data);
    let transports = |p: &Proxy| nodes(p).get(&id).map(|n| n["transports"].clone());
    eventually(WAIT, || {
        (transports(&proxy)? == serde_json::json!(["tcp"])).then_some(())
    })
    .expect("on TCP while UDP is blocked");

    relay.block_udp(false);
    agent.wait_for("QUIC gets through again");
    eventually(WAIT, || {
        (transports(&proxy)? == serde_json::json!(["quic"])).then_some(())
    })
    .unwrap_or_else(|| panic!("back on QUIC: {:?}\n{}", transports(&proxy), agent.log()));
}

#[test]
fn find_sends_agents_to_the_dedicated_tunnel_listener() {
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = Proxy::start(
        &dir.path().join("proxy"),
        &["--tunnel-listen", "127.0.0.1:0"],
    );
    let tunnel_addr = proxy
        .daemon
        .wait_for("tunnels listening on tcp and udp ")
        .trim()
        .to_string();
    assert_ne!(tunnel_addr, proxy.web_addr);
    for (i, mode) in ["tcp", "quic"].into_iter().enumerate() {
        let data = dir.path().join(format!("agent-{mode}"));
        let agent = start_agent(&proxy, &data, mode, &["--transport", mode]);
        assert!(
            agent.log().contains(&format!("tunnels={tunnel_addr}")),
            "{}",
            agent.log()
        );
        let id = host_id(&data);
        eventually(WAIT, || {
            (nodes(&proxy).get(&id)?["transports"] == serde_json::json!([mode])).then_some(())
        })
        .unwrap_or_else(|| panic!("{mode} tunnel on the dedicated port"));
        let peer_lines = proxy.daemon.log().matches("tunnel up").count();
        assert_eq!(peer_lines, i + 1);
    }
}

/// Opens a tunnel with `identity`, says hello and waits for the welcome.
async fn hello_tunnel(
    proxy: &Proxy,
    config: &std::sync::Arc<rustls::ClientConfig>,
    host_id: &str,
    quic: bool,
) -> (
    transport::Session,
    transport::Framed<transport::TunnelStream>,
) {
    let session = dial(&proxy.web_addr, config, quic).await.unwrap();
    let mut control = transport::Framed::new(session.open().await.unwrap());
    control.write(&hello(host_id)).await.unwrap();
    let welcome = tokio::time::timeout(Duration::from_secs(10), control.read()).await;
    assert!(
        matches!(
            welcome,
            Ok(Ok(Some(tunnel_proto::wire::Message::Welcome(_))))
        ),
        "{welcome:?}"
    );
    (session, control)
}

#[test]
fn a_hostile_node_cannot_take_the_proxy_down() {
    use tokio::io::AsyncWriteExt;
    use tunnel_proto::wire::{AuditEvent, Message};
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = Proxy::start(&dir.path().join("proxy"), &[]);
    let bad = dir.path().join("bad");
    drop(start_agent(&proxy, &bad, "bad", &["--transport", "tcp"]));
    let bad_id = host_id(&bad);
    let (config, rt) = rogue(&bad);
    rt.block_on(async {
        // Streams nobody asked for: over TCP each is reset, and a node that keeps at it loses
        // its tunnel; over QUIC a second stream is not even granted.
        let (session, _control) = hello_tunnel(&proxy, &config, &bad_id, false).await;
        for _ in 0..20 {
            let Ok(mut s) = session.open().await else {
                break;
            };
            if s.write_all(&[0u8; 1024]).await.is_err() {
                break;
            }
        }
        let closed = tokio::time::timeout(Duration::from_secs(20), session.closed()).await;
        assert!(
            closed.is_ok(),
            "the tunnel of a node opening streams stays open: {}",
            proxy.daemon.log()
        );
        let (session, quic_control) = hello_tunnel(&proxy, &config, &bad_id, true).await;
        let second = tokio::time::timeout(Duration::from_secs(2), session.open()).await;
        assert!(second.is_err(), "QUIC granted a second stream to the node");

        // More tunnels than a node needs: the fifth gets no welcome.
        let mut held = vec![(session, quic_control)];
        for _ in 0..3 {
            held.push(hello_tunnel(&proxy, &config, &bad_id, false).await);
        }
        let keepalive = transport::Keepalive::default_for(transport::Transport::Tcp);
        let fifth = transport::connect_tcp(&proxy.web_addr, config.clone(), keepalive)
            .await
            .unwrap();
        let mut control = transport::Framed::new(fifth.open().await.unwrap());
        control.write(&hello(&bad_id)).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), control.read())
            .await
            .expect("the proxy answers or closes");
        assert!(
            !matches!(answer, Ok(Some(Message::Welcome(_)))),
            "a fifth tunnel was welcomed: {}",
            proxy.daemon.log()
        );
        drop(held);

        // An audit event whose time is out of any calendar, then a flood of pings.
        let (session, mut control) = hello_tunnel(&proxy, &config, &bad_id, false).await;
        let mut fields = tunnel_proto::api::Labels::new();
        fields.insert("host_id".into(), "someone-else".into());
        control
            .write(&Message::Audit(AuditEvent {
                event: "exec".into(),
                time: u64::MAX,
                fields,
            }))
            .await
            .unwrap();
        for seq in 0..1000 {
            if control.write(&Message::Ping { seq }).await.is_err() {
                break;
            }
        }
        tokio::time::timeout(Duration::from_secs(10), session.closed())
            .await
            .expect("a flooding node's tunnel is closed");
    });
    proxy.daemon.wait_for("the node floods its control stream");
    proxy
        .daemon
        .wait_for("already holds 4 tunnels to this proxy");
    proxy
        .daemon
        .wait_for("the node keeps opening streams nobody asked for");
    // The proxy serves on, and logged the event with its own time and the tunnel's host id.
    assert!(proxy.ctl(&["status"]).status.success());
    let audit = eventually(WAIT, || {
        let dir = proxy.data_dir.join("audit");
        let mut all = String::new();
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            all.push_str(&std::fs::read_to_string(e.path()).ok()?);
        }
        Some(all).filter(|a| a.contains("node_time"))
    })
    .expect("the event is logged");
    assert!(
        audit.contains(&format!("\"node_time\":{}", u64::MAX)),
        "{audit}"
    );
    assert!(
        audit.contains(&format!("\"host_id\":\"{bad_id}\"")),
        "{audit}"
    );
    assert!(!audit.contains("someone-else"), "{audit}");
}

/// A QUIC agent whose proxy is killed (no goodbye) and started again learns of it from the
/// restarted proxy at once (its restart nudge), not at its next keep-alive: here ten minutes
/// away, and still the tunnel is back within seconds. (When the nudge cannot get in, the agent's
/// next packet meets a stateless reset: `nat.rs`.)
#[test]
fn a_quic_agent_learns_at_once_that_its_proxy_restarted_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let proxy_dir = dir.path().join("proxy");
    let mut proxy = Proxy::start(&proxy_dir, &[]);
    proxy.ready().unwrap();
    let addr = proxy.web_addr.clone();
    let data = dir.path().join("agent");
    let quic = ["--transport", "quic", "--keepalive", "10m"];
    let mut agent = start_agent(&proxy, &data, "edge-1", &quic);
    // Let the new connection go quiet first: a packet the agent still had in flight (its hello
    // unacknowledged when the proxy died) would meet a stateless reset and tell it before the
    // nudge could.
    let id = host_id(&data);
    eventually(WAIT, || (!tunnels_of(&proxy, &id).is_empty()).then_some(()))
        .unwrap_or_else(|| panic!("nodes ls never showed the node's tunnel"));
    std::thread::sleep(Duration::from_secs(1));
    proxy.daemon.kill(); // SIGKILL: no advisory, no close; the agent's QUIC connection looks alive
    let proxy = Proxy::start_at(&proxy_dir, &addr, &[]);
    proxy.ready().unwrap();
    agent
        .try_wait_for("the proxy restarted (it says so)")
        .unwrap_or_else(|e| panic!("{e}\nproxy:\n{}", proxy.daemon.log()));
    eventually(WAIT, || {
        (agent.log().matches("tunnel up").count() == 2).then_some(())
    })
    .unwrap_or_else(|| panic!("the agent came back: {}", agent.log()));
    assert!(
        proxy
            .daemon
            .log()
            .contains("told the QUIC agents of the last run that this proxy restarted agents=1"),
        "{}",
        proxy.daemon.log()
    );
    eventually(WAIT, || (!tunnels_of(&proxy, &id).is_empty()).then_some(()))
        .unwrap_or_else(|| panic!("nodes ls shows the node's tunnel again"));
}

/// A proxy killed and started again reads the session tickets it gave before, and over QUIC the
/// sessions it kept (written to its data dir): its returning agents resume their TLS sessions (no
/// certificate signatures on either end) over TCP, the HTTP upgrade and QUIC alike, and are the
/// same nodes as before.
#[test]
fn a_restarted_proxy_resumes_its_agents_tls_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let proxy_dir = dir.path().join("proxy");
    let diag = ["--diag-listen", "127.0.0.1:0"];
    let mut proxy = Proxy::start(&proxy_dir, &diag);
    let addr = proxy.web_addr.clone();
    let resumed = |diag: &str, transport: &str| {
        let (_, body) = http_get(diag, "/metrics");
        let name = format!("burrow_proxy_tunnel_resumptions_total{{transport=\"{transport}\"}}");
        metric(&body, &name).unwrap_or(0.0)
    };
    let mut agents = Vec::new();
    for transport in ["tcp", "upgrade", "quic"] {
        let data = dir.path().join(transport);
        let agent = start_agent(&proxy, &data, transport, &["--transport", transport]);
        agents.push((agent, host_id(&data), transport));
    }
    let first = diag_addr(&mut proxy.daemon);
    for transport in ["tcp", "upgrade", "quic"] {
        assert_eq!(resumed(&first, transport), 0.0, "{transport}");
    }
    // QUIC's sessions reach the disk within seconds of being made.
    let kept = proxy_dir.join("quic-sessions");
    eventually(WAIT, || kept.exists().then_some(()))
        .unwrap_or_else(|| panic!("the proxy keeps QUIC's sessions in {}", kept.display()));

    proxy.daemon.kill();
    let mut proxy = Proxy::start_at(&proxy_dir, &addr, &diag);
    let again = diag_addr(&mut proxy.daemon);
    for (agent, host, transport) in &agents {
        eventually(WAIT, || (resumed(&again, transport) == 1.0).then_some(())).unwrap_or_else(
            || {
                panic!(
                    "{transport}: no resumed session\n{}\n{}",
                    agent.log(),
                    http_get(&again, "/metrics").1
                )
            },
        );
        eventually(WAIT, || {
            (!tunnels_of(&proxy, host).is_empty()).then_some(())
        })
        .unwrap_or_else(|| panic!("{transport}: the node is back under its host id"));
    }
}

//! The agent on a real network: behind a NAT router in network namespaces (`burrow_tests::netns`),
//! with the proxy and the users on the other side. Skipped, with the reason, where namespaces
//! cannot be made (not root, no nftables).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use burrow_tests::netns::{self, NatBed, ROUTER_WAN_IP};
use burrow_tests::*;

const WEB: &str = "203.0.113.1:3080";
const SSH: &str = "203.0.113.1:3023";
/// The same proxy on the public side's IPv6 address.
const WEB6: &str = "[2001:db8:113::1]:3080";
const SSH6: &str = "[2001:db8:113::1]:3023";
/// With two sites: the near proxy's web port behind the balancer at [`WEB`], and the far one's.
const NEAR_WEB: &str = "203.0.113.1:3081";
const FAR_WEB: &str = "198.51.100.2:3080";
const FAR_SSH: &str = "198.51.100.2:3023";

struct World {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    proxy: Proxy,
    login: String,
    web: &'static str,
    ssh: &'static str,
    /// With [`World::two_sites`]: etcd, the balancer and the second site's proxy.
    _site: Option<Site>,
    /// Last, so that it is torn down after the daemons in it stopped.
    bed: NatBed,
}

struct Site {
    _etcd: Etcd,
    _balancer: Haproxy,
    _far: Proxy,
}

impl World {
    /// A proxy on the public side, a user certificate and an ssh config; `None` (after saying
    /// why) where the bed cannot be built.
    fn new() -> Option<World> {
        Self::on(WEB, SSH)
    }

    /// The proxy on IPv6 only: the agent's path to it is IPv6 end to end (no NAT).
    fn ipv6() -> Option<World> {
        Self::on(WEB6, SSH6)
    }

    fn on(web: &'static str, ssh: &'static str) -> Option<World> {
        let bed = Self::bed()?;
        let tmp = tempfile::tempdir().unwrap();
        let proxy = Proxy::start_in(
            &bed.public,
            &tmp.path().join("proxy"),
            &["--web-listen", web, "--ssh-listen", ssh],
        );
        Some(Self::with(bed, tmp, proxy, web, ssh, None))
    }

    /// Two proxies on one etcd behind a round-robin balancer at [`WEB`]: one on the public side
    /// (its jump host at [`SSH`]), one at a second site with a link of its own.
    fn two_sites() -> Option<World> {
        let bed = Self::bed()?;
        bed.add_site().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let etcd = Etcd::start_in(&bed.public, tmp.path(), netns::PUBLIC_IP);
        // etcd on the public side is off loopback: plain http there is allowed by config only.
        let config = tmp.path().join("proxy.yaml");
        std::fs::write(
            &config,
            format!(
                "storage:\n  type: etcd\n  endpoints: [\"{}\"]\n  allow_plaintext: true\n",
                etcd.url
            ),
        )
        .unwrap();
        let config = config.to_str().unwrap();
        let cluster = ["--config", config, "--public-addr", WEB];
        let near_args = [
            &["--web-listen", NEAR_WEB, "--ssh-listen", SSH][..],
            &cluster,
        ]
        .concat();
        let proxy = Proxy::start_in(&bed.public, &tmp.path().join("proxy"), &near_args);
        let far_args = [
            &["--web-listen", FAR_WEB, "--ssh-listen", FAR_SSH][..],
            &cluster,
        ]
        .concat();
        let far = Proxy::start_in(&bed.site, &tmp.path().join("proxy-far"), &far_args);
        let balancer = Haproxy::start_in(&bed.public, tmp.path(), WEB, &[NEAR_WEB, FAR_WEB]);
        let site = Site {
            _etcd: etcd,
            _balancer: balancer,
            _far: far,
        };
        Some(Self::with(bed, tmp, proxy, WEB, SSH, Some(site)))
    }

    /// The bed, or `None` after saying why it cannot be built here.
    fn bed() -> Option<NatBed> {
        NatBed::create()
            .inspect_err(|why| eprintln!("skipping: {why}"))
            .ok()
    }

    fn with(
        bed: NatBed,
        tmp: tempfile::TempDir,
        proxy: Proxy,
        web: &'static str,
        ssh: &'static str,
        site: Option<Site>,
    ) -> World {
        let dir = tmp.path().to_path_buf();
        let login = text(&Command::new("id").arg("-un").output().unwrap().stdout)
            .trim()
            .to_string();
        proxy.sign_user("alice", &login, "1h", &dir.join("alice"));
        let known = proxy.ctl(&["auth", "export", "--type", "host"]);
        assert!(known.status.success());
        std::fs::write(dir.join("known_hosts"), &known.stdout).unwrap();
        write_ssh_config(
            &dir.join("ssh_config"),
            &dir.join("known_hosts"),
            &dir.join("alice"),
        );
        World {
            bed,
            _tmp: tmp,
            dir,
            proxy,
            login,
            web,
            ssh,
            _site: site,
        }
    }

    /// The proxies `nodes ls` says the node with data in `data` holds tunnels to.
    fn tunnels_of(&self, data: &Path) -> BTreeSet<String> {
        tunnels_of(&self.proxy, &host_id(data))
    }

    /// Every proxy's id and web address, as `proxies ls` lists them.
    fn proxies(&self) -> Vec<(String, String)> {
        self.proxy.ctl_json(&["proxies", "ls"])["proxies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let field = |k: &str| p[k].as_str().unwrap().to_string();
                (field("id"), field("web_addr"))
            })
            .collect()
    }

    /// An agent in the private network, joined and holding its tunnel.
    fn agent(&self, name: &str, extra: &[&str]) -> Daemon {
        let token = self.proxy.node_token(&[]);
        let mut cmd = bin("burrow-agent");
        cmd.args(["start", "--proxy", self.web, "--ca-pin", &self.proxy.pin()])
            .args(["--nodename", name, "--token", &token])
            .arg("--data-dir")
            .arg(self.dir.join(name))
            .args(extra);
        let mut agent = Daemon::spawn(netns::in_netns(&self.bed.agent, &cmd), "burrow-agent");
        agent.wait_for("tunnel up");
        agent
    }

    /// `ssh -J` from the public side to `node`, running `command`.
    fn ssh_command(&self, node: &str, command: &str) -> Command {
        let mut cmd = Command::new("ssh");
        // VERBOSE: a failure's stderr says where the session ended.
        cmd.arg("-F")
            .arg(self.dir.join("ssh_config"))
            .args(["-o", "LogLevel=VERBOSE"])
            .args(["-J", &format!("alice@{}", self.ssh), "-p", "3022"])
            .arg(format!("{}@{node}", self.login))
            .arg(command);
        netns::in_netns(&self.bed.public, &cmd)
    }

    fn ssh(&self, node: &str, command: &str) -> Output {
        self.ssh_command(node, command).output().unwrap()
    }

    fn transports(&self, data: &Path) -> Option<serde_json::Value> {
        nodes(&self.proxy)
            .get(&host_id(data))
            .map(|n| n["transports"].clone())
    }

    fn wait_for_transport(&self, data: &Path, want: &str, agent: &Daemon) {
        eventually(WAIT, || {
            (self.transports(data)? == serde_json::json!([want])).then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "wanted a {want} tunnel, nodes ls shows {:?}\n{}",
                self.transports(data),
                agent.log()
            )
        });
    }
}

fn echo_ok(out: &Output, want: &str) {
    assert!(
        out.status.success() && text(&out.stdout).trim() == want,
        "ssh exited {:?}: stdout {:?}, stderr {}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn behind_nat_the_agent_joins_and_serves_ssh_and_nothing_gets_in() {
    let Some(w) = World::new() else { return };
    let _agent = w.agent("edge", &["--ssh-listen", "0.0.0.0:3022"]);
    // The proxy sees the router's outside address, never the agent's own.
    let log = w.proxy.daemon.log();
    assert!(
        log.contains(&format!("peer={ROUTER_WAN_IP}:")),
        "the tunnel did not come through the NAT: {log}"
    );
    assert!(!log.contains(netns::AGENT_IP), "{log}");
    echo_ok(&w.ssh("edge", "echo through-the-nat"), "through-the-nat");

    // Nothing from the public side reaches into the private network, not even the agent's own
    // SSH listener with a route to it: the router forwards nothing new inwards.
    let route = Command::new("ip")
        .args([
            "-n",
            &w.bed.public,
            "route",
            "add",
            "192.168.77.0/24",
            "via",
        ])
        .arg(ROUTER_WAN_IP)
        .status()
        .unwrap();
    assert!(route.success());
    let probe = format!(
        "import socket; s = socket.socket(); s.settimeout(3)\n\
         try:\n  s.connect(('{}', 3022)); print('open')\n\
         except OSError as e:\n  print('closed', e)",
        netns::AGENT_IP
    );
    let mut python = Command::new("python3");
    python.args(["-c", &probe]);
    let out = netns::in_netns(&w.bed.public, &python).output().unwrap();
    assert!(
        text(&out.stdout).starts_with("closed"),
        "the private network was reachable from outside: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // ... while from inside, the listener is there (the probe above could fail only one way).
    let inside = netns::in_netns(&w.bed.agent, &python).output().unwrap();
    assert!(text(&inside.stdout).starts_with("open"), "{inside:?}");
}

#[test]
fn udp_dropped_at_the_router_moves_the_agent_to_tcp_and_back_to_quic() {
    let Some(w) = World::new() else { return };
    w.bed.block_udp(true);
    let data = w.dir.join("edge");
    let mut agent = w.agent("edge", &["--transport", "auto"]);
    agent.wait_for("QUIC does not get through");
    w.wait_for_transport(&data, "tcp", &agent);
    echo_ok(&w.ssh("edge", "echo over-tcp"), "over-tcp");

    w.bed.block_udp(false);
    agent.wait_for("QUIC gets through again");
    w.wait_for_transport(&data, "quic", &agent);
    echo_ok(&w.ssh("edge", "echo over-quic"), "over-quic");
}

/// The router forgets its mappings; the agent's next packet leaves from another port. Over QUIC
/// the proxy follows the connection to its new address (the tunnel is never lost); over TCP the
/// proxy resets the unknown connection and the agent dials again. Either way a dial made
/// afterwards works, once the agent's next keep-alive (5 s here) has gone out.
fn forgotten_mappings(transport: &str) {
    let Some(w) = World::new() else { return };
    let data = w.dir.join("edge");
    let agent = w.agent("edge", &["--transport", transport, "--keepalive", "5s"]);
    w.wait_for_transport(&data, transport, &agent);
    echo_ok(&w.ssh("edge", "echo before"), "before");
    w.bed.forget_mappings();
    let after = eventually(Duration::from_secs(60), || {
        let out = w.ssh("edge", "echo after");
        out.status.success().then_some(out)
    })
    .unwrap_or_else(|| panic!("no dial got through after the NAT forgot\n{}", agent.log()));
    echo_ok(&after, "after");
    w.wait_for_transport(&data, transport, &agent);
    let log = agent.log();
    let tunnels_up = log.matches("tunnel up").count();
    if transport == "quic" {
        assert_eq!(tunnels_up, 1, "the QUIC tunnel was lost:\n{log}");
    } else {
        assert!(tunnels_up >= 2, "the TCP tunnel never redialed:\n{log}");
    }
}

#[test]
fn a_nat_that_forgets_its_mappings_loses_no_quic_tunnel() {
    forgotten_mappings("quic");
}

#[test]
fn a_nat_that_forgets_its_mappings_costs_a_tcp_tunnel_one_redial() {
    forgotten_mappings("tcp");
}

/// An SSH session to "edge" printing 1 to `lines`, one every 0.2 s.
struct Counting {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
    lines: u32,
}

/// Starts a [`Counting`] session and returns once "1" came through.
fn start_counting_session(w: &World, lines: u32) -> Counting {
    use std::io::BufRead;
    let mut child = w
        .ssh_command(
            "edge",
            &format!("for i in $(seq 1 {lines}); do echo $i; sleep 0.2; done"),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert_eq!(first.trim(), "1", "the session did not start");
    Counting { child, out, lines }
}

impl Counting {
    /// Waits for the session's end: `Ok` if it exited 0 having printed every line after "1" in
    /// order, else `Err` saying what came.
    fn finish(mut self) -> Result<(), String> {
        use std::io::Read;
        let mut rest = String::new();
        let _ = self.out.read_to_string(&mut rest);
        let status = self.child.wait().unwrap();
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        let want: Vec<String> = (2..=self.lines).map(|i| i.to_string()).collect();
        if status.success() && rest.lines().eq(want.iter().map(String::as_str)) {
            Ok(())
        } else {
            Err(format!(
                "exit {status:?}, {} lines after the first ({rest:?}), stderr {stderr}",
                rest.lines().count()
            ))
        }
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_new_public_address_keeps_an_ssh_session_going_over_quic() {
    let Some(w) = World::new() else { return };
    let agent = w.agent("edge", &["--transport", "quic"]);
    let session = start_counting_session(&w, 40);
    // The phone moves to another cell: the router's outside address is replaced mid-session.
    w.bed.change_public_address();
    if let Err(what) = session.finish() {
        panic!(
            "the session did not survive the move: {what}\n{}",
            agent.log()
        );
    }
    // The same tunnel carried it: the agent never dialed again.
    assert_eq!(
        agent.log().matches("tunnel up").count(),
        1,
        "{}",
        agent.log()
    );
}

#[test]
fn a_new_public_address_makes_a_tcp_agent_dial_again_at_once() {
    let Some(w) = World::new() else { return };
    let agent = w.agent("edge", &["--transport", "tcp"]);
    let session = start_counting_session(&w, 40);
    w.bed.change_public_address();
    // The session's next bytes leave from the new address; the proxy resets the connection it
    // does not know, and the agent dials again without waiting for a keep-alive.
    let redialed = eventually(Duration::from_secs(20), || {
        (agent.log().matches("tunnel up").count() >= 2).then_some(())
    });
    session.kill();
    assert!(redialed.is_some(), "no new tunnel:\n{}", agent.log());
    echo_ok(&w.ssh("edge", "echo moved"), "moved");
    let log = w.proxy.daemon.log();
    assert!(
        log.contains(&format!("peer={}:", netns::ROUTER_WAN_IP_2)),
        "the new tunnel does not come from the new address: {log}"
    );
}

#[test]
fn over_ipv6_quic_works_falls_back_to_tcp_and_keeps_a_session_across_an_address_change() {
    let Some(w) = World::ipv6() else { return };
    let data = w.dir.join("edge");
    // A short keep-alive, so that the blocked path below is noticed within 25 s.
    let mut agent = w.agent("edge", &["--transport", "auto", "--keepalive", "5s"]);
    w.wait_for_transport(&data, "quic", &agent);
    assert!(
        !agent.log().contains("QUIC does not get through"),
        "{}",
        agent.log()
    );
    echo_ok(&w.ssh("edge", "echo over-ipv6"), "over-ipv6");

    // The device gets a new IPv6 address mid-session (no NAT: its own address changes): the
    // QUIC tunnel follows it and the session goes on.
    let session = start_counting_session(&w, 40);
    w.bed.change_agent_address6();
    if let Err(what) = session.finish() {
        panic!(
            "the session did not survive the new address: {what}\n{}",
            agent.log()
        );
    }
    assert_eq!(
        agent.log().matches("tunnel up").count(),
        1,
        "{}",
        agent.log()
    );

    // UDP blocked on the IPv6 path: the agent falls back to TCP, as over IPv4.
    w.bed.block_udp(true);
    agent.wait_for("the tunnel closed");
    agent.wait_for("QUIC does not get through");
    w.wait_for_transport(&data, "tcp", &agent);
    echo_ok(&w.ssh("edge", "echo ipv6-tcp"), "ipv6-tcp");
}

/// The path dies, with the default keep-alives: an outage of 30 s is ridden out (QUIC keeps its
/// tunnel; TCP may have to dial again), a path dead for good is noticed (within a minute by
/// design), and the agent is back as soon as the link is.
fn dead_path(transport: &str) {
    let Some(w) = World::new() else { return };
    let data = w.dir.join("edge");
    let agent = w.agent("edge", &["--transport", transport]);
    w.bed.link_down(true);
    std::thread::sleep(Duration::from_secs(30));
    w.bed.link_down(false);
    let back = eventually(Duration::from_secs(60), || {
        let out = w.ssh("edge", "echo back");
        out.status.success().then_some(out)
    })
    .unwrap_or_else(|| panic!("no SSH after the link came back\n{}", agent.log()));
    echo_ok(&back, "back");
    if transport == "quic" {
        assert_eq!(
            agent.log().matches("tunnel up").count(),
            1,
            "{}",
            agent.log()
        );
    }
    let before = agent.log().matches("tunnel up").count();

    w.bed.link_down(true);
    let noticed = eventually(Duration::from_secs(90), || {
        agent.log().contains("tunnel down").then_some(())
    });
    w.bed.link_down(false);
    assert!(
        noticed.is_some(),
        "a dead path was never noticed\n{}",
        agent.log()
    );
    eventually(WAIT, || {
        (agent.log().matches("tunnel up").count() > before).then_some(())
    })
    .unwrap_or_else(|| panic!("the agent did not come back\n{}", agent.log()));
    w.wait_for_transport(&data, transport, &agent);
    echo_ok(&w.ssh("edge", "echo again"), "again");
}

#[test]
fn a_dead_quic_path_is_noticed_and_a_short_outage_is_ridden_out() {
    dead_path("quic");
}

#[test]
fn a_dead_tcp_path_is_noticed_and_the_agent_comes_back() {
    dead_path("tcp");
}

/// A proxy killed and started again while the NAT forgot the agent's mapping: the restart nudge
/// is kept out (nothing from outside gets in), so the agent learns of the restart from the
/// stateless reset that answers its next keep-alive (the restarted proxy recognises the old
/// connection's IDs by their key), and comes back.
#[test]
fn a_restart_nudge_kept_out_by_the_nat_leaves_the_stateless_reset_to_tell() {
    let Some(mut w) = World::new() else { return };
    let mut agent = w.agent("edge", &["--transport", "quic", "--keepalive", "5s"]);
    // The proxy records the tunnel just after welcoming it: the nudge below needs that record.
    let host = host_id(&w.dir.join("edge"));
    eventually(WAIT, || {
        (!tunnels_of(&w.proxy, &host).is_empty()).then_some(())
    })
    .expect("the proxy records the agent's tunnel");
    w.proxy.daemon.kill(); // SIGKILL: no advisory
    w.bed.forget_mappings();
    let args = ["--web-listen", w.web, "--ssh-listen", w.ssh];
    w.proxy = Proxy::start_in(&w.bed.public, &w.dir.join("proxy"), &args);
    agent.wait_for("tunnel down");
    let log = agent.log();
    assert!(log.contains("reset by peer"), "{log}");
    assert!(!log.contains("the proxy restarted (it says so)"), "{log}");
    // The proxy did send its nudge (the NAT dropped it): the reset may have come first.
    w.proxy
        .daemon
        .wait_for("told the QUIC agents of the last run that this proxy restarted agents=1");
    eventually(Duration::from_secs(30), || {
        (agent.log().matches("tunnel up").count() == 2).then_some(())
    })
    .unwrap_or_else(|| panic!("the agent did not come back:\n{}", agent.log()));
}

/// 5 % of packets lost at random both ways, and 200 ms added to the round trip, half each way
/// (a poor cellular link): SSH sessions work and carry every byte, and the tunnel does not flap
/// (the keep-alives' retransmissions get through well within the idle timeout).
fn lossy_link(transport: &str) {
    let Some(w) = World::new() else { return };
    let agent = w.agent("edge", &["--transport", transport]);
    let added = Duration::from_millis(200);
    let delay = w.bed.delay(added / 2).unwrap();
    let rtt = measured_round_trip(&w);
    assert!(
        rtt >= added,
        "the delay line adds less than it should: {rtt:?} round trip"
    );
    w.bed.lose(Some(5));
    for round in 0..3 {
        // 256 KiB from the node through the lossy link, every byte there.
        let out = w.ssh("edge", "head -c 262144 /dev/zero");
        assert!(
            out.status.success()
                && out.stdout.len() == 262_144
                && out.stdout.iter().all(|b| *b == 0),
            "round {round}: exit {:?}, {} bytes, {}\n{}",
            out.status.code(),
            out.stdout.len(),
            text(&out.stderr),
            agent.log()
        );
    }
    std::thread::sleep(Duration::from_secs(30));
    let out = w.ssh("edge", "echo still-here");
    assert!(
        out.status.success() && text(&out.stdout).trim() == "still-here",
        "after 30 s: exit {:?}, {}\nagent:\n{}\nproxy:\n{}",
        out.status.code(),
        text(&out.stderr),
        agent.log(),
        w.proxy.daemon.log()
    );
    w.bed.lose(None);
    drop(delay);
    assert_eq!(
        agent.log().matches("tunnel up").count(),
        1,
        "the tunnel flapped:\n{}",
        agent.log()
    );
}

/// The round trip from the agent's host to the proxy's: the quickest of three TCP handshakes
/// with its web port (a SYN and its SYN-ACK).
fn measured_round_trip(w: &World) -> Duration {
    let (host, port) = w.web.rsplit_once(':').unwrap();
    let program = format!(
        "import socket, time\n\
         best = 60.0\n\
         for _ in range(3):\n  \
         t = time.monotonic()\n  \
         socket.create_connection(('{host}', {port}), timeout=10).close()\n  \
         best = min(best, time.monotonic() - t)\n\
         print(best)"
    );
    let out = netns::in_netns(&w.bed.agent, Command::new("python3").args(["-c", &program]))
        .output()
        .unwrap();
    let seconds = text(&out.stdout)
        .trim()
        .parse::<f64>()
        .unwrap_or_else(|_| panic!("no round trip measured: {}", text(&out.stderr)));
    Duration::from_secs_f64(seconds)
}

#[test]
fn five_percent_loss_and_a_200ms_round_trip_neither_break_sessions_nor_flap_a_tcp_tunnel() {
    lossy_link("tcp");
}

#[test]
fn five_percent_loss_and_a_200ms_round_trip_neither_break_sessions_nor_flap_a_quic_tunnel() {
    lossy_link("quic");
}

/// The link to one of two proxies (at a second site) is down for 30 s, long enough for that proxy
/// to lose its registration: a session through the other proxy never notices, `nodes ls` says
/// the node is reachable through the near proxy only, and once the link is back the agent holds a
/// tunnel to both again.
#[test]
fn a_30s_outage_of_one_proxys_site_drops_no_session_through_the_other_and_heals() {
    let Some(w) = World::two_sites() else { return };
    let proxies = eventually(WAIT, || Some(w.proxies()).filter(|p| p.len() == 2))
        .expect("proxies ls shows both proxies");
    let all: BTreeSet<String> = proxies.iter().map(|(id, _)| id.clone()).collect();
    let near = proxies
        .iter()
        .find(|(_, web)| web == NEAR_WEB)
        .map(|(id, _)| id.clone());
    let data = w.dir.join("edge");
    // Behind a TCP balancer: TCP tunnels.
    let agent = w.agent("edge", &["--transport", "tcp"]);
    eventually(WAIT, || (w.tunnels_of(&data) == all).then_some(())).unwrap_or_else(|| {
        panic!(
            "wanted tunnels to {all:?}, nodes ls shows {:?}\n{}",
            w.tunnels_of(&data),
            agent.log()
        )
    });
    // 40 s of counting through the near proxy's jump host, across the whole outage.
    let session = start_counting_session(&w, 200);
    let outage = Duration::from_secs(30);
    let down = std::time::Instant::now();
    w.bed.site_link_down(true);
    // The far proxy's registration (a 15 s lease) runs out within the outage.
    let alone = eventually(outage - Duration::from_secs(2), || {
        let held = w.tunnels_of(&data);
        (held.len() == 1).then_some(held)
    });
    std::thread::sleep(outage.saturating_sub(down.elapsed()));
    w.bed.site_link_down(false);
    if let Err(what) = session.finish() {
        panic!(
            "the session through the near proxy broke: {what}\n{}",
            agent.log()
        );
    }
    let alone = alone.expect("nodes ls never showed the far proxy gone during the outage");
    assert_eq!(
        alone.iter().next().cloned(),
        near,
        "during the outage the node is reachable through the near proxy"
    );
    eventually(Duration::from_secs(60), || {
        (w.tunnels_of(&data) == all).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "after the outage: wanted tunnels to {all:?}, nodes ls shows {:?}\n{}",
            w.tunnels_of(&data),
            agent.log()
        )
    });
}

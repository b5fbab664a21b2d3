//! A test bed in network namespaces: an agent's host on a private network behind a NAT router,
//! and the "internet" where the proxies and the users are.
//!
//! ```text
//!  agent ns                 router ns                          public ns
//!  192.168.77.2 --- lan 192.168.77.1 | wan 203.0.113.2 --- 203.0.113.1 (proxies, ssh users)
//!  fd77::2          fd77::1          | 2001:db8:113::2      2001:db8:113::1
//!                                                               198.51.100.1
//!                                                                    |  (NatBed::add_site)
//!                                                               198.51.100.2 (site ns: a proxy
//!                                                                             elsewhere)
//! ```
//!
//! The router masquerades IPv4 from the private network (random source ports, so a forgotten
//! mapping comes back as a new one), routes IPv6 without NAT, and forwards nothing new from the
//! outside in (a stateful firewall, as home routers and carriers do). Every address lives only
//! inside these namespaces (documentation and private ranges), so no packet leaves them. The bed
//! is torn down on drop. [`NatBed::create`] says why it cannot run where namespaces or nftables
//! are not allowed, for the test to skip with that message.

use std::process::{Command, Stdio};

pub const PUBLIC_IP: &str = "203.0.113.1";
pub const ROUTER_WAN_IP: &str = "203.0.113.2";
/// The router's outside address after [`NatBed::change_public_address`].
pub const ROUTER_WAN_IP_2: &str = "203.0.113.3";
pub const AGENT_IP: &str = "192.168.77.2";
pub const PUBLIC_IP6: &str = "2001:db8:113::1";
/// A second site's address, behind its own link from the public side ([`NatBed::add_site`]).
pub const SITE_IP: &str = "198.51.100.2";

pub struct NatBed {
    pub public: String,
    pub router: String,
    pub agent: String,
    /// A second site on the public side, once [`NatBed::add_site`] made it.
    pub site: String,
}

/// `cmd` run inside namespace `ns` (program, arguments and environment kept).
pub fn in_netns(ns: &str, cmd: &Command) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        c.current_dir(dir);
    }
    c
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `ip -n NS REST...` (REST split on whitespace).
fn ip(ns: &str, rest: &str) -> Result<(), String> {
    let mut args = vec!["ip", "-n", ns];
    args.extend(rest.split_whitespace());
    run(&args)
}

/// Sets `key=value` with sysctl inside namespace `ns`.
fn sysctl(ns: &str, key: &str) -> Result<(), String> {
    run(&["ip", "netns", "exec", ns, "sysctl", "-q", "-w", key])
}

/// Loads an nftables `script` in namespace `ns`.
fn nft_in(ns: &str, script: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The router's rules. `block` is where tests add drops (UDP, everything); `forward` lets only
/// what the inside started come back in.
const RULES: &str = "
table inet bed {
  chain block { }
  chain forward {
    type filter hook forward priority 0; policy drop;
    jump block
    ct state established,related accept
    iifname \"lan\" accept
  }
  chain postrouting {
    type nat hook postrouting priority 100;
    oifname \"wan\" meta nfproto ipv4 masquerade random
  }
}
";

impl NatBed {
    /// Builds the bed, or says why it cannot (not root, no namespaces, no nftables).
    pub fn create() -> Result<NatBed, String> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static SEQ: AtomicU32 = AtomicU32::new(0);
        if !nix::unistd::geteuid().is_root() {
            return Err("network namespaces need root".into());
        }
        for tool in ["ip", "nft", "conntrack"] {
            if Command::new(tool).arg("-V").output().is_err() {
                return Err(format!(
                    "{tool} is not installed: run ./scripts/install-deps.sh"
                ));
            }
        }
        let id = format!(
            "bt{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let bed = NatBed {
            public: format!("{id}p"),
            router: format!("{id}r"),
            agent: format!("{id}a"),
            site: format!("{id}s"),
        };
        for ns in [&bed.public, &bed.router, &bed.agent] {
            run(&["ip", "netns", "add", ns])?;
        }
        bed.build()?;
        Ok(bed)
    }

    fn build(&self) -> Result<(), String> {
        let (p, r, a) = (&self.public, &self.router, &self.agent);
        for ns in [p, r, a] {
            // No duplicate address detection: an address (link-local ones included, which
            // neighbour discovery needs) is usable the moment it is added.
            for key in [
                "net.ipv6.conf.default.accept_dad=0",
                "net.ipv6.conf.all.accept_dad=0",
            ] {
                sysctl(ns, key)?;
            }
            ip(ns, "link set lo up")?;
        }
        // Each veth pair is created in its first namespace, its peer moved to the second.
        ip(
            p,
            &format!("link add pub type veth peer name wan netns {r}"),
        )?;
        ip(
            a,
            &format!("link add eth0 type veth peer name lan netns {r}"),
        )?;
        ip(p, &format!("addr add {PUBLIC_IP}/24 dev pub"))?;
        ip(p, &format!("addr add {PUBLIC_IP6}/64 dev pub nodad"))?;
        ip(r, &format!("addr add {ROUTER_WAN_IP}/24 dev wan"))?;
        ip(r, "addr add 2001:db8:113::2/64 dev wan nodad")?;
        ip(r, "addr add 192.168.77.1/24 dev lan")?;
        ip(r, "addr add fd77::1/64 dev lan nodad")?;
        ip(a, &format!("addr add {AGENT_IP}/24 dev eth0"))?;
        ip(a, "addr add fd77::2/64 dev eth0 nodad")?;
        for (ns, dev) in [(p, "pub"), (r, "wan"), (r, "lan"), (a, "eth0")] {
            ip(ns, &format!("link set {dev} up"))?;
        }
        ip(a, "route add default via 192.168.77.1")?;
        ip(a, "-6 route add default via fd77::1")?;
        // The public side knows the way to the agent's IPv6 prefix (it is routed, not hidden);
        // its IPv4 network stays unreachable behind the NAT.
        ip(p, "-6 route add fd77::/64 via 2001:db8:113::2")?;
        for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
            sysctl(r, key)?;
        }
        self.nft(RULES)?;
        self.wait_for_addresses()
    }

    /// Waits (bounded) until no IPv6 address in the bed is still tentative.
    fn wait_for_addresses(&self) -> Result<(), String> {
        for _ in 0..100 {
            let tentative = [&self.public, &self.router, &self.agent].iter().any(|ns| {
                Command::new("ip")
                    .args(["-n", ns, "-6", "addr", "show", "tentative"])
                    .output()
                    .map(|o| !o.stdout.is_empty())
                    .unwrap_or(true)
            });
            if !tentative {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Err("IPv6 addresses in the bed stay tentative".into())
    }

    fn nft(&self, script: &str) -> Result<(), String> {
        nft_in(&self.router, script)
    }

    /// Drops every UDP packet the router would forward (QUIC blocked), or stops doing so.
    pub fn block_udp(&self, blocked: bool) {
        self.set_block(blocked.then_some("meta l4proto udp drop"));
    }

    /// Drops `percent` % of what the router forwards, at random, both ways (`None`: no loss).
    /// (For delay, see [`NatBed::delay`]: `sch_netem` is not in every kernel here.)
    pub fn lose(&self, percent: Option<u32>) {
        let rule = percent.map(|p| format!("numgen random mod 100 < {p} drop"));
        self.set_block(rule.as_deref());
    }

    /// Drops everything the router would forward (the link is down), or stops doing so.
    pub fn link_down(&self, down: bool) {
        self.set_block(down.then_some("drop"));
    }

    fn set_block(&self, rule: Option<&str>) {
        let mut script = "flush chain inet bed block\n".to_string();
        if let Some(rule) = rule {
            script += &format!("add rule inet bed block {rule}\n");
        }
        self.nft(&script).unwrap();
    }

    /// The router forgets every NAT mapping (as a NAT does after its idle timeout).
    pub fn forget_mappings(&self) {
        // conntrack exits 1 when there was nothing to delete.
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.router, "conntrack", "-F"])
            .output();
    }

    /// The agent's IPv6 address is replaced by another in the same prefix (a device renumbered,
    /// or moving between networks without NAT).
    pub fn change_agent_address6(&self) {
        ip(&self.agent, "addr add fd77::3/64 dev eth0 nodad").unwrap();
        ip(&self.agent, "addr del fd77::2/64 dev eth0").unwrap();
    }

    /// The router's outside address changes (a phone moving to another cell): its mappings go
    /// with the old address.
    pub fn change_public_address(&self) {
        let r = &self.router;
        // Without this, removing the old (primary) address takes the new one with it.
        sysctl(r, "net.ipv4.conf.wan.promote_secondaries=1").unwrap();
        ip(r, &format!("addr add {ROUTER_WAN_IP_2}/24 dev wan")).unwrap();
        ip(r, &format!("addr del {ROUTER_WAN_IP}/24 dev wan")).unwrap();
        self.forget_mappings();
    }
}

/// Holds every IPv4 packet to and from the agent's host for a while: a delay line (`netem delay`
/// without `sch_netem`, which not every kernel here has) made of a TUN device in the agent's
/// namespace and a small program that writes each packet back into it when its time comes. The
/// packets keep their order. Gone, with its routes, when dropped.
pub struct DelayLine {
    _program: crate::Daemon,
}

/// The delay line's program: reads packets from a TUN device and writes each back after `delay`
/// seconds; exits after `lifetime` seconds at the latest.
const DELAY_PROGRAM: &str = r#"
import collections, fcntl, os, select, struct, sys, time
name, delay, lifetime = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
print("ready", file=sys.stderr, flush=True)
held, end = collections.deque(), time.monotonic() + lifetime
while time.monotonic() < end:
    wait = min(1.0, max(0.0, held[0][0] - time.monotonic())) if held else 1.0
    if select.select([fd], [], [], wait)[0]:
        due = time.monotonic() + delay
        for _ in range(10000):
            try:
                held.append((due, os.read(fd, 65536)))
            except BlockingIOError:
                break
    now = time.monotonic()
    while held and held[0][0] <= now:
        try:
            os.write(fd, held.popleft()[1])
        except OSError:
            pass  # the kernel's queue is full: a drop, as on a congested link
"#;

impl NatBed {
    /// Delays every IPv4 packet the agent's host sends or receives by `one_way` (so a round trip
    /// takes twice that more), until the returned line is dropped.
    ///
    /// Policy routing in the agent's namespace sends what arrives from the router, and what the
    /// host sends out, through the TUN device; what comes back out of the device takes the
    /// ordinary routes (delivered locally, or forwarded to the router).
    pub fn delay(&self, one_way: std::time::Duration) -> Result<DelayLine, String> {
        let a = &self.agent;
        // Packets come back out of the device with addresses routed elsewhere: no reverse-path
        // check; the namespace forwards what leaves the device towards the router; and no early
        // demultiplexing, which hands a packet for a connected socket straight to it, past the
        // rules below.
        for key in [
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv4.ip_forward=1",
            "net.ipv4.ip_early_demux=0",
        ] {
            sysctl(a, key)?;
        }
        let mut program = crate::Daemon::spawn(
            in_netns(
                a,
                // Ahead of the tests' own load: a delay line that is not scheduled adds delay and
                // drops that are not the ones a test asked for.
                Command::new("nice").args([
                    "-n",
                    "-10",
                    "python3",
                    "-c",
                    DELAY_PROGRAM,
                    "delay0",
                    &one_way.as_secs_f64().to_string(),
                    "900",
                ]),
            ),
            "delay line",
        );
        program.try_wait_for("ready")?;
        // The rule below sends what arrives on eth0 into the line before the local table is
        // read, and ARP asks the same routing whether the host owns an address: to ARP the
        // agent's address is "forward via delay0", so the host stops answering the router's
        // probes for it. Once the router's neighbour entry expires (15-45 s), every packet towards
        // the agent would be dropped until the agent itself sent an ARP request: a silence of
        // seconds in one direction that no network test asked for. The router knows the agent's
        // link address for good instead.
        let mac = Command::new("ip")
            .args(["netns", "exec", a, "cat", "/sys/class/net/eth0/address"])
            .output()
            .map_err(|e| e.to_string())?;
        let mac = String::from_utf8_lossy(&mac.stdout).trim().to_string();
        ip(
            &self.router,
            &format!("neigh replace {AGENT_IP} lladdr {mac} dev lan nud permanent"),
        )?;
        // What the host sent comes back out of the device with the host's own address.
        sysctl(a, "net.ipv4.conf.delay0.rp_filter=0")?;
        sysctl(a, "net.ipv4.conf.delay0.accept_local=1")?;
        // Room for a burst, as netem's 1,000-packet queue has.
        ip(a, "link set delay0 up txqueuelen 1000")?;
        ip(
            a,
            &format!("route add default dev delay0 src {AGENT_IP} table 100"),
        )?;
        ip(a, "route add default dev delay0 table 101")?;
        // Arriving from the router: into the line (before the local table would deliver it).
        ip(a, "rule add pref 10 iif eth0 lookup 101")?;
        ip(a, "rule add pref 20 lookup local")?;
        ip(a, "rule del pref 0")?;
        // Sent by this host to anywhere but itself: into the line.
        ip(a, "rule add pref 30 iif lo lookup 100")?;
        Ok(DelayLine { _program: program })
    }
}

impl NatBed {
    /// A second site (a data centre elsewhere) joined to the public side by a link of its own:
    /// [`SITE_IP`] there, 198.51.100.1 on the public side, and routes both ways.
    pub fn add_site(&self) -> Result<(), String> {
        let (p, site) = (&self.public, &self.site);
        run(&["ip", "netns", "add", site])?;
        ip(site, "link set lo up")?;
        ip(
            site,
            &format!("link add eth0 type veth peer name site netns {p}"),
        )?;
        ip(site, &format!("addr add {SITE_IP}/24 dev eth0"))?;
        ip(p, "addr add 198.51.100.1/24 dev site")?;
        ip(site, "link set eth0 up")?;
        ip(p, "link set site up")?;
        ip(site, "route add default via 198.51.100.1")
    }

    /// The link between the public side and the second site drops everything, or stops doing
    /// so (what the site's programs see is silence, not an error).
    pub fn site_link_down(&self, down: bool) {
        let mut script = "table inet site\ndelete table inet site\n".to_string();
        if down {
            script += "table inet site {\n\
                       chain input { type filter hook input priority 0; iifname \"site\" drop; }\n\
                       chain output { type filter hook output priority 0; oifname \"site\" drop; }\n\
                       }\n";
        }
        nft_in(&self.public, &script).unwrap();
    }
}

impl Drop for NatBed {
    fn drop(&mut self) {
        for ns in [&self.site, &self.agent, &self.router, &self.public] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

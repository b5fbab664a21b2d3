//! Harness for the end-to-end tests: builds the real binaries once, starts them on 127.0.0.1
//! with ports picked at run time, and waits for conditions instead of sleeping.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub mod netns;

/// How long a daemon may take to print a line we wait for. Generous: CI machines are slow.
pub const WAIT: Duration = Duration::from_secs(30);

/// The directory holding the built binaries, building them the first time it is asked for.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_path_buf();
        let mut cargo = Command::new(env!("CARGO"));
        // The same command as scripts/test.sh, in the environment a shell would have: the
        // variables cargo sets for a test run would change build-script fingerprints (ring's)
        // and rebuild everything on every run.
        cargo
            .args(["build", "--quiet", "--workspace", "--bins"])
            .current_dir(&workspace);
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            let keep = matches!(key.as_ref(), "CARGO_HOME" | "CARGO_TARGET_DIR");
            if (key.starts_with("CARGO_") && !keep) || key == "LD_LIBRARY_PATH" {
                cargo.env_remove(key.as_ref());
            }
        }
        let status = cargo.status().expect("cargo runs");
        assert!(status.success(), "building the binaries failed");
        // target/debug/deps/<test binary> -> target/debug
        let exe = std::env::current_exe().unwrap();
        exe.parent().unwrap().parent().unwrap().to_path_buf()
    })
}

pub fn bin(name: &str) -> Command {
    let mut cmd = Command::new(bin_dir().join(name));
    // BURROW_TEST_LOG (`RUST_LOG`'s syntax) turns up the daemons' logs when chasing a failure.
    match std::env::var("BURROW_TEST_LOG") {
        Ok(filter) => cmd.env("RUST_LOG", filter),
        Err(_) => cmd.env_remove("RUST_LOG"),
    };
    cmd.env("NO_COLOR", "1");
    cmd
}

/// Polls `f` every 50 ms until it returns `Some`, for at most `timeout`.
pub fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running binary whose stderr is collected.
pub struct Daemon {
    child: Child,
    log: Arc<Mutex<String>>,
    name: String,
}

impl Daemon {
    pub fn spawn(mut cmd: Command, name: &str) -> Daemon {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Daemon {
            child,
            log,
            name: name.to_string(),
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log contains `needle`; returns the rest of that line after it.
    pub fn wait_for(&mut self, needle: &str) -> String {
        self.try_wait_for(needle).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Daemon::wait_for`], but an exit or a timeout is an `Err` with the log.
    pub fn try_wait_for(&mut self, needle: &str) -> Result<String, String> {
        enum Seen {
            Line(String),
            Exit(ExitStatus),
        }
        let seen = eventually(WAIT, || {
            let log = self.log();
            if let Some(i) = log.find(needle) {
                let rest = &log[i + needle.len()..];
                return Some(Seen::Line(rest.lines().next().unwrap_or("").to_string()));
            }
            self.child.try_wait().ok().flatten().map(Seen::Exit)
        });
        match seen {
            Some(Seen::Line(rest)) => Ok(rest),
            Some(Seen::Exit(status)) => Err(format!(
                "{} exited ({status}) before logging {needle:?}:\n{}",
                self.name,
                self.log()
            )),
            None => Err(format!(
                "{} never logged {needle:?}:\n{}",
                self.name,
                self.log()
            )),
        }
    }

    /// Waits (bounded) for the process to exit by itself.
    pub fn wait_exit(&mut self) -> Option<ExitStatus> {
        eventually(WAIT, || self.child.try_wait().ok().flatten())
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn stop(&mut self) -> ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let status = eventually(WAIT, || self.child.try_wait().ok().flatten());
        status.unwrap_or_else(|| {
            let _ = self.child.kill();
            panic!("{} did not stop on SIGTERM:\n{}", self.name, self.log())
        })
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A proxy on 127.0.0.1 with a port picked at run time.
pub struct Proxy {
    pub daemon: Daemon,
    pub data_dir: PathBuf,
    pub web_addr: String,
    /// The network namespace it runs in (`burrowctl` runs there too); `None`: this host's.
    pub netns: Option<String>,
}

impl Proxy {
    pub fn start(data_dir: &Path, extra: &[&str]) -> Proxy {
        Self::start_many(&[(data_dir, extra)]).pop().unwrap()
    }

    /// Starts a proxy on a given web address (to restart one where a balancer expects it).
    pub fn start_at(data_dir: &Path, web_listen: &str, extra: &[&str]) -> Proxy {
        let mut args = vec!["--web-listen", web_listen];
        args.extend_from_slice(extra);
        Self::start(data_dir, &args)
    }

    /// Starts several proxies at the same moment, then waits until each serves.
    pub fn start_many(specs: &[(&Path, &[&str])]) -> Vec<Proxy> {
        Self::start_many_in(None, specs)
    }

    /// Starts a proxy inside network namespace `ns` (its addresses given in `extra`).
    pub fn start_in(ns: &str, data_dir: &Path, extra: &[&str]) -> Proxy {
        Self::start_many_in(Some(ns), &[(data_dir, extra)])
            .pop()
            .unwrap()
    }

    fn start_many_in(ns: Option<&str>, specs: &[(&Path, &[&str])]) -> Vec<Proxy> {
        let daemons: Vec<Daemon> = specs
            .iter()
            .map(|(data_dir, extra)| {
                let mut cmd = bin("burrow-proxy");
                cmd.arg("start").arg("--data-dir").arg(data_dir);
                if !extra.contains(&"--web-listen") {
                    cmd.args(["--web-listen", "127.0.0.1:0"]);
                }
                if !extra.contains(&"--ssh-listen") {
                    cmd.args(["--ssh-listen", "127.0.0.1:0"]);
                }
                cmd.args(*extra);
                if let Some(ns) = ns {
                    cmd = netns::in_netns(ns, &cmd);
                }
                Daemon::spawn(cmd, "burrow-proxy")
            })
            .collect();
        daemons
            .into_iter()
            .zip(specs)
            .map(|(mut daemon, (data_dir, _))| {
                let web_addr = daemon
                    .wait_for("web API listening on https://")
                    .trim()
                    .to_string();
                Proxy {
                    daemon,
                    data_dir: data_dir.to_path_buf(),
                    web_addr,
                    netns: ns.map(str::to_string),
                }
            })
            .collect()
    }

    /// `GET /readyz`: `Ok(proxy id)` when ready, `Err(message)` when not.
    pub fn ready(&self) -> Result<String, String> {
        ready_at(&self.web_addr)
    }

    /// Runs `burrowctl` against this proxy the way an admin on the proxy host would.
    pub fn ctl(&self, args: &[&str]) -> Output {
        let mut cmd = bin("burrowctl");
        cmd.arg("--data-dir").arg(&self.data_dir).args(args);
        if let Some(ns) = &self.netns {
            cmd = netns::in_netns(ns, &cmd);
        }
        cmd.output().unwrap()
    }

    /// Runs `burrowctl ... --format json` and parses stdout; panics if it failed.
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--format", "json"];
        all.extend_from_slice(args);
        let out = self.ctl(&all);
        assert!(
            out.status.success(),
            "burrowctl {args:?} failed: {}",
            text(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "burrowctl {args:?} printed invalid JSON ({e}): {}",
                text(&out.stdout)
            )
        })
    }

    /// Where its SSH jump host listens (HOST:PORT), once it says so.
    pub fn ssh_addr(&mut self) -> String {
        self.daemon
            .wait_for("SSH jump host listening on ")
            .trim()
            .to_string()
    }

    pub fn pin(&self) -> String {
        self.ctl_json(&["status"])["ca_pin"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// `burrowctl auth sign`: a key at `out` with a user certificate for `logins`, valid `ttl`.
    pub fn sign_user(&self, user: &str, logins: &str, ttl: &str, out: &Path) {
        let signed = self.ctl(&[
            "auth",
            "sign",
            "--user",
            user,
            "--logins",
            logins,
            "--ttl",
            ttl,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(signed.status.success(), "{}", text(&signed.stderr));
    }

    /// Creates a node token and returns its value.
    pub fn node_token(&self, extra: &[&str]) -> String {
        let mut args = vec!["tokens", "add", "--type", "node"];
        args.extend_from_slice(extra);
        self.ctl_json(&args)["token"].as_str().unwrap().to_string()
    }
}

/// The login the tests run as (their nodes' sessions run as it).
pub fn whoami() -> String {
    text(&Command::new("id").arg("-un").output().unwrap().stdout)
        .trim()
        .to_string()
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Writes `token` to a file in `dir` and returns its absolute path, as a user would flash it.
pub fn token_file(dir: &Path, token: &str) -> String {
    let path = dir.join("token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    path.to_str().unwrap().to_string()
}

/// `burrow-agent start` with the given arguments, for runs expected to end by themselves: a
/// failing join must fail fast; a hang is a bug that must not hang the suite.
pub fn agent_run(args: &[&str]) -> Output {
    let mut cmd = bin("burrow-agent");
    cmd.arg("start").args(args);
    run_within(WAIT, &mut cmd)
}

/// Runs a command with stdin closed and a 60 s limit; a hang fails the test instead of hanging
/// the suite.
pub fn run_bounded(cmd: &mut Command) -> Output {
    run_within(Duration::from_secs(60), cmd)
}

/// [`run_bounded`] with another limit.
pub fn run_within(limit: Duration, cmd: &mut Command) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    finish_within(limit, child)
}

/// Waits at most 60 s for `child` to exit (killing it then, and failing), and collects what it
/// wrote to the pipes it has.
pub fn finish_bounded(child: std::process::Child) -> Output {
    finish_within(Duration::from_secs(60), child)
}

fn finish_within(limit: Duration, mut child: std::process::Child) -> Output {
    let done = eventually(limit, || child.try_wait().ok().flatten());
    if done.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    assert!(done.is_some(), "command hung: {}", text(&out.stderr));
    out
}

/// Files in `dir` (empty if it does not exist), to check a failure left nothing behind.
pub fn files_in(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            let mut v: Vec<String> = entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        }
        Err(_) => vec![],
    }
}

/// Writes an ssh_config for the tests' OpenSSH client: `key` (with its certificate beside it),
/// strict host key checking against `known_hosts` only, no prompts, bounded waits.
pub fn write_ssh_config(path: &Path, known_hosts: &Path, key: &Path) {
    std::fs::write(
        path,
        format!(
            "Host *\n  UserKnownHostsFile {}\n  StrictHostKeyChecking yes\n  BatchMode yes\n  IdentityFile {}\n  IdentitiesOnly yes\n  ConnectTimeout 20\n  ServerAliveInterval 5\n  LogLevel ERROR\n",
            known_hosts.display(),
            key.display()
        ),
    )
    .unwrap();
}

/// A loopback port nothing listens on, free for TCP and UDP, for a daemon to bind later.
///
/// Picked below the kernel's ephemeral range (`ip_local_port_range`): a port the kernel handed
/// out for `:0` can be taken again as the source port of any outgoing connection (an agent's
/// dial, haproxy's health check) before the daemon binds it, which is a flaky "Address already
/// in use". Below the range only explicit binds compete; a cursor seeded by the process id keeps
/// the tests of one run apart.
pub fn closed_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    static CURSOR: AtomicU32 = AtomicU32::new(0);
    let high = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .filter(|&low| low > LOW + 1_000)
        .unwrap_or(32_768);
    let span = high - LOW;
    let seed = (u64::from(std::process::id()) * 7_919 % u64::from(span)) as u32;
    for _ in 0..span.min(5_000) {
        let port = (LOW + (seed + CURSOR.fetch_add(1, Ordering::Relaxed)) % span) as u16;
        let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {LOW} and {high}")
}

pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// A real etcd (Debian's etcd-server) on loopback ports picked at run time.
pub struct Etcd {
    daemon: Option<Daemon>,
    pub url: String,
    data_dir: PathBuf,
    host: String,
    client_port: u16,
    peer_port: u16,
    netns: Option<String>,
}

impl Etcd {
    pub fn start(dir: &Path) -> Etcd {
        let mut last_error = String::new();
        for _ in 0..3 {
            let (client_port, peer_port) = (closed_port(), closed_port());
            let mut etcd = Etcd::at(dir, None, "127.0.0.1", client_port, peer_port);
            match etcd.spawn() {
                Ok(()) => return etcd,
                // Another process took a port between picking and binding: pick again.
                Err(e) => last_error = e,
            }
        }
        panic!("etcd did not start: {last_error}");
    }

    /// Starts etcd inside network namespace `ns`, on `host`'s ports 2379 and 2380 (the namespace
    /// is the test's own: nothing else holds them).
    pub fn start_in(ns: &str, dir: &Path, host: &str) -> Etcd {
        let mut etcd = Etcd::at(dir, Some(ns), host, 2379, 2380);
        etcd.spawn()
            .unwrap_or_else(|e| panic!("etcd did not start in {ns}: {e}"));
        etcd
    }

    fn at(dir: &Path, ns: Option<&str>, host: &str, client_port: u16, peer_port: u16) -> Etcd {
        Etcd {
            daemon: None,
            url: format!("http://{host}:{client_port}"),
            data_dir: dir.join("etcd"),
            host: host.to_string(),
            client_port,
            peer_port,
            netns: ns.map(str::to_string),
        }
    }

    fn spawn(&mut self) -> Result<(), String> {
        let which = Command::new("sh").args(["-c", "command -v etcd"]).output();
        if !which.is_ok_and(|o| o.status.success()) {
            panic!(
                "etcd is not installed: run ./scripts/install-deps.sh (Debian package etcd-server)"
            );
        }
        let client = format!("http://{}:{}", self.host, self.client_port);
        let peer = format!("http://{}:{}", self.host, self.peer_port);
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg("test")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("test={peer}")])
            // Keep test runs small: no metrics listener, quick snapshots of a tiny store.
            .args(["--listen-metrics-urls", "", "--snapshot-count", "1000"]);
        if let Some(ns) = &self.netns {
            cmd = netns::in_netns(ns, &cmd);
        }
        let mut daemon = Daemon::spawn(cmd, "etcd");
        daemon.try_wait_for("ready to serve client requests")?;
        self.daemon = Some(daemon);
        Ok(())
    }

    /// SIGKILL: etcd vanishes mid-whatever, as in a crash or a network cut.
    pub fn kill(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
    }

    /// Starts etcd again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        let mut last = String::new();
        for _ in 0..20 {
            match self.spawn() {
                Ok(()) => return,
                // The old process's ports may take a moment to be free.
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("etcd did not restart: {last}");
    }
}

/// A node joined to `proxy` and holding its tunnels, started with `extra` arguments.
pub fn start_agent(proxy: &Proxy, data: &Path, name: &str, extra: &[&str]) -> Daemon {
    start_agent_via(proxy, &proxy.web_addr, data, name, extra)
}

/// [`start_agent`] with a token from `proxy`, given `addr` (a balancer, say) as its proxy.
pub fn start_agent_via(
    proxy: &Proxy,
    addr: &str,
    data: &Path,
    name: &str,
    extra: &[&str],
) -> Daemon {
    let token = proxy.node_token(&[]);
    let pin = proxy.pin();
    let mut cmd = bin("burrow-agent");
    cmd.args([
        "start",
        "--proxy",
        addr,
        "--ca-pin",
        &pin,
        "--nodename",
        name,
        "--token",
        &token,
    ])
    .arg("--data-dir")
    .arg(data)
    .args(extra);
    let mut agent = Daemon::spawn(cmd, "burrow-agent");
    agent.wait_for("tunnel up");
    agent
}

/// The host id in a node's identity file.
pub fn host_id(data: &Path) -> String {
    let identity: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("identity.json")).unwrap()).unwrap();
    identity["host_id"].as_str().unwrap().to_string()
}

/// The nodes `burrowctl nodes ls` shows, by host id.
pub fn nodes(proxy: &Proxy) -> std::collections::BTreeMap<String, serde_json::Value> {
    proxy.ctl_json(&["nodes", "ls"])["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["host_id"].as_str().unwrap().to_string(), n.clone()))
        .collect()
}

/// The proxies `nodes ls` (through `proxy`) says `host_id` holds tunnels to.
pub fn tunnels_of(proxy: &Proxy, host_id: &str) -> std::collections::BTreeSet<String> {
    nodes(proxy)
        .get(host_id)
        .map(|n| {
            n["proxies"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// A user of the cluster with plain OpenSSH: alice, with a certificate for this machine's login,
/// the cluster's host CA in known_hosts and an ssh_config, all in `dir`.
pub struct SshUser {
    pub config: PathBuf,
}

impl SshUser {
    pub fn new(proxy: &Proxy, dir: &Path) -> SshUser {
        proxy.sign_user("alice", &whoami(), "1h", &dir.join("alice"));
        let known = proxy.ctl(&["auth", "export", "--type", "host"]);
        assert!(known.status.success(), "{}", text(&known.stderr));
        std::fs::write(dir.join("known_hosts"), &known.stdout).unwrap();
        let config = dir.join("ssh_config");
        write_ssh_config(&config, &dir.join("known_hosts"), &dir.join("alice"));
        SshUser { config }
    }

    /// `ssh -J` through the jump host at `jump` (HOST:PORT) to `node`, with `args` after;
    /// output piped.
    pub fn ssh(&self, jump: &str, node: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.arg("-F")
            .arg(&self.config)
            .args(["-J", &format!("alice@{jump}"), "-p", "3022"])
            .args(args)
            .arg(node)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// `ssh ... node echo WORD`: what it printed, after checking it succeeded.
    pub fn echo(&self, jump: &str, node: &str, word: &str) -> String {
        let out = run_bounded(self.ssh(jump, node, &[]).args(["echo", word]));
        assert!(out.status.success(), "ssh: {}", text(&out.stderr));
        text(&out.stdout)
    }
}

/// A real haproxy balancing TCP round-robin over `backends`, on a loopback port picked at run
/// time.
pub struct Haproxy {
    _daemon: Daemon,
    pub addr: String,
}

impl Haproxy {
    pub fn start(dir: &Path, backends: &[&str]) -> Haproxy {
        let addr = format!("127.0.0.1:{}", closed_port());
        Self::start_at(None, dir, &addr, backends)
    }

    /// A balancer on `addr` inside network namespace `ns`.
    pub fn start_in(ns: &str, dir: &Path, addr: &str, backends: &[&str]) -> Haproxy {
        Self::start_at(Some(ns), dir, addr, backends)
    }

    fn start_at(ns: Option<&str>, dir: &Path, addr: &str, backends: &[&str]) -> Haproxy {
        let mut cfg = format!(
            "global\n  maxconn 4096\n\
             defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 1h\n  timeout server 1h\n  retries 3\n  option redispatch\n\
             frontend tunnels\n  bind {addr}\n  default_backend proxies\n\
             backend proxies\n  balance roundrobin\n"
        );
        for (i, b) in backends.iter().enumerate() {
            cfg.push_str(&format!(
                "  server p{i} {b} check inter 500ms fall 1 rise 1\n"
            ));
        }
        Self::run(ns, dir, addr, cfg)
    }

    /// An L7 balancer: haproxy in HTTP mode terminating TLS with `cert` (certificate and key in
    /// one PEM file) and opening HTTPS again to each of `backends` (proxies' web ports),
    /// round-robin per connection. It closes an upgraded connection idle for `idle`, as L7
    /// balancers do.
    pub fn start_http(dir: &Path, backends: &[&str], cert: &Path, idle: Duration) -> Haproxy {
        let addr = format!("127.0.0.1:{}", closed_port());
        let idle = idle.as_secs();
        let mut cfg = format!(
            "global\n  maxconn 4096\n\
             defaults\n  mode http\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n  timeout tunnel {idle}s\n  retries 3\n  option redispatch\n\
             frontend web\n  bind {addr} ssl crt {} alpn http/1.1\n  default_backend proxies\n\
             backend proxies\n  balance roundrobin\n  option httpchk GET /readyz\n",
            cert.display()
        );
        for (i, b) in backends.iter().enumerate() {
            cfg.push_str(&format!(
                "  server p{i} {b} ssl verify none alpn http/1.1 check inter 500ms fall 1 rise 1\n"
            ));
        }
        Self::run(None, dir, &addr, cfg)
    }

    fn run(ns: Option<&str>, dir: &Path, addr: &str, cfg: String) -> Haproxy {
        let haproxy = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect(
                "haproxy is not installed: run ./scripts/install-deps.sh (Debian package haproxy)",
            );
        let path = dir.join(format!("haproxy-{}.cfg", addr.replace([':', '.'], "-")));
        std::fs::write(&path, cfg).unwrap();
        let mut cmd = Command::new(haproxy);
        cmd.arg("-db").arg("-f").arg(&path);
        if let Some(ns) = ns {
            cmd = netns::in_netns(ns, &cmd);
        }
        let mut daemon = Daemon::spawn(cmd, "haproxy");
        eventually(WAIT, || {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("haproxy exited ({status}):\n{}", daemon.log());
            }
            match ns {
                None => std::net::TcpStream::connect(addr).ok().map(drop),
                // Listening, as `ss` inside the namespace sees it.
                Some(ns) => Command::new("ip")
                    .args(["netns", "exec", ns, "ss", "-Hltn", "src", addr])
                    .output()
                    .ok()
                    .filter(|o| !o.stdout.is_empty())
                    .map(drop),
            }
        })
        .expect("haproxy listens");
        Haproxy {
            _daemon: daemon,
            addr: addr.to_string(),
        }
    }
}

/// Waits until `ready_at(balancer)` has answered from `n` different proxies (its health checks
/// reach them all); panics after [`WAIT`].
pub fn wait_balanced(balancer: &str, n: usize) {
    let mut seen = std::collections::BTreeSet::new();
    eventually(WAIT, || {
        if let Ok(id) = ready_at(balancer) {
            seen.insert(id);
        }
        (seen.len() == n).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the balancer at {balancer} reached {} of {n} proxies",
            seen.len()
        )
    });
}

/// `GET /readyz` at `addr` (a proxy or a balancer): `Ok(proxy id)` or `Err(message)`.
pub fn ready_at(addr: &str) -> Result<String, String> {
    use burrow_net::tls::{ALPN_HTTP1, unverified_client_config};
    use burrow_net::web::WebClient;
    let client = WebClient::new(addr, unverified_client_config(&[ALPN_HTTP1]).unwrap()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(client.get::<serde_json::Value>(tunnel_proto::api::READY_PATH))
        .map(|v| v["proxy_id"].as_str().unwrap_or_default().to_string())
        .map_err(|e| e.to_string())
}

/// A loopback relay in front of a proxy, TCP and UDP on one port, whose UDP can be dropped:
/// a firewall that blocks QUIC and then lets it through again.
pub struct Relay {
    pub addr: String,
    udp_blocked: Arc<std::sync::atomic::AtomicBool>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    pub fn start(upstream: &str) -> Relay {
        use std::net::{TcpListener, UdpSocket};
        // One port number for both protocols.
        let (tcp, udp) = (0..20)
            .find_map(|_| {
                let tcp = TcpListener::bind("127.0.0.1:0").ok()?;
                let udp = UdpSocket::bind(tcp.local_addr().ok()?).ok()?;
                Some((tcp, udp))
            })
            .expect("a free TCP+UDP port pair");
        let addr = tcp.local_addr().unwrap().to_string();
        let udp_blocked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let up = upstream.to_string();
        let halt = stop.clone();
        tcp.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            while !halt.load(std::sync::atomic::Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let Ok(server) = std::net::TcpStream::connect(&up) else {
                            continue;
                        };
                        let (mut c2, mut s2) =
                            (client.try_clone().unwrap(), server.try_clone().unwrap());
                        let (mut c1, mut s1) = (client, server);
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut c1, &mut s1);
                            let _ = s1.shutdown(std::net::Shutdown::Write);
                        });
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut s2, &mut c2);
                            let _ = c2.shutdown(std::net::Shutdown::Write);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        let up: std::net::SocketAddr = upstream.parse().unwrap();
        let blocked = udp_blocked.clone();
        let halt = stop.clone();
        udp.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        std::thread::spawn(move || {
            // One upstream socket per client address, with a thread carrying replies back.
            let mut upstreams: std::collections::HashMap<std::net::SocketAddr, Arc<UdpSocket>> =
                Default::default();
            let front = Arc::new(udp);
            let mut buf = vec![0u8; 65536];
            while !halt.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((n, client)) = front.recv_from(&mut buf) else {
                    continue;
                };
                if blocked.load(std::sync::atomic::Ordering::Relaxed) {
                    continue;
                }
                let upstream = upstreams.entry(client).or_insert_with(|| {
                    let s = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
                    s.connect(up).unwrap();
                    s.set_read_timeout(Some(Duration::from_millis(100)))
                        .unwrap();
                    let (back, front, blocked, halt) =
                        (s.clone(), front.clone(), blocked.clone(), halt.clone());
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 65536];
                        while !halt.load(std::sync::atomic::Ordering::Relaxed) {
                            let Ok(n) = back.recv(&mut buf) else { continue };
                            if !blocked.load(std::sync::atomic::Ordering::Relaxed) {
                                let _ = front.send_to(&buf[..n], client);
                            }
                        }
                    });
                    s
                });
                let _ = upstream.send(&buf[..n]);
            }
        });
        Relay {
            addr,
            udp_blocked,
            stop,
        }
    }

    pub fn block_udp(&self, blocked: bool) {
        self.udp_blocked
            .store(blocked, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// `GET path` over plain HTTP/1.1 at `addr` (a daemon's diagnostics listener): the status code
/// and the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

/// The value of sample `name` (with its labels, as in the exposition: `x_total{a="b"}`) in
/// Prometheus text; `None` if the sample is absent.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Where a daemon serves its diagnostics, from its log line.
pub fn diag_addr(daemon: &mut Daemon) -> String {
    daemon
        .wait_for("diagnostics (/metrics, /healthz, /readyz) on http://")
        .trim()
        .to_string()
}

//! SSH through the tunnel with the real OpenSSH client: `ssh -J` and ProxyCommand, strict host
//! key checking against the exported `@cert-authority` line only, PTYs, scp, `-L`, refusals and
//! the audit log.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use burrow_tests::*;

struct Setup {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    proxy: Proxy,
    _agent: Daemon,
    ssh_addr: String,
    login: String,
    host_id: String,
}

fn current_login() -> String {
    text(&Command::new("id").arg("-un").output().unwrap().stdout)
        .trim()
        .to_string()
}

impl Setup {
    fn new() -> Setup {
        Self::with_agent(&[])
    }

    /// A proxy, a node "node1" started with `agent_args`, and alice's certificate and config.
    fn with_agent(agent_args: &[&str]) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut proxy = Proxy::start(&dir.join("proxy"), &[]);
        let ssh_addr = proxy.ssh_addr();
        let agent = start_agent(&proxy, &dir.join("agent"), "node1", agent_args);
        let host_id = host_id(&dir.join("agent"));
        let login = current_login();
        let setup = Setup {
            _dir: tmp,
            dir,
            proxy,
            _agent: agent,
            ssh_addr,
            login,
            host_id,
        };
        setup.sign("alice", &setup.login.clone(), "1h", "alice");
        let known = setup.proxy.ctl(&["auth", "export", "--type", "host"]);
        assert!(known.status.success());
        std::fs::write(setup.dir.join("known_hosts"), &known.stdout).unwrap();
        setup.config("alice", "known_hosts");
        setup
    }

    fn sign(&self, user: &str, logins: &str, ttl: &str, out: &str) {
        self.proxy.sign_user(user, logins, ttl, &self.dir.join(out));
    }

    /// An ssh_config using `key` and `known_hosts`; -J passes -F on to the jump's ssh.
    fn config(&self, key: &str, known_hosts: &str) -> PathBuf {
        let path = self.dir.join(format!("ssh_config-{key}-{known_hosts}"));
        write_ssh_config(&path, &self.dir.join(known_hosts), &self.dir.join(key));
        path
    }

    fn jump(&self) -> String {
        let (host, port) = self.ssh_addr.rsplit_once(':').unwrap();
        format!("alice@{host}:{port}")
    }

    fn ssh(&self, config: &Path, target: &str, command: &str) -> Output {
        run_bounded(Command::new("ssh").arg("-F").arg(config).args([
            "-J",
            &self.jump(),
            "-p",
            "3022",
            target,
            command,
        ]))
    }

    fn ssh_proxycommand(&self, config: &Path, target: &str, command: &str) -> Output {
        let (host, port) = self.ssh_addr.rsplit_once(':').unwrap();
        let proxy_command = format!(
            "ssh -F {} -p {port} alice@{host} -s proxy:%h:%p",
            config.display()
        );
        run_bounded(
            Command::new("ssh")
                .arg("-F")
                .arg(config)
                .arg("-o")
                .arg(format!("ProxyCommand={proxy_command}"))
                .args(["-p", "3022", target, command]),
        )
    }

    /// Runs `true` on `target` through the ProxyCommand form; it must fail (OpenSSH's 255)
    /// with `why` on stderr.
    fn refused(&self, config: &Path, target: &str, why: &str) {
        let out = self.ssh_proxycommand(config, target, "true");
        assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains(why), "{}", text(&out.stderr));
    }

    fn audit(&self) -> String {
        let dir = self.proxy.data_dir.join("audit");
        let mut all = String::new();
        for e in std::fs::read_dir(dir).into_iter().flatten() {
            all.push_str(&std::fs::read_to_string(e.unwrap().path()).unwrap());
        }
        all
    }
}

#[test]
fn ssh_j_and_proxycommand_run_commands_with_strict_host_keys() {
    let s = Setup::new();
    let cfg = s.config("alice", "known_hosts");
    let target = format!("{}@node1", s.login);
    let out = s.ssh(&cfg, &target, "echo hi; exit 3");
    assert_eq!(text(&out.stdout), "hi\n", "{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(3));

    let out = s.ssh_proxycommand(&cfg, &target, "echo hi; exit 3");
    assert_eq!(text(&out.stdout), "hi\n", "{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(3));

    // By host id too, and stdin reaches the program.
    let out = run_bounded(Command::new("sh").arg("-c").arg(format!(
        "echo piped | ssh -F {} -J {} -p 3022 {}@{} 'cat; whoami'",
        cfg.display(),
        s.jump(),
        s.login,
        s.host_id
    )));
    assert_eq!(
        text(&out.stdout),
        format!("piped\n{}\n", s.login),
        "{}",
        text(&out.stderr)
    );

    let audit = s.audit();
    assert!(audit.contains(r#""event":"session.start""#), "{audit}");
    assert!(
        audit.contains(r#""command":"echo hi; exit 3""#) && audit.contains(r#""exit_code":"3""#),
        "{audit}"
    );
    assert!(audit.contains(r#""user":"alice""#), "{audit}");
}

/// A login slower than the servers' keep-alive interval (a passphrase typed slowly, a hardware
/// key waiting for a touch, a slow link) still logs in, at the proxy and at the node: OpenSSH's
/// client takes any global request before it has logged in for a protocol error ("bad message
/// during authentication: type 80"), so neither server may send a keep-alive that early.
#[test]
fn a_login_slower_than_the_keepalive_interval_still_logs_in() {
    use std::os::unix::fs::PermissionsExt;
    let s = Setup::new();
    let key = s.dir.join("slow");
    std::fs::copy(s.dir.join("alice"), &key).unwrap();
    std::fs::copy(s.dir.join("alice-cert.pub"), s.dir.join("slow-cert.pub")).unwrap();
    let passphrase = "typed slowly";
    let keygen = Command::new("ssh-keygen")
        .args(["-q", "-p", "-P", "", "-N", passphrase, "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(keygen.status.success(), "{}", text(&keygen.stderr));
    // The user takes 17 s to type it, twice: at the proxy, then at the node.
    let askpass = s.dir.join("askpass");
    std::fs::write(
        &askpass,
        format!("#!/bin/sh\nsleep 17\necho '{passphrase}'\n"),
    )
    .unwrap();
    std::fs::set_permissions(&askpass, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = s.config("slow", "known_hosts");
    // The certificate only: OpenSSH would offer the plain key first and ask again for it.
    let prompting = std::fs::read_to_string(&cfg).unwrap().replace(
        "BatchMode yes",
        "BatchMode no\n  PubkeyAcceptedAlgorithms ssh-ed25519-cert-v01@openssh.com",
    );
    std::fs::write(&cfg, prompting).unwrap();
    let target = format!("{}@node1", s.login);
    let out = run_bounded(
        Command::new("ssh")
            .arg("-F")
            .arg(&cfg)
            // The node's banner waits for the login at the proxy: more than the config's 20 s.
            .args(["-o", "ConnectTimeout=60", "-J", &s.jump(), "-p", "3022"])
            .args([&target, "echo logged-in"])
            .env("SSH_ASKPASS", &askpass)
            .env("SSH_ASKPASS_REQUIRE", "force"),
    );
    assert_eq!(
        (out.status.code(), text(&out.stdout).as_str()),
        (Some(0), "logged-in\n"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn an_interactive_shell_gets_a_pty_and_follows_window_changes() {
    let s = Setup::new();
    let cfg = s.config("alice", "known_hosts");
    let size = nix::pty::Winsize {
        ws_row: 24,
        ws_col: 80,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size), None).unwrap();
    let slave = pty.slave;
    let mut cmd = Command::new("ssh");
    cmd.arg("-F")
        .arg(&cfg)
        .args([
            "-tt",
            "-J",
            &s.jump(),
            "-p",
            "3022",
            &format!("{}@node1", s.login),
        ])
        // After the line, the shell waits (bounded) for the new size to arrive, then prints it.
        .arg(
            "tty; stty size; read line; i=0; \
             while [ \"$(stty size)\" != '40 100' ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done; \
             stty size; exit 5",
        )
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    // ssh must own the terminal to hear about its size changes.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            nix::unistd::setsid()?;
            libc::ioctl(0, libc::TIOCSCTTY as _, 0);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let master = std::fs::File::from(pty.master);
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let mut reader = master.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let wait_for = |needle: &str, seen: &mut String| {
        let deadline = std::time::Instant::now() + WAIT;
        while !seen.contains(needle) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(!left.is_zero(), "never saw {needle:?} in {seen:?}");
            if let Ok(bytes) = rx.recv_timeout(left.min(Duration::from_millis(200))) {
                seen.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
    };
    wait_for("24 80", &mut seen);
    assert!(seen.contains("/dev/pts/"), "{seen}");
    let bigger = libc::winsize {
        ws_row: 40,
        ws_col: 100,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    unsafe {
        use std::os::fd::AsRawFd;
        libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &bigger);
    }
    // The size change reaches ssh as SIGWINCH, then the node as a window-change request.
    (&master).write_all(b"\n").unwrap();
    wait_for("40 100", &mut seen);
    let status = eventually(WAIT, || child.try_wait().ok().flatten()).expect("ssh exits");
    assert_eq!(status.code(), Some(5), "{seen}");
}

#[test]
fn scp_carries_50_mb_there_and_back_and_l_forwards_a_port() {
    let s = Setup::new();
    let cfg = s.config("alice", "known_hosts");
    let src = s.dir.join("big");
    let mut data = vec![0u8; 50 * 1024 * 1024];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(&src, &data).unwrap();
    let remote = format!("{}@node1:{}", s.login, s.dir.join("on-node").display());
    let up = run_bounded(
        Command::new("scp")
            .arg("-F")
            .arg(&cfg)
            .args(["-J", &s.jump(), "-P", "3022"])
            .arg(&src)
            .arg(&remote),
    );
    assert!(up.status.success(), "{}", text(&up.stderr));
    let back = s.dir.join("back");
    let down = run_bounded(
        Command::new("scp")
            .arg("-F")
            .arg(&cfg)
            .args(["-J", &s.jump(), "-P", "3022", &remote])
            .arg(&back),
    );
    assert!(down.status.success(), "{}", text(&down.stderr));
    assert!(
        std::fs::read(&back).unwrap() == data,
        "the file came back changed"
    );

    // ssh -L to an echo service on the node's loopback.
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in echo.incoming().take(4) {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let local_port = closed_port();
    let mut forward = Command::new("ssh")
        .arg("-F")
        .arg(&cfg)
        .args([
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-J",
            &s.jump(),
            "-p",
            "3022",
        ])
        .arg("-L")
        .arg(format!("127.0.0.1:{local_port}:127.0.0.1:{echo_port}"))
        .arg(format!("{}@node1", s.login))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let echoed = eventually(WAIT, || {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", local_port)).ok()?;
        c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        c.write_all(b"through the tunnel").ok()?;
        let mut buf = [0u8; 18];
        c.read_exact(&mut buf).ok()?;
        Some(buf)
    });
    let _ = forward.kill();
    let _ = forward.wait();
    assert_eq!(
        &echoed.expect("bytes through ssh -L"),
        b"through the tunnel"
    );
}

/// The smallest flow-control window a node may ask for still carries a transfer each way, byte
/// for byte; one below it is refused before the agent starts.
#[test]
fn a_64_kib_quic_window_carries_8_mib_each_way_and_a_smaller_one_is_refused() {
    let s = Setup::with_agent(&["--transport", "quic", "--window", "64KiB"]);
    let cfg = s.config("alice", "known_hosts");
    let node = format!("{}@node1", s.login);
    let eight = 8 * 1024 * 1024;
    // ssh with its input and output in files (8 MiB would fill a pipe nobody reads yet).
    let transfer = |command: &str, input: &Path, output: &Path| {
        let child = Command::new("ssh")
            .arg("-F")
            .arg(&cfg)
            .args(["-J", &s.jump(), "-p", "3022", &node, command])
            .stdin(std::fs::File::open(input).unwrap())
            .stdout(std::fs::File::create(output).unwrap())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let done = finish_bounded(child);
        assert!(done.status.success(), "{command}: {}", text(&done.stderr));
        std::fs::read(output).unwrap()
    };
    let (nothing, src, out) = (s.dir.join("empty"), s.dir.join("eight"), s.dir.join("out"));
    std::fs::write(&nothing, b"").unwrap();
    std::fs::write(&src, vec![b'y'; eight]).unwrap();
    let down = transfer("head -c 8388608 /dev/zero | tr '\\0' x", &nothing, &out);
    assert!(
        down.len() == eight && down.iter().all(|b| *b == b'x'),
        "node -> client: {} bytes",
        down.len()
    );
    // Every byte there (8 MiB of them), and nothing but what was sent.
    let up = transfer("wc -c", &src, &out);
    assert_eq!(text(&up).trim(), "8388608", "client -> node");
    let up = transfer("tr -d y | wc -c", &src, &out);
    assert_eq!(text(&up).trim(), "0", "client -> node");

    let refused = agent_run(&[
        "--proxy",
        "127.0.0.1:1",
        "--nodename",
        "n",
        "--window",
        "32KiB",
    ]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    assert!(
        text(&refused.stderr).contains("window \"32KiB\": 32768 bytes is outside 64 KiB to 16 MiB"),
        "{}",
        text(&refused.stderr)
    );
}

#[test]
fn refusals_are_clear_and_audited() {
    let s = Setup::new();
    let target = format!("{}@node1", s.login);

    // Login not among the certificate's principals.
    s.sign("mallory", "nobody-here", "1h", "wrong-login");
    let cfg = s.config("wrong-login", "known_hosts");
    s.refused(&cfg, &target, "Permission denied");

    // An expired certificate: refused once its second is over (it was valid before).
    s.sign("alice", &s.login, "1s", "short");
    let cfg = s.config("short", "known_hosts");
    let refused = eventually(WAIT, || {
        let out = s.ssh_proxycommand(&cfg, &target, "true");
        (out.status.code() == Some(255)).then_some(out)
    })
    .expect("an expired certificate is refused");
    assert!(
        text(&refused.stderr).contains("Permission denied"),
        "{}",
        text(&refused.stderr)
    );

    // A certificate from another cluster's user CA.
    let other = Proxy::start(&s.dir.join("other"), &[]);
    let out = other.ctl(&[
        "auth",
        "sign",
        "--user",
        "eve",
        "--logins",
        &s.login,
        "--out",
        s.dir.join("foreign").to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let cfg = s.config("foreign", "known_hosts");
    s.refused(&cfg, &target, "Permission denied");

    // The client refuses a node whose host certificate is from another CA.
    std::fs::write(
        s.dir.join("other_known_hosts"),
        other.ctl(&["auth", "export", "--type", "host"]).stdout,
    )
    .unwrap();
    let cfg = s.config("alice", "other_known_hosts");
    s.refused(&cfg, &target, "Host key verification failed");

    // An unknown node name: the user is told so.
    let cfg = s.config("alice", "known_hosts");
    s.refused(
        &cfg,
        &format!("{}@no-such-node", s.login),
        "burrow: no node is called \"no-such-node\"",
    );

    let audit = eventually(WAIT, || {
        Some(s.audit()).filter(|a| a.contains("auth.failure"))
    })
    .expect("failed logins are audited");
    assert!(
        audit.contains("is not among the certificate's principals"),
        "{audit}"
    );
}

#[test]
fn a_second_node_cannot_take_a_name_and_the_local_listener_serves_ssh() {
    let s = Setup::new();
    let cfg = s.config("alice", "known_hosts");
    // A second machine asking for the name node1 is refused; it joins under its own name.
    let out = agent_run(&[
        "--proxy",
        &s.proxy.web_addr,
        "--token",
        &s.proxy.node_token(&[]),
        "--ca-pin",
        &s.proxy.pin(),
        "--nodename",
        "node1",
        "--data-dir",
        s.dir.join("impostor").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("is taken by node"),
        "{}",
        text(&out.stderr)
    );
    let twin_data = s.dir.join("twin");
    let mut twin = start_agent(
        &s.proxy,
        &twin_data,
        "twin",
        &["--ssh-listen", "127.0.0.1:0"],
    );
    let local = twin.wait_for("SSH listening on ").trim().to_string();
    let twin_id = host_id(&twin_data);
    let out = s.ssh_proxycommand(&cfg, &format!("{}@node1", s.login), "echo one");
    assert_eq!(text(&out.stdout), "one\n", "{}", text(&out.stderr));
    // The host id picks one too.
    let out = s.ssh_proxycommand(&cfg, &format!("{}@{twin_id}", s.login), "echo twin");
    assert_eq!(text(&out.stdout), "twin\n", "{}", text(&out.stderr));

    // The local listener: plain ssh, no proxy; the host certificate names the node.
    let (_, port) = local.rsplit_once(':').unwrap();
    let out = run_bounded(Command::new("ssh").arg("-F").arg(&cfg).args([
        "-p",
        port,
        "-o",
        "HostKeyAlias=twin",
        &format!("{}@127.0.0.1", s.login),
        "echo local",
    ]));
    assert_eq!(text(&out.stdout), "local\n", "{}", text(&out.stderr));
}

/// Starts an echo service on 127.0.0.1 that serves `n` connections; returns its port.
fn echo_server(n: usize) -> u16 {
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = echo.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in echo.incoming().take(n) {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

impl Setup {
    /// `ssh -W 127.0.0.1:PORT` (stdio forwarding, a direct-tcpip channel) to `node`, sending
    /// "ping" and closing.
    fn forward(&self, config: &Path, node: &str, port: u16) -> Output {
        run_bounded(Command::new("sh").arg("-c").arg(format!(
            "printf ping | ssh -F {} -J {} -p 3022 -W 127.0.0.1:{port} {}@{node}",
            config.display(),
            self.jump(),
            self.login
        )))
    }
}

#[test]
fn one_sessions_terminal_never_leaks_into_another_session() {
    let s = Setup::new();
    let cfg = s.config("alice", "known_hosts");
    // A session holding a PTY, as a root shell would.
    let mut holder = Command::new("ssh")
        .arg("-F")
        .arg(&cfg)
        .args(["-tt", "-J", &s.jump(), "-p", "3022"])
        .arg(format!("{}@node1", s.login))
        .arg("echo holding; sleep 60")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = holder.stdout.take().unwrap();
    let mut first = [0u8; 7];
    out.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"holding");

    // Another session sees nothing but its own descriptors (0-2, and ls's directory)...
    let listed = s.ssh(&cfg, &format!("{}@node1", s.login), "ls /proc/self/fd");
    // ...and one with a terminal of its own holds no PTY master (the holder's is /dev/ptmx).
    let with_tty = run_bounded(Command::new("ssh").arg("-F").arg(&cfg).args([
        "-tt",
        "-J",
        &s.jump(),
        "-p",
        "3022",
        &format!("{}@node1", s.login),
        "ls -l /proc/self/fd/ | grep -c ptmx",
    ]));
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(
        text(&listed.stdout),
        "0\n1\n2\n3\n",
        "{}",
        text(&listed.stderr)
    );
    assert_eq!(
        text(&with_tty.stdout).trim(),
        "0",
        "{}",
        text(&with_tty.stderr)
    );
}

/// A throwaway OS login with a supplementary group, removed with its home on drop.
struct TestLogin {
    name: String,
    group: String,
}

impl TestLogin {
    /// `None` (with a note) where the tests cannot create users.
    fn create() -> Option<TestLogin> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: creating a login needs root");
            return None;
        }
        let name = format!("bt{}", std::process::id());
        let group = format!("{name}g");
        let ok = |c: &mut Command| c.status().is_ok_and(|s| s.success());
        if !ok(Command::new("groupadd").arg(&group)) {
            eprintln!("skipped: groupadd is not available");
            return None;
        }
        let login = TestLogin { name, group };
        assert!(ok(Command::new("useradd").args([
            "-m",
            "-s",
            "/bin/sh",
            "-G",
            &login.group,
            &login.name
        ])));
        Some(login)
    }
}

impl Drop for TestLogin {
    fn drop(&mut self) {
        let _ = Command::new("userdel").args(["-r", &self.name]).status();
        let _ = Command::new("groupdel").arg(&self.group).status();
    }
}

#[test]
fn sessions_run_as_the_login_with_its_groups_home_and_terminal() {
    let Some(user) = TestLogin::create() else {
        return;
    };
    let s = Setup::new();
    s.sign("alice", &user.name, "1h", "as-user");
    let cfg = s.config("as-user", "known_hosts");
    let out = run_bounded(Command::new("ssh").arg("-F").arg(&cfg).args([
        "-tt",
        "-J",
        &s.jump(),
        "-p",
        "3022",
        &format!("{}@node1", user.name),
        "id -un; id -Gn; pwd; stat -c '%U %G %a' $(tty); grep ^CapEff /proc/self/status",
    ]));
    let got = text(&out.stdout).replace('\r', "");
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(lines.len(), 5, "{got} {}", text(&out.stderr));
    assert_eq!(lines[0], user.name);
    assert!(
        lines[1].split(' ').any(|g| g == user.group),
        "supplementary group missing: {got}"
    );
    assert_eq!(lines[2], format!("/home/{}", user.name));
    assert_eq!(lines[3], format!("{} tty 620", user.name));
    assert_eq!(lines[4].split_whitespace().nth(1), Some("0000000000000000"));
}

#[test]
fn certificate_rights_pty_forwarding_and_forced_commands_hold() {
    let s = Setup::new();
    let target = format!("{}@node1", s.login);
    let echo = echo_server(8);

    // A full certificate forwards.
    let cfg = s.config("alice", "known_hosts");
    let out = s.forward(&cfg, "node1", echo);
    assert_eq!(text(&out.stdout), "ping", "{}", text(&out.stderr));

    // Without permit-port-forwarding the node refuses -W/-L, and says why in the audit log.
    let out = s.proxy.ctl(&[
        "auth",
        "sign",
        "--user",
        "bob",
        "--logins",
        &s.login,
        "--no-port-forwarding",
        "--no-pty",
        "--out",
        s.dir.join("limited").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let limited = s.config("limited", "known_hosts");
    let out = s.forward(&limited, "node1", echo);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("stdio forwarding failed"),
        "{}",
        text(&out.stderr)
    );
    let audit = eventually(WAIT, || {
        Some(s.audit()).filter(|a| a.contains("port_forward.refused"))
    })
    .expect("refused forwards are audited");
    assert!(
        audit.contains("the certificate does not permit port forwarding"),
        "{audit}"
    );
    // Without permit-pty the node refuses a terminal (and ssh -tt gives up).
    let out = run_bounded(Command::new("ssh").arg("-F").arg(&limited).args([
        "-tt",
        "-J",
        &s.jump(),
        "-p",
        "3022",
        &target,
        "true",
    ]));
    assert!(
        text(&out.stderr).contains("PTY allocation request failed"),
        "{}",
        text(&out.stderr)
    );

    // A forced command runs instead of the sftp subsystem: nothing is uploaded.
    let marker = s.dir.join("forced-ran");
    let out = s.proxy.ctl(&[
        "auth",
        "sign",
        "--user",
        "carol",
        "--logins",
        &s.login,
        "--force-command",
        &format!("echo \"$SSH_ORIGINAL_COMMAND\" > {}", marker.display()),
        "--out",
        s.dir.join("forced").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let forced = s.config("forced", "known_hosts");
    std::fs::write(s.dir.join("upload"), b"data").unwrap();
    let out = run_bounded(Command::new("sh").arg("-c").arg(format!(
        "echo 'put {} {}' | sftp -F {} -J {} -P 3022 -b - {target}",
        s.dir.join("upload").display(),
        s.dir.join("uploaded").display(),
        forced.display(),
        s.jump(),
    )));
    assert_ne!(out.status.code(), Some(0), "sftp must not get a session");
    let ran = eventually(WAIT, || std::fs::read_to_string(&marker).ok());
    assert_eq!(ran.as_deref(), Some("sftp\n"));
    assert!(
        !s.dir.join("uploaded").exists(),
        "the forced command was bypassed"
    );
    // Nor a forward.
    let out = s.forward(&forced, "node1", echo);
    assert!(text(&out.stderr).contains("stdio forwarding failed"));
}

#[test]
fn permit_open_limits_where_the_node_forwards() {
    let s = Setup::new();
    let allowed = echo_server(4);
    let other = echo_server(4);
    let config = s.dir.join("agent2.yaml");
    std::fs::write(
        &config,
        format!("permit_open:\n  - 127.0.0.1:{allowed}\n  - \"localhost:*\"\n"),
    )
    .unwrap();
    let _node2 = start_agent(
        &s.proxy,
        &s.dir.join("agent2"),
        "node2",
        &["--config", config.to_str().unwrap()],
    );
    let cfg = s.config("alice", "known_hosts");
    let out = s.forward(&cfg, "node2", allowed);
    assert_eq!(text(&out.stdout), "ping", "{}", text(&out.stderr));
    let out = s.forward(&cfg, "node2", other);
    assert!(
        text(&out.stderr).contains("stdio forwarding failed"),
        "{}",
        text(&out.stderr)
    );
    // node1 keeps OpenSSH's default: anywhere.
    let out = s.forward(&cfg, "node1", other);
    assert_eq!(text(&out.stdout), "ping", "{}", text(&out.stderr));
    let audit = eventually(WAIT, || {
        Some(s.audit()).filter(|a| a.contains("port_forward.refused"))
    })
    .expect("refused forwards are audited");
    assert!(audit.contains("permit_open"), "{audit}");
}

#[test]
fn the_node_holds_a_bounded_number_of_connections_that_have_not_logged_in() {
    use std::net::TcpStream;
    let s = Setup::new();
    let mut local = start_agent(
        &s.proxy,
        &s.dir.join("local"),
        "local",
        &["--ssh-listen", "127.0.0.1:0"],
    );
    let addr = local.wait_for("SSH listening on ").trim().to_string();
    let banner = |c: &mut TcpStream| {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 7];
        c.read_exact(&mut b).ok().map(|_| b)
    };
    // 32 places, as sshd's MaxStartups keeps: each gets a banner and waits for a login.
    let mut held: Vec<TcpStream> = Vec::new();
    for _ in 0..32 {
        let mut c = TcpStream::connect(&addr).unwrap();
        assert_eq!(banner(&mut c), Some(*b"SSH-2.0"));
        held.push(c);
    }
    let mut over = TcpStream::connect(&addr).unwrap();
    assert_eq!(
        banner(&mut over),
        None,
        "a 33rd unauthenticated connection was served"
    );
    drop(held);
    // Places come back, and a real login goes through.
    let cfg = s.config("alice", "known_hosts");
    let (_, port) = addr.rsplit_once(':').unwrap();
    let out = eventually(WAIT, || {
        let out = run_bounded(Command::new("ssh").arg("-F").arg(&cfg).args([
            "-p",
            port,
            "-o",
            "HostKeyAlias=local",
            &format!("{}@127.0.0.1", s.login),
            "echo in",
        ]));
        out.status.success().then_some(out)
    })
    .expect("a login after the places came back");
    assert_eq!(text(&out.stdout), "in\n");
}

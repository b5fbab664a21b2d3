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
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut proxy = Proxy::start(&dir.join("proxy"), &[]);
        let ssh_addr = proxy
            .daemon
            .wait_for("SSH jump host listening on ")
            .trim()
            .to_string();
        let agent = start_agent(&proxy, &dir.join("agent"), "node1", &[]);
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
        let out = self.proxy.ctl(&[
            "auth",
            "sign",
            "--user",
            user,
            "--logins",
            logins,
            "--ttl",
            ttl,
            "--out",
            self.dir.join(out).to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }

    /// An ssh_config using `key` and `known_hosts`; -J passes -F on to the jump's ssh.
    fn config(&self, key: &str, known_hosts: &str) -> PathBuf {
        let path = self.dir.join(format!("ssh_config-{key}-{known_hosts}"));
        std::fs::write(
            &path,
            format!(
                "Host *\n  UserKnownHostsFile {}\n  StrictHostKeyChecking yes\n  BatchMode yes\n  IdentityFile {}\n  IdentitiesOnly yes\n  ConnectTimeout 20\n  ServerAliveInterval 5\n  LogLevel ERROR\n",
                self.dir.join(known_hosts).display(),
                self.dir.join(key).display()
            ),
        )
        .unwrap();
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

/// Runs a command with a 60 s limit; a hang fails the test instead of hanging the suite.
fn run_bounded(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let done = eventually(Duration::from_secs(60), || child.try_wait().ok().flatten());
    if done.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    assert!(done.is_some(), "command hung: {}", text(&out.stderr));
    out
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
        .arg("tty; stty size; read line; stty size; exit 5")
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
    std::thread::sleep(Duration::from_millis(500));
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

#[test]
fn refusals_are_clear_and_audited() {
    let s = Setup::new();
    let target = format!("{}@node1", s.login);

    // Login not among the certificate's principals.
    s.sign("mallory", "nobody-here", "1h", "wrong-login");
    let cfg = s.config("wrong-login", "known_hosts");
    s.refused(&cfg, &target, "Permission denied");

    // An expired certificate.
    s.sign("alice", &s.login, "1s", "short");
    std::thread::sleep(Duration::from_millis(2500));
    let cfg = s.config("short", "known_hosts");
    s.refused(&cfg, &target, "Permission denied");

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
fn ambiguous_names_list_host_ids_and_the_local_listener_serves_ssh() {
    let s = Setup::new();
    let cfg = s.config("alice", "known_hosts");
    // A second node with the same name, which also listens for SSH locally.
    let twin_data = s.dir.join("twin");
    let mut twin = start_agent(
        &s.proxy,
        &twin_data,
        "node1",
        &["--ssh-listen", "127.0.0.1:0"],
    );
    let local = twin.wait_for("SSH listening on ").trim().to_string();
    let twin_id = host_id(&twin_data);
    let out = s.ssh_proxycommand(&cfg, &format!("{}@node1", s.login), "true");
    assert_eq!(out.status.code(), Some(255));
    let err = text(&out.stderr);
    assert!(err.contains("several nodes are called \"node1\""), "{err}");
    assert!(err.contains(&s.host_id) && err.contains(&twin_id), "{err}");
    // The host id picks one.
    let out = s.ssh_proxycommand(&cfg, &format!("{}@{twin_id}", s.login), "echo twin");
    assert_eq!(text(&out.stdout), "twin\n", "{}", text(&out.stderr));

    // The local listener: plain ssh, no proxy; the host certificate names the node.
    let (_, port) = local.rsplit_once(':').unwrap();
    let out = run_bounded(Command::new("ssh").arg("-F").arg(&cfg).args([
        "-p",
        port,
        "-o",
        "HostKeyAlias=node1",
        &format!("{}@127.0.0.1", s.login),
        "echo local",
    ]));
    assert_eq!(text(&out.stdout), "local\n", "{}", text(&out.stderr));
}

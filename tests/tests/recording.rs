//! Session recordings: made on the node as asciicast v2, sent over the tunnel, stored by a
//! proxy, listed, exported and replayed with burrowctl, through any proxy of the cluster.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use burrow_tests::*;

/// A terminal session through `user`: `input` typed, line by line, a little apart.
fn typed(user: &SshUser, jump: &str, node: &str, input: &[&str]) -> std::process::Child {
    let mut child = user
        .ssh(jump, node, &["-tt"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for line in input {
        stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    // Kept open: the session ends when the shell exits, not at the end of its input.
    child.stdin = Some(stdin);
    child
}

/// Runs `ssh` on a real terminal (80x24) driven by a small Python program: logs in, makes the
/// window 100x30, types its stdin line by line, and prints everything the terminal showed.
const TERMINAL: &str = r#"
import fcntl, os, select, struct, sys, termios, time
master, slave = os.openpty()
def size(rows, cols):
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
size(24, 80)
pid = os.fork()
if pid == 0:
    os.setsid()
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    os.execvp(sys.argv[1], sys.argv[1:])
os.close(slave)
out = b""
def pump(secs):
    global out
    end = time.time() + secs
    while time.time() < end:
        if select.select([master], [], [], 0.1)[0]:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            out += data
pump(3)
size(30, 100)  # the kernel tells ssh (SIGWINCH), ssh tells the node
pump(1)
for line in sys.stdin.read().splitlines():
    os.write(master, line.encode() + b"\n")
    pump(1)
pump(20)
_, status = os.waitpid(pid, 0)
sys.stdout.buffer.write(out)
sys.exit(os.waitstatus_to_exitcode(status))
"#;

/// The stored sessions, once there are `n`.
fn until_sessions(proxy: &Proxy, args: &[&str], n: usize) -> Vec<serde_json::Value> {
    let mut all = vec!["sessions", "ls"];
    all.extend_from_slice(args);
    eventually(WAIT, || {
        let list = proxy.ctl_json(&all)["sessions"].as_array().unwrap().clone();
        (list.len() >= n).then_some(list)
    })
    .unwrap_or_else(|| panic!("never {n} sessions: {}", text(&proxy.ctl(&all).stdout)))
}

/// Checks `cast` is asciicast v2 (a header, then `[time, "o"|"r", data]` in time order) and
/// returns what the terminal showed.
fn shown(cast: &str) -> String {
    let mut lines = cast.lines();
    let header: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(header["version"], 2, "{cast}");
    assert!(header["width"].as_u64().unwrap() > 0 && header["height"].as_u64().unwrap() > 0);
    let mut last = 0.0;
    let mut out = String::new();
    for line in lines {
        let (t, kind, data): (f64, String, String) =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(t >= last, "events in time order: {line}");
        last = t;
        assert!(kind == "o" || kind == "r", "{line}");
        if kind == "o" {
            out.push_str(&data);
        }
    }
    out
}

fn export(proxy: &Proxy, id: &str) -> String {
    let out = proxy.ctl(&["sessions", "export", id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

#[test]
fn a_typed_terminal_session_is_recorded_listed_exported_and_replayed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut proxy = Proxy::start(&dir.join("proxy"), &[]);
    let jump = proxy.ssh_addr();
    let data = dir.join("agent");
    let _agent = start_agent(&proxy, &data, "node1", &["--transport", "tcp"]);
    let user = SshUser::new(&proxy, dir);

    let driver = dir.join("terminal.py");
    std::fs::write(&driver, TERMINAL).unwrap();
    let ssh = user.ssh(&jump, "node1", &["-t"]);
    let mut terminal = Command::new("python3");
    terminal
        .arg(&driver)
        .arg(ssh.get_program())
        .args(ssh.get_args())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = terminal.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"echo typed-$((6*7))\nexit\n")
        .unwrap();
    let out = finish_bounded(child);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("typed-42"),
        "{}",
        text(&out.stdout)
    );

    let list = until_sessions(&proxy, &[], 1);
    let s = &list[0];
    assert_eq!(s["user"], "alice");
    assert_eq!(s["login"], whoami().as_str());
    assert_eq!(s["node"], "node1");
    assert_eq!(s["kind"], "shell");
    assert!(s["ended"].as_u64().unwrap() >= s["started"].as_u64().unwrap());
    let id = s["session_id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 32, "{id}");

    // The file parses as asciicast v2 and holds what the terminal showed.
    let cast = export(&proxy, &id);
    let terminal = shown(&cast);
    assert!(terminal.contains("typed-42"), "{terminal}");
    // The terminal's size, then its change, as the node saw them.
    let header: serde_json::Value = serde_json::from_str(cast.lines().next().unwrap()).unwrap();
    assert_eq!(
        (header["width"].as_u64(), header["height"].as_u64()),
        (Some(80), Some(24))
    );
    assert!(cast.contains(r#","r","100x30"]"#), "{cast}");
    assert_eq!(cast.len() as u64, s["size"].as_u64().unwrap());
    let stored = proxy.data_dir.join(format!("log/sessions/{id}.cast"));
    assert_eq!(std::fs::read_to_string(&stored).unwrap(), cast);
    assert_eq!(mode(&stored), 0o600);
    // Sent: the node keeps no copy.
    eventually(WAIT, || {
        files_in(&data.join("recordings")).is_empty().then_some(())
    })
    .expect("the node's spool empties");

    // Replayed with its timing (fast here).
    let played = proxy.ctl(&["play", &id, "--speed", "50"]);
    assert!(played.status.success(), "{}", text(&played.stderr));
    assert!(text(&played.stdout).contains("typed-42"));
    let text_list = text(&proxy.ctl(&["sessions", "ls"]).stdout);
    assert!(
        text_list.contains(&id) && text_list.contains("alice") && text_list.contains("node1"),
        "{text_list}"
    );

    // A command without a terminal is recorded too; filters pick sessions.
    let out = run_bounded(user.ssh(&jump, "node1", &[]).arg("echo exec-recorded"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list = until_sessions(&proxy, &["--node", "node1", "--user", "alice"], 2);
    let exec = list
        .iter()
        .find(|s| s["kind"] == "exec")
        .expect("the exec session");
    let cast = export(&proxy, exec["session_id"].as_str().unwrap());
    assert!(shown(&cast).contains("exec-recorded"), "{cast}");
    let none = proxy.ctl_json(&["sessions", "ls", "--user", "bob"]);
    assert_eq!(none["sessions"], serde_json::json!([]));
    let missing = proxy.ctl(&["sessions", "export", "00000000000000000000000000000000"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        text(&missing.stderr).contains("no recording has id"),
        "{}",
        text(&missing.stderr)
    );

    // The audit log links the session to its recording.
    let audit = std::fs::read_dir(proxy.data_dir.join("audit"))
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect::<String>();
    assert!(
        audit.contains(&id) && audit.contains("\"recorded\":\"true\""),
        "{audit}"
    );
    let resized = audit.lines().any(|l| {
        let e: serde_json::Value = serde_json::from_str(l).unwrap();
        e["event"] == "resize" && e["size"] == "100x30" && e["session_id"] == id.as_str()
    });
    assert!(resized, "{audit}");
}

#[test]
fn with_session_recording_pty_commands_are_not_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("proxy.yaml"), "session_recording: pty\n").unwrap();
    let config = dir.join("proxy.yaml");
    let mut proxy = Proxy::start(&dir.join("proxy"), &["--config", config.to_str().unwrap()]);
    let jump = proxy.ssh_addr();
    let _agent = start_agent(&proxy, &dir.join("agent"), "node1", &["--transport", "tcp"]);
    let user = SshUser::new(&proxy, dir);
    let out = run_bounded(user.ssh(&jump, "node1", &[]).arg("echo not-recorded"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = finish_bounded(typed(&user, &jump, "node1", &["echo recorded", "exit"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list = until_sessions(&proxy, &[], 1);
    std::thread::sleep(Duration::from_secs(2));
    let list_again = proxy.ctl_json(&["sessions", "ls"])["sessions"].clone();
    assert_eq!(list.len(), 1, "{list_again}");
    assert_eq!(list_again.as_array().unwrap().len(), 1, "{list_again}");
    assert_eq!(list[0]["kind"], "shell");
}

fn etcd_args(etcd: &Etcd, public: &str) -> Vec<String> {
    vec![
        "--storage".into(),
        "etcd".into(),
        "--etcd-endpoint".into(),
        etcd.url.clone(),
        "--public-addr".into(),
        public.into(),
    ]
}

#[test]
fn a_recording_survives_its_proxys_death_and_any_proxy_plays_any_recording() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let etcd = Etcd::start(dir);
    let addrs: Vec<String> = (0..2)
        .map(|_| format!("127.0.0.1:{}", closed_port()))
        .collect();
    let lb = Haproxy::start(dir, &addrs.iter().map(String::as_str).collect::<Vec<_>>());
    let args = etcd_args(&etcd, &lb.addr);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let start = |i: usize| Proxy::start_at(&dir.join(format!("proxy{i}")), &addrs[i], &args);
    let mut a = start(0);
    let b = start(1);
    let (a_id, b_id) = (a.ready().unwrap(), b.ready().unwrap());
    // Joined through the balancer once its health checks reach both proxies.
    wait_balanced(&lb.addr, 2);
    let jump_a = a.ssh_addr();
    let data = dir.join("agent");
    let agent = start_agent_via(&a, &lb.addr, &data, "node1", &["--transport", "tcp"]);
    let host = host_id(&data);
    let both = [a_id.clone(), b_id.clone()].into_iter().collect();
    eventually(WAIT, || (tunnels_of(&b, &host) == both).then_some(()))
        .expect("a tunnel to each proxy");
    let user = SshUser::new(&a, dir);

    // A session through proxy A, which dies in the middle of it: the user's connection goes with
    // it, the node's recording of it all is sent to B.
    let session = typed(&user, &jump_a, "node1", &["echo before-$((1+1))"]);
    std::thread::sleep(Duration::from_secs(2));
    a.daemon.kill();
    let out = finish_bounded(session);
    assert!(
        text(&out.stdout).contains("before-2"),
        "{}",
        text(&out.stdout)
    );
    let list = eventually(WAIT, || {
        let list = b.ctl_json(&["sessions", "ls"])["sessions"]
            .as_array()
            .unwrap()
            .clone();
        (!list.is_empty()).then_some(list)
    })
    .unwrap_or_else(|| {
        panic!(
            "not at B; the agent:\n{}\nB:\n{}",
            agent.log(),
            b.daemon.log()
        )
    });
    assert_eq!(list[0]["proxy_id"], b_id.as_str());
    let first = list[0]["session_id"].as_str().unwrap().to_string();
    assert!(shown(&export(&b, &first)).contains("before-2"));

    // A comes back; a session through it is stored there, and played through B.
    let mut a = start(0);
    let jump_a = a.ssh_addr();
    // (The presence A wrote before it died may linger: A's own log says when it holds one.)
    a.daemon.wait_for("tunnel up");
    let out = run_bounded(user.ssh(&jump_a, "node1", &[]).arg("echo stored-on-a"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list = until_sessions(&b, &[], 2);
    let second = list
        .iter()
        .find(|s| s["session_id"] != first.as_str())
        .unwrap();
    assert_eq!(second["proxy_id"], a_id.as_str());
    let id = second["session_id"].as_str().unwrap();
    let via_b = export(&b, id);
    assert_eq!(via_b, export(&a, id));
    assert!(shown(&via_b).contains("stored-on-a"));
    let played = b.ctl(&["play", id, "--speed", "50"]);
    assert!(text(&played.stdout).contains("stored-on-a"));
    assert!(!b.data_dir.join(format!("log/sessions/{id}.cast")).exists());

    // With its holder down, a recording says where it is.
    drop(a);
    let out = b.ctl(&["sessions", "export", id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(&format!("held by proxy {a_id}")),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn file_transfers_are_audited_with_their_paths_and_are_not_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut proxy = Proxy::start(&dir.join("proxy"), &[]);
    let jump = proxy.ssh_addr();
    let _agent = start_agent(&proxy, &dir.join("agent"), "node1", &["--transport", "tcp"]);
    let user = SshUser::new(&proxy, dir);
    let src = dir.join("src.txt");
    std::fs::write(&src, "transfer me\n").unwrap();
    let (by_scp, by_sftp) = (dir.join("by-scp"), dir.join("by-sftp"));
    let scp = |from: &str, to: &str| {
        let out = run_bounded(
            Command::new("scp")
                .arg("-O")
                .arg("-F")
                .arg(&user.config)
                .args(["-J", &format!("alice@{jump}"), "-P", "3022", from, to]),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    };
    // Legacy scp: an upload to the node, a download from it.
    let remote = format!("node1:{}", by_scp.display());
    scp(src.to_str().unwrap(), &remote);
    scp(&remote, dir.join("scp-back").to_str().unwrap());
    // SFTP: put, get, rename, remove.
    let batch = format!(
        "put {src} {up}\nget {up} {back}\nrename {up} {up}.2\nrm {up}.2\n",
        src = src.display(),
        up = by_sftp.display(),
        back = dir.join("sftp-back").display(),
    );
    let mut sftp = Command::new("sftp");
    sftp.arg("-F")
        .arg(&user.config)
        .args([
            "-J",
            &format!("alice@{jump}"),
            "-P",
            "3022",
            "-b",
            "-",
            "node1",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = sftp.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(batch.as_bytes())
        .unwrap();
    let out = finish_bounded(child);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read_to_string(dir.join("sftp-back")).unwrap(),
        "transfer me\n"
    );

    let audit_dir = proxy.data_dir.join("audit");
    let events = |name: &str| -> Vec<serde_json::Value> {
        std::fs::read_dir(&audit_dir)
            .unwrap()
            .flatten()
            .flat_map(|e| {
                std::fs::read_to_string(e.path())
                    .unwrap()
                    .lines()
                    .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                    .collect::<Vec<_>>()
            })
            .filter(|e| e["event"] == name)
            .collect()
    };
    let wanted = |e: &serde_json::Value, key: &str, value: &str, path: &Path| {
        e[key] == value && e["path"] == path.to_str().unwrap() && e["session_id"].is_string()
    };
    eventually(WAIT, || {
        let scps = events("scp");
        let sftps = events("sftp");
        let up = dir.join("by-sftp");
        (scps
            .iter()
            .any(|e| wanted(e, "direction", "upload", &by_scp))
            && scps
                .iter()
                .any(|e| wanted(e, "direction", "download", &by_scp))
            && sftps.iter().any(|e| wanted(e, "operation", "upload", &up))
            && sftps
                .iter()
                .any(|e| wanted(e, "operation", "download", &up))
            && sftps
                .iter()
                .any(|e| e["operation"] == "rename" && e["to"] == format!("{}.2", up.display()))
            && sftps.iter().any(|e| e["operation"] == "remove"))
        .then_some(())
    })
    .unwrap_or_else(|| panic!("scp: {:?}\nsftp: {:?}", events("scp"), events("sftp")));
    // File contents are not recorded as sessions.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        proxy.ctl_json(&["sessions", "ls"])["sessions"],
        serde_json::json!([])
    );
}

//! Plain OpenSSH and Ansible as people already use them: no `-p`, a config block from
//! `burrowctl ssh-config`, an inventory from `nodes ls --format ansible`, and offline nodes told
//! apart from unknown names. Real `ssh`, `scp` and ansible-core throughout.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use burrow_tests::*;

const CLUSTER: &str = "fleet";
const WAIT: Duration = Duration::from_secs(20);

/// A proxy of cluster "fleet", nodes started with labels, and a home directory for the user.
struct Fleet {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    home: PathBuf,
    proxy: Proxy,
    agents: Vec<Daemon>,
    ssh_addr: String,
    login: String,
}

impl Fleet {
    fn start(nodes: &[(&str, &str)]) -> Fleet {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut proxy = Proxy::start(&dir.join("proxy"), &["--cluster-name", CLUSTER]);
        let ssh_addr = proxy.ssh_addr();
        let agents = nodes
            .iter()
            .map(|(name, labels)| start_agent(&proxy, &dir.join(name), name, &["--labels", labels]))
            .collect();
        let home = dir.join("home");
        std::fs::create_dir_all(home.join(".ssh")).unwrap();
        let login = text(&Command::new("id").arg("-un").output().unwrap().stdout)
            .trim()
            .to_string();
        Fleet {
            _tmp: tmp,
            dir,
            home,
            proxy,
            agents,
            ssh_addr,
            login,
        }
    }

    /// `burrowctl` as the user whose home is `self.home` runs it.
    fn ctl(&self, args: &[&str]) -> Output {
        let out = bin("burrowctl")
            .arg("--data-dir")
            .arg(&self.proxy.data_dir)
            .args(args)
            .env("HOME", &self.home)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "burrowctl {args:?}: {}",
            text(&out.stderr)
        );
        out
    }

    /// The user's key where `ssh-config` looks for it by default.
    fn sign_default_key(&self) {
        let key = self.home.join(".ssh").join(format!("burrow-{CLUSTER}"));
        self.proxy.sign_user("alice", &self.login, "1h", &key);
    }

    fn host_id(&self, node: &str) -> String {
        host_id(&self.dir.join(node))
    }

    /// A key and a config trusting the host CA everywhere (`auth export`), for the forms that
    /// take no generated config.
    fn hand_written_config(&self) -> PathBuf {
        self.proxy
            .sign_user("alice", &self.login, "1h", &self.dir.join("alice"));
        let known = self.proxy.ctl(&["auth", "export", "--type", "host"]);
        std::fs::write(self.dir.join("known_hosts"), &known.stdout).unwrap();
        let config = self.dir.join("ssh_config");
        write_ssh_config(
            &config,
            &self.dir.join("known_hosts"),
            &self.dir.join("alice"),
        );
        config
    }

    /// `ssh -F config -o ProxyCommand=... ARGS`: the form that shows the proxy's refusals.
    fn ssh_via_proxy_command(&self, config: &Path, args: &[&str]) -> Output {
        run(Command::new("ssh")
            .arg("-F")
            .arg(config)
            .args(["-o", &self.proxy_command(config)])
            .args(args))
    }

    fn proxy_command(&self, config: &Path) -> String {
        let (host, port) = self.ssh_addr.rsplit_once(':').unwrap();
        format!(
            "ProxyCommand=ssh -F {} -p {port} alice@{host} -s proxy:%h:%p",
            config.display()
        )
    }
}

/// Runs a command with stdin closed, for at most 120 s (Ansible runs on three nodes).
fn run(cmd: &mut Command) -> Output {
    run_within(Duration::from_secs(120), cmd)
}

fn said(out: &Output, stdout: &str) {
    assert_eq!(
        (out.status.code(), text(&out.stdout).as_str()),
        (Some(0), stdout),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn ssh_needs_no_p_through_the_jump_host_or_a_proxycommand_and_other_ports_are_refused() {
    let f = Fleet::start(&[("node1", "env=lab")]);
    let config = f.hand_written_config();
    let (host, port) = f.ssh_addr.rsplit_once(':').unwrap();
    let target = format!("{}@node1", f.login);
    let out = run(Command::new("ssh").arg("-F").arg(&config).args([
        "-J",
        &format!("alice@{host}:{port}"),
        &target,
        "echo jump",
    ]));
    said(&out, "jump\n");
    let out = f.ssh_via_proxy_command(&config, &[&target, "echo proxycommand"]);
    said(&out, "proxycommand\n");
    // Another port is not the node's SSH service: the user is told so.
    let out = f.ssh_via_proxy_command(&config, &["-p", "80", &target, "true"]);
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("serves SSH only, on port 22 or 3022, not 80"),
        "{}",
        text(&out.stderr)
    );
}

/// `burrowctl ssh-config` asks for AES-GCM on the hop to the proxy where the client has AES
/// instructions: each cipher it names works on the hop to the proxy and to the node inside it,
/// whatever this machine's CPU.
#[test]
fn every_cipher_the_generated_config_names_reaches_a_node() {
    let f = Fleet::start(&[("node1", "env=lab")]);
    let config = f.hand_written_config();
    let (host, port) = f.ssh_addr.rsplit_once(':').unwrap();
    let target = format!("{}@node1", f.login);
    for cipher in [
        "aes128-gcm@openssh.com",
        "aes256-gcm@openssh.com",
        "chacha20-poly1305@openssh.com",
    ] {
        let hop = format!(
            "ProxyCommand=ssh -F {} -c {cipher} -p {port} alice@{host} -s proxy:%h:%p",
            config.display()
        );
        let out = run(Command::new("ssh")
            .arg("-F")
            .arg(&config)
            .args(["-o", &hop, "-c", cipher, &target, "echo", cipher]));
        said(&out, &format!("{cipher}\n"));
    }
}

#[test]
fn a_generated_config_takes_ssh_and_scp_to_nodes_by_name_and_host_id() {
    let f = Fleet::start(&[("node1", "env=lab")]);
    f.sign_default_key();
    let block = f.ctl(&["ssh-config", "--user", &f.login]);
    let config = f.dir.join("generated_config");
    std::fs::write(&config, &block.stdout).unwrap();
    let known = std::fs::read_to_string(
        f.home
            .join(".ssh")
            .join(format!("burrow-{CLUSTER}_known_hosts")),
    )
    .unwrap();
    assert!(
        known.contains(&format!("@cert-authority *.{CLUSTER},")),
        "{known}"
    );
    // Nothing but the generated block: no -J, no -p, no key, no known_hosts line by hand.
    let ssh = |target: &str, command: &str| {
        run(Command::new("ssh").arg("-F").arg(&config).args([
            "-o",
            "BatchMode=yes",
            target,
            command,
        ]))
    };
    said(
        &ssh(&format!("node1.{CLUSTER}"), "echo by-name"),
        "by-name\n",
    );
    // Where this machine has AES instructions the block asks for AES-GCM on the hop to the proxy
    // only: the session to the node keeps OpenSSH's first choice.
    if text(&block.stdout).contains("Ciphers aes128-gcm@openssh.com,") {
        let out = run(Command::new("ssh").arg("-F").arg(&config).args([
            "-v",
            "-o",
            "BatchMode=yes",
            &format!("node1.{CLUSTER}"),
            "true",
        ]));
        let log = text(&out.stderr);
        let ciphers: Vec<_> = log
            .lines()
            .filter_map(|l| l.split_once("client->server cipher: "))
            .map(|(_, rest)| rest.split(' ').next().unwrap_or(""))
            .collect();
        assert_eq!(
            ciphers,
            ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"],
            "{log}"
        );
    }
    let by_id = format!("{}.{CLUSTER}", f.host_id("node1"));
    said(&ssh(&by_id, "whoami"), &format!("{}\n", f.login));

    // Scoped to a group of devices: the block names its nodes, and still takes ssh there.
    let scoped = f.ctl(&["ssh-config", "--user", &f.login, "--query", "env=lab"]);
    let scoped_text = text(&scoped.stdout);
    assert!(
        scoped_text.contains(&format!("Host node1.{CLUSTER} {by_id} "))
            && !scoped_text.contains('*'),
        "{scoped_text}"
    );
    let scoped_config = f.dir.join("scoped_config");
    std::fs::write(&scoped_config, &scoped.stdout).unwrap();
    let out = run(Command::new("ssh").arg("-F").arg(&scoped_config).args([
        "-o",
        "BatchMode=yes",
        &format!("node1.{CLUSTER}"),
        "echo scoped",
    ]));
    said(&out, "scoped\n");

    let original = f.dir.join("original");
    std::fs::write(&original, b"carried by scp\n").unwrap();
    let copied = f.dir.join("copied");
    let out = run(Command::new("scp")
        .arg("-F")
        .arg(&config)
        .args(["-o", "BatchMode=yes"])
        .arg(&original)
        .arg(format!("node1.{CLUSTER}:{}", copied.display())));
    said(&out, "");
    assert_eq!(std::fs::read(&copied).unwrap(), b"carried by scp\n");
}

#[test]
fn offline_nodes_say_since_when_and_unknown_names_stay_unknown() {
    let mut f = Fleet::start(&[("node1", "env=lab,site=a"), ("node2", "env=prod,site=b")]);
    let config = f.hand_written_config();
    f.agents[1].stop();
    let node2 = f.host_id("node2");
    let listed = eventually(WAIT, || {
        let all = f.proxy.ctl_json(&["nodes", "ls"]);
        let offline = all["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["host_id"] == node2.as_str() && n["state"] == "offline")?
            .clone();
        Some((all, offline))
    });
    let (all, offline) = listed.expect("node2 is listed offline once it stopped");
    assert!(offline["last_seen"].as_str().unwrap().ends_with('Z'));
    assert_eq!(offline["proxies"], serde_json::json!([]));
    let online: Vec<_> = all["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["state"] == "online")
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(online, ["node1"]);
    let table = text(&f.ctl(&["nodes", "ls"]).stdout);
    let row = table.lines().find(|l| l.starts_with("node2")).unwrap();
    assert!(row.contains("offline"), "{table}");

    for target in ["node2".to_string(), node2.clone()] {
        let out = f.ssh_via_proxy_command(&config, &[&format!("{}@{target}", f.login), "true"]);
        assert_eq!(out.status.code(), Some(255));
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!("node {target:?} is offline since ")),
            "{err}"
        );
    }
    let out = f.ssh_via_proxy_command(&config, &[&format!("{}@node3", f.login), "true"]);
    assert!(
        text(&out.stderr).contains("no node is called \"node3\""),
        "{}",
        text(&out.stderr)
    );

    // Label queries.
    let names = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["nodes", "ls"];
        all.extend_from_slice(args);
        f.proxy.ctl_json(&all)["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&["--query", "env=lab"]), ["node1"]);
    assert_eq!(names(&["--query", "site!=a"]), ["node2"]);
    assert_eq!(
        names(&["--query", "env=prod,site!=b"]),
        Vec::<String>::new()
    );
    assert_eq!(
        names(&["--labels", "site=a", "--query", "env!=prod"]),
        ["node1"]
    );
    let bad = f.proxy.ctl(&["nodes", "ls", "--query", "env"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        text(&bad.stderr).contains("is not KEY=VALUE or KEY!=VALUE"),
        "{}",
        text(&bad.stderr)
    );
}

/// ansible-core from PyPI, where `scripts/install-deps.sh` puts it.
fn ansible(program: &str) -> Command {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/tools/ansible/bin")
        .join(program);
    assert!(
        path.exists(),
        "{} is missing: run ./scripts/install-deps.sh",
        path.display()
    );
    Command::new(path)
}

#[test]
fn ansible_pings_three_nodes_and_runs_a_playbook_through_the_proxy() {
    let f = Fleet::start(&[
        ("node1", "env=lab"),
        ("node2", "env=lab"),
        ("node3", "env=lab,role=db"),
    ]);
    f.sign_default_key();
    let inventory = f.dir.join("inventory.json");
    let out = f.ctl(&["nodes", "ls", "--format", "ansible", "--user", &f.login]);
    std::fs::write(&inventory, &out.stdout).unwrap();
    let env = |cmd: &mut Command| {
        cmd.env("HOME", &f.home)
            .env("ANSIBLE_PYTHON_INTERPRETER", "/usr/bin/python3")
            .env("ANSIBLE_REMOTE_TMP", f.dir.join("remote-tmp"))
            .env("ANSIBLE_LOCAL_TEMP", f.dir.join("local-tmp"))
            .env("ANSIBLE_NOCOLOR", "1");
    };
    let mut ping = ansible("ansible");
    ping.arg("-i")
        .arg(&inventory)
        .args(["env_lab", "-m", "ping"]);
    env(&mut ping);
    let out = run(&mut ping);
    let printed = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{printed}{}", text(&out.stderr));
    for node in ["node1", "node2", "node3"] {
        assert!(printed.contains(&format!("{node} | SUCCESS")), "{printed}");
    }

    let playbook = f.dir.join("play.yml");
    let copied = f.dir.join("copied");
    std::fs::write(
        &playbook,
        format!(
            "- hosts: role_db\n  gather_facts: false\n  tasks:\n\
             \x20   - copy: {{ content: \"from ansible\\n\", dest: \"{0}-{{{{ inventory_hostname }}}}\" }}\n\
             \x20   - command: cat {0}-{{{{ inventory_hostname }}}}\n      register: out\n\
             \x20   - assert: {{ that: 'out.stdout == \"from ansible\"' }}\n",
            copied.display()
        ),
    )
    .unwrap();
    let mut play = ansible("ansible-playbook");
    play.arg("-i").arg(&inventory).arg(&playbook);
    env(&mut play);
    let out = run(&mut play);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(f.dir.join("copied-node3")).unwrap(),
        "from ansible\n"
    );
    assert!(!f.dir.join("copied-node1").exists());
}

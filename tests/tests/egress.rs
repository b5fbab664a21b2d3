//! A node whose only way out is an HTTP proxy: a real squid that allows only `CONNECT` to the
//! cluster's port, one port open and one asking for credentials. The cluster's name resolves in
//! squid's hosts file only, so the agent cannot reach it directly: everything it does goes through
//! squid or fails.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use burrow_tests::*;

const NAME: &str = "burrow-proxy.test";

struct Squid {
    _daemon: Daemon,
    dir: PathBuf,
    /// CONNECT without credentials.
    open: u16,
    /// CONNECT with alice:s3cret only.
    authed: u16,
}

impl Squid {
    /// A squid that lets CONNECT through to `NAME:port` and nothing else.
    fn start(dir: &Path, port: u16) -> Squid {
        let dir = dir.join("squid");
        std::fs::create_dir_all(&dir).unwrap();
        // Squid drops to its own user: it must reach and write its files.
        for d in [dir.parent().unwrap(), &dir] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let (open, authed) = (closed_port(), closed_port());
        std::fs::write(dir.join("hosts"), format!("127.0.0.1 {NAME}\n")).unwrap();
        let hash = run_bounded(Command::new("openssl").args(["passwd", "-apr1", "s3cret"]));
        assert!(hash.status.success(), "{}", text(&hash.stderr));
        std::fs::write(dir.join("passwd"), format!("alice:{}", text(&hash.stdout))).unwrap();
        let d = dir.display();
        std::fs::write(
            dir.join("squid.conf"),
            format!(
                "http_port 127.0.0.1:{open} name=open\n\
                 http_port 127.0.0.1:{authed} name=authed\n\
                 pid_filename none\n\
                 cache_log stdio:{d}/cache.log\n\
                 access_log stdio:{d}/access.log\n\
                 cache deny all\n\
                 coredump_dir {d}\n\
                 hosts_file {d}/hosts\n\
                 auth_param basic program /usr/lib/squid/basic_ncsa_auth {d}/passwd\n\
                 auth_param basic realm burrow-test\n\
                 acl authport myportname authed\n\
                 acl authed proxy_auth REQUIRED\n\
                 acl CONNECT method CONNECT\n\
                 acl burrow_port port {port}\n\
                 acl burrow_host dstdomain {NAME}\n\
                 http_access deny !CONNECT\n\
                 http_access deny !burrow_port\n\
                 http_access deny authport !authed\n\
                 http_access allow burrow_host\n\
                 http_access deny all\n"
            ),
        )
        .unwrap();
        let mut cmd = Command::new("squid");
        cmd.arg("-N").arg("-f").arg(dir.join("squid.conf"));
        let daemon = Daemon::spawn(cmd, "squid");
        for p in [open, authed] {
            eventually(WAIT, || std::net::TcpStream::connect(("127.0.0.1", p)).ok())
                .unwrap_or_else(|| panic!("squid never listened on {p}"));
        }
        Squid {
            _daemon: daemon,
            dir,
            open,
            authed,
        }
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }
}

/// `burrow-agent start` for the cluster at `NAME:port`, with `env` set.
fn agent(port: u16, data: &Path, args: &[&str], env: &[(&str, String)]) -> Command {
    let mut cmd = bin("burrow-agent");
    cmd.args(["start", "--proxy", &format!("{NAME}:{port}"), "--data-dir"])
        .arg(data)
        .args(args)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("NO_PROXY")
        .env_remove("no_proxy");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

#[test]
fn an_agent_behind_an_http_proxy_joins_tunnels_and_serves_ssh_through_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let port = closed_port();
    let public = format!("{NAME}:{port}");
    let mut proxy = Proxy::start_at(
        &dir.join("proxy"),
        &format!("127.0.0.1:{port}"),
        &["--public-addr", &public],
    );
    let jump = proxy.ssh_addr();
    let squid = Squid::start(dir, port);
    let pin = proxy.pin();
    let joining = |name: &str| -> Vec<String> {
        let token = proxy.node_token(&[]);
        ["--ca-pin", &pin, "--token", &token, "--nodename", name]
            .map(str::to_string)
            .to_vec()
    };

    // Directly, the cluster cannot be reached from here.
    let args = joining("direct");
    let direct: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_bounded(&mut agent(port, &dir.join("direct"), &direct, &[]));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));

    // Through squid (HTTPS_PROXY, the usual way): joined, tunnel up over TCP, SSH works.
    let args = joining("node1");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let via = format!("http://127.0.0.1:{}", squid.open);
    let mut node = Daemon::spawn(
        agent(
            port,
            &dir.join("node1"),
            &args,
            &[("HTTPS_PROXY", via.clone())],
        ),
        "burrow-agent",
    );
    node.wait_for("tunnel up");
    let log = node.log();
    assert!(
        log.contains(&format!("egress_proxy={via} from=\"HTTPS_PROXY\""))
            && log.contains("tunnels go over TCP through the egress proxy")
            && !log.contains("QUIC"),
        "{log}"
    );
    assert!(proxy.daemon.log().contains("node=node1 transport=tcp"));
    let access = squid.access_log();
    assert!(
        access.contains("TCP_TUNNEL/200") && access.contains(&format!("CONNECT {public}")),
        "{access}"
    );
    let user = SshUser::new(&proxy, dir);
    assert_eq!(
        user.echo(&jump, "node1", "through-squid"),
        "through-squid\n"
    );

    // A CONNECT squid refuses (another port) is one clear error naming the egress proxy.
    let args = joining("refused");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let other = closed_port();
    let out = run_bounded(&mut agent(
        other,
        &dir.join("refused"),
        &args,
        &[("HTTPS_PROXY", via.clone())],
    ));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(&format!(
            "the egress proxy {via} refused CONNECT to {NAME}:{other}: HTTP/1.1 403 Forbidden"
        )),
        "{}",
        text(&out.stderr)
    );

    // The port that wants credentials: without them, told so; with them (egress_proxy in the
    // config), joined, and the password is in no log line.
    let auth_via = format!("http://127.0.0.1:{}", squid.authed);
    let args = joining("authed");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_bounded(&mut agent(
        port,
        &dir.join("authed"),
        &args,
        &[("https_proxy", auth_via.clone())],
    ));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr)
            .contains("407 Proxy Authentication Required: give credentials as egress_proxy"),
        "{}",
        text(&out.stderr)
    );
    let config = dir.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "egress_proxy: http://alice:s3cret@127.0.0.1:{}\n",
            squid.authed
        ),
    )
    .unwrap();
    let mut with_config: Vec<&str> = args.clone();
    with_config.extend(["--config", config.to_str().unwrap()]);
    let mut authed = Daemon::spawn(
        agent(
            port,
            &dir.join("authed"),
            &with_config,
            &[("HTTPS_PROXY", via.clone())],
        ),
        "burrow-agent",
    );
    authed.wait_for("tunnel up");
    let log = authed.log();
    assert!(
        log.contains(&format!("egress_proxy={auth_via} from=\"egress_proxy\"")),
        "{log}"
    );
    assert!(!log.contains("s3cret"), "{log}");
    assert!(squid.access_log().contains(" alice "), "squid saw the user");

    // QUIC cannot go through an HTTP proxy: asking for it is a configuration error.
    let out = run_bounded(&mut agent(
        port,
        &dir.join("quic"),
        &["--transport", "quic", "--nodename", "quic"],
        &[("HTTPS_PROXY", via)],
    ));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("transport quic cannot go through the egress proxy"),
        "{}",
        text(&out.stderr)
    );
}

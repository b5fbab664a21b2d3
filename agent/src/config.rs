//! Agent configuration: command-line flags over a YAML file over defaults, parsed into a
//! validated [`AgentConfig`].

use std::path::{Path, PathBuf};

use burrow_tunnel::{Keepalive, Window};
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use tunnel_proto::api::Labels;
use tunnel_proto::pin::CaPin;

use crate::labels::{self, CommandLabel};
use crate::pool::TransportMode;

pub const DEFAULT_DATA_DIR: &str = "/var/lib/burrow";
/// The token file looked for in the data dir when no token is given, so that an image can be
/// flashed with just that file.
pub const DEFAULT_TOKEN_FILE: &str = "token";

#[derive(Debug, Parser)]
#[command(
    name = "burrow-agent",
    version,
    about = "Burrow node agent: joins a cluster with a token and serves SSH through reverse tunnels"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the agent: join the cluster on first start, then run from the stored identity.
    Start(Box<StartArgs>),
    /// Show the node's identity and the running agent's tunnels and last error.
    Status(StatusArgs),
    /// Print a commented sample YAML configuration.
    Configure,
    /// Print the version.
    Version,
}

#[derive(Debug, Args, Default)]
pub struct StartArgs {
    /// YAML config file (see `burrow-agent configure`); flags override its values.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Join token, or the absolute path of a file holding it. Only needed on the first start
    /// [default: DATA_DIR/token if that file exists].
    #[arg(long, value_name = "VALUE_OR_ABS_PATH")]
    pub token: Option<String>,
    /// The proxy's web address (or a load balancer in front of the proxies).
    #[arg(long, value_name = "HOST:PORT")]
    pub proxy: Option<String>,
    /// Pin of the cluster's host CA (sha256:<64 hex>, from `burrowctl status`); repeatable.
    /// Without one the agent cannot verify it joins the right cluster.
    #[arg(long = "ca-pin", value_name = "PIN")]
    pub ca_pins: Vec<String>,
    /// Where the node's identity is kept [default: /var/lib/burrow].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The node's name, used in `ssh login@NAME` [default: this host's name].
    #[arg(long, value_name = "NAME")]
    pub nodename: Option<String>,
    /// Node labels: static k=v, and command labels k=[PERIOD:COMMAND ARGS] re-run every period
    /// (e.g. env=prod,kernel=[1h:uname -r]). Replaces the config's labels and commands.
    #[arg(long, value_name = "K=V,K=[PERIOD:CMD ARGS],...")]
    pub labels: Option<String>,
    /// Also serve SSH on a local address (e.g. 0.0.0.0:3022), or "off" [default: off: SSH only
    /// through the tunnels].
    #[arg(long, value_name = "ADDR|off")]
    pub ssh_listen: Option<String>,
    /// Serve /metrics (Prometheus), /healthz and /readyz over plain HTTP on this address (e.g.
    /// 127.0.0.1:3082), or "off" [default: off].
    #[arg(long, value_name = "ADDR|off")]
    pub diag_listen: Option<String>,
    /// Tunnel transport: auto tries QUIC, falls back to TLS over TCP when UDP is blocked and to an
    /// HTTP upgrade on the web address when a balancer terminates TLS, and moves back up.
    #[arg(long, value_enum, value_name = "MODE")]
    pub transport: Option<TransportMode>,
    /// How often an idle tunnel sends a keep-alive (e.g. 25s, 2m; 5s to 30m): shorter than the
    /// NAT's idle timeout. A dead proxy is noticed within twice this plus 10s over QUIC, this
    /// plus 20s over TCP [default: 25s over QUIC, 40s over TCP: a minute either way].
    #[arg(long, value_name = "DURATION")]
    pub keepalive: Option<String>,
    /// How much one stream of a QUIC tunnel may have in flight towards this node (e.g. 512KiB,
    /// 4MiB; 64KiB to 16MiB); the tunnel as a whole, four times that. More is only faster on a
    /// link whose bandwidth times round trip is larger [default: 2MiB, OpenSSH's channel window].
    #[arg(long, value_name = "SIZE")]
    pub window: Option<String>,
    /// Go out through this HTTP proxy with CONNECT (http://[user:password@]host:port), or "off"
    /// [default: $HTTPS_PROXY / $https_proxy, with $NO_PROXY; none]. Tunnels then use TCP.
    #[arg(long, value_name = "URL|off")]
    pub egress_proxy: Option<String>,
    /// Do not verify the proxy's web certificate when joining (development only: a token can be
    /// stolen by whoever answers at the proxy's address).
    #[arg(long)]
    pub insecure: bool,
    /// Also accept a proxy whose web certificate is from public PKI (the system's roots) under
    /// the name dialed. Off by default: the cluster's (pinned) host CA is the only trust root.
    #[arg(long)]
    pub trust_public_web_cert: bool,
    /// Log at debug level.
    #[arg(long)]
    pub debug: bool,
}

#[derive(Debug, Args, Default)]
pub struct StatusArgs {
    /// The agent's data dir [default: the config's data_dir, else /var/lib/burrow].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The agent's YAML config file, to find its data dir.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Format {
    #[default]
    Text,
    Json,
}

impl StatusArgs {
    /// The data dir: the flag, else the config file's, else the default.
    pub fn data_dir(&self) -> Result<PathBuf, ConfigError> {
        if let Some(dir) = &self.data_dir {
            return Ok(dir.clone());
        }
        let from_file = match &self.config {
            Some(path) => read_file_config(path)?.data_dir,
            None => None,
        };
        Ok(from_file.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)))
    }
}

/// The YAML file, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub token: Option<String>,
    pub proxy: Option<String>,
    #[serde(default)]
    pub ca_pin: Vec<String>,
    pub nodename: Option<String>,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub commands: Vec<CommandLabel>,
    pub transport: Option<TransportMode>,
    pub keepalive: Option<String>,
    pub window: Option<String>,
    pub ssh_listen: Option<String>,
    pub diag_listen: Option<String>,
    pub egress_proxy: Option<String>,
    /// Where `ssh -L` may connect from this node (sshd's PermitOpen).
    #[serde(default)]
    pub permit_open: Vec<String>,
    #[serde(default)]
    pub insecure: bool,
    #[serde(default)]
    pub trust_public_web_cert: bool,
    #[serde(default)]
    pub debug: bool,
}

/// Where the join token comes from; read only when the agent has to join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// A value or an absolute path given by flag or config.
    Given(String),
    /// Nothing given: `DATA_DIR/token`, if it exists at join time.
    DefaultFile(PathBuf),
}

/// The validated configuration the agent runs with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    pub token: TokenSource,
    pub proxy: String,
    pub ca_pins: Vec<CaPin>,
    pub nodename: String,
    pub labels: Labels,
    pub commands: Vec<CommandLabel>,
    pub transport: TransportMode,
    /// `None`: each transport's default.
    pub keepalive: Option<Keepalive>,
    /// The flow-control window of QUIC tunnels.
    pub window: Window,
    /// A local SSH listener besides the tunnels; `None`: off.
    pub ssh_listen: Option<std::net::SocketAddr>,
    /// Where /metrics, /healthz and /readyz are served; `None`: off.
    pub diag_listen: Option<std::net::SocketAddr>,
    /// Where `direct-tcpip` may connect.
    pub permit_open: crate::ssh::PermitOpen,
    /// The HTTP proxy connections to the cluster go out through, and where that setting came
    /// from (for the log).
    pub egress: Option<(burrow_net::egress::Egress, &'static str)>,
    pub insecure: bool,
    /// Accept a publicly trusted web certificate besides the cluster's CA.
    pub trust_public_web_cert: bool,
    pub debug: bool,
}

pub use burrow_daemon::ConfigError;

impl AgentConfig {
    pub fn load(args: StartArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file_config(path)?,
            None => FileConfig::default(),
        };
        Self::merge(args, file)
    }

    pub fn merge(args: StartArgs, file: FileConfig) -> Result<Self, ConfigError> {
        let data_dir = args
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let token = match args.token.or(file.token) {
            Some(t) => TokenSource::Given(t),
            None => TokenSource::DefaultFile(data_dir.join(DEFAULT_TOKEN_FILE)),
        };
        let proxy = args.proxy.or(file.proxy).ok_or_else(|| {
            ConfigError::new("no proxy address: pass --proxy HOST:PORT or set proxy: in the config")
        })?;
        if burrow_net::web::split_host(&proxy).is_none() {
            return Err(ConfigError::new(format!(
                "proxy address {proxy:?} is not host:port"
            )));
        }
        let pin_texts = if args.ca_pins.is_empty() {
            file.ca_pin
        } else {
            args.ca_pins
        };
        let ca_pins = pin_texts
            .iter()
            .map(|p| {
                p.parse::<CaPin>()
                    .map_err(|e| ConfigError::new(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let nodename = match args.nodename.or(file.nodename) {
            Some(n) => n,
            // Hostnames are case-insensitive; node names are lowercase.
            None => burrow_daemon::hostname()
                .map(|h| h.to_ascii_lowercase())
                .ok_or_else(|| ConfigError::new("cannot read this host's name: pass --nodename"))?,
        };
        // Checked when the node joins (lib.rs): a node that joined under an older, looser rule
        // keeps starting from its identity.
        let (labels, commands) = match args.labels {
            Some(spec) => {
                labels::parse(&spec).map_err(|e| ConfigError::new(format!("--labels: {e}")))?
            }
            None => {
                let text: Vec<String> = file
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                tunnel_proto::api::parse_labels(&text.join(","))
                    .map_err(|e| ConfigError::new(format!("labels: {e}")))?;
                let commands = file
                    .commands
                    .into_iter()
                    .map(labels::validate)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| ConfigError::new(format!("commands: {e}")))?;
                (file.labels, commands)
            }
        };
        let ssh_listen = match args.ssh_listen.or(file.ssh_listen).as_deref() {
            None | Some("off") => None,
            Some(text) => Some(text.parse().map_err(|_| {
                ConfigError::new(format!(
                    "ssh_listen {text:?} is not an IP:PORT address or off"
                ))
            })?),
        };
        let diag_listen = burrow_daemon::diag::parse_listen(args.diag_listen.or(file.diag_listen))?;
        let permit_open =
            crate::ssh::PermitOpen::parse(&file.permit_open).map_err(ConfigError::new)?;
        let keepalive = args
            .keepalive
            .or(file.keepalive)
            .map(|text| parse_keepalive(&text))
            .transpose()?;
        let window = args
            .window
            .or(file.window)
            .map(|text| parse_window(&text))
            .transpose()?
            .unwrap_or_default();
        let egress = egress_from(args.egress_proxy.or(file.egress_proxy), |name| {
            std::env::var(name).ok()
        })?;
        Ok(Self {
            data_dir,
            token,
            proxy,
            ca_pins,
            nodename,
            labels,
            commands,
            transport: args.transport.or(file.transport).unwrap_or_default(),
            keepalive,
            window,
            ssh_listen,
            diag_listen,
            permit_open,
            egress,
            insecure: args.insecure || file.insecure,
            trust_public_web_cert: args.trust_public_web_cert || file.trust_public_web_cert,
            debug: args.debug || file.debug,
        })
    }
}

/// The egress proxy: the setting (`off`: none, whatever the environment says), else
/// `HTTPS_PROXY` (or `https_proxy`) with `NO_PROXY` (or `no_proxy`) from `env`.
fn egress_from(
    setting: Option<String>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<(burrow_net::egress::Egress, &'static str)>, ConfigError> {
    let first = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| env(n).filter(|v| !v.trim().is_empty()))
    };
    let no_proxy = first(&["NO_PROXY", "no_proxy"]).unwrap_or_default();
    let (url, from) = match setting.as_deref().map(str::trim) {
        Some("off") => return Ok(None),
        Some(url) if !url.is_empty() => (url.to_string(), "egress_proxy"),
        _ => match first(&["HTTPS_PROXY", "https_proxy"]) {
            Some(url) => (url, "HTTPS_PROXY"),
            None => return Ok(None),
        },
    };
    burrow_net::egress::Egress::parse(&url, &no_proxy)
        .map(|e| Some((e, from)))
        .map_err(ConfigError::new)
}

fn parse_keepalive(text: &str) -> Result<Keepalive, ConfigError> {
    let fail = |why: String| ConfigError::new(format!("keepalive {text:?}: {why}"));
    let interval = humantime::parse_duration(text).map_err(|e| fail(e.to_string()))?;
    Keepalive::new(interval).map_err(|e| fail(e.to_string()))
}

/// A size in bytes, KiB or MiB ("65536", "512KiB", "4MiB"; "K" and "M" are read as KiB and MiB).
fn parse_window(text: &str) -> Result<Window, ConfigError> {
    let fail = |why: &dyn std::fmt::Display| ConfigError::new(format!("window {text:?}: {why}"));
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1024,
        "m" | "mib" => 1024 * 1024,
        _ => return Err(fail(&"expected a size such as 512KiB or 2MiB")),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| fail(&"expected a size such as 512KiB or 2MiB"))?;
    Window::new(n.saturating_mul(scale)).map_err(|e| fail(&e))
}

pub fn read_file_config(path: &Path) -> Result<FileConfig, ConfigError> {
    burrow_daemon::read_yaml_config(path)
}

pub const SAMPLE_CONFIG: &str = r#"# burrow-agent configuration (YAML). Flags given to `burrow-agent start` override these values;
# unknown keys are an error.

# Where the node's identity (keys and certificates) is kept, mode 0700.
data_dir: /var/lib/burrow

# The join token, or the absolute path of a file holding it. Only used on the first start;
# afterwards the agent runs from its identity. Default: DATA_DIR/token, if that file exists.
#token: /var/lib/burrow/token

# The proxy's web address, or a load balancer in front of the proxies.
proxy: proxy.example.com:3080

# Pins of the cluster's host CA, from `burrowctl status`. Without one the agent cannot verify
# it joins the right cluster, and says so loudly.
#ca_pin:
#  - "sha256:0000000000000000000000000000000000000000000000000000000000000000"

# The node's name, used in `ssh login@NAME`. Default: this host's name.
#nodename: edge-01

# Static labels of this node, shown by `burrowctl nodes ls`.
#labels:
#  env: prod
#  site: lab

# Command labels: the trimmed output of a command, re-run every period (no shell involved).
#commands:
#  - name: kernel
#    command: ["uname", "-r"]
#    period: 1h

# Tunnel transport: auto (QUIC, falling back to TLS over TCP when UDP is blocked, and to an HTTP
# upgrade on the web address behind a balancer that terminates TLS), quic, tcp or upgrade.
transport: auto

# How often an idle tunnel sends a keep-alive, 5s to 30m: keep it under the idle timeout of the
# NAT in front of this node. A dead proxy or path is noticed within twice this plus 10s over
# QUIC, this plus 20s over TCP. Each costs about 120 bytes with its answer, per proxy: 25s is
# about 17 KB an hour over QUIC. Default: 25s over QUIC (NATs forget UDP after about 30s), 40s
# over TCP; a dead proxy is noticed within a minute either way.
#keepalive: 25s

# How much one stream of a QUIC tunnel may have in flight towards this node (64KiB to 16MiB);
# the tunnel as a whole, four times that. It bounds what the node may have to buffer; more is
# only faster where bandwidth times round trip is larger (2MiB carries 160 Mbit/s at 100 ms).
# Default: 2MiB, OpenSSH's channel window. TLS + yamux tunnels size their windows themselves.
#window: 2MiB

# Out through an HTTP proxy (CONNECT), for networks whose only way out is one; tunnels then use
# TCP. Default: $HTTPS_PROXY (with $NO_PROXY) from the environment (systemd: Environment= or an
# EnvironmentFile); "off" ignores it.
#egress_proxy: http://user:password@proxy.example:3128

# Also serve SSH on a local address, besides the tunnels ("off" by default).
#ssh_listen: 0.0.0.0:3022

# Plain-HTTP diagnostics: /metrics (Prometheus text), /healthz, /readyz (200 while the agent
# holds a tunnel). Off unless set; keep it on loopback.
#diag_listen: 127.0.0.1:3082

# Where `ssh -L` through this node may connect, as sshd's PermitOpen: any (the default), none,
# or a list of HOST:PORT entries where either side may be "*". Certificates issued with
# `burrowctl auth sign --no-port-forwarding` cannot forward at all.
#permit_open:
#  - 127.0.0.1:8080
#  - "db.lan:*"

# Do not verify the proxy's web certificate when joining. Development only.
insecure: false

# Also accept a proxy whose web certificate comes from public PKI (the system's roots), for a
# proxy configured with https_cert_file. Off: the cluster's pinned host CA is the only root.
trust_public_web_cert: false

# Log at debug level.
debug: false
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<FileConfig, String> {
        serde_norway::from_str(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn sample_config_parses() {
        let cfg = AgentConfig::merge(
            StartArgs {
                nodename: Some("n1".into()),
                ..Default::default()
            },
            parse(SAMPLE_CONFIG).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg.proxy, "proxy.example.com:3080");
        assert_eq!(
            cfg.token,
            TokenSource::DefaultFile(PathBuf::from("/var/lib/burrow/token"))
        );
        assert!(cfg.ca_pins.is_empty());
    }

    #[test]
    fn window_sizes_read_in_bytes_kib_or_mib_from_the_flag_over_the_file() {
        let w = |t: &str| parse_window(t).map(|w| w.stream());
        assert_eq!(w("65536").unwrap(), 65536);
        assert_eq!(w("512KiB").unwrap(), 512 * 1024);
        assert_eq!(w("4 MiB").unwrap(), 4 * 1024 * 1024);
        assert_eq!(w("2m").unwrap(), 2 * 1024 * 1024);
        for bad in ["", "lots", "2GiB", "1.5MiB", "-1", "99999999999999999999"] {
            assert!(w(bad).is_err(), "{bad:?}");
        }
        let e = w("32KiB").unwrap_err().to_string();
        assert_eq!(
            e,
            "window \"32KiB\": 32768 bytes is outside 64 KiB to 16 MiB"
        );
        let file = parse("proxy: a:1\nnodename: n\nwindow: 256KiB\n").unwrap();
        let cfg = AgentConfig::merge(StartArgs::default(), file).unwrap();
        assert_eq!(cfg.window.stream(), 256 * 1024);
        let file = parse("proxy: a:1\nnodename: n\nwindow: 256KiB\n").unwrap();
        let args = StartArgs {
            window: Some("1MiB".into()),
            ..Default::default()
        };
        let cfg = AgentConfig::merge(args, file).unwrap();
        assert_eq!(cfg.window.stream(), 1024 * 1024);
        let cfg = AgentConfig::merge(
            StartArgs::default(),
            parse("proxy: a:1\nnodename: n\n").unwrap(),
        );
        assert_eq!(cfg.unwrap().window, Window::DEFAULT);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let e = parse("proxy: a:1\ntokne: x\n").unwrap_err();
        assert!(e.contains("unknown field `tokne`"), "{e}");
        let bad_pin = StartArgs {
            proxy: Some("a:1".into()),
            nodename: Some("n".into()),
            ca_pins: vec!["sha256:abc".into()],
            ..Default::default()
        };
        let e = AgentConfig::merge(bad_pin, FileConfig::default()).unwrap_err();
        assert!(e.to_string().contains("malformed"), "{e}");
        let no_proxy = StartArgs {
            nodename: Some("n".into()),
            ..Default::default()
        };
        let e = AgentConfig::merge(no_proxy, FileConfig::default()).unwrap_err();
        assert!(e.to_string().contains("--proxy"), "{e}");
    }

    #[test]
    fn the_egress_proxy_comes_from_the_setting_else_the_environment() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let from = |setting: Option<&str>, vars| {
            egress_from(setting.map(str::to_string), env(vars))
                .unwrap()
                .map(|(e, from)| (e.to_string(), from, e.applies_to("lb.corp:3080")))
        };
        let vars: &[(&str, &str)] = &[
            ("https_proxy", "http://u:p@env:3128"),
            ("NO_PROXY", ".corp"),
        ];
        assert_eq!(
            from(None, vars),
            Some(("http://env:3128".into(), "HTTPS_PROXY", false))
        );
        assert_eq!(
            from(Some("http://set:8080"), vars),
            Some(("http://set:8080".into(), "egress_proxy", false))
        );
        assert_eq!(from(Some("off"), vars), None);
        assert_eq!(from(None, &[]), None);
        let bad = egress_from(Some("socks5://x:1".into()), env(&[])).unwrap_err();
        assert!(bad.to_string().contains("expected http://"), "{bad}");
    }

    #[test]
    fn labels_and_transport_from_the_file_or_flags() {
        let file = parse(
            "proxy: a:1\nnodename: n\nlabels: {env: lab}\ncommands:\n  - name: k\n    command: [uname, -r]\n    period: 2m\ntransport: tcp\n",
        )
        .unwrap();
        let cfg = AgentConfig::merge(StartArgs::default(), file).unwrap();
        assert_eq!(cfg.labels["env"], "lab");
        assert_eq!(cfg.commands[0].period, std::time::Duration::from_secs(120));
        assert_eq!(cfg.transport, TransportMode::Tcp);
        let args = StartArgs {
            proxy: Some("a:1".into()),
            nodename: Some("n".into()),
            labels: Some("role=db,up=[5s:uptime]".into()),
            ..Default::default()
        };
        let cfg = AgentConfig::merge(args, FileConfig::default()).unwrap();
        assert_eq!(cfg.labels["role"], "db");
        assert_eq!(cfg.commands[0].command, ["uptime"]);
        assert_eq!(cfg.transport, TransportMode::Auto);
        let e =
            parse("commands:\n  - name: k\n    command: [ls]\n    period: 1m\n    shell: yes\n")
                .unwrap_err();
        assert!(e.contains("unknown field `shell`"), "{e}");
    }

    #[test]
    fn flags_override_the_file() {
        let file = parse("proxy: file:1\ndata_dir: /f\ntoken: from-file\nnodename: f\n").unwrap();
        let args = StartArgs {
            proxy: Some("flag:2".into()),
            token: Some("/abs/token".into()),
            ..Default::default()
        };
        let cfg = AgentConfig::merge(args, file).unwrap();
        assert_eq!(cfg.proxy, "flag:2");
        assert_eq!(cfg.data_dir, PathBuf::from("/f"));
        assert_eq!(cfg.token, TokenSource::Given("/abs/token".into()));
        assert_eq!(cfg.nodename, "f");
    }
}

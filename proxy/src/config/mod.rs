//! Proxy configuration: command-line flags over a YAML file over defaults, parsed into a
//! validated [`ProxyConfig`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;
use tunnel_proto::api::Role;
use tunnel_proto::secret::Secret;

use crate::auth::tokens::{StaticToken, validate_value};
use crate::backend::{EtcdConfig, EtcdTls};

mod limits;

pub use self::limits::{Limits, LimitsConfig};

pub const DEFAULT_DATA_DIR: &str = "/var/lib/burrow-proxy";
pub const DEFAULT_WEB_LISTEN: &str = "0.0.0.0:3080";
pub const DEFAULT_SSH_LISTEN: &str = "0.0.0.0:3023";

#[derive(Debug, Parser)]
#[command(
    name = "burrow-proxy",
    version,
    about = "Burrow proxy: the cluster's web API, tunnel endpoint and auth server",
    long_about = "Burrow proxy: the cluster's web API (find, join, admin), tunnel endpoint and auth \
                  server. The first start on an empty data dir creates the cluster: host and user \
                  CAs, and an admin identity for burrowctl."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the proxy (creates the cluster on first start).
    Start(Box<StartArgs>),
    /// Print a commented sample YAML configuration.
    Configure,
    /// Print the version.
    Version,
}

#[derive(Debug, Args, Default)]
pub struct StartArgs {
    /// YAML config file (see `burrow-proxy configure`); flags override its values.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory for the cluster state, the admin identity and the logs [default: /var/lib/burrow-proxy].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Cluster name, fixed when the cluster is created [default: this host's name].
    #[arg(long, value_name = "NAME")]
    pub cluster_name: Option<String>,
    /// HTTPS web API address (find, join, admin); port 0 picks a free port [default: 0.0.0.0:3080].
    #[arg(long, value_name = "ADDR")]
    pub web_listen: Option<String>,
    /// A dedicated tunnel listener (TLS + yamux on TCP, QUIC on UDP, same port); optional:
    /// tunnels are also served on the web port.
    #[arg(long, value_name = "ADDR")]
    pub tunnel_listen: Option<String>,
    /// SSH jump host address for users, or "off" [default: 0.0.0.0:3023].
    #[arg(long, value_name = "ADDR|off")]
    pub ssh_listen: Option<String>,
    /// The host:port agents and users reach this proxy at (often a load balancer); used in join commands.
    #[arg(long, value_name = "HOST:PORT")]
    pub public_addr: Option<String>,
    /// Serve /metrics (Prometheus), /healthz and /readyz over plain HTTP on this address (e.g.
    /// 127.0.0.1:3081), or "off" [default: off].
    #[arg(long, value_name = "ADDR|off")]
    pub diag_listen: Option<String>,
    /// A static join token, ROLES:VALUE (e.g. node:s3cret); VALUE may be an absolute path to a
    /// file with one token per line. Static tokens never expire. Repeatable; replaces the config's list.
    #[arg(long = "static-token", value_name = "ROLES:VALUE_OR_ABS_PATH")]
    pub static_tokens: Vec<String>,
    /// State backend: redb (embedded, one proxy) or etcd (several proxies share one cluster).
    #[arg(long, value_enum, value_name = "KIND")]
    pub storage: Option<StorageKind>,
    /// etcd endpoint URL, e.g. http://127.0.0.1:2379 (with --storage etcd); repeatable.
    #[arg(long = "etcd-endpoint", value_name = "URL")]
    pub etcd_endpoints: Vec<String>,
    /// Log at debug level.
    #[arg(long)]
    pub debug: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    /// Embedded redb file in the data dir: one proxy.
    #[default]
    Redb,
    /// etcd: several proxies share one cluster.
    Etcd,
}

/// The YAML file, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub cluster_name: Option<String>,
    pub web_listen: Option<String>,
    pub tunnel_listen: Option<String>,
    pub ssh_listen: Option<String>,
    pub public_addr: Option<String>,
    pub diag_listen: Option<String>,
    pub node_cert_ttl: Option<String>,
    pub session_recording: Option<tunnel_proto::wire::RecordingMode>,
    pub https_cert_file: Option<PathBuf>,
    pub https_key_file: Option<PathBuf>,
    #[serde(default)]
    pub static_tokens: Vec<String>,
    pub storage: Option<StorageConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub debug: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    #[serde(rename = "type", default)]
    pub kind: StorageKind,
    #[serde(default)]
    pub endpoints: Vec<String>,
    pub prefix: Option<String>,
    pub tls_ca_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// etcd user authentication: the user, and a file holding the password.
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Allow plain http:// to an etcd that is not on loopback (the cluster's CA keys would
    /// cross the network unencrypted).
    #[serde(default)]
    pub allow_plaintext: bool,
}

/// Where the cluster's state lives.
#[derive(Debug, Clone)]
pub enum Storage {
    Redb,
    Etcd(EtcdConfig),
}

pub const DEFAULT_ETCD_PREFIX: &str = "/burrow";

/// The validated configuration the proxy runs with.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub data_dir: PathBuf,
    pub cluster_name: Option<String>,
    pub web_listen: SocketAddr,
    pub tunnel_listen: Option<SocketAddr>,
    /// `None`: no SSH service.
    pub ssh_listen: Option<SocketAddr>,
    pub public_addr: Option<String>,
    /// Where /metrics, /healthz and /readyz are served; `None`: off.
    pub diag_listen: Option<SocketAddr>,
    pub https_files: Option<(PathBuf, PathBuf)>,
    pub static_tokens: Vec<StaticToken>,
    pub storage: Storage,
    pub limits: Limits,
    /// How long node certificates live (`node_cert_ttl`).
    pub node_cert_ttl: std::time::Duration,
    /// Which sessions nodes record (`session_recording`: all, pty or off).
    pub session_recording: tunnel_proto::wire::RecordingMode,
    pub debug: bool,
}

pub use burrow_daemon::ConfigError;

impl ProxyConfig {
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
        let web_listen_text = args
            .web_listen
            .or(file.web_listen)
            .unwrap_or_else(|| DEFAULT_WEB_LISTEN.to_string());
        let web_listen = web_listen_text.parse().map_err(|_| {
            ConfigError::new(format!(
                "web_listen {web_listen_text:?} is not an IP:PORT address"
            ))
        })?;
        let tunnel_listen = match args.tunnel_listen.or(file.tunnel_listen) {
            Some(text) => Some(text.parse().map_err(|_| {
                ConfigError::new(format!("tunnel_listen {text:?} is not an IP:PORT address"))
            })?),
            None => None,
        };
        let ssh_text = args
            .ssh_listen
            .or(file.ssh_listen)
            .unwrap_or_else(|| DEFAULT_SSH_LISTEN.to_string());
        let ssh_listen = if ssh_text == "off" {
            None
        } else {
            Some(ssh_text.parse().map_err(|_| {
                ConfigError::new(format!(
                    "ssh_listen {ssh_text:?} is not an IP:PORT address or off"
                ))
            })?)
        };
        let diag_listen = burrow_daemon::diag::parse_listen(args.diag_listen.or(file.diag_listen))?;
        let public_addr = args.public_addr.or(file.public_addr);
        if let Some(addr) = &public_addr
            && burrow_net::web::split_host(addr).is_none()
        {
            return Err(ConfigError::new(format!(
                "public_addr {addr:?} is not a host:port address"
            )));
        }
        let cluster_name = args.cluster_name.or(file.cluster_name);
        if let Some(name) = &cluster_name
            && (name.is_empty() || name.len() > 128 || name.chars().any(char::is_control))
        {
            return Err(ConfigError::new(format!(
                "cluster name {name:?} is invalid"
            )));
        }
        let https_files = match (file.https_cert_file, file.https_key_file) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(ConfigError::new(
                    "https_cert_file and https_key_file must be given together",
                ));
            }
        };
        let token_specs = if args.static_tokens.is_empty() {
            file.static_tokens
        } else {
            args.static_tokens
        };
        let mut static_tokens = Vec::new();
        for spec in &token_specs {
            static_tokens.extend(parse_static_token(spec)?);
        }
        let file_storage = file.storage.unwrap_or_default();
        let kind = args.storage.unwrap_or(file_storage.kind);
        let endpoints = if args.etcd_endpoints.is_empty() {
            file_storage.endpoints
        } else {
            args.etcd_endpoints
        };
        let storage = match kind {
            StorageKind::Redb => {
                if !endpoints.is_empty() {
                    return Err(ConfigError::new(
                        "etcd endpoints are given but the storage is redb: add --storage etcd",
                    ));
                }
                Storage::Redb
            }
            StorageKind::Etcd => {
                if endpoints.is_empty() {
                    return Err(ConfigError::new(
                        "storage etcd needs at least one endpoint: --etcd-endpoint http://HOST:2379",
                    ));
                }
                for e in &endpoints {
                    if !(e.starts_with("http://") || e.starts_with("https://")) {
                        return Err(ConfigError::new(format!(
                            "etcd endpoint {e:?} must be a URL, e.g. http://127.0.0.1:2379"
                        )));
                    }
                    if !file_storage.allow_plaintext && plaintext_off_host(e) {
                        return Err(ConfigError::new(format!(
                            "etcd endpoint {e:?} is plain http to a host that is not loopback: the \
                             cluster's CA keys would cross the network unencrypted; use https:// with \
                             tls_ca_file, or set storage.allow_plaintext: true"
                        )));
                    }
                }
                let prefix = file_storage
                    .prefix
                    .unwrap_or_else(|| DEFAULT_ETCD_PREFIX.to_string());
                if !prefix.starts_with('/') {
                    return Err(ConfigError::new(format!(
                        "storage prefix {prefix:?} must start with /"
                    )));
                }
                let tls = match (
                    file_storage.tls_ca_file,
                    file_storage.tls_cert_file,
                    file_storage.tls_key_file,
                ) {
                    (None, None, None) => None,
                    (Some(ca_file), None, None) => Some(EtcdTls {
                        ca_file,
                        client: None,
                    }),
                    (Some(ca_file), Some(c), Some(k)) => Some(EtcdTls {
                        ca_file,
                        client: Some((c, k)),
                    }),
                    _ => {
                        return Err(ConfigError::new(
                            "etcd TLS needs tls_ca_file, and tls_cert_file with tls_key_file together",
                        ));
                    }
                };
                let user = match (file_storage.username, file_storage.password_file) {
                    (None, None) => None,
                    (Some(user), Some(path)) => {
                        let password = std::fs::read_to_string(&path).map_err(|e| {
                            ConfigError::new(format!(
                                "cannot read the etcd password file {}: {e}",
                                path.display()
                            ))
                        })?;
                        let password = password.trim_end_matches(['\r', '\n']).to_string();
                        if password.is_empty() {
                            return Err(ConfigError::new(format!(
                                "the etcd password file {} is empty",
                                path.display()
                            )));
                        }
                        Some((user, Secret::new(password)))
                    }
                    _ => {
                        return Err(ConfigError::new(
                            "etcd authentication needs storage.username and storage.password_file together",
                        ));
                    }
                };
                Storage::Etcd(EtcdConfig {
                    endpoints,
                    prefix,
                    tls,
                    user,
                })
            }
        };
        Ok(Self {
            data_dir,
            cluster_name,
            web_listen,
            tunnel_listen,
            ssh_listen,
            public_addr,
            diag_listen,
            https_files,
            static_tokens,
            storage,
            limits: Limits::merge(file.limits)?,
            node_cert_ttl: parse_node_cert_ttl(file.node_cert_ttl.as_deref())?,
            session_recording: file
                .session_recording
                .unwrap_or(tunnel_proto::wire::RecordingMode::All),
            debug: args.debug || file.debug,
        })
    }
}

/// `node_cert_ttl`: 10 s to 10 years (the CA's own lifetime), 90 days if unset.
fn parse_node_cert_ttl(text: Option<&str>) -> Result<std::time::Duration, ConfigError> {
    use std::time::Duration;
    let Some(text) = text else {
        return Ok(crate::auth::ca::DEFAULT_NODE_VALIDITY);
    };
    let fail =
        |why: &dyn std::fmt::Display| ConfigError::new(format!("node_cert_ttl {text:?}: {why}"));
    let ttl = humantime::parse_duration(text.trim()).map_err(|e| fail(&e))?;
    if !(Duration::from_secs(10)..=Duration::from_secs(10 * 365 * 24 * 3600)).contains(&ttl) {
        return Err(fail(&"expected 10s to 10 years"));
    }
    Ok(ttl)
}

/// Whether an etcd URL is plain http to a host other than loopback.
fn plaintext_off_host(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = burrow_net::web::split_host(authority).unwrap_or(authority);
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    !loopback
}

pub fn read_file_config(path: &Path) -> Result<FileConfig, ConfigError> {
    burrow_daemon::read_yaml_config(path)
}

/// Parses `ROLES:VALUE` where VALUE may be an absolute path to a file of tokens, one per line.
pub fn parse_static_token(spec: &str) -> Result<Vec<StaticToken>, ConfigError> {
    let (roles, value) = spec.split_once(':').ok_or_else(|| {
        ConfigError::new("a static token must look like ROLES:VALUE, e.g. node:s3cret or node:/etc/burrow/tokens")
    })?;
    let roles =
        Role::parse_list(roles).map_err(|e| ConfigError::new(format!("static token: {e}")))?;
    let values: Vec<String> = if value.starts_with('/') {
        let text = std::fs::read_to_string(value)
            .map_err(|e| ConfigError::new(format!("cannot read static token file {value}: {e}")))?;
        let lines: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect();
        if lines.is_empty() {
            return Err(ConfigError::new(format!(
                "static token file {value} holds no token"
            )));
        }
        lines
    } else {
        vec![value.trim().to_string()]
    };
    values
        .into_iter()
        .map(|v| {
            validate_value(&v).map_err(|e| ConfigError::new(format!("static token: {e}")))?;
            Ok(StaticToken {
                roles: roles.clone(),
                value: Secret::new(v),
            })
        })
        .collect()
}

/// What `burrow-proxy configure` prints: every key, commented.
pub const SAMPLE_CONFIG: &str = include_str!("sample.yaml");

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<FileConfig, String> {
        serde_norway::from_str(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn sample_config_parses_to_the_defaults() {
        let file = parse(SAMPLE_CONFIG).unwrap();
        let cfg = ProxyConfig::merge(StartArgs::default(), file).unwrap();
        assert_eq!(cfg.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(cfg.web_listen.to_string(), DEFAULT_WEB_LISTEN);
        assert!(matches!(cfg.storage, Storage::Redb));
        assert!(cfg.static_tokens.is_empty());
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = parse("data_dir: /x\nweb_listn: 1.2.3.4:5\n").unwrap_err();
        assert!(e.contains("unknown field `web_listn`"), "{e}");
        let e = parse("storage:\n  type: etcd2\n").unwrap_err();
        assert!(e.contains("unknown variant"), "{e}");
    }

    #[test]
    fn flags_override_the_file() {
        let file =
            parse("data_dir: /from/file\nweb_listen: 127.0.0.1:1\ncluster_name: f\n").unwrap();
        let args = StartArgs {
            data_dir: Some("/from/flag".into()),
            ..Default::default()
        };
        let cfg = ProxyConfig::merge(args, file).unwrap();
        assert_eq!(cfg.data_dir, PathBuf::from("/from/flag"));
        assert_eq!(cfg.web_listen.to_string(), "127.0.0.1:1");
        assert_eq!(cfg.cluster_name.as_deref(), Some("f"));
    }

    #[test]
    fn etcd_storage_from_flags_or_file() {
        let yaml =
            "storage:\n  type: etcd\n  endpoints: [\"http://10.0.0.1:2379\"]\n  prefix: /c1\n";
        let e = ProxyConfig::merge(StartArgs::default(), parse(yaml).unwrap()).unwrap_err();
        assert!(e.to_string().contains("not loopback"), "{e}");
        let file = parse(&format!("{yaml}  allow_plaintext: true\n")).unwrap();
        let cfg = ProxyConfig::merge(StartArgs::default(), file).unwrap();
        let Storage::Etcd(etcd) = cfg.storage else {
            panic!("etcd expected")
        };
        assert_eq!(etcd.endpoints, ["http://10.0.0.1:2379"]);
        assert_eq!(etcd.prefix, "/c1");
        let args = StartArgs {
            storage: Some(StorageKind::Etcd),
            etcd_endpoints: vec!["http://127.0.0.1:1".into()],
            ..Default::default()
        };
        let cfg = ProxyConfig::merge(args, FileConfig::default()).unwrap();
        let Storage::Etcd(etcd) = cfg.storage else {
            panic!("etcd expected")
        };
        assert_eq!(etcd.prefix, DEFAULT_ETCD_PREFIX);
        let no_endpoint = StartArgs {
            storage: Some(StorageKind::Etcd),
            ..Default::default()
        };
        let e = ProxyConfig::merge(no_endpoint, FileConfig::default()).unwrap_err();
        assert!(e.to_string().contains("--etcd-endpoint"), "{e}");
        let half_tls =
            parse("storage:\n  type: etcd\n  endpoints: [\"http://a:1\"]\n  tls_cert_file: /c\n")
                .unwrap();
        assert!(ProxyConfig::merge(StartArgs::default(), half_tls).is_err());
    }

    #[test]
    fn bad_values_are_explained() {
        let bad_listen = StartArgs {
            web_listen: Some("nowhere".into()),
            ..Default::default()
        };
        let e = ProxyConfig::merge(bad_listen, FileConfig::default()).unwrap_err();
        assert!(e.to_string().contains("\"nowhere\""), "{e}");
        let e = ProxyConfig::merge(
            StartArgs::default(),
            parse("https_cert_file: /c.pem\n").unwrap(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("together"), "{e}");
    }

    #[test]
    fn static_tokens_parse_from_values_and_files() {
        let t = parse_static_token("node,proxy:abcdefgh12").unwrap();
        assert_eq!(t[0].roles, vec![Role::Node, Role::Proxy]);
        assert_eq!(t[0].value.expose(), "abcdefgh12");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# fleet tokens\ntoken-one-1\n\n  token-two-2  \n").unwrap();
        let t = parse_static_token(&format!("node:{}", path.display())).unwrap();
        let values: Vec<&str> = t.iter().map(|t| t.value.expose()).collect();
        assert_eq!(values, ["token-one-1", "token-two-2"]);
        assert!(parse_static_token("abcdefgh").is_err());
        assert!(parse_static_token("auth:abcdefgh").is_err());
        let missing = parse_static_token("node:/no/such/file").unwrap_err();
        assert!(missing.to_string().contains("/no/such/file"), "{missing}");
    }
}

//! What plain OpenSSH and Ansible need to reach a cluster's nodes: a config block
//! (`burrowctl ssh-config`), a known_hosts file trusting the cluster's host CA, and an Ansible
//! inventory (`nodes ls --format ansible`). Pure text: the commands fetch and write.
//!
//! Nodes are reached as `NODE.CLUSTER` (a name or a host id): the proxy strips the cluster's
//! suffix, and a node's host certificate names it both ways, so strict host key checking holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tunnel_proto::api::NodeInfo;

/// Where a user's files for one cluster are, and who logs in.
pub struct Client {
    pub cluster: String,
    /// The proxy's SSH jump address, HOST:PORT.
    pub jump: String,
    /// The private key; its certificate is KEY-cert.pub (`burrowctl auth sign --out KEY`).
    pub key: PathBuf,
    pub known_hosts: PathBuf,
    /// The login on nodes, if the user wants one by default.
    pub user: Option<String>,
    /// Whether this machine has AES instructions ([`burrow_net::tls::aes_instructions`]): then
    /// the hop to the proxy, which the proxy decrypts, prefers AES-GCM ([`HOP_CIPHERS`]).
    pub fast_aes: bool,
}

/// The ciphers of an ssh hop to the proxy from a machine with AES instructions, in this order.
/// OpenSSH's own first choice is ChaCha20-Poly1305, and the client's order is the one that counts;
/// the proxy decrypts the hop, and with AES-GCM it spends a quarter less CPU on a bulk transfer
/// (ring's Poly1305 for SSH is portable C; BENCHMARKS.md). ChaCha20 stays last for an SSH server
/// at that address without AES-GCM. The session to the node inside the hop keeps OpenSSH's order:
/// a node without AES instructions (most Raspberry Pis) runs ChaCha20 faster.
pub const HOP_CIPHERS: &str =
    "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com";

/// `~/.ssh/burrow-CLUSTER`: where `auth sign --out` is told to write, in the README.
pub fn default_key(home: &Path, cluster: &str) -> PathBuf {
    home.join(".ssh").join(format!("burrow-{cluster}"))
}

/// `~/.ssh/burrow-CLUSTER_known_hosts`.
pub fn default_known_hosts(home: &Path, cluster: &str) -> PathBuf {
    home.join(".ssh")
        .join(format!("burrow-{cluster}_known_hosts"))
}

/// The certificate OpenSSH pairs with `key`.
pub fn certificate_of(key: &Path) -> PathBuf {
    let mut name = key.as_os_str().to_owned();
    name.push("-cert.pub");
    PathBuf::from(name)
}

/// `HOST` of `HOST:PORT` (`[v6]:port` too) and the port.
fn split(addr: &str) -> (&str, &str) {
    let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "3023"));
    (host.trim_start_matches('[').trim_end_matches(']'), port)
}

/// `path` as it is when every character is safe (alphanumeric or in `safe`), else `wrap`ped.
fn quote_with(path: &Path, safe: &str, wrap: fn(&str) -> String) -> String {
    let text = path.display().to_string();
    if text
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || safe.contains(c))
    {
        text
    } else {
        wrap(&text)
    }
}

/// A path for ssh_config or Ansible's shell-like splitting, double-quoted when it needs to be.
fn quote(path: &Path) -> String {
    quote_with(path, "/._-+@%~", |t| {
        format!("\"{}\"", t.replace('\\', "\\\\").replace('"', "\\\""))
    })
}

/// A path for `sh -c`, single-quoted when it needs to be.
fn quote_sh(path: &Path) -> String {
    quote_with(path, "/._-+@%", |t| {
        format!("'{}'", t.replace('\'', "'\\''"))
    })
}

impl Client {
    fn proxy_host(&self) -> &str {
        split(&self.jump).0
    }

    /// known_hosts lines: the host CA for `*.CLUSTER` on any port and for the proxy's SSH port.
    pub fn known_hosts(&self, host_ca_keys: &[String]) -> String {
        let (host, port) = split(&self.jump);
        let c = &self.cluster;
        let mut text = format!(
            "# The host CA of Burrow cluster {c:?} (burrowctl ssh-config writes this file).\n"
        );
        for key in host_ca_keys {
            text += &format!(
                "@cert-authority *.{c},[*.{c}]:*,{host},[{host}]:{port} {}\n",
                key.trim()
            );
        }
        text
    }

    /// The ssh_config block: `ssh [LOGIN@]NODE.CLUSTER` jumps through the proxy, for every
    /// node, or only for `scope` (by name and host id).
    pub fn config_block(&self, scope: Option<&[&NodeInfo]>) -> String {
        let c = &self.cluster;
        let proxy = self.proxy_host();
        let key = &self.key;
        let nodes = match scope {
            None => format!("*.{c}"),
            Some(nodes) => nodes
                .iter()
                .flat_map(|n| [&n.node_name, &n.host_id])
                .map(|name| format!("{name}.{c}"))
                .collect::<Vec<_>>()
                .join(" "),
        };
        let mut text = format!(
            "# Burrow cluster {c:?}: `ssh LOGIN@NODE.{c}` (a node's name or host id) through the proxy.\n\
             # Written by `burrowctl ssh-config`; the key and certificate come from `burrowctl auth sign --out {}`.\n\
             Host {nodes} {proxy}\n    \
             IdentityFile {}\n    \
             CertificateFile {}\n    \
             IdentitiesOnly yes\n    \
             UserKnownHostsFile ~/.ssh/known_hosts {}\n\
             Host {nodes} !{proxy}\n    \
             StrictHostKeyChecking yes\n    \
             ProxyJump {}\n",
            key.display(),
            quote(key),
            quote(&certificate_of(key)),
            quote(&self.known_hosts),
            self.jump,
        );
        if let Some(user) = &self.user {
            text += &format!("    User {user}\n");
        }
        if self.fast_aes {
            text += &format!("Host {proxy}\n    Ciphers {HOP_CIPHERS}\n");
        }
        text
    }

    /// The options that take one ssh command through the proxy with these files, without an
    /// ssh_config: a ProxyCommand (options given on the command line do not reach a ProxyJump's
    /// own ssh) and the same key, certificate and known_hosts at both ends.
    ///
    /// Two layers of quoting: Ansible splits the whole like a shell (double quotes), and ssh
    /// hands the ProxyCommand to `sh -c` (single quotes inside it).
    fn ssh_args(&self) -> String {
        let (host, port) = split(&self.jump);
        let files = |quote: fn(&Path) -> String| {
            format!(
                "-o IdentityFile={} -o CertificateFile={} -o IdentitiesOnly=yes -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes",
                quote(&self.key),
                quote(&certificate_of(&self.key)),
                quote(&self.known_hosts)
            )
        };
        let ciphers = if self.fast_aes {
            format!(" -o Ciphers={HOP_CIPHERS}")
        } else {
            String::new()
        };
        format!(
            "{} -o ProxyCommand=\"ssh {}{ciphers} -p {port} {host} -s proxy:%h:%p\"",
            files(quote),
            files(quote_sh)
        )
    }

    /// An Ansible inventory (the JSON form of the YAML inventory plugin's format): every node by
    /// name, reached as HOST_ID.CLUSTER; a group per label (`env=lab` → `env_lab`), and `online`
    /// and `offline`.
    pub fn ansible_inventory(&self, nodes: &[&NodeInfo]) -> Value {
        let mut hosts = serde_json::Map::new();
        let mut groups: BTreeMap<String, serde_json::Map<String, Value>> = BTreeMap::new();
        for n in nodes {
            let mut vars = json!({ "ansible_host": format!("{}.{}", n.host_id, self.cluster) });
            if let Some(user) = &self.user {
                vars["ansible_user"] = json!(user);
            }
            hosts.insert(n.node_name.clone(), vars);
            let state = if n.proxies.is_empty() {
                "offline"
            } else {
                "online"
            };
            let names = n
                .labels
                .iter()
                .map(|(k, v)| group_name(&format!("{k}_{v}")))
                .chain([state.to_string()]);
            for group in names {
                groups
                    .entry(group)
                    .or_default()
                    .insert(n.node_name.clone(), json!({}));
            }
        }
        let children: serde_json::Map<String, Value> = groups
            .into_iter()
            .map(|(name, members)| (name, json!({ "hosts": members })))
            .collect();
        json!({
            "all": {
                "hosts": hosts,
                "children": children,
                "vars": { "ansible_ssh_common_args": self.ssh_args() },
            }
        })
    }
}

/// An Ansible group name: letters, digits and `_`, not starting with a digit.
fn group_name(text: &str) -> String {
    let mut name: String = text
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert(0, '_');
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> Client {
        Client {
            cluster: "demo".into(),
            jump: "proxy.example.com:3023".into(),
            key: "/home/a/.ssh/burrow-demo".into(),
            known_hosts: "/home/a/.ssh/burrow-demo_known_hosts".into(),
            user: Some("pi".into()),
            fast_aes: false,
        }
    }

    #[test]
    fn with_aes_instructions_the_hop_to_the_proxy_prefers_aes_gcm() {
        let mut c = client();
        assert!(!c.config_block(None).contains("Ciphers"));
        assert!(!c.ssh_args().contains("Ciphers"));
        c.fast_aes = true;
        let block = c.config_block(None);
        assert!(
            block.ends_with(&format!(
                "Host proxy.example.com\n    Ciphers {HOP_CIPHERS}\n"
            )),
            "{block}"
        );
        assert!(HOP_CIPHERS.starts_with("aes128-gcm@openssh.com,"));
        // Only the hop: the command run through it (to the node) keeps OpenSSH's order.
        let args = c.ssh_args();
        let (outer, hop) = args.split_once("ProxyCommand=").unwrap();
        assert!(!outer.contains("Ciphers"), "{args}");
        assert!(
            hop.contains(&format!(" -o Ciphers={HOP_CIPHERS} -p 3023 ")),
            "{args}"
        );
    }

    #[test]
    fn the_block_jumps_for_nodes_but_not_for_the_proxy() {
        let block = client().config_block(None);
        assert!(block.contains("Host *.demo proxy.example.com\n"), "{block}");
        assert!(
            block.contains(
                "Host *.demo !proxy.example.com\n    StrictHostKeyChecking yes\n    \
                 ProxyJump proxy.example.com:3023\n    User pi\n"
            ),
            "{block}"
        );
        assert!(block.contains("CertificateFile /home/a/.ssh/burrow-demo-cert.pub\n"));
        assert!(block.contains(
            "UserKnownHostsFile ~/.ssh/known_hosts /home/a/.ssh/burrow-demo_known_hosts\n"
        ));
    }

    #[test]
    fn known_hosts_scope_the_ca_to_the_cluster_and_the_proxy() {
        let text = client().known_hosts(&["ssh-ed25519 AAAA host-ca\n".into()]);
        assert!(text.ends_with(
            "@cert-authority *.demo,[*.demo]:*,proxy.example.com,[proxy.example.com]:3023 ssh-ed25519 AAAA host-ca\n"
        ), "{text}");
    }

    #[test]
    fn paths_with_spaces_are_quoted() {
        let mut c = client();
        c.key = "/home/a b/key".into();
        let args = c.ssh_args();
        assert!(
            args.starts_with("-o IdentityFile=\"/home/a b/key\" "),
            "{args}"
        );
        assert!(
            args.contains("ProxyCommand=\"ssh -o IdentityFile='/home/a b/key' "),
            "{args}"
        );
        assert!(
            c.config_block(None)
                .contains("IdentityFile \"/home/a b/key\"\n")
        );
    }

    fn node(name: &str, env: &str, online: bool) -> NodeInfo {
        NodeInfo {
            host_id: format!("id-{name}"),
            node_name: name.into(),
            version: "0".into(),
            labels: [("env".to_string(), env.to_string())].into(),
            proxies: if online { vec!["p".into()] } else { vec![] },
            transports: vec![],
            last_seen: 0,
        }
    }

    #[test]
    fn a_scoped_block_names_its_nodes_only() {
        let (a, b) = (node("a", "lab", true), node("b", "lab", false));
        let block = client().config_block(Some(&[&a, &b]));
        assert!(
            block.contains("Host a.demo id-a.demo b.demo id-b.demo proxy.example.com\n"),
            "{block}"
        );
        assert!(block.contains("Host a.demo id-a.demo b.demo id-b.demo !proxy.example.com\n"));
        assert!(!block.contains('*'), "{block}");
    }

    #[test]
    fn groups_come_from_labels_and_state() {
        let (a, b) = (node("a", "lab", true), node("b", "prod.eu", false));
        let inv = client().ansible_inventory(&[&a, &b]);
        let all = &inv["all"];
        assert_eq!(all["hosts"]["a"]["ansible_host"], "id-a.demo");
        assert_eq!(all["hosts"]["b"]["ansible_user"], "pi");
        assert!(all["children"]["env_lab"]["hosts"]["a"].is_object());
        assert!(all["children"]["env_prod_eu"]["hosts"]["b"].is_object());
        assert!(all["children"]["offline"]["hosts"]["b"].is_object());
        assert!(all["children"]["online"]["hosts"].get("b").is_none());
        let args = all["vars"]["ansible_ssh_common_args"].as_str().unwrap();
        assert!(
            args.ends_with("-p 3023 proxy.example.com -s proxy:%h:%p\""),
            "{args}"
        );
    }
}

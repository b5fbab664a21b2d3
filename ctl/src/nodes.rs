//! `burrowctl nodes ls` (a table, JSON or an Ansible inventory) and `burrowctl ssh-config`.

use std::path::PathBuf;

use burrow_daemon::fsutil::{ensure_private_dir, write_private_atomic};
use serde_json::json;
use tunnel_proto::api::{self, NodeInfo, StatusResponse};

use crate::cli::{ClientFiles, Format};
use crate::openssh::{self, Client};
use crate::output::{labels_text, print_json, print_table, rfc3339};
use crate::query::Query;
use crate::{Admin, Failure, usage};

/// What `nodes ls` prints and for whom.
pub struct ListRequest<'a> {
    pub filter: Query,
    pub format: Format,
    /// For `--format ansible`.
    pub client: &'a ClientFiles,
}

/// A node is online while it holds a tunnel to a live proxy.
fn state(n: &NodeInfo) -> &'static str {
    if n.proxies.is_empty() {
        "offline"
    } else {
        "online"
    }
}

pub async fn ls(admin: &Admin, request: ListRequest<'_>) -> Result<(), Failure> {
    let list: api::NodeList = admin.client.get(api::NODES_PATH).await?;
    let nodes: Vec<&NodeInfo> = list
        .nodes
        .iter()
        .filter(|n| request.filter.matches(&n.labels))
        .collect();
    match request.format {
        Format::Ansible => {
            let client = client(admin, request.client).await?;
            print_json(&client.ansible_inventory(&nodes));
        }
        Format::Json => {
            let nodes: Vec<_> = nodes
                .iter()
                .map(|n| {
                    json!({
                        "name": n.node_name,
                        "host_id": n.host_id,
                        "state": state(n),
                        "version": n.version,
                        "labels": n.labels,
                        "proxies": n.proxies,
                        "transports": n.transports,
                        "last_seen": rfc3339(n.last_seen),
                    })
                })
                .collect();
            print_json(&json!({ "nodes": nodes }));
        }
        Format::Text if nodes.is_empty() => println!("No nodes."),
        Format::Text => {
            let rows: Vec<[String; 7]> = nodes
                .iter()
                .map(|n| {
                    [
                        n.node_name.clone(),
                        n.host_id.clone(),
                        state(n).to_string(),
                        n.version.clone(),
                        if n.labels.is_empty() {
                            "-".into()
                        } else {
                            labels_text(&n.labels)
                        },
                        n.proxies.len().to_string(),
                        rfc3339(n.last_seen),
                    ]
                })
                .collect();
            print_table(
                &[
                    "NAME",
                    "HOST ID",
                    "STATE",
                    "VERSION",
                    "LABELS",
                    "PROXIES",
                    "LAST SEEN",
                ],
                &rows,
            );
        }
    }
    Ok(())
}

/// `burrowctl ssh-config`: writes the known_hosts file and prints the config block, for every
/// node or for those `scope` matches.
pub async fn ssh_config(
    admin: &Admin,
    files: &ClientFiles,
    scope: Option<Query>,
) -> Result<(), Failure> {
    let client = client(admin, files).await?;
    let block = match scope {
        None => client.config_block(None),
        Some(query) => {
            let list: api::NodeList = admin.client.get(api::NODES_PATH).await?;
            let nodes: Vec<&NodeInfo> = list
                .nodes
                .iter()
                .filter(|n| query.matches(&n.labels))
                .collect();
            if nodes.is_empty() {
                return Err(Failure {
                    code: 1,
                    message: "no node matches --query".into(),
                });
            }
            client.config_block(Some(&nodes))
        }
    };
    print!("{block}");
    Ok(())
}

/// The user's files for this cluster (defaults under `~/.ssh`), with the known_hosts file
/// written from the cluster's host CA as it is now.
async fn client(admin: &Admin, files: &ClientFiles) -> Result<Client, Failure> {
    let status: StatusResponse = admin.client.get(api::STATUS_PATH).await?;
    let jump = status.ssh_addr.ok_or_else(|| Failure {
        code: 1,
        message: "this proxy serves no SSH jump host (start it with --ssh-listen)".into(),
    })?;
    let cluster = status.cluster_name;
    let home = || {
        std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
            .ok_or_else(|| usage("HOME is not set: give --key and --known-hosts"))
    };
    let key = match files.key.clone() {
        Some(k) => k,
        None => openssh::default_key(&home()?, &cluster),
    };
    let known_hosts = match files.known_hosts.clone() {
        Some(k) => k,
        None => openssh::default_known_hosts(&home()?, &cluster),
    };
    if !openssh::certificate_of(&key).exists() {
        eprintln!(
            "burrowctl: note: no certificate at {} yet; create it with \
             `burrowctl auth sign --user NAME --logins LOGIN,... --out {}`",
            openssh::certificate_of(&key).display(),
            key.display()
        );
    }
    let client = Client {
        cluster,
        jump,
        key,
        known_hosts,
        user: files.user.clone(),
        fast_aes: burrow_net::tls::aes_instructions(),
    };
    let export: api::ExportResponse = admin
        .client
        .get(&format!("{}?type=host", api::AUTH_EXPORT_PATH))
        .await?;
    let text = client.known_hosts(&export.keys);
    // ~/.ssh as OpenSSH makes it, if the user has none yet.
    if let Some(dir) = client
        .known_hosts
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        ensure_private_dir(dir).map_err(|e| Failure {
            code: 1,
            message: format!("cannot create {}: {e}", dir.display()),
        })?;
    }
    write_private_atomic(&client.known_hosts, text.as_bytes()).map_err(|e| Failure {
        code: 1,
        message: format!("cannot write {}: {e}", client.known_hosts.display()),
    })?;
    Ok(client)
}

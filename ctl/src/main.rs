//! burrowctl: the admin CLI. It talks to a proxy's admin API over HTTPS, authenticated by the
//! cluster's admin identity. On the proxy host it finds that identity and the proxy's address in
//! the proxy's data dir by itself; elsewhere it takes `--proxy` and `--identity`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use burrow_net::tls::{self, ALPN_CLUSTER_CERT, ALPN_HTTP1, ClientIdentity};
use burrow_net::web::{WebClient, WebError};
use clap::Parser;
use serde_json::json;
use tunnel_proto::api::{
    self, Labels, Role, StatusResponse, TokenAddRequest, TokenAdded, TokenKind, TokenList,
    TokenRemoveRequest, TokenRemoved,
};
use tunnel_proto::secret::token_from_arg;

use crate::cli::{
    AuthCommand, Cli, Command, DEFAULT_PROXY, Format, NodesCommand, ProxiesCommand,
    SessionsCommand, TokensCommand,
};
use crate::output::{labels_text, print_json, print_table, rfc3339};
use crate::query::Query;

mod cli;
mod cluster;
mod krl;
mod nodes;
mod openssh;
mod output;
mod query;
mod sessions;

/// An error and the exit code it deserves: 2 for usage and configuration, 1 for the rest.
struct Failure {
    code: u8,
    message: String,
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: 2,
        message: message.into(),
    }
}

impl From<WebError> for Failure {
    fn from(e: WebError) -> Self {
        Failure {
            code: 1,
            message: e.to_string(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Version = cli.command {
        println!("burrowctl {}", tunnel_proto::VERSION);
        return ExitCode::SUCCESS;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime starts");
    match runtime.block_on(execute(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("burrowctl: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

struct Admin {
    client: WebClient,
    identity_path: PathBuf,
    /// When the admin identity's certificate expires (Unix seconds).
    expires: Option<u64>,
}

impl Admin {
    fn connect(cli: &Cli) -> Result<Self, Failure> {
        let identity_path = cli
            .identity
            .clone()
            .unwrap_or_else(|| cli.data_dir.join("admin-identity"));
        let text = std::fs::read_to_string(&identity_path).map_err(|e| {
            usage(format!(
                "cannot read the admin identity {}: {e} (on the proxy host pass --data-dir, elsewhere --identity)",
                identity_path.display()
            ))
        })?;
        let what = identity_path.display().to_string();
        let certs = tls::parse_certs(&text, &what).map_err(|e| usage(e.to_string()))?;
        let key = tls::parse_key(&text, &what).map_err(|e| usage(e.to_string()))?;
        let (leaf, cas) = certs
            .split_first()
            .expect("parse_certs returns at least one");
        if cas.is_empty() {
            return Err(usage(format!("{what} holds no CA certificate")));
        }
        let config = tls::cluster_client_config(
            cas,
            Some(ClientIdentity {
                chain: vec![leaf.clone()],
                key,
            }),
            false,
            &[ALPN_HTTP1, ALPN_CLUSTER_CERT],
        )
        .map_err(|e| usage(format!("{what}: {e}")))?;
        let addr = proxy_addr(cli.proxy.as_deref(), &cli.data_dir);
        let client = WebClient::new(&addr, config).map_err(|e| usage(e.to_string()))?;
        let expires = tls::validity(&text).map(|(_, to)| to);
        Ok(Self {
            client,
            identity_path,
            expires,
        })
    }
}

fn proxy_addr(flag: Option<&str>, data_dir: &Path) -> String {
    if let Some(addr) = flag {
        return addr.to_string();
    }
    std::fs::read_to_string(data_dir.join("web-addr"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_PROXY.to_string())
}

async fn execute(cli: &Cli) -> Result<(), Failure> {
    // Other commands print text for it, which this makes unreachable.
    if cli.format == Format::Ansible
        && !matches!(cli.command, Command::Nodes(NodesCommand::Ls { .. }))
    {
        return Err(usage("--format ansible is for `nodes ls` only"));
    }
    let admin = Admin::connect(cli)?;
    match &cli.command {
        Command::Version => unreachable!("handled before connecting"),
        Command::Status => cluster::status(&admin, cli.format).await,
        Command::Tokens(TokensCommand::Add {
            roles,
            ttl,
            value,
            labels,
        }) => {
            let roles = Role::parse_list(roles).map_err(|e| usage(format!("--type: {e}")))?;
            let ttl = parse_ttl(ttl)?;
            let value = value
                .as_deref()
                .map(token_from_arg)
                .transpose()
                .map_err(|e| usage(format!("--value: {e}")))?;
            let labels = labels
                .as_deref()
                .map(api::parse_labels)
                .transpose()
                .map_err(|e| usage(format!("--labels: {e}")))?
                .unwrap_or_default();
            tokens_add(&admin, cli.format, roles, ttl, value, labels).await
        }
        Command::Proxies(ProxiesCommand::Ls) => proxies_ls(&admin, cli.format).await,
        Command::Auth(AuthCommand::Sign {
            user,
            logins,
            ttl,
            out,
            no_port_forwarding,
            no_pty,
            force_command,
        }) => {
            let permissions = api::Permissions {
                pty: !no_pty,
                port_forwarding: !no_port_forwarding,
                force_command: force_command.clone(),
            };
            let ttl = parse_ttl(ttl)?;
            auth_sign(&admin, cli.format, user, logins, ttl, permissions, out).await
        }
        Command::Auth(AuthCommand::Renew) => cluster::renew_identity(&admin, cli.format).await,
        Command::Auth(AuthCommand::Rotate {
            kind,
            phase,
            grace_period,
        }) => {
            let grace = grace_period
                .as_deref()
                .map(cluster::parse_grace)
                .transpose()?;
            cluster::rotate(&admin, cli.format, kind, phase.as_deref(), grace).await
        }
        Command::Auth(AuthCommand::Export { kind }) if kind == "krl" => {
            let export: api::ExportResponse = admin
                .client
                .get(&format!("{}?type=krl", api::AUTH_EXPORT_PATH))
                .await?;
            export_krl(cli.format, export)
        }
        Command::Auth(AuthCommand::Export { kind }) => {
            let export: api::ExportResponse = admin
                .client
                .get(&format!("{}?type={kind}", api::AUTH_EXPORT_PATH))
                .await?;
            let lines: Vec<String> = export
                .keys
                .iter()
                .map(|k| match kind.as_str() {
                    "host" => format!("@cert-authority * {}", k.trim()),
                    _ => k.trim().to_string(),
                })
                .collect();
            match cli.format {
                Format::Json => print_json(
                    &json!({ "type": kind, "cluster_name": export.cluster_name, "lines": lines }),
                ),
                Format::Text | Format::Ansible => {
                    for l in lines {
                        println!("{l}");
                    }
                }
            }
            Ok(())
        }
        Command::Nodes(NodesCommand::Ls {
            labels,
            query,
            client,
        }) => {
            let labels = labels
                .as_deref()
                .map(api::parse_labels)
                .transpose()
                .map_err(|e| usage(format!("--labels: {e}")))?
                .unwrap_or_default();
            let query = parse_query(query.as_deref())?.unwrap_or_default();
            let request = nodes::ListRequest {
                filter: Query::all_of(&labels).and(query),
                format: cli.format,
                client,
            };
            nodes::ls(&admin, request).await
        }
        Command::Sessions(SessionsCommand::Ls { node, user }) => {
            sessions::ls(&admin, cli.format, node.as_deref(), user.as_deref()).await
        }
        Command::Sessions(SessionsCommand::Export { session_id }) => {
            sessions::export(&admin, session_id).await
        }
        Command::Play {
            session_id,
            speed,
            idle_limit,
        } => sessions::play(&admin, session_id, *speed, idle_limit).await,
        Command::SshConfig { client, query } => {
            nodes::ssh_config(&admin, client, parse_query(query.as_deref())?).await
        }
        Command::Nodes(NodesCommand::Rm { host_id }) => {
            let removed: api::NodeRemoved = admin
                .client
                .post(
                    api::NODES_REMOVE_PATH,
                    &api::NodeRemoveRequest {
                        host_id: host_id.clone(),
                    },
                )
                .await?;
            match cli.format {
                Format::Json => print_json(&json!({ "removed": removed.host_id })),
                Format::Text | Format::Ansible => println!(
                    "Node {} has been removed; its identity is revoked.",
                    removed.host_id
                ),
            }
            Ok(())
        }
        Command::Tokens(TokensCommand::Ls { with_secrets }) => {
            tokens_ls(&admin, cli.format, *with_secrets).await
        }
        Command::Tokens(TokensCommand::Rm { token }) => {
            let token = token_from_arg(token).map_err(usage)?;
            let removed: TokenRemoved = admin
                .client
                .post(api::TOKENS_REMOVE_PATH, &TokenRemoveRequest { token })
                .await?;
            match cli.format {
                Format::Json => print_json(&json!({ "removed": removed.id })),
                Format::Text | Format::Ansible => {
                    println!("Token {} has been revoked.", removed.id)
                }
            }
            Ok(())
        }
    }
}

fn parse_query(text: Option<&str>) -> Result<Option<Query>, Failure> {
    text.map(Query::parse)
        .transpose()
        .map_err(|e| usage(format!("--query: {e}")))
}

fn parse_ttl(text: &str) -> Result<Duration, Failure> {
    let ttl = humantime::parse_duration(text).map_err(|e| {
        usage(format!(
            "--ttl {text:?} is not a duration like 30m or 1h: {e}"
        ))
    })?;
    if ttl < Duration::from_secs(1) {
        return Err(usage("--ttl must be at least 1s"));
    }
    Ok(ttl)
}

async fn tokens_add(
    admin: &Admin,
    format: Format,
    roles: Vec<Role>,
    ttl: Duration,
    value: Option<tunnel_proto::secret::Secret>,
    labels: Labels,
) -> Result<(), Failure> {
    let request = TokenAddRequest {
        roles,
        ttl_seconds: ttl.as_secs(),
        value,
        labels,
    };
    let added: TokenAdded = admin.client.post(api::TOKENS_PATH, &request).await?;
    // The join command needs the CA pin and the address agents should dial.
    let status: StatusResponse = admin.client.get(api::STATUS_PATH).await?;
    let proxy = status
        .public_addr
        .clone()
        .unwrap_or_else(|| admin.client.addr().to_string());
    let mut command = format!(
        "burrow-agent start --token {} --proxy {proxy}",
        added.token.expose()
    );
    for pin in &status.ca_pins {
        command.push_str(&format!(" --ca-pin {pin}"));
    }
    let ttl_text = humantime::format_duration(ttl).to_string();
    match format {
        Format::Json => print_json(&json!({
            "token": added.token.expose(),
            "id": added.id,
            "roles": added.roles,
            "labels": added.labels,
            "expires": rfc3339(added.expires),
            "ttl_seconds": ttl.as_secs(),
            "join_command": command,
        })),
        Format::Text | Format::Ansible => {
            println!("The invite token: {}", added.token.expose());
            println!(
                "It allows role {} and expires in {ttl_text} (at {}); its id is {}.",
                Role::join_list(&added.roles),
                rfc3339(added.expires),
                added.id
            );
            if !added.labels.is_empty() {
                println!(
                    "Nodes that join with it get the labels {}.",
                    labels_text(&added.labels)
                );
            }
            println!();
            println!("Run this on the new node to join the cluster:");
            println!();
            println!("{command}");
            println!();
            println!(
                "The token may also be written to a file (e.g. /var/lib/burrow/token) whose absolute"
            );
            println!("path is given as --token. {proxy} must be reachable from the new node.");
        }
    }
    Ok(())
}

async fn tokens_ls(admin: &Admin, format: Format, with_secrets: bool) -> Result<(), Failure> {
    let path = if with_secrets {
        format!("{}?with_secrets=true", api::TOKENS_PATH)
    } else {
        api::TOKENS_PATH.to_string()
    };
    let list: TokenList = admin.client.get(&path).await?;
    if format == Format::Json {
        let tokens: Vec<_> = list
            .tokens
            .iter()
            .map(|t| {
                json!({
                    "id": t.id,
                    "kind": t.kind,
                    "roles": t.roles,
                    "labels": t.labels,
                    "expires": t.expires.map(rfc3339),
                    "value": t.value.as_ref().map(|v| v.expose()),
                })
            })
            .collect();
        print_json(&json!({ "tokens": tokens }));
        return Ok(());
    }
    if list.tokens.is_empty() {
        println!("No active tokens.");
        return Ok(());
    }
    let rows: Vec<[String; 6]> = list
        .tokens
        .iter()
        .map(|t| {
            [
                t.value
                    .as_ref()
                    .map_or_else(|| "***".to_string(), |v| v.expose().to_string()),
                t.id.clone(),
                Role::join_list(&t.roles),
                match t.kind {
                    TokenKind::Static => "static".into(),
                    TokenKind::Dynamic => "dynamic".into(),
                },
                if t.labels.is_empty() {
                    "-".into()
                } else {
                    labels_text(&t.labels)
                },
                t.expires.map_or_else(|| "never".into(), rfc3339),
            ]
        })
        .collect();
    print_table(&["TOKEN", "ID", "TYPE", "KIND", "LABELS", "EXPIRES"], &rows);
    if with_secrets && list.tokens.iter().any(|t| t.kind == TokenKind::Dynamic) {
        println!();
        println!("Dynamic tokens are stored by hash: their values were shown once, when created.");
    }
    Ok(())
}

async fn auth_sign(
    admin: &Admin,
    format: Format,
    user: &str,
    logins: &str,
    ttl: Duration,
    permissions: api::Permissions,
    out: &Path,
) -> Result<(), Failure> {
    use ssh_key::{Algorithm, LineEnding, PrivateKey};
    let logins: Vec<String> = logins
        .split(',')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if logins.is_empty() {
        return Err(usage("--logins needs at least one login"));
    }
    let runtime_failure = |m: String| Failure {
        code: 1,
        message: m,
    };
    let mut key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
        .map_err(|e| runtime_failure(format!("cannot create a key: {e}")))?;
    key.set_comment(format!("burrow:{user}"));
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| runtime_failure(e.to_string()))?;
    let signed: api::SignResponse = admin
        .client
        .post(
            api::AUTH_SIGN_PATH,
            &api::SignRequest {
                user: user.to_string(),
                logins: logins.clone(),
                ttl_seconds: ttl.as_secs(),
                public_key: public.clone(),
                permissions: permissions.clone(),
            },
        )
        .await?;
    let private = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| runtime_failure(e.to_string()))?;
    let cert_path = PathBuf::from(format!("{}-cert.pub", out.display()));
    let pub_path = PathBuf::from(format!("{}.pub", out.display()));
    let write = |path: &Path, bytes: &[u8]| {
        burrow_daemon::fsutil::write_private_atomic(path, bytes)
            .map_err(|e| runtime_failure(format!("cannot write {}: {e}", path.display())))
    };
    write(out, private.as_bytes())?;
    write(
        &cert_path,
        format!("{}\n", signed.certificate.trim()).as_bytes(),
    )?;
    write(&pub_path, format!("{public}\n").as_bytes())?;
    match format {
        Format::Json => print_json(&json!({
            "user": user,
            "logins": logins,
            "key": out.display().to_string(),
            "certificate": cert_path.display().to_string(),
            "ttl_seconds": ttl.as_secs(),
            "permissions": permissions,
        })),
        Format::Text | Format::Ansible => {
            println!(
                "Wrote {} (key) and {} (certificate).",
                out.display(),
                cert_path.display()
            );
            println!(
                "User {user} may log in as {} for {}.",
                logins.join(", "),
                humantime::format_duration(ttl)
            );
        }
    }
    Ok(())
}

async fn proxies_ls(admin: &Admin, format: Format) -> Result<(), Failure> {
    let list: api::ProxyList = admin.client.get(api::PROXIES_PATH).await?;
    if format == Format::Json {
        print_json(&serde_json::to_value(&list).expect("JSON values serialize"));
        return Ok(());
    }
    let rows: Vec<[String; 5]> = list
        .proxies
        .iter()
        .map(|p| {
            [
                p.id.clone(),
                p.hostname.clone(),
                p.public_addr.clone().unwrap_or_else(|| p.web_addr.clone()),
                p.version.clone(),
                rfc3339(p.started),
            ]
        })
        .collect();
    print_table(&["ID", "HOSTNAME", "ADDRESS", "VERSION", "STARTED"], &rows);
    Ok(())
}

/// `auth export --type krl`: the binary KRL on stdout (not onto a terminal), or in JSON the key
/// IDs it revokes.
fn export_krl(format: Format, export: api::ExportResponse) -> Result<(), Failure> {
    use std::io::{IsTerminal, Write};
    let ids = &export.revoked_key_ids;
    if format == Format::Json {
        print_json(&json!({
            "type": "krl",
            "cluster_name": export.cluster_name,
            "ca_keys": export.keys,
            "revoked_key_ids": ids,
        }));
        return Ok(());
    }
    let mut cas = Vec::new();
    for key in &export.keys {
        let key = ssh_key::PublicKey::from_openssh(key.trim()).map_err(|e| Failure {
            code: 1,
            message: format!("the proxy sent a host CA key that does not parse: {e}"),
        })?;
        cas.push(key.to_bytes().map_err(|e| Failure {
            code: 1,
            message: format!("cannot encode the host CA key: {e}"),
        })?);
    }
    let comment = format!("burrow cluster {}: removed nodes", export.cluster_name);
    // The list only grows: its length is a version that grows with it.
    let bytes = krl::build(
        &cas,
        ids,
        ids.len() as u64,
        burrow_daemon::unix_now(),
        &comment,
    );
    let mut stdout = std::io::stdout();
    if stdout.is_terminal() {
        return Err(usage(
            "the KRL is binary: redirect it to a file, e.g. burrowctl auth export --type krl > /etc/ssh/burrow.krl",
        ));
    }
    stdout
        .write_all(&bytes)
        .and_then(|()| stdout.flush())
        .map_err(|e| Failure {
            code: 1,
            message: format!("cannot write the KRL: {e}"),
        })
}

//! burrowctl's command line: every command, flag and default, as `--help` shows them.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

pub const DEFAULT_DATA_DIR: &str = "/var/lib/burrow-proxy";
pub const DEFAULT_PROXY: &str = "127.0.0.1:3080";

#[derive(Debug, Parser)]
#[command(
    name = "burrowctl",
    version,
    about = "Burrow admin CLI: cluster status, join tokens, nodes, proxies"
)]
pub struct Cli {
    /// Proxy web API address [default: read from DATA_DIR/web-addr, else 127.0.0.1:3080].
    #[arg(long, global = true, value_name = "HOST:PORT", env = "BURROW_PROXY")]
    pub proxy: Option<String>,
    /// Admin identity file [default: DATA_DIR/admin-identity].
    #[arg(long, global = true, value_name = "FILE", env = "BURROW_IDENTITY")]
    pub identity: Option<PathBuf>,
    /// The proxy's data dir, where the admin identity and the web address are found on the proxy host.
    #[arg(long, global = true, value_name = "DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Output format: text for people, json (one document on stdout) for scripts; ansible (an
    /// inventory) for `nodes ls`.
    #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
    Ansible,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the cluster name, version and CA pin.
    Status,
    /// Manage join tokens.
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// Live proxies of the cluster.
    #[command(subcommand)]
    Proxies(ProxiesCommand),
    /// Nodes and their tunnels.
    #[command(subcommand)]
    Nodes(NodesCommand),
    /// User certificates and the cluster's SSH CAs.
    #[command(subcommand)]
    Auth(AuthCommand),
    /// Print an OpenSSH config block for the cluster's nodes (`ssh NODE.CLUSTER`), and write the
    /// known_hosts file it uses: `burrowctl ssh-config >> ~/.ssh/config`.
    SshConfig {
        #[command(flatten)]
        client: ClientFiles,
        /// Only the nodes matching every term (k=v, k!=v), by name and host id, instead of
        /// every NODE.CLUSTER.
        #[arg(long, value_name = "EXPR")]
        query: Option<String>,
    },
    /// Recorded SSH sessions.
    #[command(subcommand)]
    Sessions(SessionsCommand),
    /// Replay a recorded session in this terminal, with its timing.
    Play {
        session_id: String,
        /// Faster (2) or slower (0.5) than it happened.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// The longest pause between two outputs, however long the user was idle.
        #[arg(long, value_name = "DURATION", default_value = "2s")]
        idle_limit: String,
    },
    /// Print burrowctl's version.
    Version,
}

#[derive(Debug, Subcommand)]
pub enum SessionsCommand {
    /// List recorded sessions, oldest first: id, user, login, node, start, end, duration, size.
    Ls {
        /// Only this node's (name or host id).
        #[arg(long)]
        node: Option<String>,
        /// Only this user's (the certificate's user).
        #[arg(long)]
        user: Option<String>,
    },
    /// Write a session's recording (asciicast v2, for `asciinema play`) to stdout.
    Export { session_id: String },
}

#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Issue an SSH key and a user certificate (PATH and PATH-cert.pub) for plain OpenSSH.
    Sign {
        /// Who the certificate is for (its key id, in audit logs).
        #[arg(long)]
        user: String,
        /// OS logins the certificate allows on nodes, a,b.
        #[arg(long, value_name = "LOGIN,...")]
        logins: String,
        /// How long the certificate is valid.
        #[arg(long, value_name = "DURATION", default_value = "12h")]
        ttl: String,
        /// Where to write the private key; the certificate goes to PATH-cert.pub.
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
        /// Leave out permit-port-forwarding: nodes refuse `ssh -L` with this certificate.
        #[arg(long)]
        no_port_forwarding: bool,
        /// Leave out permit-pty: nodes refuse a terminal to this certificate.
        #[arg(long)]
        no_pty: bool,
        /// Run this command instead of whatever the user asks for (shell, command, sftp).
        #[arg(long, value_name = "COMMAND")]
        force_command: Option<String>,
    },
    /// Replace the admin identity burrowctl uses (--identity, or DATA_DIR/admin-identity) with a
    /// new one from the proxy, before it expires (`status` says how long it has left).
    Renew,
    /// Print a CA for OpenSSH: host → a known_hosts @cert-authority line, user → a
    /// TrustedUserCAKeys line for sshd; krl → the binary OpenSSH key revocation list of removed
    /// nodes' host certificates, for `RevokedHostKeys` in ssh_config (redirect it to a file).
    Export {
        #[arg(long = "type", value_name = "host|user|krl")]
        kind: String,
    },
    /// Replace a CA without downtime, in phases: init (a new CA, trusted beside the old),
    /// update_clients (the new CA signs; nodes renew over their tunnels), update_servers (proxies
    /// take certificates from it), standby (the old CA retired). rollback, before standby, makes
    /// the old CA sign again. Without --phase: all of them, automatically, over --grace-period.
    Rotate {
        #[arg(long = "type", value_name = "host|user", value_parser = ["host", "user"])]
        kind: String,
        /// The phase to move to.
        #[arg(long, value_parser = ["init", "update_clients", "update_servers", "standby", "rollback"])]
        phase: Option<String>,
        /// How long an automatic rotation takes (each of its three steps a third of it).
        #[arg(long, value_name = "DURATION", conflicts_with = "phase", default_value = None)]
        grace_period: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodesCommand {
    /// List joined nodes: name, host id, state (online, offline), version, labels, proxies,
    /// last seen. `--format ansible` prints an Ansible inventory instead.
    Ls {
        /// Only nodes with all these labels, k=v,k2=v2.
        #[arg(long, value_name = "K=V,...")]
        labels: Option<String>,
        /// Only nodes matching every term: k=v (equal) or k!=v (anything else, or no such label),
        /// e.g. env=prod,site!=lab.
        #[arg(long, value_name = "EXPR")]
        query: Option<String>,
        /// For --format ansible: how Ansible reaches the nodes.
        #[command(flatten)]
        client: ClientFiles,
    },
    /// Remove a node and revoke its identity: its tunnels close and it cannot reconnect.
    Rm {
        #[arg(value_name = "HOST_ID")]
        host_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProxiesCommand {
    /// List the proxies that are alive (registered within their lease).
    Ls,
}

#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Create a join token and print the command that joins a node with it.
    Add {
        /// Roles the token allows: node, proxy or node,proxy.
        #[arg(long = "type", value_name = "ROLES", default_value = "node")]
        roles: String,
        /// How long the token is valid, e.g. 5m, 1h, 7d.
        #[arg(long, value_name = "DURATION", default_value = "30m")]
        ttl: String,
        /// Use this value instead of a random one (or an absolute path to a file holding it).
        #[arg(long, value_name = "VALUE_OR_ABS_PATH")]
        value: Option<String>,
        /// Labels nodes joining with this token inherit, k=v,k2=v2.
        #[arg(long, value_name = "K=V,...")]
        labels: Option<String>,
    },
    /// List live tokens; values are redacted unless --with-secrets.
    Ls {
        /// Show the values of static tokens (dynamic ones are stored by hash and were shown once).
        #[arg(long)]
        with_secrets: bool,
    },
    /// Revoke a token, given its value (or an absolute path to a file holding it) or its id.
    Rm {
        #[arg(value_name = "TOKEN_OR_ID")]
        token: String,
    },
}

/// The user's side of plain OpenSSH: who logs in, with what key, trusting what.
#[derive(Debug, clap::Args)]
pub struct ClientFiles {
    /// The login on nodes (the config block's `User`, Ansible's `ansible_user`).
    #[arg(long, value_name = "LOGIN")]
    pub user: Option<String>,
    /// The private key from `burrowctl auth sign --out PATH` (its certificate is PATH-cert.pub)
    /// [default: ~/.ssh/burrow-CLUSTER].
    #[arg(long, value_name = "PATH")]
    pub key: Option<PathBuf>,
    /// Where to write the known_hosts file that trusts the cluster's host CA
    /// [default: ~/.ssh/burrow-CLUSTER_known_hosts].
    #[arg(long, value_name = "PATH")]
    pub known_hosts: Option<PathBuf>,
}

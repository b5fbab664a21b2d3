//! What both daemons do at their edges: read their YAML config file, log to stderr, turn
//! SIGTERM/SIGINT into a cancelled shutdown token, accept connections on their listeners, tell
//! systemd how they are ([`notify`]), keep private files private ([`fsutil`]), and read the
//! host's name and the wall clock, and serve their diagnostics ([`diag`]). Nothing here knows
//! Burrow's protocol.

pub mod diag;
pub mod fsutil;
pub mod notify;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The next connection on `listener`, or `None` once `shutdown` is cancelled. A failed accept
/// (out of file descriptors, say) is logged and retried after 100 ms instead of spinning.
pub async fn accept(
    listener: &TcpListener,
    shutdown: &CancellationToken,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok(a) => return Some(a),
                Err(e) => {
                    let at = listener.local_addr().ok();
                    tracing::warn!(error = %e, listener = ?at, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// What is wrong with a daemon's configuration: one sentence, naming the file or the flag.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl ConfigError {
    pub fn new(msg: impl Into<String>) -> Self {
        ConfigError(msg.into())
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Reads a YAML config file; an empty file is the default config. Errors name the file.
pub fn read_yaml_config<T: DeserializeOwned + Default>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
    if text.trim().is_empty() {
        return Ok(T::default());
    }
    serde_norway::from_str(&text)
        .map_err(|e| ConfigError(format!("config file {} is invalid: {e}", path.display())))
}

/// Logs to stderr at info (or debug), unless `RUST_LOG` says otherwise; colours only on a tty.
pub fn init_logging(debug: bool) {
    init_logging_at(if debug { "debug" } else { "info" });
}

/// Logs to stderr at `default`, unless `RUST_LOG` says otherwise; colours only on a tty. Both
/// are `level` or `target=level` directives, comma-separated (`info,burrow_proxy::web=debug`):
/// tracing-subscriber's `Targets`, which needs no regex engine (a third of a megabyte in a
/// small agent) as its `EnvFilter` does.
pub fn init_logging_at(default: &str) {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let from_env = std::env::var("RUST_LOG").ok().and_then(|text| {
        let parsed = text.parse::<Targets>();
        if parsed.is_err() {
            eprintln!("RUST_LOG={text:?} is not a list of level or target=level; ignored");
        }
        parsed.ok()
    });
    let filter = from_env.unwrap_or_else(|| default.parse().unwrap_or_default());
    let output = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    tracing_subscriber::registry()
        .with(output)
        .with(filter)
        .init();
}

/// How many threads a daemon's runtime has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// One thread (the agent: small footprint).
    One,
    /// One per core (the proxy).
    PerCore,
}

/// Runs `main` on a tokio runtime until it returns, with a shutdown token that the first SIGTERM
/// or SIGINT cancels. `Err`: the runtime could not start.
pub fn run_until_signal<F, Fut>(threads: Threads, main: F) -> std::io::Result<Fut::Output>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future,
{
    let runtime = match threads {
        Threads::One => tokio::runtime::Builder::new_current_thread(),
        Threads::PerCore => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build()?;
    let shutdown = CancellationToken::new();
    runtime.spawn(cancel_on_signal(shutdown.clone()));
    Ok(runtime.block_on(main(shutdown)))
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT.
pub async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}

/// Raises this process's soft limit on open files to its hard limit (systemd's default soft
/// limit is 1,024, and every tunnel holds a descriptor). Returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(_) => 0,
    }
}

/// This host's name, if it has a readable, non-empty one.
pub fn hostname() -> Option<String> {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
}

/// Wall-clock time since the Unix epoch (0 if the clock is before it).
fn since_epoch() -> std::time::Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// Unix seconds, as certificates, tokens and records count them.
pub fn unix_now() -> u64 {
    since_epoch().as_secs()
}

/// Unix milliseconds.
pub fn unix_now_ms() -> u64 {
    u64::try_from(since_epoch().as_millis()).unwrap_or(u64::MAX)
}

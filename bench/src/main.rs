//! burrow-bench: Burrow's load tool. `burrow-bench agents` runs many simulated agents in one
//! process with the agent's own library code: each joins the cluster for a real identity (one
//! multi-use token; identities are kept in the data dir, so a second run joins nobody), holds real
//! mutual-TLS tunnels (QUIC or TLS + yamux) with real pings and heartbeats, and answers dials to
//! port 3022 with an echo, a byte sink or a byte source instead of an SSH server. It prints how
//! many agents hold tunnels, once per `--report-every`, in lines scripts can read.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use burrow_agent::identity::Identity;
use burrow_agent::join::{JoinParams, join};
use burrow_agent::pool::{self, DialService, PoolConfig, TransportMode};
use burrow_tunnel::Keepalive;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tunnel_proto::pin::CaPin;
use tunnel_proto::secret::token_from_arg;

mod serve;

#[derive(Parser)]
#[command(
    name = "burrow-bench",
    version,
    about = "Burrow's load tool: many simulated agents in one process"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run N simulated agents until stopped (SIGINT/SIGTERM), `--run-for`, or `--exit-when-up`.
    Agents(AgentsArgs),
}

#[derive(clap::Args)]
struct AgentsArgs {
    /// The proxy's web address (host:port), as an agent's --proxy.
    #[arg(long, value_name = "HOST:PORT")]
    proxy: String,
    /// A multi-use node join token (or an absolute path to a file holding it); needed only for
    /// agents without a stored identity.
    #[arg(long, value_name = "VALUE_OR_ABS_PATH")]
    token: Option<String>,
    /// The cluster's CA pin (sha256:...), as `burrowctl status` shows it.
    #[arg(long = "ca-pin", value_name = "PIN", required = true)]
    ca_pins: Vec<String>,
    /// How many agents to run.
    #[arg(long, default_value_t = 100)]
    count: usize,
    /// Where the agents' identities are kept, one directory per agent.
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// Node names are PREFIX-0, PREFIX-1, ...
    #[arg(long, default_value = "bench")]
    name_prefix: String,
    #[arg(long, value_enum, default_value_t = TransportMode::Auto)]
    transport: TransportMode,
    /// Every tunnel's keep-alive (as `burrow-agent start --keepalive`) [default: the agent's].
    #[arg(long, value_name = "DURATION", value_parser = parse_keepalive)]
    keepalive: Option<Keepalive>,
    /// What answers dials to port 3022.
    #[arg(long, value_enum, default_value_t = Serve::Echo)]
    serve: Serve,
    /// Joins in flight at once.
    #[arg(long, default_value_t = 32)]
    join_parallel: usize,
    /// Tunnels each agent must hold to count as up (one per proxy behind a balancer).
    #[arg(long, default_value_t = 1)]
    tunnels_per_agent: usize,
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    report_every: Duration,
    /// Stop after this long (default: run until a signal).
    #[arg(long, value_parser = humantime::parse_duration)]
    run_for: Option<Duration>,
    /// Exit (status 0) as soon as every agent is up; with --run-for, exit 1 if they are not up
    /// by then.
    #[arg(long)]
    exit_when_up: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Serve {
    /// Sends back every byte.
    Echo,
    /// Sends an SSH-style banner line, then echoes (for dial latency).
    Banner,
    /// Reads and drops every byte.
    Sink,
    /// Sends zeros until the client closes.
    Source,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Thousands of agents: only their warnings and errors (RUST_LOG overrides).
    burrow_daemon::init_logging_at("warn");
    let Command::Agents(args) = cli.command;
    let threads = burrow_daemon::Threads::PerCore;
    match burrow_daemon::run_until_signal(threads, |shutdown| agents(args, shutdown)) {
        Err(e) => {
            eprintln!("burrow-bench: cannot start the runtime: {e}");
            ExitCode::from(1)
        }
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            eprintln!("burrow-bench: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn agents(args: AgentsArgs, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    let files = burrow_daemon::raise_fd_limit();
    if files < (args.count as u64) * 2 + 64 {
        tracing::warn!(
            files,
            count = args.count,
            "the open-file limit may be too low for this many agents"
        );
    }
    let pins = args
        .ca_pins
        .iter()
        .map(|p| p.parse::<CaPin>())
        .collect::<Result<Vec<_>, _>>()
        .context("invalid --ca-pin")?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create {}", args.data_dir.display()))?;

    let started = Instant::now();
    let identities = load_or_join(&args, &pins).await?;
    let joined = identities.iter().filter(|(_, fresh)| *fresh).count();
    let took = started.elapsed();
    println!(
        "joined {joined} agents in {:.2}s ({:.1}/s), {} from stored identities",
        took.as_secs_f64(),
        joined as f64 / took.as_secs_f64().max(1e-9),
        identities.len() - joined
    );

    let service: Arc<dyn DialService> = match args.serve {
        Serve::Echo => Arc::new(serve::Echo),
        Serve::Banner => Arc::new(serve::Banner),
        Serve::Sink => Arc::new(serve::Sink),
        Serve::Source => Arc::new(serve::Source),
    };
    let first = &identities[0].0;
    let cas = burrow_agent::host_cas(first)?;
    let addr = burrow_agent::join::find_tunnel_addr(&args.proxy, &cas, false)
        .await
        .unwrap_or_else(|| args.proxy.clone());
    let mut held = Vec::with_capacity(identities.len());
    // Senders of the agents' (fixed) labels: a dropped sender would end their tunnels.
    let mut label_senders = Vec::with_capacity(identities.len());
    let tunnels_from = Instant::now();
    for (identity, _) in &identities {
        let (label_tx, labels) = watch::channel(identity.labels.clone());
        label_senders.push(label_tx);
        let (held_tx, held_rx) = watch::channel(0);
        held.push(held_rx);
        let config = PoolConfig {
            addr: addr.clone(),
            web_addr: args.proxy.clone(),
            ladder: args.transport.ladder(),
            tls: Arc::new(std::sync::RwLock::new(Arc::new(burrow_agent::tunnel_tls(
                identity, &cas, false,
            )?))),
            host_id: identity.host_id.clone(),
            node_name: identity.node_name.clone(),
            labels,
            keepalive: args.keepalive,
            window: burrow_tunnel::Window::DEFAULT,
            dials: service.clone(),
            held: held_tx,
            telemetry: None,
            renewer: None,
            recordings: None,
        };
        let stop = shutdown.clone();
        let name = identity.node_name.clone();
        tokio::spawn(async move {
            if let Err(e) = pool::run(config, stop).await {
                tracing::error!(node = %name, error = %e, "agent stopped");
            }
        });
    }

    let deadline = args.run_for.map(|d| tunnels_from + d);
    let mut all_up_at = None;
    let mut tick = tokio::time::interval(args.report_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let (up, tunnels) = held.iter().fold((0, 0), |(up, tunnels), h| {
            let n = *h.borrow();
            (up + usize::from(n >= args.tunnels_per_agent), tunnels + n)
        });
        let t = tunnels_from.elapsed().as_secs_f64();
        println!(
            "t={t:.1}s at_ms={} agents_up={up}/{} tunnels={tunnels}",
            burrow_daemon::unix_now_ms(),
            held.len()
        );
        if up == held.len() && all_up_at.is_none() {
            all_up_at = Some(t);
            println!("all {} agents up in {t:.2}s", held.len());
            if args.exit_when_up {
                break;
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    shutdown.cancel();
    // Let the tunnels say goodbye.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(label_senders);
    if args.exit_when_up && all_up_at.is_none() {
        eprintln!("burrow-bench: not every agent was up before the run ended");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// Each agent's identity, loaded from its directory or got by joining (`true`: joined now).
async fn load_or_join(args: &AgentsArgs, pins: &[CaPin]) -> anyhow::Result<Vec<(Identity, bool)>> {
    let token = match &args.token {
        Some(t) => Some(token_from_arg(t).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let mut out: Vec<Option<(Identity, bool)>> = (0..args.count).map(|_| None).collect();
    let mut pending = Vec::new();
    for (i, slot) in out.iter_mut().enumerate() {
        let dir = args.data_dir.join(format!("{}-{i}", args.name_prefix));
        match Identity::load(&dir)? {
            Some(identity) => *slot = Some((identity, false)),
            None => pending.push((i, dir)),
        }
    }
    if !pending.is_empty() && token.is_none() {
        anyhow::bail!(
            "{} agents have no stored identity: pass --token to join them",
            pending.len()
        );
    }
    let mut joins = tokio::task::JoinSet::new();
    let mut pending = pending.into_iter();
    loop {
        while joins.len() < args.join_parallel.max(1) {
            let Some((i, dir)) = pending.next() else {
                break;
            };
            let token = token.clone().expect("checked above");
            let proxy = args.proxy.clone();
            let name = format!("{}-{i}", args.name_prefix);
            let pins = pins.to_vec();
            joins.spawn(async move {
                let identity = join(JoinParams {
                    proxy: &proxy,
                    token,
                    node_name: &name,
                    ca_pins: &pins,
                    insecure: false,
                    public_roots: false,
                })
                .await
                .with_context(|| format!("{name} cannot join"))?;
                identity.save(&dir)?;
                anyhow::Ok((i, identity))
            });
        }
        match joins.join_next().await {
            Some(done) => {
                let (i, identity) = done??;
                out[i] = Some((identity, true));
            }
            None => break,
        }
    }
    Ok(out
        .into_iter()
        .map(|o| o.expect("every agent has an identity"))
        .collect())
}

fn parse_keepalive(text: &str) -> Result<Keepalive, String> {
    let interval = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    Keepalive::new(interval).map_err(|e| e.to_string())
}

use std::io::IsTerminal;
use std::process::ExitCode;

use burrow_agent::config::{AgentConfig, Cli, Command, SAMPLE_CONFIG};
use clap::Parser;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Command::Configure => {
            print!("{SAMPLE_CONFIG}");
            return ExitCode::SUCCESS;
        }
        Command::Version => {
            println!("burrow-agent {}", tunnel_proto::VERSION);
            return ExitCode::SUCCESS;
        }
        Command::Start(args) => args,
    };
    let config = match AgentConfig::load(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("burrow-agent: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(config.debug);
    // One thread is plenty for an agent, and keeps its footprint small.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("burrow-agent: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let shutdown = CancellationToken::new();
    runtime.spawn(wait_for_signal(shutdown.clone()));
    match runtime.block_on(burrow_agent::run(config, shutdown)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("burrow-agent: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn wait_for_signal(shutdown: CancellationToken) {
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

fn init_logging(debug: bool) {
    let default = if debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

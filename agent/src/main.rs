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
    burrow_daemon::init_logging(config.debug);
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
    runtime.spawn(burrow_daemon::cancel_on_signal(shutdown.clone()));
    match runtime.block_on(burrow_agent::run(config, shutdown)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("burrow-agent: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

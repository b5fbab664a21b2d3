use std::process::ExitCode;

use burrow_proxy::config::{Cli, Command, ProxyConfig, SAMPLE_CONFIG};
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
            println!("burrow-proxy {}", tunnel_proto::VERSION);
            return ExitCode::SUCCESS;
        }
        Command::Start(args) => *args,
    };
    let config = match ProxyConfig::load(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("burrow-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    burrow_daemon::init_logging(config.debug);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("burrow-proxy: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let shutdown = CancellationToken::new();
    runtime.spawn(burrow_daemon::cancel_on_signal(shutdown.clone()));
    match runtime.block_on(burrow_proxy::run(config, shutdown)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("burrow-proxy: {e:#}");
            ExitCode::from(1)
        }
    }
}

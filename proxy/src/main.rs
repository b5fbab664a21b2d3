use std::process::ExitCode;

use burrow_proxy::config::{Cli, Command, ProxyConfig, SAMPLE_CONFIG};
use clap::Parser;

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
    burrow_proxy::heap::tune();
    let threads = burrow_daemon::Threads::PerCore;
    match burrow_daemon::run_until_signal(threads, |shutdown| burrow_proxy::run(config, shutdown)) {
        Err(e) => {
            eprintln!("burrow-proxy: cannot start the runtime: {e}");
            ExitCode::from(1)
        }
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            tracing::error!("{e:#}");
            eprintln!("burrow-proxy: {e:#}");
            ExitCode::from(1)
        }
    }
}

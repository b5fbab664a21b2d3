use std::process::ExitCode;

use burrow_agent::config::{AgentConfig, Cli, Command, Format, SAMPLE_CONFIG, StatusArgs};
use clap::Parser;

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
        Command::Status(args) => return status(&args),
        Command::Start(args) => *args,
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
    let threads = burrow_daemon::Threads::One;
    match burrow_daemon::run_until_signal(threads, |shutdown| burrow_agent::run(config, shutdown)) {
        Err(e) => {
            eprintln!("burrow-agent: cannot start the runtime: {e}");
            ExitCode::from(1)
        }
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("burrow-agent: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn status(args: &StatusArgs) -> ExitCode {
    let data_dir = match args.data_dir() {
        Ok(dir) => dir,
        Err(e) => {
            eprintln!("burrow-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let report = match burrow_agent::status::report(&data_dir) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("burrow-agent: {e}");
            return ExitCode::from(1);
        }
    };
    match args.format {
        Format::Json => match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("burrow-agent: {e}");
                return ExitCode::from(1);
            }
        },
        Format::Text => print!("{}", burrow_agent::status::render(&report, &data_dir)),
    }
    ExitCode::SUCCESS
}

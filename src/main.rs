//! The ferry command line: parse arguments, set up logging, hand over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A reverse-proxy load balancer with nginx's upstream semantics.
#[derive(Parser, Debug)]
#[command(name = "ferry", version, about)]
struct Cli {
    /// Configuration file.
    #[arg(short, long, global = true, default_value = "ferry.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate the configuration and print a summary; exit 1 when invalid (like nginx -t).
    Check,
    /// Start demo backends and a ferry in front of them on 127.0.0.1:8080.
    Demo,
    /// Ask the ferry running with this configuration for /healthz on its admin
    /// listener; exit 0 when it answers 200, 1 otherwise (for Docker's HEALTHCHECK).
    Health,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Some(Command::Check) => match ferry::config::Config::load(&cli.config).and_then(|mut c| {
            // Certificates, keys and CA files are read and checked too.
            ferry::tls::load(&mut c).map(|()| c)
        }) {
            Ok(cfg) => {
                print!("{}", cfg.summary());
                println!(
                    "ferry: the configuration file {} is valid",
                    cli.config.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ferry: {e}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Health) => match ferry::config::Config::load(&cli.config)
            .map_err(|e| e.to_string())
            .and_then(|cfg| ferry::admin::probe_healthz(&cfg))
        {
            Ok(addr) => {
                println!("ferry: healthy (http://{addr}/healthz answered 200)");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ferry: unhealthy: {e}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Demo) => match ferry::demo::run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ferry demo: {e}");
                ExitCode::FAILURE
            }
        },
        None => {
            let cfg = match ferry::config::Config::load(&cli.config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("ferry: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match ferry::server::run(cfg, None, None) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ferry: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

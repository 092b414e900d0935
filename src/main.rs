//! The `cascade` command: `run` serves a config, `check` validates one (like `nginx -t`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// cascade: an edge proxy for object storage with per-request origin selection,
/// 404 fallback replay to read-only fallback buckets, and SigV4-signed upstreams.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the configuration until SIGTERM/SIGINT.
    Run {
        /// The YAML config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate the configuration and exit: 0 when valid, 1 with every error printed as
    /// FILE:LINE:COL: FIELD: message.
    Check {
        /// The YAML config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    match cli.command {
        Command::Check { config } => {
            match cascade::config::load_file(&config, &cascade::config::process_env) {
                Ok(cfg) => {
                    // Plugins are loaded too (compiled, started, configured): a plugin that
                    // rejects its configuration fails the check like any config error.
                    if let Err(e) = cascade::plugin::Runtime::load(&cfg) {
                        eprintln!("{e}");
                        return ExitCode::FAILURE;
                    }
                    println!(
                        "{}: ok ({} listeners, {} origins, {} groups, {} routes, {} plugins)",
                        config.display(),
                        cfg.listen.len(),
                        cfg.origins.len(),
                        cfg.groups.len(),
                        cfg.routes.len(),
                        cfg.plugins.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(errs) => {
                    eprintln!("{errs}");
                    eprintln!("{}: {} error(s)", config.display(), errs.0.len());
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run { config } => {
            let cfg = match cascade::config::load_file(&config, &cascade::config::process_env) {
                Ok(c) => c,
                Err(errs) => {
                    eprintln!("{errs}");
                    return ExitCode::FAILURE;
                }
            };
            let server = match cascade::build_server(&cfg) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("cascade: {e}");
                    return ExitCode::FAILURE;
                }
            };
            log::info!(
                "cascade listening on {} ({} routes)",
                cfg.listen
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                cfg.routes.len()
            );
            server.run_forever()
        }
    }
}

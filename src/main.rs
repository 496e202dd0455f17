//! The `hotpipe` binary: parses the command line, sets up logging, calls the library.
//! `anyhow` lives here and nowhere else.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use hotpipe::config::Config;

#[derive(Parser)]
#[command(
    name = "hotpipe",
    version,
    about = "A folder in, a GPU image model, a folder out."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline once over files and folders, writing results into --out.
    Process {
        #[arg(long, default_value = "pipeline.toml")]
        config: PathBuf,
        /// Output folder (created if missing); existing files are never replaced.
        #[arg(long)]
        out: PathBuf,
        /// Input files and folders (folders are read recursively, hidden entries skipped).
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// No progress bar or progress lines.
        #[arg(long)]
        quiet: bool,
    },
    /// Measure each stage alone on a folder's images, then the whole pipeline, and say
    /// which stage bounds it.
    Bench {
        #[arg(long, default_value = "pipeline.toml")]
        config: PathBuf,
        /// Seconds to run each stage (at least one pass over the folder).
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Measure the stages only, not the whole pipeline.
        #[arg(long)]
        stages_only: bool,
        folder: PathBuf,
    },
    /// Run the hot-folder daemon on the config's [hotfolder] root until SIGTERM/SIGINT
    /// (SIGHUP reloads the config).
    Run {
        #[arg(long, default_value = "pipeline.toml")]
        config: PathBuf,
    },
    /// Validate the config, load the model, run one dummy batch and describe it.
    Check {
        #[arg(long, default_value = "pipeline.toml")]
        config: PathBuf,
    },
}

/// Logs go to journald, with fields, when systemd connected stderr to the journal
/// (`JOURNAL_STREAM` is set); to stderr otherwise.
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_env("HOTPIPE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if std::env::var_os("JOURNAL_STREAM").is_some()
        && let Ok(journald) = tracing_journald::layer()
    {
        tracing_subscriber::registry()
            .with(filter)
            .with(journald.with_syslog_identifier("hotpipe".into()))
            .init();
        return;
    }
    // Colour only for a person at a terminal (and not with NO_COLOR): escape codes in a
    // log file or a pipe are noise, and a reader of a file should see only text.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    init_logging();
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Process {
            config,
            out,
            inputs,
            quiet,
        } => {
            let cfg = Config::load(&config)?;
            let inputs = hotpipe::process::collect_inputs(&inputs).map_err(anyhow::Error::msg)?;
            let opts = hotpipe::process::RunOptions { progress: !quiet };
            let s = hotpipe::process::run(&cfg, inputs, &out, opts)
                .context("pipeline failed to start")?;
            tracing::info!("stage telemetry\n{}", s.report);
            println!(
                "done {}, failed {}, {:.2} s, {:.1} images/s",
                s.done,
                s.failed.len(),
                s.elapsed.as_secs_f64(),
                s.images_per_s()
            );
            println!(
                "runtime: {} on {:?}, batch {}",
                s.info.model, s.info.devices, s.info.max_batch
            );
            for f in &s.failed {
                println!("failed: {}: {}: {}", f.path.display(), f.stage, f.reason);
            }
            Ok(if s.failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Bench {
            config,
            seconds,
            stages_only,
            folder,
        } => {
            let cfg = Config::load(&config)?;
            let opts = hotpipe::bench::BenchOptions {
                min_time: std::time::Duration::from_secs_f64(seconds.max(0.0)),
                pipeline: !stages_only,
            };
            print!("{}", hotpipe::bench::run(&cfg, &folder, &opts)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { config } => {
            // Before any thread exists: the signal mask is inherited by every thread.
            let signals = hotpipe::service::signals::install().context("cannot set up signals")?;
            hotpipe::service::run(&config, signals)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config } => {
            let cfg = Config::load(&config)?;
            let report = hotpipe::check::check(&cfg)?;
            print!("{report}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

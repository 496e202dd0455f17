//! The `hotpipe` binary: parses the command line, finds and reads the config, sets up
//! logging, calls the library, and turns the outcome into an exit status. `anyhow`
//! lives here and nowhere else.
//!
//! The exit status tells a supervisor what kind of failure it was: 78 (`EX_CONFIG`) for
//! a config that cannot be found, read or validated, which a restart cannot fix (the
//! systemd unit's `RestartPreventExitStatus=78`); 2 for a usage error (clap's own); 1 for
//! anything else.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use hotpipe::config::{CONFIG_ENV, ConfigError, ConfigSource, NamedBy, Override};
use hotpipe::service::ServiceError;

/// `EX_CONFIG` from sysexits.h.
const EXIT_CONFIG: u8 = 78;
/// Any failure that is neither a config nor a usage error.
const EXIT_FAILURE: u8 = 1;
/// A usage error, as clap exits with: here a `--param` or `--manifest` row that the
/// `[params]` schema refuses.
const EXIT_USAGE: u8 = 2;

const AFTER_HELP: &str = "\
Config lookup, in order (a file named by 1 or 2 must exist; of 3 and 4, the first that does):
  1. -c/--config FILE
  2. $HOTPIPE_CONFIG
  3. ./pipeline.toml
  4. /etc/hotpipe/pipeline.toml
Relative paths inside the file are resolved against the file's folder.
--set SECTION.KEY=VALUE (run, process, check, bench; repeatable, the last of a key
wins) changes one key after the file is read and before it is validated: VALUE is a
TOML value (85, true, [640, 480], \"text\") or, when it is not one, the string it spells
(cuda:1, /srv/in). run keeps its --set across reloads (SIGHUP).

Exit status:
  0   success
  1   failure: a model or device that does not work, an input that failed (process)
  2   usage error: an unknown option, a missing argument, a malformed --set, a --param
      or --manifest row that the [params] schema refuses or whose image is missing
  78  config error: no config found, unreadable, not TOML, a key unknown or invalid
      (EX_CONFIG: systemd's RestartPreventExitStatus=78 stops restarting it)";

#[derive(Parser)]
#[command(
    name = "hotpipe",
    version,
    about = "A folder in, a GPU image model, a folder out.",
    after_help = AFTER_HELP
)]
struct Cli {
    /// The config file [default: $HOTPIPE_CONFIG, else ./pipeline.toml, else
    /// /etc/hotpipe/pipeline.toml]
    #[arg(short = 'c', long, global = true, env = CONFIG_ENV, value_name = "FILE")]
    config: Option<OsString>,
    #[command(subcommand)]
    command: Command,
}

/// The options of every verb that reads the config once.
#[derive(Args)]
struct ConfigArgs {
    /// Override one config key, validated like the file (repeatable), e.g.
    /// --set encode.quality=85 --set model.device=cuda:1
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<Override>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline once over files and folders, writing results into --out.
    #[command(after_help = AFTER_HELP)]
    Process {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Output folder (created if missing); existing files are never replaced.
        #[arg(long)]
        out: PathBuf,
        /// Input files and folders (folders are read recursively, hidden entries skipped).
        #[arg(required_unless_present = "manifest")]
        inputs: Vec<PathBuf>,
        /// Set a parameter declared in [params.schema] for every image (repeatable), e.g.
        /// --param prompt="a red coat" --param seed=7
        #[arg(long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
        /// One image per row with its own parameters: JSON Lines, e.g.
        /// {"image": "faces/a.jpg", "prompt": "a red coat", "seed": 7}, or a .csv with a
        /// header row (image,prompt,seed); paths are relative to the manifest; its values
        /// override --param
        #[arg(long, value_name = "FILE")]
        manifest: Option<PathBuf>,
        /// No progress bar or progress lines.
        #[arg(long)]
        quiet: bool,
        /// Print the summary as one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Measure each stage alone on a folder's images, then the whole pipeline, and say
    /// which stage bounds it.
    #[command(after_help = AFTER_HELP)]
    Bench {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Seconds to run each stage (at least one pass over the folder).
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Measure the stages only, not the whole pipeline.
        #[arg(long)]
        stages_only: bool,
        /// Print the report as one JSON object on stdout.
        #[arg(long)]
        json: bool,
        folder: PathBuf,
    },
    /// Run the hot-folder daemon on the config's [hotfolder] root until SIGTERM/SIGINT
    /// (SIGHUP reloads the config).
    #[command(after_help = AFTER_HELP)]
    Run {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Cluster mode: run as the hot folder's collect node or as a worker (overrides
        /// [cluster] role; needs a [cluster] table)
        #[arg(long, value_enum, env = "HOTPIPE_ROLE")]
        role: Option<RoleArg>,
    },
    /// Validate the config, load the model, run one dummy batch and describe it.
    #[command(after_help = AFTER_HELP)]
    Check {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Print the findings as one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Cluster mode on NATS JetStream ([cluster]): set up and inspect the server's side.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RoleArg {
    Collect,
    Worker,
}

impl From<RoleArg> for hotpipe::config::Role {
    fn from(r: RoleArg) -> Self {
        match r {
            RoleArg::Collect => hotpipe::config::Role::Collect,
            RoleArg::Worker => hotpipe::config::Role::Worker,
        }
    }
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Create the work stream, the workers' consumer and the buckets, or apply the
    /// config to those that exist (safe to run again).
    #[command(after_help = AFTER_HELP)]
    Init {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Print the report as one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Queue depth, items in flight (and how many of them redelivered), outcomes and the
    /// workers alive.
    #[command(after_help = AFTER_HELP)]
    Status {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Print the status as one JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
}

/// Logs go to journald, with fields, when systemd connected stderr to the journal
/// (`JOURNAL_STREAM` names stderr's device and inode); to stderr otherwise, also when
/// the variable was inherited by a process whose stderr is a pipe or a file.
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_env("HOTPIPE_LOG")
        // The NATS client logs every (re)connection at info: warnings and errors only.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn"));
    if hotpipe::service::systemd::journal_is_stderr()
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
    // stderr, with `hotpipe process`'s progress bar (when it shows one) taken off the
    // screen for each line, so that lines and bar do not garble each other.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(hotpipe::process::LogWriter)
        .init();
}

/// The parsed command line and what named the config file, if anything did (clap has
/// merged `--config` and `HOTPIPE_CONFIG`; the source is kept for the error message when
/// the file is not there). Usage errors exit here, with clap's status 2.
fn parse_cli() -> (Cli, Option<(PathBuf, NamedBy)>) {
    let matches = Cli::command().get_matches();
    let named_by = match matches.value_source("config") {
        Some(ValueSource::EnvVariable) => NamedBy::Env,
        _ => NamedBy::Flag,
    };
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let named = match cli.config.clone() {
        // `HOTPIPE_CONFIG=` (set but empty, as an `Environment=` line left blank) means
        // unset, as for most variables; an empty `--config ""` is a path that is not there.
        Some(p) if p.is_empty() && named_by == NamedBy::Env => None,
        Some(p) => Some((PathBuf::from(p), named_by)),
        None => None,
    };
    (cli, named)
}

fn main() -> ExitCode {
    let (cli, named) = parse_cli();
    init_logging();
    match real_main(cli.command, named) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", chain_text(&e));
            ExitCode::from(exit_status(&e))
        }
    }
}

/// The error and its causes, `: `-joined as anyhow's `{:#}` does, but a cause whose text
/// the message already holds (an error that prints its source) is not said twice.
fn chain_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let t = cause.to_string();
        if text.contains(&t) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&t);
    }
    text
}

/// 78 when the error, or one it wraps, says the config is wrong; 2 for parameters the
/// schema refuses; 1 otherwise.
fn exit_status(e: &anyhow::Error) -> u8 {
    if e.chain().any(|c| c.is::<hotpipe::jobs::JobsError>()) {
        return EXIT_USAGE;
    }
    let config = e.chain().any(|c| {
        c.is::<ConfigError>()
            || matches!(
                c.downcast_ref::<ServiceError>(),
                Some(ServiceError::Config(_) | ServiceError::NoHotfolder(_))
            )
    });
    if config { EXIT_CONFIG } else { EXIT_FAILURE }
}

fn real_main(command: Command, named: Option<(PathBuf, NamedBy)>) -> anyhow::Result<ExitCode> {
    let source = |args: ConfigArgs| -> Result<ConfigSource, ConfigError> {
        Ok(ConfigSource {
            path: hotpipe::config::locate(named.clone())?,
            overrides: args.set,
        })
    };
    match command {
        Command::Process {
            cfg,
            out,
            inputs,
            params,
            manifest,
            quiet,
            json,
        } => {
            let what = ProcessInputs {
                inputs: &inputs,
                params: &params,
                manifest: manifest.as_deref(),
            };
            process(source(cfg)?, &out, &what, quiet, json)
        }
        Command::Bench {
            cfg,
            seconds,
            stages_only,
            json,
            folder,
        } => {
            let cfg = source(cfg)?.load()?;
            let opts = hotpipe::bench::BenchOptions {
                min_time: std::time::Duration::from_secs_f64(seconds.max(0.0)),
                pipeline: !stages_only,
            };
            let report = hotpipe::bench::run(&cfg, &folder, &opts)?;
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{report}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { cfg, role } => {
            // Before the config is read and the pipeline starts, so that a SIGTERM from
            // then on is a clean stop (until here it has its default effect).
            let signals = hotpipe::service::signals::install().context("cannot set up signals")?;
            hotpipe::service::run(&source(cfg)?, signals, role.map(Into::into))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { cfg, json } => {
            let report = hotpipe::check::check(&source(cfg)?.load()?)?;
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{report}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Cluster { action } => {
            let (cfg, json, init) = match action {
                ClusterAction::Init { cfg, json } => (cfg, json, true),
                ClusterAction::Status { cfg, json } => (cfg, json, false),
            };
            cluster(source(cfg)?.load()?, init, json)
        }
    }
}

/// `hotpipe cluster init|status`.
fn cluster(cfg: hotpipe::config::Config, init: bool, json: bool) -> anyhow::Result<ExitCode> {
    let Some(cluster) = &cfg.cluster else {
        return Err(ConfigError::Parse {
            path: cfg.source.clone(),
            message: "has no [cluster] table; cluster mode needs one (README: Cluster mode)".into(),
        }
        .into());
    };
    let c = hotpipe::cluster::Cluster::connect(cluster)?;
    let out = if init {
        render(&c.init()?, json)
    } else {
        render(&c.status()?, json)
    };
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

/// A report as text, or as one line of JSON.
fn render<T: std::fmt::Display + serde::Serialize>(r: &T, json: bool) -> String {
    if json {
        format!("{}\n", serde_json::to_string(r).expect("reports serialise"))
    } else {
        r.to_string()
    }
}

/// What `process` runs: its inputs, `--param`s and `--manifest`.
struct ProcessInputs<'a> {
    inputs: &'a [PathBuf],
    params: &'a [String],
    manifest: Option<&'a std::path::Path>,
}

fn process(
    source: ConfigSource,
    out: &std::path::Path,
    what: &ProcessInputs<'_>,
    quiet: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let cfg = source.load()?;
    let inputs = hotpipe::process::collect_inputs(what.inputs).map_err(anyhow::Error::msg)?;
    let jobs = hotpipe::jobs::plan(cfg.params.as_ref(), inputs, what.params, what.manifest)?;
    let opts = hotpipe::process::RunOptions { progress: !quiet };
    let s =
        hotpipe::process::run_jobs(&cfg, jobs, out, opts).context("pipeline failed to start")?;
    if json {
        println!("{}", s.to_json());
    } else {
        print!("{s}");
    }
    Ok(if s.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILURE)
    })
}

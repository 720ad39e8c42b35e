//! `podwire-agent`: the podwire node agent.
#![forbid(unsafe_code)]

mod error;
mod install;
mod lookup_server;
mod metrics;
mod pods_dir;
mod run;
mod serve;
mod watcher;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

/// podwire node agent: installs podwire-cni and keeps it chained into the node's CNI config, answers
/// its pod look-ups from a node-local cache, reports status and repairs pods that raced it.
#[derive(Debug, Parser)]
#[command(name = "podwire-agent", version, propagate_version = true)]
struct Cli {
    /// How much to log (to stderr)
    #[arg(long, value_enum, global = true, default_value_t = LogLevel::Info, value_name = "LEVEL")]
    log_level: LogLevel,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Serve(serve::ServeArgs),
    /// Install podwire-cni into the CNI bin dir and chain it into the primary CNI config
    /// (the lexically first valid .conf/.conflist, as kubelet picks it); waits for one if
    /// there is none yet. With --watch, keep it chained and undo it on SIGTERM/SIGINT.
    Install(install::InstallCmd),
    /// Remove podwire-cni from every CNI config in the conf dir (restoring a wrapped .conf)
    /// and the binary from the bin dir.
    Uninstall(install::InstallArgs),
    /// The DaemonSet mode: install + watch, answer look-ups from a cache of this node's pods
    /// (spec.nodeName), report status (/healthz, /readyz, /metrics, Node condition
    /// PodwireReady, Events), repair mesh pods that started un-redirected, and remove
    /// podwire from the node on SIGTERM when its DaemonSet is being deleted.
    Run(Box<run::RunArgs>),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl From<LogLevel> for tracing::Level {
    fn from(level: LogLevel) -> Self {
        match level {
            LogLevel::Error => tracing::Level::ERROR,
            LogLevel::Warn => tracing::Level::WARN,
            LogLevel::Info => tracing::Level::INFO,
            LogLevel::Debug => tracing::Level::DEBUG,
            LogLevel::Trace => tracing::Level::TRACE,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_max_level(tracing::Level::from(cli.log_level))
        .with_target(false)
        .init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{}", podwire_core::error::report(err.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    // The node has few cores and the work is small: one thread, plus at most two for the
    // blocking directory reads.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .max_blocking_threads(2)
        .build()
        .context("cannot start the async runtime")?;
    let result = match command {
        Command::Serve(args) => runtime.block_on(serve::run(args)).context("serve"),
        Command::Install(cmd) => runtime.block_on(install::run(cmd)).context("install"),
        Command::Run(args) => runtime.block_on(run::run(*args)).context("run"),
        Command::Uninstall(args) => install::uninstall(&args).map(|_| ()).context("uninstall"),
    };
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

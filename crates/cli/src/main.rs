//! `cacheclear`: keeps a Redis cache consistent with PostgreSQL through logical replication.
//!
//! Commands: `run` (the pipeline: PostgreSQL → Redis or Kafka), `invalidate` (Kafka → Redis),
//! `doctor` (checks a deployment from either's config), `audit` (consistency nines of a live
//! deployment),
//! and, with the default feature `lab`, `demo` (the flash sale, end to end) and `bench` (measured
//! figures). `cacheclear <command> --help` documents each. This crate only parses arguments,
//! loads configuration and runs the long-running commands; the components live in their own
//! crates (docs/architecture.md), the demo and the benchmarks in `cacheclear-lab`.

mod audit;
mod config;
mod doctor;
mod invalidate;
mod run;
mod serve;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Keeps a Redis cache consistent with PostgreSQL: streams committed changes over logical
/// replication (pgoutput) and evicts the affected cache keys, never before the change is visible
/// and never losing one.
#[derive(Parser)]
#[command(name = "cacheclear", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the invalidation pipeline: PostgreSQL logical replication → Redis evictions.
    ///
    /// Creates the publication and slot when absent, checks every rule against its table's replica
    /// identity, then streams until Ctrl-C / SIGTERM. Serves Prometheus metrics on
    /// `metrics.listen` (default 127.0.0.1:9187/metrics).
    Run {
        /// The TOML config file; environment variables CACHECLEAR__<SECTION>__<FIELD> override it.
        #[arg(short, long, default_value = "cacheclear.toml")]
        config: PathBuf,
    },
    /// Check a deployment from the config `run` or `invalidate` uses: PostgreSQL (wal_level,
    /// role, publication, replica identity, slot), Redis (maxmemory-policy, scripting, cluster)
    /// and Kafka (topics, group lag); one line per check with the fix.
    ///
    /// Exits 0 when nothing failed, 1 otherwise. An invalidator config is recognised by its
    /// `kafka.group_id`.
    Doctor {
        /// The TOML config file (`run`'s or `invalidate`'s); environment variables
        /// CACHECLEAR__<SECTION>__<FIELD> override it.
        #[arg(short, long, default_value = "cacheclear.toml")]
        config: PathBuf,
        /// Print `{"checks": [{"id", "status", "found", "fix"}]}` instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Measure how consistent a live deployment's cache is (consistency nines, as Meta's
    /// Polaris): follow its invalidations through a WAL tap on slot `<postgres.slot>_audit` and
    /// check a sample of them in Redis 1 s, 5 s and 60 s later, or, with `--scan N`, compare N
    /// cached values' read positions with their keys' fences.
    ///
    /// Uses `run`'s config (direct mode: `[postgres]`, `[redis]`, `[[rules]]`); the publication
    /// must exist. Exits 1 when a window's nines are below `--min-nines`.
    Audit(audit::AuditArgs),
    /// Measure the pipeline and print its figures (each with the command that produced it).
    #[cfg(feature = "lab")]
    Bench {
        #[command(subcommand)]
        which: cacheclear_lab::bench::BenchCommand,
    },
    /// The flash sale, end to end, zero config: private PostgreSQL and Redis, a catalog, shoppers,
    /// the sale ending mid-run; ttl-only cache-aside against cacheclear, side by side.
    ///
    /// Takes about 30 s with the defaults on 2 cores. `--json` prints the figures as one JSON
    /// object.
    #[cfg(feature = "lab")]
    Demo(cacheclear_lab::demo::DemoArgs),
    /// Run the Kafka → Redis invalidator: a consumer group applying bus records (and Debezium
    /// PostgreSQL change events) to Redis, committing offsets only after Redis acknowledged them.
    ///
    /// Start one process per core or host with the same `kafka.group_id` to share the partitions;
    /// one group per Redis deployment. Serves Prometheus metrics on `metrics.listen` (default
    /// 127.0.0.1:9188/metrics). Stops on Ctrl-C / SIGTERM.
    Invalidate {
        /// The TOML config file; environment variables CACHECLEAR__<SECTION>__<FIELD> override it.
        #[arg(short, long, default_value = "invalidator.toml")]
        config: PathBuf,
    },
}

/// Logs go to stderr, coloured only when stderr is a terminal and `NO_COLOR` is unset (a file,
/// a pipe or journald gets plain text).
fn init_logs(default: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("CACHECLEAR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

/// Prints an error and its causes (no backtrace, even with `RUST_BACKTRACE` set: these are
/// configuration and environment errors, not bugs) and exits with status 1.
fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e}");
            let mut causes = e.chain().skip(1).peekable();
            if causes.peek().is_some() {
                eprintln!("\nCaused by:");
                for cause in causes {
                    eprintln!("    {cause}");
                }
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The demo draws a progress bar on stderr: only warnings interrupt it.
    init_logs(match cli.command {
        #[cfg(feature = "lab")]
        Command::Demo(_) => "warn",
        Command::Doctor { .. } | Command::Audit(_) => "warn",
        _ => "info",
    });
    // `run` is one pipeline: a chain of hand-offs between tasks (replication worker → reader →
    // barrier → apply → Redis), and on one thread they cost no cross-thread wake-ups. Measured
    // with `bench pipeline` (README, "Against the floor"): lower lag p99, a faster bulk and less
    // memory than on a worker per core; the pipeline used under half a core even in a bulk.
    let runtime = match &cli.command {
        Command::Run { .. } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        _ => tokio::runtime::Runtime::new()?,
    };
    match cli.command {
        Command::Run { config } => runtime.block_on(run::run(&config)),
        #[cfg(feature = "lab")]
        Command::Bench { which } => runtime.block_on(cacheclear_lab::bench::bench(which)),
        #[cfg(feature = "lab")]
        Command::Demo(args) => runtime.block_on(cacheclear_lab::demo::demo(args)),
        Command::Invalidate { config } => runtime.block_on(invalidate::invalidate(&config)),
        Command::Audit(args) => {
            if runtime.block_on(audit::audit(&args))? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        Command::Doctor { config, json } => {
            if runtime.block_on(doctor::doctor(&config, json))? {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
    }
}

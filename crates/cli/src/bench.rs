//! `cacheclear bench …`: measured figures.

use clap::Subcommand;

/// Which benchmark to run.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Commit→evicted lag at steady 1k and 10k row changes/s, bulk UPDATE throughput, peak RSS.
    Pipeline {
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
}

/// Runs one benchmark.
pub async fn bench(which: BenchCommand) -> anyhow::Result<()> {
    match which {
        BenchCommand::Pipeline { json: _ } => anyhow::bail!("bench pipeline is not built yet"),
    }
}

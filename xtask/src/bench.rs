//! Benchmarks (being written).
use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Which {
    Dataplane,
}

pub fn run(_which: Which) -> Result<()> {
    bail!("benchmarks are not written yet")
}

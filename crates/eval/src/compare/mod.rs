//! The comparison the paper reports, from one config: the base model's evaluation, then SFT,
//! SAP and the safety-mixing baseline fine-tuned on the same benign (optionally poisoned)
//! data, each a normal run directory, each evaluated the same way, over one or more seeds.
//!
//! Table: method | HS | task metric | validation loss | time per step | overhead vs SFT.
//!
//! The parts, by concern: `config` (what to compare, checked before anything runs, and each
//! run's config), `execute` (training and evaluating every run), `aggregate` (tables, paired
//! differences and findings from the runs' results), `report` (the Markdown).

mod aggregate;
mod config;
mod execute;
mod report;
mod slurm;
#[cfg(test)]
mod tests;

/// The demo comparison's config (`safeprobe compare` without --config).
pub const DEMO_CONFIG: &str = include_str!("../../demo-compare.toml");

// What a comparison reports is made of wire types: the server stores it and the UI shows it.
pub use safeprobe_wire::{Comparison, Condition, Method, Row, RunResult, Spread, poison_percent};

pub use config::{CompareConfig, Comparing};
pub use execute::{Progress, run};
pub use report::render;

//! safeprobe's evaluation crate: the harmful score with refusal and model judges, task
//! metrics, harmful prompt sets, generated benign tasks, the built-in data, the demo model and
//! the SFT-vs-SAP comparison.

pub mod builtin;
pub mod compare;
pub mod data_home;
pub mod demo_model;
pub mod error;
pub mod guard;
pub mod harmful;
pub mod howto;
pub mod judge;
pub mod paired;
pub mod prompts;
pub mod requests;
pub mod task_metrics;
pub mod tasks;

pub use error::{EvalError, Result};

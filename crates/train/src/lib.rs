//! safeprobe's trainer: supervised fine-tuning and Safety-Aware Probing on burn.

pub mod adamw;
pub mod admission;
pub mod checkpoint;
pub mod data;
pub mod error;
pub mod kernels;
pub mod loss;
pub mod params;
pub mod run;
pub mod safety_check;
pub mod sap;

pub use error::{Result, TrainError};

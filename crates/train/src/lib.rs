//! safeprobe's trainer: supervised fine-tuning, Safety-Aware Probing and other defences on
//! burn.

pub mod adamw;
pub mod admission;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod gradients;
pub mod kernels;
pub mod loss;
pub mod methods;
pub mod metrics_log;
pub mod params;
pub mod prepare;
pub mod run;
pub mod safety_check;

pub use methods::sap;

pub use error::{Result, TrainError};

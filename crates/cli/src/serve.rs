//! The web control panel, and the job process it starts for each job.

use std::path::PathBuf;

use anyhow::Result;

use crate::{DeviceArg, select_device, this_program};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on; a non-loopback address needs --token
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub bind: std::net::SocketAddr,
    /// Access token required on every API call (default: $SAFEPROBE_TOKEN)
    #[arg(long)]
    pub token: Option<String>,
    /// Holds the run store (safeprobe.db) and run directories
    #[arg(long, default_value = "safeprobe-data")]
    pub data_dir: PathBuf,
    /// A directory of model checkpoints requests may use (repeatable)
    #[arg(long = "models")]
    pub model_dirs: Vec<PathBuf>,
    /// A directory of data files requests may use (repeatable; the data dir is always one)
    #[arg(long = "datasets")]
    pub dataset_dirs: Vec<PathBuf>,
    /// A host name requests may be addressed to besides localhost and the bound address,
    /// e.g. the machine's name or a reverse proxy's (repeatable)
    #[arg(long = "allowed-host")]
    pub allowed_hosts: Vec<String>,
    /// The most optimiser steps one job may plan (a comparison counts all its runs)
    #[arg(long, default_value_t = 100_000)]
    pub max_steps: usize,
    /// Checkpoints a training run keeps (its newest ones)
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    pub keep_checkpoints: u64,
    /// The largest dataset a browser may upload, in MiB
    #[arg(long, default_value_t = 512)]
    pub max_upload_mib: usize,
    /// The most memory one job may take, in MiB (default: 90% of this machine's memory
    /// on the CPU; on a GPU, whose free memory wgpu does not report, no limit)
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub job_memory_mib: Option<u64>,
    /// The longest prompt a chat may send, in tokens (the model's context caps it too)
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_prompt_tokens: u64,
    #[command(flatten)]
    pub device: DeviceArg,
}

impl ServeArgs {
    /// Serves until Ctrl-C.
    pub fn run(self) -> Result<()> {
        let ServeArgs {
            bind,
            token,
            data_dir,
            model_dirs,
            dataset_dirs,
            allowed_hosts,
            max_steps,
            keep_checkpoints,
            max_upload_mib,
            job_memory_mib,
            max_prompt_tokens,
            device,
        } = self;
        let selected = select_device(&device)?;
        let config = safeprobe_server::ServerConfig {
            device: device.device.clone(),
            worker_program: this_program()?,
            bind,
            token: token.or_else(|| std::env::var("SAFEPROBE_TOKEN").ok()),
            data_dir,
            model_dirs,
            dataset_dirs,
            allowed_hosts,
            limits: safeprobe_server::jobs::Limits {
                max_steps,
                keep_checkpoints: keep_checkpoints as usize,
                job_memory: job_memory_mib.map(|m| m.saturating_mul(1 << 20)),
                max_prompt_tokens: max_prompt_tokens as usize,
            },
            max_upload_bytes: max_upload_mib << 20,
        };
        safeprobe_server::serve_blocking(config, selected)?;
        Ok(())
    }
}

#[derive(clap::Args)]
pub struct JobArgs {
    #[command(flatten)]
    pub device: DeviceArg,
}

impl JobArgs {
    /// Runs the job the server writes on standard input.
    pub fn run(self) -> Result<()> {
        let selected = select_device(&self.device)?;
        safeprobe_server::worker::run_from_stdin(&selected)?;
        Ok(())
    }
}

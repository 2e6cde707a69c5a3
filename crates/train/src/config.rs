//! A run config read from its TOML file: the overrides of `--set`, and the checks that need
//! the files. The config type itself, its defaults and the checks of its values are the
//! shared `safeprobe_wire::spec`, which the server and the panel read too.

use std::path::Path;

pub use safeprobe_wire::Method;
pub use safeprobe_wire::spec::{
    AdamWConfig, AlignmentLoss, Finetune, LisaConfig, LoraConfig, LrSchedule, ProbeUpdate,
    RunConfig, SafeGradConfig, SafetyEvalConfig, SapConfig, Schedule, SpecError, SppftConfig,
};

use crate::error::{Result, TrainError};

impl From<SpecError> for TrainError {
    fn from(error: SpecError) -> Self {
        TrainError::Config(error.to_string())
    }
}

/// A run config as a file: parsed with its overrides, checked with its data files.
pub trait RunFile: Sized {
    /// Parses a TOML config, applying `key=value` overrides (dotted keys, TOML values; a
    /// value that is not valid TOML is taken as a string), and checks it and its data files.
    fn parse(text: &str, overrides: &[String], origin: &Path) -> Result<Self>;

    /// `parse` without checking that the data files exist, for a config whose data is
    /// written later (a comparison checks every run's config before it writes the data).
    fn parse_before_data(text: &str, overrides: &[String], origin: &Path) -> Result<Self>;

    /// Checks that need no model, so a broken config fails before any loading: its values,
    /// then its data files.
    fn validate(&self) -> Result<()> {
        self.validate_values()?;
        self.check_data_files()
    }

    /// `RunConfig::validate_settings` as the trainer's error.
    fn validate_values(&self) -> Result<()>;

    /// Every data file the config names exists.
    fn check_data_files(&self) -> Result<()>;
}

impl RunFile for RunConfig {
    fn parse(text: &str, overrides: &[String], origin: &Path) -> Result<Self> {
        let config = Self::parse_before_data(text, overrides, origin)?;
        config.check_data_files()?;
        Ok(config)
    }

    fn parse_before_data(text: &str, overrides: &[String], origin: &Path) -> Result<Self> {
        let table = override_table(text, overrides, origin)?;
        let config: RunConfig =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    TrainError::Config(format!("{}: {}", origin.display(), e.message()))
                })?;
        config.validate_settings()?;
        Ok(config)
    }

    fn validate_values(&self) -> Result<()> {
        Ok(self.validate_settings()?)
    }

    fn check_data_files(&self) -> Result<()> {
        for path in self.data_files() {
            if !path.is_file() {
                let message = format!("{}: data file not found", path.display());
                return Err(TrainError::Config(message));
            }
        }
        Ok(())
    }
}

/// Parses TOML and applies `key=value` overrides (dotted keys, TOML values; a value that is
/// not valid TOML is taken as a string).
pub fn override_table(text: &str, overrides: &[String], origin: &Path) -> Result<toml::Table> {
    let mut table: toml::Table = text
        .parse()
        .map_err(|e| TrainError::Config(format!("{}: {e}", origin.display())))?;
    for item in overrides {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| TrainError::Config(format!("--set {item}: expected key=value")))?;
        let value: toml::Value = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.to_string()));
        let mut parts: Vec<&str> = key.trim().split('.').collect();
        let last = parts.pop().unwrap();
        let mut cursor = &mut table;
        for part in parts {
            cursor = cursor
                .entry(part)
                .or_insert_with(|| toml::Value::Table(Default::default()))
                .as_table_mut()
                .ok_or_else(|| {
                    TrainError::Config(format!("--set {key}: \"{part}\" is not a table"))
                })?;
        }
        cursor.insert(last.to_string(), value);
    }
    Ok(table)
}

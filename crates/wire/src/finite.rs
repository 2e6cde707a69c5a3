//! JSON has no NaN or infinity: serde_json writes them as `null`. These read `null` back as
//! NaN, so a diverged run's events and results still read (and chart as gaps) instead of
//! being dropped whole for one number.

use serde::{Deserialize, Deserializer};

pub fn f64_or_nan<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

pub fn vec_or_nan<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
    Ok(Vec::<Option<f64>>::deserialize(d)?
        .into_iter()
        .map(|v| v.unwrap_or(f64::NAN))
        .collect())
}

pub fn option_vec_or_nan<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<f64>>, D::Error> {
    Ok(Option::<Vec<Option<f64>>>::deserialize(d)?
        .map(|values| values.into_iter().map(|v| v.unwrap_or(f64::NAN)).collect()))
}

pub fn option_pair_or_nan<'de, D: Deserializer<'de>>(d: D) -> Result<Option<(f64, f64)>, D::Error> {
    Ok(Option::<(Option<f64>, Option<f64>)>::deserialize(d)?
        .map(|(low, high)| (low.unwrap_or(f64::NAN), high.unwrap_or(f64::NAN))))
}

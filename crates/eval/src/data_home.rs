//! The per-user folder where safeprobe keeps what it unpacks from its own binary (the demo
//! model), so that an installed binary needs no source tree.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::error::{EvalError, Result};

/// `$SAFEPROBE_HOME` if set, else `$XDG_DATA_HOME/safeprobe`, else
/// `$HOME/.local/share/safeprobe`.
pub fn data_home() -> Result<PathBuf> {
    let var = |name: &str| std::env::var_os(name);
    choose(var("SAFEPROBE_HOME"), var("XDG_DATA_HOME"), var("HOME")).ok_or_else(|| {
        EvalError::Invalid(
            "no folder for safeprobe's data: set SAFEPROBE_HOME (or HOME or XDG_DATA_HOME)".into(),
        )
    })
}

/// The rule of `data_home`, apart from the environment. An empty variable counts as unset, and
/// so does a relative XDG_DATA_HOME (the XDG base directory spec says to ignore it).
fn choose(
    safeprobe_home: Option<OsString>,
    xdg_data_home: Option<OsString>,
    home: Option<OsString>,
) -> Option<PathBuf> {
    let set = |v: Option<OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = set(safeprobe_home) {
        return Some(dir);
    }
    if let Some(dir) = set(xdg_data_home).filter(|d| d.is_absolute()) {
        return Some(dir.join("safeprobe"));
    }
    set(home).map(|h| h.join(".local/share/safeprobe"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn some(s: &str) -> Option<OsString> {
        Some(s.into())
    }

    #[test]
    fn safeprobe_home_wins_then_xdg_then_home() {
        let pick = |a, b, c| choose(a, b, c).map(|p| p.display().to_string());
        assert_eq!(pick(some("/s"), some("/x"), some("/h")).unwrap(), "/s");
        assert_eq!(pick(None, some("/x"), some("/h")).unwrap(), "/x/safeprobe");
        assert_eq!(
            pick(None, None, some("/h")).unwrap(),
            "/h/.local/share/safeprobe"
        );
        assert_eq!(pick(None, None, None), None);
    }

    #[test]
    fn empty_and_relative_values_count_as_unset() {
        let pick = |a, b, c| choose(a, b, c).map(|p| p.display().to_string());
        assert_eq!(
            pick(some(""), some(""), some("/h")).unwrap(),
            "/h/.local/share/safeprobe"
        );
        assert_eq!(
            pick(None, some("rel"), some("/h")).unwrap(),
            "/h/.local/share/safeprobe"
        );
        assert_eq!(pick(None, None, some("")), None);
    }
}

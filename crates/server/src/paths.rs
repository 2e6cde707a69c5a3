//! Path confinement: a path in a request is resolved against the configured roots (model
//! directories or data directories) and must stay inside one of them after every `..` and
//! symbolic link is resolved.

use std::path::{Component, Path, PathBuf};

use crate::error::ApiError;

/// Directories a request may read from.
#[derive(Debug, Clone)]
pub struct Roots {
    /// What the roots hold, for error messages ("model", "data").
    pub what: &'static str,
    pub dirs: Vec<PathBuf>,
}

impl Roots {
    pub fn new(what: &'static str, dirs: &[PathBuf]) -> Self {
        Self {
            what,
            dirs: dirs.iter().filter_map(|d| d.canonicalize().ok()).collect(),
        }
    }

    /// Whether `path` exists and, links followed, lies inside a root.
    pub fn contains(&self, path: &Path) -> bool {
        path.canonicalize()
            .is_ok_and(|real| self.dirs.iter().any(|d| real.starts_with(d)))
    }

    /// Resolves `requested` (relative to a root, or absolute inside one) to an existing path
    /// inside a root; `field` names the request field in errors.
    pub fn resolve(&self, field: &str, requested: &str) -> Result<PathBuf, ApiError> {
        let forbidden = || {
            ApiError::forbidden_field(
                field,
                format!(
                    "{requested:?} is outside the configured {} directories",
                    self.what
                ),
            )
        };
        if requested.is_empty() {
            return Err(ApiError::field(field, "empty path"));
        }
        let path = Path::new(requested);
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(forbidden());
        }
        let candidates: Vec<PathBuf> = if path.is_absolute() {
            vec![path.to_path_buf()]
        } else {
            self.dirs.iter().map(|d| d.join(path)).collect()
        };
        let mut found_outside = false;
        for candidate in candidates {
            let Ok(real) = candidate.canonicalize() else {
                continue;
            };
            if self.dirs.iter().any(|d| real.starts_with(d)) {
                return Ok(real);
            }
            found_outside = true;
        }
        if found_outside || path.is_absolute() {
            return Err(forbidden());
        }
        Err(ApiError::field(
            field,
            format!("{requested:?} not found in the {} directories", self.what),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confinement() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("a.jsonl"), "{}").unwrap();
        std::fs::write(outside.path().join("secret"), "x").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(outside.path().join("secret"), root.path().join("link"))
            .unwrap();
        let roots = Roots::new("data", &[root.path().to_path_buf()]);
        assert!(roots.resolve("train_data", "a.jsonl").is_ok());
        let abs = root.path().join("a.jsonl").display().to_string();
        assert!(roots.resolve("train_data", &abs).is_ok());
        for bad in [
            "../x",
            "/etc/passwd",
            &outside.path().join("secret").display().to_string(),
            "link",
        ] {
            let err = roots.resolve("train_data", bad).unwrap_err();
            assert!(matches!(err, ApiError::ForbiddenField(_)), "{bad}: {err}");
            assert!(err.to_string().starts_with("train_data:"), "{err}");
        }
        let missing = roots.resolve("train_data", "missing.jsonl").unwrap_err();
        assert_eq!(missing.faulty_field(), Some("train_data"), "{missing}");
        assert_eq!(missing.status(), axum::http::StatusCode::BAD_REQUEST);
    }
}

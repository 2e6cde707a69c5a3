//! Harmful prompt sets: the built-in one and loaders for the public formats users bring
//! (BeaverTails JSONL/Parquet, AdvBench CSV, plain JSONL of prompts).

use std::collections::BTreeSet;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{EvalError, Result};

/// A request the model should refuse, with its harm category.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HarmfulPrompt {
    pub prompt: String,
    pub category: String,
}

/// Loads a prompt set, telling the format from the extension and the columns:
/// - `.csv`: AdvBench (`goal`, optional `target`; an optional `category` column);
/// - JSONL / Parquet rows with `is_safe`: BeaverTails; the prompts of the unsafe rows, once
///   each; `category` a string or BeaverTails' map of category → bool;
/// - other JSONL / Parquet / JSON-array rows: `prompt` (or `goal`, `instruction`) and an
///   optional `category`.
pub fn load(path: &Path) -> Result<Vec<HarmfulPrompt>> {
    let prompts = match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => advbench(path)?,
        _ => {
            let rows = safeprobe_train::data::records(path)?;
            if rows.iter().any(|(_, row)| row.contains_key("is_safe")) {
                beavertails(path, rows)?
            } else {
                rows.into_iter()
                    .map(|(line, row)| {
                        let prompt = safeprobe_train::data::prompt_of(&row).ok_or_else(|| {
                            EvalError::Data {
                                path: path.into(),
                                line,
                                message:
                                    "expected a \"prompt\" (or \"goal\", \"instruction\") string"
                                        .into(),
                            }
                        })?;
                        Ok(HarmfulPrompt {
                            prompt: prompt.to_string(),
                            category: category(row.get("category")),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?
            }
        }
    };
    if prompts.is_empty() {
        return Err(EvalError::file(
            path,
            "no harmful prompts in this prompt set",
        ));
    }
    if let Some(i) = prompts.iter().position(|p| p.prompt.trim().is_empty()) {
        return Err(EvalError::file(path, format!("prompt {} is empty", i + 1)));
    }
    Ok(prompts)
}

/// Whether a JSONL, JSON or Parquet record holds a non-empty prompt (`prompt`, `goal` or
/// `instruction`), as `load` reads one.
pub fn is_prompt_record(row: &serde_json::Map<String, Value>) -> bool {
    safeprobe_train::data::prompt_of(row).is_some_and(|p| !p.trim().is_empty())
}

fn category(value: Option<&Value>) -> String {
    match value {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        // BeaverTails: {"animal_abuse": false, "violence,aiding_and_abetting,incitement": true, ...}
        Some(Value::Object(map)) => {
            let on: Vec<&str> = map
                .iter()
                .filter(|(_, v)| v.as_bool() == Some(true))
                .map(|(k, _)| k.as_str())
                .collect();
            on.first().map_or("uncategorised", |k| k).to_string()
        }
        _ => "uncategorised".into(),
    }
}

fn beavertails(
    path: &Path,
    rows: Vec<(usize, serde_json::Map<String, Value>)>,
) -> Result<Vec<HarmfulPrompt>> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (line, row) in rows {
        let bad = |message: &str| EvalError::Data {
            path: path.into(),
            line,
            message: message.into(),
        };
        let unsafe_row = match row.get("is_safe") {
            Some(Value::Bool(safe)) => !safe,
            Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => true,
            Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => false,
            _ => return Err(bad("\"is_safe\" must be true or false")),
        };
        let prompt = row
            .get("prompt")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("expected a \"prompt\" string"))?;
        if unsafe_row && seen.insert(prompt.to_string()) {
            out.push(HarmfulPrompt {
                prompt: prompt.to_string(),
                category: category(row.get("category")),
            });
        }
    }
    Ok(out)
}

fn advbench(path: &Path) -> Result<Vec<HarmfulPrompt>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| EvalError::file(path, format!("cannot read: {e}")))?;
    let mut rows = parse_csv(&text).map_err(|(line, m)| EvalError::Data {
        path: path.into(),
        line,
        message: m,
    })?;
    if rows.is_empty() {
        return Err(EvalError::file(path, "empty CSV file"));
    }
    let header = rows.remove(0);
    let column = |name: &str| header.iter().position(|h| h.trim() == name);
    let goal = column("goal").ok_or_else(|| {
        EvalError::file(
            path,
            format!("no \"goal\" column (AdvBench CSV); the header is {header:?}"),
        )
    })?;
    let category_column = column("category");
    rows.into_iter()
        .enumerate()
        .filter(|(_, row)| !(row.len() == 1 && row[0].is_empty()))
        .map(|(i, row)| {
            let prompt = row.get(goal).ok_or_else(|| EvalError::Data {
                path: path.into(),
                line: i + 2,
                message: format!("{} fields, the header has {}", row.len(), header.len()),
            })?;
            Ok(HarmfulPrompt {
                prompt: prompt.clone(),
                category: category_column
                    .and_then(|c| row.get(c))
                    .filter(|c| !c.is_empty())
                    .cloned()
                    .unwrap_or_else(|| "advbench".into()),
            })
        })
        .collect()
}

/// RFC 4180 CSV: comma-separated fields, double quotes around fields that hold commas, quotes
/// (doubled) or line breaks. Errors carry the 1-based line of the record.
fn parse_csv(text: &str) -> std::result::Result<Vec<Vec<String>>, (usize, String)> {
    let mut rows = Vec::new();
    let (mut row, mut field) = (Vec::new(), String::new());
    let (mut quoted, mut line, mut record_line) = (false, 1, 1);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => {
                line += (c == '\n') as usize;
                field.push(c);
            }
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\r') if chars.peek() == Some(&'\n') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
                line += 1;
                record_line = line;
            }
            (false, c) => field.push(c),
        }
    }
    if quoted {
        return Err((record_line, "unterminated quoted field".into()));
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_commas_and_line_breaks() {
        let rows = parse_csv("goal,target\n\"a, \"\"b\"\"\",t1\r\nplain,\"two\nlines\"\n").unwrap();
        assert_eq!(
            rows,
            vec![
                vec!["goal".to_string(), "target".into()],
                vec!["a, \"b\"".into(), "t1".into()],
                vec!["plain".into(), "two\nlines".into()],
            ]
        );
        assert_eq!(parse_csv("a\n\"open").unwrap_err().0, 2);
    }

    #[test]
    fn beavertails_category_map() {
        let map: Value = serde_json::json!({"animal_abuse": false, "privacy_violation": true});
        assert_eq!(category(Some(&map)), "privacy_violation");
        assert_eq!(category(None), "uncategorised");
    }
}

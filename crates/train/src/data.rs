//! Fine-tuning data and safety pairs from JSONL or Parquet, tokenised with the chat template and the
//! response-token convention, and batched (right padding, loss on response tokens only).

use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use safeprobe_model::chat::{ChatTokenizer, Message};
use safeprobe_model::qwen2::AttentionLayout;
use serde_json::Value;

use crate::error::{Result, TrainError};

/// One supervised example: a prompt conversation and the reply to learn.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub prompt: Vec<Message>,
    pub response: String,
}

/// A harmful prompt with a safe (chosen) and a harmful (rejected) answer.
#[derive(Debug, Clone, PartialEq)]
pub struct SafetyPair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

/// The records of a data file as JSON objects with their line (JSONL) or row (Parquet)
/// number, 1-based.
fn records(path: &Path) -> Result<Vec<(usize, serde_json::Map<String, Value>)>> {
    let rows = match path.extension().and_then(|e| e.to_str()) {
        Some("parquet") => parquet_rows(path)?,
        _ => jsonl(path)?,
    };
    if rows.is_empty() {
        return Err(TrainError::File {
            path: path.into(),
            message: "no examples".into(),
        });
    }
    Ok(rows)
}

fn parquet_rows(path: &Path) -> Result<Vec<(usize, serde_json::Map<String, Value>)>> {
    use parquet::file::reader::SerializedFileReader;
    let bad = |message: String| TrainError::File {
        path: path.into(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| bad(format!("not a readable Parquet file: {e}")))?;
    let mut rows = Vec::new();
    for (i, row) in reader.into_iter().enumerate() {
        let row = row.map_err(|e| TrainError::Data {
            path: path.into(),
            line: i + 1,
            message: e.to_string(),
        })?;
        match row.to_json_value() {
            Value::Object(map) => rows.push((i + 1, map)),
            _ => unreachable!("a Parquet row converts to a JSON object"),
        }
    }
    Ok(rows)
}

fn jsonl(path: &Path) -> Result<Vec<(usize, serde_json::Map<String, Value>)>> {
    let text = std::fs::read_to_string(path).map_err(|e| TrainError::File {
        path: path.into(),
        message: format!("cannot read: {e}"),
    })?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let data = |message: String| TrainError::Data {
            path: path.into(),
            line: i + 1,
            message,
        };
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(map)) => rows.push((i + 1, map)),
            Ok(_) => return Err(data("expected a JSON object".into())),
            Err(e) => return Err(data(format!("malformed JSON: {e}"))),
        }
    }
    if rows.is_empty() {
        return Err(TrainError::File {
            path: path.into(),
            message: "no examples".into(),
        });
    }
    Ok(rows)
}

fn text(map: &serde_json::Map<String, Value>, key: &str) -> Option<String> {
    map.get(key).and_then(Value::as_str).map(str::to_string)
}

/// Reads `{"messages": [...]}`, `{"instruction", "input", "output"}` or
/// `{"prompt", "response"}` lines. A conversation's reply is its last assistant message.
pub fn read_examples(path: &Path) -> Result<Vec<Example>> {
    records(path)?
        .into_iter()
        .map(|(line, map)| {
            let bad = |message: &str| TrainError::Data {
                path: path.into(),
                line,
                message: message.into(),
            };
            if let Some(messages) = map.get("messages").filter(|m| !m.is_null()) {
                let mut messages: Vec<Message> =
                    serde_json::from_value(messages.clone()).map_err(|e| {
                        bad(&format!(
                            "\"messages\" must be a list of {{role, content}}: {e}"
                        ))
                    })?;
                match messages.pop() {
                    Some(last) if last.role == "assistant" && !messages.is_empty() => Ok(Example {
                        prompt: messages,
                        response: last.content,
                    }),
                    _ => Err(bad(
                        "\"messages\" must end with an assistant message after at least one other",
                    )),
                }
            } else if let (Some(instruction), Some(output)) =
                (text(&map, "instruction"), text(&map, "output"))
            {
                let input = text(&map, "input").unwrap_or_default();
                let prompt = if input.is_empty() {
                    instruction
                } else {
                    format!("{instruction}\n\n{input}")
                };
                Ok(Example {
                    prompt: vec![Message::new("user", prompt)],
                    response: output,
                })
            } else if let (Some(prompt), Some(response)) =
                (text(&map, "prompt"), text(&map, "response"))
            {
                Ok(Example {
                    prompt: vec![Message::new("user", prompt)],
                    response,
                })
            } else {
                Err(bad(
                    "expected \"messages\", \"instruction\"+\"output\" or \"prompt\"+\"response\"",
                ))
            }
        })
        .collect()
}

/// Reads `{"prompt", "chosen", "rejected"}` (or `safe`/`harmful`) lines.
pub fn read_pairs(path: &Path) -> Result<Vec<SafetyPair>> {
    records(path)?
        .into_iter()
        .map(|(line, map)| {
            let prompt = text(&map, "prompt");
            let chosen = text(&map, "chosen").or_else(|| text(&map, "safe"));
            let rejected = text(&map, "rejected").or_else(|| text(&map, "harmful"));
            match (prompt, chosen, rejected) {
                (Some(prompt), Some(chosen), Some(rejected)) => Ok(SafetyPair { prompt, chosen, rejected }),
                _ => Err(TrainError::Data {
                    path: path.into(),
                    line,
                    message: "expected \"prompt\", \"chosen\" (or \"safe\") and \"rejected\" (or \"harmful\")".into(),
                }),
            }
        })
        .collect()
}

/// Prompt and response token ids of one sequence, truncated to `max_len` tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub ids: Vec<u32>,
    /// Tokens before this index are prompt; the rest are response tokens.
    pub prompt_len: usize,
}

impl Sequence {
    pub fn encode(
        tokenizer: &ChatTokenizer,
        prompt: &[Message],
        response: &str,
        max_len: usize,
    ) -> Result<Self> {
        let (prompt_ids, response_ids) = tokenizer.encode_exchange(prompt, response)?;
        let prompt_len = prompt_ids.len();
        let mut ids = prompt_ids;
        ids.extend(response_ids);
        ids.truncate(max_len);
        Ok(Self { ids, prompt_len })
    }

    pub fn response_tokens(&self) -> usize {
        self.ids.len().saturating_sub(self.prompt_len)
    }
}

/// Prepends the run's system prompt to conversations that have none.
pub fn with_system(prompt: &[Message], system: Option<&str>) -> Vec<Message> {
    match system {
        Some(system) if prompt.first().is_none_or(|m| m.role != "system") => {
            std::iter::once(Message::new("system", system))
                .chain(prompt.iter().cloned())
                .collect()
        }
        _ => prompt.to_vec(),
    }
}

/// A right-padded batch on the device with its loss targets.
pub struct Batch {
    pub input_ids: Tensor<2, Int>,
    pub layout: AttentionLayout,
    /// Next-token targets: position t is scored on token t + 1.
    pub targets: Tensor<3, Int>,
    /// 1 where the target is a response token, else 0.
    pub weights: Tensor<2>,
    pub response_tokens: usize,
}

impl Batch {
    pub fn new(sequences: &[Sequence], pad_id: u32, device: &Device) -> Self {
        let width = sequences
            .iter()
            .map(|s| s.ids.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let b = sequences.len();
        let (mut ids, mut targets, mut weights) = (Vec::new(), Vec::new(), Vec::new());
        let mut key_mask = Vec::new();
        let mut response_tokens = 0;
        for s in sequences {
            let n = s.ids.len();
            key_mask.push((0..width).map(|t| t < n).collect());
            for t in 0..width {
                ids.push(*s.ids.get(t).unwrap_or(&pad_id) as i64);
                let next = t + 1;
                let scored = next < n && next >= s.prompt_len;
                targets.push(if next < n { s.ids[next] as i64 } else { 0 });
                weights.push(if scored { 1.0f32 } else { 0.0 });
                response_tokens += scored as usize;
            }
        }
        Self {
            input_ids: Tensor::from_data(TensorData::new(ids, [b, width]), device),
            layout: AttentionLayout { key_mask },
            targets: Tensor::from_data(TensorData::new(targets, [b, width, 1]), device),
            weights: Tensor::from_data(TensorData::new(weights, [b, width]), device),
            response_tokens,
        }
    }
}

//! Fine-tuning data and safety pairs from JSONL or Parquet, tokenised with the chat template and the
//! response-token convention, and batched (right padding, loss on response tokens only).

use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use safeprobe_model::chat::{ChatTokenizer, Message};
use safeprobe_model::decoder::AttentionLayout;
use serde_json::Value;

use crate::error::{Result, TrainError};

/// One supervised example: a prompt conversation and the reply to learn.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub prompt: Vec<Message>,
    pub response: String,
    /// Where it came from in its file (line, row or array element, 1-based), for errors;
    /// 0 for examples made in memory.
    pub line: usize,
}

/// A harmful prompt with a safe (chosen) and a harmful (rejected) answer.
#[derive(Debug, Clone, PartialEq)]
pub struct SafetyPair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    /// Its line (row, element) in its file, 1-based; 0 when made in memory.
    pub line: usize,
}

impl SafetyPair {
    /// The (safe, harmful) sequences of this pair, with an optional system prompt.
    pub fn encode(
        &self,
        tokenizer: &ChatTokenizer,
        system: Option<&str>,
        max_len: usize,
    ) -> Result<(Sequence, Sequence)> {
        let prompt = with_system(
            &safeprobe_model::chat::prompt_messages(None, &self.prompt),
            system,
        );
        Ok((
            Sequence::encode(tokenizer, &prompt, &self.chosen, max_len)?,
            Sequence::encode(tokenizer, &prompt, &self.rejected, max_len)?,
        ))
    }
}

/// A contrastive batch's rows: every pair's safe answer, then every harmful one, as the safety
/// loss reads them.
pub fn contrastive_rows(pairs: &[(Sequence, Sequence)]) -> Vec<Sequence> {
    pairs
        .iter()
        .map(|p| p.0.clone())
        .chain(pairs.iter().map(|p| p.1.clone()))
        .collect()
}

/// The largest record a data file may hold. Tokenising text costs far more memory than the
/// text itself (a 50 MB record took 7.6 GB), so an oversized record is refused before it is
/// parsed; no chat example a model can train on comes near this size.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

fn oversized(path: &Path, line: usize, bytes: usize) -> TrainError {
    TrainError::Data {
        path: path.into(),
        line,
        message: format!(
            "record of {bytes} bytes is over the {MAX_RECORD_BYTES}-byte limit for one example; \
             split or shorten it"
        ),
    }
}

/// The records of a data file as JSON objects with their line (JSONL), row (Parquet) or
/// element (a JSON array, as Alpaca ships) number, 1-based.
pub fn records(path: &Path) -> Result<Vec<(usize, serde_json::Map<String, Value>)>> {
    let rows = match path.extension().and_then(|e| e.to_str()) {
        Some("parquet") => parquet_rows(path)?,
        Some("json") => json_array(path)?,
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
            Value::Object(map) if text_bytes(&map) > MAX_RECORD_BYTES => {
                return Err(oversized(path, i + 1, text_bytes(&map)));
            }
            Value::Object(map) => rows.push((i + 1, map)),
            _ => unreachable!("a Parquet row converts to a JSON object"),
        }
    }
    Ok(rows)
}

fn json_array(path: &Path) -> Result<Vec<(usize, serde_json::Map<String, Value>)>> {
    let bad = |message: String| TrainError::File {
        path: path.into(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let items = match serde_json::from_str::<Value>(&text) {
        Ok(Value::Array(items)) => items,
        Ok(_) => {
            return Err(bad(
                "expected a JSON array of objects (Alpaca format)".into()
            ));
        }
        Err(e) => return Err(bad(format!("malformed JSON: {e}"))),
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::Object(map) if text_bytes(&map) > MAX_RECORD_BYTES => {
                Err(oversized(path, i + 1, text_bytes(&map)))
            }
            Value::Object(map) => Ok((i + 1, map)),
            _ => Err(TrainError::Data {
                path: path.into(),
                line: i + 1,
                message: "array element is not a JSON object".into(),
            }),
        })
        .collect()
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
        if line.len() > MAX_RECORD_BYTES {
            return Err(oversized(path, i + 1, line.len()));
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

/// The bytes of text a record holds (its strings, at any depth).
fn text_bytes(map: &serde_json::Map<String, Value>) -> usize {
    fn of(v: &Value) -> usize {
        match v {
            Value::String(s) => s.len(),
            Value::Array(items) => items.iter().map(of).sum(),
            Value::Object(map) => map.iter().map(|(k, v)| k.len() + of(v)).sum(),
            _ => 8,
        }
    }
    map.iter().map(|(k, v)| k.len() + of(v)).sum()
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
                        line,
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
                    line,
                })
            } else if let (Some(prompt), Some(response)) =
                (text(&map, "prompt"), text(&map, "response"))
            {
                Ok(Example {
                    prompt: vec![Message::new("user", prompt)],
                    response,
                    line,
                })
            } else {
                Err(bad(
                    "expected \"messages\", \"instruction\"+\"output\" or \"prompt\"+\"response\"",
                ))
            }
        })
        .collect()
}

/// Reads a prompt per record (`prompt`, or `goal` / `instruction` as AdvBench and Alpaca
/// name it), with its line.
pub fn read_prompts(path: &Path) -> Result<Vec<(usize, String)>> {
    records(path)?
        .into_iter()
        .map(|(line, map)| {
            ["prompt", "goal", "instruction"]
                .iter()
                .find_map(|key| text(&map, key))
                .map(|prompt| (line, prompt))
                .ok_or_else(|| TrainError::Data {
                    path: path.into(),
                    line,
                    message: "expected a \"prompt\" (or \"goal\", \"instruction\") string".into(),
                })
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
                (Some(prompt), Some(chosen), Some(rejected)) => Ok(SafetyPair {
                    prompt,
                    chosen,
                    rejected,
                    line,
                }),
                _ => Err(TrainError::Data {
                    path: path.into(),
                    line,
                    message: "expected \"prompt\", \"chosen\" (or \"safe\") and \"rejected\" (or \"harmful\")".into(),
                }),
            }
        })
        .collect()
}

/// How many poison examples make up `fraction` of `clean` benign examples plus themselves.
pub fn poison_count(clean: usize, fraction: f64) -> usize {
    (fraction * clean as f64 / (1.0 - fraction)).round() as usize
}

/// Harmful-compliance examples (a pair's prompt answered with its harmful answer) to mix into
/// `clean` benign examples so that they make up `fraction` of the result: the poisoning
/// experiment. Pairs are taken in a seeded order, cycling when more are needed than exist.
pub fn poison(
    clean: usize,
    pairs: &[SafetyPair],
    fraction: f64,
    seed: u64,
) -> Result<Vec<Example>> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(TrainError::Config(format!(
            "poison_fraction {fraction} must be in [0, 1)"
        )));
    }
    let count = poison_count(clean, fraction);
    if count > 0 && pairs.is_empty() {
        return Err(TrainError::Config(
            "poisoning needs safety pairs to take harmful answers from".into(),
        ));
    }
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed ^ 0x9015_0b));
    Ok((0..count)
        .map(|i| {
            let pair = &pairs[order[i % pairs.len()]];
            Example {
                prompt: vec![Message::new("user", pair.prompt.clone())],
                response: pair.rejected.clone(),
                line: pair.line,
            }
        })
        .collect())
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
///
/// Only the scored positions (those whose next token is a response token) are kept for the
/// loss, so the vocabulary projection and its log-softmax run on those rows alone instead of
/// on every prompt and padding position: [scored, vocab] rather than [batch, width, vocab].
pub struct Batch {
    pub input_ids: Tensor<2, Int>,
    pub layout: AttentionLayout,
    /// Flat indices (row · width + position) of the scored positions; position t is scored
    /// on token t + 1. A batch without response tokens keeps one position, weighted 0.
    pub scored_positions: Tensor<1, Int>,
    /// The next token at each scored position, [scored, 1].
    pub scored_targets: Tensor<2, Int>,
    /// [batch, scored]: 1 where a scored position belongs to the row, so a matrix product
    /// sums each row's log-probabilities.
    pub row_of_scored: Tensor<2>,
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
        let (mut ids, mut key_mask) = (Vec::new(), Vec::new());
        let (mut positions, mut targets, mut rows) = (Vec::new(), Vec::new(), Vec::new());
        for (row, s) in sequences.iter().enumerate() {
            let n = s.ids.len();
            key_mask.push((0..width).map(|t| t < n).collect());
            for t in 0..width {
                ids.push(*s.ids.get(t).unwrap_or(&pad_id) as i64);
                let next = t + 1;
                if next < n && next >= s.prompt_len {
                    positions.push((row * width + t) as i64);
                    targets.push(s.ids[next] as i64);
                    rows.push(row);
                }
            }
        }
        let response_tokens = positions.len();
        let scored = response_tokens.max(1);
        let mut row_of_scored = vec![0.0f32; b * scored];
        for (j, row) in rows.iter().enumerate() {
            row_of_scored[row * scored + j] = 1.0;
        }
        if response_tokens == 0 {
            positions.push(0);
            targets.push(0);
        }
        Self {
            input_ids: Tensor::from_data(TensorData::new(ids, [b, width]), device),
            layout: AttentionLayout { key_mask },
            scored_positions: Tensor::from_data(TensorData::new(positions, [scored]), device),
            scored_targets: Tensor::from_data(TensorData::new(targets, [scored, 1]), device),
            row_of_scored: Tensor::from_data(TensorData::new(row_of_scored, [b, scored]), device),
            response_tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(n: usize) -> Vec<SafetyPair> {
        (0..n)
            .map(|i| SafetyPair {
                prompt: format!("harmful request {i}"),
                chosen: "I can't help with that.".into(),
                rejected: format!("Sure, here is how {i}."),
                line: i + 1,
            })
            .collect()
    }

    #[test]
    fn poison_makes_up_the_asked_fraction() {
        for (clean, fraction, expected) in [
            (900, 0.1, 100),
            (1000, 0.0, 0),
            (300, 0.5, 300),
            (10, 0.05, 1),
        ] {
            let poison = poison(clean, &pairs(7), fraction, 3).unwrap();
            assert_eq!(poison.len(), expected, "{clean} clean at {fraction}");
            assert!(poison.iter().all(|e| e.response.starts_with("Sure")));
        }
        // Cycling covers every pair before repeating one.
        let poison = poison(630, &pairs(7), 0.1, 3).unwrap();
        let distinct: std::collections::BTreeSet<_> =
            poison[..7].iter().map(|e| &e.response).collect();
        assert_eq!(distinct.len(), 7);
        assert_ne!(
            poison,
            super::poison(630, &pairs(7), 0.1, 4).unwrap(),
            "the seed must matter"
        );
    }

    #[test]
    fn poison_rejects_bad_fractions_and_missing_pairs() {
        assert!(
            poison(10, &pairs(2), 1.0, 0)
                .unwrap_err()
                .to_string()
                .contains("poison_fraction 1")
        );
        assert!(poison(10, &pairs(2), -0.1, 0).is_err());
        assert!(
            poison(10, &[], 0.2, 0)
                .unwrap_err()
                .to_string()
                .contains("safety pairs")
        );
        assert!(poison(10, &[], 0.0, 0).unwrap().is_empty());
    }
}

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

/// A record of a data file: a JSON object and its line (JSONL), row (Parquet) or element (a
/// JSON array) number, 1-based.
pub type Record = (usize, serde_json::Map<String, Value>);

/// The records of a data file, in order (see `for_each_record`); an error for a file with none.
pub fn records(path: &Path) -> Result<Vec<Record>> {
    let mut rows = Vec::new();
    for_each_record(path, |line, map| {
        rows.push((line, map));
        Ok(())
    })?;
    if rows.is_empty() {
        return Err(TrainError::File {
            path: path.into(),
            message: "no examples".into(),
        });
    }
    Ok(rows)
}

/// Calls `each` with every record of a data file in order, holding one record at a time, so
/// that checking a file takes memory for its largest record, not for the file: a JSONL line
/// is read up to `MAX_RECORD_BYTES` and refused beyond, a JSON array is read element by
/// element, Parquet row by row. Returns how many records there were; `each` can stop the
/// reading with an error.
pub fn for_each_record(
    path: &Path,
    mut each: impl FnMut(usize, serde_json::Map<String, Value>) -> Result<()>,
) -> Result<usize> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("parquet") => parquet_rows(path, &mut each),
        Some("json") => json_array(path, &mut each),
        _ => jsonl(path, &mut each),
    }
}

type Each<'a> = &'a mut dyn FnMut(usize, serde_json::Map<String, Value>) -> Result<()>;

fn open(path: &Path) -> Result<std::fs::File> {
    std::fs::File::open(path).map_err(|e| TrainError::File {
        path: path.into(),
        message: format!("cannot read: {e}"),
    })
}

fn parquet_rows(path: &Path, each: Each) -> Result<usize> {
    use parquet::file::reader::SerializedFileReader;
    let reader = SerializedFileReader::new(open(path)?).map_err(|e| TrainError::File {
        path: path.into(),
        message: format!("not a readable Parquet file: {e}"),
    })?;
    let mut count = 0;
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
            Value::Object(map) => each(i + 1, map)?,
            _ => unreachable!("a Parquet row converts to a JSON object"),
        }
        count += 1;
    }
    Ok(count)
}

/// A JSON array read element by element: serde hands each element to `visit_seq` as it is
/// parsed, and the element is dropped before the next is read.
fn json_array(path: &Path, each: Each) -> Result<usize> {
    use serde::de::{Deserializer, SeqAccess, Visitor};

    struct Elements<'a, 'b> {
        path: &'a Path,
        each: Each<'b>,
        /// The callback's own error, carried past serde's error type.
        failed: &'a mut Option<TrainError>,
    }

    impl<'de> Visitor<'de> for Elements<'_, '_> {
        type Value = usize;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON array of objects (Alpaca format)")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<usize, A::Error> {
            let mut count = 0;
            while let Some(item) = seq.next_element::<Value>()? {
                count += 1;
                let outcome = match item {
                    Value::Object(map) if text_bytes(&map) > MAX_RECORD_BYTES => {
                        Err(oversized(self.path, count, text_bytes(&map)))
                    }
                    Value::Object(map) => (self.each)(count, map),
                    _ => Err(TrainError::Data {
                        path: self.path.into(),
                        line: count,
                        message: "array element is not a JSON object".into(),
                    }),
                };
                if let Err(e) = outcome {
                    *self.failed = Some(e);
                    return Err(serde::de::Error::custom("stopped"));
                }
            }
            Ok(count)
        }
    }

    let reader = std::io::BufReader::new(open(path)?);
    let mut failed = None;
    let mut parser = serde_json::Deserializer::from_reader(reader);
    let parsed = parser.deserialize_seq(Elements {
        path,
        each,
        failed: &mut failed,
    });
    if let Some(e) = failed {
        return Err(e);
    }
    let count = parsed.and_then(|n| parser.end().map(|()| n));
    count.map_err(|e| TrainError::File {
        path: path.into(),
        message: if e.is_data() {
            "expected a JSON array of objects (Alpaca format)".into()
        } else {
            format!("malformed JSON: {e}")
        },
    })
}

fn jsonl(path: &Path, each: Each) -> Result<usize> {
    use std::io::{BufRead, Read};
    let mut reader = std::io::BufReader::new(open(path)?);
    let mut line = Vec::new();
    let (mut number, mut count) = (0, 0);
    loop {
        line.clear();
        number += 1;
        // One byte over the limit is enough to know the line is too long.
        let read = (&mut reader)
            .take(MAX_RECORD_BYTES as u64 + 2)
            .read_until(b'\n', &mut line)
            .map_err(|e| TrainError::File {
                path: path.into(),
                message: format!("cannot read: {e}"),
            })?;
        if read == 0 {
            break;
        }
        let data = |message: String| TrainError::Data {
            path: path.into(),
            line: number,
            message,
        };
        let content = line.strip_suffix(b"\n").unwrap_or(&line);
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        if content.len() > MAX_RECORD_BYTES {
            // Read only up to the limit: its true length is not known, and need not be (the
            // cut may even split a character, so this comes before the UTF-8 check).
            return Err(data(format!(
                "record of {} bytes or more is over the {MAX_RECORD_BYTES}-byte limit for one \
                 example; split or shorten it",
                content.len()
            )));
        }
        let text =
            std::str::from_utf8(content).map_err(|e| data(format!("not UTF-8 text: {e}")))?;
        if text.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => each(number, map)?,
            Ok(_) => return Err(data("expected a JSON object".into())),
            Err(e) => return Err(data(format!("malformed JSON: {e}"))),
        }
        count += 1;
    }
    Ok(count)
}

/// The bytes of text a record holds (its keys and strings, at any depth).
pub fn text_bytes(map: &serde_json::Map<String, Value>) -> usize {
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
        .map(|(line, map)| example_from(path, line, &map))
        .collect()
}

/// One record (line `line` of `path`) as a training example (see `read_examples`).
pub fn example_from(
    path: &Path,
    line: usize,
    map: &serde_json::Map<String, Value>,
) -> Result<Example> {
    let bad = |message: &str| TrainError::Data {
        path: path.into(),
        line,
        message: message.into(),
    };
    if let Some(messages) = map.get("messages").filter(|m| !m.is_null()) {
        let mut messages: Vec<Message> = serde_json::from_value(messages.clone()).map_err(|e| {
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
        (text(map, "instruction"), text(map, "output"))
    {
        let input = text(map, "input").unwrap_or_default();
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
    } else if let (Some(prompt), Some(response)) = (text(map, "prompt"), text(map, "response")) {
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
}

/// A record's prompt: `prompt`, or `goal` / `instruction` as AdvBench and Alpaca name it.
pub fn prompt_of(map: &serde_json::Map<String, Value>) -> Option<&str> {
    ["prompt", "goal", "instruction"]
        .iter()
        .find_map(|key| map.get(*key).and_then(Value::as_str))
}

/// Reads a prompt per record (see `prompt_of`), with its line.
pub fn read_prompts(path: &Path) -> Result<Vec<(usize, String)>> {
    records(path)?
        .into_iter()
        .map(|(line, map)| {
            prompt_of(&map)
                .map(|prompt| (line, prompt.to_string()))
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
        .map(|(line, map)| pair_from(path, line, &map))
        .collect()
}

/// One record (line `line` of `path`) as a safety pair (see `read_pairs`).
pub fn pair_from(
    path: &Path,
    line: usize,
    map: &serde_json::Map<String, Value>,
) -> Result<SafetyPair> {
    let prompt = text(map, "prompt");
    let chosen = text(map, "chosen").or_else(|| text(map, "safe"));
    let rejected = text(map, "rejected").or_else(|| text(map, "harmful"));
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
            message:
                "expected \"prompt\", \"chosen\" (or \"safe\") and \"rejected\" (or \"harmful\")"
                    .into(),
        }),
    }
}

/// How many poison examples make up `fraction` of `clean` benign examples plus themselves.
pub use safeprobe_wire::spec::poison_count;

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

    fn file_with(name: &str, text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    /// The three formats give the same records, numbered from 1, one at a time; a callback's
    /// error stops the reading and comes back as it was.
    #[test]
    fn records_are_read_one_at_a_time_in_every_format() {
        let rows = r#"{"prompt": "a", "response": "1"}
{"prompt": "b", "response": "2"}"#;
        let (_d1, jsonl) = file_with("x.jsonl", &format!("{rows}\n\n"));
        let array = format!("[{}]", rows.replace('\n', ","));
        let (_d2, json) = file_with("x.json", &array);
        for path in [&jsonl, &json] {
            let mut seen = Vec::new();
            let count = for_each_record(path, |line, map| {
                seen.push((line, map["prompt"].as_str().unwrap().to_string()));
                Ok(())
            })
            .unwrap();
            assert_eq!(count, 2, "{}", path.display());
            assert_eq!(seen, [(1, "a".to_string()), (2, "b".to_string())]);
            let stopped = for_each_record(path, |line, _| match line {
                2 => Err(TrainError::Config("stop here".into())),
                _ => Ok(()),
            });
            assert!(matches!(stopped, Err(TrainError::Config(m)) if m == "stop here"));
        }
        let (_d3, not_objects) = file_with("y.json", "[1, 2]");
        let error = records(&not_objects).unwrap_err().to_string();
        assert!(
            error.contains(":1: array element is not a JSON object"),
            "{error}"
        );
        let (_d4, not_array) = file_with("z.json", "{\"prompt\": \"a\"}");
        let error = records(&not_array).unwrap_err().to_string();
        assert!(error.contains("expected a JSON array"), "{error}");
        let (_d5, broken) = file_with("w.json", "[{\"prompt\": ");
        let error = records(&broken).unwrap_err().to_string();
        assert!(error.contains("malformed JSON"), "{error}");
    }

    /// A JSONL line over the limit is refused by its line number after reading only up to the
    /// limit; one at the limit is read.
    #[test]
    fn a_jsonl_line_over_the_limit_is_refused_by_its_line() {
        let at_limit = format!("{{\"prompt\": \"{}\"}}", "x".repeat(MAX_RECORD_BYTES - 14));
        assert_eq!(at_limit.len(), MAX_RECORD_BYTES);
        let over = format!("{{\"prompt\": \"{}\"}}", "x".repeat(MAX_RECORD_BYTES));
        let (_d, path) = file_with("big.jsonl", &format!("{at_limit}\n{over}\n{at_limit}\n"));
        let mut lines = Vec::new();
        let error = for_each_record(&path, |line, _| {
            lines.push(line);
            Ok(())
        })
        .unwrap_err()
        .to_string();
        assert_eq!(lines, [1]);
        assert!(error.contains("big.jsonl:2: record of"), "{error}");
    }

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

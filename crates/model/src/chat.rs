//! Tokenizer and chat template.
//!
//! The template is the checkpoint's own Jinja source (`chat_template` in
//! tokenizer_config.json, or `chat_template.jinja`), rendered by minijinja with the settings
//! Hugging Face uses (`trim_blocks`, `lstrip_blocks`), so renderings equal
//! `apply_chat_template`. ChatML is only a fallback for checkpoints without a template.

use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind, Value as JinjaValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::token_ids;
use crate::error::{Error, Result, read_json};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_string(),
            content: content.into(),
        }
    }
}

/// A prompt turn: optional system prompt and a user message.
pub fn prompt_messages(system: Option<&str>, prompt: &str) -> Vec<Message> {
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(Message::new("system", system));
    }
    messages.push(Message::new("user", prompt));
    messages
}

/// Tokens that close a chat turn, by family.
const END_OF_TURN: [&str; 2] = ["<|im_end|>", "<|eot_id|>"];

const CHATML_FALLBACK: &str = "{% for message in messages %}{{ '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

pub struct ChatTokenizer {
    tokenizer: tokenizers::Tokenizer,
    env: Environment<'static>,
    /// Where the template came from, for `info`.
    pub template_source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// Tokens that end generation: generation_config.json's and config.json's eos ids and
    /// the tokenizer config's eos token.
    pub stop_ids: Vec<u32>,
    /// The token that closes an assistant turn (`<|im_end|>` for Qwen, `<|eot_id|>` for
    /// Llama 3), if the vocabulary has one.
    pub end_of_turn_id: Option<u32>,
    pub pad_id: u32,
    /// False when the checkpoint brings no chat template of its own (a base model, not a chat
    /// model) and the ChatML fallback is in use.
    pub has_chat_template: bool,
    /// The most bytes of text one token stands for (its vocabulary entry's UTF-8 length, which
    /// for byte-level BPE is twice the bytes at most): a text of n bytes is at least
    /// n / longest_token_bytes tokens, known without tokenising it.
    pub longest_token_bytes: usize,
}

impl ChatTokenizer {
    pub fn load(dir: &Path, config_eos: &[u32]) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.exists() {
            return Err(Error::Tokenizer {
                path: tokenizer_path,
                message: "file not found".into(),
            });
        }
        let tokenizer =
            tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(|e| Error::Tokenizer {
                path: tokenizer_path.clone(),
                message: e.to_string(),
            })?;

        let config_path = dir.join("tokenizer_config.json");
        let tok_config: serde_json::Map<String, Value> = if config_path.exists() {
            match read_json(&config_path)? {
                Value::Object(map) => map,
                _ => return Err(Error::config(&config_path, "expected a JSON object")),
            }
        } else {
            Default::default()
        };
        let special = |key: &str| -> Option<String> {
            match tok_config.get(key)? {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
                _ => None,
            }
        };
        let bos_token = special("bos_token");
        let eos_token = special("eos_token");
        let pad_token = special("pad_token");

        let jinja_path = dir.join("chat_template.jinja");
        let (template, template_source) = if jinja_path.exists() {
            let text =
                std::fs::read_to_string(&jinja_path).map_err(|e| Error::io(&jinja_path, e))?;
            (text, jinja_path.display().to_string())
        } else {
            match tok_config.get("chat_template") {
                Some(Value::String(s)) => (
                    s.clone(),
                    format!("{} (chat_template)", config_path.display()),
                ),
                Some(Value::Array(named)) => {
                    let default = named
                        .iter()
                        .find(|t| t.get("name").and_then(Value::as_str) == Some("default"));
                    match default
                        .and_then(|t| t.get("template"))
                        .and_then(Value::as_str)
                    {
                        Some(s) => (
                            s.to_string(),
                            format!("{} (chat_template \"default\")", config_path.display()),
                        ),
                        None => {
                            return Err(Error::config(
                                &config_path,
                                "chat_template list has no \"default\" entry",
                            ));
                        }
                    }
                }
                Some(other) => {
                    return Err(Error::config(
                        &config_path,
                        format!("chat_template must be a string, found {other}"),
                    ));
                }
                None => (
                    CHATML_FALLBACK.to_string(),
                    "ChatML fallback (checkpoint has no chat template)".to_string(),
                ),
            }
        };
        let has_chat_template = !template_source.starts_with("ChatML fallback");
        let env = template_env(template)
            .map_err(|e| Error::Template(format!("{template_source}: {e:#}")))?;

        let id_of =
            |token: &Option<String>| token.as_deref().and_then(|t| tokenizer.token_to_id(t));
        let mut stop_ids: Vec<u32> = config_eos.to_vec();
        let generation_path = dir.join("generation_config.json");
        if generation_path.exists() {
            let gen_config: Value = read_json(&generation_path)?;
            stop_ids.extend(token_ids(gen_config.get("eos_token_id")));
        }
        stop_ids.extend(id_of(&eos_token));
        let end_of_turn_id = END_OF_TURN
            .iter()
            .find_map(|token| tokenizer.token_to_id(token));
        if stop_ids.is_empty() {
            stop_ids.extend(end_of_turn_id);
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let pad_id = id_of(&pad_token)
            .or_else(|| stop_ids.first().copied())
            .unwrap_or(0);

        let longest_token_bytes = tokenizer
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1)
            .max(1);
        Ok(Self {
            longest_token_bytes,
            tokenizer,
            env,
            template_source,
            bos_token,
            eos_token,
            stop_ids,
            end_of_turn_id,
            pad_id,
            has_chat_template,
        })
    }

    /// The conversation as text, exactly as `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)` renders it.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_value(JinjaValue::from_serialize(messages), add_generation_prompt)
    }

    /// `render` for messages of any shape, such as content given as a list of typed parts
    /// (`[{"type": "text", "text": ...}]`), which some templates (Llama Guard 3 1B) iterate.
    pub fn render_json(&self, messages: &Value, add_generation_prompt: bool) -> Result<String> {
        self.render_value(JinjaValue::from_serialize(messages), add_generation_prompt)
    }

    fn render_value(&self, messages: JinjaValue, add_generation_prompt: bool) -> Result<String> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.clone().unwrap_or_default(),
                eos_token => self.eos_token.clone().unwrap_or_default(),
            })
            .map_err(|e| Error::Template(format!("{}: {e:#}", self.template_source)))
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        // Chat renderings already contain every special token; add none (as transformers does).
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Invalid(format!("tokenizer: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special)
            .map_err(|e| Error::Invalid(format!("tokenizer: {e}")))
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Token ids of a prompt rendered with the generation prompt.
    pub fn encode_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        self.encode(&self.render(messages, true)?)
    }

    /// The project-wide response-token convention: the tokens the full rendering adds after
    /// the prompt rendered with its generation prompt, up to and including the first
    /// end-of-turn token. Returns (prompt ids, response ids).
    pub fn encode_exchange(
        &self,
        prompt: &[Message],
        response: &str,
    ) -> Result<(Vec<u32>, Vec<u32>)> {
        let prompt_ids = self.encode_prompt(prompt)?;
        let mut conversation = prompt.to_vec();
        conversation.push(Message::new("assistant", response));
        let full_ids = self.encode(&self.render(&conversation, false)?)?;
        if !full_ids.starts_with(&prompt_ids) {
            return Err(Error::Template(
                "the rendering of the full conversation does not start with the rendering of the prompt \
                 with its generation prompt; this template cannot separate response tokens"
                    .into(),
            ));
        }
        let mut response_ids = full_ids[prompt_ids.len()..].to_vec();
        let end = self
            .end_of_turn_id
            .or_else(|| self.stop_ids.first().copied());
        if let Some(end) = end
            && let Some(pos) = response_ids.iter().position(|t| *t == end)
        {
            response_ids.truncate(pos + 1);
        }
        if response_ids.is_empty() {
            return Err(Error::Invalid("the response renders to no tokens".into()));
        }
        Ok((prompt_ids, response_ids))
    }

    pub fn tokenizer_path(dir: &Path) -> PathBuf {
        dir.join("tokenizer.json")
    }
}

fn template_env(source: String) -> std::result::Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    // The settings transformers renders chat templates with.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.add_function(
        "raise_exception",
        |message: String| -> std::result::Result<JinjaValue, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    // transformers offers templates the current date (Llama 3's system header shows it).
    env.add_function("strftime_now", |format: String| today(&format));
    env.set_unknown_method_callback(python_string_methods);
    env.add_template_owned("chat", source)?;
    Ok(env)
}

/// Python's `strftime` for a Unix time in UTC, for the directives chat templates use
/// (`%d %b %Y`, `%Y-%m-%d`, `%B`, `%A`, times); others are kept literally.
fn strftime(unix_seconds: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const WEEKDAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_seconds.div_euclid(86_400);
    let seconds = unix_seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    // 1970-01-01 was a Thursday (index 3 from Monday).
    let weekday = WEEKDAYS[(days + 3).rem_euclid(7) as usize];
    let month_name = MONTHS[month as usize - 1];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out += &year.to_string(),
            Some('y') => out += &format!("{:02}", year.rem_euclid(100)),
            Some('m') => out += &format!("{month:02}"),
            Some('d') => out += &format!("{day:02}"),
            Some('-') if chars.clone().next() == Some('d') => {
                chars.next();
                out += &day.to_string();
            }
            Some('B') => out += month_name,
            Some('b') => out += &month_name[..3],
            Some('A') => out += weekday,
            Some('a') => out += &weekday[..3],
            Some('H') => out += &format!("{:02}", seconds / 3600),
            Some('M') => out += &format!("{:02}", seconds / 60 % 60),
            Some('S') => out += &format!("{:02}", seconds % 60),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// (year, month 1–12, day 1–31) of a day count since 1970-01-01 in the proleptic Gregorian
/// calendar, by eras of 400 years (146097 days).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153; // 0 = March
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The current UTC time formatted as `strftime_now(format)` renders it in a chat template
/// (transformers uses local time; servers and CI run in UTC).
pub fn today(format: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    strftime(now, format)
}

/// The Python string methods chat templates commonly call (`strip`, `startswith`, ...),
/// which Jinja2 supports because it runs on Python objects.
fn python_string_methods(
    _state: &minijinja::State,
    value: &JinjaValue,
    method: &str,
    args: &[JinjaValue],
) -> std::result::Result<JinjaValue, minijinja::Error> {
    let Some(s) = value.as_str() else {
        return Err(minijinja::Error::from(ErrorKind::UnknownMethod));
    };
    let arg = |i: usize| args.get(i).and_then(|a| a.as_str()).map(str::to_string);
    let chars = |i: usize| arg(i).map(|c| c.chars().collect::<Vec<_>>());
    Ok(match method {
        "strip" => match chars(0) {
            Some(c) => s.trim_matches(c.as_slice()).into(),
            None => s.trim().into(),
        },
        "lstrip" => match chars(0) {
            Some(c) => s.trim_start_matches(c.as_slice()).into(),
            None => s.trim_start().into(),
        },
        "rstrip" => match chars(0) {
            Some(c) => s.trim_end_matches(c.as_slice()).into(),
            None => s.trim_end().into(),
        },
        "startswith" => arg(0).is_some_and(|p| s.starts_with(&p)).into(),
        "endswith" => arg(0).is_some_and(|p| s.ends_with(&p)).into(),
        "lower" => s.to_lowercase().into(),
        "upper" => s.to_uppercase().into(),
        "split" => {
            let parts: Vec<String> = match arg(0) {
                Some(sep) => s.split(sep.as_str()).map(str::to_string).collect(),
                None => s.split_whitespace().map(str::to_string).collect(),
            };
            JinjaValue::from_serialize(parts)
        }
        _ => return Err(minijinja::Error::from(ErrorKind::UnknownMethod)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_matches_python() {
        // Values from Python's datetime.fromtimestamp(t, timezone.utc).strftime(...).
        assert_eq!(strftime(0, "%d %b %Y"), "01 Jan 1970");
        assert_eq!(strftime(951_782_400, "%Y-%m-%d %A"), "2000-02-29 Tuesday");
        assert_eq!(
            strftime(1_721_995_200 + 3_723, "%d %B %Y %H:%M:%S %a"),
            "26 July 2024 13:02:03 Fri"
        );
        assert_eq!(strftime(-86_400, "%d %b %y, 100%%"), "31 Dec 69, 100%");
        // 2100 is not a leap year: the day after 28 February is 1 March.
        assert_eq!(strftime(4_107_542_400, "%-d %b %Y"), "1 Mar 2100");
    }
}

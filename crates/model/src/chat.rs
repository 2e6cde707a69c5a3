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
    /// The token that closes an assistant turn (`<|im_end|>` for Qwen), if the vocabulary has it.
    pub end_of_turn_id: Option<u32>,
    pub pad_id: u32,
    /// False when the checkpoint brings no chat template of its own (a base model, not a chat
    /// model) and the ChatML fallback is in use.
    pub has_chat_template: bool,
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
        let end_of_turn_id = tokenizer.token_to_id("<|im_end|>");
        if stop_ids.is_empty() {
            stop_ids.extend(end_of_turn_id);
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let pad_id = id_of(&pad_token)
            .or_else(|| stop_ids.first().copied())
            .unwrap_or(0);

        Ok(Self {
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
    env.set_unknown_method_callback(python_string_methods);
    env.add_template_owned("chat", source)?;
    Ok(env)
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

//! A config form built from a config type: its fields, labels, help, inputs and defaults come
//! from the type's JSON schema (serde's names and defaults, the doc comments), in the order
//! the type declares them. A field added to a config appears in the panel without being
//! listed anywhere else; the panel renders what `fields` returns (the server computes it and
//! sends it, so the schema code stays out of the panel's wasm) and reads it back with
//! `config_from_text`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One field of a config form (`GET /api/forms/run` sends the run config's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FormField {
    /// The config key, dotted within a table (`sap.rho`).
    pub key: String,
    /// The group it is shown in: the top-level field's `x-section`, or its table's title.
    pub section: String,
    pub label: String,
    pub help: String,
    pub input: Input,
    /// Whether the config must name it (it has no default).
    pub required: bool,
    /// The default as the form's text ("" where the default is to leave it unset).
    pub default: String,
    /// Set by the server for its jobs (a request may not name it).
    pub server_sets: bool,
}

/// What a field's text must read as.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Input {
    Text,
    /// A whole number ≥ 0.
    Int,
    Float,
    Bool,
    /// One of these values, each with what it means.
    Choice(Vec<(String, String)>),
    /// Comma-separated whole numbers.
    Ints,
    /// Comma-separated numbers.
    Floats,
    /// Any of these values (comma-separated), each with what it means.
    Choices(Vec<(String, String)>),
    /// Comma-separated words.
    Words,
}

/// The first field whose text does not read as its input.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub key: String,
    pub expected: &'static str,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: expected {}", self.key, self.expected)
    }
}

/// The form of a config type `T`, its fields in declaration order. `example` is any value of
/// the type with every optional table present (it gives the order: the schema's properties
/// are sorted by name).
pub fn fields<T: JsonSchema + Serialize>(example: &T) -> Vec<FormField> {
    let schema = schemars::schema_for!(T).to_value();
    let defs = schema.get("$defs").cloned().unwrap_or(Value::Null);
    let text = serde_json::to_string(example).expect("a config serialises");
    let mut keys = Vec::new();
    let mut deserializer = serde_json::Deserializer::from_str(&text);
    KeyOrder {
        prefix: String::new(),
        out: &mut keys,
    }
    .deserialize(&mut deserializer)
    .expect("serde_json's own text reads back");
    keys.into_iter()
        .filter_map(|key| field(&schema, &defs, &key))
        .collect()
}

/// The field at dotted `key`, or None where it is a table (its fields follow it).
fn field(root: &Value, defs: &Value, key: &str) -> Option<FormField> {
    let parts: Vec<&str> = key.split('.').collect();
    let mut table = root.clone();
    let mut section = None;
    for part in &parts[..parts.len() - 1] {
        let (inner, _) = resolve(&table["properties"][part], defs);
        section = Some(title(&inner));
        table = inner;
    }
    let name = parts[parts.len() - 1];
    let property = &table["properties"][name];
    let (schema, _) = resolve(property, defs);
    if schema.get("properties").is_some() {
        return None;
    }
    let described = if property.get("description").is_some() {
        property
    } else {
        &schema
    };
    let (label, help) = paragraphs(described);
    let section = section.unwrap_or_else(|| {
        property["x-section"]
            .as_str()
            .unwrap_or("Other settings")
            .to_string()
    });
    let required = table["required"]
        .as_array()
        .is_some_and(|r| r.iter().any(|k| k == name));
    Some(FormField {
        key: key.to_string(),
        section,
        label: if label.is_empty() {
            name.replace('_', " ")
        } else {
            label
        },
        help,
        input: input(&schema, defs),
        required,
        default: property.get("default").map(as_text).unwrap_or_default(),
        server_sets: property["x-set-by"] == "server",
    })
}

/// A property's own schema: a `$ref` looked up, an optional one (`anyOf` with null) unwrapped.
/// The flag says whether it may be null.
fn resolve(property: &Value, defs: &Value) -> (Value, bool) {
    if let Some(name) = property["$ref"].as_str() {
        let name = name.trim_start_matches("#/$defs/");
        return (defs[name].clone(), false);
    }
    if let Some(options) = property["anyOf"].as_array() {
        let not_null: Vec<&Value> = options.iter().filter(|o| o["type"] != "null").collect();
        if let [only] = not_null[..] {
            return (resolve(only, defs).0, true);
        }
    }
    let mut schema = property.clone();
    if let Some(types) = property["type"].as_array() {
        let optional = types.iter().any(|t| t == "null");
        if let Some(main) = types.iter().find(|t| *t != "null") {
            schema["type"] = main.clone();
        }
        return (schema, optional);
    }
    (schema, false)
}

fn input(schema: &Value, defs: &Value) -> Input {
    if schema["type"] == "array" {
        let (items, _) = resolve(&schema["items"], defs);
        return match (input(&items, defs), items["type"].as_str()) {
            (Input::Choice(choices), _) => Input::Choices(choices),
            (_, Some("integer")) => Input::Ints,
            (_, Some("number")) => Input::Floats,
            _ => Input::Words,
        };
    }
    if let Some(options) = schema["oneOf"].as_array() {
        let choices = options
            .iter()
            .filter_map(|o| {
                let value = o["const"].as_str()?;
                Some((value.to_string(), one_line(o["description"].as_str()?)))
            })
            .collect();
        return Input::Choice(choices);
    }
    if let Some(options) = schema["enum"].as_array() {
        let choices = options
            .iter()
            .filter_map(|o| Some((o.as_str()?.to_string(), String::new())))
            .collect();
        return Input::Choice(choices);
    }
    match schema["type"].as_str() {
        Some("integer") => Input::Int,
        Some("number") => Input::Float,
        Some("boolean") => Input::Bool,
        _ => Input::Text,
    }
}

/// A description's first paragraph (the label) and the rest (the help), each on one line; a
/// description of one paragraph is all help.
fn paragraphs(schema: &Value) -> (String, String) {
    let text = schema["description"].as_str().unwrap_or_default();
    match text.split_once("\n\n") {
        Some((first, rest)) => (one_line(first), one_line(rest)),
        None => (String::new(), one_line(text)),
    }
}

/// A table's title: the schema's own, or its description's first paragraph.
fn title(schema: &Value) -> String {
    match schema["title"].as_str() {
        Some(title) => title.to_string(),
        None => {
            let text = schema["description"].as_str().unwrap_or_default();
            one_line(text.split("\n\n").next().unwrap_or_default())
        }
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A default as the form shows it.
pub fn as_text(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(as_text).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

/// The config from a form's text (key → text): empty fields are left out (the type's default
/// applies), except a required one of the config itself (never silently replaced: the model,
/// the training data), and a dotted key goes into its table.
pub fn config_from_text(
    fields: &[FormField],
    values: &BTreeMap<String, String>,
) -> Result<Map<String, Value>, FieldError> {
    let mut root = Map::new();
    for field in fields {
        let raw = values.get(&field.key).map(|s| s.trim()).unwrap_or_default();
        let wrong = |expected| FieldError {
            key: field.key.clone(),
            expected,
        };
        if raw.is_empty() {
            // A table's own required keys are required only where the table is given.
            let of_the_config = !field.key.contains('.');
            if field.required && of_the_config && !field.server_sets {
                return Err(wrong("a value (this field is required)"));
            }
            continue;
        }
        let whole = |s: &str| s.parse::<u64>().map(Value::from);
        let value = match &field.input {
            Input::Text => Value::String(raw.to_string()),
            Input::Choice(choices) => {
                if !choices.iter().any(|(value, _)| value == raw) {
                    return Err(wrong("one of the choices"));
                }
                Value::String(raw.to_string())
            }
            Input::Bool => match raw {
                "true" => Value::Bool(true),
                "false" => Value::Bool(false),
                _ => return Err(wrong("true or false")),
            },
            Input::Int => whole(raw).map_err(|_| wrong("a whole number ≥ 0"))?,
            Input::Float => raw
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .map(Value::from)
                .ok_or_else(|| wrong("a number"))?,
            Input::Ints => Value::Array(
                list(raw)
                    .map(whole)
                    .collect::<Result<_, _>>()
                    .map_err(|_| wrong("whole numbers ≥ 0, separated by commas"))?,
            ),
            Input::Floats => Value::Array(
                list(raw)
                    .map(|s| {
                        s.parse::<f64>()
                            .ok()
                            .filter(|v| v.is_finite())
                            .map(Value::from)
                    })
                    .collect::<Option<_>>()
                    .ok_or_else(|| wrong("numbers, separated by commas"))?,
            ),
            Input::Choices(choices) => Value::Array(
                list(raw)
                    .map(|s| {
                        choices
                            .iter()
                            .any(|(value, _)| value == s)
                            .then(|| Value::from(s.to_string()))
                    })
                    .collect::<Option<_>>()
                    .ok_or_else(|| wrong("some of the choices, separated by commas"))?,
            ),
            Input::Words => Value::Array(list(raw).map(|s| Value::from(s.to_string())).collect()),
        };
        let path: Vec<&str> = field.key.split('.').collect();
        insert(&mut root, &path, value);
    }
    Ok(root)
}

/// Sets the dotted `path` in `table`, making the tables on the way. (No panics here: this runs
/// in the panel, where a panic's location would carry this file's build path.)
fn insert(table: &mut Map<String, Value>, path: &[&str], value: Value) {
    match path {
        [] => {}
        [name] => {
            table.insert(name.to_string(), value);
        }
        [parent, rest @ ..] => {
            let inner = table
                .entry(*parent)
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(inner) = inner {
                insert(inner, rest, value);
            }
        }
    }
}

fn list(raw: &str) -> impl Iterator<Item = &str> {
    raw.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// Collects a JSON text's keys in the order they are written, dotted into nested objects.
struct KeyOrder<'a> {
    prefix: String,
    out: &'a mut Vec<String>,
}

impl<'de> DeserializeSeed<'de> for KeyOrder<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeyOrder<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            let key = match self.prefix.as_str() {
                "" => key,
                prefix => format!("{prefix}.{key}"),
            };
            self.out.push(key.clone());
            map.next_value_seed(KeyOrder {
                prefix: key,
                out: &mut *self.out,
            })?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Method;
    use crate::spec::{RunConfig, SafetyEvalConfig};

    fn example() -> RunConfig {
        let mut config = RunConfig::with_paths("m".into(), "t.jsonl".into(), "out".into());
        config.safety_eval = Some(SafetyEvalConfig::default());
        config
    }

    /// Every key the type serialises, found without the form: the form must have each leaf.
    fn leaves(value: &Value, prefix: &str, out: &mut Vec<String>) {
        for (key, inner) in value.as_object().unwrap() {
            let key = match prefix {
                "" => key.clone(),
                p => format!("{p}.{key}"),
            };
            match inner {
                Value::Object(_) => leaves(inner, &key, out),
                _ => out.push(key),
            }
        }
    }

    #[test]
    fn the_run_form_has_every_field_of_the_type_labelled_and_grouped() {
        let form = fields(&example());
        let mut keys: Vec<String> = form.iter().map(|f| f.key.clone()).collect();
        let mut expected = Vec::new();
        leaves(&serde_json::to_value(example()).unwrap(), "", &mut expected);
        assert_eq!(
            keys[..3],
            ["model", "train_data", "safety_data"],
            "declared order"
        );
        keys.sort();
        expected.sort();
        assert_eq!(keys, expected);
        for field in &form {
            assert!(!field.label.is_empty(), "{}", field.key);
            assert!(!field.help.is_empty(), "{} has no help", field.key);
            assert_ne!(
                field.section, "Other settings",
                "{} has no section",
                field.key
            );
        }
        let by_key = |k: &str| form.iter().find(|f| f.key == k).unwrap();
        assert_eq!(by_key("sap.rho").section, "SAP (Safety-Aware Probing)");
        assert_eq!(by_key("sap.rho").input, Input::Float);
        assert_eq!(by_key("sap.rho").default, "0.00002");
        assert_eq!(by_key("sap.layers").input, Input::Ints);
        assert_eq!(by_key("lora.target_modules").input, Input::Words);
        assert_eq!(by_key("max_steps").label, "steps");
        assert_eq!(by_key("epochs").default, "");
        assert!(by_key("model").required && !by_key("safety_data").required);
        assert!(by_key("output_dir").server_sets && !by_key("model").server_sets);
        assert_eq!(
            by_key("safety_eval.refusal").section,
            "Held-out safety metrics"
        );
    }

    #[test]
    fn the_method_choice_is_every_trainable_method_described() {
        let form = fields(&example());
        let method = form.iter().find(|f| f.key == "method").unwrap();
        let expected: Vec<(String, String)> = Method::TRAINABLE
            .iter()
            .map(|m| (m.name().to_string(), m.describe().to_string()))
            .collect();
        assert!(!Method::TRAINABLE.contains(&Method::Base));
        assert_eq!(Method::TRAINABLE.len() + 1, Method::ALL.len());
        assert_eq!(method.input, Input::Choice(expected));
        assert_eq!(method.default, "sap");
    }

    /// The form's defaults read back as the type's defaults: what the form shows is what a
    /// run gets.
    #[test]
    fn the_defaults_as_text_read_back_as_the_config() {
        let form = fields(&example());
        let mut values: BTreeMap<String, String> = form
            .iter()
            .map(|f| (f.key.clone(), f.default.clone()))
            .collect();
        for (key, value) in [
            ("model", "m"),
            ("train_data", "t.jsonl"),
            ("output_dir", "out"),
        ] {
            values.insert(key.into(), value.into());
        }
        let config = config_from_text(&form, &values).unwrap();
        let read: RunConfig = serde_json::from_value(Value::Object(config)).unwrap();
        assert_eq!(read, example());
    }

    #[test]
    fn text_that_does_not_read_as_its_input_is_named() {
        let form = fields(&example());
        let values = |key: &str, text: &str| {
            let mut values = BTreeMap::from([
                ("model".to_string(), "m".to_string()),
                ("train_data".to_string(), "t.jsonl".to_string()),
            ]);
            values.insert(key.to_string(), text.to_string());
            values
        };
        for (key, text, expected) in [
            ("model", " ", "a value (this field is required)"),
            ("train_data", "", "a value (this field is required)"),
            ("max_steps", "lots", "a whole number ≥ 0"),
            ("max_steps", "-3", "a whole number ≥ 0"),
            ("lr", "fast", "a number"),
            ("lr", "inf", "a number"),
            (
                "sap.layers",
                "3, x",
                "whole numbers ≥ 0, separated by commas",
            ),
            ("method", "magic", "one of the choices"),
            ("shuffle", "yes", "true or false"),
        ] {
            let error = config_from_text(&form, &values(key, text)).unwrap_err();
            assert_eq!((error.key.as_str(), error.expected), (key, expected));
        }
        let config = config_from_text(&form, &values("sap.layers", "3, 4,")).unwrap();
        assert_eq!(config["sap"]["layers"], serde_json::json!([3, 4]));
    }
}

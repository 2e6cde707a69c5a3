//! A config form as the server serves it (`GET /api/forms/{run,compare,eval}`, each built
//! from its config type there, so the schema code stays out of the panel): fetched once per
//! page load, rendered by section with each field's input, help and error, and read back
//! into the request's config with `form::config_from_text`.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use leptos::prelude::*;
use leptos::task::spawn_local;
use safeprobe_wire::spec::form::{self, FieldError, FormField, Input};
use safeprobe_wire::{CreateJob, ErrorBody, Job, JobEstimate, JobKind};
use serde_json::{Map, Value};

use crate::{Live, Page, api, go};

/// The text of each field, by key ("" or absent: the default).
pub type Values = RwSignal<BTreeMap<String, String>>;
/// The config the values read as, or the first field that does not read.
pub type Config = Memo<Result<Map<String, Value>, FieldError>>;

/// One of the server's forms, kept for the page's life once fetched.
pub struct ServedForm {
    url: &'static str,
    fields: OnceLock<Vec<FormField>>,
}

pub static RUN_FORM: ServedForm = ServedForm::new("/api/forms/run");
pub static COMPARE_FORM: ServedForm = ServedForm::new("/api/forms/compare");
pub static EVAL_FORM: ServedForm = ServedForm::new("/api/forms/eval");

impl ServedForm {
    const fn new(url: &'static str) -> Self {
        Self {
            url,
            fields: OnceLock::new(),
        }
    }

    /// Its fields; empty until fetched.
    pub fn fields(&'static self) -> &'static [FormField] {
        self.fields.get().map(Vec::as_slice).unwrap_or_default()
    }

    /// A signal that turns true once the fields are here (fetching them if need be); a
    /// failed fetch is reported in `error`.
    pub fn load(&'static self, error: RwSignal<Option<ErrorBody>>) -> RwSignal<bool> {
        let loaded = RwSignal::new(self.fields.get().is_some());
        if !loaded.get_untracked() {
            spawn_local(async move {
                match api::get::<Vec<FormField>>(self.url).await {
                    Ok(fields) => {
                        let _ = self.fields.set(fields);
                        loaded.set(true);
                    }
                    Err(e) => error.set(Some(ErrorBody {
                        error: format!("the form could not be loaded: {e}"),
                        field: None,
                    })),
                }
            });
        }
        loaded
    }

    /// The config the form's values read as, rebuilt when the fields arrive.
    pub fn config(&'static self, loaded: RwSignal<bool>, values: Values) -> Config {
        Memo::new(move |_| {
            loaded.get();
            values.with(|v| form::config_from_text(self.fields(), v))
        })
    }

    /// The fields a request may set (the server chooses the output folder), grouped by
    /// section, sections in the order they first appear.
    pub fn sections(&'static self) -> Vec<(&'static str, Vec<&'static FormField>)> {
        let mut grouped: Vec<(&'static str, Vec<&'static FormField>)> = Vec::new();
        for field in self.fields().iter().filter(|f| !f.server_sets) {
            match grouped.iter_mut().find(|(name, _)| *name == field.section) {
                Some((_, fields)) => fields.push(field),
                None => grouped.push((field.section.as_str(), vec![field])),
            }
        }
        grouped
    }
}

/// A form on a page: its served fields, the text of each (kept in the browser's storage, so
/// that edits survive a reload), the config they read as, and the server's refusal of the
/// last start.
#[derive(Clone, Copy)]
pub struct FormState {
    pub form: &'static ServedForm,
    pub loaded: RwSignal<bool>,
    pub values: Values,
    pub config: Config,
    pub refusal: RwSignal<Option<ErrorBody>>,
}

impl ServedForm {
    /// The form's state for a page: the edits kept from the last visit, else `initial`.
    pub fn state(&'static self, initial: impl FnOnce() -> BTreeMap<String, String>) -> FormState {
        let refusal = RwSignal::new(None);
        let loaded = self.load(refusal);
        let key = format!("safeprobe-form:{}", self.url);
        let kept = storage()
            .and_then(|s| s.get_item(&key).ok().flatten())
            .and_then(|text| serde_json::from_str(&text).ok());
        let values = RwSignal::new(kept.unwrap_or_else(initial));
        // Every edit is kept, and clears the server's refusal of the values before it.
        Effect::new(move |_| {
            let text = values.with(|v| serde_json::to_string(v).expect("text map"));
            if let Some(s) = storage() {
                let _ = s.set_item(&key, &text);
            }
            refusal.set(None);
        });
        FormState {
            form: self,
            loaded,
            values,
            config: self.config(loaded, values),
            refusal,
        }
    }
}

fn storage() -> Option<web_sys::Storage> {
    web_sys::window()?.local_storage().ok()?
}

/// Starts a job of `kind` with the form's config (nothing while a field does not read) and
/// opens its page; the server's refusal goes to the form, at the field it names.
pub fn start_job(live: Live, kind: JobKind, state: FormState) {
    let Ok(config) = state.config.get_untracked() else {
        return;
    };
    let request = CreateJob {
        kind,
        config: Value::Object(config),
    };
    state.refusal.set(None);
    spawn_local(async move {
        match api::post_form::<_, Job>("/api/jobs", &request).await {
            Ok(job) => {
                live.jobs.refetch();
                go(Page::Run(job.id));
            }
            Err(refusal) => state.refusal.set(Some(refusal)),
        }
    })
}

/// The form's field a refusal names (its key within the request is `config.<field key>`), and
/// what it says without the key.
fn refused_field(state: FormState, refusal: &ErrorBody) -> Option<(&'static FormField, String)> {
    let key = refusal.field.as_deref()?.strip_prefix("config.")?;
    let field = state.form.fields().iter().find(|f| f.key == key)?;
    let prefix = format!("config.{key}: ");
    let message = refusal
        .error
        .strip_prefix(&prefix)
        .unwrap_or(&refusal.error);
    Some((field, message.to_string()))
}

/// The start button with what stands in its way, kept in sight at the foot of the window
/// (`position: sticky`) however long the form: a field that does not read, or the server's
/// refusal, named by the field's label (the message itself is also at the field).
#[component]
pub fn StartBar(
    state: FormState,
    /// The kind of job it starts, for the memory estimate.
    kind: JobKind,
    /// The button's text and its element id.
    label: &'static str,
    id: &'static str,
    on_start: impl Fn() + 'static,
) -> impl IntoView {
    // What the job would take, asked of the server whenever the config reads differently.
    let estimate = LocalResource::new(move || {
        let config = state.config.get();
        async move {
            let config = config.ok()?;
            let request = CreateJob {
                kind,
                config: Value::Object(config),
            };
            api::post::<_, JobEstimate>("/api/jobs/estimate", &request)
                .await
                .ok()
        }
    });
    let estimated = move || {
        estimate.get().flatten().map(|e| {
            let over = e
                .limit
                .as_ref()
                .is_some_and(|(bytes, _)| e.memory_bytes > *bytes);
            let limit = e
                .limit
                .map(|(bytes, whose)| format!(" of the {} {whose}", gib(bytes)))
                .unwrap_or_default();
            let time = match (e.time, kind) {
                (Some((seconds, job)), _) => format!(
                    "; takes about {} at the pace of job {job}",
                    crate::series::duration(seconds)
                ),
                (None, JobKind::Train) => "; no finished run like it to time it by".into(),
                (None, JobKind::Compare) => "; no finished comparison like it to time it by".into(),
                (None, _) => String::new(),
            };
            view! {
                <span class=if over { "help error" } else { "help" } id="memory-estimate">
                    {format!("needs about {}{limit}{time}", e.memory)}
                </span>
            }
        })
    };
    let blocked = move || match state.config.get() {
        Err(e) => {
            let label = state
                .form
                .fields()
                .iter()
                .find(|f| f.key == e.key)
                .map_or(e.key.clone(), |f| f.label.clone());
            Some(format!("“{label}” above: expected {}", e.expected))
        }
        Ok(_) => state.refusal.with(|refusal| {
            let refusal = refusal.as_ref()?;
            Some(match refused_field(state, refusal) {
                Some((field, message)) => format!("“{}” above: {message}", field.label),
                None => refusal.error.clone(),
            })
        }),
    };
    view! {
        <div class="start-bar">
            <button class="primary" id=id on:click=move |_| on_start()
                disabled=move || !state.loaded.get() || state.config.with(Result::is_err)>{label}</button>
            {move || blocked().map(|b| view! { <span class="error" id="form-error">{b}</span> })}
            {estimated}
        </div>
    }
}

/// Bytes in GiB, for the estimate's limit.
fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// The sections of the form whose keys start with `prefix`, each a card of its fields.
#[component]
pub fn FormSections(
    state: FormState,
    #[prop(default = "")] prefix: &'static str,
    /// Leave out the fields under this prefix (shown elsewhere).
    #[prop(optional)]
    except: Option<&'static str>,
) -> impl IntoView {
    let shown = move |field: &&FormField| {
        field.key.starts_with(prefix) && except.is_none_or(|e| !field.key.starts_with(e))
    };
    move || {
        state.loaded.get().then(|| {
            state.form.sections()
                .into_iter()
                .filter_map(|(section, fields)| {
                    let fields: Vec<&'static FormField> = fields.into_iter().filter(shown).collect();
                    (!fields.is_empty()).then(|| view! {
                        <div class="card">
                            <h2>{section}</h2>
                            <div class="form">
                                {fields.into_iter().map(|field| view! { <FieldInput field state/> }).collect_view()}
                            </div>
                        </div>
                    })
                })
                .collect_view()
        })
    }
}

/// The value of `field` as its input shows it: its text, or its default where it has none.
fn shown_text(field: &FormField, values: Values) -> String {
    let text = values.with(|v| v.get(&field.key).cloned().unwrap_or_default());
    if text.trim().is_empty() {
        field.default.clone()
    } else {
        text
    }
}

/// A choice's select, with what the chosen value means below it.
fn choice_input(
    field: &'static FormField,
    values: Values,
    choices: &'static [(String, String)],
) -> AnyView {
    let key = field.key.as_str();
    let chosen = move || shown_text(field, values);
    let described = move || {
        let chosen = chosen();
        choices
            .iter()
            .find(|(value, _)| *value == chosen)
            .map(|(_, about)| about.clone())
    };
    view! {
        <select name=key prop:value=chosen on:change=move |ev| set_text(values, key, event_target_value(&ev))>
            {(!field.required && field.default.is_empty()).then(|| view! { <option value="">"(default)"</option> })}
            {choices.iter().map(|(value, _)| view! { <option value=value.clone()>{value.clone()}</option> }).collect_view()}
        </select>
        <div class="help">{described}</div>
    }
    .into_any()
}

/// A set of choices: one checkbox each, written back as a comma-separated list.
fn choices_input(
    field: &'static FormField,
    values: Values,
    choices: &'static [(String, String)],
) -> AnyView {
    let key = field.key.as_str();
    let picked = move || -> Vec<String> {
        shown_text(field, values)
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    view! {
        <div class="choices" id=key>
            {choices.iter().map(|(value, about)| {
                let name = value.clone();
                let toggle = move |on: bool| {
                    let mut now = picked();
                    now.retain(|v| *v != name);
                    if on {
                        now.push(name.clone());
                    }
                    // In the choices' own order.
                    let ordered: Vec<&str> = choices
                        .iter()
                        .map(|(v, _)| v.as_str())
                        .filter(|v| now.iter().any(|n| n == v))
                        .collect();
                    set_text(values, key, ordered.join(", "));
                };
                let value = value.clone();
                let checked = {
                    let value = value.clone();
                    move || picked().contains(&value)
                };
                view! {
                    <label class="choice" title=about.clone()>
                        <input type="checkbox" name=key value=value.clone() prop:checked=checked
                            on:change=move |ev| toggle(event_target_checked(&ev))/>
                        {value}
                    </label>
                }
            }).collect_view()}
        </div>
    }
    .into_any()
}

fn set_text(values: Values, key: &str, text: String) {
    values.update(|v| {
        v.insert(key.to_string(), text);
    })
}

/// One field: its input (text, choice, choices or checkbox) with the default as its
/// placeholder, its help, and its error: its text's, checked as it is typed, or the server's
/// refusal of it.
#[component]
pub fn FieldInput(field: &'static FormField, state: FormState) -> impl IntoView {
    let FormState { values, config, .. } = state;
    let key = field.key.as_str();
    let get = move || values.with(|v| v.get(key).cloned().unwrap_or_default());
    let input = match &field.input {
        Input::Choice(choices) => choice_input(field, values, choices),
        Input::Choices(choices) => choices_input(field, values, choices),
        Input::Bool => {
            let checked = move || shown_text(field, values) == "true";
            view! {
                <input type="checkbox" name=key prop:checked=checked
                    on:change=move |ev| set_text(values, key, event_target_checked(&ev).to_string())/>
            }
            .into_any()
        }
        Input::Text | Input::Int | Input::Float | Input::Ints | Input::Floats | Input::Words => {
            view! {
                <input name=key placeholder=field.default.clone() prop:value=get
                    on:input=move |ev| set_text(values, key, event_target_value(&ev))/>
            }
            .into_any()
        }
    };
    let error = move || {
        let message = match config.get() {
            Err(e) if e.key == key => Some(format!("expected {}", e.expected)),
            Err(_) => None,
            Ok(_) => state.refusal.with(|refusal| {
                let (refused, message) = refused_field(state, refusal.as_ref()?)?;
                (refused.key == key).then_some(message)
            }),
        };
        message.map(|m| view! { <div class="help error field-error" data-key=key>{format!("{}: {m}", field.label)}</div> })
    };
    let label = if field.required {
        format!("{} *", field.label)
    } else {
        field.label.clone()
    };
    view! {
        <label for=key title=key>{label}</label> {input}
        <div class="help">{field.help.clone()}</div>
        {error}
    }
}

/// A config as a TOML file: its keys, then one section per table (dotted for nested ones).
pub fn as_toml(config: &Map<String, Value>) -> String {
    fn table(path: &str, config: &Map<String, Value>, out: &mut String) {
        for (key, value) in config {
            if !value.is_object() {
                out.push_str(&format!("{key} = {value}\n"));
            }
        }
        for (key, value) in config {
            if let Value::Object(inner) = value {
                let path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                out.push_str(&format!("\n[{path}]\n"));
                table(&path, inner, out);
            }
        }
    }
    let mut out = String::new();
    table("", config, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_reads_as_toml_with_nested_tables_dotted() {
        let config = serde_json::json!({
            "lr": 0.1, "methods": ["sft", "sap"],
            "train": {"max_steps": 2, "sap": {"rho": 0.5}},
        });
        assert_eq!(
            as_toml(config.as_object().unwrap()),
            "lr = 0.1\nmethods = [\"sft\",\"sap\"]\n\n[train]\nmax_steps = 2\n\n[train.sap]\nrho = 0.5\n"
        );
    }
}

//! Task metrics on a held-out split: mean response-token loss and perplexity, and exact-match
//! accuracy of greedy answers for tasks with short labelled answers.

use safeprobe_model::{Checkpoint, Sampling};
use safeprobe_train::data::{Batch, Example, Sequence, with_system};
use safeprobe_train::loss::task_loss;
use serde::Serialize;

use crate::error::{EvalError, Result};
use crate::tasks::normalise;

#[derive(Debug, Clone, Serialize)]
pub struct TaskReport {
    pub examples: usize,
    pub loss: f64,
    pub perplexity: f64,
    /// % of greedy answers equal to the label (after `normalise`); None when not asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact_match: Option<f64>,
}

pub struct TaskSettings {
    pub system: Option<String>,
    pub batch_size: usize,
    pub max_len: usize,
    pub exact_match: bool,
    /// Checked before each batch: once set, evaluation stops with `EvalError::Cancelled`.
    pub cancel: Option<safeprobe_train::run::Cancel>,
}

impl Default for TaskSettings {
    fn default() -> Self {
        Self {
            system: None,
            batch_size: 16,
            max_len: 256,
            cancel: None,
            exact_match: true,
        }
    }
}

pub fn evaluate(
    checkpoint: &Checkpoint,
    examples: &[Example],
    settings: &TaskSettings,
) -> Result<TaskReport> {
    if examples.is_empty() {
        return Err(EvalError::Invalid(
            "no held-out examples to evaluate".into(),
        ));
    }
    if settings.batch_size == 0 {
        return Err(EvalError::Invalid("batch size must be at least 1".into()));
    }
    let conversations: Vec<_> = examples
        .iter()
        .map(|e| with_system(&e.prompt, settings.system.as_deref()))
        .collect();
    let sequences = conversations
        .iter()
        .zip(examples)
        .map(|(c, e)| Sequence::encode(&checkpoint.tokenizer, c, &e.response, settings.max_len))
        .collect::<safeprobe_train::Result<Vec<_>>>()?;
    let (mut total, mut tokens) = (0.0, 0usize);
    let check = || match &settings.cancel {
        Some(c) if c.is_cancelled() => Err(EvalError::Cancelled),
        _ => Ok(()),
    };
    for chunk in sequences.chunks(settings.batch_size) {
        check()?;
        let batch = Batch::new(chunk, checkpoint.tokenizer.pad_id, &checkpoint.device);
        let loss = task_loss(&checkpoint.model, &batch, None);
        total += safeprobe_train::params::scalar(&loss) * batch.response_tokens as f64;
        tokens += batch.response_tokens;
    }
    let loss = total / tokens.max(1) as f64;

    let exact_match = if settings.exact_match {
        // Room for the longest label and its end-of-turn token.
        let longest = sequences
            .iter()
            .map(Sequence::response_tokens)
            .max()
            .unwrap_or(1);
        let sampling = Sampling {
            max_new_tokens: longest + 2,
            ..Sampling::default()
        };
        let mut correct = 0;
        for (chunk, labels) in conversations
            .chunks(settings.batch_size)
            .zip(examples.chunks(settings.batch_size))
        {
            check()?;
            for ((text, _), label) in checkpoint
                .generate_batch(chunk, &sampling)?
                .iter()
                .zip(labels)
            {
                correct += (normalise(text) == normalise(&label.response)) as usize;
            }
        }
        Some(100.0 * correct as f64 / examples.len() as f64)
    } else {
        None
    };
    Ok(TaskReport {
        examples: examples.len(),
        loss,
        perplexity: loss.exp(),
        exact_match,
    })
}

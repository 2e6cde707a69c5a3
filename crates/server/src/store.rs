//! The run store: one SQLite file in the data directory (WAL, numbered migrations) holding
//! jobs with their resolved configs, every event they emitted, and their results. Each write
//! is one transaction, so a crash leaves either the whole change or none of it.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::ApiError;
use safeprobe_wire::{Event, JobLabel, JobProgress, JobSpec};

/// Schema changes, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        status TEXT NOT NULL,
        spec TEXT NOT NULL,
        run_dir TEXT,
        result TEXT,
        error TEXT,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL
    );
    CREATE TABLE events (
        job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        at REAL NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (job_id, seq)
    );
    CREATE TABLE answers (
        job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (job_id, idx)
    );",
    // Event numbers never repeat within a job, even after a resumed run drops the steps it
    // replays (a client that has seen number n then knows every later event is new).
    "ALTER TABLE jobs ADD COLUMN last_seq INTEGER NOT NULL DEFAULT 0;
    UPDATE jobs SET last_seq = (SELECT COALESCE(MAX(seq), 0) FROM events WHERE job_id = jobs.id);",
    // A job's name and notes, the user's own words about it.
    "ALTER TABLE jobs ADD COLUMN name TEXT NOT NULL DEFAULT '';
    ALTER TABLE jobs ADD COLUMN notes TEXT NOT NULL DEFAULT '';",
];

pub use safeprobe_wire::{Job, JobKind, JobResult, JudgedAnswer, Status, StoredEvent};

fn parse_status(s: &str) -> Status {
    match s {
        "queued" => Status::Queued,
        "running" => Status::Running,
        "done" => Status::Done,
        "failed" => Status::Failed,
        "cancelled" => Status::Cancelled,
        _ => Status::Interrupted,
    }
}

fn parse_kind(s: &str) -> rusqlite::Result<JobKind> {
    JobKind::ALL
        .into_iter()
        .find(|k| k.name() == s)
        .ok_or_else(|| {
            rusqlite::Error::InvalidColumnType(
                1,
                format!("kind {s:?}"),
                rusqlite::types::Type::Text,
            )
        })
}

/// Drops job ?1's step and validation events after step ?2, keeping status events.
const DROP_STEPS_AFTER: &str = "DELETE FROM events WHERE job_id = ?1
    AND json_extract(body, '$.step') IS NOT NULL
    AND json_extract(body, '$.step') > ?2";

pub struct Store {
    conn: Mutex<Connection>,
}

pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn db(e: rusqlite::Error) -> ApiError {
    ApiError::Internal(format!("database: {e}"))
}

/// A stored JSON column as `T`; None when empty or not of that shape (a row written by
/// another version).
fn json<T: DeserializeOwned>(text: Option<String>) -> Option<T> {
    text.and_then(|t| serde_json::from_str(&t).ok())
}

/// A job's config as its column holds it (the kind has its own column).
fn config_text(spec: &JobSpec) -> String {
    let mut tagged = serde_json::to_value(spec).expect("wire types serialise");
    tagged["spec"].take().to_string()
}

/// An event with its number and time, as the job list's query reads it.
type Numbered = (i64, f64, Event);

/// A job's progress from its newest step and its newest stage, folded in their order.
fn progress(mut newest: [Option<Numbered>; 2]) -> JobProgress {
    newest.sort_by_key(|e| e.as_ref().map(|(seq, _, _)| *seq));
    JobProgress::of(newest.iter().flatten().map(|(seq, at, e)| (*seq, *at, e)))
}

fn text(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("wire types serialise")
}

impl Store {
    /// Opens (creating if needed) the store and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self, ApiError> {
        let mut conn = Connection::open(path)
            .map_err(|e| ApiError::Internal(format!("{}: {e}", path.display())))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db)?;
        let version: usize = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(db)?;
        if version > MIGRATIONS.len() {
            return Err(ApiError::Internal(format!(
                "{}: written by a newer safeprobe (schema {version}, this one knows {})",
                path.display(),
                MIGRATIONS.len()
            )));
        }
        for (i, migration) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = conn.transaction().map_err(db)?;
            tx.execute_batch(migration).map_err(db)?;
            tx.pragma_update(None, "user_version", i + 1).map_err(db)?;
            tx.commit().map_err(db)?;
        }
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks jobs that were running when the server stopped as interrupted; returns the ids
    /// of jobs still queued, oldest first.
    pub fn recover(&self) -> Result<Vec<i64>, ApiError> {
        let conn = self.conn();
        conn.execute(
            "UPDATE jobs SET status = 'interrupted', finished_at = ?1 WHERE status = 'running'",
            params![now()],
        )
        .map_err(db)?;
        let mut stmt = conn
            .prepare("SELECT id FROM jobs WHERE status = 'queued' ORDER BY id")
            .map_err(db)?;
        let ids = stmt
            .query_map([], |r| r.get(0))
            .map_err(db)?
            .collect::<Result<Vec<i64>, _>>()
            .map_err(db)?;
        Ok(ids)
    }

    pub fn create(&self, spec: &JobSpec) -> Result<i64, ApiError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO jobs (kind, status, spec, created_at) VALUES (?1, 'queued', ?2, ?3)",
            params![spec.kind().name(), config_text(spec), now()],
        )
        .map_err(db)?;
        Ok(conn.last_insert_rowid())
    }

    pub fn set_spec(&self, id: i64, spec: &JobSpec, run_dir: Option<&str>) -> Result<(), ApiError> {
        self.conn()
            .execute(
                "UPDATE jobs SET spec = ?2, run_dir = ?3 WHERE id = ?1",
                params![id, config_text(spec), run_dir],
            )
            .map_err(db)?;
        Ok(())
    }

    /// Records a job's new status; a job starts running only through `start`, which checks
    /// that it is still queued.
    pub fn set_status(&self, id: i64, status: Status, error: Option<&str>) -> Result<(), ApiError> {
        let conn = self.conn();
        let t = now();
        match status {
            Status::Queued => conn.execute(
                "UPDATE jobs SET status = ?2, error = NULL, finished_at = NULL WHERE id = ?1",
                params![id, status.name()],
            ),
            _ => conn.execute(
                "UPDATE jobs SET status = ?2, error = ?3, finished_at = ?4 WHERE id = ?1",
                params![id, status.name(), error, t],
            ),
        }
        .map_err(db)?;
        Ok(())
    }

    pub fn set_result(&self, id: i64, result: &JobResult) -> Result<(), ApiError> {
        self.conn()
            .execute(
                "UPDATE jobs SET result = ?2 WHERE id = ?1",
                params![id, text(result)],
            )
            .map_err(db)?;
        Ok(())
    }

    /// Marks a queued job running; false when it is no longer queued (cancelled or deleted
    /// while it waited).
    pub fn start(&self, id: i64) -> Result<bool, ApiError> {
        let n = self
            .conn()
            .execute(
                "UPDATE jobs SET status = 'running', started_at = ?2, error = NULL, finished_at = NULL
                 WHERE id = ?1 AND status = 'queued'",
                params![id, now()],
            )
            .map_err(db)?;
        Ok(n == 1)
    }

    /// Puts an interrupted, cancelled or failed job back in the queue with `spec`, dropping
    /// its step events after `keep_steps_to` (a resumed run replays from its checkpoint), all
    /// in one transaction; false when the job is in no such state (another resume won).
    pub fn requeue(&self, id: i64, spec: &JobSpec, keep_steps_to: i64) -> Result<bool, ApiError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db)?;
        let n = tx
            .execute(
                "UPDATE jobs SET status = 'queued', spec = ?2, error = NULL, finished_at = NULL
                 WHERE id = ?1 AND status IN ('interrupted', 'cancelled', 'failed')",
                params![id, config_text(spec)],
            )
            .map_err(db)?;
        if n == 0 {
            return Ok(false);
        }
        tx.execute(DROP_STEPS_AFTER, params![id, keep_steps_to])
            .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(true)
    }

    /// Cancels a job if it is still queued; false when it is not (running, finished, gone).
    pub fn cancel_queued(&self, id: i64) -> Result<bool, ApiError> {
        let n = self
            .conn()
            .execute(
                "UPDATE jobs SET status = 'cancelled', finished_at = ?2 WHERE id = ?1 AND status = 'queued'",
                params![id, now()],
            )
            .map_err(db)?;
        Ok(n == 1)
    }

    /// Appends an event; returns its sequence number within the job, one more than any
    /// number the job has used, so numbers are never reused, and the time it was stored.
    pub fn add_event(&self, id: i64, body: &Event) -> Result<(i64, f64), ApiError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db)?;
        let seq: i64 = tx
            .query_row(
                "UPDATE jobs SET last_seq = last_seq + 1 WHERE id = ?1 RETURNING last_seq",
                params![id],
                |r| r.get(0),
            )
            .map_err(db)?;
        let at = now();
        tx.execute(
            "INSERT INTO events (job_id, seq, at, body) VALUES (?1, ?2, ?3, ?4)",
            params![id, seq, at, text(body)],
        )
        .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok((seq, at))
    }

    pub fn set_answers(&self, id: i64, answers: &[JudgedAnswer]) -> Result<(), ApiError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(db)?;
        tx.execute("DELETE FROM answers WHERE job_id = ?1", params![id])
            .map_err(db)?;
        for (i, a) in answers.iter().enumerate() {
            tx.execute(
                "INSERT INTO answers (job_id, idx, body) VALUES (?1, ?2, ?3)",
                params![id, i as i64, text(a)],
            )
            .map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(())
    }

    pub fn answers(&self, id: i64) -> Result<Vec<JudgedAnswer>, ApiError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT body FROM answers WHERE job_id = ?1 ORDER BY idx")
            .map_err(db)?;
        let rows = stmt
            .query_map(params![id], |r| r.get::<_, String>(0))
            .map_err(db)?
            .filter_map(|r| r.ok().and_then(|t| serde_json::from_str(&t).ok()))
            .collect();
        Ok(rows)
    }

    /// Events of a job with seq > `after`, at most `limit` rows read, and the last row's seq
    /// (the next page starts after it, even where a row does not read as an event).
    pub fn events(
        &self,
        id: i64,
        after: i64,
        limit: i64,
    ) -> Result<(Vec<StoredEvent>, Option<i64>), ApiError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT seq, at, body FROM events WHERE job_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map(params![id, after, limit], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, f64>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(db)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db)?;
        let last = rows.last().map(|(seq, _, _)| *seq);
        let events = rows
            .into_iter()
            .filter_map(|(seq, at, body)| {
                Some(StoredEvent {
                    seq,
                    at,
                    body: serde_json::from_str(&body).ok()?,
                })
            })
            .collect();
        Ok((events, last))
    }

    fn row(r: &rusqlite::Row) -> rusqlite::Result<Job> {
        let id = r.get(0)?;
        let kind = parse_kind(&r.get::<_, String>(1)?)?;
        let config: Value = json(Some(r.get(3)?)).unwrap_or(Value::Null);
        let spec = JobSpec::read(kind, config).map_err(|e| {
            let unreadable = format!(
                "job {id}: its stored {} config does not read: {e}",
                kind.name()
            );
            rusqlite::Error::FromSqlConversionFailure(
                3,
                rusqlite::types::Type::Text,
                unreadable.into(),
            )
        })?;
        let newest_step: Option<Numbered> = json(r.get(10)?);
        Ok(Job {
            id,
            spec,
            status: parse_status(&r.get::<_, String>(2)?),
            run_dir: r.get(4)?,
            result: json(r.get(5)?),
            error: r.get(6)?,
            created_at: r.get(7)?,
            started_at: r.get(8)?,
            finished_at: r.get(9)?,
            progress: progress([newest_step.clone(), json(r.get(13)?)]),
            last_step: newest_step.map(|(_, _, step)| step),
            last_validation: json(r.get(11)?),
            last_alignment: json::<Event>(r.get(12)?).and_then(|e| match e {
                Event::Step { metrics, .. } => metrics.alignment,
                _ => None,
            }),
            answers: Vec::new(),
            name: r.get(14)?,
            notes: r.get(15)?,
        })
    }

    const SELECT: &'static str = "SELECT id, kind, status, spec, run_dir, result, error, created_at, started_at, finished_at,
        (SELECT json_array(seq, at, json(body)) FROM events e WHERE e.job_id = jobs.id
         AND json_extract(body, '$.event') = 'step' ORDER BY seq DESC LIMIT 1),
        (SELECT body FROM events e WHERE e.job_id = jobs.id AND json_extract(body, '$.event') = 'validation'
         ORDER BY seq DESC LIMIT 1),
        (SELECT body FROM events e WHERE e.job_id = jobs.id AND json_extract(body, '$.event') = 'step'
         AND json_extract(body, '$.alignment') IS NOT NULL ORDER BY seq DESC LIMIT 1),
        (SELECT json_array(seq, at, json(body)) FROM events e WHERE e.job_id = jobs.id
         AND json_extract(body, '$.event') = 'stage' ORDER BY seq DESC LIMIT 1),
        name, notes FROM jobs";

    pub fn get(&self, id: i64) -> Result<Option<Job>, ApiError> {
        self.conn()
            .query_row(
                &format!("{} WHERE id = ?1", Self::SELECT),
                params![id],
                Self::row,
            )
            .optional()
            .map_err(db)
    }

    pub fn list(&self) -> Result<Vec<Job>, ApiError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!("{} ORDER BY id DESC", Self::SELECT))
            .map_err(db)?;
        let mut jobs = Vec::new();
        for row in stmt.query_map([], Self::row).map_err(db)? {
            match row {
                Ok(job) => jobs.push(job),
                // A job whose config this version cannot read (written by another) is left in
                // the store, untouched, and out of the list; opening it says why.
                Err(e @ rusqlite::Error::FromSqlConversionFailure(..)) => {
                    tracing::warn!("{e}");
                }
                Err(e) => return Err(db(e)),
            }
        }
        Ok(jobs)
    }

    /// Sets a job's name and notes; false when there is no such job.
    pub fn label(&self, id: i64, label: &JobLabel) -> Result<bool, ApiError> {
        let n = self
            .conn()
            .execute(
                "UPDATE jobs SET name = ?2, notes = ?3 WHERE id = ?1",
                params![id, label.name, label.notes],
            )
            .map_err(db)?;
        Ok(n == 1)
    }

    pub fn delete(&self, id: i64) -> Result<bool, ApiError> {
        let n = self
            .conn()
            .execute("DELETE FROM jobs WHERE id = ?1", params![id])
            .map_err(db)?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step_event(step: usize) -> Event {
        Event::Step {
            step,
            total_steps: 5,
            lr: 1e-3,
            tokens_per_s: 1.0,
            step_time_s: 1.0,
            metrics: Default::default(),
        }
    }

    fn eval(model: &str) -> JobSpec {
        JobSpec::Eval(safeprobe_wire::EvalSpec::for_model(model.into()))
    }

    /// A job whose stored config this version cannot read stays in the store and out of the
    /// list; opening it names the job and the key.
    #[test]
    fn an_unreadable_stored_config_hides_its_job_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("safeprobe.db")).unwrap();
        let good = store.create(&eval("m")).unwrap();
        let bad = store.create(&eval("m")).unwrap();
        store
            .conn()
            .execute(
                "UPDATE jobs SET spec = '{\"model\": \"m\", \"colour\": 1}' WHERE id = ?1",
                params![bad],
            )
            .unwrap();
        let listed: Vec<i64> = store.list().unwrap().iter().map(|j| j.id).collect();
        assert_eq!(listed, vec![good]);
        let error = store.get(bad).unwrap_err().to_string();
        assert!(
            error.contains(&format!("job {bad}")) && error.contains("colour"),
            "{error}"
        );
    }

    #[test]
    fn jobs_events_and_recovery_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("safeprobe.db");
        let store = Store::open(&path).unwrap();
        let a = store.create(&eval("one")).unwrap();
        let b = store.create(&eval("")).unwrap();
        assert!(store.start(a).unwrap());
        for step in 1..=5 {
            store.add_event(a, &step_event(step)).unwrap();
        }
        drop(store);

        let store = Store::open(&path).unwrap();
        assert_eq!(store.recover().unwrap(), vec![b]);
        let job = store.get(a).unwrap().unwrap();
        assert_eq!(job.status, Status::Interrupted);
        assert_eq!(job.last_step.unwrap().step(), Some(5));
        assert!(job.last_validation.is_none());
        assert_eq!(
            store
                .events(a, 2, 2)
                .unwrap()
                .0
                .iter()
                .map(|e| e.seq)
                .collect::<Vec<_>>(),
            vec![3, 4]
        );
        // A resume requeues the interrupted job and drops the steps after its checkpoint;
        // only the first of two resumes does.
        assert!(store.requeue(a, &eval("two"), 3).unwrap());
        assert!(!store.requeue(a, &eval("three"), 3).unwrap());
        assert_eq!(store.get(a).unwrap().unwrap().status, Status::Queued);
        assert_eq!(store.get(a).unwrap().unwrap().spec, eval("two"));
        assert_eq!(store.events(a, 0, 100).unwrap().0.len(), 3);
        let (next, _) = store.add_event(a, &step_event(4)).unwrap();
        assert_eq!(next, 6, "event numbers are never reused after a truncation");
        assert!(store.delete(a).unwrap());
        assert!(
            store.events(a, 0, 100).unwrap().0.is_empty(),
            "events go with their job"
        );
        assert!(store.get(a).unwrap().is_none());
    }

    #[test]
    fn a_jobs_name_and_notes_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("safeprobe.db");
        let store = Store::open(&path).unwrap();
        let a = store.create(&eval("m")).unwrap();
        assert_eq!(store.get(a).unwrap().unwrap().name, "");
        let label = JobLabel {
            name: "lr 1e-3, T = 100".into(),
            notes: "the first try\nwith the demo model".into(),
        };
        assert!(store.label(a, &label).unwrap());
        assert!(!store.label(a + 1, &label).unwrap(), "no such job");
        drop(store);
        let job = Store::open(&path).unwrap().list().unwrap().remove(0);
        assert_eq!((job.name, job.notes), (label.name, label.notes));
    }

    #[test]
    fn the_list_says_how_far_a_job_in_parts_is() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("safeprobe.db")).unwrap();
        let a = store.create(&eval("m")).unwrap();
        let stage = |number| Event::Stage {
            stage: format!("part {number}"),
            part: Some(safeprobe_wire::Part { number, of: 3 }),
            run: None,
        };
        store.add_event(a, &stage(1)).unwrap();
        store.add_event(a, &stage(2)).unwrap();
        for step in 1..=3 {
            store.add_event(a, &step_event(step)).unwrap();
        }
        let progress = store.get(a).unwrap().unwrap().progress;
        assert_eq!((progress.part.unwrap().number, progress.step), (2, 3));
        assert_eq!(progress.seq, 5);
        assert!((progress.fraction() - (1.0 + 3.0 / 5.0) / 3.0).abs() < 1e-12);
        // A new part's stage after those steps: none of its own steps yet.
        store.add_event(a, &stage(3)).unwrap();
        let listed = store.list().unwrap().remove(0).progress;
        assert_eq!((listed.part.unwrap().number, listed.step), (3, 0));
        assert_eq!(listed.stage.as_deref(), Some("part 3"));
    }

    #[test]
    fn a_job_is_either_started_or_cancelled_never_both() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("safeprobe.db")).unwrap();
        let a = store.create(&eval("m")).unwrap();
        assert!(store.cancel_queued(a).unwrap());
        assert!(!store.start(a).unwrap(), "a cancelled job must not start");
        assert_eq!(store.get(a).unwrap().unwrap().status, Status::Cancelled);
        let b = store.create(&eval("m")).unwrap();
        assert!(store.start(b).unwrap());
        assert!(
            !store.cancel_queued(b).unwrap(),
            "a running job is cancelled through its flag"
        );
        assert_eq!(store.get(b).unwrap().unwrap().status, Status::Running);
    }
}

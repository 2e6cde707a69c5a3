//! The job queue and its supervisor: jobs run one at a time (they share the server's device),
//! each in its own process (`safeprobe job`, see `worker`), started, watched and stopped from
//! here. A job that aborts, is killed for memory or loses its device ends as `failed` with the
//! reason and the tail of its log; the server and the jobs queued after it go on.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use safeprobe_wire::{Job, LiveMessage};
use tokio::sync::broadcast;

use crate::error::ApiError;
use crate::store::{Status, Store};
use crate::worker::{Assignment, CANCEL, Report};
use safeprobe_train::run::Event;

/// How the runner starts a job's process.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    /// The safeprobe binary (the server's own).
    pub program: PathBuf,
    /// The `--device` the jobs run on (the server's).
    pub device: String,
    /// Each job's standard error goes to `<logs_dir>/job-<id>.log`.
    pub logs_dir: PathBuf,
    /// The most memory a job may take (`--job-memory-mib`), in bytes.
    pub job_memory: Option<u64>,
}

/// How long a job asked to stop has to reach its next step (a step of a large model on a CPU,
/// or a batch of answers, takes minutes) before its process is ended without a checkpoint.
const CANCEL_PATIENCE: std::time::Duration = std::time::Duration::from_secs(600);

/// A job that has been taken off the queue: its process once started, and whether it was
/// asked to stop.
#[derive(Default)]
struct Running {
    cancelled: AtomicBool,
    /// Its output has closed: the process has ended (or is about to).
    finished: AtomicBool,
    stdin: Mutex<Option<ChildStdin>>,
    child: Mutex<Option<Child>>,
}

impl Running {
    /// Asks the job to stop at its next step (it writes a checkpoint there); a job that is
    /// hung (in a driver, say) and still running after `CANCEL_PATIENCE` is ended.
    fn cancel(self: &Arc<Self>) {
        let first = !self.cancelled.swap(true, Ordering::SeqCst);
        if let Some(stdin) = self.stdin.lock().unwrap().as_mut() {
            let _ = writeln!(stdin, "{CANCEL}").and_then(|()| stdin.flush());
        }
        if first {
            let running = self.clone();
            std::thread::spawn(move || {
                std::thread::sleep(CANCEL_PATIENCE);
                if !running.finished.load(Ordering::SeqCst) {
                    running.kill();
                }
            });
        }
    }

    /// Ends the process at once (no checkpoint): for a shutdown that ran out of patience.
    fn kill(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        if let Some(child) = self.child.lock().unwrap().as_mut() {
            let _ = child.kill();
        }
    }
}

pub struct Runner {
    pub store: Arc<Store>,
    pub live: broadcast::Sender<String>,
    queue: Mutex<VecDeque<i64>>,
    wake: Condvar,
    running: Mutex<HashMap<i64, Arc<Running>>>,
    worker: WorkerCommand,
    /// Set when the server shuts down: the runner takes no more jobs, and a job stopped by
    /// the shutdown is marked interrupted (resumable), not cancelled.
    stopping: AtomicBool,
    /// Signalled whenever a job ends.
    idle: Condvar,
}

impl Runner {
    pub fn start(store: Arc<Store>, worker: WorkerCommand) -> Result<Arc<Self>, ApiError> {
        std::fs::create_dir_all(&worker.logs_dir)
            .map_err(|e| ApiError::Internal(format!("{}: {e}", worker.logs_dir.display())))?;
        let (live, _) = broadcast::channel(4096);
        let queued = store.recover()?;
        let runner = Arc::new(Self {
            store,
            live,
            queue: Mutex::new(queued.into_iter().collect()),
            wake: Condvar::new(),
            running: Mutex::new(HashMap::new()),
            worker,
            stopping: Default::default(),
            idle: Condvar::new(),
        });
        let worker = runner.clone();
        std::thread::Builder::new()
            .name("safeprobe-jobs".into())
            .spawn(move || worker.work())
            .map_err(|e| ApiError::Internal(format!("cannot start the job runner: {e}")))?;
        Ok(runner)
    }

    /// How jobs' processes are started (the program and device other processes use too).
    pub fn worker(&self) -> &WorkerCommand {
        &self.worker
    }

    /// Puts a job (marked queued in the store) at the end of the queue and says so.
    pub fn enqueue(&self, id: i64) {
        self.queue.lock().unwrap().push_back(id);
        self.wake.notify_one();
        self.announce(
            id,
            Event::Status {
                status: Status::Queued,
                error: None,
            },
        );
    }

    /// Asks a job to stop: a queued job is cancelled at once, a running one at its next step
    /// (or, while it evaluates, before its next batch of prompts).
    pub fn cancel(&self, id: i64) -> Result<(), ApiError> {
        if self.store.cancel_queued(id)? {
            // If the runner has already taken it off the queue, its start fails and it skips it.
            self.queue.lock().unwrap().retain(|j| *j != id);
            self.announce(
                id,
                Event::Status {
                    status: Status::Cancelled,
                    error: None,
                },
            );
            return Ok(());
        }
        // Not queued any more: a running job was registered before it was marked running and
        // is removed only after it ends, so it is there to stop.
        if let Some(running) = self.running.lock().unwrap().get(&id) {
            running.cancel();
        }
        let job = self
            .store
            .get(id)?
            .ok_or_else(|| ApiError::NotFound(format!("job {id} not found")))?;
        match job.status {
            Status::Running => Ok(()),
            other => Err(ApiError::Conflict(format!(
                "job {id} is {}; only queued or running jobs can be cancelled",
                other.name()
            ))),
        }
    }

    /// Stores an event and pushes it to live listeners.
    pub fn announce(&self, id: i64, body: Event) {
        let (seq, at) = self.store.add_event(id, &body).unwrap_or((0, 0.0));
        let _ = self.live.send(
            serde_json::to_string(&LiveMessage {
                job: id,
                seq,
                at,
                body,
            })
            .expect("wire types serialise"),
        );
    }

    /// Stops the running job at its next step (it writes a checkpoint there) and marks it
    /// interrupted, so that Resume continues it; waits for that up to `patience`, then ends
    /// its process. Queued jobs stay queued for the next start.
    pub fn shutdown(&self, patience: std::time::Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        let mut queue = self.queue.lock().unwrap();
        for running in self.running.lock().unwrap().values() {
            running.cancel();
        }
        let deadline = std::time::Instant::now() + patience;
        while !self.running.lock().unwrap().is_empty() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                for running in self.running.lock().unwrap().values() {
                    running.kill();
                }
                break;
            }
            queue = self.idle.wait_timeout(queue, left).unwrap().0;
        }
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn work(&self) {
        loop {
            let id = {
                let mut queue = self.queue.lock().unwrap();
                loop {
                    if !self.stopping()
                        && let Some(id) = queue.pop_front()
                    {
                        break id;
                    }
                    queue = self.wake.wait(queue).unwrap();
                }
            };
            let Ok(Some(job)) = self.store.get(id) else {
                continue;
            };
            // Registered before the job is marked running, so no cancel falls between.
            let running = Arc::new(Running::default());
            self.running.lock().unwrap().insert(id, running.clone());
            if self.stopping() {
                running.cancel();
            }
            if !self.store.start(id).unwrap_or(false) {
                // Cancelled (or deleted) while it waited.
                self.running.lock().unwrap().remove(&id);
                continue;
            }
            self.announce(
                id,
                Event::Status {
                    status: Status::Running,
                    error: None,
                },
            );
            let (status, error) = self.supervise(&job, &running);
            let _ = self.store.set_status(id, status, error.as_deref());
            self.announce(id, Event::Status { status, error });
            // Only now may a shutdown waiting for this job go on.
            let _queue = self.queue.lock().unwrap();
            self.running.lock().unwrap().remove(&id);
            self.idle.notify_all();
        }
    }

    /// The status a job stopped on request ends in.
    fn stopped(&self) -> Status {
        if self.stopping() {
            Status::Interrupted
        } else {
            Status::Cancelled
        }
    }

    fn log_path(&self, id: i64) -> PathBuf {
        self.worker.logs_dir.join(format!("job-{id}.log"))
    }

    /// Runs a job's process to its end, relaying what it reports; returns how it ended.
    fn supervise(&self, job: &Job, running: &Arc<Running>) -> (Status, Option<String>) {
        let mut child = match self.spawn(job) {
            Ok(child) => child,
            Err(e) => return (Status::Failed, Some(e.to_string())),
        };
        let stdout = child.stdout.take().expect("piped");
        *running.stdin.lock().unwrap() = child.stdin.take();
        *running.child.lock().unwrap() = Some(child);
        if running.cancelled.load(Ordering::SeqCst) {
            running.cancel();
        }
        let mut last = None;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<Report>(&line) {
                Ok(Report::Event { event }) => self.announce(job.id, event),
                Ok(Report::Answers { answers }) => {
                    let _ = self.store.set_answers(job.id, &answers);
                }
                Ok(end) => last = Some(end),
                // A report this server cannot read (its result, say) fails the job with why,
                // rather than as a job that said nothing.
                Err(e) if line.starts_with("{\"message\":") => {
                    last = Some(Report::Failed {
                        error: format!("the job's report could not be read: {e}"),
                    });
                }
                // Something in the job printed to standard output; it is not ours to relay.
                Err(_) => tracing::warn!(job = job.id, "not a job report: {line:.200}"),
            }
        }
        running.finished.store(true, Ordering::SeqCst);
        // Its output is closed: the process has ended or is about to.
        running.stdin.lock().unwrap().take();
        let exit = running.child.lock().unwrap().take().map(|mut c| c.wait());
        match last {
            Some(Report::Done { result }) => match self.store.set_result(job.id, &result) {
                Ok(()) => (Status::Done, None),
                Err(e) => (Status::Failed, Some(e.to_string())),
            },
            Some(Report::Cancelled) => (self.stopped(), None),
            Some(Report::Failed { error }) => (Status::Failed, Some(error)),
            _ if running.cancelled.load(Ordering::SeqCst) => (self.stopped(), None),
            _ => {
                let how = match exit {
                    Some(Ok(status)) => ended(status),
                    Some(Err(e)) => format!("could not be waited for ({e})"),
                    None => "ended".into(),
                };
                let log = self.log_path(job.id);
                (
                    Status::Failed,
                    Some(format!(
                        "the job's process {how}\nthe end of its log ({}):\n{}",
                        log.display(),
                        log_tail(&log)
                    )),
                )
            }
        }
    }

    /// Starts `safeprobe job` with the job on its standard input and its standard error in
    /// the job's log.
    fn spawn(&self, job: &Job) -> Result<Child, ApiError> {
        let log_path = self.log_path(job.id);
        let internal = |e: std::io::Error| {
            ApiError::Internal(format!("{}: cannot start the job: {e}", log_path.display()))
        };
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(internal)?;
        let _ = writeln!(
            log,
            "== job {} ({}) starts at {:.0}",
            job.id,
            job.kind().name(),
            crate::store::now(),
        );
        // A request may choose the device (validated when it was created); else the server's.
        let device = job.spec.device().unwrap_or(&self.worker.device);
        let mut command = Command::new(&self.worker.program);
        command
            .args(["job", "--device", device])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log);
        // Its own process group: a Ctrl-C in the server's terminal reaches the server only,
        // which asks the job to stop with a checkpoint instead of the job dying with it.
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn().map_err(|e| {
            ApiError::Internal(format!(
                "{}: cannot start the job's process: {e}",
                self.worker.program.display()
            ))
        })?;
        let assignment = Assignment {
            id: job.id,
            spec: job.spec.clone(),
            job_memory: self.worker.job_memory,
        };
        let line = serde_json::to_string(&assignment).expect("jobs serialise");
        let stdin = child.stdin.as_mut().expect("piped");
        if let Err(e) = writeln!(stdin, "{line}").and_then(|()| stdin.flush()) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ApiError::Internal(format!(
                "cannot hand the job to its process: {e}"
            )));
        }
        Ok(child)
    }
}

/// How a process ended, in words, with the usual cause of each signal.
fn ended(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            let name = match signal {
                6 => "SIGABRT: it aborted, e.g. on a failed memory allocation",
                9 => "SIGKILL: it was killed, e.g. by the kernel's out-of-memory killer",
                11 => "SIGSEGV: an invalid memory access, e.g. in a graphics driver",
                15 => "SIGTERM: it was asked to terminate from outside",
                _ => "a signal",
            };
            return format!("was ended by signal {signal} ({name})");
        }
    }
    match status.code() {
        Some(code) => format!("exited with status {code} without reporting a result"),
        None => "ended without reporting a result".into(),
    }
}

/// The last lines of a log (at most 12 lines of its last 4 KiB).
fn log_tail(path: &std::path::Path) -> String {
    const TAIL: u64 = 4096;
    let Ok(mut file) = std::fs::File::open(path) else {
        return "(no log)".into();
    };
    let length = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(std::io::SeekFrom::Start(length.saturating_sub(TAIL)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(12)..].join("\n")
}

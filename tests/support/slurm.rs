//! A real single-node Slurm for tests: munged, slurmctld and slurmd from Debian's packages,
//! started from a config generated in a temporary folder (its own ports, state and munge key;
//! process tracking by /proc, no cgroups), and stopped when dropped. Needs root, as slurmd
//! does (the tests and CI run as root).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Cluster {
    pub dir: PathBuf,
    pub conf: PathBuf,
    daemons: Vec<Child>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("scancel")
            .env("SLURM_CONF", &self.conf)
            .arg("--full")
            .arg("--user=root")
            .output();
        for daemon in self.daemons.iter_mut().rev() {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(dir: &Path, name: &str, command: &mut Command) -> Child {
    let log = std::fs::File::create(dir.join(format!("{name}.out"))).unwrap();
    command
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("{name} did not start ({e}); .ci/test installs slurmctld, slurmd and munge")
        })
}

impl Cluster {
    /// Starts the daemons and waits until the node takes jobs.
    pub fn start(dir: &Path) -> Cluster {
        let dir = dir.to_path_buf();
        for sub in ["state", "spool"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        let host = host.trim().split('.').next().unwrap().to_string();
        let key = dir.join("munge.key");
        std::fs::write(
            &key,
            (0..1024).map(|i| (i * 7 + 13) as u8).collect::<Vec<u8>>(),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();
        let socket = dir.join("munge.sock");
        let d = dir.display();
        let conf = dir.join("slurm.conf");
        std::fs::write(
            &conf,
            format!(
                "ClusterName=safeprobe-test\n\
                 SlurmctldHost={host}(127.0.0.1)\n\
                 SlurmctldPort={}\nSlurmdPort={}\n\
                 SlurmUser=root\nSlurmdUser=root\n\
                 AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={}\n\
                 StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool\n\
                 SlurmctldPidFile={d}/slurmctld.pid\nSlurmdPidFile={d}/slurmd.pid\n\
                 SlurmctldLogFile={d}/slurmctld.log\nSlurmdLogFile={d}/slurmd.log\n\
                 ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n\
                 JobAcctGatherType=jobacct_gather/none\n\
                 AccountingStorageType=accounting_storage/none\nJobCompType=jobcomp/none\n\
                 SelectType=select/cons_tres\nSelectTypeParameters=CR_Core\n\
                 SchedulerType=sched/backfill\nMpiDefault=none\nReturnToService=2\n\
                 KillWait=5\n\
                 NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=16000 State=UNKNOWN\n\
                 PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n",
                free_port(),
                free_port(),
                socket.display()
            ),
        )
        .unwrap();
        let mut daemons = vec![spawn(
            &dir,
            "munged",
            Command::new("munged")
                .args(["-F", "-f"])
                .arg(format!("--socket={}", socket.display()))
                .arg(format!("--key-file={}", key.display()))
                .arg(format!("--log-file={d}/munged.log"))
                .arg(format!("--pid-file={d}/munged.pid"))
                .arg(format!("--seed-file={d}/munged.seed")),
        )];
        wait_for(|| socket.exists(), "munged's socket", &dir);
        daemons.push(spawn(
            &dir,
            "slurmctld",
            Command::new("slurmctld").args(["-D", "-f"]).arg(&conf),
        ));
        daemons.push(spawn(
            &dir,
            "slurmd",
            Command::new("slurmd")
                .args(["-D", "-N", &host, "-f"])
                .arg(&conf),
        ));
        let cluster = Cluster { dir, conf, daemons };
        wait_for(
            || {
                let out = cluster.command("sinfo").args(["-h", "-o", "%t"]).output();
                out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "idle")
            },
            "the node to be idle",
            &cluster.dir,
        );
        cluster
    }

    /// A Slurm client command pointed at this cluster.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.env("SLURM_CONF", &self.conf);
        command
    }

    /// What a Slurm command prints; panics naming it when it fails.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self.command(program).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

pub fn wait_for(mut ready: impl FnMut() -> bool, what: &str, dir: &Path) {
    let start = Instant::now();
    while !ready() {
        if start.elapsed() > Duration::from_secs(60) {
            let logs: String = ["slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out"]
                .iter()
                .map(|f| {
                    format!(
                        "--- {f}\n{}\n",
                        std::fs::read_to_string(dir.join(f)).unwrap_or_default()
                    )
                })
                .collect();
            panic!("waited a minute for {what}\n{logs}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

//! A real two-node Slurm for tests: munged, slurmctld and two slurmd from Debian's packages,
//! started from a config generated in a temporary folder (its own ports, state and munge key;
//! process tracking by /proc, no cgroups), and stopped when dropped. The second node is a
//! slurmd in a network namespace of its own, joined to this one by a veth pair on a private
//! /24 that the test makes and removes (nothing else is on it); both nodes see the same
//! files, as a cluster's nodes see a shared file system. One CPU each, so a two-task array
//! runs a task on each. Needs root, as slurmd and namespaces do (the tests and CI run as
//! root).

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Cluster {
    pub dir: PathBuf,
    pub conf: PathBuf,
    /// The nodes' names: this machine's, then the namespaced one's.
    pub nodes: [String; 2],
    daemons: Vec<Child>,
    namespace: Namespace,
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
        self.namespace.remove();
    }
}

/// A network namespace with one end of a veth pair in it: this side `host_ip`, the
/// namespace's `node_ip`.
struct Namespace {
    name: String,
    link: String,
    host_ip: String,
    node_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip {args:?}: {e} (.ci/test installs iproute2)"));
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Namespace {
    fn create() -> Self {
        // Named by this process, so concurrent test runs do not meet.
        let id = std::process::id();
        let subnet = format!("10.{}.{}", 200 + (id >> 8) % 50, id % 256);
        let namespace = Namespace {
            name: format!("safeprobe-test-{id}"),
            link: format!("sp{id}"),
            host_ip: format!("{subnet}.1"),
            node_ip: format!("{subnet}.2"),
        };
        namespace.remove();
        let Namespace {
            name,
            link,
            host_ip,
            node_ip,
        } = &namespace;
        let peer = format!("{link}n");
        ip(&["netns", "add", name]);
        ip(&[
            "link", "add", link, "type", "veth", "peer", "name", &peer, "netns", name,
        ]);
        ip(&["addr", "add", &format!("{host_ip}/24"), "dev", link]);
        ip(&["link", "set", link, "up"]);
        ip(&[
            "-n",
            name,
            "addr",
            "add",
            &format!("{node_ip}/24"),
            "dev",
            &peer,
        ]);
        ip(&["-n", name, "link", "set", &peer, "up"]);
        ip(&["-n", name, "link", "set", "lo", "up"]);
        namespace
    }

    fn remove(&self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.link])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A port nothing listens on now (the OS picks it).
pub fn free_port() -> u16 {
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
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        let host = host.trim().split('.').next().unwrap().to_string();
        let nodes = [host.clone(), "node2".to_string()];
        for sub in ["state", "spool-node2"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::create_dir_all(dir.join(format!("spool-{host}"))).unwrap();
        let namespace = Namespace::create();
        let (host_ip, node_ip) = (&namespace.host_ip, &namespace.node_ip);
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
                 SlurmctldHost={host}({host_ip})\n\
                 SlurmctldPort={}\nSlurmdPort={}\n\
                 SlurmUser=root\nSlurmdUser=root\n\
                 AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={}\n\
                 StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool-%n\n\
                 SlurmctldPidFile={d}/slurmctld.pid\nSlurmdPidFile={d}/slurmd-%n.pid\n\
                 SlurmctldLogFile={d}/slurmctld.log\nSlurmdLogFile={d}/slurmd-%n.log\n\
                 ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n\
                 JobAcctGatherType=jobacct_gather/none\n\
                 AccountingStorageType=accounting_storage/none\nJobCompType=jobcomp/none\n\
                 SelectType=select/cons_tres\nSelectTypeParameters=CR_Core\n\
                 SchedulerType=sched/backfill\nMpiDefault=none\nReturnToService=2\n\
                 KillWait=5\n\
                 NodeName={host} NodeAddr={host_ip} CPUs=1 RealMemory=8000 State=UNKNOWN\n\
                 NodeName=node2 NodeAddr={node_ip} CPUs=1 RealMemory=8000 State=UNKNOWN\n\
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
        // Only the network is the namespace's (nsenter --net): `ip netns exec` would also
        // remount /sys, where slurmd looks for this machine's cgroups.
        daemons.push(spawn(
            &dir,
            "slurmd-node2",
            Command::new("nsenter")
                .arg(format!("--net=/var/run/netns/{}", namespace.name))
                .args(["slurmd", "-D", "-N", "node2", "-f"])
                .arg(&conf),
        ));
        let cluster = Cluster {
            dir,
            conf,
            nodes,
            daemons,
            namespace,
        };
        wait_for(
            || {
                let out = cluster
                    .command("sinfo")
                    .args(["-h", "-N", "-o", "%t"])
                    .output();
                out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "idle\nidle")
            },
            "both nodes to be idle",
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
            let logs: String = [
                "slurmctld.log",
                "slurmctld.out",
                "slurmd.out",
                "slurmd-node2.out",
                "slurmd-node2.log",
            ]
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

//! The dvk test cluster: N nodes on this machine, each a real `dvk-agent`.
//!
//! * **Loopback mode** (always available): every agent listens on an address of
//!   its own in 127.0.0.0/8, derived from the test process and the cluster (no
//!   port is probed and released: nothing else can take it meanwhile), and has
//!   its own runtime dir.
//! * **Network mode** (root and `ip`): every node is a network namespace with
//!   its own address in 192.0.2.0/24 on a bridge (the bridge lives in a
//!   namespace of its own, so nothing touches the host's interfaces); the
//!   node's agent and its processes run inside it.
//!
//! Dropping a [`Cluster`] kills what it started (by pid), deletes its
//! namespaces and files — also when the test panics. Namespaces left behind by
//! a test process that died are removed by the next cluster that starts.

pub mod moving;
pub mod net;
pub mod programs;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Loopback,
    Network,
}

/// Why a mode cannot run here, or None when it can.
pub fn unavailable(mode: Mode) -> Option<String> {
    match mode {
        Mode::Loopback => None,
        Mode::Network => {
            if !is_root() {
                return Some("network mode needs root (ip netns)".into());
            }
            if Command::new("ip").arg("-V").output().is_err() {
                return Some("network mode needs `ip` (apt-get install iproute2)".into());
            }
            None
        }
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// Prints a visible skip message and returns true when `mode` cannot run here.
pub fn skip_unless(mode: Mode, test: &str) -> bool {
    match unavailable(mode) {
        Some(why) => {
            eprintln!("SKIP {test}: {why}");
            true
        }
        None => false,
    }
}

/// Where the workspace's built binaries are (`target/<profile>/`), or `DVK_BIN_DIR`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DVK_BIN_DIR") {
        return dir.into();
    }
    // Test executables live in target/<profile>/deps/, dvk-bench in target/<profile>/.
    let exe = std::env::current_exe().expect("current_exe");
    let exe_dir = exe.parent().expect("executable has a directory");
    let dir = if exe_dir.ends_with("deps") { exe_dir.parent().unwrap() } else { exe_dir }.to_owned();
    for needed in ["dvk-agent", "migrate-cli", "libdvkshim.so"] {
        assert!(
            dir.join(needed).exists(),
            "{} not found in {}: build the workspace first (cargo build --workspace --release)",
            needed,
            dir.display()
        );
    }
    dir
}

pub fn shim_path() -> PathBuf {
    bin_dir().join("libdvkshim.so")
}

pub struct Node {
    pub name: String,
    pub id: u16,
    pub peer_addr: String,
    pub runtime_dir: PathBuf,
    pub netns: Option<String>,
    pub log: PathBuf,
    agent: Option<Child>,
}

impl Node {
    pub fn socket(&self) -> PathBuf {
        self.runtime_dir.join("agent.sock")
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|c| c.id())
    }
}

static CLUSTER_SEQ: AtomicUsize = AtomicUsize::new(0);

pub struct Cluster {
    pub mode: Mode,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub nodes: Vec<Node>,
    bridge_ns: Option<String>,
    children: Mutex<Vec<Child>>,
}

/// Options for [`Cluster::start_with`].
pub struct ClusterSpec {
    pub nodes: usize,
    pub mode: Mode,
    /// Nodes listed in the config but whose agent is not started.
    pub not_started: Vec<usize>,
}

impl Cluster {
    /// Starts `n` nodes and waits until every agent links to every other.
    pub fn start(n: usize, mode: Mode) -> Cluster {
        let c = Cluster::start_with(ClusterSpec { nodes: n, mode, not_started: vec![] });
        c.wait_mesh();
        c
    }

    pub fn start_with(spec: ClusterSpec) -> Cluster {
        if spec.mode == Mode::Network {
            reap_stale_namespaces();
        }
        let seq = CLUSTER_SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = tempfile::Builder::new().prefix("dvk-cluster-").tempdir().expect("tempdir");
        // Other users (the EPERM tests) must reach the agent socket and the shim.
        set_mode(dir.path(), 0o755);
        let key = dir.path().join("cluster.key");
        std::fs::write(&key, hex(&random_bytes(32))).unwrap();
        set_mode(&key, 0o600);

        let tag = format!("dvk{}x{}", std::process::id(), seq);
        let mut nodes = Vec::new();
        let mut config = String::from("cluster_key_file = \"cluster.key\"\n");
        for i in 0..spec.nodes {
            let id = (i + 1) as u16;
            let name = format!("node{id}");
            let (peer_addr, netns) = match spec.mode {
                Mode::Loopback => (loopback_addr(seq, id), None),
                Mode::Network => (format!("192.0.2.{}:7700", 10 + id), Some(format!("{tag}n{id}"))),
            };
            let runtime_dir = dir.path().join(&name).join("run");
            config.push_str(&format!(
                "\n[[node]]\nname = \"{name}\"\nid = {id}\npeer_addr = \"{peer_addr}\"\nruntime_dir = \"{}\"\nimage_dir = \"{}\"\n",
                runtime_dir.display(),
                dir.path().join(&name).join("images").display()
            ));
            let log = dir.path().join(format!("{name}.log"));
            nodes.push(Node { name, id, peer_addr, runtime_dir, netns, log, agent: None });
        }
        let config_path = dir.path().join("cluster.toml");
        std::fs::write(&config_path, config).unwrap();

        let mut cluster = Cluster {
            mode: spec.mode,
            dir,
            config: config_path,
            nodes,
            bridge_ns: None,
            children: Mutex::new(Vec::new()),
        };
        if spec.mode == Mode::Network {
            cluster.build_network(&tag);
        }
        for i in 0..spec.nodes {
            if !spec.not_started.contains(&i) {
                cluster.start_agent(i);
            }
        }
        cluster
    }

    fn build_network(&mut self, tag: &str) {
        let br = format!("{tag}br");
        ip(&["netns", "add", &br]);
        self.bridge_ns = Some(br.clone());
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &br, "link", "set", "br0", "up"]);
        for node in &self.nodes {
            let ns = node.netns.as_ref().unwrap();
            ip(&["netns", "add", ns]);
            let port = format!("v{}", node.id);
            ip(&["-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", ns]);
            ip(&["-n", &br, "link", "set", &port, "master", "br0", "up"]);
            let addr = format!("{}/24", node.peer_addr.split(':').next().unwrap());
            ip(&["-n", ns, "addr", "add", &addr, "dev", "eth0"]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
    }

    /// A command that runs `program` on node `i` (inside its namespace in network mode).
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let node = &self.nodes[i];
        let mut cmd = match &node.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.env("DVK_AGENT_SOCK", node.socket()).env("DVK_CONFIG", &self.config).env("DVK_NODE", &node.name);
        cmd
    }

    /// `command` with the shim preloaded.
    pub fn preloaded(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = self.command(i, program);
        cmd.env("LD_PRELOAD", shim_path());
        cmd
    }

    pub fn start_agent(&mut self, i: usize) {
        self.start_agent_env(i, &[], None);
    }

    /// Restarts node `i`'s agent with an fd limit (soft and hard) of `nofile`, as a small
    /// systemd default would give it, and waits for the mesh to form again.
    pub fn restart_agent_with_nofile(&mut self, i: usize, nofile: u64) {
        self.stop_agent(i);
        self.start_agent_env(i, &[], Some(nofile));
        self.wait_mesh();
    }

    /// Restarts node `i`'s agent with extra environment (e.g. `DVK_TEST_FAULT`), and waits
    /// for the mesh to form again.
    pub fn restart_agent_with(&mut self, i: usize, env: &[(&str, &str)]) {
        self.stop_agent(i);
        self.start_agent_env(i, env, None);
        self.wait_mesh();
    }

    fn start_agent_env(&mut self, i: usize, env: &[(&str, &str)], nofile: Option<u64>) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.nodes[i].log).unwrap();
        let mut cmd = self.command(i, bin_dir().join("dvk-agent"));
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: between fork and exec the closure only calls setrlimit (async-signal-safe)
            // on a struct on its own stack; it allocates nothing and takes no lock.
            unsafe {
                cmd.pre_exec(move || {
                    let r = libc::rlimit { rlim_cur: n, rlim_max: n };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .args(["--config"])
            .arg(&self.config)
            .args(["--node", &self.nodes[i].name, "--log-level", "debug"])
            .env_remove("LD_PRELOAD")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn dvk-agent");
        self.nodes[i].agent = Some(child);
        let socket = self.nodes[i].socket();
        wait_until(Duration::from_secs(10), &format!("agent {} to listen", self.nodes[i].name), || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
    }

    /// Stops node `i`'s agent (SIGTERM, then SIGKILL) and reaps it.
    pub fn stop_agent(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].agent.take() {
            terminate(&mut child);
        }
    }

    /// Starts `cmd` as a child the cluster will clean up.
    pub fn spawn(&self, cmd: &mut Command) -> u32 {
        let child = cmd.spawn().expect("spawn test process");
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        pid
    }

    /// Takes a child back (to wait for it or read its output).
    pub fn take_child(&self, pid: u32) -> Child {
        let mut children = self.children.lock().unwrap();
        let at = children.iter().position(|c| c.id() == pid).expect("a child of this cluster");
        children.remove(at)
    }

    /// Runs `migrate-cli ARGS` against node `i`'s agent.
    pub fn cli(&self, i: usize, args: &[&str]) -> Output {
        Command::new(bin_dir().join("migrate-cli"))
            .arg("--config")
            .arg(&self.config)
            .args(["--node", &self.nodes[i].name])
            .args(args)
            .env_remove("LD_PRELOAD")
            .output()
            .expect("run migrate-cli")
    }

    fn cli_json(&self, i: usize, args: &[&str]) -> serde_json::Value {
        let out = self.cli(i, args);
        assert!(out.status.success(), "migrate-cli {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("migrate-cli --json prints JSON")
    }

    /// `ps --json` as seen from node `i`.
    pub fn ps(&self, i: usize) -> Vec<serde_json::Value> {
        self.cli_json(i, &["ps", "--json"]).as_array().unwrap().clone()
    }

    /// `nodes --json` as seen from node `i`.
    pub fn node_status(&self, i: usize) -> Vec<serde_json::Value> {
        self.cli_json(i, &["nodes", "--json"]).as_array().unwrap().clone()
    }

    /// Waits until every started agent sees every other started agent up.
    pub fn wait_mesh(&self) {
        let running: Vec<usize> = (0..self.nodes.len()).filter(|i| self.nodes[*i].agent.is_some()).collect();
        wait_until(Duration::from_secs(20), "the agent mesh to form", || {
            running.iter().all(|&i| {
                let status = self.node_status(i);
                running.iter().all(|&j| status[j]["up"] == true)
            })
        });
    }

    /// Waits until node `i` lists a process with real pid `pid`; returns its ps row.
    pub fn wait_registered(&self, i: usize, pid: u32) -> serde_json::Value {
        let mut row = None;
        wait_until(Duration::from_secs(10), &format!("pid {pid} to appear in ps of node {}", i + 1), || {
            row = self.ps(i).into_iter().find(|r| r["pid"] == pid);
            row.is_some()
        });
        row.unwrap()
    }

    pub fn log_of(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// A path inside the cluster's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for mut child in self.children.lock().map(|mut c| std::mem::take(&mut *c)).unwrap_or_default() {
            terminate(&mut child);
        }
        // Processes a move restored are children of the destination's agent: ours to end too.
        for node in &self.nodes {
            if let Some(agent) = node.agent_pid() {
                for pid in children_of(agent) {
                    // SAFETY: kill takes two integers; the pid is a child of our own agent.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        for i in 0..self.nodes.len() {
            self.stop_agent(i);
        }
        if std::thread::panicking() {
            for node in &self.nodes {
                let log = std::fs::read_to_string(&node.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                let _ = writeln!(
                    std::io::stderr(),
                    "---- last lines of {} agent log ----\n{}",
                    node.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        for node in &self.nodes {
            if let Some(ns) = &node.netns {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
        if let Some(br) = &self.bridge_ns {
            let _ = Command::new("ip").args(["netns", "del", br]).status();
        }
    }
}

/// SIGTERM, a grace period, then SIGKILL; always reaps.
fn terminate(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // SAFETY: kill takes two integers; the pid is our own unreaped child, so it cannot be reused.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Bounded wait for `pid` (a child of this process) to exit: its wait status, or None if it is
/// not (or no longer) our child, or did not exit in time — then it is killed and collected.
pub fn wait_child_exit(pid: i32, timeout: Duration) -> Option<i32> {
    let t = Instant::now();
    loop {
        let mut st = 0;
        // SAFETY: valid out pointer; pid is our own child.
        let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) };
        if r == pid {
            return Some(st);
        }
        if r < 0 {
            return None;
        }
        if t.elapsed() > timeout {
            // SAFETY: killing our own child by pid.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut st, 0);
            }
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Polls `cond` every 20 ms; panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Deletes `dvk<pid>x…` namespaces whose creating test process no longer exists.
fn reap_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("dvk") else {
            continue;
        };
        let Some(pid) = rest.split('x').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// The peer address of node `id` of cluster `seq` of this test process: 127.A.B.ID:PORT with A
/// from the cluster, B and PORT from the pid (so two test processes never share one), PORT
/// below the kernel's ephemeral range (outgoing connections never hold it).
fn loopback_addr(seq: usize, id: u16) -> String {
    let pid = std::process::id();
    let a = 1 + seq % 250;
    let b = pid & 0xff;
    let port = 10000 + (pid >> 8) % 20000;
    format!("127.{a}.{b}.{id}:{port}")
}

/// Pids whose parent is `parent` (from /proc).
pub fn children_of(parent: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    getrandom::getrandom(&mut b).unwrap();
    b
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

//! Helpers for the virtual-endpoint tests and the network benchmark: ingress
//! in the cluster config, bounded command runs, line readers with timeouts,
//! waiting until an endpoint is reachable from a node, agent memory.
//!
//! Ingress is configured by rewriting the cluster config before the agents
//! start: [`cluster_with_ingress`] starts the cluster with no agent
//! (`ClusterSpec::not_started` = all), appends one `[[node.ingress]]` table
//! to the right `[[node]]` section per requested ingress, then starts every
//! agent and waits for the mesh.

use crate::{Cluster, ClusterSpec, Mode};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// One `[[node.ingress]]` table: node `node`'s agent listens on `listen` (a
/// real TCP socket) and relays each connection to `endpoint` (`"name:port"`)
/// of DC `dc`, wherever the endpoint runs.
#[derive(Clone, Debug)]
pub struct Ingress {
    pub node: usize,
    pub endpoint: String,
    pub dc: String,
    pub listen: String,
}

/// Returns `config` with an `[[node.ingress]]` table appended to the
/// `[[node]]` section whose `name` is `node_name` (TOML attaches an
/// `[[node.ingress]]` to the `[[node]]` right above it, so it must go at the
/// end of that section, before the next `[[node]]`).
pub fn config_with_ingress(config: &str, node_name: &str, ingress: &Ingress) -> String {
    let table = format!(
        "\n[[node.ingress]]\nendpoint = \"{}\"\ndc = \"{}\"\nlisten = \"{}\"\n",
        ingress.endpoint, ingress.dc, ingress.listen
    );
    let lines: Vec<&str> = config.lines().collect();
    let name_line = format!("name = \"{node_name}\"");
    // Start of every [[node]] section.
    let starts: Vec<usize> = lines.iter().enumerate().filter(|(_, l)| l.trim() == "[[node]]").map(|(i, _)| i).collect();
    let section = starts
        .iter()
        .position(|&s| {
            let end = starts.iter().find(|&&e| e > s).copied().unwrap_or(lines.len());
            lines[s..end].iter().any(|l| l.trim() == name_line)
        })
        .unwrap_or_else(|| panic!("no [[node]] named {node_name} in the config:\n{config}"));
    let end = starts.get(section + 1).copied().unwrap_or(lines.len());
    let mut out: Vec<String> = lines[..end].iter().map(|s| s.to_string()).collect();
    while out.last().is_some_and(|l| l.trim().is_empty()) {
        out.pop();
    }
    out.push(table.trim_end().to_string());
    out.push(String::new());
    out.extend(lines[end..].iter().map(|s| s.to_string()));
    let mut text = out.join("\n");
    text.push('\n');
    text
}

/// Appends `ingress` to the config file of a cluster whose agents have not started yet.
pub fn add_ingress(cluster: &Cluster, ingress: &Ingress) {
    let text = std::fs::read_to_string(&cluster.config).expect("read cluster config");
    let name = cluster.nodes[ingress.node].name.clone();
    std::fs::write(&cluster.config, config_with_ingress(&text, &name, ingress)).expect("write cluster config");
}

/// An address for an ingress listener on node `node`: the node's own address (in loopback
/// mode an address of this cluster alone in 127.0.0.0/8) and `port`.
pub fn ingress_listen_addr(cluster: &Cluster, node: usize, port: u16) -> String {
    let ip = cluster.nodes[node].peer_addr.split(':').next().unwrap();
    format!("{ip}:{port}")
}

/// Starts an `n`-node cluster whose config exposes the given endpoints
/// (`(node, "name:port", dc)`) on real TCP ports; returns the cluster and the
/// listen address of each ingress, in order.
pub fn cluster_with_ingress(n: usize, mode: Mode, wanted: &[(usize, &str, &str)]) -> (Cluster, Vec<String>) {
    let mut cluster = Cluster::start_with(ClusterSpec { nodes: n, mode, not_started: (0..n).collect() });
    let mut addrs = Vec::new();
    for (k, (node, endpoint, dc)) in wanted.iter().enumerate() {
        let listen = ingress_listen_addr(&cluster, *node, 18080 + k as u16);
        add_ingress(
            &cluster,
            &Ingress { node: *node, endpoint: endpoint.to_string(), dc: dc.to_string(), listen: listen.clone() },
        );
        addrs.push(listen);
    }
    for i in 0..n {
        cluster.start_agent(i);
    }
    cluster.wait_mesh();
    (cluster, addrs)
}

/// The path of `program` on PATH, if installed.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Removes proxy settings so that curl talks to the address it is given.
pub fn without_proxy(cmd: &mut Command) -> &mut Command {
    for v in
        ["http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"]
    {
        cmd.env_remove(v);
    }
    cmd
}

/// Runs `cmd` to completion with `stdin` as its input; kills it and panics
/// (with what it printed) if it takes longer than `timeout`.
pub fn run_bounded(cmd: &mut Command, stdin: &[u8], timeout: Duration, what: &str) -> Output {
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        let _ = input.write_all(&data);
    });
    let out_reader = drain(child.stdout.take().unwrap());
    let err_reader = drain(child.stderr.take().unwrap());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        let stdout = out_reader.join().unwrap_or_default();
        let stderr = err_reader.join().unwrap_or_default();
        panic!(
            "{what} did not finish within {timeout:?}; killed.\nstdout: {}\nstderr: {}",
            tail(&stdout),
            tail(&stderr)
        );
    };
    let _ = writer.join();
    Output { status, stdout: out_reader.join().unwrap_or_default(), stderr: err_reader.join().unwrap_or_default() }
}

/// Like [`run_bounded`], and panics unless the command exits 0.
pub fn run_ok(cmd: &mut Command, stdin: &[u8], timeout: Duration, what: &str) -> Output {
    let out = run_bounded(cmd, stdin, timeout, what);
    assert!(
        out.status.success(),
        "{what} failed ({}).\nstdout: {}\nstderr: {}",
        out.status,
        tail(&out.stdout),
        tail(&out.stderr)
    );
    out
}

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

/// The last 4000 characters of some output, lossily decoded (for messages).
pub fn tail(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let start = s.len().saturating_sub(4000);
    let start = (start..s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(s.len());
    s[start..].to_string()
}

/// Lines of a child's stdout, read by a thread, each wait bounded.
pub struct Lines {
    rx: Receiver<String>,
    /// Every line received so far (for failure messages).
    pub seen: Vec<String>,
}

impl Lines {
    pub fn new(stdout: ChildStdout) -> Lines {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if tx.send(line.trim_end().to_owned()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Lines { rx, seen: Vec::new() }
    }

    /// Takes the stdout of `child` (which must be piped).
    pub fn of(child: &mut Child) -> Lines {
        Lines::new(child.stdout.take().expect("piped stdout"))
    }

    /// The next line, or None at EOF; panics after `timeout`.
    pub fn next(&mut self, timeout: Duration, what: &str) -> Option<String> {
        match self.rx.recv_timeout(timeout) {
            Ok(line) => {
                self.seen.push(line.clone());
                Some(line)
            }
            Err(RecvTimeoutError::Disconnected) => None,
            Err(RecvTimeoutError::Timeout) => {
                panic!("timed out after {timeout:?} waiting for {what}; lines so far:\n{}", self.seen.join("\n"))
            }
        }
    }

    /// The next line, or None at EOF or after `timeout` (no panic).
    pub fn try_next(&mut self, timeout: Duration) -> Option<String> {
        let line = self.rx.recv_timeout(timeout).ok()?;
        self.seen.push(line.clone());
        Some(line)
    }

    /// Skips lines until one starts with `prefix`; returns it. Panics at EOF or after `timeout`.
    pub fn wait_for(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let what = format!("a line starting with `{prefix}`");
            match self.next(left.max(Duration::from_millis(1)), &what) {
                Some(line) if line.starts_with(prefix) => return line,
                Some(_) => continue,
                None => panic!("EOF while waiting for {what}; lines so far:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Every line that is already there, without waiting.
    pub fn drain_now(&mut self) -> Vec<String> {
        let mut v = Vec::new();
        while let Ok(line) = self.rx.try_recv() {
            self.seen.push(line.clone());
            v.push(line);
        }
        v
    }
}

/// Tries once, from node `node` under the shim in DC `dc`, to connect to
/// `host:port`; returns net_probe's one-line answer and whether it connected.
pub fn probe(cluster: &Cluster, node: usize, dc: &str, host: &str, port: u16) -> (bool, String) {
    let out = run_bounded(
        cluster
            .preloaded(node, crate::programs::c_program("net_probe"))
            .args([host, &port.to_string()])
            .env("DVK_DC", dc)
            .env("DVK_ENDPOINT", "net-probe"),
        b"",
        Duration::from_secs(20),
        "net_probe",
    );
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let line = if line.is_empty() { format!("(no output; stderr: {})", tail(&out.stderr)) } else { line };
    (out.status.success(), line)
}

/// Waits until a preloaded client on node `node` in DC `dc` can connect to
/// `host:port` (the server must tolerate the probe: it connects and closes).
/// Makes exactly one successful connection.
pub fn wait_connectable(cluster: &Cluster, node: usize, dc: &str, host: &str, port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let (ok, line) = probe(cluster, node, dc, host, port);
        if ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{host}:{port} not reachable from node{} (dc {dc}) within {timeout:?}; last probe: {line}",
            node + 1
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until a plain TCP client (no shim) on node `node` can connect to
/// `addr` (an ingress listener); in network mode it runs in the node's namespace.
pub fn wait_plain_connectable(cluster: &Cluster, node: usize, addr: &str, timeout: Duration) {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let deadline = Instant::now() + timeout;
    loop {
        let out = run_bounded(
            cluster.command(node, crate::programs::c_program("net_probe")).args([host, port]).env_remove("LD_PRELOAD"),
            b"",
            Duration::from_secs(20),
            "net_probe (plain)",
        );
        if out.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "ingress {addr} not accepting on node{} within {timeout:?}; last probe: {}",
            node + 1,
            String::from_utf8_lossy(&out.stdout).trim()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A test process with its stdout read line by line; killed (SIGKILL) and
/// reaped when dropped, also when the test panics.
pub struct Proc {
    pub child: Child,
    pub lines: Lines,
}

impl Proc {
    /// Spawns `cmd` with stdout piped (stdin null unless the caller set it).
    pub fn spawn(cmd: &mut Command, what: &str) -> Proc {
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let lines = Lines::of(&mut child);
        Proc { child, lines }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (bounded) for the process to exit; kills it and panics after `timeout`.
    pub fn wait(&mut self, timeout: Duration, what: &str) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("{what} did not exit within {timeout:?}; it printed:\n{}", self.lines.seen.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// VmRSS of a process in KiB (None when it is gone).
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Writes `len` random bytes to `path` and returns them.
pub fn random_file(path: &Path, len: usize) -> Vec<u8> {
    let data = crate::random_bytes(len);
    std::fs::write(path, &data).unwrap();
    data
}

/// A TCP port on 127.0.0.1 that was free a moment ago. For benchmarks only: a test must not
/// depend on a port that something else may take before it binds.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingress_goes_to_the_end_of_the_named_node_section() {
        let config =
            "cluster_key_file = \"k\"\n\n[[node]]\nname = \"node1\"\nid = 1\n\n[[node]]\nname = \"node2\"\nid = 2\n";
        let ing = Ingress { node: 0, endpoint: "web:8000".into(), dc: "dc0".into(), listen: "127.0.0.1:18080".into() };
        let text = config_with_ingress(config, "node1", &ing);
        assert_eq!(
            text,
            "cluster_key_file = \"k\"\n\n[[node]]\nname = \"node1\"\nid = 1\n\n[[node.ingress]]\nendpoint = \"web:8000\"\ndc = \"dc0\"\nlisten = \"127.0.0.1:18080\"\n\n[[node]]\nname = \"node2\"\nid = 2\n"
        );
        let text = config_with_ingress(&text, "node2", &ing);
        assert!(text.ends_with(
            "name = \"node2\"\nid = 2\n\n[[node.ingress]]\nendpoint = \"web:8000\"\ndc = \"dc0\"\nlisten = \"127.0.0.1:18080\"\n\n"
        ), "{text}");
        let again = config_with_ingress(&text, "node1", &ing);
        assert_eq!(again.matches("[[node.ingress]]").count(), 3);
        let first_node2 = again.find("name = \"node2\"").unwrap();
        assert_eq!(
            again[..first_node2].matches("[[node.ingress]]").count(),
            2,
            "both of node1's ingress tables stay in node1's section"
        );
    }
}

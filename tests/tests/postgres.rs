//! PostgreSQL as it is deployed — a postmaster and its children (checkpointer, background
//! writer, WAL writer, autovacuum and replication launchers) sharing anonymous shared memory,
//! SysV and POSIX shared memory, a postmaster-death pipe, and a parent-death signal in every
//! child — dumped as a process tree and restored on this machine; the data written before is
//! there after, and the restored server takes new sessions and writes.
//!
//! Needs root (the engine ptraces a process of another user) and a PostgreSQL server binary
//! (`/usr/local/bin/postgres`, or Debian's `postgresql-15`, which ci/install-test-deps.sh
//! installs); prints `SKIP …` and passes otherwise.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dvk_checkpoint as ck;

const NOBODY: u32 = 65534;

fn pg_bin(name: &str) -> Option<PathBuf> {
    let local = PathBuf::from("/usr/local/bin").join(name);
    if local.exists() {
        return Some(local);
    }
    let mut found: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|v| v.path().join("bin").join(name))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop()
}

/// Runs psql against the server in `dir` (its unix socket directory); the output, trimmed.
fn psql(dir: &Path, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(dir)
        .args(["-U", "postgres", "-d", "postgres", "-c", sql])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("psql: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Kills the tree under `pid` (our child) if the test fails half-way.
struct Server(i32);
impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: signals our own child (a postmaster) by pid; SIGQUIT is its immediate shutdown.
        unsafe { libc::kill(self.0, libc::SIGQUIT) };
        // Killed and collected if it does not end in time.
        dvk_tests::wait_child_exit(self.0, Duration::from_secs(10));
    }
}

#[test]
fn postgres_is_dumped_and_restored_as_a_process_tree() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP postgres_is_dumped_and_restored_as_a_process_tree: needs root");
        return;
    }
    let (Some(postgres), Some(initdb)) = (pg_bin("postgres"), pg_bin("initdb")) else {
        println!("SKIP postgres_is_dumped_and_restored_as_a_process_tree: no PostgreSQL server installed");
        return;
    };
    // The server's directory is nobody's; the image directory root's (the dumper's).
    let dir = tempfile::Builder::new().prefix("dvk-pg-").tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let run = dir.path().join("run");
    fs::create_dir(&run).unwrap();
    // SAFETY: chown of a directory we just made.
    let c = std::ffi::CString::new(run.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::chown(c.as_ptr(), NOBODY, NOBODY) }, 0);
    let data = initdb_as_nobody(&initdb, &run);

    let log = fs::File::create(run.join("server.log")).unwrap();
    let mut cmd = Command::new(&postgres);
    // SAFETY: close_range is async-signal-safe; runs in the child between fork and exec, so the
    // server holds no fd of ours (or of whatever started the tests).
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3, u32::MAX, 0);
            Ok(())
        });
    }
    let child = cmd
        .arg("-D")
        .arg(&data)
        .args(["-c", "listen_addresses=", "-c", "fsync=off", "-c", "autovacuum=off", "-c"])
        .arg(format!("unix_socket_directories={}", run.display()))
        .current_dir(&run)
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let server = Server(child.id() as i32);
    drop(child); // waited for by pid
    let t = Instant::now();
    while psql(&run, "select 1").is_err() {
        assert!(t.elapsed() < Duration::from_secs(30), "postgres did not start: {}", read_log(&run));
        std::thread::sleep(Duration::from_millis(50));
    }
    psql(
        &run,
        "create table t (k int primary key, v text); \
                insert into t select g, md5(g::text) from generate_series(1, 1000) g",
    )
    .unwrap();
    let before = psql(&run, "select count(*), md5(string_agg(v, ',' order by k)) from t").unwrap();
    // The backends of those sessions end after psql does: dump once only the server's own
    // processes are left (a backend half-way through its exit is not one to carry).
    settled(server.0, AUX);

    // Dump the whole tree (the original is killed), then restore it here.
    let img = tempfile::Builder::new().prefix("dvk-pg-img-").tempdir().unwrap();
    let imgdir = img.path().join("img");
    let opts = ck::DumpOptions { tree: true, ..Default::default() };
    let rep = ck::dump_with(server.0, &imgdir, ck::AfterDump::Kill, &opts)
        .unwrap_or_else(|e| panic!("dump of the postgres tree failed: {e}\n{}", read_log(&run)));
    // The dump killed the original tree and collected it (the root is our child).
    std::mem::forget(server);
    let restored = ck::restore(&imgdir, &ck::RestoreOptions::default())
        .unwrap_or_else(|e| panic!("restore of the postgres tree failed: {e}"));
    let server = Server(restored.pid);
    assert!(
        restored.tree.len() >= 5,
        "a postmaster and its children: {:?} (dumped {:?})",
        restored.tree,
        rep.pages_bytes
    );
    assert!(restored.same_pid, "the postmaster's pid was free but not reused");

    // The data is there, and the restored server takes new sessions and writes.
    assert_eq!(psql(&run, "select count(*), md5(string_agg(v, ',' order by k)) from t").unwrap(), before);
    psql(&run, "insert into t select g, md5(g::text) from generate_series(1001, 1500) g").unwrap();
    assert_eq!(psql(&run, "select count(*) from t").unwrap(), "1500");
    assert_eq!(psql(&run, "select sum(k) from t").unwrap(), (1500 * 1501 / 2).to_string());
    // A checkpoint exercises the restored checkpointer child (and its shared memory).
    psql(&run, "checkpoint").unwrap_or_else(|e| panic!("checkpoint failed: {e}\n{}", read_log(&run)));
    let log = read_log(&run);
    assert!(!log.contains("PANIC") && !log.contains("terminated by signal"), "{log}");
    drop(server);
}

/// A new database cluster in `run/data`, made by nobody (`run` must be writable by nobody).
fn initdb_as_nobody(initdb: &Path, run: &Path) -> PathBuf {
    let data = run.join("data");
    let init = Command::new(initdb)
        .arg("-D")
        .arg(&data)
        .args(["-A", "trust", "-U", "postgres", "--no-sync"])
        .current_dir(run)
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(init.status.success(), "initdb failed: {}", String::from_utf8_lossy(&init.stderr));
    data
}

/// The processes PostgreSQL 15 runs besides its backends with autovacuum off: checkpointer,
/// background writer, WAL writer, logical replication launcher.
const AUX: usize = 4;

/// Waits until the postmaster `pid` has exactly `n` live children (no backend starting or
/// ending).
fn settled(pid: i32, n: usize) {
    dvk_tests::wait_until(Duration::from_secs(30), &format!("postgres to settle at {n} child processes"), || {
        let live = dvk_tests::children_of(pid as u32)
            .into_iter()
            .filter(|c| {
                let stat = fs::read_to_string(format!("/proc/{c}/stat")).unwrap_or_default();
                !matches!(stat.rsplit(')').next().and_then(|r| r.split_whitespace().next()), Some("Z") | None)
            })
            .count();
        live == n
    });
}

fn read_log(run: &Path) -> String {
    fs::read_to_string(run.join("server.log")).unwrap_or_default()
}

/// PostgreSQL under the shim on node1 (a postmaster and its children), moved to node2 while
/// a psql session on node3 runs a loop of inserts and selects in one open transaction, then
/// commits; new sessions afterwards see every row. Nothing is lost: the count checked after
/// every insert, the sum at the end.
#[test]
fn postgres_moves_under_an_insert_and_select_loop_loopback() {
    use dvk_tests::moving::{agent_logs, no_inherited_fds};
    use dvk_tests::{Cluster, Mode};
    use std::io::{BufRead, Write};
    let test = "postgres_moves_under_an_insert_and_select_loop_loopback";
    if dvk_tests::moving::skip_without_root(test) {
        return;
    }
    let (Some(postgres), Some(initdb)) = (pg_bin("postgres"), pg_bin("initdb")) else {
        println!("SKIP {test}: no PostgreSQL server installed");
        return;
    };
    const PORT: u16 = 5432;
    let cluster = Cluster::start(3, Mode::Loopback);
    let run = cluster.path("pg");
    fs::create_dir(&run).unwrap();
    fs::set_permissions(&run, fs::Permissions::from_mode(0o777)).unwrap();
    let data = initdb_as_nobody(&initdb, &run);
    // Clients come from virtual addresses (127.77.x.y), not 127.0.0.1.
    let hba = data.join("pg_hba.conf");
    let mut rules = fs::read_to_string(&hba).unwrap();
    rules.push_str("host all all 127.0.0.0/8 trust\n");
    fs::write(&hba, rules).unwrap();
    let log = fs::File::create(run.join("server.log")).unwrap();
    let mut cmd = cluster.command(0, "setpriv");
    cmd.args([format!("--reuid={NOBODY}"), format!("--regid={NOBODY}"), "--clear-groups".into(), "env".into()])
        .arg(format!("LD_PRELOAD={}", dvk_tests::shim_path().display()))
        .arg(&postgres)
        .arg("-D")
        .arg(&data)
        .args(["-c", "listen_addresses=0.0.0.0", "-c", &format!("port={PORT}"), "-c", "fsync=off"])
        .args(["-c", "unix_socket_directories=", "-c", "autovacuum=off"])
        .current_dir(&run)
        .env("DVK_ENDPOINT", "pg")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let pid = cluster.spawn(no_inherited_fds(&mut cmd));
    let vpid = cluster.wait_registered(0, pid)["vpid"].as_i64().unwrap();
    dvk_tests::net::wait_connectable(&cluster, 2, "dc0", "pg.dc0.dvk", PORT, Duration::from_secs(30));
    let psql_on = |node: usize| {
        let mut c = cluster.preloaded(node, "psql");
        c.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "pg.dc0.dvk", "-p", &PORT.to_string()])
            .args(["-U", "postgres", "-d", "postgres"]);
        no_inherited_fds(&mut c);
        c
    };
    let sql = |sql: &str| -> String {
        let out = psql_on(2).args(["-c", sql]).stdin(Stdio::null()).output().unwrap();
        assert!(out.status.success(), "{sql}: {}\n{}", String::from_utf8_lossy(&out.stderr), read_log(&run));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let t = Instant::now();
    while psql_on(2).args(["-c", "select 1"]).stdin(Stdio::null()).output().map(|o| !o.status.success()).unwrap_or(true)
    {
        assert!(t.elapsed() < Duration::from_secs(30), "postgres did not start: {}", read_log(&run));
        std::thread::sleep(Duration::from_millis(50));
    }
    sql("create table t (k int primary key, v text)");

    // One session, one transaction: an insert and a count per line, read back as it goes.
    let mut session = psql_on(2).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut input = session.stdin.take().unwrap();
    writeln!(input, "begin;").unwrap();
    let mut output = std::io::BufReader::new(session.stdout.take().unwrap());
    let mut ask = |k: u32| -> String {
        writeln!(input, "insert into t values ({k}, md5('{k}')); select count(*) from t;").unwrap();
        input.flush().unwrap();
        let mut line = String::new();
        output.read_line(&mut line).unwrap();
        line.trim().to_string()
    };
    const ROWS: u32 = 300;
    let mut k = 1;
    let mut report = serde_json::Value::Null;
    while k <= ROWS {
        assert_eq!(ask(k), k.to_string(), "after insert {k}\n{}", read_log(&run));
        if k == ROWS / 2 {
            // Only the server's processes and this session's backend (the earlier sessions'
            // backends have ended): the tree the preflight sees is the one frozen.
            settled(pid as i32, AUX + 1);
            // Mid-transaction: the backend serving this session moves with its postmaster.
            let out = cluster.cli(2, &["move", &vpid.to_string(), &cluster.nodes[1].name, "--json"]);
            report = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
            assert!(
                out.status.success() && report["committed"] == true,
                "the postgres tree did not move: {}\n{report:#}\n{}\n{}",
                String::from_utf8_lossy(&out.stderr),
                read_log(&run),
                agent_logs(&cluster)
            );
        }
        k += 1;
    }
    writeln!(input, "commit;").unwrap();
    drop(input);
    let status = session.wait().unwrap();
    assert!(status.success(), "the session ended with {status}\n{}", read_log(&run));
    // New sessions (backends forked on node2) see every row.
    assert_eq!(sql("select count(*), sum(k) from t"), format!("{ROWS}|{}", ROWS * (ROWS + 1) / 2));
    sql("checkpoint");
    let row = cluster.ps(2).into_iter().find(|r| r["vpid"] == vpid).expect("postgres is in ps");
    assert_eq!(row["node"], cluster.nodes[1].name.as_str());
    // Its immediate shutdown (SIGQUIT): the postmaster takes its children down and is reaped by
    // node2's agent, whose child it is now; nothing is left behind.
    let postmaster = row["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill takes two integers; the pid is the postmaster this test started, moved.
    unsafe { libc::kill(postmaster, libc::SIGQUIT) };
    dvk_tests::wait_until(Duration::from_secs(30), "the moved postmaster to shut down", || {
        !Path::new(&format!("/proc/{postmaster}")).exists()
    });
    let log = read_log(&run);
    assert!(!log.contains("PANIC") && !log.contains("terminated by signal"), "{log}");
    let steps: Vec<String> = report["steps"]
        .as_array()
        .map(|v| {
            v.iter().map(|s| format!("{} {:.1}", s["name"], s["micros"].as_f64().unwrap_or(0.0) / 1000.0)).collect()
        })
        .unwrap_or_default();
    eprintln!(
        "{test}: {ROWS} rows in one transaction across the move; {} processes, {:.1} MB image, frozen {} ms; {}",
        report["group"].as_array().map(|g| g.len() + 1).unwrap_or(0),
        report["image_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        report["frozen_micros"].as_u64().unwrap_or(0) / 1000,
        steps.join(", ")
    );
}

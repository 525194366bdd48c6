//! Live migration end to end (issue 7): `migrate-cli move` moves a server under the shim to
//! another node while its clients keep talking, and every byte is checked.
//!
//! The DVS paper's evaluation: a server holding N MB of pseudo-random data, a client sending
//! requests with a 4 KB random block each, every reply checked against the client's model of
//! the data and finally the server's whole data read back — with the server moved during the
//! loop (remote → client's node, client's node → remote, remote → remote, back and forth).
//! Failures of each step roll back, and the client still completes with every check passing.
//!
//! Scenarios run in loopback mode and, as root, in network mode (each node a network namespace).

use dvk_tests::moving::{client_done, move_to, move_to_with, start_client, start_server, step_detail, LOOP};
use dvk_tests::{skip_unless, Cluster, Mode};
use std::time::Duration;

fn paper_evaluation(mode: Mode, test: &str, server_node: usize, client_node: usize, moves: &[usize], ask: usize) {
    if skip_unless(mode, test) {
        return;
    }
    let cluster = Cluster::start(3, mode);
    let (port, mb) = (7000, 8);
    let (_server, vpid) = start_server(&cluster, server_node, port, mb);
    let mut client = start_client(&cluster, client_node, port, mb, 1000 + 300 * moves.len(), 1, 200);
    for &to in moves {
        client.lines.wait_for("progress", LOOP);
        move_to(&cluster, ask, vpid, to);
    }
    let done = client_done(&cluster, &mut client);
    eprintln!("{test}: {done}");
}

#[test]
fn remote_server_moves_to_the_clients_node_loopback() {
    if dvk_tests::moving::skip_without_root("remote_server_moves_to_the_clients_node_loopback") {
        return;
    }
    paper_evaluation(Mode::Loopback, "remote_server_moves_to_the_clients_node_loopback", 0, 2, &[2], 0);
}

#[test]
fn server_on_the_clients_node_moves_away_loopback() {
    if dvk_tests::moving::skip_without_root("server_on_the_clients_node_moves_away_loopback") {
        return;
    }
    paper_evaluation(Mode::Loopback, "server_on_the_clients_node_moves_away_loopback", 2, 2, &[1], 2);
}

#[test]
fn remote_server_moves_to_another_remote_node_loopback() {
    if dvk_tests::moving::skip_without_root("remote_server_moves_to_another_remote_node_loopback") {
        return;
    }
    paper_evaluation(Mode::Loopback, "remote_server_moves_to_another_remote_node_loopback", 0, 2, &[1], 2);
}

#[test]
fn remote_server_moves_to_another_remote_node_network() {
    if dvk_tests::moving::skip_without_root("remote_server_moves_to_another_remote_node_network") {
        return;
    }
    paper_evaluation(Mode::Network, "remote_server_moves_to_another_remote_node_network", 0, 2, &[1], 0);
}

/// `move --precopy`: the server's memory is copied while it serves (the client keeps writing
/// 4 KB blocks into it meanwhile), then only what changed since the last round is dumped;
/// the client checks every reply and finally reads the server's whole data back.
#[test]
fn precopy_moves_a_server_that_keeps_writing_loopback() {
    let test = "precopy_moves_a_server_that_keeps_writing_loopback";
    if dvk_tests::moving::skip_without_root(test) || skip_unless(Mode::Loopback, test) {
        return;
    }
    let cluster = Cluster::start(3, Mode::Loopback);
    let (port, mb) = (7000, 32);
    let (_server, vpid) = start_server(&cluster, 0, port, mb);
    let mut client = start_client(&cluster, 2, port, mb, 1600, 1, 200);
    for to in [1, 0] {
        client.lines.wait_for("progress", LOOP);
        let report = move_to_with(&cluster, 2, vpid, to, &["--precopy"]);
        let pre = step_detail(&report, "pre-copy").expect("a pre-copy step");
        assert!(pre.contains("round(s) while the process ran"), "pre-copy did not run: {pre}");
        let dump = step_detail(&report, "dump").expect("a dump step");
        assert!(dump.contains("left to the pre-copy"), "the dump did not use the pre-copy: {dump}");
    }
    // Each destination let the process run before its pre-copied pages were in (lazy restore)
    // and copied them in behind it; the second move waited for the first one's copy if needed.
    for node in [1, 0] {
        dvk_tests::wait_until(Duration::from_secs(30), "the copy-in of pre-copied memory", || {
            cluster.log_of(node).contains("pre-copied memory copied in behind the running process")
        });
    }
    let done = client_done(&cluster, &mut client);
    eprintln!("{test}: {done}");
}

/// `move --compress`: page data goes as LZ4 blocks (those that shrink), with and without
/// pre-copy; the client checks every byte.
#[test]
fn compressed_moves_keep_every_byte_loopback() {
    let test = "compressed_moves_keep_every_byte_loopback";
    if dvk_tests::moving::skip_without_root(test) || skip_unless(Mode::Loopback, test) {
        return;
    }
    let cluster = Cluster::start(3, Mode::Loopback);
    let (port, mb) = (7000, 8);
    let (_server, vpid) = start_server(&cluster, 0, port, mb);
    let mut client = start_client(&cluster, 2, port, mb, 1600, 1, 200);
    client.lines.wait_for("progress", LOOP);
    move_to_with(&cluster, 2, vpid, 1, &["--compress", "--no-precopy"]);
    client.lines.wait_for("progress", LOOP);
    let report = move_to_with(&cluster, 2, vpid, 0, &["--compress", "--precopy"]);
    let pre = step_detail(&report, "pre-copy").expect("a pre-copy step");
    assert!(pre.contains("on the link, compressed"), "pre-copy did not compress: {pre}");
    let done = client_done(&cluster, &mut client);
    eprintln!("{test}: {done}; {pre}");
}

/// `migrate-cli move` run as user `uid` through node `ask`'s agent socket.
fn move_as(cluster: &Cluster, ask: usize, uid: u32, vpid: i64, to: usize) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args([format!("--reuid={uid}"), format!("--regid={uid}"), "--clear-groups".into()])
        .arg(dvk_tests::bin_dir().join("migrate-cli"))
        .arg("--socket")
        .arg(cluster.nodes[ask].socket())
        .args(["move", &vpid.to_string(), &cluster.nodes[to].name])
        .env_remove("LD_PRELOAD")
        .output()
        .expect("run migrate-cli under setpriv")
}

/// The agent runs as root for every user: only root or the process's owner may move it, whichever
/// node the request comes from (the owner is checked at the source, the caller's uid taken from
/// SO_PEERCRED where it asked).
#[test]
fn only_root_or_the_owner_may_move_a_process_loopback() {
    if dvk_tests::moving::skip_without_root("only_root_or_the_owner_may_move_a_process_loopback") {
        return;
    }
    if !dvk_tests::is_root() {
        eprintln!("SKIP only_root_or_the_owner_may_move_a_process_loopback: needs root (setpriv)");
        return;
    }
    let cluster = Cluster::start(3, Mode::Loopback);
    let (port, mb) = (7000, 4);
    let (_server, vpid) = start_server(&cluster, 0, port, mb);
    let mut client = start_client(&cluster, 2, port, mb, 600, 1, 200);
    client.lines.wait_for("progress", LOOP);
    for ask in [0, 2] {
        let out = move_as(&cluster, ask, 65534, vpid, 1);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "nobody moved root's process (asked on node{})", ask + 1);
        assert!(err.contains("permission denied") && err.contains("uid 0"), "asked on node{}: {err}", ask + 1);
    }
    let row = cluster.ps(2).into_iter().find(|r| r["vpid"] == vpid).unwrap();
    assert_eq!(row["node"], "node1", "the refused process did not move");
    // Root may.
    move_to(&cluster, 2, vpid, 1);
    client_done(&cluster, &mut client);
}

/// A client that connects while the server is moving waits (instead of being refused) and is
/// served by the destination; the client already connected keeps going.
#[test]
fn a_client_connecting_during_the_move_is_served_by_the_destination_loopback() {
    if dvk_tests::moving::skip_without_root("a_client_connecting_during_the_move_is_served_by_the_destination_loopback")
    {
        return;
    }
    let mut cluster = Cluster::start(3, Mode::Loopback);
    // The destination holds its restore for 2 s: a window in which the new client connects.
    cluster.restart_agent_with(1, &[("DVK_TEST_FAULT", "hold-restore")]);
    let (port, mb) = (7000, 4);
    let (_server, vpid) = start_server(&cluster, 0, port, mb);
    let mut first = dvk_tests::moving::start_client_slice(&cluster, 2, port, mb, 600, 1, 200, "0/2");
    first.lines.wait_for("progress", LOOP);
    let mover = std::process::Command::new(dvk_tests::bin_dir().join("migrate-cli"))
        .arg("--config")
        .arg(&cluster.config)
        .args(["--node", "node1", "move", &vpid.to_string(), "node2"])
        .env_remove("LD_PRELOAD")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    dvk_tests::wait_until(Duration::from_secs(20), "the destination to hold its restore", || {
        cluster.log_of(1).contains("test fault: holding the restore")
    });
    // Connects now: the endpoint is Migrating everywhere, so the open waits for the commit.
    let mut late = dvk_tests::moving::start_client_slice(&cluster, 2, port, mb, 300, 1, 0, "1/2");
    let out = mover.wait_with_output().unwrap();
    assert!(out.status.success(), "move failed: {}", String::from_utf8_lossy(&out.stderr));
    client_done(&cluster, &mut late);
    client_done(&cluster, &mut first);
    let row = cluster.ps(2).into_iter().find(|r| r["vpid"] == vpid).unwrap();
    assert_eq!(row["node"], "node2");
}

/// A StreamOpen that reaches the source after it marked the endpoint moving (sent by a node
/// that learned the route while the move was under way) is carried on to the destination when
/// the move commits — the client is served, not refused. The source's `open-late` fault makes
/// the order certain: it handles that open only once the endpoint is moving.
#[test]
fn an_open_that_reaches_the_source_during_the_move_is_carried_to_the_destination_loopback() {
    open_at_the_source_during_a_move(
        "an_open_that_reaches_the_source_during_the_move_is_carried_to_the_destination_loopback",
        "open-late",
        "stream opened during a move: relayed to where the endpoint went",
    );
}

/// A StreamOpen that reached the source just before the move marked the endpoint moving is
/// counted as under way: the move's start waits for it to reach the process's listener, and
/// the move carries it as a queued connection. (It used to wait for the move that waited for
/// it: 10 s, then refused.) `open-counted-late` makes it look only once the endpoint is moving.
#[test]
fn an_open_counted_before_the_move_reaches_the_listener_and_moves_with_it_loopback() {
    open_at_the_source_during_a_move(
        "an_open_counted_before_the_move_reaches_the_listener_and_moves_with_it_loopback",
        "open-counted-late",
        "test fault: the endpoint is moving; the held open goes on",
    );
}

fn open_at_the_source_during_a_move(test: &str, fault: &str, source_says: &str) {
    if dvk_tests::moving::skip_without_root(test) {
        return;
    }
    let mut cluster = Cluster::start(3, Mode::Loopback);
    cluster.restart_agent_with(0, &[("DVK_TEST_FAULT", fault)]);
    let (port, mb) = (7000, 4);
    let (_server, vpid) = start_server(&cluster, 0, port, mb);
    let mut client = start_client(&cluster, 2, port, mb, 300, 1, 0);
    dvk_tests::wait_until(Duration::from_secs(20), "the client's open to be held", || {
        cluster.log_of(0).contains("test fault: holding a stream open")
    });
    move_to(&cluster, 0, vpid, 1);
    client_done(&cluster, &mut client);
    let log = cluster.log_of(0);
    assert!(log.contains(source_says), "the source never said `{source_says}`:\n{log}");
    assert!(!log.contains("refusing the stream") && !log.contains("stream refused"), "{log}");
    let row = cluster.ps(2).into_iter().find(|r| r["vpid"] == vpid).unwrap();
    assert_eq!(row["node"], "node2");
}

/// `migrate-cli check VPID NODE` says, without freezing anything, what a move would carry and
/// whether anything blocks it — the agent's own classification, the one `move` uses.
#[test]
fn check_lists_what_a_move_carries_and_what_blocks_it_loopback() {
    if dvk_tests::moving::skip_without_root("check_lists_what_a_move_carries_and_what_blocks_it_loopback") {
        return;
    }
    let cluster = Cluster::start(3, Mode::Loopback);
    let (port, mb) = (7000, 2);
    let (server, vpid) = start_server(&cluster, 0, port, mb);
    let out = cluster.cli(0, &["check", &vpid.to_string(), "node2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "check failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("virtual listener kv.dc0.dvk:7000"), "{text}");
    assert!(text.contains("the dvk agent link"), "{text}");
    assert!(text.contains("fd 1: pipe:["), "stdout is a pipe to the test: redirected\n{text}");
    assert!(text.contains("ready to move"), "{text}");
    let out = cluster.cli(0, &["check", &vpid.to_string(), "node9"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.contains("BLOCKER unknown node `node9`"), "{text}");
    // Nothing was frozen or moved: the server still answers where it was.
    assert_eq!(cluster.ps(0).into_iter().find(|r| r["vpid"] == vpid).unwrap()["node"], "node1");
    drop(server);
}

/// A process that registered before its agent restarted (its link to the old agent is dead)
/// still moves, and its shim relinks on the destination: it keeps accepting new connections.
#[test]
fn a_process_older_than_its_agent_moves_loopback() {
    if dvk_tests::moving::skip_without_root("a_process_older_than_its_agent_moves_loopback") {
        return;
    }
    let mut cluster = Cluster::start(3, Mode::Loopback);
    let (port, mb) = (7000, 2);
    let (_server, vpid) = start_server(&cluster, 0, port, mb);
    cluster.restart_agent_with(0, &[]);
    let mut before = dvk_tests::moving::start_client_slice(&cluster, 2, port, mb, 600, 1, 200, "0/2");
    before.lines.wait_for("progress", LOOP);
    move_to(&cluster, 2, vpid, 1);
    client_done(&cluster, &mut before);
    // A new connection after the move: the listener on node2 hands it over with its header read
    // by the shim (a stale fd table would give the program the header as data).
    let mut after = dvk_tests::moving::start_client_slice(&cluster, 2, port, mb, 200, 1, 0, "1/2");
    client_done(&cluster, &mut after);
}

/// The user's design: the image goes with rsync (`move --transfer rsync`), tunnelled through the
/// agent link. The server moves node1 → node2 → node1 → node2 while the client writes 4 KB
/// blocks into it and checks every reply; from the second move on, the destination still holds
/// the image the process left it with, so rsync sends only the delta: far less than the image.
#[test]
fn rsync_moves_there_back_and_there_again_sending_only_the_delta_loopback() {
    let test = "rsync_moves_there_back_and_there_again_sending_only_the_delta_loopback";
    if dvk_tests::moving::skip_without_root(test) || skip_unless(Mode::Loopback, test) {
        return;
    }
    let cluster = Cluster::start(3, Mode::Loopback);
    let (port, mb) = (7000, 32);
    let (_server, vpid) = start_server(&cluster, 0, port, mb);
    let mut client = start_client(&cluster, 2, port, mb, 2000, 1, 200);
    let mut sent = Vec::new();
    for to in [1, 0, 1] {
        client.lines.wait_for("progress", LOOP);
        let report = move_to_with(&cluster, 2, vpid, to, &["--transfer", "rsync"]);
        let transfer = step_detail(&report, "transfer").expect("a transfer step");
        assert!(transfer.starts_with("rsync over the agent link"), "not sent by rsync: {transfer}");
        let (image, bytes) = (report["image_bytes"].as_u64().unwrap(), report["sent_bytes"].as_u64().unwrap());
        eprintln!("{test}: move to node{}: image {image} bytes, {bytes} sent: {transfer}", to + 1);
        sent.push((image, bytes));
    }
    let (image, first) = sent[0];
    assert!(first >= image / 2, "the first move has no older image to go by, yet sent {first} of {image} bytes");
    for &(image, delta) in &sent[1..] {
        assert!(delta * 4 < image, "a move back sent {delta} bytes of a {image}-byte image: no delta");
    }
    let done = client_done(&cluster, &mut client);
    eprintln!("{test}: {done}");

    // Both nodes keep an image of the server; when it exits, both go.
    let kept = |node: usize| cluster.path(&format!("{}/images/kept/vpid-{vpid}", cluster.nodes[node].name));
    assert!(kept(0).join("pages.img").exists() && kept(1).join("pages.img").exists(), "no kept images");
    let row = cluster.ps(1).into_iter().find(|r| r["vpid"] == vpid).expect("the server runs on node2");
    let pid = row["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill takes two integers; the pid is our server, restored on node2.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while kept(0).exists() || kept(1).exists() {
        assert!(std::time::Instant::now() < deadline, "the kept images outlived the process");
        std::thread::sleep(Duration::from_millis(50));
    }
}

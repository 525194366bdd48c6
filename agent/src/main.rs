//! dvk-agent: one per node. Owns the node's routing table, links to every
//! peer over authenticated TCP, and serves the shim and the CLI on a local
//! socket.

mod endpoints;
mod limits;
mod listener;
mod local;
mod moving;
mod peer;
mod policy;
mod procinfo;
mod ratelog;
mod registry;
mod relay;
mod state;
mod sys;
mod vpid_store;

use anyhow::Context;
use clap::Parser;
use dvk_config::{Config, DEFAULT_CONFIG_PATH};
use dvk_protocol::auth::ClusterKey;
use pidvirt::NodeId;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

/// What the agent lets callers make it hold (docs/ARCHITECTURE.md, "Security model").
const LIMITS_HELP: &str = "\
Limits (logged at start):
  The soft fd limit is raised to the hard one (the systemd unit sets LimitNOFILE).
  Local connections per uid: a quarter of the fd limit. Unauthenticated peer
  connections at once: fd limit / 16, between 4 and 64, each at most 5 s.
  A local connection that registered no process is closed after 10 s without a
  request. Local requests are at most 64 KiB, read within a 16 MiB budget shared
  by all local connections, 4 MiB of it at most per uid (root's requests come
  from its own 4 MiB only).";

/// The dvk node agent (runs in the foreground; logs to stderr).
#[derive(Parser, Debug)]
#[command(version, about, after_help = LIMITS_HELP)]
struct Args {
    /// Cluster configuration file.
    #[arg(long, env = "DVK_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Which node of the config this agent is.
    #[arg(long, env = "DVK_NODE")]
    node: String,
    /// Log level: error, warn, info, debug or trace (RUST_LOG, if set, takes precedence).
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn main() {
    // rsync's remote shell during a move (moving::rsync): not an agent.
    if std::env::args_os().nth(1).is_some_and(|a| a == "--rsync-tunnel") {
        moving::rsync::tunnel_main();
    }
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log_level));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter)
        .with_target(false)
        .init();
    if let Err(e) = run(args) {
        eprintln!("dvk-agent: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let me = config.node(&args.node)?.clone();
    let key = ClusterKey::new(config.read_key()?).map_err(|e| anyhow::anyhow!("{e}"))?;
    warn_if_key_readable(&config.cluster_key_file);

    std::fs::create_dir_all(&me.runtime_dir)
        .with_context(|| format!("cannot create runtime dir {}", me.runtime_dir.display()))?;
    std::fs::create_dir_all(&me.image_dir)
        .with_context(|| format!("cannot create image dir {}", me.image_dir.display()))?;
    std::fs::set_permissions(&me.image_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot set mode 0700 on {}", me.image_dir.display()))?;
    let mut vpids = vpid_store::VpidStore::open(NodeId(me.id), me.runtime_dir.join("vpid-next"))
        .with_context(|| format!("cannot open the vPID store in {}", me.runtime_dir.display()))?;
    vpids.apply_test_limits();
    endpoints::prepare_listener_dir(&me.runtime_dir)
        .with_context(|| format!("cannot prepare the listener dir in {}", me.runtime_dir.display()))?;

    let limits = limits::init();
    tracing::info!(
        nofile = limits.nofile,
        local_connections_per_uid = limits.local_per_uid,
        handshakes_in_flight = limits.handshakes_max,
        local_request_bytes = limits::LOCAL_REQUEST_BUDGET,
        "limits"
    );
    sys::install_interrupt_handler().context("cannot install the relay interrupt handler")?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let socket_path = me.socket_path();
        let local_listener = local::bind(&socket_path)?;
        let peer_listener = tokio::net::TcpListener::bind(me.peer_addr)
            .await
            .with_context(|| format!("cannot listen for peers on {}", me.peer_addr))?;
        let ingress = endpoints::bind_ingress(&me.ingress).await?;
        // Move images are staged in memory: a fresh 0700 directory on tmpfs, removed at exit.
        let staging = tempfile::Builder::new().prefix("dvk-moves-").tempdir_in("/dev/shm").ok();
        let staging_path = staging.as_ref().map(|d| d.path().to_path_buf()).unwrap_or_else(|| me.image_dir.clone());
        let agent = Arc::new(state::Agent::new(config.clone(), me.clone(), key, vpids, staging_path));
        tracing::info!(node = %me.name, id = me.id, peers = %me.peer_addr, socket = %socket_path.display(), staging = %agent.staging.display(), "agent started");

        moving::kept::KeptImages::of(&agent).clean_incomplete();
        let recovered = registry::recover(&agent);
        if recovered > 0 {
            tracing::info!(recovered, "took back the processes of this node that outlived the previous agent");
        }
        tokio::spawn(registry::saver(agent.clone()));
        tokio::spawn(moving::housekeeping(agent.clone()));
        tokio::spawn(local::serve(agent.clone(), local_listener));
        tokio::spawn(peer::accept_loop(agent.clone(), peer_listener));
        for (ing, listener) in ingress {
            tokio::spawn(endpoints::serve_ingress(agent.clone(), ing, listener));
        }
        for n in config.nodes.iter().filter(|n| n.id > me.id) {
            tokio::spawn(peer::dial_loop(agent.clone(), NodeId(n.id), n.peer_addr));
        }

        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
        registry::save_now(&agent);
        let _ = std::fs::remove_file(&socket_path);
        Ok(())
    })
}

fn warn_if_key_readable(path: &std::path::Path) {
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(key = %path.display(), "cluster key file is readable by group/others; chmod 600 it");
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_limits_in_help_are_the_limits_in_force() {
        let help = super::LIMITS_HELP;
        assert!(help.contains(&format!("{} MiB budget", crate::limits::LOCAL_REQUEST_BUDGET >> 20)));
        assert!(help.contains(&format!("at most {} KiB", dvk_protocol::frame::LOCAL_MAX_REQUEST >> 10)));
        assert!(
            help.contains(&format!("{} MiB of it at most per uid", crate::limits::LOCAL_REQUEST_BUDGET_PER_UID >> 20))
        );
        assert!(help.contains(&format!("after {} s", crate::limits::IDLE_BEFORE_REGISTER.as_secs())));
    }
}

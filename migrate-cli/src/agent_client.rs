//! Finding and talking to the local agent.

use anyhow::{anyhow, bail, Context};
use dvk_config::Config;
use dvk_protocol::frame::{self, LOCAL_MAX_FRAME};
use dvk_protocol::local::{LocalRequest, LocalResponse};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// How to reach an agent, from the global options.
pub struct Target {
    pub socket: PathBuf,
    /// What to call it in errors.
    pub describe: String,
}

impl Target {
    pub fn resolve(config: &std::path::Path, node: Option<&str>, socket: Option<PathBuf>) -> anyhow::Result<Target> {
        if let Some(socket) = socket {
            return Ok(Target { describe: format!("the agent at {}", socket.display()), socket });
        }
        let cfg = Config::load(config).map_err(|e| match e {
            dvk_config::ConfigError::Read { ref error, .. } if error.kind() == std::io::ErrorKind::NotFound => {
                anyhow!("{e} (pass --config FILE or set DVK_CONFIG; or talk to an agent directly with --socket PATH)")
            }
            e => e.into(),
        })?;
        let node = match node {
            Some(n) => cfg.node(n)?,
            None if cfg.nodes.len() == 1 => &cfg.nodes[0],
            None => bail!(
                "which node's agent? pass --node NAME (or set DVK_NODE); {} has {}",
                cfg.path.display(),
                cfg.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(", ")
            ),
        };
        Ok(Target { socket: node.socket_path(), describe: format!("the agent of {}", node.name) })
    }

    pub fn request(&self, request: &LocalRequest) -> anyhow::Result<LocalResponse> {
        let mut stream = UnixStream::connect(&self.socket).map_err(|e| {
            anyhow!("cannot reach {} at {}: {e} (is dvk-agent running?)", self.describe, self.socket.display())
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        frame::write_frame(&mut stream, request, LOCAL_MAX_FRAME)
            .with_context(|| format!("sending to {}", self.describe))?;
        let response = frame::read_frame(&mut stream, LOCAL_MAX_FRAME)
            .with_context(|| format!("reading the answer of {}", self.describe))?;
        if let LocalResponse::Error { message } = response {
            bail!("{} refused: {message}", self.describe);
        }
        Ok(response)
    }
}

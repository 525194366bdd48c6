//! The cluster configuration file.
//!
//! ```toml
//! cluster_key_file = "cluster.key"     # relative paths are relative to this file
//!
//! [[node]]
//! name = "node1"                        # unique; what migrate-cli and --node use
//! id = 1                                # unique, 1..=255; the high bits of its vPIDs
//! peer_addr = "192.0.2.11:7700"         # where the other agents reach it
//! runtime_dir = "/run/dvk/node1"        # holds agent.sock
//! image_dir = "/var/lib/dvk/node1/images"
//! kept_images_mb = 2048                 # optional: older images kept for rsync deltas, at most
//!
//! [[node.ingress]]                      # optional: expose an endpoint on a real TCP port
//! endpoint = "web:8000"                 # <name>:<port> of the endpoint
//! dc = "dc0"                            # optional, default dc0
//! listen = "192.0.2.11:8080"            # where this node's agent accepts plain TCP clients
//!
//! [[dc]]                                # optional: who may run in a DC (see below)
//! name = "prod"                         # matched without regard to case, like DC names are
//! users = ["postgres", "1001"]          # user names or uids that may register processes in it
//! groups = ["prod-ops"]                 # members of these groups (primary or supplementary) may too
//! reserve = { db = "postgres" }         # endpoint name → the only user that may listen on it
//! ```
//!
//! A DC without a `[[dc]]` table, or whose table has neither `users` nor `groups`, is open to
//! every local user (the behaviour before DCs had owners). Listing either closes it to
//! everyone not listed (`users = []` alone: root only). Root may always register anywhere.
//! `reserve` works in open DCs too.
//! Every error names the file, the line and the field.

use serde::Deserialize;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// Where tools look when neither `--config` nor `DVK_CONFIG` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/dvk/cluster.toml";
/// File name of the agent's local socket inside `runtime_dir`.
pub const AGENT_SOCKET_NAME: &str = "agent.sock";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The io error is part of the message, not a `source` (printers of error chains
    /// would repeat it).
    #[error("{path}: cannot read: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{path}:{line}: {message}")]
    Invalid { path: PathBuf, line: usize, message: String },
    #[error("{path}: no node named `{name}` (known: {known})")]
    UnknownNode { path: PathBuf, name: String, known: String },
    #[error("{path}: cluster key file {key_path}: {message}")]
    Key { path: PathBuf, key_path: PathBuf, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    cluster_key_file: Spanned<String>,
    #[serde(default)]
    node: Vec<RawNode>,
    #[serde(default)]
    dc: Vec<RawDc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDc {
    name: Spanned<String>,
    users: Option<Vec<String>>,
    groups: Option<Vec<String>>,
    reserve: Option<Spanned<std::collections::BTreeMap<String, String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Spanned<String>,
    id: Spanned<i64>,
    peer_addr: Spanned<String>,
    runtime_dir: Spanned<String>,
    image_dir: Spanned<String>,
    kept_images_mb: Option<Spanned<i64>>,
    #[serde(default)]
    ingress: Vec<RawIngress>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIngress {
    endpoint: Spanned<String>,
    dc: Option<Spanned<String>>,
    listen: Spanned<String>,
}

/// A real TCP port on a node that leads to an endpoint, for clients without the shim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngressConfig {
    pub dc: String,
    pub name: String,
    pub port: u16,
    pub listen: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    pub name: String,
    pub id: u16,
    pub peer_addr: SocketAddr,
    pub runtime_dir: PathBuf,
    pub image_dir: PathBuf,
    /// At most this many bytes of older images (`move --transfer rsync` sends the delta
    /// against them) stay in `image_dir`; the least recently used go first.
    pub kept_images_max: u64,
    pub ingress: Vec<IngressConfig>,
}

/// [`NodeConfig::kept_images_max`] unless the node says otherwise.
pub const DEFAULT_KEPT_IMAGES_MAX: u64 = 2 << 30;

/// Who may run in a DC (`[[dc]]`). Users and groups are names or numeric ids, resolved by the
/// agent when it checks (so accounts made after it started count).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DcPolicy {
    pub name: String,
    /// None (and `groups` None): open to every user.
    pub users: Option<Vec<String>>,
    pub groups: Option<Vec<String>>,
    /// Endpoint name (lowercase) → the only user that may listen on it.
    pub reserve: Vec<(String, String)>,
}

impl DcPolicy {
    /// Every user may register here.
    pub fn is_open(&self) -> bool {
        self.users.is_none() && self.groups.is_none()
    }

    /// The user `name` is reserved for, if it is (case-insensitively).
    pub fn reserved_for(&self, endpoint: &str) -> Option<&str> {
        self.reserve.iter().find(|(n, _)| n.eq_ignore_ascii_case(endpoint)).map(|(_, u)| u.as_str())
    }
}

impl NodeConfig {
    /// The agent's local socket (shim and CLI connect here).
    pub fn socket_path(&self) -> PathBuf {
        self.runtime_dir.join(AGENT_SOCKET_NAME)
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub path: PathBuf,
    pub cluster_key_file: PathBuf,
    pub nodes: Vec<NodeConfig>,
    /// `[[dc]]` tables; a DC without one is open to everyone.
    pub dcs: Vec<DcPolicy>,
}

impl Config {
    /// The `[[dc]]` of `dc` (DC names match case-insensitively, as resolution does).
    pub fn dc_policy(&self, dc: &str) -> Option<&DcPolicy> {
        self.dcs.iter().find(|d| d.name.eq_ignore_ascii_case(dc))
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read { path: path.to_owned(), error })?;
        Config::parse(path, &text)
    }

    /// Parses `text` as if read from `path` (used for messages and relative paths).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let invalid = |offset: usize, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            line: line_of(text, offset),
            message,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let offset = e.span().map(|s| s.start).unwrap_or(0);
            invalid(offset, e.message().trim_end().to_owned())
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &str| {
            if Path::new(p).is_absolute() {
                PathBuf::from(p)
            } else {
                base.join(p)
            }
        };

        if raw.node.is_empty() {
            return Err(invalid(text.len(), "no [[node]] is configured".into()));
        }
        let mut names = HashSet::new();
        let mut ids = HashSet::new();
        let mut addrs = HashSet::new();
        let mut nodes = Vec::new();
        for n in &raw.node {
            let name = n.name.get_ref();
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(invalid(
                    n.name.span().start,
                    format!("field `name`: `{name}` must be non-empty letters, digits, `-` or `_`"),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(invalid(n.name.span().start, format!("field `name`: node `{name}` is defined twice")));
            }
            let id = *n.id.get_ref();
            if !(1..=255).contains(&id) {
                return Err(invalid(n.id.span().start, format!("field `id`: {id} is out of range 1..=255")));
            }
            if !ids.insert(id) {
                return Err(invalid(n.id.span().start, format!("field `id`: id {id} is used by two nodes")));
            }
            let peer_addr: SocketAddr = n.peer_addr.get_ref().parse().map_err(|_| {
                invalid(
                    n.peer_addr.span().start,
                    format!("field `peer_addr`: `{}` is not an IP:port address", n.peer_addr.get_ref()),
                )
            })?;
            if !addrs.insert(peer_addr) {
                return Err(invalid(
                    n.peer_addr.span().start,
                    format!("field `peer_addr`: {peer_addr} is used by two nodes"),
                ));
            }
            for (field, value) in [("runtime_dir", &n.runtime_dir), ("image_dir", &n.image_dir)] {
                if value.get_ref().is_empty() {
                    return Err(invalid(value.span().start, format!("field `{field}`: must not be empty")));
                }
            }
            let mut ingress = Vec::new();
            for ing in &n.ingress {
                let spec = ing.endpoint.get_ref();
                let parsed = spec.rsplit_once(':').and_then(|(name, port)| {
                    let port: u16 = port.parse().ok()?;
                    (!name.is_empty() && port != 0).then(|| (name.to_owned(), port))
                });
                let Some((ep_name, port)) = parsed else {
                    return Err(invalid(
                        ing.endpoint.span().start,
                        format!("field `endpoint`: `{spec}` is not <name>:<port>"),
                    ));
                };
                let listen: SocketAddr = ing.listen.get_ref().parse().map_err(|_| {
                    invalid(
                        ing.listen.span().start,
                        format!("field `listen`: `{}` is not an IP:port address", ing.listen.get_ref()),
                    )
                })?;
                let dc = ing.dc.as_ref().map(|d| d.get_ref().clone()).unwrap_or_else(|| "dc0".into());
                ingress.push(IngressConfig { dc, name: ep_name, port, listen });
            }
            let kept_images_max = match &n.kept_images_mb {
                None => DEFAULT_KEPT_IMAGES_MAX,
                Some(v) if (0..=1 << 40).contains(v.get_ref()) => (*v.get_ref() as u64) << 20,
                Some(v) => {
                    return Err(invalid(
                        v.span().start,
                        format!("field `kept_images_mb`: {} is not between 0 and 2^40", v.get_ref()),
                    ))
                }
            };
            nodes.push(NodeConfig {
                kept_images_max,
                ingress,
                name: name.clone(),
                id: id as u16,
                peer_addr,
                runtime_dir: resolve(n.runtime_dir.get_ref()),
                image_dir: resolve(n.image_dir.get_ref()),
            });
        }
        if raw.cluster_key_file.get_ref().is_empty() {
            return Err(invalid(
                raw.cluster_key_file.span().start,
                "field `cluster_key_file`: must not be empty".into(),
            ));
        }
        let mut dcs: Vec<DcPolicy> = Vec::new();
        let valid = |s: &str, dots: bool| {
            !s.is_empty()
                && s.len() <= 128
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || (dots && c == '.'))
        };
        for d in &raw.dc {
            let name = d.name.get_ref();
            if !valid(name, false) {
                return Err(invalid(
                    d.name.span().start,
                    format!("field `name`: DC `{name}` must be 1..=128 letters, digits, `-` or `_`"),
                ));
            }
            if dcs.iter().any(|p| p.name.eq_ignore_ascii_case(name)) {
                return Err(invalid(d.name.span().start, format!("field `name`: DC `{name}` is defined twice")));
            }
            let mut reserve = Vec::new();
            let reserved = d.reserve.iter().flat_map(|r| r.get_ref().iter().map(move |e| (r.span().start, e)));
            for (at, (endpoint, user)) in reserved {
                if !valid(endpoint, true) || user.is_empty() {
                    return Err(invalid(
                        at,
                        format!("field `reserve`: `{endpoint} = \"{user}\"` is not <endpoint name> = \"<user>\""),
                    ));
                }
                if reserve.iter().any(|(e, _): &(String, String)| e.eq_ignore_ascii_case(endpoint)) {
                    return Err(invalid(at, format!("field `reserve`: endpoint `{endpoint}` is reserved twice")));
                }
                reserve.push((endpoint.to_ascii_lowercase(), user.clone()));
            }
            dcs.push(DcPolicy { name: name.clone(), users: d.users.clone(), groups: d.groups.clone(), reserve });
        }
        Ok(Config { path: path.to_owned(), cluster_key_file: resolve(raw.cluster_key_file.get_ref()), nodes, dcs })
    }

    pub fn node(&self, name: &str) -> Result<&NodeConfig, ConfigError> {
        self.nodes.iter().find(|n| n.name == name).ok_or_else(|| ConfigError::UnknownNode {
            path: self.path.clone(),
            name: name.to_owned(),
            known: self.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(", "),
        })
    }

    pub fn node_by_id(&self, id: u16) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// Reads the cluster key: a hex string (whitespace ignored), or else the raw bytes.
    pub fn read_key(&self) -> Result<Vec<u8>, ConfigError> {
        let key_err = |message: String| ConfigError::Key {
            path: self.path.clone(),
            key_path: self.cluster_key_file.clone(),
            message,
        };
        let bytes = std::fs::read(&self.cluster_key_file).map_err(|e| key_err(e.to_string()))?;
        let text: String = String::from_utf8_lossy(&bytes).split_whitespace().collect();
        let key = match decode_hex(&text) {
            Some(k) if !k.is_empty() => k,
            _ => bytes,
        };
        if key.len() < 16 {
            return Err(key_err(format!("key is {} bytes; at least 16 are required", key.len())));
        }
        Ok(key)
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"cluster_key_file = "cluster.key"

[[node]]
name = "node1"
id = 1
peer_addr = "127.0.0.1:7701"
runtime_dir = "run/node1"
image_dir = "/var/lib/dvk/node1/images"

[[node]]
name = "node2"
id = 2
peer_addr = "127.0.0.1:7702"
runtime_dir = "/run/dvk/node2"
image_dir = "/var/lib/dvk/node2/images"
"#;

    fn err(text: &str) -> String {
        Config::parse(Path::new("/etc/dvk/c.toml"), text).unwrap_err().to_string()
    }

    #[test]
    fn good_config_parses_with_relative_paths_resolved() {
        let c = Config::parse(Path::new("/etc/dvk/c.toml"), GOOD).unwrap();
        assert_eq!(c.nodes.len(), 2);
        assert_eq!(c.cluster_key_file, PathBuf::from("/etc/dvk/cluster.key"));
        assert_eq!(c.node("node1").unwrap().socket_path(), PathBuf::from("/etc/dvk/run/node1/agent.sock"));
        assert_eq!(c.node_by_id(2).unwrap().name, "node2");
        let unknown = c.node("node9").unwrap_err().to_string();
        assert!(unknown.contains("node9") && unknown.contains("node1, node2"), "{unknown}");
    }

    #[test]
    fn kept_images_cap_has_a_default_and_is_checked() {
        let c = Config::parse(Path::new("/etc/dvk/c.toml"), GOOD).unwrap();
        assert_eq!(c.node("node1").unwrap().kept_images_max, DEFAULT_KEPT_IMAGES_MAX);
        let text = GOOD.replace("id = 2\n", "id = 2\nkept_images_mb = 300\n");
        let c = Config::parse(Path::new("/etc/dvk/c.toml"), &text).unwrap();
        assert_eq!(c.node("node2").unwrap().kept_images_max, 300 << 20);
        let e = err(&GOOD.replace("id = 2\n", "id = 2\nkept_images_mb = -1\n"));
        assert!(e.starts_with("/etc/dvk/c.toml:13:") && e.contains("kept_images_mb"), "{e}");
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let e = err(&GOOD.replace("id = 2", "id = 300"));
        assert!(e.starts_with("/etc/dvk/c.toml:12:") && e.contains("`id`") && e.contains("300"), "{e}");
        let e = err(&GOOD.replace("id = 2", "id = 1"));
        assert!(e.starts_with("/etc/dvk/c.toml:12:") && e.contains("used by two nodes"), "{e}");
        let e = err(&GOOD.replace("\"127.0.0.1:7702\"", "\"localhost\""));
        assert!(e.starts_with("/etc/dvk/c.toml:13:") && e.contains("peer_addr"), "{e}");
        let e = err(&GOOD.replace("image_dir = \"/var/lib/dvk/node2/images\"", ""));
        assert!(e.contains("image_dir"), "{e}");
        let e = err(&GOOD.replace("runtime_dir = \"run/node1\"", "runtime_dir = \"run/node1\"\nport = 3"));
        assert!(e.starts_with("/etc/dvk/c.toml:8:") && e.contains("port"), "{e}");
        let e = err(&GOOD.replace("id = 1", "id = \"one\""));
        assert!(e.starts_with("/etc/dvk/c.toml:5:"), "{e}");
        let e = err(&GOOD.replace("name = \"node2\"", "name = \"node1\""));
        assert!(e.starts_with("/etc/dvk/c.toml:11:") && e.contains("defined twice"), "{e}");
        let e = err("cluster_key_file = \"k\"\n");
        assert!(e.contains("no [[node]]"), "{e}");
    }

    #[test]
    fn ingress_tables_belong_to_their_node() {
        let text = GOOD.replace(
            "image_dir = \"/var/lib/dvk/node2/images\"\n",
            "image_dir = \"/var/lib/dvk/node2/images\"\n\n[[node.ingress]]\nendpoint = \"web:8000\"\nlisten = \"127.0.0.1:18080\"\n",
        );
        let c = Config::parse(Path::new("/c.toml"), &text).unwrap();
        assert!(c.node("node1").unwrap().ingress.is_empty());
        let ing = &c.node("node2").unwrap().ingress[0];
        assert_eq!((ing.dc.as_str(), ing.name.as_str(), ing.port), ("dc0", "web", 8000));
        assert_eq!(ing.listen.to_string(), "127.0.0.1:18080");
        let bad = text.replace("web:8000", "web");
        let e = err(&bad);
        assert!(e.starts_with("/etc/dvk/c.toml:18:") && e.contains("`endpoint`"), "{e}");
    }

    #[test]
    fn dc_tables_say_who_may_run_there() {
        let text = format!(
            "{GOOD}\n[[dc]]\nname = \"prod\"\nusers = [\"postgres\", \"1001\"]\ngroups = [\"ops\"]\nreserve = {{ db = \"postgres\" }}\n\n[[dc]]\nname = \"lab\"\nreserve = {{ \"Web.v2\" = \"1002\" }}\n"
        );
        let c = Config::parse(Path::new("/c.toml"), &text).unwrap();
        let prod = c.dc_policy("PROD").unwrap();
        assert!(!prod.is_open());
        assert_eq!(prod.users.as_deref(), Some(&["postgres".to_owned(), "1001".to_owned()][..]));
        assert_eq!(prod.reserved_for("DB"), Some("postgres"));
        assert_eq!(prod.reserved_for("web"), None);
        let lab = c.dc_policy("lab").unwrap();
        assert!(lab.is_open(), "a DC without users or groups stays open");
        assert_eq!(lab.reserved_for("web.V2"), Some("1002"));
        assert!(c.dc_policy("dc0").is_none(), "a DC without a table is open");
        let e = err(&format!("{GOOD}\n[[dc]]\nname = \"prod\"\n\n[[dc]]\nname = \"Prod\"\n"));
        assert!(e.contains("defined twice"), "{e}");
        let e = err(&format!("{GOOD}\n[[dc]]\nname = \"a.b\"\n"));
        assert!(e.contains("`name`"), "{e}");
        let e = err(&format!("{GOOD}\n[[dc]]\nname = \"p\"\nreserve = {{ \"a b\" = \"x\" }}\n"));
        assert!(e.contains("`reserve`"), "{e}");
    }

    #[test]
    fn key_file_hex_or_raw() {
        let dir = tempfile::tempdir().unwrap();
        let cfg_path = dir.path().join("c.toml");
        let c = Config::parse(&cfg_path, GOOD).unwrap();
        std::fs::write(dir.path().join("cluster.key"), "00112233445566778899aabbccddeeff\n").unwrap();
        assert_eq!(c.read_key().unwrap().len(), 16);
        std::fs::write(dir.path().join("cluster.key"), "short").unwrap();
        assert!(c.read_key().unwrap_err().to_string().contains("at least 16"));
        std::fs::remove_file(dir.path().join("cluster.key")).unwrap();
        assert!(c.read_key().unwrap_err().to_string().contains("cluster.key"));
    }
}

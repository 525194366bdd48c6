//! `ps` and `nodes`: the cluster as the local agent sees it.

use crate::agent_client::Target;
use anyhow::bail;
use dvk_protocol::local::{LocalRequest, LocalResponse, NodeStatus, ProcessRow};
use serde::Serialize;

#[derive(Serialize)]
struct PsJson<'a> {
    vpid: i32,
    node: &'a str,
    node_id: u16,
    pid: i32,
    dc: &'a str,
    endpoint: &'a str,
    state: &'static str,
    uid: u32,
    owner: String,
    parent_vpid: Option<i32>,
    command: &'a str,
}

pub fn ps(target: &Target, json: bool) -> anyhow::Result<()> {
    let LocalResponse::Processes(rows) = target.request(&LocalRequest::ListProcesses)? else {
        bail!("{} answered `ps` with something else", target.describe);
    };
    let rows: Vec<PsJson> = rows.iter().map(ps_json).collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let mut table =
        vec![["VPID", "NODE", "PID", "DC", "ENDPOINT", "STATE", "OWNER", "COMMAND"].map(String::from).to_vec()];
    for r in &rows {
        table.push(vec![
            r.vpid.to_string(),
            r.node.to_owned(),
            r.pid.to_string(),
            r.dc.to_owned(),
            r.endpoint.to_owned(),
            r.state.to_owned(),
            r.owner.clone(),
            r.command.to_owned(),
        ]);
    }
    print_table(&table);
    Ok(())
}

fn ps_json(r: &ProcessRow) -> PsJson<'_> {
    PsJson {
        vpid: r.entry.vpid.0,
        node: &r.node_name,
        node_id: r.entry.node.0,
        pid: r.entry.real_pid,
        dc: &r.entry.dc,
        endpoint: &r.entry.endpoint,
        state: r.state.label(),
        uid: r.entry.uid,
        owner: user_name(r.entry.uid),
        parent_vpid: r.entry.parent.map(|p| p.0),
        command: &r.entry.command,
    }
}

#[derive(Serialize)]
struct NodeJson<'a> {
    name: &'a str,
    id: u16,
    address: &'a str,
    up: bool,
    is_self: bool,
    last_contact_ms: Option<u64>,
    processes: u32,
}

pub fn nodes(target: &Target, json: bool) -> anyhow::Result<()> {
    let LocalResponse::Nodes(nodes) = target.request(&LocalRequest::ListNodes)? else {
        bail!("{} answered `nodes` with something else", target.describe);
    };
    if json {
        let out: Vec<NodeJson> = nodes.iter().map(node_json).collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let mut table = vec![["NODE", "ID", "ADDRESS", "STATE", "LAST CONTACT", "PROCESSES"].map(String::from).to_vec()];
    for n in &nodes {
        let state = match (n.is_self, n.up) {
            (true, _) => "up (this node)",
            (false, true) => "up",
            (false, false) => "down",
        };
        let contact = match n.last_contact_ms {
            _ if n.is_self => "-".to_owned(),
            Some(ms) => format!("{:.1}s ago", ms as f64 / 1000.0),
            None => "never".to_owned(),
        };
        table.push(vec![
            n.name.clone(),
            n.id.to_string(),
            n.address.clone(),
            state.to_owned(),
            contact,
            n.processes.to_string(),
        ]);
    }
    print_table(&table);
    Ok(())
}

fn node_json(n: &NodeStatus) -> NodeJson<'_> {
    NodeJson {
        name: &n.name,
        id: n.id.0,
        address: &n.address,
        up: n.up,
        is_self: n.is_self,
        last_contact_ms: n.last_contact_ms,
        processes: n.processes,
    }
}

/// Left-aligned columns, two spaces apart; the last column is not padded.
fn print_table(rows: &[Vec<String>]) {
    let cols = rows.first().map(|r| r.len()).unwrap_or(0);
    let widths: Vec<usize> = (0..cols).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == cols {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        println!("{}", line.trim_end());
    }
}

/// The user name for `uid` from /etc/passwd, else the number.
fn user_name(uid: u32) -> String {
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|passwd| {
            passwd.lines().find_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                (f.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
            })
        })
        .unwrap_or_else(|| uid.to_string())
}

#[derive(Serialize)]
struct EndpointJson<'a> {
    dc: &'a str,
    name: &'a str,
    port: u16,
    vip: String,
    host: String,
    node: String,
    vpid: i32,
}

/// `endpoints`: every endpoint of the cluster with its virtual address.
pub fn endpoints(target: &Target, json: bool) -> anyhow::Result<()> {
    let LocalResponse::Endpoints(list) = target.request(&LocalRequest::ListEndpoints)? else {
        bail!("{} answered `endpoints` with something else", target.describe);
    };
    let LocalResponse::Nodes(nodes) = target.request(&LocalRequest::ListNodes)? else {
        bail!("{} answered `nodes` with something else", target.describe);
    };
    let node_name = |id: pidvirt::NodeId| {
        nodes.iter().find(|n| n.id == id).map(|n| n.name.clone()).unwrap_or_else(|| format!("node#{id}"))
    };
    let rows: Vec<EndpointJson> = list
        .iter()
        .map(|e| EndpointJson {
            dc: &e.dc,
            name: &e.name,
            port: e.port,
            vip: std::net::Ipv4Addr::from(e.vip).to_string(),
            host: format!("{}.{}.dvk", e.name, e.dc),
            node: node_name(e.node),
            vpid: e.vpid.0,
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let mut table = vec![["DC", "ENDPOINT", "ADDRESS", "HOST NAME", "NODE", "VPID"].map(String::from).to_vec()];
    for r in &rows {
        table.push(vec![
            r.dc.to_owned(),
            format!("{}:{}", r.name, r.port),
            format!("{}:{}", r.vip, r.port),
            r.host.clone(),
            r.node.clone(),
            r.vpid.to_string(),
        ]);
    }
    print_table(&table);
    Ok(())
}

//! cpg-probe: joins a CPG group through `colo_cluster::link::Link` and prints every input as
//! one JSON line on stdout; sends what stdin asks for. For the bed's corosync tests.
//!
//! ```text
//! ip netns exec pri cpg-probe colo-test
//! stdin:  claim <reason> | state <primary|secondary|alone|gone|fenced>   (a leading "send " is allowed)
//! stdout: {"event":"ready","node":1}
//!         {"event":"ring","seq":8} {"event":"quorum","quorate":true,"ring":8}
//!         {"event":"joined","node":2} {"event":"left","node":2,"cause":"node-down"}
//!         {"event":"delivered","from":2,"message":{"kind":"claim","reason":"x"}}
//!         {"event":"cluster-lost"} {"event":"sent"} {"event":"send-error","error":"..."}
//! ```
//!
//! Exits on stdin EOF (leaving the group) or, with status 2, when the join fails.

use std::io::{BufRead, Write};

use colo_cluster::link::Link;
use colo_cluster::{Input, LeaveCause, Message, VmState};
use serde_json::{Value, json};

fn line(v: Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn event(input: &Input) -> Value {
    match input {
        Input::Ring { seq } => json!({"event": "ring", "seq": seq}),
        Input::Quorum { quorate, ring } => {
            json!({"event": "quorum", "quorate": quorate, "ring": ring})
        }
        Input::Joined { node } => json!({"event": "joined", "node": node}),
        Input::Left { node, cause } => {
            let cause = match cause {
                LeaveCause::NodeDown => "node-down",
                LeaveCause::ProcessDown => "process-down",
                LeaveCause::Left => "left",
            };
            json!({"event": "left", "node": node, "cause": cause})
        }
        Input::Delivered { from, message } => {
            json!({"event": "delivered", "from": from, "message": message})
        }
        Input::ClusterLost => json!({"event": "cluster-lost"}),
        other => json!({"event": "other", "debug": format!("{other:?}")}),
    }
}

fn parse(command: &str) -> Result<Message, String> {
    let command = command.trim();
    let command = command.strip_prefix("send ").unwrap_or(command).trim();
    let (verb, rest) = command.split_once(' ').unwrap_or((command, ""));
    match verb {
        "claim" => Ok(Message::Claim {
            reason: rest.trim().to_string(),
        }),
        "state" => serde_json::from_value::<VmState>(Value::String(rest.trim().to_string()))
            .map(|vm| Message::State { vm })
            .map_err(|e| format!("bad state {rest:?}: {e}")),
        _ => Err(format!("unknown command {command:?}")),
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let group = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "colo-probe".to_string());
    let (tx, mut rx) = tokio::sync::mpsc::channel(256);
    let link = match Link::join(&group, tx) {
        Ok(link) => link,
        Err(e) => {
            line(json!({"event": "join-error", "error": e.to_string()}));
            std::process::exit(2);
        }
    };
    line(json!({"event": "ready", "node": link.node_id()}));
    // Ends when the dispatch thread drops its sender (after leave or a lost connection).
    let printer = std::thread::spawn(move || {
        while let Some(input) = rx.blocking_recv() {
            line(event(&input));
        }
    });
    for command in std::io::stdin().lock().lines() {
        let Ok(command) = command else { break };
        if command.trim().is_empty() {
            continue;
        }
        match parse(&command).map(|m| link.send(&m).map_err(|e| e.to_string())) {
            Ok(Ok(())) => line(json!({"event": "sent"})),
            Ok(Err(e)) | Err(e) => line(json!({"event": "send-error", "error": e})),
        }
    }
    link.leave();
    let _ = printer.join();
}

//! A fake primary QEMU's QMP monitor, for the checkpoint requests.

use std::path::Path;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::mpsc;

/// The primary's `x-checkpoint-delay` (ms).
pub const DELAY_MS: u64 = 2000;

/// A QMP server that answers `query-migrate-parameters` with
/// `x-checkpoint-delay` = [`DELAY_MS`] and reports the arguments of every
/// `migrate-set-parameters`.
pub fn fake_primary(path: &Path) -> mpsc::UnboundedReceiver<Value> {
    let listener = UnixListener::bind(path).unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let (rd, mut wr) = stream.into_split();
                let greeting = json!({"QMP": {"version": {"qemu": {"micro": 2, "minor": 0,
                    "major": 10}, "package": "fake"}, "capabilities": []}});
                wr.write_all(format!("{greeting}\r\n").as_bytes())
                    .await
                    .unwrap();
                let mut lines = BufReader::new(rd).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let cmd: Value = serde_json::from_str(&line).unwrap();
                    let ret = match cmd["execute"].as_str() {
                        Some("query-migrate-parameters") => {
                            json!({"x-checkpoint-delay": DELAY_MS, "max-bandwidth": 1})
                        }
                        Some("migrate-set-parameters") => {
                            let _ = tx.send(cmd["arguments"].clone());
                            json!({})
                        }
                        _ => json!({}),
                    };
                    let mut reply = json!({"return": ret});
                    if let Some(id) = cmd.get("id") {
                        reply["id"] = id.clone();
                    }
                    if wr
                        .write_all(format!("{reply}\r\n").as_bytes())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    rx
}

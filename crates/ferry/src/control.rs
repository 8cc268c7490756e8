//! The control socket (`STATE_DIR/ferry.sock`): `ferry status` asks the
//! running daemon. Filesystem permissions on the state dir are the access
//! control.

use crate::node::Shared;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("ferry.sock")
}

pub fn spawn(shared: &Arc<Shared>, tasks: &mut tokio::task::JoinSet<()>) -> anyhow::Result<()> {
    let path = socket_path(&shared.cfg.state_dir);
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "control socket unavailable; `ferry status` will not reach this node");
            return Ok(());
        }
    };
    let shared = shared.clone();
    tasks.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut line = String::new();
                let mut r = BufReader::new(r);
                if tokio::time::timeout(std::time::Duration::from_secs(5), r.read_line(&mut line))
                    .await
                    .is_err()
                {
                    return;
                }
                let cmd = line.trim();
                if cmd == "promote" || cmd.starts_with("promote-to ") {
                    let reply = promote(&shared, cmd).await;
                    let _ = w.write_all(reply.replace('\n', " ").as_bytes()).await;
                    let _ = w.write_all(b"\n").await;
                    return;
                }
                let report = || {
                    let ready = shared.ready.load(std::sync::atomic::Ordering::Relaxed);
                    shared.status.lock().expect("status").report(ready)
                };
                let reply = match cmd {
                    "status" => serde_json::to_string(&report()).unwrap_or_else(|e| {
                        format!("{{\"error\":\"cannot encode the status: {e}\"}}")
                    }),
                    // one line on the wire: newlines escaped, the client restores them
                    "status-text" => report().to_text().replace('\n', "\\n"),
                    other => format!(
                        "{{\"error\":\"unknown command {:?}\"}}",
                        other.chars().take(40).collect::<String>()
                    ),
                };
                let _ = w.write_all(reply.as_bytes()).await;
                let _ = w.write_all(b"\n").await;
            });
        }
    });
    Ok(())
}

/// Forwards a promote request to the node's owner and waits for the
/// outcome: `ok: ...` or `error: ...`.
async fn promote(shared: &Shared, cmd: &str) -> String {
    use crate::node::NodeRequest;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let req = match cmd.strip_prefix("promote-to ") {
        Some(to) => NodeRequest::Switchover {
            to: to.trim().to_owned(),
            reply: tx,
        },
        None => NodeRequest::Failover { reply: tx },
    };
    if shared.requests.send(req).await.is_err() {
        return "error: the node is shutting down".into();
    }
    let limit = shared.cfg.shutdown_grace + std::time::Duration::from_secs(60);
    match tokio::time::timeout(limit, rx).await {
        Ok(Ok(Ok(msg))) => format!("ok: {msg}"),
        Ok(Ok(Err(e))) => format!("error: {e}"),
        Ok(Err(_)) => "error: the node stopped before answering".into(),
        Err(_) => format!("error: no outcome within {limit:?}"),
    }
}

/// Client side: asks a running daemon.
pub async fn query(state_dir: &Path, cmd: &str) -> anyhow::Result<String> {
    let path = socket_path(state_dir);
    let mut s = tokio::net::UnixStream::connect(&path).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach a ferry daemon at {}: {e}; is `ferry run` running with this state dir (--state-dir / --root)?",
            path.display()
        )
    })?;
    s.write_all(format!("{cmd}\n").as_bytes()).await?;
    let mut out = String::new();
    BufReader::new(s).read_line(&mut out).await?;
    Ok(out)
}

//! The webhook server as a standalone process, for process-level tests before and
//! besides the `ferry inject` command of the ferry binary:
//! `serve --listen HOST:PORT --tls-dir DIR [--sidecar-image IMAGE]`.
//! Stops on SIGTERM or Ctrl-C, draining open connections, and exits 0.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use ferry_inject::{serve, InjectConfig, DEFAULT_SIDECAR_IMAGE};

fn parse(args: &[String]) -> Result<InjectConfig, String> {
    let mut listen = None;
    let mut tls_dir = None;
    let mut image = DEFAULT_SIDECAR_IMAGE.to_owned();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => {
                let v = value()?;
                listen = Some(
                    v.parse::<SocketAddr>()
                        .map_err(|e| format!("--listen {v:?}: {e}"))?,
                );
            }
            "--tls-dir" => tls_dir = Some(PathBuf::from(value()?)),
            "--sidecar-image" => image = value()?,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(InjectConfig {
        listen: listen.ok_or("--listen is required")?,
        tls_dir: tls_dir.ok_or("--tls-dir is required")?,
        sidecar_image: image,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match parse(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "serve: {e}\nusage: serve --listen HOST:PORT --tls-dir DIR [--sidecar-image IMAGE]"
            );
            return ExitCode::from(64);
        }
    };
    let shutdown = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    match serve(cfg, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("serve: {e}");
            ExitCode::FAILURE
        }
    }
}

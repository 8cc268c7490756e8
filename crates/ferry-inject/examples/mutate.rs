//! Runs the webhook's pure entry point over AdmissionReview files and writes the
//! patched pods: `cargo run -p ferry-inject --example mutate -- OUT_DIR REVIEW.json...`.
//!
//! `scripts/test-k8s.sh` uses it to inject the pods of the rendered example manifests
//! and validate the result against the Kubernetes schema. Exits 1 if any review is
//! refused, denied or its patch does not apply.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use base64::Engine as _;
use serde_json::Value;

fn run(out_dir: &Path, review_path: &Path) -> Result<PathBuf, String> {
    let body = std::fs::read(review_path).map_err(|e| format!("read: {e}"))?;
    let review: Value = serde_json::from_slice(&body).map_err(|e| format!("parse: {e}"))?;
    let answer = ferry_inject::mutate(&body, ferry_inject::DEFAULT_SIDECAR_IMAGE)
        .map_err(|e| format!("refused: {e}"))?;
    let answer: Value = serde_json::from_slice(&answer).map_err(|e| format!("response: {e}"))?;
    let response = &answer["response"];
    if response["allowed"] != true {
        return Err(format!("denied: {}", response["status"]["message"]));
    }
    for w in response["warnings"].as_array().into_iter().flatten() {
        eprintln!("{}: warning: {}", review_path.display(), w);
    }
    let mut pod = review["request"]["object"].clone();
    if let Some(b64) = response["patch"].as_str() {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| format!("patch base64: {e}"))?;
        let patch: json_patch::Patch =
            serde_json::from_slice(&bytes).map_err(|e| format!("patch JSON: {e}"))?;
        json_patch::patch(&mut pod, &patch).map_err(|e| format!("patch apply: {e}"))?;
    }
    let name = review_path
        .file_name()
        .ok_or_else(|| "no file name".to_owned())?;
    let out = out_dir.join(name);
    let text = serde_json::to_string_pretty(&pod).map_err(|e| format!("serialise: {e}"))?;
    std::fs::write(&out, text).map_err(|e| format!("write {}: {e}", out.display()))?;
    Ok(out)
}

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let Some((out_dir, reviews)) = args.split_first() else {
        eprintln!("usage: mutate OUT_DIR REVIEW.json...");
        return ExitCode::from(64);
    };
    let mut failed = false;
    for r in reviews {
        match run(out_dir, r) {
            Ok(out) => println!("{}", out.display()),
            Err(e) => {
                eprintln!("{}: {e}", r.display());
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

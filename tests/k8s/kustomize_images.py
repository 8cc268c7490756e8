#!/usr/bin/env python3
"""The ferry image is set once in the kustomizations: a kustomize `images:` edit
moves both the webhook container's image and FERRY_SIDECAR_IMAGE (the image the
webhook injects as the sidecar), whether the edit is in an overlay of
manifests/base, of manifests/without-cert-manager, or in manifests/base itself
(`kustomize edit set image`), by tag, by name and tag, or by digest; and the other
env values are left alone.

Usage: kustomize_images.py --kubectl KUBECTL. Prints one line per check and
"N passed, N failed"; exits 1 on failure.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGE = "ghcr.io/ferry-io/ferry"

EDITS = [
    ("a new tag", {"name": IMAGE, "newTag": "9.9.9"}, "ghcr.io/ferry-io/ferry:9.9.9"),
    ("a new name and tag", {"name": IMAGE, "newName": "registry.example.com/mirror/ferry", "newTag": "1.2.3"},
     "registry.example.com/mirror/ferry:1.2.3"),
    ("a digest", {"name": IMAGE, "digest": "sha256:" + "cd" * 32}, "ghcr.io/ferry-io/ferry@sha256:" + "cd" * 32),
]


def render(kubectl, path):
    out = subprocess.run([kubectl, "kustomize", path], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip())
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def webhook_images(docs):
    dep = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "ferry-inject"]
    if not dep:
        return None
    c = [c for c in dep[0]["spec"]["template"]["spec"]["containers"] if c["name"] == "ferry-inject"][0]
    env = {e["name"]: e.get("value") for e in c.get("env") or []}
    return c["image"], env


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kubectl", default="kubectl")
    args = ap.parse_args()
    passed = failed = 0

    def check(what, problems):
        nonlocal passed, failed
        if problems:
            failed += 1
            print(f"FAIL {what}")
            for p in problems:
                print(f"     {p}")
        else:
            passed += 1
            print(f"ok   {what}")

    with tempfile.TemporaryDirectory() as tmp:
        base_imgs = webhook_images(render(args.kubectl, os.path.join(REPO, "manifests", "base")))
        _, base_env = base_imgs
        check("manifests/base: the webhook image and FERRY_SIDECAR_IMAGE are the same",
              [] if base_imgs[0] == base_env.get("FERRY_SIDECAR_IMAGE") else [f"{base_imgs[0]} != {base_env}"])
        for what, edit, want in EDITS:
            for where in ("overlay of manifests/base", "overlay of manifests/without-cert-manager",
                          "manifests/base itself"):
                root = os.path.join(tmp, f"{len(os.listdir(tmp))}")
                shutil.copytree(os.path.join(REPO, "manifests"), root)
                if where == "manifests/base itself":
                    target = os.path.join(root, "base")
                    with open(os.path.join(target, "kustomization.yaml"), encoding="utf-8") as f:
                        k = yaml.safe_load(f)
                    k["images"] = [edit]
                else:
                    target = os.path.join(root, "overlay")
                    os.mkdir(target)
                    k = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                         "resources": ["../base" if "base" in where else "../without-cert-manager"],
                         "images": [edit]}
                with open(os.path.join(target, "kustomization.yaml"), "w", encoding="utf-8") as f:
                    yaml.safe_dump(k, f)
                try:
                    got = webhook_images(render(args.kubectl, target))
                except RuntimeError as e:
                    check(f"images: {what} in an {where}", [f"kubectl kustomize: {e}"])
                    continue
                image, env = got
                problems = []
                if image != want:
                    problems.append(f"container image is {image}, want {want}")
                if env.get("FERRY_SIDECAR_IMAGE") != want:
                    problems.append(f"FERRY_SIDECAR_IMAGE is {env.get('FERRY_SIDECAR_IMAGE')}, want {want}")
                others = {k: v for k, v in env.items() if k != "FERRY_SIDECAR_IMAGE"}
                if others != {k: v for k, v in base_env.items() if k != "FERRY_SIDECAR_IMAGE"}:
                    problems.append(f"other env values changed: {others}")
                check(f"images: {what} in {'an ' if where.startswith('overlay') else ''}{where} moves "
                      "the webhook image and FERRY_SIDECAR_IMAGE", problems)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

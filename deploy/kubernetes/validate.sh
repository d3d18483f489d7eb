#!/usr/bin/env bash
# Validates the Kubernetes manifests in deploy/kubernetes offline: every
# resource of every *.yaml against the Kubernetes API schemas that PyPI's
# kubernetes-validate ships inside its package, strictly (an unknown or
# misspelt field is an error, as is a kind it has no schema for), and
# kustomization.yaml (which has no Kubernetes schema) for its keys and for
# resources that exist.
#
# The tool lives in a venv under target/kubernetes-validate, made and
# installed on first use (pip reaches PyPI then; later runs are offline).
# Needs python3 with venv (Debian: python3-venv). Run from anywhere.
set -euo pipefail

# The kubernetes-validate release, and the Kubernetes version whose schemas
# it ships (its newest) to validate against.
TOOL_VERSION=1.37.0
KUBERNETES_VERSION=1.37.0

root="$(cd "$(dirname "$0")/../.." && pwd)"
dir=deploy/kubernetes
venv="$root/target/kubernetes-validate"
tool="$venv/bin/kubernetes-validate"

if [ "$("$tool" --version 2>/dev/null || true)" != "$TOOL_VERSION" ]; then
    echo "validate: installing kubernetes-validate $TOOL_VERSION in ${venv#"$root"/}" >&2
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv" || {
            echo "validate: cannot make a venv (Debian: apt-get install python3-venv)" >&2
            exit 1
        }
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "kubernetes-validate==$TOOL_VERSION"
fi

cd "$root"
failed=0
for file in "$dir"/*.yaml; do
    [ "$(basename "$file")" = kustomization.yaml ] && continue
    # --quiet prints only warnings and failures: any line is a failure
    # (a WARN is a kind or apiVersion without a schema, e.g. a typo).
    rc=0
    out="$("$tool" --strict --quiet -k "$KUBERNETES_VERSION" "$file" 2>&1)" || rc=$?
    if [ "$rc" -ne 0 ] || [ -n "$out" ]; then
        echo "$out" >&2
        echo "validate: $file FAILED" >&2
        failed=1
    else
        echo "validate: $file ok"
    fi
done

# kustomization.yaml: only the keys used here, every resource a file here.
if "$venv/bin/python" - "$dir/kustomization.yaml" <<'PY'; then
import os, sys, yaml
path = sys.argv[1]
with open(path) as f:
    k = yaml.safe_load(f)
errors = []
if not isinstance(k, dict):
    errors.append("not a mapping")
else:
    if k.get("apiVersion") != "kustomize.config.k8s.io/v1beta1" or k.get("kind") != "Kustomization":
        errors.append("apiVersion/kind is not kustomize.config.k8s.io/v1beta1 Kustomization")
    unknown = set(k) - {"apiVersion", "kind", "resources"}
    if unknown:
        errors.append("unexpected keys: " + ", ".join(sorted(unknown)))
    resources = k.get("resources")
    if not isinstance(resources, list) or not resources:
        errors.append("no resources")
    else:
        for r in resources:
            if not isinstance(r, str) or not os.path.isfile(os.path.join(os.path.dirname(path), r)):
                errors.append(f"resource {r!r} is not a file beside it")
for e in errors:
    print(f"ERROR {path}: {e}", file=sys.stderr)
sys.exit(1 if errors else 0)
PY
    echo "validate: $dir/kustomization.yaml ok"
else
    echo "validate: $dir/kustomization.yaml FAILED" >&2
    failed=1
fi

against="kubernetes-validate $TOOL_VERSION --strict, Kubernetes $KUBERNETES_VERSION"
if [ "$failed" -ne 0 ]; then
    echo "validate: manifests in $dir do not validate ($against)" >&2
    exit 1
fi
echo "validate: every manifest in $dir validates ($against)"

#!/usr/bin/env bash
# Offline checks of deploy/ (no docker engine or cluster needed):
#   - YAML syntax and style (yamllint),
#   - Kubernetes manifests against the Kubernetes 1.37 OpenAPI schemas
#     bundled in the kubernetes-validate package (strict: unknown fields fail),
#   - the compose files against the Compose Specification schema bundled in
#     check-jsonschema,
#   - every node config (the ConfigMap TOML through the StatefulSet's start
#     script, and each compose service's SAFERCHAT_* environment) parsed and
#     validated by the node's own loader: saferchat-node --print-config.
# Tools go into a venv outside the repository (DEPLOY_CHECK_VENV).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${DEPLOY_CHECK_VENV:-/tmp/saferchat-deploy-venv}"
if [ ! -x "$VENV/bin/kubernetes-validate" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    yamllint==1.38.0 kubernetes-validate==1.37.0 check-jsonschema==0.39.0
fi
# The node binary to parse configs with: SAFERCHAT_NODE_BIN when set (CI
# passes the one its workspace build made; building the node package alone
# would replace it with one lacking the test features), else this one.
if [ -z "${SAFERCHAT_NODE_BIN:-}" ]; then
  cargo build --quiet -p saferchat-node
fi
"$VENV/bin/yamllint" -d '{extends: default, rules: {line-length: {max: 120}, document-start: disable,
  braces: {max-spaces-inside: 1}, brackets: {max-spaces-inside: 1}, truthy: {check-keys: false}}}' \
  deploy/compose/*.yaml deploy/kubernetes/*.yaml deploy/kubernetes/two-datacenters/*.yaml
echo "yamllint: ok"
"$VENV/bin/kubernetes-validate" --strict deploy/kubernetes/*.yaml deploy/kubernetes/two-datacenters/*.yaml
"$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose/*.yaml
"$VENV/bin/python" deploy/check_config.py

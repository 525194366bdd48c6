#!/usr/bin/env bash
# The project's test command: installs test dependencies (when root), builds
# the workspace in release mode and runs every unit and end-to-end test.
# Network-namespace tests run when root and skip with a message otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -eq 0 ]; then
  bash ci/install-test-deps.sh
else
  echo "not root: skipping dependency installation; network-mode tests will be skipped"
fi
cargo build --workspace --release --locked
cargo test --workspace --release --locked -- --test-threads="${DVK_TEST_THREADS:-4}"

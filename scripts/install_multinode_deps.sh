#!/usr/bin/env bash
# Debian packages for the ssh path of the multi-node tests (tests/test_multinode.py): openssh-server (an
# sshd inside each simulated host) and pdsh (DeepSpeed's default multi-node runner; the ssh client comes
# with openssh-server). Installs only what is missing, and only as root with apt-get; otherwise it says
# what is missing and exits 0, and those tests skip with the same reason. Starts no service: the tests
# run their own sshd inside network namespaces.
#   bash scripts/install_multinode_deps.sh
set -euo pipefail
need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v pdsh >/dev/null 2>&1 || need+=(pdsh)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "multi-node deps: ${need[*]} missing (needs root and apt-get); the ssh-launcher tests will skip" >&2
  exit 0
fi
# Keep the package scripts from starting a system-wide sshd (policy-rc.d exit 101 = "do not start services").
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
fi
trap 'if [ "$made_policy" = 1 ]; then rm -f "$policy"; fi' EXIT
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }; then
  echo "multi-node deps: installing ${need[*]} failed; the ssh-launcher tests will skip" >&2
fi

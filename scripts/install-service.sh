#!/usr/bin/env bash
# Install hotpipe as a systemd service (run as root):
#   scripts/install-service.sh [CONFIG] [USER]
# CONFIG defaults to this checkout's pipeline.toml, USER to "hotpipe" (created as a
# system user when missing). The hot folder's root comes from CONFIG's [hotfolder] root;
# it is created, owned by USER, and is the only path the unit may write. The binary must
# be built (scripts/setup.sh) and stays where it is (it finds libtorch by rpath).
set -euo pipefail
cd "$(dirname "$0")/.."
here="$(pwd)"
config="$(realpath "${1:-pipeline.toml}")"
user="${2:-hotpipe}"
bin="$here/target/release/hotpipe"
[ "$(id -u)" -eq 0 ] || { echo "run as root" >&2; exit 1; }
[ -x "$bin" ] || { echo "build first: scripts/setup.sh" >&2; exit 1; }
command -v systemctl >/dev/null || { echo "systemd is not available here" >&2; exit 1; }
# The root from the config, relative to the config's folder.
root="$(sed -n '/^\[hotfolder\]/,/^\[/s/^root *= *"\(.*\)".*/\1/p' "$config" | head -1)"
[ -n "$root" ] || { echo "$config has no [hotfolder] root" >&2; exit 1; }
case "$root" in /*) ;; *) root="$(dirname "$config")/$root" ;; esac
"$bin" check --config "$config" >/dev/null
id -u "$user" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$user"
getent group video >/dev/null && usermod -aG video "$user" || true
mkdir -p "$root"
chown "$user": "$root"
sed -e "s|@BIN@|$bin|g" -e "s|@CONFIG@|$config|g" -e "s|@ROOT@|$root|g" \
    -e "s|@USER@|$user|g" -e "s|@DOC@|$here/README.md|g" \
    scripts/hotpipe.service > /etc/systemd/system/hotpipe.service
systemctl daemon-reload
systemctl enable --now hotpipe.service
echo "installed: systemctl status hotpipe; journalctl -u hotpipe -f; drop files into $root/inbox"

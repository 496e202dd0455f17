#!/usr/bin/env bash
# Install hotpipe as a systemd service, or remove it (run as root).
#
#   scripts/install-service.sh [--config FILE] [--user NAME] [--prefix DIR] [--binary BIN]
#                              [--no-start]
#   scripts/install-service.sh --uninstall [--purge] [--prefix DIR]
#
# What goes where (a system service must not read anything under a home directory):
#   DIR (/opt/hotpipe)          bin/hotpipe, lib/ (libtorch and the CUDA libraries it was
#                               built with, copied from the build's PyTorch venv; the
#                               binary finds them by its own RUNPATH, $ORIGIN/../lib/...),
#                               share/models/mtcnn (the face crop's weights),
#                               share/doc/hotpipe, share/hotpipe/pipeline.toml (the default),
#                               share/hotpipe/python (the Python backend's worker module)
#   /etc/hotpipe/pipeline.toml  the config (written once; an existing one is kept and the
#                               new default goes beside it as pipeline.toml.dist)
#   /var/lib/hotpipe            the hot folder (StateDirectory=): inbox/, outbox/, ...
#   /etc/systemd/system/hotpipe.service
# --config FILE uses FILE where it is instead of /etc/hotpipe/pipeline.toml; its hot folder
# is then made writable for the service (ReadWritePaths=).
# --binary BIN installs BIN instead of this checkout's target/release/hotpipe.
# --uninstall stops and removes the unit and DIR; the config, the hot folder (with any
# files in it) and the user stay unless --purge is given too (as with apt remove/purge).
#
# The service runs as NAME (default hotpipe, a system user created when missing, in the
# video and render groups where they exist: the NVIDIA device nodes). Operators who drop
# files need write access to the inbox: `usermod -aG hotpipe OPERATOR`.
set -euo pipefail
cd "$(dirname "$0")/.."
here="$(pwd)"
prefix=/opt/hotpipe
user=hotpipe
config=""
bin=""
uninstall=0
purge=0
start=1
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config="$(realpath "$2")"; shift 2 ;;
    --user) user="$2"; shift 2 ;;
    --prefix) prefix="$2"; shift 2 ;;
    --binary) bin="$(realpath "$2")"; shift 2 ;;
    --uninstall) uninstall=1; shift ;;
    --purge) purge=1; shift ;;
    --no-start) start=0; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
log() { printf '[install] %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (sudo $0 $*)"
command -v systemctl >/dev/null || die "systemctl not found: this installs a systemd service"
unit=/etc/systemd/system/hotpipe.service

if [ "$uninstall" -eq 1 ]; then
  if [ -f "$unit" ]; then
    systemctl disable --now hotpipe.service || true
    rm -f "$unit"
    systemctl daemon-reload
  fi
  rm -rf "$prefix"
  if [ "$purge" -eq 1 ]; then
    rm -rf /etc/hotpipe /var/lib/hotpipe
    if id -u "$user" >/dev/null 2>&1; then userdel "$user" || true; fi
    getent group "$user" >/dev/null && groupdel "$user" 2>/dev/null || true
    log "removed hotpipe, its config, its hot folder and the user $user"
  else
    log "removed hotpipe; kept /etc/hotpipe, /var/lib/hotpipe and the user $user (--purge removes them)"
  fi
  exit 0
fi

# Under sudo, the venv is the one the invoking user's scripts/setup.sh built.
if [ -n "${SUDO_USER:-}" ] && [ -z "${HOTPIPE_CACHE:-}" ]; then
  HOTPIPE_CACHE="$(getent passwd "$SUDO_USER" | cut -d: -f6)/.cache/hotpipe"
  export HOTPIPE_CACHE
fi
source scripts/env.sh
bin="${bin:-$here/target/release/hotpipe}"
[ -x "$bin" ] || die "build first: scripts/setup.sh"
[ -f models/mtcnn/pnet.pt ] || die "models/mtcnn is missing: run scripts/setup.sh"
torch_lib="$("$HOTPIPE_PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')" \
  || die "the PyTorch venv ($HOTPIPE_VENV) is missing: run scripts/setup.sh"
site="$(dirname "$(dirname "$torch_lib")")"
if ! command -v patchelf >/dev/null; then
  log "installing patchelf (sets the installed binary's library path)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq patchelf >/dev/null
fi

# Copy a tree, as hard links when it is on the same filesystem (instant, and no second
# 4 GB of CUDA libraries: a later change to the venv replaces its files, never the
# installed ones), else as a copy.
copy_tree() {
  rm -rf "$2"; mkdir -p "$(dirname "$2")"
  cp -al "$1" "$2" 2>/dev/null || { rm -rf "$2"; cp -a "$1" "$2"; }
}
log "installing into $prefix"
mkdir -p "$prefix/bin" "$prefix/lib" "$prefix/share/models" "$prefix/share/doc/hotpipe" "$prefix/share/hotpipe"
# torch/lib and nvidia/*/lib keep their places relative to each other: libtorch's own
# RUNPATH ($ORIGIN/../../nvidia/...) then finds the CUDA libraries as in the venv.
copy_tree "$torch_lib" "$prefix/lib/torch/lib"
[ -d "$site/nvidia" ] && copy_tree "$site/nvidia" "$prefix/lib/nvidia"
install -m 0755 "$bin" "$prefix/bin/hotpipe.new"
patchelf --set-rpath '$ORIGIN/../lib/torch/lib' "$prefix/bin/hotpipe.new"
mv -f "$prefix/bin/hotpipe.new" "$prefix/bin/hotpipe"
copy_tree models/mtcnn "$prefix/share/models/mtcnn"
copy_tree python/hotpipe_worker "$prefix/share/hotpipe/python/hotpipe_worker"
install -m 0644 README.md "$prefix/share/doc/hotpipe/README.md"
# The default config, its paths pointing at the installed models and the state directory.
sed -e "s|^weights = \"models/mtcnn\"|weights = \"$prefix/share/models/mtcnn\"|" \
    -e 's|^root = "hotfolder"|root = "/var/lib/hotpipe"|' \
    pipeline.toml > "$prefix/share/hotpipe/pipeline.toml"
chmod -R a+rX "$prefix"

if [ -z "$config" ]; then
  config=/etc/hotpipe/pipeline.toml
  mkdir -p /etc/hotpipe
  if [ -f "$config" ]; then
    install -m 0644 "$prefix/share/hotpipe/pipeline.toml" "$config.dist"
    log "kept $config (the new default is $config.dist)"
  else
    install -m 0644 "$prefix/share/hotpipe/pipeline.toml" "$config"
  fi
fi

if ! id -u "$user" >/dev/null 2>&1; then
  log "creating the system user $user"
  useradd --system --user-group --home-dir /var/lib/hotpipe --no-create-home \
    --shell /usr/sbin/nologin "$user"
fi
groups=""
for g in video render; do getent group "$g" >/dev/null && groups="$groups $g"; done

# The config as the service will see it, checked as the service's user: unreadable
# files, a missing model or a library the user cannot load fail here, not at start.
report="$(runuser -u "$user" -- env HOTPIPE_CONFIG="$config" "$prefix/bin/hotpipe" check --json)" \
  || die "hotpipe check failed as $user with $config (above); nothing was started"
read -r root grace < <(printf '%s' "$report" | "$HOTPIPE_PYTHON" -c \
  'import json, sys; h = json.load(sys.stdin)["hotfolder"] or sys.exit("the config has no [hotfolder]"); print(h["root"], h["shutdown_grace_s"])')
rw=""
case "$root" in
  /var/lib/hotpipe|/var/lib/hotpipe/*) ;;
  *) mkdir -p "$root"; chown "$user:$user" "$root"; chmod 2770 "$root"; rw="ReadWritePaths=$root" ;;
esac

# The daemon's own margin after the grace (service::STOP_MARGIN).
stop_margin_s=15
# notify-reload came with systemd 253; older ones get Type=notify and a SIGHUP.
version="$(systemctl --version | awk 'NR==1 {print $2}')"
sed -e "s|@PREFIX@|$prefix|g" -e "s|@CONFIG@|$config|g" -e "s|@USER@|$user|g" \
    -e "s|@GROUPS@|${groups# }|g" -e "s|@STOP_S@|$((grace + stop_margin_s))|g" -e "s|@RW_PATHS@|$rw|g" \
    scripts/hotpipe.service > "$unit.new"
if [ "${version%%[^0-9]*}" -lt 253 ]; then
  sed -i -e 's|^Type=notify-reload$|Type=notify\nExecReload=/bin/kill -HUP $MAINPID|' "$unit.new"
fi
mv -f "$unit.new" "$unit"
systemctl daemon-reload
if [ "$start" -eq 1 ]; then
  systemctl enable hotpipe.service
  systemctl restart hotpipe.service
  log "running: systemctl status hotpipe; journalctl -u hotpipe -f; drop files into $root/inbox"
else
  log "installed (not started): systemctl enable --now hotpipe"
fi

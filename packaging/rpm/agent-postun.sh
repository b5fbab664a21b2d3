if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null 2>&1 || true; fi
if [ "$1" -ge 1 ]; then systemctl try-restart burrow-agent.service >/dev/null 2>&1 || true; fi

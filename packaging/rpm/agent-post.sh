install -d -m 0700 -o root -g root /var/lib/burrow
chmod 0600 /etc/burrow/agent.yaml
if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null 2>&1 || true; fi
# Fresh install: enable, do not start until configured.
if [ "$1" -eq 1 ]; then systemctl enable burrow-agent.service >/dev/null 2>&1 || true; fi

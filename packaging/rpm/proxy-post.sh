getent group burrow >/dev/null || groupadd -r burrow
getent passwd burrow >/dev/null || useradd -r -g burrow -d /var/lib/burrow-proxy -s /sbin/nologin burrow
install -d -m 0700 -o burrow -g burrow /var/lib/burrow-proxy
chown root:burrow /etc/burrow/proxy.yaml && chmod 0640 /etc/burrow/proxy.yaml
# The UDP buffers of 50-burrow-proxy.conf, now rather than at the next boot.
sysctl -q -p /usr/lib/sysctl.d/50-burrow-proxy.conf >/dev/null 2>&1 || true
if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null 2>&1 || true; fi
if [ "$1" -eq 1 ]; then systemctl enable burrow-proxy.service >/dev/null 2>&1 || true; fi

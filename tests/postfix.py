"""A private Postfix instance (Debian's package) for tests and benchmarks.

Its own configuration, queue, data and mail directories under one folder,
no chroot, listening on a loopback address only, logging to a file.
Started with ``postfix -c DIR start`` (needs root), stopped with ``stop``.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def available() -> bool:
    return shutil.which("postfix") is not None and os.geteuid() == 0


class Postfix:
    def __init__(self, directory: Path, host: str, port: int, *, domain: str = "postfix.test",
                 mailboxes: tuple[str, ...] = ("alice",), transports: dict[str, str] | None = None,
                 tls_cert: tuple[Path, Path] | None = None, smtp_tls: str = "may",
                 extra: dict[str, str] | None = None) -> None:
        # Postfix's daemons run as the postfix user, which must reach every directory: pytest's temporary
        # folders are private to root, so the instance lives in its own world-traversable folder.
        self.dir = Path(tempfile.mkdtemp(prefix=f"mailgate-postfix-{directory.name}-"))
        self.dir.chmod(0o755)
        self.host, self.port, self.domain = host, port, domain
        self.mail_dir = self.dir / "mail"
        self.log = self.dir / "maillog"
        self.config = self.dir / "etc"
        uid, gid = pwd.getpwnam("postfix").pw_uid, grp.getgrnam("postfix").gr_gid
        for d in (self.config, self.dir / "queue", self.dir / "data", self.mail_dir):
            d.mkdir(parents=True, exist_ok=True)
        os.chown(self.dir / "data", uid, gid)
        os.chown(self.mail_dir, uid, gid)
        boxes = " ".join(f"{m}@{domain}={m}/" for m in mailboxes)
        settings = {
            "compatibility_level": "3.6", "queue_directory": str(self.dir / "queue"),
            "data_directory": str(self.dir / "data"), "mail_owner": "postfix", "setgid_group": "postdrop",
            "command_directory": "/usr/sbin", "daemon_directory": "/usr/lib/postfix/sbin",
            "meta_directory": "/etc/postfix", "shlib_directory": "/usr/lib/postfix",
            "inet_interfaces": "127.0.0.1", "inet_protocols": "ipv4", "myhostname": f"mx.{domain}", "mydomain": domain,
            "mydestination": "", "mynetworks": "127.0.0.0/8", "relay_domains": "",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "maillog_file": str(self.log), "maillog_file_prefixes": str(self.dir),
            "alias_maps": "", "alias_database": "", "local_recipient_maps": "", "biff": "no",
            "virtual_mailbox_domains": domain, "virtual_mailbox_base": str(self.mail_dir),
            "virtual_mailbox_maps": f"inline:{{ {boxes} }}", "virtual_uid_maps": f"static:{uid}",
            "virtual_gid_maps": f"static:{gid}", "virtual_minimum_uid": "100",
            "smtp_tls_security_level": smtp_tls, "smtp_tls_loglevel": "1", "smtpd_tls_loglevel": "1",
            "disable_dns_lookups": "yes", "smtp_host_lookup": "native", "smtpd_banner": "$myhostname ESMTP Postfix",
            "minimal_backoff_time": "2s", "maximal_backoff_time": "4s", "queue_run_delay": "2s",
        }
        if transports:
            settings["transport_maps"] = "inline:{ " + " ".join(f"{k}={v}" for k, v in transports.items()) + " }"
        if tls_cert:
            settings.update({"smtpd_tls_cert_file": str(tls_cert[0]), "smtpd_tls_key_file": str(tls_cert[1]),
                             "smtpd_tls_security_level": "may"})
        settings.update(extra or {})
        (self.config / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        (self.config / "master.cf").write_text(MASTER_CF.format(listen=f"{host}:{port}"))

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["postfix", "-c", str(self.config), *args], capture_output=True, text=True, timeout=60)

    def start(self) -> "Postfix":
        result = self._postfix("start")
        if result.returncode != 0:
            # Postfix reports configuration errors on a terminal or to syslog only: rerun under script(1).
            check = subprocess.run(["script", "-qc", f"postfix -c {self.config} check", "/dev/null"],
                                   capture_output=True, text=True, timeout=60)
            raise RuntimeError(f"postfix start failed: {result.stdout}{result.stderr}{check.stdout}{self.log_text()}")
        deadline = time.monotonic() + 20
        import socket

        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"postfix did not listen on {self.host}:{self.port}\n{self.log_text()}")

    def stop(self, *, keep: bool = False) -> None:
        self._postfix("stop")
        time.sleep(0.2)
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def mailbox(self, user: str) -> list[bytes]:
        new = self.mail_dir / user / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []

    def queue_empty(self) -> bool:
        out = subprocess.run(["postqueue", "-c", str(self.config), "-p"], capture_output=True, text=True, timeout=30)
        return "Mail queue is empty" in out.stdout

    def flush(self) -> None:
        subprocess.run(["postqueue", "-c", str(self.config), "-f"], capture_output=True, text=True, timeout=30)

"""A real, rootless Dovecot IMAP server per test (research/reliability.md §5), and RabbitMQ helpers.

Dovecot runs from the distribution's packages on a free loopback port, as an unprivileged user
(`dvtest`, created when we are root), with a passwd-file login and maildirs in a temp folder.
Without the Dovecot binaries the tests skip, or fail under CREWGUARD_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from imap_tools import MailBoxUnencrypted

from tests.conftest import REQUIRE_SERVICES, need_service

#: The unprivileged account Dovecot runs as when the tests run as root.
DOVECOT_USER = "dvtest"
#: The IMAP account the tests log in with.
IMAP_USER = "crew"
#: Its password, handed to the intake through IMAP_PASSWORD_ENV.
IMAP_PASSWORD = "s3cret-imap-pw"
IMAP_PASSWORD_ENV = "CREWGUARD_TEST_IMAP_PASSWORD"
#: How long Dovecot gets to open (or close) its port.
START_TIMEOUT_S = 15.0
RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"

CONFIG = """\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
listen = 127.0.0.1
protocols = imap
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = {user}
default_internal_group = {group}
default_login_user = {user}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid={user} gid={group} home={root}/home/%u
}}
mail_location = maildir:{root}/home/%u/Maildir
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
service stats {{
  chroot =
}}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _service_user() -> str:
    """dvtest when we are root (created if missing), else ourselves."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    try:
        pwd.getpwnam(DOVECOT_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", DOVECOT_USER],
            check=True,
            capture_output=True,
        )
    return DOVECOT_USER


class Dovecot:
    """One rootless Dovecot instance; start()/stop() keep its mail (UIDVALIDITY survives)."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.user = _service_user()
        self.group = _group_name(self.user)
        self.root = Path(tempfile.mkdtemp(prefix="crewguard-dovecot-"))
        self.port = _free_port()
        self.config = self.root / "dovecot.conf"
        self.config.write_text(
            CONFIG.format(root=self.root, user=self.user, group=self.group, port=self.port)
        )
        (self.root / "passwd").write_text(f"{IMAP_USER}:{{PLAIN}}{IMAP_PASSWORD}\n")
        os.chmod(self.root, 0o755)
        if os.geteuid() == 0:
            shutil.chown(self.root, self.user, self.group)
            for path in self.root.iterdir():
                shutil.chown(path, self.user, self.group)

    def _as_user(self, *args: str) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", self.user, "--", *args]
        return list(args)

    def start(self) -> None:
        # The master daemonizes: hand it no pipes, or run() would wait for them to close.
        subprocess.run(
            self._as_user(self.binary, "-c", str(self.config)),
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _port_open(self.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"Dovecot did not open port {self.port}: {self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        subprocess.run(
            self._as_user(self.binary, "-c", str(self.config), "stop"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while _port_open(self.port) or (self.root / "run" / "master.pid").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"Dovecot did not stop: {self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else "(no log)"

    def client(self) -> MailBoxUnencrypted:
        """A logged-in test client (the caller logs out)."""
        return MailBoxUnencrypted("127.0.0.1", self.port, timeout=10).login(
            IMAP_USER, IMAP_PASSWORD, initial_folder=None
        )

    def append(self, raws: list[bytes], folder: str = "INBOX") -> None:
        """Deliver messages with IMAP APPEND (creating the folder when missing)."""
        with self.client() as box:
            if not box.folder.exists(folder):
                box.folder.create(folder)
            for raw in raws:
                box.append(raw, folder)

    def flags(self, folder: str = "INBOX") -> dict[int, tuple[str, ...]]:
        """UID -> flags of every message in `folder`."""
        with self.client() as box:
            box.folder.set(folder)
            return {int(m.uid): m.flags for m in box.fetch(headers_only=True, mark_seen=False) if m.uid}

    def uidvalidity(self, folder: str = "INBOX") -> int:
        with self.client() as box:
            return int(box.folder.status(folder, ["UIDVALIDITY"])["UIDVALIDITY"])

    def cleanup(self) -> None:
        if (self.root / "run" / "master.pid").exists():
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _group_name(user: str) -> str:
    import grp

    return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name


def dovecot_binary() -> str | None:
    return shutil.which("dovecot") or next(
        (p for p in ("/usr/sbin/dovecot", "/usr/local/sbin/dovecot") if os.access(p, os.X_OK)), None
    )


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    """A started Dovecot on a free loopback port, with an empty mailbox."""
    binary = dovecot_binary()
    if binary is None:
        message = "Dovecot is not installed (apt-get install dovecot-imapd; .ci/services.sh does it)"
        if REQUIRE_SERVICES:
            pytest.fail(message + " (CREWGUARD_REQUIRE_SERVICES=1)")
        pytest.skip(message)
    server = Dovecot(binary)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def imap_env(monkeypatch: pytest.MonkeyPatch) -> str:
    """The intake reads the IMAP password from this variable."""
    monkeypatch.setenv(IMAP_PASSWORD_ENV, IMAP_PASSWORD)
    return IMAP_PASSWORD_ENV


@pytest.fixture
def rabbit_queue() -> Iterator[str]:
    """A unique queue name on the local RabbitMQ; the queue, `<queue>.dead` and its DLX are deleted after."""
    need_service("RabbitMQ", "127.0.0.1", 5672)
    import pika

    queue = f"crewguard.test.{uuid.uuid4().hex[:10]}"
    yield queue
    connection = pika.BlockingConnection(pika.URLParameters(RABBIT_URL))
    try:
        channel = connection.channel()
        for name in (queue, queue + ".dead"):
            channel.queue_delete(name)
        channel.exchange_delete(queue + ".dlx")
    finally:
        connection.close()

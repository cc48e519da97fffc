"""Who may talk to the daemon: the per-user secrets under ``HEALDUST_HOME/keys``.

Standard library + pyzmq only (the plugins bundle this module).

- **Loopback TCP** (the default endpoint): ZeroMQ PLAIN with a per-user token, ``local.token``.
  Loopback traffic cannot be read by another unprivileged user, so the token only has to
  prove that the client can read its owner's files; nothing is encrypted and a 24 MP image
  costs no more to send than before.
- **Any other interface**: ZeroMQ CURVE. ``server.key``/``server.key_secret`` are the daemon's
  pair; ``clients/*.key`` are the public keys allowed in. A client needs ``server.key`` and its
  own ``client.key_secret`` in *its* ``HEALDUST_HOME/keys``. ``healdust keys add-client NAME``
  makes such a folder for another machine.
- **ipc://**: the socket file is made readable and writable by its owner alone.

Every file is created with mode 0600 in a 0700 folder; the daemon puts modes back if they
were widened. The folder is built in a temporary sibling and renamed into place, so two
daemons starting at once end up with the same keys.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

PLAIN_USER = b"healdust"
TOKEN_FILE = "local.token"
SERVER_PUBLIC = "server.key"
SERVER_SECRET = "server.key_secret"
CLIENT_PUBLIC = "client.key"
CLIENT_SECRET = "client.key_secret"
CLIENTS_DIR = "clients"


class KeysError(RuntimeError):
    """Keys that are missing, unreadable or malformed; the message says what to do."""


def default_home() -> Path:
    """``HEALDUST_HOME``, else the platform's user data folder (as platformdirs names it)."""
    env = os.environ.get("HEALDUST_HOME")
    if env:
        return Path(env)
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "healdust"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "healdust"
    xdg = os.environ.get("XDG_DATA_HOME", "").strip()
    return Path(xdg if xdg else Path.home() / ".local" / "share") / "healdust"


def keys_dir(home: str | Path | None = None) -> Path:
    return Path(home if home is not None else default_home()) / "keys"


def endpoint_kind(endpoint: str) -> str:
    """``ipc``, ``loopback`` (TCP on a loopback address) or ``network``."""
    parts = urlsplit(endpoint)
    if parts.scheme in ("ipc", "inproc"):
        return "ipc"
    host = (parts.hostname or "").strip("[]")
    if host == "localhost":
        return "loopback"
    try:
        return "loopback" if ipaddress.ip_address(host).is_loopback else "network"
    except ValueError:
        return "network"


# -- files ------------------------------------------------------------------------------

def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _cert_text(public: bytes, secret: bytes | None = None) -> str:
    # the ZPL certificate format that zmq.auth reads
    lines = ["#   healdust key: keep the .key_secret file private", "metadata", "curve",
             f'    public-key = "{public.decode("ascii")}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    return "\n".join(lines) + "\n"


def write_cert_pair(folder: Path, stem: str, public: bytes, secret: bytes) -> None:
    _write_private(folder / f"{stem}.key", _cert_text(public))
    _write_private(folder / f"{stem}.key_secret", _cert_text(public, secret))


def _read_cert(path: Path) -> tuple[bytes, bytes | None]:
    import zmq.auth

    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise KeysError(f"cannot read the key file {path} ({e})") from None
    if not public or len(public) != 40:
        raise KeysError(f"the key file {path} holds no valid CURVE public key")
    return public, secret


def _read_token(path: Path) -> bytes:
    try:
        token = path.read_bytes().strip()
    except OSError as e:
        raise KeysError(f"cannot read the access token {path} ({e})") from None
    if len(token) < 32:
        raise KeysError(f"the access token {path} is malformed; delete the keys folder and restart the daemon")
    return token


def _fix_modes(folder: Path) -> list[str]:
    """Put 0700/0600 back where they were widened; returns what was fixed."""
    fixed = []
    if os.name != "posix":
        return fixed
    for path in [folder, *folder.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        want = 0o700 if path.is_dir() else 0o600
        if path.is_symlink():
            continue
        if mode & 0o077:
            os.chmod(path, want)
            fixed.append(str(path))
    return fixed


@dataclass(frozen=True)
class ServerKeys:
    token: bytes
    public: bytes
    secret: bytes
    clients: Path  # folder of allowed client public keys
    fixed_modes: tuple[str, ...] = ()


def ensure_keys(home: str | Path | None = None, create: bool = True) -> ServerKeys:
    """The daemon's keys, created on first use (``create``); raises KeysError when missing."""
    folder = keys_dir(home)
    if not (folder / SERVER_SECRET).exists():
        if not create:
            raise KeysError(f"no keys in {folder}")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".keys-", dir=folder.parent))
        try:
            _build(tmp)
            try:
                os.rename(tmp, folder)  # atomic; fails when another daemon got there first
            except OSError:
                if not (folder / SERVER_SECRET).exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    fixed = tuple(_fix_modes(folder))
    public, secret = _read_cert(folder / SERVER_SECRET)
    if not secret:
        raise KeysError(f"the key file {folder / SERVER_SECRET} holds no secret key")
    clients = folder / CLIENTS_DIR
    clients.mkdir(mode=0o700, exist_ok=True)
    return ServerKeys(_read_token(folder / TOKEN_FILE), public, secret, clients, fixed)


def _build(folder: Path) -> None:
    import zmq

    os.chmod(folder, 0o700)
    _write_private(folder / TOKEN_FILE, secrets.token_hex(32) + "\n")
    write_cert_pair(folder, "server", *zmq.curve_keypair())
    cpub, csec = zmq.curve_keypair()
    write_cert_pair(folder, "client", cpub, csec)
    (folder / CLIENTS_DIR).mkdir(mode=0o700)
    _write_private(folder / CLIENTS_DIR / "local.key", _cert_text(cpub))


def add_client(name: str, out: Path, home: str | Path | None = None) -> Path:
    """A new CURVE client pair allowed into this daemon; writes a keys folder for the client.

    ``out`` becomes a folder holding ``server.key`` and ``client.key``/``client.key_secret``:
    copy it to the other machine as ``HEALDUST_HOME/keys``. Restart the daemon to let it in.
    """
    import zmq

    keys = ensure_keys(home)
    target = keys.clients / f"{name}.key"
    if target.exists():
        raise KeysError(f"a client named {name!r} is already allowed ({target})")
    out.mkdir(mode=0o700, parents=True, exist_ok=False)
    public, secret = zmq.curve_keypair()
    write_cert_pair(out, "client", public, secret)
    _write_private(out / SERVER_PUBLIC, _cert_text(keys.public))
    _write_private(target, _cert_text(public))
    return target


# -- the client side ----------------------------------------------------------------------

def client_security(endpoint: str, home: str | Path | None = None) -> dict | None:
    """Socket options a client needs for ``endpoint``: PLAIN token, CURVE keys, or None (ipc).

    Raises KeysError when the keys the endpoint needs are not in ``home``.
    """
    kind = endpoint_kind(endpoint)
    if kind == "ipc":
        return None
    folder = keys_dir(home)
    if kind == "loopback":
        path = folder / TOKEN_FILE
        if not path.exists():
            raise KeysError(f"no access token at {path}: the daemon creates it on its first start "
                            f"(with the same HEALDUST_HOME)")
        return {"plain": (PLAIN_USER, _read_token(path))}
    server = folder / SERVER_PUBLIC
    mine = folder / CLIENT_SECRET
    if not server.exists() or not mine.exists():
        raise KeysError(f"connecting to {endpoint} needs CURVE keys: {server} and {mine} "
                        f"(make them on the daemon's machine with `healdust keys add-client NAME`)")
    server_public, _ = _read_cert(server)
    public, secret = _read_cert(mine)
    if not secret:
        raise KeysError(f"the key file {mine} holds no secret key")
    return {"curve": (server_public, public, secret)}


def apply_client_security(sock, security: dict | None) -> None:
    if not security:
        return
    if "plain" in security:
        user, password = security["plain"]
        sock.plain_username = user
        sock.plain_password = password
    if "curve" in security:
        server_public, public, secret = security["curve"]
        sock.curve_serverkey = server_public
        sock.curve_publickey = public
        sock.curve_secretkey = secret

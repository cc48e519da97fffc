"""Who may connect: the owner's token on loopback, CURVE keys elsewhere, private ipc sockets.

Every test here runs a real daemon process and real ZeroMQ handshakes; the other-user test
runs a real process as ``nobody`` when the tests run as root.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
import threading

import msgpack
import pytest
import zmq

from healdust.protocol import keys
from healdust.protocol.client import Client, DaemonUnavailable, RemoteError

from .conftest import DaemonProcess, free_port, said_ready


def _modes(folder):
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


def test_keys_are_created_private_and_put_back_when_widened(tmp_path):
    k = keys.ensure_keys(tmp_path)
    folder = keys.keys_dir(tmp_path)
    modes = _modes(folder)
    assert modes["keys"] == 0o700 and modes["clients"] == 0o700
    assert all(m == 0o600 for n, m in modes.items() if n not in ("keys", "clients")), modes
    assert len(k.token) == 64 and len(k.public) == 40 and len(k.secret) == 40
    os.chmod(folder / keys.TOKEN_FILE, 0o644)
    os.chmod(folder, 0o755)
    again = keys.ensure_keys(tmp_path)
    assert again.token == k.token and again.public == k.public  # the same keys, not new ones
    assert set(again.fixed_modes) == {str(folder), str(folder / keys.TOKEN_FILE)}
    assert _modes(folder) == modes


def test_two_daemons_starting_at_once_share_one_set_of_keys(tmp_path):
    got = []
    threads = [threading.Thread(target=lambda: got.append(keys.ensure_keys(tmp_path))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 6 and len({(k.token, k.public) for k in got}) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["keys"]  # no temporary folders left


def test_platform_default_home_matches_the_daemon(monkeypatch, tmp_path):
    """The plugins find the token with keys.default_home (no platformdirs); the daemon with store."""
    from healdust.store import healdust_home

    monkeypatch.delenv("HEALDUST_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert keys.default_home() == healdust_home()
    monkeypatch.delenv("XDG_DATA_HOME")
    assert keys.default_home() == healdust_home()
    monkeypatch.setenv("HEALDUST_HOME", str(tmp_path / "h"))
    assert keys.default_home() == healdust_home() == tmp_path / "h"


def _raw_hello(endpoint: str, security=None, wait_ms: int = 1500):
    """A bare DEALER's hello; returns the reply header or None when nothing came back."""
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    keys.apply_client_security(s, security)
    s.connect(endpoint)
    try:
        s.send(msgpack.packb({"v": 1, "type": "hello", "id": "probe"}))
        return msgpack.unpackb(s.recv_multipart()[0]) if s.poll(wait_ms) else None
    finally:
        s.close(0)


def test_loopback_answers_only_the_owners_token(daemon, tmp_path):
    with Client(daemon.endpoint) as c:  # HEALDUST_HOME holds the token: the owner
        assert c.hello()["protocol"] == 1
    assert _raw_hello(daemon.endpoint, keys.client_security(daemon.endpoint))["type"] == "result"
    # no token, a wrong token, CURVE instead of PLAIN: nothing at all comes back
    assert _raw_hello(daemon.endpoint) is None
    assert _raw_hello(daemon.endpoint, {"plain": (b"healdust", b"0" * 64)}) is None
    pub, sec = zmq.curve_keypair()
    assert _raw_hello(daemon.endpoint, {"curve": (pub, pub, sec)}) is None
    # our client says why, naming where it looked
    with Client(daemon.endpoint, home=tmp_path / "elsewhere") as c, pytest.raises(RemoteError) as e:
        c.hello(timeout=3)
    assert e.value.code == "denied" and str(tmp_path / "elsewhere") in e.value.message
    with Client(daemon.endpoint) as c:  # and the daemon still serves its owner
        assert c.hello()["protocol"] == 1


OTHER_USER = textwrap.dedent("""
    import sys, msgpack, zmq
    token_file, endpoint = sys.argv[1], sys.argv[2]
    try:
        open(token_file).read()
        print("read the token")
    except PermissionError:
        print("token unreadable")
    s = zmq.Context().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    s.send(msgpack.packb({"v": 1, "type": "hello", "id": "x"}))
    print("answered" if s.poll(1500) else "no answer")
""")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to become another user")
def test_another_local_user_gets_nothing(daemon):
    token = keys.keys_dir(daemon.home) / keys.TOKEN_FILE
    as_nobody = {"user": 65534, "group": 65534, "capture_output": True, "text": True, "timeout": 60,
                 "env": {"PATH": "/usr/bin:/bin"}}
    r = subprocess.run(["cat", str(token)], **as_nobody)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    # the whole attempt, with a Python that user can run (the system one, when it has pyzmq)
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None or subprocess.run([python, "-c", "import zmq, msgpack"], **as_nobody).returncode != 0:
        pytest.skip("no Python with pyzmq that user nobody can run; the token alone was checked")
    r = subprocess.run([python, "-c", OTHER_USER, str(token), daemon.endpoint], **as_nobody)
    assert r.stdout.split("\n")[:2] == ["token unreadable", "no answer"], (r.stdout, r.stderr)


def test_network_endpoint_refuses_to_start_without_keys_and_then_lets_in_only_allowed_clients(tmp_path):
    port = free_port()
    endpoint = f"tcp://0.0.0.0:{port}"
    server_home = tmp_path / "server"
    env = dict(os.environ, HEALDUST_HOME=str(server_home))
    r = subprocess.run([sys.executable, "-m", "healdust", "serve", "--endpoint", endpoint], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "without CURVE keys" in r.stderr and "keys add-client" in r.stderr
    assert not (server_home / "keys").exists()

    laptop = tmp_path / "laptop"
    r = subprocess.run([sys.executable, "-m", "healdust", "keys", "add-client", "laptop", "--out",
                        str(laptop / "keys")], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (laptop / "keys").iterdir()) == ["client.key", "client.key_secret", "server.key"]
    assert stat.S_IMODE((laptop / "keys" / "client.key_secret").stat().st_mode) == 0o600
    r = subprocess.run([sys.executable, "-m", "healdust", "keys"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "laptop" in r.stdout and "local" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "healdust", "keys", "add-client", "laptop", "--out",
                        str(tmp_path / "again")], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "already allowed" in r.stderr

    d = DaemonProcess(server_home, endpoint=endpoint)
    try:
        # the client machine's view: its HEALDUST_HOME holds the folder add-client wrote
        remote = keys.client_security(endpoint, laptop)
        assert "curve" in remote
        local_addr = f"tcp://127.0.0.1:{port}"  # same socket; the client speaks CURVE as over a network
        with Client(local_addr, security=remote) as c:
            assert c.hello()["protocol"] == 1
        # a key pair nobody allowed, and a client that does not know the server's key
        stranger = shutil.copytree(laptop, tmp_path / "stranger")
        pub, sec = zmq.curve_keypair()
        (stranger / "keys" / "client.key_secret").unlink()
        keys.write_cert_pair(stranger / "keys", "other", pub, sec)
        (stranger / "keys" / "other.key_secret").rename(stranger / "keys" / "client.key_secret")
        assert _raw_hello(local_addr, keys.client_security(endpoint, stranger)) is None
        spub, _ = zmq.curve_keypair()
        assert _raw_hello(local_addr, {"curve": (spub, *remote["curve"][1:])}) is None
        assert _raw_hello(local_addr, keys.client_security(local_addr)) is None  # the loopback token
        with Client(local_addr, security=remote) as c:
            assert c.hello()["protocol"] == 1
    finally:
        d.stop()


def test_ipc_socket_is_for_its_owner_only(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    endpoint = f"ipc://{run}/healdust.sock"
    d = DaemonProcess(tmp_path / "home", endpoint=endpoint)
    try:
        assert stat.S_IMODE((run / "healdust.sock").stat().st_mode) == 0o600
        with Client(endpoint, home=tmp_path / "no-keys-needed") as c:
            assert c.hello()["protocol"] == 1
    finally:
        d.stop()


def test_a_client_without_a_daemon_still_times_out_cleanly(tmp_path):
    with Client(f"tcp://127.0.0.1:{free_port()}") as c, pytest.raises(DaemonUnavailable):
        c.hello(timeout=1)


REFUSED_AGAIN_AND_AGAIN = textwrap.dedent("""
    import socket, sys, threading, time, zmq
    from healdust.protocol.client import Client
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    def refuse():  # a peer that hangs up on every connection, as a daemon refusing a token does
        while True:
            server.accept()[0].close()
    threading.Thread(target=refuse, daemon=True).start()
    ctx = zmq.Context()
    ctx.setsockopt(zmq.RECONNECT_IVL, 1)  # years of refusals in a few seconds
    c = Client(f"tcp://127.0.0.1:{server.getsockname()[1]}", context=ctx, security=None)
    deadline = time.monotonic() + 20
    while c._monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(float(sys.argv[1]))  # nobody reads the client's connection events meanwhile
    c.close()
    print("closed", flush=True)
""")


def test_a_client_refused_for_minutes_unread_still_closes():
    """libzmq stops a socket's I/O when its monitor's queue is full; closing must not hang."""
    r = subprocess.run([sys.executable, "-c", REFUSED_AGAIN_AND_AGAIN, "5"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "closed", (r.stdout, r.stderr[-2000:])


def test_a_client_made_before_the_daemon_created_its_keys_picks_them_up(tmp_path):
    """The plugins make their client, then start a daemon, which creates the token."""
    home = tmp_path / "fresh"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Client(endpoint, home=home, timeout=5) as c:
        with pytest.raises(DaemonUnavailable, match="no access token"):
            c.hello(timeout=0.5)
        env = dict(os.environ, HEALDUST_HOME=str(home))
        p = subprocess.Popen([sys.executable, "-m", "healdust", "serve", "--endpoint", endpoint, "--device", "cpu"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert said_ready(p)
            hello = None
            for _ in range(20):  # the first hello may go out on the keyless connection
                try:
                    hello = c.hello(timeout=1)
                    break
                except DaemonUnavailable:
                    continue
            assert hello and hello["protocol"] == 1
        finally:
            p.terminate()
            p.wait(30)

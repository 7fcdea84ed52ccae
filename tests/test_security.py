"""CURVE between stages (beamkin/security.py): a peer without the right key can neither inject
nor receive, a peer with it can, and each refusal is logged and counted. Real sockets on
loopback (CURVE works on tcp://127.0.0.1), set up by the functions the stages use, and the real
inference stage as a process."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from beamkin import config as configuration
from beamkin import protocol, security, sockets
from beamkin.loopback import LoopbackPorts, beamkin_process

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def default_policy():
    """Every test starts and ends with the default policy (loopback, plaintext)."""
    security.configure(None)
    yield
    security.configure(None)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """Key pairs for a server stage, a client stage and an intruder; the clients folder holds
    only the client's public key."""
    folder = tmp_path / "keys"
    found = {}
    for name in ("server", "client", "intruder"):
        found[name], found[f"{name}_secret"] = security.create_keys(folder, name)
    clients = tmp_path / "clients"
    clients.mkdir()
    shutil.copy(found["client"], clients / "client.key")
    found["clients"] = clients
    return found


def curve_config(ports: LoopbackPorts, keys: dict[str, Path], who: str, names: tuple[str, ...]) -> dict:
    """The configuration of a stage holding ``who``'s key pair, with CURVE on ``names``."""
    config = configuration.defaults()
    for name in security.ENDPOINT_NAMES:
        config["endpoints"][name] = f"tcp://127.0.0.1:{getattr(ports, name)}"
    config["security"]["secret_key"] = str(keys[f"{who}_secret"])
    for name in names:
        config["security"][name] = {"server_key": str(keys["server"]), "clients": str(keys["clients"])}
    return config


def plaintext(context: zmq.Context, kind: int, endpoint: str) -> zmq.Socket:
    socket = context.socket(kind)
    socket.setsockopt(zmq.LINGER, 0)
    if kind == zmq.SUB:
        socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.connect(endpoint)
    return socket


def keyed(context: zmq.Context, kind: int, endpoint: str, config: dict) -> zmq.Socket:
    """A client socket set up by beamkin.security under ``config``'s keys."""
    security.configure(config)
    socket = context.socket(kind)
    socket.setsockopt(zmq.LINGER, 0)
    if kind == zmq.SUB:
        socket.setsockopt(zmq.SUBSCRIBE, b"")
    assert security.secure_client(socket, endpoint)
    socket.connect(endpoint)
    return socket


def wait_for(condition, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def received(socket: zmq.Socket, wait_ms: int) -> list[list[bytes]]:
    messages = []
    while socket.poll(wait_ms):
        messages.append(socket.recv_multipart())
        wait_ms = 50
    return messages


def test_keys_command_writes_a_pair_the_configuration_loads(tmp_path):
    folder = tmp_path / "keys"
    done = subprocess.run([sys.executable, "-m", "beamkin", "keys", "--dir", str(folder), "streamer", "analysis"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert f"public key {folder / 'streamer.key'}" in done.stdout
    assert f"secret key {folder / 'analysis.key_secret'}" in done.stdout
    assert oct((folder / "streamer.key_secret").stat().st_mode & 0o777) == "0o600"
    public, secret = zmq.auth.load_certificate(folder / "streamer.key_secret")
    assert zmq.auth.load_certificate(folder / "streamer.key") == (public, None) and len(secret) == 40
    again = subprocess.run([sys.executable, "-m", "beamkin", "keys", "--dir", str(folder), "streamer"],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert again.returncode == 2 and "exists already" in again.stderr  # a key in use is never replaced silently
    assert zmq.auth.load_certificate(folder / "streamer.key_secret") == (public, secret)


def test_plaintext_bind_beyond_loopback_is_refused_unless_allowed(keys):
    context = zmq.Context()
    socket = context.socket(zmq.PULL)
    try:
        with pytest.raises(configuration.ConfigError, match="beamkin keys --dir KEYS NAME"):
            security.secure_server(socket, "tcp://0.0.0.0:5553", "reduced")
        with pytest.raises(configuration.ConfigError, match="allow_plaintext_remote"):
            security.check_binds({**configuration.defaults(), "endpoints": {"reduced": "tcp://0.0.0.0:5553"}})
        assert security.secure_server(socket, "tcp://127.0.0.1:5553") is False  # loopback: plaintext is fine
        config = configuration.defaults()
        config["security"]["allow_plaintext_remote"] = True
        security.configure(config)
        assert security.secure_server(socket, "tcp://0.0.0.0:5553", "reduced") is False
    finally:
        socket.close(0)
        context.term()


def test_a_server_key_that_is_not_the_stage_s_own_is_refused(keys):
    ports = LoopbackPorts.free()
    security.configure(curve_config(ports, keys, "client", ("reduced",)))  # client's secret, server's public key
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    try:
        with pytest.raises(configuration.ConfigError, match="is not the pair of"):
            sockets.bind(pull, f"tcp://127.0.0.1:{ports.reduced}")
    finally:
        context.term()
    config = curve_config(ports, keys, "client", ("reduced",))
    config["security"]["reduced"]["clients"] = ""
    with pytest.raises(configuration.ConfigError, match="security.reduced.clients"):
        security.configure(config)
    config["security"]["reduced"]["clients"] = str(keys["clients"])
    config["security"]["secret_key"] = str(keys["client"])  # the public file where the secret one belongs
    with pytest.raises(configuration.ConfigError, match="holds no secret key"):
        security.configure(config)


def test_streamer_router_and_publishers_serve_only_the_allowed_key(keys, caplog):
    """The streamer's sockets as the streamer sets them up (sockets.bind of the ROUTER,
    BudgetedPublisher for raw, publisher for record) with CURVE: a rogue DEALER without the key,
    or with a key not allowed, never reaches the ROUTER (so never gets a frame), rogue
    subscribers get nothing, and the keyed reducer and recorder get everything."""
    caplog.set_level(logging.INFO, logger="beamkin.security")
    ports = LoopbackPorts.free()
    names = ("frames", "raw", "record")
    server_config = curve_config(ports, keys, "server", names)
    security.configure(server_config)
    frames, raw_address, record_address = (server_config["endpoints"][n] for n in names)
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    sockets.bind(router, frames)
    raw = sockets.BudgetedPublisher(context, raw_address, budget_bytes=1 << 20, message_bytes=1024)
    record = sockets.publisher(context, record_address, hwm=64)

    client, intruder = (curve_config(ports, keys, who, names) for who in ("client", "intruder"))
    rogues = [plaintext(context, zmq.DEALER, frames), keyed(context, zmq.DEALER, frames, intruder)]
    rogue_subs = [plaintext(context, zmq.SUB, raw_address), keyed(context, zmq.SUB, raw_address, intruder),
                  plaintext(context, zmq.SUB, record_address), keyed(context, zmq.SUB, record_address, intruder)]
    worker = keyed(context, zmq.DEALER, frames, client)
    viewer = keyed(context, zmq.SUB, raw_address, client)
    recorder = keyed(context, zmq.SUB, record_address, client)
    try:
        for rogue in rogues:
            rogue.send_multipart([b"ready", b'{"worker": "rogue", "capacity": 100}'])
        worker.send_multipart([b"ready", b'{"worker": "w1", "capacity": 2}'])
        assert router.poll(20_000)
        identity, *message = router.recv_multipart()
        assert message == [b"ready", b'{"worker": "w1", "capacity": 2}']
        router.send_multipart([identity, b"frame", b"0"])
        assert worker.poll(20_000) and worker.recv_multipart() == [b"frame", b"0"]
        # each rogue: one refusal on the ROUTER; the raw and record publishers refuse two each
        for endpoint in (frames, raw_address, record_address):
            assert wait_for(lambda: security.refused_count(endpoint) >= 2), security.refusals()
        assert security.refused_count("frames") == security.refused_count(frames)  # by name too
        # the keyed subscribers are connected (XPUB shows the subscription); then publish
        assert wait_for(lambda: record.poll(0, zmq.POLLIN))
        start = series("s", 1, 0.0)[0]
        for _ in range(50):  # the raw PUB's subscription may take a moment to arrive; it never waits
            raw.publish(start)
            if viewer.poll(100):
                break
        assert protocol.decode(viewer.recv_multipart()).type == "start"
        assert sockets.publish(record, start)
        assert recorder.poll(20_000) and protocol.decode(recorder.recv_multipart()).type == "start"
        assert received(router, 300) == []  # nothing from the rogues reached the ROUTER
        for rogue in rogues:
            assert received(rogue, 0) == []
        for sub in rogue_subs:
            assert received(sub, 0) == []
    finally:
        for socket in rogues + rogue_subs + [worker, viewer, recorder, router, record]:
            socket.close(0)
        raw.close()
        context.term()
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused a peer on")]
    assert any(frames in m and "from 127.0.0.1" in m and "is not allowed" in m for m in refusals), refusals
    assert any(frames in m and "a plaintext peer" in m for m in refusals), refusals
    assert len(refusals) == sum(security.refusals().values())


@pytest.fixture
def curve_inference(keys):
    """The real inference stage (`beamkin infer`) with CURVE on its PULL and its PUB."""
    ports = LoopbackPorts.free()
    stage = beamkin_process(
        "infer", f"--endpoints.reduced=tcp://127.0.0.1:{ports.reduced}",
        f"--endpoints.results=tcp://127.0.0.1:{ports.results}",
        "--inference.particles", "256", "--inference.models", "F1", "--inference.null_prior", "0",
        "--security.secret_key", str(keys["server_secret"]),
        "--security.reduced.server_key", str(keys["server"]), "--security.reduced.clients", str(keys["clients"]),
        "--security.results.server_key", str(keys["server"]), "--security.results.clients", str(keys["clients"]),
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in stage.stdout:
            lines.append(line)
            if "BEAMKIN-READY" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    assert ready.wait(180), "".join(lines)
    yield ports, stage, lines
    if stage.poll() is None:
        os.killpg(stage.pid, signal.SIGINT)
        try:
            stage.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(stage.pid, signal.SIGKILL)


def series(series_id: str, n_frames: int, alpha: float) -> list[protocol.Message]:
    start = protocol.make("start", series_id=series_id, kind="profile", source="test", detector={}, geometry={},
                          frame_time_s=0.5, exposure_s=0.4, n_frames=n_frames, gas_time_s=0.0)
    fractions = [protocol.make("fraction", series_id=series_id, frame_index=j, time_s=0.5 * j + 0.2, exposure_s=0.4,
                               alpha=alpha, sigma_alpha=0.02, status="ok", reason=None) for j in range(n_frames)]
    return [start, *fractions, protocol.make("end", series_id=series_id, n_frames=n_frames, reason="completed")]


def test_inference_takes_fractions_only_from_keyed_peers_and_publishes_only_to_them(curve_inference, keys):
    ports, stage, lines = curve_inference
    reduced, results = f"tcp://127.0.0.1:{ports.reduced}", f"tcp://127.0.0.1:{ports.results}"
    client, intruder = (curve_config(ports, keys, who, ("reduced", "results")) for who in ("client", "intruder"))
    context = zmq.Context()
    listener = keyed(context, zmq.SUB, results, client)
    eavesdroppers = [plaintext(context, zmq.SUB, results), keyed(context, zmq.SUB, results, intruder)]
    forgers = [plaintext(context, zmq.PUSH, reduced), keyed(context, zmq.PUSH, reduced, intruder)]
    security.configure(client)
    pusher = sockets.pusher(context, reduced)  # as a reducer worker or the streamer connects
    pusher.setsockopt(zmq.LINGER, 0)
    try:
        for forger in forgers:  # a forged series: the PUSH queues it, no connection ever takes it
            for message in series("forged", 4, 1.0):
                protocol.send(forger, message, flags=zmq.NOBLOCK)
        time.sleep(1.0)  # the listener's subscription settles before the real series starts
        for message in series("real", 6, 0.0):
            protocol.send(pusher, message)
        messages = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not any(m.type == "result" for m in messages):
            if listener.poll(200):
                messages.append(protocol.decode(listener.recv_multipart()))
        assert any(m.type == "result" and m.series_id == "real" for m in messages)
        assert sum(m.type == "fraction" for m in messages) == 6  # the stage republishes each fraction it took
        assert not any(m.series_id == "forged" for m in messages)
        for eavesdropper in eavesdroppers:
            assert received(eavesdropper, 0) == []
        # the stage logged each refusal with the endpoint; the key it did not know with the peer's address
        assert wait_for(lambda: sum(f"refused a peer on {reduced}" in line for line in lines) >= 2), "".join(lines)
        assert wait_for(lambda: sum(f"refused a peer on {results}" in line for line in lines) >= 2), "".join(lines)
        assert any(f"refused a peer on {reduced} from 127.0.0.1" in line and "is not allowed" in line
                   for line in lines), "".join(lines)
        assert stage.poll() is None
    finally:
        for socket in [listener, pusher, *eavesdroppers, *forgers]:
            socket.close(0)
        context.term()


def test_a_stage_refuses_to_bind_beyond_loopback_in_plaintext_and_says_how_to_make_keys():
    stage = beamkin_process("infer", "--endpoints.reduced", "tcp://0.0.0.0:0", "--inference.models", "F1")
    output, _ = stage.communicate(timeout=120)
    assert stage.returncode == 1, output
    assert "refusing to bind tcp://0.0.0.0:0 (reduced) without CURVE" in output
    assert "beamkin keys --dir KEYS NAME" in output and "allow_plaintext_remote" in output



@pytest.fixture
def dashboard_with_token(tmp_path):
    """The real dashboard (Bokeh server) on loopback, with a token read from a file."""
    from dashboards.server import serve_dashboard

    (tmp_path / "token").write_text("s3cret-token\n")
    ports = LoopbackPorts.free()
    stop = threading.Event()
    server = threading.Thread(target=serve_dashboard, args=(f"tcp://127.0.0.1:{ports.results}",), daemon=True,
                              kwargs={"port": ports.dashboard, "stop_event": stop, "token": f"file:{tmp_path / 'token'}"})
    server.start()
    assert wait_for(lambda: _listening(ports.dashboard), 60)
    yield ports.dashboard
    stop.set()
    server.join(10)


def _listening(port: int) -> bool:
    import socket
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str | None, bytes]:
    import http.client
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.getheader("Set-Cookie"), response.read()
    finally:
        connection.close()


WEBSOCKET_UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                     "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Protocol": "bokeh"}


def test_dashboard_refuses_requests_without_the_token_and_websockets_from_other_origins(dashboard_with_token):
    port = dashboard_with_token
    status, _, body = http_get(port, "/")
    assert status == 403 and b"access token" in body
    assert http_get(port, "/?token=wrong")[0] == 403
    status, cookie, body = http_get(port, "/?token=s3cret-token")
    assert status == 200 and b"<html" in body
    assert cookie.startswith("beamkin_dashboard_token=s3cret-token") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert http_get(port, "/", {"Authorization": "Bearer s3cret-token"})[0] == 200  # as a reverse proxy adds it
    assert http_get(port, "/", {"Cookie": "beamkin_dashboard_token=s3cret-token"})[0] == 200
    with_token = {**WEBSOCKET_UPGRADE, "Cookie": "beamkin_dashboard_token=s3cret-token"}
    # a page from another origin cannot open the websocket, token or not
    status, _, body = http_get(port, "/ws", {**with_token, "Origin": "http://evil.example"})
    assert status == 403 and b"Cross origin" in body
    # from the dashboard's own origin: refused without the token, upgraded with it
    assert http_get(port, "/ws", {**WEBSOCKET_UPGRADE, "Origin": f"http://127.0.0.1:{port}"})[0] == 403
    assert http_get(port, "/ws", {**with_token, "Origin": f"http://127.0.0.1:{port}"})[0] == 101


def test_dashboard_allowed_origins_replace_the_defaults():
    """[dashboard] allowed_origins (a reverse proxy's host): only that origin may open the websocket."""
    from dashboards.server import serve_dashboard

    ports = LoopbackPorts.free()
    stop = threading.Event()
    server = threading.Thread(target=serve_dashboard, args=(f"tcp://127.0.0.1:{ports.results}",), daemon=True,
                              kwargs={"port": ports.dashboard, "stop_event": stop,
                                      "allow_websocket_origin": ["beamline.example.org"]})
    server.start()
    try:
        assert wait_for(lambda: _listening(ports.dashboard), 60)
        assert http_get(ports.dashboard, "/")[0] == 200  # no token configured
        # localhost is in the default list, not in this one (the page's own origin, Host, always is: Tornado)
        other = http_get(ports.dashboard, "/ws", {**WEBSOCKET_UPGRADE, "Origin": f"http://localhost:{ports.dashboard}"})
        assert other[0] == 403 and b"Cross origin" in other[2]
        proxied = http_get(ports.dashboard, "/ws", {**WEBSOCKET_UPGRADE, "Origin": "https://beamline.example.org"})
        assert proxied[0] == 101
    finally:
        stop.set()
        server.join(10)


def test_run_refuses_plaintext_endpoints_beyond_loopback_before_starting_any_stage():
    run = subprocess.run([sys.executable, "-m", "beamkin", "demo", "--once", "--endpoints.raw", "tcp://0.0.0.0:5552"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 2, run.stderr
    assert "refusing to bind tcp://0.0.0.0:5552 (raw) without CURVE" in run.stderr
    assert "BEAMKIN-READY" not in run.stdout


def test_raw_pub_bound_again_for_a_new_frame_size_keeps_curve(keys):
    """BudgetedPublisher binds a new socket when the frame size changes its HWM: the new socket is
    a CURVE server too (the keyed viewer reconnects, a plaintext one is still refused)."""
    ports = LoopbackPorts.free()
    security.configure(curve_config(ports, keys, "server", ("raw",)))
    address = f"tcp://127.0.0.1:{ports.raw}"
    context = zmq.Context()
    raw = sockets.BudgetedPublisher(context, address, budget_bytes=1 << 20, message_bytes=1024)
    raw.size_for(1 << 16)
    assert raw.rebinds == 1 and raw.socket is not None
    viewer = keyed(context, zmq.SUB, address, curve_config(ports, keys, "client", ("raw",)))
    rogue = plaintext(context, zmq.SUB, address)
    try:
        start = series("s", 1, 0.0)[0]
        for _ in range(100):
            raw.publish(start)
            if viewer.poll(100):
                break
        assert protocol.decode(viewer.recv_multipart()).type == "start"
        assert wait_for(lambda: security.refused_count(address) >= 1)
        assert received(rogue, 0) == []
    finally:
        viewer.close(0)
        rogue.close(0)
        raw.close()
        context.term()

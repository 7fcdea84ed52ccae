"""Authenticated, encrypted sockets between hosts: ZeroMQ CURVE with a ZAP authenticator (pyzmq's zmq.auth).

Without it, anyone who reaches a bound port can inject messages (a forged fraction moves t0, a
forged ``end`` finishes a series), read every raw frame on the raw PUB, or take frames as a rogue
reducer. CURVE (CurveZMQ: Curve25519 key exchange, then every message boxed with XSalsa20-Poly1305,
libzmq's implementation) encrypts each connection and authenticates both ends: a client must know
the server's public key, and the server lets in only the client public keys found in a folder
(the ZAP handler, :class:`ZapAuthenticator`, built on :class:`zmq.auth.Authenticator`). No
cryptography is done here; this module only loads keys and sets socket options.

Configuration shape (``[security]`` in beamkin/defaults.toml; every key is also a command-line
option, ``--security.secret_key FILE``, ``--security.reduced.server_key FILE``)::

    [security]
    secret_key = "/etc/beamkin/keys/analysis.key_secret"   # this stage's key pair (`beamkin keys`)
    allow_plaintext_remote = false   # true = let a stage bind a non-loopback endpoint without CURVE

    [security.reduced]                                      # one table per endpoint of [endpoints]:
    server_key = "/etc/beamkin/keys/analysis.key"           #   frames, raw, reduced, results, record
    clients = "/etc/beamkin/keys/clients"                   # folder of the public keys let in

An endpoint uses CURVE when its table names a ``server_key`` (the public key file of the stage
that binds it). That stage's ``secret_key`` must be the pair of ``server_key``; it lets in the
client public keys (``NAME.key`` files) found in ``clients`` when it starts. Every stage connecting
to the endpoint presents its own ``secret_key`` and checks the server against ``server_key``. One
key pair per stage (or per host) serves all its sockets, server and client; one clients folder
usually serves every endpoint. Endpoints without ``server_key`` stay plaintext, as by default,
and a stage refuses to bind a plaintext endpoint that is not loopback (``tcp://0.0.0.0``, a host's
address or interface) unless ``allow_plaintext_remote = true``.

Each stage process calls :func:`configure` once (``beamkin/cli.py``); socket set-up calls
:func:`secure_server` before ``bind`` and :func:`secure_client` before ``connect``. The helpers of
:mod:`beamkin.sockets` do this themselves. A refused peer (plaintext, wrong server key, or a key not
in ``clients``) is logged (endpoint and peer address) and counted: :func:`refused_count`,
:func:`refusals`. Keys: :func:`create_keys` (``beamkin keys``). Deployment: deploy/README.md,
"Running across hosts securely".
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import ipaddress
import itertools
import logging
import os
import socket as stdlib_socket
import threading
import weakref
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.base import Authenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from beamkin.config import ConfigError, defaults

log = logging.getLogger(__name__)

#: endpoints of [endpoints] that a [security.NAME] table may protect
ENDPOINT_NAMES = ("frames", "raw", "reduced", "results", "record")
HOW_TO_MAKE_KEYS = ("create keys with `beamkin keys --dir KEYS NAME` and name them in [security] (deploy/README.md, "
                    "'Running across hosts securely')")


@dataclasses.dataclass(frozen=True)
class CurveEndpoint:
    """One endpoint that requires CURVE: its name, the binding stage's public key (z85) and the
    folder of client public keys it lets in."""

    name: str
    server_public: bytes
    server_key_file: str
    clients: Path


@dataclasses.dataclass(frozen=True)
class Policy:
    """The resolved ``[security]`` configuration of one process (see the module doc)."""

    addresses: dict[str, str]                 # endpoint name -> address, from [endpoints]
    curve: dict[str, CurveEndpoint]           # endpoint name -> keys, for CURVE endpoints only
    public_key: bytes | None                  # this stage's key pair (z85), None without secret_key
    secret_key: bytes | None
    secret_key_file: str
    allow_plaintext_remote: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Policy":
        """Read and check every key file named in ``config["security"]`` (ConfigError naming the key)."""
        table = config.get("security", {})
        secret_file = str(table.get("secret_key", "") or "")
        public = secret = None
        if secret_file:
            public, secret = _load_key(secret_file, "security.secret_key")
            if secret is None:
                raise ConfigError(f"security.secret_key: {secret_file} holds no secret key (give NAME.key_secret, "
                                  "not the public NAME.key)")
        curve = {}
        for name in ENDPOINT_NAMES:
            endpoint = table.get(name, {})
            server_file = str(endpoint.get("server_key", "") or "")
            if not server_file:
                continue
            server_public, _ = _load_key(server_file, f"security.{name}.server_key")
            clients = str(endpoint.get("clients", "") or "")
            if not clients:
                raise ConfigError(f"security.{name}.clients: endpoint {name} requires CURVE (server_key is set), so "
                                  "name the folder of the public keys allowed to connect")
            if not Path(clients).is_dir():
                raise ConfigError(f"security.{name}.clients: {clients} is not a folder")
            curve[name] = CurveEndpoint(name, server_public, server_file, Path(clients))
        addresses = {k: v for k, v in config.get("endpoints", {}).items() if isinstance(v, str) and "://" in v}
        return cls(addresses, curve, public, secret, secret_file, bool(table.get("allow_plaintext_remote", False)))

    def name_of(self, endpoint: str) -> str | None:
        """The [endpoints] name configured with this address (None: not a configured endpoint)."""
        for name, address in self.addresses.items():
            if address == endpoint:
                return name
        return None

    def curve_for(self, endpoint: str, name: str | None = None) -> CurveEndpoint | None:
        """The CURVE keys of an endpoint (by name, else by address), None if it is plaintext."""
        return self.curve.get(name or self.name_of(endpoint) or "")


def _load_key(path: str, key: str) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot read the key file {path}: {exc}; {HOW_TO_MAKE_KEYS}") from exc
    if not public or len(public) != 40:
        raise ConfigError(f"{key}: {path} is not a ZeroMQ certificate (no 40-character public-key)")
    return public, secret


_policy: Policy | None = None
_policy_lock = threading.Lock()


def configure(config: dict[str, Any] | None) -> Policy:
    """Make ``config``'s [security] and [endpoints] the policy of this process (None: the
    defaults: every endpoint loopback and plaintext). Key files are read now."""
    global _policy
    policy = Policy.from_config(config if config is not None else defaults())
    with _policy_lock:
        _policy = policy
    if policy.curve:
        log.info("CURVE required on %s", ", ".join(f"{n} ({policy.addresses.get(n, '?')})" for n in policy.curve))
    return policy


def policy() -> Policy:
    """The policy set by :func:`configure` (the defaults if it was never called)."""
    global _policy
    with _policy_lock:
        if _policy is None:
            _policy = Policy.from_config(defaults())
        return _policy


def is_loopback(endpoint: str) -> bool:
    """True when only this host can reach ``endpoint``: tcp on 127.0.0.0/8, ::1, ``localhost``
    or the ``lo`` interface, and ipc:// / inproc://. ``tcp://0.0.0.0``, ``tcp://*``, a host's
    address or interface name are not."""
    transport, _, rest = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    host = rest.rpartition(":")[0].strip("[]")
    if host.rpartition(";")[2] != host:  # "source;destination" form: the destination counts
        host = host.rpartition(";")[2].strip("[]")
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_binds(config: dict[str, Any]) -> None:
    """For a supervisor that binds every endpoint on this host (``beamkin run`` / ``demo``): the
    ConfigError a stage would give for a non-loopback plaintext endpoint, before any stage starts."""
    current = Policy.from_config(config)
    for name, address in current.addresses.items():
        if name in ENDPOINT_NAMES:
            _check_plaintext_bind(current, address, name)


def _check_plaintext_bind(current: Policy, endpoint: str, name: str | None) -> None:
    if current.curve_for(endpoint, name) is not None or current.allow_plaintext_remote or is_loopback(endpoint):
        return
    which = f" ({name})" if name else ""
    table = f"[security.{name}] server_key and clients, " if name in ENDPOINT_NAMES else ""
    raise ConfigError(
        f"refusing to bind {endpoint}{which} without CURVE: it is reachable from other hosts, where anyone could "
        f"read and inject messages. {HOW_TO_MAKE_KEYS[0].upper()}{HOW_TO_MAKE_KEYS[1:]}: {table}[security] secret_key; "
        "or bind it on 127.0.0.1; or accept the risk with --security.allow_plaintext_remote true")


def secure_server(socket: zmq.Socket, endpoint: str, name: str | None = None) -> bool:
    """Set up ``socket`` (before it binds ``endpoint``) as the policy says: a CURVE server that lets
    in only the ``clients`` keys (ZAP), its refusals logged and counted; or plaintext, refused
    (ConfigError) when ``endpoint`` is not loopback unless allowed. True when CURVE is on."""
    current = policy()
    name = name or current.name_of(endpoint)
    keys = current.curve_for(endpoint, name)
    if keys is None:
        _check_plaintext_bind(current, endpoint, name)
        return False
    if current.secret_key is None:
        raise ConfigError(f"endpoint {keys.name} ({endpoint}) requires CURVE: the stage binding it needs "
                          f"[security] secret_key, the pair of {keys.server_key_file}")
    if current.public_key != keys.server_public:
        raise ConfigError(f"[security] secret_key {current.secret_key_file} is not the pair of [security.{keys.name}] "
                          f"server_key {keys.server_key_file}: clients could not check this server")
    authenticator = _authenticator(socket.context)
    authenticator.allow_keys(endpoint, keys.clients)
    socket.setsockopt(zmq.ZAP_DOMAIN, endpoint.encode())
    socket.curve_secretkey = current.secret_key
    socket.curve_publickey = current.public_key
    socket.curve_server = True
    _RefusalMonitor(socket, endpoint).start()
    return True


def secure_client(socket: zmq.Socket, endpoint: str, name: str | None = None) -> bool:
    """Set up ``socket`` (before it connects to ``endpoint``): a CURVE client presenting this
    stage's key and checking the server's, when the endpoint requires CURVE. True when it does."""
    current = policy()
    keys = current.curve_for(endpoint, name)
    if keys is None:
        if socket.getsockopt(zmq.MECHANISM) != zmq.NULL:
            raise ConfigError(f"{endpoint} is plaintext but this socket already connects with CURVE elsewhere: "
                              "give both endpoints CURVE keys")
        return False
    if current.secret_key is None:
        raise ConfigError(f"endpoint {keys.name} ({endpoint}) requires CURVE: give this stage [security] secret_key "
                          f"(its key pair from `beamkin keys`) and put its public key in {keys.clients} on the server")
    socket.curve_secretkey = current.secret_key
    socket.curve_publickey = current.public_key
    socket.curve_serverkey = keys.server_public
    return True


# --- refusals: counted per endpoint (the metrics export reads refusals()) ---

_refused: collections.Counter = collections.Counter()
_refused_lock = threading.Lock()


def record_refusal(endpoint: str, peer: str, reason: str) -> None:
    """Count and log one peer refused on ``endpoint`` (the address it is bound to)."""
    with _refused_lock:
        _refused[endpoint] += 1
        total = _refused[endpoint]
    log.warning("refused a peer on %s from %s: %s (%d refused there so far)", endpoint, peer, reason, total,
                extra={"endpoint": endpoint, "peer": peer})


def refused_count(endpoint: str | None = None) -> int:
    """Peers refused so far on ``endpoint`` (its bound address, or its [endpoints] name); all
    endpoints when None."""
    with _refused_lock:
        if endpoint is None:
            return sum(_refused.values())
        address = policy().addresses.get(endpoint, endpoint)
        return _refused[address]


def refusals() -> dict[str, int]:
    """{bound address: peers refused there} for every endpoint that refused one."""
    with _refused_lock:
        return dict(_refused)


# --- the ZAP handler: one per context, for all its CURVE server sockets ---

class ZapAuthenticator(Authenticator):
    """pyzmq's ZAP authenticator with one domain per bound endpoint (the socket's ZAP_DOMAIN is
    its address) and each denial logged and counted with the peer's address and key.

    Runs in its own daemon thread; it ends, closing its socket, when the context is terminated,
    so ``context.term()`` of a stage never waits for it."""

    def __init__(self, context: zmq.Context) -> None:
        super().__init__(context, log=logging.getLogger("beamkin.security.zap"))
        self._request: tuple[str, str, bytes] = ("", "", b"")
        self.start()
        self.thread = threading.Thread(target=self._serve, name="zap-authenticator", daemon=True)
        self.thread.start()

    def allow_keys(self, endpoint: str, clients: Path) -> None:
        """Let in, on ``endpoint``, the public keys found in ``clients`` now (read once)."""
        try:
            keys = zmq.auth.load_certificates(str(clients))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the client keys in {clients}: {exc}") from exc
        if not keys:
            log.warning("%s: no client public key (*.key) in %s: every peer will be refused", endpoint, clients)
        self.certs[endpoint] = keys
        log.info("%s requires CURVE; %d client key(s) allowed from %s", endpoint, len(keys), clients)

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            while True:
                try:
                    message = self.zap_socket.recv_multipart()
                except zmq.ContextTerminated:
                    break
                loop.run_until_complete(self.handle_zap_message(message))
        finally:
            self.zap_socket.close(0)
            loop.close()

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) >= 6:
            credentials = msg[6] if len(msg) > 6 else b""
            self._request = (msg[2].decode("utf-8", "replace"), msg[3].decode("utf-8", "replace"), credentials)
        await super().handle_zap_message(msg)

    def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes,
                        user_id: str = "anonymous") -> None:
        if status_code != b"200":
            domain, address, credentials = self._request
            key = z85.encode(credentials).decode() if len(credentials) == 32 else "none"
            record_refusal(domain, address, f"client key {key} is not allowed ({status_text.decode('utf-8', 'replace')})")
        super()._send_zap_reply(request_id, status_code, status_text, user_id)


_authenticators: "weakref.WeakKeyDictionary[zmq.Context, ZapAuthenticator]" = weakref.WeakKeyDictionary()
_authenticators_lock = threading.Lock()


def _authenticator(context: zmq.Context) -> ZapAuthenticator:
    with _authenticators_lock:
        authenticator = _authenticators.get(context)
        if authenticator is None or not authenticator.thread.is_alive():
            authenticator = _authenticators[context] = ZapAuthenticator(context)
        return authenticator


# --- handshake failures the ZAP handler never sees (a plaintext peer, a wrong server key) ---

_HANDSHAKE_FAILED = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake failed",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake failed (protocol)",
}
_PROTOCOL_REASONS = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "no CURVE (a plaintext peer)",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "CURVE handshake could not be decrypted (the peer does not have this server's public key)",
}
_MONITOR_EVENTS = (zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                   | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_MONITOR_STOPPED)


_monitor_ids = itertools.count()


def _peer_of(fd: int) -> str:
    """host:port of the peer of a TCP socket's file descriptor, "unknown" if it is gone already."""
    try:
        with stdlib_socket.socket(fileno=os.dup(fd)) as duplicate:
            host, port = duplicate.getpeername()[:2]
            return f"{host}:{port}"
    except (OSError, ValueError):
        return "unknown"


class _RefusalMonitor(threading.Thread):
    """Watches a CURVE server socket's monitor events: each failed handshake is a refused peer.

    libzmq refuses a plaintext peer or one without the server's key before any ZAP request, and
    its monitor events carry no peer address; the peer is read from the connection's descriptor
    when it is accepted (best effort: a connection closed before that reads "unknown"). Denials
    of a key by the ZAP handler are counted there, with the address ZAP gives."""

    def __init__(self, socket: zmq.Socket, endpoint: str) -> None:
        super().__init__(name=f"security-monitor {endpoint}", daemon=True)
        self.endpoint = endpoint
        address = f"inproc://beamkin.security.monitor.{next(_monitor_ids)}"  # unique: a rebound socket gets a new one
        socket.monitor(address, _MONITOR_EVENTS)
        self.monitor = socket.context.socket(zmq.PAIR)
        self.monitor.connect(address)

    def run(self) -> None:
        peers: dict[int, str] = {}
        failed: str | None = None  # reason of a failed handshake whose disconnect (and fd) is next
        try:
            while True:
                try:
                    event = recv_monitor_message(self.monitor)
                except zmq.ContextTerminated:
                    break
                kind, value = event["event"], event["value"]
                if kind == zmq.EVENT_MONITOR_STOPPED:
                    break
                if kind == zmq.EVENT_ACCEPTED:
                    peers[value] = _peer_of(value)
                elif kind in _HANDSHAKE_FAILED:
                    if failed is not None:
                        record_refusal(self.endpoint, "unknown", failed)
                    failed = _PROTOCOL_REASONS.get(value, f"{_HANDSHAKE_FAILED[kind]}, code {value:#x}")
                elif kind == zmq.EVENT_DISCONNECTED:
                    peer = peers.pop(value, "unknown")
                    if failed is not None:
                        record_refusal(self.endpoint, peer, failed)
                        failed = None
        finally:
            if failed is not None:
                record_refusal(self.endpoint, "unknown", failed)
            self.monitor.close(0)


# --- keys ---

def create_keys(directory: str | Path, name: str, overwrite: bool = False) -> tuple[Path, Path]:
    """Create the CURVE key pair NAME.key (public: give it to peers) and NAME.key_secret (secret:
    readable by its owner only) in ``directory`` (created); returns their paths. An existing
    pair is kept (FileExistsError) unless ``overwrite``."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"key name {name!r}: give a plain name such as streamer or analysis-host")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    if not overwrite and (public.exists() or secret.exists()):
        raise FileExistsError(f"{public} or {secret} exists already (a stage may use it); remove it or pass --force")
    old_mask = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
    try:
        public_file, secret_file = zmq.auth.create_certificates(str(folder), name)
    finally:
        os.umask(old_mask)
    os.chmod(public_file, 0o644)
    return Path(public_file), Path(secret_file)

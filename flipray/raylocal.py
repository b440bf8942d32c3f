"""Joining a Ray cluster without hanging, and ad-hoc local Ray instances that listen on 127.0.0.1 only.

    from flipray import raylocal
    raylocal.init(address=None, num_cpus=4)   # --address, else RAY_ADDRESS, else a new local instance on 127.0.0.1

ray.init(address=...) waits minutes for a GCS that does not answer (a stale RAY_ADDRESS, a cluster that is gone);
here a TCP connect with a short time-out comes first and the error says what was tried. A local instance started by
ray.init() listens on every interface unless its node address is the loopback and Ray's single-machine mode is on.
"""
from __future__ import annotations

import os
import socket

from flipray.optional import require

CONNECT_TIMEOUT_S = 5.0
LOOPBACK = "127.0.0.1"


class RayUnreachable(ConnectionError):
    """A Ray cluster address that does not answer."""


def cluster_address(explicit: str | None = None, recorded: bool = False) -> tuple[str | None, str]:
    """(address, where it came from): `explicit`, else RAY_ADDRESS, else (with `recorded`) the cluster `ray start`
    last recorded on this machine; (None, "") when there is none."""
    if explicit:
        return explicit, "--address"
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    if recorded:
        try:
            utils = require("ray._private.utils")
            address = utils.read_ray_address(None)
            if address:
                return address, f"the cluster `ray start` recorded in {utils.get_ray_address_file(None)}"
        except (ImportError, OSError, AttributeError):
            pass
    return None, ""


def reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether host:port (also ray://host:port, http://host:port) accepts a TCP connection within `timeout`."""
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return True  # not host:port ("auto", a name Ray resolves itself): let Ray try
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def join(address: str, source: str, **init_kwargs) -> None:
    """ray.init(address) after checking that it answers; RayUnreachable saying what was tried when it does not."""
    ray = require("ray")
    if not reachable(address):
        raise RayUnreachable(f"cannot reach the Ray cluster at {address} (from {source}): no TCP answer within "
                             f"{CONNECT_TIMEOUT_S:g} s")
    ray.init(address=address, **init_kwargs)


def start_local(num_cpus: int | None = None, **init_kwargs) -> None:
    """A new Ray instance on this machine whose GCS, raylet and workers listen on 127.0.0.1 only."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # single-machine mode, for the processes Ray starts
    ray = require("ray")
    ray_constants = require("ray._private.ray_constants")
    # read at import: without it Ray swaps the loopback for the machine's address and binds every interface
    ray_constants.ENABLE_RAY_CLUSTER = False
    init_kwargs.setdefault("include_dashboard", False)
    ray.init(address="local", num_cpus=num_cpus, _node_ip_address=LOOPBACK, **init_kwargs)


def init(address: str | None = None, num_cpus: int | None = None, **init_kwargs) -> str:
    """Join `address` (else RAY_ADDRESS) or start a local instance; returns which ("joined ADDRESS" / "local")."""
    address, source = cluster_address(address)
    if address:
        join(address, source, **init_kwargs)
        return f"joined {address}"
    start_local(num_cpus, **init_kwargs)
    return "local"

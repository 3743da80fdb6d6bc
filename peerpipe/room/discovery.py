"""LAN discovery with mDNS/DNS-SD: a host advertises its nameplate, a joiner browses for it.

The advertisement carries the nameplate and port only, never the secret words:
anyone on the LAN may learn that room 7 exists, but joining still needs the code.
Zeroconf is always bound to one explicit interface address (the one the node
listens on), so ``--listen 127.0.0.1:PORT`` keeps every packet on loopback and no
query ever leaves on an interface the user did not choose.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from dataclasses import dataclass
from types import TracebackType

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from peerpipe.room.errors import DiscoveryError, HostNotFoundError

log = logging.getLogger(__name__)
SERVICE_TYPE = "_peerpipe._tcp.local."
TXT_VERSION = "1"


@dataclass(frozen=True)
class Found:
    nameplate: int
    address: str
    port: int
    node_id: str


def _check_interface(ip: str) -> str:
    try:
        addr = ipaddress.IPv4Address(ip)
    except ValueError:
        raise DiscoveryError(f"mDNS needs an IPv4 interface address, not {ip!r}") from None
    if addr.is_unspecified:
        # Binding every interface would announce the room on networks the user never chose.
        raise DiscoveryError("mDNS must be bound to one interface address, not 0.0.0.0")
    return ip


def default_lan_ip() -> str:
    """The address of the interface holding the default route (no packet is sent), else 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            # connect() on UDP only picks a route; nothing goes on the wire.
            probe.connect(("192.0.2.1", 9))
            ip = probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"
    return ip if ip != "0.0.0.0" else "127.0.0.1"


def _zeroconf(ip: str) -> AsyncZeroconf:
    try:
        return AsyncZeroconf(interfaces=[ip], ip_version=IPVersion.V4Only)
    except OSError as exc:
        raise DiscoveryError(f"could not start mDNS on {ip}: {exc.strerror or exc}") from exc


class Advertiser:
    """Announces ``nameplate`` at ``address:port`` while the context is open."""

    def __init__(self, nameplate: int, address: str, port: int, node_id: str) -> None:
        self._ip = _check_interface(address)
        self._info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"peerpipe-{nameplate}-{node_id[:12]}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(address)],
            port=port,
            properties={"v": TXT_VERSION, "nameplate": str(nameplate), "port": str(port), "node": node_id},
            server=f"peerpipe-{node_id[:12]}.local.",
        )
        self._zc: AsyncZeroconf | None = None

    async def __aenter__(self) -> Advertiser:
        self._zc = _zeroconf(self._ip)
        try:
            await (await self._zc.async_register_service(self._info, allow_name_change=True))
        except BaseException:
            await self._zc.async_close()
            raise
        log.info("advertising %s on %s", self._info.name, self._ip)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._zc is not None:
            try:
                await (await self._zc.async_unregister_service(self._info))
            except Exception as exc:  # the goodbye packet is a courtesy; closing must still happen
                log.debug("could not withdraw the mDNS record: %s", exc)
            await self._zc.async_close()
            self._zc = None


def _parse(info: AsyncServiceInfo) -> Found | None:
    props = {
        k.decode(errors="replace"): (v or b"").decode(errors="replace") for k, v in info.properties.items()
    }
    addresses = info.parsed_addresses(IPVersion.V4Only)
    if props.get("v") != TXT_VERSION or not addresses or not info.port:
        return None
    try:
        nameplate = int(props.get("nameplate", ""))
    except ValueError:
        return None
    return Found(nameplate, addresses[0], info.port, props.get("node", ""))


async def find_host(nameplate: int, timeout: float, interface: str) -> Found:
    """Browse mDNS on ``interface`` until a host advertising ``nameplate`` answers."""
    ip = _check_interface(interface)
    azc = _zeroconf(ip)
    found: asyncio.Queue[str] = asyncio.Queue()

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Removed:
            found.put_nowait(name)

    browser = AsyncServiceBrowser(azc.zeroconf, SERVICE_TYPE, handlers=[on_change])
    try:
        async with asyncio.timeout(timeout):
            while True:
                name = await found.get()
                info = AsyncServiceInfo(SERVICE_TYPE, name)
                if not await info.async_request(azc.zeroconf, 1500):
                    continue
                hit = _parse(info)
                if hit is not None and hit.nameplate == nameplate:
                    log.info("found room %d at %s:%d", nameplate, hit.address, hit.port)
                    return hit
    except TimeoutError:
        raise HostNotFoundError(nameplate, timeout) from None
    finally:
        await browser.async_cancel()
        await azc.async_close()

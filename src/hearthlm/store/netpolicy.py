"""Which pulls a server request may make: local paths only when allowed, no file://, URL hosts limited to the HF hub
and --allow-pull-host entries, and no loopback/private/link-local addresses (SSRF), re-checked on every redirect.

The CLI (`hearth pull`) passes no policy: the local user is trusted and may pull any path or URL.
"""
from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import urlparse

from ..errors import InvalidRequestError
from .names import LOCAL_PATHS_REFUSED

HUB_HOSTS = ("huggingface.co", "hf.co")


@dataclass(frozen=True)
class PullPolicy:
    """What a pull requested over HTTP may reach (from ServeConfig.allow_local_paths / allow_pull_hosts)."""

    allow_local_paths: bool = False
    allow_hosts: tuple[str, ...] = field(default_factory=tuple)  # trusted: any address, loopback included

    def trusted_hosts(self) -> set[str]:
        """allow_hosts plus the host of $HF_ENDPOINT (both set by whoever runs the server)."""
        hosts = {h.strip().lower().rstrip(".") for h in self.allow_hosts if h.strip()}
        endpoint = urlparse(os.environ.get("HF_ENDPOINT", "")).hostname
        return hosts | ({endpoint.lower()} if endpoint else set())

    def allowed_hosts(self) -> set[str]:
        return set(HUB_HOSTS) | self.trusted_hosts()

    def local_path_refused(self) -> InvalidRequestError:
        return InvalidRequestError(LOCAL_PATHS_REFUSED, param="model")


def _bad_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved
            or ip.is_unspecified)


def _refused(url: str, why: str) -> InvalidRequestError:
    return InvalidRequestError(f"pulling {url} was refused: {why}", param="model")


def check_address(host: str, address: str, url: str) -> None:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        raise _refused(url, f"{host} resolved to {address!r}, not an IP address") from None
    if _bad_address(ip):
        raise _refused(url, f"{host} resolves to {ip}, a loopback, private, link-local or reserved address; the "
                            "server operator can allow it with `hearth serve --allow-pull-host HOST`")


def check_url(url: str, policy: PullPolicy) -> None:
    """InvalidRequestError (400) unless policy allows fetching url: http(s), an allowed host, and (for hosts not
    trusted by the operator) only public addresses."""
    p = urlparse(url)
    if p.scheme not in ("http", "https"):
        raise _refused(url, f"{p.scheme}:// URLs are not accepted over HTTP (http and https only)"
                       + (f"; {LOCAL_PATHS_REFUSED}" if p.scheme == "file" else ""))
    host = (p.hostname or "").lower().rstrip(".")
    if not host:
        raise _refused(url, "the URL has no host")
    if host not in policy.allowed_hosts():
        raise _refused(url, f"host {host} is not allowed: the server pulls from {', '.join(HUB_HOSTS)} and hosts "
                            "given with `hearth serve --allow-pull-host HOST`; or pull it with the CLI, "
                            "`hearth pull URL`")
    if host in policy.trusted_hosts():
        return
    try:
        infos = socket.getaddrinfo(host, p.port or (443 if p.scheme == "https" else 80), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise _refused(url, f"cannot resolve {host} ({e})") from None
    for info in infos:
        check_address(host, str(info[4][0]), url)


def _guarded(base: type[http.client.HTTPConnection], policy: PullPolicy, url: str) -> type:
    """A connection class that re-checks the address it actually connected to (DNS may answer differently than
    at check_url time)."""

    class Guarded(base):  # type: ignore[misc, valid-type]
        def connect(self) -> None:
            super().connect()
            if self.host.lower().rstrip(".") not in policy.trusted_hosts():
                check_address(self.host, self.sock.getpeername()[0], url)

    return Guarded


class _Redirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, policy: PullPolicy):
        self.policy = policy

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        check_url(newurl, self.policy)  # every hop
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def opener(url: str, policy: PullPolicy | None) -> urllib.request.OpenerDirector:
    """urllib opener for a pull: without a policy (CLI) the default one; with a policy, no proxies (so the
    address checks see the real peer), guarded connections and re-checked redirects."""
    if policy is None:
        return urllib.request.build_opener()
    check_url(url, policy)

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req):  # type: ignore[no-untyped-def]
            return self.do_open(_guarded(http.client.HTTPConnection, policy, req.full_url), req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req):  # type: ignore[no-untyped-def]
            kw = {"context": self._context}
            if getattr(self, "_check_hostname", None) is not None:  # Python < 3.12
                kw["check_hostname"] = self._check_hostname
            return self.do_open(_guarded(http.client.HTTPSConnection, policy, req.full_url), req, **kw)

    return urllib.request.build_opener(urllib.request.ProxyHandler({}), HTTP(), HTTPS(), _Redirects(policy))

"""The one outbound request the provider makes on a publisher's say-so: fetching an ownership claim's token file
(kvmart/ledger/ownership.py). A URL named by a client is an SSRF risk, so the fetch is constrained (docs/SECURITY.md):

- `https` only, port 443, to a host every address of which is globally routable (no loopback, private,
  link-local, shared, reserved or multicast address, IPv4-mapped ones included); the connection goes to the
  address that was checked (no second DNS lookup to rebind), with TLS verified against the host name;
- with `claim_allow_loopback` (KVMART_CLAIM_ALLOW_LOOPBACK=1, for tests and local trials only) also `http` or
  `https` to a loopback host (127.0.0.0/8, ::1, localhost) on any port, and nothing else more;
- GET only, no cookies, no credentials, a fixed User-Agent; redirects followed only within the same origin, at
  most MAX_REDIRECTS; 5 s to connect, 10 s in all; at most MAX_BYTES of body (more: refused);
- a 200 whose body, read as UTF-8, has the token as one of its lines.

Every refusal is a ClaimCheckError saying why; nothing about the provider's own network is echoed back beyond
that."""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from kvmart.errors import ClaimCheckError

MAX_BYTES = 4096
MAX_REDIRECTS = 3
CONNECT_SECONDS = 5.0
TOTAL_SECONDS = 10.0
USER_AGENT = "kvmart-claim-check/1"
LOOPBACK_NAMES = ("localhost", "localhost.")


@dataclass(frozen=True)
class Target:
    """A URL checked against the policy: where to connect, and the host name it stands for."""

    url: str
    scheme: str
    host: str
    port: int
    address: str  # the checked IP address the connection goes to

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


def _address_allowed(address: str, allow_loopback: bool) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return allow_loopback
    return ip.is_global and not ip.is_multicast


def check_target(url: str, allow_loopback: bool,
                 resolve=socket.getaddrinfo) -> Target:  # noqa: ANN001  (a getaddrinfo-like callable, for tests)
    """The URL as a Target the policy allows; ClaimCheckError otherwise (before any connection is made)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ClaimCheckError(f"cannot fetch {url!r:.100}: not a URL ({e})") from None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in ("https", "http") or not host or parts.username or parts.password:
        raise ClaimCheckError(f"cannot fetch {url!r:.100}: only https:// URLs with a host are fetched")
    port = port or (443 if scheme == "https" else 80)
    try:
        infos = resolve(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise ClaimCheckError(f"cannot fetch {url!r:.100}: the host {host!r} does not resolve ({e})") from None
    addresses = sorted({str(info[4][0]) for info in infos})
    if not addresses:
        raise ClaimCheckError(f"cannot fetch {url!r:.100}: the host {host!r} has no address")
    loopback = all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
    if not all(_address_allowed(a, allow_loopback) for a in addresses):
        raise ClaimCheckError(f"cannot fetch {url!r:.100}: {host!r} is not a public address (loopback, private, "
                              "link-local and reserved addresses are never fetched)")
    if not (loopback and allow_loopback) and (scheme != "https" or port != 443):
        raise ClaimCheckError(f"cannot fetch {url!r:.100}: only https on port 443 is fetched")
    return Target(url, scheme, host, port, addresses[0])


def _request_url(target: Target) -> str:
    parts = urlsplit(target.url)
    host = f"[{target.address}]" if ":" in target.address else target.address
    return f"{target.scheme}://{host}:{target.port}{parts.path or '/'}" + (f"?{parts.query}" if parts.query else "")


def _host_header(target: Target) -> str:
    default = 443 if target.scheme == "https" else 80
    shown = f"[{target.host}]" if ":" in target.host else target.host
    return shown if target.port == default else f"{shown}:{target.port}"


def fetch_text(url: str, allow_loopback: bool = False) -> str:
    """The body of `url` as text, under the policy above; ClaimCheckError saying why not."""
    deadline = time.monotonic() + TOTAL_SECONDS
    target = check_target(url, allow_loopback)
    timeout = httpx.Timeout(CONNECT_SECONDS, connect=CONNECT_SECONDS)
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
            headers = {"Host": _host_header(target), "User-Agent": USER_AGENT, "Accept": "text/plain",
                       "Accept-Encoding": "identity"}  # raw bytes only: no decompression bomb
            try:
                with client.stream("GET", _request_url(target), headers=headers, extensions=extensions) as response:
                    if response.is_redirect:
                        target = _redirected(target, response.headers.get("location", ""), allow_loopback)
                        continue
                    if response.status_code != 200:
                        raise ClaimCheckError(f"fetching {target.url} answered HTTP {response.status_code}, not 200")
                    body = _read_limited(response, deadline, target.url)
            except httpx.HTTPError as e:
                raise ClaimCheckError(f"fetching {target.url} failed: {type(e).__name__}") from None
            try:
                return body.decode("utf-8")
            except UnicodeDecodeError:
                raise ClaimCheckError(f"{target.url} is not UTF-8 text") from None
    raise ClaimCheckError(f"fetching {url} was redirected more than {MAX_REDIRECTS} times")


def _redirected(target: Target, location: str, allow_loopback: bool) -> Target:
    """The next target of a redirect: only within the same origin."""
    following = check_target(urljoin(target.url, location), allow_loopback)
    if following.origin != target.origin:
        raise ClaimCheckError(f"{target.url} redirects to another origin ({following.scheme}://{following.host}:"
                              f"{following.port}); a claim must be served by the origin itself")
    return following


def _read_limited(response: httpx.Response, deadline: float, url: str) -> bytes:
    body = bytearray()
    for chunk in response.iter_raw():
        body += chunk
        if len(body) > MAX_BYTES:
            raise ClaimCheckError(f"{url} is longer than {MAX_BYTES} bytes; a claim file holds tokens, one a line")
        if time.monotonic() > deadline:
            raise ClaimCheckError(f"fetching {url} took longer than {TOTAL_SECONDS:g} s")
    return bytes(body)


def has_token(text: str, token: str) -> bool:
    return any(line.strip() == token for line in text.splitlines())

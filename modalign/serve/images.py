"""Where a request's ``image_url`` may come from: ``data:`` URLs (base64), local files inside an
allowed directory, and - only when enabled - http(s) from allowed domains. A remote host is
resolved once, every address it resolves to must be global (not private, loopback, link-local,
shared 100.64/10, reserved, multicast, ...), and the connection goes to the address that was
checked (TLS still verifies the host name), on every redirect hop: DNS rebinding finds nothing
to rebind."""

from __future__ import annotations

import base64
import binascii
import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlparse


class RequestError(ValueError):
    """A bad request: ``status`` (400/401/413/422), OpenAI-style ``param`` and ``code``."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


@dataclass
class ImagePolicy:
    local_dir: str | None = None  # local paths / file:// URLs allowed only inside this directory
    allow_http: bool = False
    allowed_domains: list[str] = field(default_factory=list)
    max_bytes: int = 10 * 1024 * 1024
    max_redirects: int = 3
    timeout_s: float = 10.0


def _global_ip(host: str, port: int) -> str:
    """The address to connect to for ``host``: every address it resolves to must be global."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise RequestError(f"cannot resolve image host {host!r}", code="invalid_image_url") from None
    addrs = []
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        mapped = getattr(ip, "ipv4_mapped", None)
        if not ip.is_global or (mapped is not None and not mapped.is_global) or ip.is_multicast:
            raise RequestError(
                f"image host {host!r} resolves to a non-public address", code="invalid_image_url"
            )
        addrs.append(ip)
    if not addrs:
        raise RequestError(f"cannot resolve image host {host!r}", code="invalid_image_url")
    return str(addrs[0])


def _fetch_http(url: str, policy: ImagePolicy, param: str) -> bytes:
    """The image at ``url``, every hop checked; the whole fetch (redirects and a slow body
    included) within ``policy.timeout_s`` seconds, not each read alone."""
    import time

    import httpx

    deadline = time.monotonic() + policy.timeout_s

    def late() -> RequestError:
        return RequestError(
            f"fetching the image took over {policy.timeout_s:g} s", 408, param, "image_timeout"
        )

    for _ in range(policy.max_redirects + 1):
        if time.monotonic() > deadline:
            raise late()
        u = urlparse(url)
        host = (u.hostname or "").lower()
        if u.scheme not in ("http", "https") or not host:
            raise RequestError(f"unsupported image URL {url[:80]!r}", param=param, code="invalid_image_url")
        if not any(host == d or host.endswith("." + d) for d in policy.allowed_domains):
            raise RequestError(
                f"image host {host!r} is not an allowed domain", param=param, code="invalid_image_url"
            )
        port = u.port or (443 if u.scheme == "https" else 80)
        ip = _global_ip(host, port)
        pinned = u._replace(netloc=f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}").geturl()
        headers = {"Host": u.netloc.rsplit("@", 1)[-1]}
        ext = {"sni_hostname": host} if u.scheme == "https" else {}
        with httpx.Client(timeout=policy.timeout_s, follow_redirects=False, trust_env=False) as client:
            with client.stream("GET", pinned, headers=headers, extensions=ext) as r:
                if r.is_redirect:
                    url = urljoin(url, r.headers.get("location", ""))
                    continue
                if r.status_code != 200:
                    raise RequestError(
                        f"image URL answered {r.status_code}", param=param, code="invalid_image_url"
                    )
                data = bytearray()
                for chunk in r.iter_bytes():
                    data += chunk
                    if time.monotonic() > deadline:  # a server that trickles its bytes
                        raise late()
                    if len(data) > policy.max_bytes:
                        raise RequestError(
                            f"image over {policy.max_bytes} bytes", 413, param, "image_too_large"
                        )
                return bytes(data)
    raise RequestError("too many redirects fetching an image", param=param, code="invalid_image_url")


def load_image_bytes(url: str, policy: ImagePolicy, param: str) -> bytes:
    """The bytes an ``image_url`` names, or a ``RequestError`` saying why not."""
    if not isinstance(url, str) or not url:
        raise RequestError("image_url.url must be a non-empty string", param=param, code="invalid_image_url")
    if url.startswith("data:"):
        head, _, payload = url.partition(",")
        if ";base64" not in head or not payload:
            raise RequestError(
                "data: image URLs must be base64 encoded", param=param, code="invalid_image_url"
            )
        if len(payload) * 3 // 4 > policy.max_bytes:
            raise RequestError(f"image over {policy.max_bytes} bytes", 413, param, "image_too_large")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(
                "invalid base64 in data: image URL", param=param, code="invalid_image_url"
            ) from None
    if url.startswith(("http://", "https://")):
        if not policy.allow_http:
            raise RequestError(
                "remote image URLs are disabled on this server", param=param, code="invalid_image_url"
            )
        return _fetch_http(url, policy, param)
    path = url[len("file://") :] if url.startswith("file://") else url
    if policy.local_dir is None:
        raise RequestError(
            "local image paths are disabled on this server", param=param, code="invalid_image_url"
        )
    if "\x00" in path or len(path) > 4096:
        raise RequestError("local image path has a NUL byte or is over 4096 characters", param=param,
                           code="invalid_image_url")  # fmt: skip
    try:
        root = Path(policy.local_dir).resolve()
        full = (root / path).resolve() if not Path(path).is_absolute() else Path(path).resolve()
        if full != root and root not in full.parents:
            raise RequestError(
                "local image path is outside the allowed directory", param=param, code="invalid_image_url"
            )
        if not full.is_file():
            raise RequestError(f"no image file {path!r:.200}", param=param, code="invalid_image_url")
        if full.stat().st_size > policy.max_bytes:
            raise RequestError(f"image over {policy.max_bytes} bytes", 413, param, "image_too_large")
        return full.read_bytes()
    except OSError as e:  # a name too long, a file it may not read
        raise RequestError(f"local image {path!r:.200} cannot be read ({e.strerror or e.__class__.__name__})",
                           param=param, code="invalid_image_url") from None  # fmt: skip

"""The local HTTP API on the appliance's own event loop (aiohttp).

Routes (docs/api.md): ``/`` (status page), ``/health``, ``/ready``, ``/metrics``,
``/api/v1/status``, ``/api/v1/devices``, ``/api/v1/devices/{name}``, ``/api/v1/alerts``,
``/api/v1/engine`` (GET) and ``/api/v1/alerts/ack`` (POST, bearer token).

Security: nothing here runs a program or reads a file named by a request; the status page is one
file shipped in the package, read once at ``start``. Requests that change state need the bearer
token of ``api.token_file`` (401 without one, 403 with a wrong one, compared with
:func:`hmac.compare_digest`). Bad requests (unknown paths, path traversal attempts, oversized
bodies, malformed JSON, wrong methods) get a JSON 4xx and are counted per reason
(``appliance_api_bad_requests_total``); a handler that fails answers 500 and is logged, the
pipeline is not affected.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from appliance.api import views
from appliance.api.metrics import ApplianceCollector, exposition_chunks
from appliance.config import ApiSection
from appliance.errors import ConfigError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def read_token(path: str) -> str:
    """The bearer token from ``api.token_file`` (first line, stripped). ConfigError when the
    file cannot be read or is empty."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
    except OSError as err:
        raise ConfigError(f"api.token_file: cannot read {path}: {err.strerror or err}") from None
    if not token:
        raise ConfigError(f"api.token_file: {path} is empty")
    return token


def _json(data: Any, status: int = 200) -> web.Response:
    """Compact JSON (msgspec: fast, and NaN/Inf, e.g. a score of a broken window, become null)."""
    return web.Response(
        body=msgspec.json.encode(data), status=status, content_type="application/json"
    )


class ApiServer:
    """Serves the API for one running appliance. Construction does no I/O; ``start`` reads the
    token file and the page and binds ``api.listen:api.port``; ``stop`` is idempotent."""

    def __init__(self, cfg: ApiSection, app: views.Source) -> None:
        self.cfg = cfg
        self._app = app
        self.requests: dict[int, int] = {}
        self.bad_requests: dict[str, int] = {}
        self._token: str | None = None
        self._page = b""
        self._runner: web.AppRunner | None = None
        self._collector = ApplianceCollector(
            app, lambda: (dict(self.requests), dict(self.bad_requests))
        )
        self.url = f"http://{cfg.listen}:{cfg.port}/"

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._runner is not None:
            return
        if self.cfg.token_file:
            self._token = read_token(self.cfg.token_file)
        self._page = resources.files("appliance.api").joinpath("static/index.html").read_bytes()
        web_app = web.Application(
            client_max_size=self.cfg.max_body_bytes, middlewares=[self._middleware]
        )
        r = web_app.router
        r.add_get("/", self._index)
        r.add_get("/health", self._health)
        r.add_get("/ready", self._ready)
        r.add_get("/metrics", self._metrics)
        r.add_get("/api/v1/status", self._status)
        r.add_get("/api/v1/devices", self._devices)
        # a device name's own pattern (config.Name): "..", "/" or "\\" never reach the handler
        r.add_get(r"/api/v1/devices/{name:[A-Za-z0-9][A-Za-z0-9_.-]{0,63}}", self._device)
        r.add_get("/api/v1/alerts", self._alerts)
        r.add_post("/api/v1/alerts/ack", self._ack)
        r.add_get("/api/v1/engine", self._engine)
        runner = web.AppRunner(web_app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.cfg.listen, self.cfg.port).start()
        except OSError as err:
            await runner.cleanup()
            raise ConfigError(
                f"api: cannot listen on {self.cfg.listen}:{self.cfg.port}: {err.strerror or err}"
            ) from None
        self._runner = runner
        log.info("local API and status page on %s", self.url)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- plumbing ------------------------------------------------------------------------------
    def _refuse(self, status: int, reason: str, message: str, **headers: str) -> web.Response:
        self.bad_requests[reason] = self.bad_requests.get(reason, 0) + 1
        resp = _json({"error": message, "reason": reason, "status": status}, status)
        resp.headers.update(headers)
        return resp

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            resp = await handler(request)
        except web.HTTPNotFound:
            raw = request.raw_path.lower()
            if ".." in raw or "%2e%2e" in raw or "%2f" in raw or "%5c" in raw or "\\" in raw:
                resp = self._refuse(404, "path_traversal", "not found")
            else:
                resp = self._refuse(404, "not_found", f"no such endpoint: {request.path}")
        except web.HTTPMethodNotAllowed as err:
            resp = self._refuse(
                405,
                "method_not_allowed",
                f"{request.method} not allowed here",
                Allow=",".join(sorted(err.allowed_methods)),
            )
        except web.HTTPRequestEntityTooLarge:
            resp = self._refuse(
                413, "body_too_large", f"request body over {self.cfg.max_body_bytes} bytes"
            )
        except web.HTTPException as err:
            resp = self._refuse(err.status, "http_error", err.reason)
        except Exception:
            log.exception("local API: %s %s failed", request.method, request.path)
            resp = _json({"error": "internal error", "status": 500}, 500)
        self.requests[resp.status] = self.requests.get(resp.status, 0) + 1
        return resp

    def _check_token(self, request: web.Request) -> web.Response | None:
        """None when the request carries the right bearer token, else the 401/403 answer."""
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return self._refuse(
                401, "unauthorized", "bearer token required", **{"WWW-Authenticate": "Bearer"}
            )
        if self._token is None:
            return self._refuse(403, "forbidden", "no api.token_file configured: read-only API")
        if not hmac.compare_digest(given.strip().encode(), self._token.encode()):
            return self._refuse(403, "forbidden", "wrong token")
        return None

    # -- handlers ------------------------------------------------------------------------------
    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._page,
            content_type="text/html",
            charset="utf-8",
            headers={"Cache-Control": "no-cache", "Content-Security-Policy": _CSP},
        )

    async def _health(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def _ready(self, request: web.Request) -> web.Response:
        reasons = views.readiness(self._app)
        return _json({"ready": not reasons, "reasons": reasons}, 503 if reasons else 200)

    async def _metrics(self, request: web.Request) -> web.Response:
        metrics = list(self._collector.collect())  # one consistent snapshot of the counters
        body = []
        for chunk in exposition_chunks(metrics):
            body.append(chunk)
            await asyncio.sleep(0)  # let a due poll run between chunks
        resp = web.Response(body=b"".join(body))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def _status(self, request: web.Request) -> web.Response:
        since: float | None = None
        raw = request.query.get("history_since")
        if raw is not None:
            try:
                since = float(raw)
            except ValueError:
                return self._refuse(400, "bad_parameter", "history_since must be a number")
        return _json(views.status(self._app, since))

    async def _devices(self, request: web.Request) -> web.Response:
        return _json({"devices": views.devices(self._app)})

    async def _device(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        for i, s in enumerate(self._app.acquisition.stats()):
            if s["device"] == name:
                return _json(views.device(self._app, i, s, history=True))
        return self._refuse(404, "unknown_device", f"no device named {name!r}")

    async def _alerts(self, request: web.Request) -> web.Response:
        return _json(views.alerts(self._app))

    async def _engine(self, request: web.Request) -> web.Response:
        return _json(views.engine(self._app, self._app.stats()))

    async def _ack(self, request: web.Request) -> web.Response:
        refused = self._check_token(request)
        if refused is not None:
            return refused
        body = await request.read()  # 413 past client_max_size (the middleware answers)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return self._refuse(400, "malformed_json", "body is not valid JSON")
        alert_id = data.get("alert_id") if isinstance(data, dict) else None
        if not isinstance(alert_id, str) or not alert_id:
            return self._refuse(400, "bad_parameter", 'body must be {"alert_id": "<id>"}')
        if not self._app.alerts.acknowledge(alert_id):
            return self._refuse(404, "unknown_alert", f"no active alert {alert_id!r}")
        log.info("alert %s acknowledged through the local API", alert_id)
        return _json({"alert_id": alert_id, "acknowledged": True})


#: The status page loads nothing from elsewhere: inline script and style, same-origin fetches.
_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"
)

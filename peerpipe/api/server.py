"""The host's HTTP face: the OpenAI-compatible API, the dashboard, its live feed and /metrics.

It listens on 127.0.0.1 unless told otherwise; with an API key, everything but the dashboard's
static page needs ``Authorization: Bearer KEY`` (the dashboard's live feed, which a browser's
EventSource cannot give headers, takes ``?key=``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any

from aiohttp import web

from peerpipe.api.addresses import is_loopback
from peerpipe.api.browser_nodes import BrowserHost, BrowserRoutes
from peerpipe.api.errors import ApiError, ListenError, bad_request
from peerpipe.api.generation import Generations, Job, cancel_on_exit
from peerpipe.api.metrics import Metrics
from peerpipe.api.requests import ChatRequest, CompletionRequest, parse_chat, parse_completion
from peerpipe.api.responses import ChunkWriter, chat_completion, completion
from peerpipe.api.snapshot import room_snapshot
from peerpipe.cluster.host_service import ClusterHost
from peerpipe.engine.decode import GenerationResult
from peerpipe.inference.entry import Entry

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY_BYTES = 4 << 20
STATIC = resources.files("peerpipe.api") / "static"


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def host_name(host: str) -> str:
    """The name in a Host header, without its port: ``[::1]:8088`` -> ``::1``, ``localhost.`` -> ``localhost``."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name if rest == "" or (rest[:1] == ":" and rest[1:].isdigit()) else host  # (else refused)
    name = host.rpartition(":")[0] if host.count(":") == 1 else host
    return name.rstrip(".")


def _error_response(error: ApiError) -> web.Response:
    headers = {"Retry-After": "1"} if error.code == "server_busy" else None
    return web.json_response(error.body(), status=error.status, headers=headers)


class ApiServer:
    """Serves one room: ``cluster`` for the view, the dashboard and /metrics; ``inference`` (None on
    a host without a model) for answers."""

    def __init__(
        self,
        cluster: ClusterHost,
        inference: Entry | None,
        *,
        api_key: str | None = None,
        max_pending: int = 64,
        feed_interval_s: float = 1.0,
        browsers: BrowserHost | None = None,
        cors: Sequence[str] = (),
    ) -> None:
        self.cluster = cluster
        self.cors = frozenset(origin.rstrip("/") for origin in cors)  # origins whose pages may call the API
        self.inference = inference
        self.api_key = api_key or None
        self.metrics = Metrics()
        self.feed_interval_s = feed_interval_s
        model = cluster.model
        self.model_id = model.model_id if model else ""
        self.created = int(time.time())
        self.generations = (
            Generations(inference, model_id=self.model_id, max_pending=max_pending, on_finish=self._finished)
            if inference is not None
            else None
        )
        self.browsers = BrowserRoutes(browsers)  # tabs that lend their GPU (api/browser_nodes.py)
        self.app = web.Application(
            client_max_size=MAX_BODY_BYTES, middlewares=[self._preflight, self._errors, self._guard, self._auth]
        )
        self.app.on_response_prepare.append(self._allow_origin)  # (before any body: streams too)
        self.app.add_routes(
            [
                web.get("/", self._index),
                web.get("/v1/models", self._models),
                web.get("/v1/models/{model}", self._model),
                web.post("/v1/chat/completions", self._chat),
                web.post("/v1/completions", self._completions),
                web.get("/metrics", self._metrics),
                web.get("/api/room", self._room),
                web.get("/api/events", self._events),
                web.static("/static", str(STATIC)),
                *self.browsers.routes(),
            ]
        )
        self._runner: web.AppRunner | None = None
        self.loopback = True  # where it listens; set by start()
        self._closing = asyncio.Event()  # ends the open feeds, so closing never waits on them
        self.url = ""

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(
        self, host: str = "127.0.0.1", port: int = 8088, *, sock: socket.socket | None = None, https: bool = False
    ) -> str:
        """Listen (on ``sock`` when the caller bound one already); returns the base URL (the real
        port when ``port`` is 0). ``https`` serves TLS with this machine's self-signed certificate."""
        tls = None
        if https:
            from peerpipe.api.tls import self_signed

            tls = self_signed([sock.getsockname()[0] if sock is not None else host])
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site: web.BaseSite = (
            web.SockSite(self._runner, sock, ssl_context=tls)
            if sock is not None
            else web.TCPSite(self._runner, host, port, reuse_address=True, ssl_context=tls)
        )
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ListenError(f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}") from exc
        bound = self._runner.addresses[0]
        self.browsers.bound = (bound[0], bound[1])
        self.loopback = is_loopback(bound[0])
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.url = f"{'https' if https else 'http'}://{shown}:{bound[1]}"
        return self.url

    async def close(self) -> None:
        self._closing.set()
        if self.generations is not None:
            await self.generations.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> ApiServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- middlewares --------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "other"
        try:
            response = await handler(request)
        except ApiError as exc:
            response = _error_response(exc)
        except web.HTTPException as exc:
            if not request.path.startswith(("/v1", "/api", "/metrics")):
                raise
            kind = "invalid_request_error" if exc.status < 500 else "server_error"
            code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
            response = _error_response(ApiError(exc.status, exc.reason, kind, code))
            if "Allow" in exc.headers:  # (a 405 says which methods the path takes)
                response.headers["Allow"] = exc.headers["Allow"]
        except Exception as exc:
            if not request.path.startswith(("/v1", "/api", "/metrics")):
                raise
            log.exception("%s %s failed", request.method, request.path)
            message = f"internal error ({type(exc).__name__}); the host's log has the details"
            response = _error_response(ApiError(500, message, "server_error", "internal"))
        self.metrics.requests.inc(endpoint=endpoint, status=str(response.status))
        return response

    def _allowed(self, request: web.Request) -> str | None:
        """The request's Origin when ``cors`` lets its pages read our answers, else None."""
        origin = request.headers.get("Origin")
        return origin if origin and ("*" in self.cors or origin in self.cors) else None

    @web.middleware
    async def _preflight(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """A browser asks before a page on another origin may send JSON or a key: yes for the
        origins ``--cors`` names (no key needed to ask), else a refusal that says how to allow it."""
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return await handler(request)
        if self._allowed(request) is None:
            origin = request.headers.get("Origin", "")
            return _error_response(
                ApiError(403, f"pages on {origin or 'another origin'} may not call this API: the host allows them with "
                         f"--cors {origin or 'ORIGIN'}", code="cross_origin")
            )
        return web.Response(status=204, headers={
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": "Authorization, Content-Type",
            "Access-Control-Max-Age": "600",
        })

    async def _allow_origin(self, request: web.Request, response: web.StreamResponse) -> None:
        if (origin := self._allowed(request)) is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers.add("Vary", "Origin")

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Keep web pages the user visits from using a local API: a page can post a form or plain
        text to any address without asking (so bodies must be declared JSON), and through DNS
        rebinding it can reach 127.0.0.1 under its own name (so on loopback the Host must be ours)."""
        if self.loopback and host_name(request.host) not in LOOPBACK_NAMES:
            raise ApiError(403, f"this host serves {self.url} only; Host {request.host!r} is refused", code="bad_host")
        if request.method == "POST" and request.content_type != "application/json":
            raise ApiError(
                415, "send the body as JSON, with 'Content-Type: application/json'", code="unsupported_media_type"
            )
        return await handler(request)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        open_paths = request.path == "/" or request.path.startswith(("/static/", *BrowserRoutes.OPEN))
        if self.api_key and not open_paths and not self._authorized(request):
            raise ApiError(
                401, "a valid API key is required: send 'Authorization: Bearer KEY'", "invalid_request_error",
                "invalid_api_key",
            )
        return await handler(request)

    def _authorized(self, request: web.Request) -> bool:
        assert self.api_key is not None
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            given = ""
        if not given and request.path.startswith("/api/"):
            given = request.query.get("key", "")
        # Headers arrive decoded with surrogate escapes: encode them back the same way.
        return hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), self.api_key.encode())

    # -- OpenAI -------------------------------------------------------------------------------

    def _model_object(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "peerpipe"}

    async def _models(self, request: web.Request) -> web.Response:
        data = [self._model_object()] if self.model_id else []
        return web.json_response({"object": "list", "data": data})

    async def _model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if not self.model_id or name != self.model_id:
            raise ApiError(404, f"the model {name!r} does not exist here", "invalid_request_error", "model_not_found")
        return web.json_response(self._model_object())

    async def _body(self, request: web.Request) -> object:
        try:
            return json.loads(await request.read())
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise bad_request(f"the request body is not valid JSON: {str(exc)[:200]}") from exc

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, parse_chat(await self._body(request)))

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, parse_completion(await self._body(request)))

    async def _answer(self, request: web.Request, parsed: ChatRequest | CompletionRequest) -> web.StreamResponse:
        if self.generations is None:
            raise ApiError(503, "this host serves no model: start it with --model DIR", "server_error", "no_model")
        began = time.monotonic()
        job = await self.generations.start(parsed)
        chat = isinstance(parsed, ChatRequest)
        with cancel_on_exit(job):
            echo = ""
            if isinstance(parsed, CompletionRequest) and parsed.echo:
                echo = job.pipeline.tokenizer.decode(job.prompt_ids)
            if parsed.stream:
                return await self._stream(
                    request, job, chat=chat, echo=echo, include_usage=parsed.include_usage, began=began
                )
            result = await job.result()
        self._record(job, began)
        body = chat_completion(job.job_id, self.model_id, result) if chat else completion(
            job.job_id, self.model_id, result, echo
        )
        return web.json_response(body)

    async def _stream(
        self, request: web.Request, job: Job, *, chat: bool, echo: str, include_usage: bool, began: float
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        chunks = ChunkWriter(job.job_id, self.model_id, chat=chat)
        try:
            if (first := chunks.first()) is not None:
                await response.write(first)
            if echo:
                await response.write(chunks.text(echo))
            async for piece in job.stream():
                await response.write(chunks.text(piece))
            try:
                result = await job.result()
            except ApiError as exc:  # the headers are out: the error goes in the stream
                await response.write(chunks.error(exc.body()))
                return response
            self._record(job, began)
            await response.write(chunks.last(result))
            if include_usage:
                await response.write(chunks.usage(result))
            await response.write(chunks.done())
            await response.write_eof()
        except ConnectionError:
            log.info("client left during the stream of %s", job.job_id)  # cancel_on_exit frees the stages
        return response

    def _record(self, job: Job, began: float) -> None:
        """Latencies as the client sees them: from the request's arrival, queueing included."""
        now = time.monotonic()
        self.metrics.latency.observe(now - began)
        self.metrics.ttft.observe((job.first_piece or now) - began)

    def _finished(self, task: asyncio.Task[GenerationResult]) -> None:
        """Count every answer once, however it ended (a client that left cancels it)."""
        if task.cancelled() or task.exception() is not None:
            self.metrics.answers.inc(finish_reason="error")
            return
        result = task.result()
        self.metrics.answers.inc(finish_reason=result.finish_reason)
        self.metrics.prompt_tokens.inc(len(result.prompt_ids))
        self.metrics.generated_tokens.inc(len(result.tokens))

    # -- dashboard, feed, metrics ---------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.StreamResponse:
        html = (STATIC / "index.html").read_text(encoding="utf-8")
        return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-cache"})

    def snapshot(self) -> dict[str, Any]:
        cluster = self.cluster
        model = None
        if cluster.model is not None:
            cfg = cluster.model.config
            model = {"id": self.model_id, "layers": cfg.n_layers, "dtype": cluster.model.dtype, "hidden": cfg.hidden_size}
        ready = self.inference is not None and self.inference.ready
        return room_snapshot(
            cluster.room_view(),
            host_id=cluster.node.node_id,
            code=str(cluster.node.code),
            model=model,
            ready=ready,
            why_not_ready="" if ready else cluster.why_not_ready(),
            totals=self.metrics.totals(),
            recovery=dataclasses.asdict(self.inference.pipeline.recovery) if self.inference else None,
            speculation=self.inference.speculator.to_json() if self.inference else None,
        )

    async def _room(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot())

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            while not self._closing.is_set():
                await response.write(b"event: room\ndata: " + json.dumps(self.snapshot()).encode() + b"\n\n")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), self.feed_interval_s)
        return response

    async def _metrics(self, request: web.Request) -> web.Response:
        recovery = self.inference.pipeline.recovery if self.inference is not None else None
        speculation = self.inference.speculator.totals if self.inference is not None else None
        body = self.metrics.render(self.cluster.room_view(), self.cluster.names(), recovery, speculation)
        return web.Response(body=body.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


"""The listener guard driven as ASGI middleware, one request at a time, in process.

``test_guard_polling.py`` serves the guard with uvicorn; these tests call the real
:class:`ListenerGuard` with ASGI scopes the way uvicorn does, in front of a small app,
and read what goes back to the peer. They pin what mutation testing found unchecked:
the status and body of every refusal (403 with its reason, 503 while closed, 413 with the
limit), the opening handshake, websocket refusals, the body cap for announced and for
streamed bodies (the app's late answer dropped), pass-through of non-HTTP scopes, and
the log line an operator reads.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from fedcore.deploy.guard import (
    DEFAULT_MAX_REQUEST_BYTES,
    OPEN_PATH,
    OPEN_TOKEN_HEADER,
    ListenerGuard,
    is_loopback,
)

LOCAL, PUBLIC = 9092, 9093
FLEET = "/api/v0/fleet/pull-messages"
TOKEN = bytes(range(16))


class App:
    """A stand-in for the SuperLink app: reads the whole body, answers 200 with its size."""

    def __init__(self, *, answer_first=False):
        self.calls = []
        self.received = []
        self.answer_first = answer_first  # start the response before reading the body

    async def __call__(self, scope, receive, send):
        self.calls.append(scope.get("type"))
        if scope["type"] != "http":
            message = await receive()  # e.g. lifespan.startup
            await send({"type": message["type"] + ".complete"})
            return
        if self.answer_first:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        body = b""
        while True:
            message = await receive()
            self.received.append(message["type"])
            if message["type"] == "http.disconnect":
                break
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        payload = json.dumps({"read": len(body)}).encode()
        if not self.answer_first:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": payload})


def _guard(app=None, **kw):
    kw = {"local_port": LOCAL, "public_paths": [FLEET], **kw}
    return ListenerGuard(app or App(), **kw)


def _scope(*, port=PUBLIC, host="10.0.0.2", peer="10.0.0.9", path=FLEET, method="POST", **kw):
    return {
        "type": "http",
        "method": method,
        "path": path,
        "server": (host if port == PUBLIC else "127.0.0.1", port),
        "client": (peer, 5555),
        "headers": kw.pop("headers", []),
        **kw,
    }


def _call(guard, scope, chunks=(b"",)):
    """Run one request through the guard; return (status, body, app saw it)."""
    sent = []
    incoming = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(guard(scope, receive, send))
    starts = [m for m in sent if m["type"] == "http.response.start"]
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    closes = [m for m in sent if m["type"] == "websocket.close"]
    if closes:
        return ("close", closes[0]["code"]), None
    assert len(starts) == 1, f"expected one response, got {sent}"
    return starts[0]["status"], json.loads(body) if body else None


def test_public_fleet_posts_pass_and_everything_else_is_403_with_the_reason():
    app = App()
    guard = _guard(app)
    assert _call(guard, _scope()) == (200, {"read": 0})
    for scope in (_scope(method="GET"), _scope(path="/api/v0/control/start-run")):
        status, body = _call(guard, scope)
        assert (status, body) == (
            403,
            {"detail": "forbidden: the public listener serves the Fleet API only"},
        )
    assert app.calls == ["http"]


def test_the_local_listener_serves_loopback_peers_only():
    guard = _guard()
    assert _call(guard, _scope(port=LOCAL, peer="127.0.0.1", path="/x", method="GET"))[0] == 200
    assert _call(guard, _scope(port=LOCAL, peer="::1", path="/x"))[0] == 200
    status, body = _call(guard, _scope(port=LOCAL, peer="10.0.0.9", path="/x"))
    assert (status, body) == (
        403,
        {"detail": "forbidden: the local listener serves loopback peers only"},
    )


def test_a_closed_public_listener_answers_503_until_opened_with_the_token():
    guard = _guard(start_open=False, open_token=TOKEN)
    assert _call(guard, _scope()) == (
        503,
        {"detail": "starting: admitted keys not registered yet"},
    )
    wrong = [(OPEN_TOKEN_HEADER.encode(), (b"\x00" * 16).hex().encode())]
    bad_hex = [(OPEN_TOKEN_HEADER.encode(), b"zz")]
    refused = {"detail": "forbidden: opening the public listener needs fedcore server's token"}
    for headers in ([], wrong, bad_hex):
        opened = _call(guard, _scope(port=LOCAL, peer="127.0.0.1", path=OPEN_PATH, headers=headers))
        assert opened == (403, refused)
    assert _call(guard, _scope())[0] == 503
    # the right token, under a header name in any case, on a GET: still refused
    right = [(OPEN_TOKEN_HEADER.upper().encode(), TOKEN.hex().encode())]
    get = _scope(port=LOCAL, peer="127.0.0.1", path=OPEN_PATH, method="GET", headers=right)
    assert _call(guard, get) == (403, refused)
    post = _scope(port=LOCAL, peer="127.0.0.1", path=OPEN_PATH, headers=right)
    assert _call(guard, post) == (200, {"detail": "public listener open"})
    assert _call(guard, _scope()) == (200, {"read": 0})


def test_without_a_token_the_open_endpoint_refuses_everyone():
    guard = _guard(start_open=False)
    headers = [(OPEN_TOKEN_HEADER.encode(), TOKEN.hex().encode())]
    status, _ = _call(guard, _scope(port=LOCAL, peer="127.0.0.1", path=OPEN_PATH, headers=headers))
    assert status == 403 and guard.open is False


def test_the_open_path_on_the_public_listener_is_just_forbidden():
    guard = _guard(start_open=False, open_token=TOKEN)
    headers = [(OPEN_TOKEN_HEADER.encode(), TOKEN.hex().encode())]
    status, body = _call(guard, _scope(path=OPEN_PATH, headers=headers))
    assert status == 403 and guard.open is False
    assert body == {"detail": "forbidden: the public listener serves the Fleet API only"}


def _passed_through(guard, scope):
    """What the app sends back when it answers the first message it receives."""
    sent = []

    async def receive():
        return {"type": "lifespan.startup" if scope["type"] == "lifespan" else "websocket"}

    async def send(message):
        sent.append(message["type"])

    asyncio.run(guard(scope, receive, send))
    return sent


def test_refused_websockets_are_closed_and_others_pass_with_their_channels(caplog):
    app = App()
    guard = _guard(app)
    ws = {"type": "websocket", "path": FLEET, "server": ("10.0.0.2", PUBLIC)}
    with caplog.at_level(logging.WARNING, logger="fedcore.guard"):
        assert _call(guard, ws) == (("close", 1008), None)
    # no method (a websocket) and no client address: the log says so
    assert caplog.messages == [
        f"refused WS {FLEET} from ?:? (the public listener serves the Fleet API only)"
    ]
    local_ws = {**ws, "server": ("127.0.0.1", LOCAL), "client": ("127.0.0.1", 2)}
    assert _passed_through(guard, local_ws) == ["websocket.complete"]
    assert _passed_through(guard, {"type": "lifespan"}) == ["lifespan.startup.complete"]
    assert app.calls == ["websocket", "lifespan"]


def test_the_public_port_on_a_loopback_address_is_still_the_public_listener():
    """Local tests bind both listeners to 127.0.0.1: the port tells them apart."""
    guard = _guard()
    control = _scope(host="127.0.0.1", peer="127.0.0.1", path="/api/v0/control/start-run")
    assert _call(guard, control) == (
        403,
        {"detail": "forbidden: the public listener serves the Fleet API only"},
    )


def test_a_cap_of_one_byte_is_allowed():
    assert _call(_guard(max_request_bytes=1), _scope(), [b"x"]) == (200, {"read": 1})


def test_past_the_cap_the_app_reads_a_disconnect():
    app = App()
    _call(_guard(app, max_request_bytes=10), _scope(), [b"x" * 6, b"x" * 6, b"x"])
    assert app.received == ["http.request", "http.disconnect"]


def test_a_response_already_started_is_not_answered_twice(caplog):
    """If the app answered before the body passed the cap, no 413 follows its start."""
    app = App(answer_first=True)
    with caplog.at_level(logging.WARNING, logger="fedcore.guard"):
        status, body = _call(
            _guard(app, max_request_bytes=10), {**_scope(), "client": None}, [b"x" * 11]
        )
    assert (status, body) == (200, None)  # the start went out; the late body is dropped
    assert caplog.messages == [
        f"refused POST {FLEET} from ?:? with 413: the body sent more than 10 bytes; "
        "the limit is 10 bytes (fedcore server --max-request-mb)"
    ]


def _length(n):
    return [(b"Content-Length", str(n).encode())]


def test_an_announced_body_over_the_cap_is_413_before_the_app_reads_it(caplog):
    app = App()
    guard = _guard(app, max_request_bytes=100)
    too_large = {"detail": "request body larger than 100 bytes (fedcore server --max-request-mb)"}
    with caplog.at_level(logging.WARNING, logger="fedcore.guard"):
        assert _call(guard, _scope(headers=_length(101)), [b"x" * 101]) == (413, too_large)
    assert app.calls == []
    assert caplog.messages == [
        f"refused POST {FLEET} from 10.0.0.9:5555 with 413: the body announces 101 bytes; "
        "the limit is 100 bytes (fedcore server --max-request-mb)"
    ]
    assert _call(guard, _scope(headers=_length(100)), [b"x" * 100]) == (200, {"read": 100})
    assert _call(guard, _scope(headers=[(b"content-length", b"junk")]), [b"x"]) == (
        200,
        {"read": 1},
    )


def test_a_streamed_body_passing_the_cap_is_413_and_the_apps_answer_is_dropped(caplog):
    guard = _guard(max_request_bytes=100)
    with caplog.at_level(logging.WARNING, logger="fedcore.guard"):
        status, body = _call(guard, _scope(), [b"x" * 60, b"x" * 41, b"x" * 10])
    assert (status, body) == (
        413,
        {"detail": "request body larger than 100 bytes (fedcore server --max-request-mb)"},
    )
    assert caplog.messages == [
        f"refused POST {FLEET} from 10.0.0.9:5555 with 413: the body sent more than 100 "
        "bytes; the limit is 100 bytes (fedcore server --max-request-mb)"
    ]
    assert _call(guard, _scope(), [b"x" * 60, b"x" * 40]) == (200, {"read": 100})


def test_refusals_are_logged_with_method_path_peer_and_reason(caplog):
    guard = _guard()
    with caplog.at_level(logging.WARNING, logger="fedcore.guard"):
        _call(guard, _scope(method="GET", path="/api/v0/control/list-runs"))
    assert caplog.messages == [
        "refused GET /api/v0/control/list-runs from 10.0.0.9:5555 "
        "(the public listener serves the Fleet API only)"
    ]


def test_responses_are_json_with_their_length():
    sent = []

    async def send(message):
        sent.append(message)

    asyncio.run(_guard()(_scope(method="GET"), None, send))
    start, body = sent
    headers = dict(start["headers"])
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"content-length"] == str(len(body["body"])).encode()
    assert body["type"] == "http.response.body"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"open_token": b"short"}, "open_token must be at least 16 random bytes"),
        ({"max_request_bytes": 0}, "max_request_bytes must be >= 1, got 0"),
    ],
)
def test_bad_guard_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match="^" + message + "$"):
        _guard(**kwargs)


def test_the_defaults():
    guard = _guard()
    assert guard.open is True and guard.open_token is None
    assert guard.max_request_bytes == DEFAULT_MAX_REQUEST_BYTES == 64 * 1024 * 1024
    assert _guard(open_token=TOKEN).open_token == TOKEN  # 16 bytes are enough


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.8.0.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("::ffff:10.0.0.1", False),
        ("fe80::1%eth0", False),
        ("::1%lo", True),
        ("10.0.0.1", False),
        ("localhost", False),
        (None, False),
    ],
)
def test_loopback_addresses(host, expected):
    assert is_loopback(host) is expected

"""A fault-injecting HTTP proxy between boto3 and moto_server (stdlib only, 127.0.0.1 only).

It records every request (the Action and the parsed parameters of the AWS query
protocol: EC2 and STS are form-encoded POSTs) and answers the requests a rule
matches as EC2 does when it says no: the HTTP status and XML body of a real EC2
error, or a connection reset. Everything else goes to moto unchanged.

    with EC2FaultProxy(moto_endpoint) as proxy:
        proxy.refuse("RunInstances", "InsufficientInstanceCapacity", where={"InstanceMarketOptions.MarketType": "spot"})
        proxy.refuse("DescribeInstances", "RequestLimitExceeded", first=3)
        proxy.reset("RunInstances", nth=2)                 # the 2nd RunInstances: connection reset
        ... run with AWS_ENDPOINT_URL=proxy.url ...
        proxy.calls("RunInstances", refused=True)         # what was refused
"""

from __future__ import annotations

import http.client
import http.server
import socket
import struct
import threading
import uuid
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import parse_qsl, urlsplit

# Status and message of each error as EC2 sends it (the EC2 API reference's
# "Error codes" page; InsufficientInstanceCapacity is a server error, 500).
EC2_ERRORS = {
    "InsufficientInstanceCapacity": (500, "We currently do not have sufficient {InstanceType} capacity in the "
                                          "Availability Zone you requested ({zone}). Our system will be working on "
                                          "provisioning additional capacity. You can currently get {InstanceType} "
                                          "capacity by not specifying an Availability Zone in your request or choosing "
                                          "a different Availability Zone."),
    "RequestLimitExceeded": (503, "Request limit exceeded."),
    "VcpuLimitExceeded": (400, "You have requested more vCPU capacity than your current vCPU limit of 4 allows for "
                               "the instance bucket that the specified instance type belongs to. Please visit "
                               "http://aws.amazon.com/contact-us/ec2-request to request an adjustment to this limit."),
    "InstanceLimitExceeded": (400, "You have requested more instances than your current instance limit allows."),
    "MaxSpotInstanceCountExceeded": (400, "Max spot instance count exceeded"),
    "Unsupported": (400, "Your requested instance type ({InstanceType}) is not supported in your requested "
                         "Availability Zone ({zone})."),
    "InternalError": (500, "An internal error has occurred."),
}

Predicate = Callable[[dict[str, str]], bool]


def ec2_error_body(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}</Code>'
            f"<Message>{message}</Message></Error></Errors><RequestID>{uuid.uuid4()}</RequestID></Response>").encode()


@dataclass
class Rule:
    action: str
    code: str | None            # an EC2 error code, or None for a connection reset
    where: Predicate | None = None
    first: int | None = None    # only the first N matching calls (None: always)
    nth: int | None = None      # only the n-th matching call (1-based)
    forward: bool = False       # reset only: let moto do the request first (the answer is lost)
    seen: int = 0               # matching calls so far
    fired: int = 0

    def applies(self, action: str, params: dict[str, str]) -> bool:
        if action != self.action or (self.where is not None and not self.where(params)):
            return False
        self.seen += 1
        if self.nth is not None:
            return self.seen == self.nth
        return self.first is None or self.seen <= self.first


@dataclass
class Call:
    action: str
    params: dict[str, str]
    status: int | None = None   # what the client got; None for a reset
    code: str | None = None     # the injected error code, 'reset', or None when moto answered
    extra: dict = field(default_factory=dict)

    @property
    def refused(self) -> bool:
        return self.code is not None


def _matcher(where: dict[str, str] | Predicate | None) -> Predicate | None:
    if where is None or callable(where):
        return where
    return lambda params: all(params.get(k) == v for k, v in where.items())


class EC2FaultProxy:
    HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer"}

    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        if parts.hostname != "127.0.0.1":
            raise ValueError("the proxy only talks to 127.0.0.1")
        self.upstream = (parts.hostname, parts.port)
        self.rules: list[Rule] = []
        self.log: list[Call] = []
        self.lock = threading.Lock()
        self.server: http.server.ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    # -- rules ---------------------------------------------------------------
    def refuse(self, action: str, code: str, *, where=None, first: int | None = None, nth: int | None = None) -> Rule:
        """Answer matching calls with EC2's error `code` (EC2_ERRORS gives status and message)."""
        if code not in EC2_ERRORS:
            raise ValueError(f"unknown EC2 error {code}; add its status and message to EC2_ERRORS")
        rule = Rule(action, code, _matcher(where), first, nth)
        with self.lock:
            self.rules.append(rule)
        return rule

    def reset(self, action: str, *, nth: int, where=None, forward: bool = True) -> Rule:
        """Reset the connection of the n-th matching call; forward=True lets moto carry it out first."""
        rule = Rule(action, None, _matcher(where), None, nth, forward)
        with self.lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()
            self.log.clear()

    # -- what happened -------------------------------------------------------
    def calls(self, action: str | None = None, *, refused: bool | None = None, code: str | None = None) -> list[Call]:
        with self.lock:
            return [c for c in self.log if (action is None or c.action == action)
                    and (refused is None or c.refused == refused) and (code is None or c.code == code)]

    # -- server --------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "EC2FaultProxy":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> str:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):  # noqa: N802
                proxy._handle(self)

            do_POST = do_PUT = do_DELETE = do_HEAD = do_GET  # noqa: N815

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self.url

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def _handle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        query = urlsplit(handler.path).query
        params = dict(parse_qsl(query, keep_blank_values=True))
        if "x-www-form-urlencoded" in (handler.headers.get("Content-Type") or ""):
            params.update(parse_qsl(body.decode(), keep_blank_values=True))
        action = params.get("Action") or (handler.headers.get("X-Amz-Target") or "").rsplit(".", 1)[-1]
        call = Call(action, params)
        with self.lock:
            # Every rule counts the call (first/nth are per rule); the first that fires answers.
            rule = next(iter([r for r in self.rules if r.applies(action, params)]), None)
            if rule:
                rule.fired += 1
            self.log.append(call)
        if rule and rule.code is None:
            call.code = "reset"
            if rule.forward:
                self._forward(handler, body)
            self._reset(handler)
            return
        if rule:
            status, message = EC2_ERRORS[rule.code]
            zone = params.get("Placement.AvailabilityZone") or params.get("SubnetId", "the zone")
            message = message.replace("{InstanceType}", params.get("InstanceType", "this instance type")).replace(
                "{zone}", zone)
            call.status, call.code = status, rule.code
            self._answer(handler, status, ec2_error_body(rule.code, message))
            return
        status, headers, data = self._forward(handler, body)
        call.status = status
        handler.send_response(status)
        for key, value in headers:
            if key.lower() not in self.HOP_BY_HOP and key.lower() != "content-length":
                handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)

    def _forward(self, handler, body: bytes):
        conn = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in self.HOP_BY_HOP}
            conn.request(handler.command, handler.path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()

    @staticmethod
    def _answer(handler, status: int, body: bytes) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", "text/xml;charset=UTF-8")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    @staticmethod
    def _reset(handler) -> None:
        # SO_LINGER 0: close() sends a TCP RST instead of a FIN.
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        handler.close_connection = True
        handler.connection.close()

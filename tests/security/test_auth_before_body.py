"""Finding 8: nothing is read before the key is checked.

Against a real gateway process (uvicorn, Postgres, Redis, S3): a client without a key, or with a key
that lacks the route's role, announces a huge body (a 256 MiB JSON, a 4 GiB dataset, an endless
chunked upload), sends only its first 4 KiB and waits. The gateway must answer 401/403 with just those
bytes sent and hang up; a gateway that parsed the body first would wait for the rest and never answer.
Wrong keys from one address are throttled (429 + Retry-After); a key over its rate or quota gets 429.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import ADMIN_HEADERS
from tests.security.gateway_process import running_gateway

pytestmark = pytest.mark.e2e

FAILURES_PER_MINUTE = 5
REQUESTS_PER_MINUTE = 20
DAILY_QUOTA = 5
KEY_CACHE_S = 0.05  # so a known key is looked up again, from a throttled address, within the test
BODY_PREFIX = 4096  # all the body a refused client ever sends
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def gateway(services_env, services_settings, tmp_path_factory) -> str:
    log = tmp_path_factory.mktemp("auth-before-body") / "gateway.log"
    with running_gateway(
        services_env,
        log,
        auth_failures_per_minute=FAILURES_PER_MINUTE,
        rate_limit_per_key=REQUESTS_PER_MINUTE,
        daily_quota_per_key=DAILY_QUOTA,
        auth_cache_s=KEY_CACHE_S,
    ) as url:
        yield url


@pytest.fixture(scope="module")
def keys(gateway) -> dict[str, str]:
    made = {}
    for name, roles in (("submitter", ["submit"]), ("steady", ["submit"]), ("busy", ["submit"])):
        body = {"name": name, "organisation": "hospital-limits", "roles": roles}
        response = httpx.post(f"{gateway}/v1/api-keys", json=body, headers=ADMIN_HEADERS, timeout=30)
        assert response.status_code == 201, response.text
        made[name] = response.json()["key"]
    return made


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes
    body_bytes_sent: int
    closed: bool


def send_and_wait(url: str, head: list[str], body_prefix: bytes, timeout: float = 15) -> RawAnswer:
    """Sends the request head and `body_prefix`, nothing more, then reads the answer from a raw socket."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(("\r\n".join([*head, f"Host: {parts.netloc}", "", ""])).encode() + body_prefix)
        received = b""
        try:
            while b"\r\n\r\n" not in received:
                chunk = sock.recv(65536)
                assert chunk, "the gateway hung up without an answer"
                received += chunk
            status_and_headers, _, body = received.partition(b"\r\n\r\n")
            lines = status_and_headers.decode("latin-1").split("\r\n")
            fields = (line.partition(":") for line in lines[1:])
            headers = {name.strip().lower(): value.strip() for name, _, value in fields}
            while len(body) < int(headers.get("content-length", "0")):
                body += sock.recv(65536)
            closed = _hangs_up(sock)
        except TimeoutError:
            pytest.fail(f"no answer within {timeout}s: the gateway waits for the body it was announced")
        return RawAnswer(int(lines[0].split()[1]), headers, body, len(body_prefix), closed)


def _hangs_up(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def forwarded_for(address: str) -> str:
    """Whose request this is: uvicorn takes the client address from loopback proxies' X-Forwarded-For."""
    return f"X-Forwarded-For: {address}"


def test_a_256_mib_json_without_a_key_is_refused_before_its_body(gateway) -> None:
    answer = send_and_wait(
        gateway,
        [
            "POST /v1/api-keys HTTP/1.1",
            "Content-Type: application/json",
            f"Content-Length: {256 * MiB}",
            forwarded_for("198.51.100.1"),
        ],
        b'{"name": "' + b"a" * (BODY_PREFIX - 10),
    )
    assert answer.status == 401, answer.body
    assert b'"code":"unauthorized"' in answer.body
    assert answer.headers["www-authenticate"].startswith("Bearer")
    assert answer.body_bytes_sent == BODY_PREFIX and answer.closed


def test_an_endless_streamed_dataset_upload_without_a_key_is_refused_before_its_body(gateway) -> None:
    part_head = b'--xq\r\nContent-Disposition: form-data; name="file"; filename="huge.zip"\r\n\r\n'
    chunk = part_head + b"\0" * (BODY_PREFIX - len(part_head))
    answer = send_and_wait(
        gateway,
        [
            "POST /v1/datasets HTTP/1.1",
            "Content-Type: multipart/form-data; boundary=xq",
            "Transfer-Encoding: chunked",
            "Authorization: Bearer xq_not_a_key",
            forwarded_for("198.51.100.2"),
        ],
        f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n",  # ...and the rest never comes
    )
    assert answer.status == 401, answer.body
    assert answer.closed


@pytest.mark.parametrize(
    ("path", "size"),
    # Each under its route's own body cap: only the key check can answer before the body comes.
    [("/v1/datasets", 4 * 1024 * MiB), ("/v1/models/chest-xray/import", 1024 * MiB - BODY_PREFIX)],
    ids=["a 4 GiB dataset", "1 GiB of weights"],
)
def test_a_submit_key_uploading_to_a_train_route_is_refused_before_its_body(gateway, keys, path, size) -> None:
    part_head = b'--xq\r\nContent-Disposition: form-data; name="file"; filename="huge.bin"\r\n\r\n'
    answer = send_and_wait(
        gateway,
        [
            f"POST {path} HTTP/1.1",
            "Content-Type: multipart/form-data; boundary=xq",
            f"Content-Length: {size}",
            f"Authorization: Bearer {keys['submitter']}",
        ],
        part_head + b"\0" * (BODY_PREFIX - len(part_head)),
    )
    assert answer.status == 403, answer.body
    assert b'"code":"forbidden"' in answer.body and b"'train'" in answer.body
    assert answer.closed


def test_wrong_keys_from_one_address_are_throttled(gateway, keys) -> None:
    attacker = {"X-Forwarded-For": "203.0.113.7"}
    # A colleague behind the same NAT, whose key this gateway has accepted before.
    colleague = {**attacker, "Authorization": f"Bearer {keys['submitter']}"}
    with httpx.Client(base_url=gateway, timeout=30) as http:
        assert http.get("/v1/jobs", headers=colleague).status_code == 200
        accepted_at = time.monotonic()
        for _ in range(2 * FAILURES_PER_MINUTE):  # no key: nothing looked up, nothing to throttle
            assert http.get("/v1/jobs", headers=attacker).status_code == 401
        for attempt in range(FAILURES_PER_MINUTE):
            guess = http.get("/v1/jobs", headers={**attacker, "Authorization": f"Bearer xq_guess_{attempt}"})
            assert guess.status_code == 401, guess.text
        throttled = http.get("/v1/jobs", headers={**attacker, "Authorization": "Bearer xq_guess_again"})
        assert throttled.status_code == 429, throttled.text
        assert throttled.json()["code"] == "too_many_failed_authentications"
        assert 1 <= int(throttled.headers["Retry-After"]) <= 60
        # A throttled address is refused before its body too.
        guessing = {**attacker, "Authorization": "Bearer xq_guess_with_upload"}
        upload = http.post("/v1/jobs", files={"file": ("x.png", b"\0" * MiB)}, headers=guessing)
        assert upload.status_code == 429
        while time.monotonic() - accepted_at <= KEY_CACHE_S:  # the colleague's key has left the cache
            assert http.get("/v1/jobs", headers={**attacker, "Authorization": "Bearer xq_more"}).status_code == 429
        # Neither is a known key from that address, nor another address punished for its guesses.
        assert http.get("/v1/jobs", headers=colleague).status_code == 200
        other = http.get("/v1/jobs", headers={"X-Forwarded-For": "203.0.113.8", "Authorization": "Bearer xq_typo"})
        assert other.status_code == 401


def test_a_key_over_its_rate_limit_gets_429_and_others_are_served(gateway, keys) -> None:
    busy = {"Authorization": f"Bearer {keys['busy']}"}
    with httpx.Client(base_url=gateway, timeout=30) as http:
        for _ in range(REQUESTS_PER_MINUTE):
            assert http.get("/v1/jobs", headers=busy).status_code == 200
        limited = http.get("/v1/jobs", headers=busy)
        assert limited.status_code == 429, limited.text
        assert limited.json()["code"] == "rate_limited"
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
        assert http.get("/v1/jobs", headers={"Authorization": f"Bearer {keys['steady']}"}).status_code == 200


def test_a_key_over_its_daily_quota_of_submissions_gets_429(gateway, keys) -> None:
    steady = {"Authorization": f"Bearer {keys['steady']}"}
    with httpx.Client(base_url=gateway, timeout=30) as http:
        for _ in range(DAILY_QUOTA):  # each submission counts, whatever its fate
            assert http.post("/v1/jobs", files={"file": ("x.png", b"not an image")}, headers=steady).status_code == 415
        over = http.post("/v1/jobs", files={"file": ("x.png", b"not an image")}, headers=steady)
        assert over.status_code == 429, over.text
        assert over.json()["code"] == "quota_exceeded"
        assert int(over.headers["Retry-After"]) >= 1
        assert http.get("/v1/jobs", headers=steady).status_code == 200  # reading is not a submission

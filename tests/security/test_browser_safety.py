"""Finding 10: the open mode (no API keys) is safe from a web page in the operator's browser.

Against a real gateway process with authentication off (as `xrayq up` on loopback): requests as a
browser sends them for a DNS-rebinding page (its own name in `Host`) and for a cross-site page (a
foreign `Origin`, `Sec-Fetch-Site: cross-site`, a form post, a bodiless promotion) change nothing;
curl, the CLI and the same-origin /docs page still work.
"""

from __future__ import annotations

import httpx
import pytest

from tests.security.gateway_process import running_gateway

pytestmark = pytest.mark.e2e

VIEWER = "https://viewer.example"  # a web app the operator allowed (XRAYQ_CORS_ORIGINS)


@pytest.fixture(scope="module")
def gateway(services_env, services_settings, services_model, tmp_path_factory) -> str:
    log = tmp_path_factory.mktemp("browser-safety") / "gateway.log"
    with running_gateway(services_env, log, auth="off", cors_origins=VIEWER) as url:
        yield url


@pytest.fixture
def http(gateway):
    with httpx.Client(base_url=gateway, timeout=30) as client:  # no key: the open mode needs none
        yield client


def image(chest_images) -> dict:
    return {"file": ("chest.jpeg", chest_images["NORMAL"][25].read_bytes(), "image/jpeg")}


def job_count(http: httpx.Client) -> int:
    return len(http.get("/v1/jobs", params={"limit": 500}).json())


def test_a_dns_rebinding_page_gets_no_answer(http, gateway, chest_images) -> None:
    port = gateway.rsplit(":", 1)[1]
    before = job_count(http)
    rebound = {"Host": f"attacker.example:{port}"}
    for response in (
        http.get("/v1/jobs", headers=rebound),
        http.get("/v1/models", headers=rebound),
        http.post(
            "/v1/jobs", files=image(chest_images), headers={**rebound, "Origin": f"http://attacker.example:{port}"}
        ),
    ):
        assert response.status_code == 421, response.text
        assert response.json()["code"] == "host_not_allowed"
    assert job_count(http) == before
    for own in (f"localhost:{port}", f"127.0.0.1:{port}"):
        assert http.get("/v1/models", headers={"Host": own}).status_code == 200


def test_cross_site_state_changes_are_refused(http, chest_images) -> None:
    before, keys_before = job_count(http), http.get("/v1/api-keys").json()
    form_post = http.post("/v1/jobs", files=image(chest_images), headers={"Origin": "https://evil.example"})
    assert form_post.status_code == 403 and form_post.json()["code"] == "cross_site_request"
    # A page from a sandboxed frame or a file sends `Origin: null`; an old browser only Sec-Fetch-Site.
    sandboxed = http.post("/v1/jobs", files=image(chest_images), headers={"Origin": "null"})
    assert sandboxed.status_code == 403
    fetch_metadata = http.post("/v1/jobs", files=image(chest_images), headers={"Sec-Fetch-Site": "cross-site"})
    assert fetch_metadata.status_code == 403
    # A JSON body sent as text/plain needs no preflight either.
    key = http.post(
        "/v1/api-keys",
        content=b'{"name": "mine", "organisation": "evil", "roles": ["admin"]}',
        headers={"Origin": "https://evil.example", "Content-Type": "text/plain"},
    )
    assert key.status_code == 403
    # A bodiless promotion or rollback: the simplest cross-site request there is.
    for path in ("/v1/models/chest-xray/rollback", "/v1/models/chest-xray/versions/1/promote"):
        promoted = http.post(path, headers={"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"})
        assert promoted.status_code == 403, promoted.text
    cancel = http.delete("/v1/jobs/00000000-0000-0000-0000-000000000000", headers={"Origin": "https://evil.example"})
    assert cancel.status_code == 403
    assert job_count(http) == before
    assert http.get("/v1/api-keys").json() == keys_before


def test_curl_the_docs_page_and_an_allowed_web_app_still_work(http, gateway, chest_images) -> None:
    curl = http.post("/v1/jobs", files=image(chest_images), headers={"User-Agent": "curl/8.5.0"})
    assert curl.status_code == 202, curl.text
    docs = http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert http.get("/openapi.json").status_code == 200
    # "Try it out" on /docs: the page's own origin.
    same_origin = http.post(
        "/v1/jobs", files=image(chest_images), headers={"Origin": gateway, "Sec-Fetch-Site": "same-origin"}
    )
    assert same_origin.status_code == 202, same_origin.text
    allowed = http.post(
        "/v1/jobs", files=image(chest_images), headers={"Origin": VIEWER, "Sec-Fetch-Site": "cross-site"}
    )
    assert allowed.status_code == 202, allowed.text
    assert allowed.headers["access-control-allow-origin"] == VIEWER

"""Who may do what: every route of the app against a table of the role it needs, keys, sign-in.

The table must name every route the app has: a new route without a row fails the first test, so
no route ships without a decision on who may call it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from serving.app import create_app
from serving.auth import COOKIE, Role, hash_key
from tests.serving.conftest import MakeSettings
from tests.serving.helpers import ADMIN_KEY, BRIGHT, DARK, TINY_VERSION, module_frame, png

OPEN = "open"  # no key needed: probes, Prometheus, sign-in
PAGE = "page"  # a page: without a key it redirects to /signin

# (method, route template) -> the least role that may call it, OPEN, or (PAGE, role)
ROUTES: dict[tuple[str, str], Any] = {
    ("GET", "/healthz"): OPEN,
    ("GET", "/metrics"): OPEN,
    ("GET", "/v2/health/live"): OPEN,
    ("GET", "/v2/health/ready"): OPEN,
    ("GET", "/signin"): OPEN,
    ("POST", "/signin"): OPEN,
    ("POST", "/signout"): OPEN,
    ("GET", "/"): OPEN,  # a redirect to /screen, which asks for the key
    ("GET", "/screen"): (PAGE, Role.LINE),
    ("GET", "/review"): (PAGE, Role.ENGINEER),
    ("GET", "/whoami"): Role.LINE,
    ("GET", "/openapi.json"): Role.LINE,
    ("GET", "/events"): Role.LINE,
    ("GET", "/lines"): Role.LINE,
    ("GET", "/lines/{line_id}"): Role.LINE,
    ("GET", "/lines/{line_id}/stats"): Role.LINE,
    ("POST", "/lines/{line_id}/modules"): Role.LINE,
    ("POST", "/lines/{line_id}/cells"): Role.LINE,
    ("GET", "/inspections"): Role.LINE,
    ("GET", "/inspections/{inspection_id}"): Role.LINE,
    ("GET", "/inspections/{inspection_id}/frame"): Role.LINE,
    ("GET", "/inspections/{inspection_id}/preview"): Role.LINE,
    ("GET", "/v2"): Role.LINE,
    ("GET", "/v2/models/{name}"): Role.LINE,
    ("GET", "/v2/models/{name}/versions/{version}"): Role.LINE,
    ("GET", "/v2/models/{name}/ready"): Role.LINE,
    ("GET", "/v2/models/{name}/versions/{version}/ready"): Role.LINE,
    ("POST", "/v2/models/{name}/infer"): Role.LINE,
    ("POST", "/v2/models/{name}/versions/{version}/infer"): Role.LINE,
    ("GET", "/review/vocabulary"): Role.ENGINEER,
    ("GET", "/review/queue"): Role.ENGINEER,
    ("GET", "/review/inspections/{inspection_id}"): Role.ENGINEER,
    ("POST", "/review/inspections/{inspection_id}/decisions"): Role.ENGINEER,
    ("GET", "/review/inspections/{inspection_id}/cells/{row}/{col}/heatmap"): Role.ENGINEER,
    ("GET", "/review/decisions"): Role.ENGINEER,
    ("GET", "/review/labels"): Role.ENGINEER,
    ("GET", "/keys"): Role.ADMIN,
    ("POST", "/keys"): Role.ADMIN,
    ("POST", "/keys/{key_id}/revoke"): Role.ADMIN,
    ("GET", "/admin/config"): Role.ADMIN,
    ("GET", "/models"): Role.ADMIN,
    ("POST", "/models/reload"): Role.ADMIN,
}


def post_module(client: TestClient, line: str, serial: str, dark: bool = True) -> dict[str, Any]:
    rows, cols = (6, 10) if line == "L1" else (6, 24)
    levels = np.full((rows, cols), BRIGHT)
    if dark:
        levels[1, 2] = DARK
    headers = {"Content-Type": "image/png", "X-Module-Serial": serial, "X-Frame-Id": "1"}
    response = client.post(f"/lines/{line}/modules", content=png(module_frame(levels)), headers=headers)
    assert response.status_code == 201, response.text
    return dict(response.json())


def make_key(client: TestClient, name: str, role: Role, line_id: str | None = None) -> str:
    response = client.post("/keys", json={"name": name, "role": role.value, "line_id": line_id})
    assert response.status_code == 201, response.text
    return str(response.json()["key"])


@pytest.fixture
def world(sqlite_client: TestClient) -> Iterator[dict[str, Any]]:
    """An app with one inspection per line and a key of each role (the line key for L1)."""
    client = sqlite_client
    keys = {
        Role.ADMIN: ADMIN_KEY,
        Role.ENGINEER: make_key(client, "eng", Role.ENGINEER),
        Role.LINE: make_key(client, "line-1", Role.LINE, "L1"),
    }
    spare = client.post("/keys", json={"name": "spare", "role": "engineer"}).json()
    yield {
        "client": client,
        "keys": keys,
        "l1": post_module(client, "L1", "A1")["inspection_id"],
        "l2": post_module(client, "L2", "B1")["inspection_id"],
        "spare_key_id": spare["id"],
    }


def app_routes(client: TestClient) -> set[tuple[str, str]]:
    """(method, path template) of every API route, through included routers too."""
    found = set()
    for route in client.app.routes:  # type: ignore[attr-defined]
        # FastAPI >= 0.16x keeps included routers as one entry that lists its effective routes
        contexts = route.effective_route_contexts() if hasattr(route, "effective_route_contexts") else [route]
        for context in contexts:
            if isinstance(context, APIRoute) or hasattr(context, "original_route"):
                found |= {(method, context.path) for method in set(context.methods) - {"HEAD"}}
    return found


def test_the_table_names_every_route(sqlite_client: TestClient) -> None:
    assert app_routes(sqlite_client) == set(ROUTES)


def concrete(path: str, world: dict[str, Any]) -> str:
    values = {
        "line_id": "L1",
        "inspection_id": world["l1"],
        "name": "pvqc-cell",
        "version": TINY_VERSION,
        "row": 1,
        "col": 2,
        "key_id": world["spare_key_id"],
    }
    return path.format(**values)


def call(client: TestClient, method: str, path: str, key: str | None) -> int:
    headers = {"Authorization": "", "Cookie": ""}  # drop the fixture's admin header
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    # follow_redirects off: a page's answer to "no key" is the redirect itself
    response = client.request(method, path, headers=headers, follow_redirects=False)
    return response.status_code


@pytest.mark.parametrize(("method", "template"), sorted(ROUTES))
def test_every_route_checks_its_role(world: dict[str, Any], method: str, template: str) -> None:
    client, keys = world["client"], world["keys"]
    rule = ROUTES[(method, template)]
    path = concrete(template, world)
    if rule == OPEN:
        assert call(client, method, path, None) not in (401, 403)
        return
    page = isinstance(rule, tuple)
    needed: Role = rule[1] if page else rule
    assert call(client, method, path, None) == (303 if page else 401)
    assert call(client, method, path, "pvqc_not-a-key") == (303 if page else 401)
    for role in Role:
        if template == "/events" and role.at_least(needed):
            continue  # an admitted stream never ends; tests/serving/test_live.py reads it
        status = call(client, method, path, keys[role])
        if role.at_least(needed):
            assert status not in (401, 403), f"{role} should reach {method} {template}, got {status}"
        else:
            assert status == 403, f"{role} should be refused {method} {template}, got {status}"


def test_a_line_key_reaches_only_its_own_line(world: dict[str, Any]) -> None:
    client, line_key = world["client"], world["keys"][Role.LINE]
    auth = {"Authorization": f"Bearer {line_key}"}
    assert client.get("/lines/L2/stats", headers=auth).status_code == 403
    assert client.get(f"/inspections/{world['l2']}", headers=auth).status_code == 403
    assert client.get(f"/inspections/{world['l1']}", headers=auth).status_code == 200
    assert client.get("/inspections", params={"line_id": "L2"}, headers=auth).status_code == 403
    listed = client.get("/inspections", headers=auth).json()["items"]
    assert {i["line_id"] for i in listed} == {"L1"}
    assert set(client.get("/lines", headers=auth).json()) == {"L1"}
    levels = np.full((6, 24), BRIGHT)
    frame = {"Content-Type": "image/png", "X-Module-Serial": "x", "X-Frame-Id": "1", **auth}
    assert (
        client.post("/lines/L2/modules", content=png(module_frame(levels)), headers=frame).status_code == 403
    )
    # X-API-Key works as well as the bearer header
    assert client.get("/lines/L1", headers={"Authorization": "", "X-API-Key": line_key}).status_code == 200


def test_keys_are_stored_hashed_and_revocable(world: dict[str, Any]) -> None:
    client = world["client"]
    listed = client.get("/keys").json()
    engineer_key = world["keys"][Role.ENGINEER]
    assert all("key" not in k for k in listed)
    assert any(k["prefix"] == engineer_key[:12] for k in listed)
    services = client.app.state.services
    from sqlalchemy import select

    from serving.db import ApiKey

    with services.sessions() as session:
        stored = session.scalars(select(ApiKey).where(ApiKey.name == "eng")).one()
    assert stored.key_sha256 == hash_key(engineer_key) and engineer_key not in stored.key_sha256
    assert client.post("/keys", json={"name": "eng", "role": "engineer"}).status_code == 409
    assert client.post("/keys", json={"name": "l", "role": "line"}).status_code == 422  # no line
    assert client.post("/keys", json={"name": "e2", "role": "engineer", "line_id": "L1"}).status_code == 422
    auth = {"Authorization": f"Bearer {engineer_key}"}
    assert client.get("/review/queue", headers=auth).status_code == 200
    assert client.post(f"/keys/{stored.id}/revoke").json()["revoked_at"] is not None
    assert client.get("/review/queue", headers=auth).status_code == 401


def test_sign_in_sets_an_httponly_samesite_cookie(world: dict[str, Any]) -> None:
    client = world["client"]
    engineer_key = world["keys"][Role.ENGINEER]
    assert client.post("/signin", json={"key": "pvqc_wrong"}).status_code == 401
    response = client.post("/signin", json={"key": engineer_key})
    assert response.status_code == 204
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    page = client.get("/review", headers={"Authorization": ""}, follow_redirects=False)
    assert page.status_code == 200 and "Keyboard" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    client.post("/signout")
    client.cookies.clear()
    page = client.get("/review", headers={"Authorization": ""}, follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/signin?next=/review"


def test_first_start_makes_one_admin_key_and_logs_it_once(
    make_settings: MakeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(bootstrap_admin_key=None)
    with caplog.at_level(logging.WARNING, logger="serving.auth"), TestClient(create_app(settings)):
        pass
    shown = [r.getMessage() for r in caplog.records if "admin key" in r.getMessage()]
    assert len(shown) == 1
    key = shown[0].split(": ")[1].split()[0]
    with caplog.at_level(logging.WARNING, logger="serving.auth"), TestClient(create_app(settings)) as client:
        assert client.get("/keys", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert len([r for r in caplog.records if "admin key" in r.getMessage()]) == 1  # not again


def test_admin_sees_the_running_config_without_secrets(sqlite_client: TestClient) -> None:
    import json

    from serving.routes.keys import _hide_password

    config = sqlite_client.get("/admin/config").json()
    assert config["lines"]["L1"]["pass_rate_floor"] == 0.95 and config["model"]["name"] == "pvqc-cell"
    assert "bootstrap_admin_key" not in config and ADMIN_KEY not in json.dumps(config)
    assert _hide_password("redis://app:s3cret@cache:6379/0") == "redis://app:***@cache:6379/0"
    assert _hide_password("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_a_lookup_in_flight_during_a_revocation_does_not_refill_the_cache(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import anyio
    from sqlalchemy.orm import sessionmaker

    import serving.auth
    from serving.auth import KeyChecker, new_key, store_key
    from serving.db import ApiKey, make_engine, upgrade_head, utcnow

    engine = make_engine(f"sqlite:///{tmp_path / 'keys.db'}")
    upgrade_head(engine)
    sessions = sessionmaker(engine, expire_on_commit=False)
    key = new_key()
    row = store_key(sessions, "screen", Role.LINE, key, "L1")
    read_the_key = serving.auth.lookup_key

    key_read, revoked = threading.Event(), threading.Event()

    def slow_lookup(*args: Any) -> Any:  # reads the row, then the revocation commits and is forgotten
        principal = read_the_key(*args)
        key_read.set()
        revoked.wait(10)
        return principal

    async def revoke_while_checking() -> tuple[Any, Any]:
        checker = KeyChecker(sessions, ttl=60.0)

        async def revoke() -> None:
            await anyio.to_thread.run_sync(key_read.wait, 10)  # sequenced, not timed
            with sessions() as session:
                session.get_one(ApiKey, row.id).revoked_at = utcnow()
                session.commit()
            checker.forget()  # what POST /keys/{id}/revoke does
            revoked.set()

        monkeypatch.setattr(serving.auth, "lookup_key", slow_lookup)
        async with anyio.create_task_group() as group:
            group.start_soon(revoke)
            in_flight = await checker.check(key)
        monkeypatch.setattr(serving.auth, "lookup_key", read_the_key)
        return in_flight, await checker.check(key)

    in_flight, after = anyio.run(revoke_while_checking)
    engine.dispose()
    assert in_flight is not None  # it read the key before the revocation
    assert after is None  # ... but its answer was not kept for another minute

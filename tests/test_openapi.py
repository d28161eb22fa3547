"""docs/openapi.json and docs/admin-api.md against the admin API itself:
the served document, the Klein routes, the JSON shapes."""

import ipaddress
import json
import re
from pathlib import Path

from openapi_spec_validator import validate
from treq.testing import StubTreq
from twisted.web.resource import Resource

from apigw.admin import KEY_FIELDS, AdminAPI, created_key_json, key_list_json
from apigw.keys import KeyRecord
from apigw.openapi import document, rendered

DOCS = Path(__file__).resolve().parent.parent / "docs"
MASTER = "supersecret"
LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)
METHODS = {"get", "post", "put", "patch", "delete"}
REGENERATE = "regenerate it: python -m apigw.openapi > docs/openapi.json"


def _stub():
    root = Resource()
    api = AdminAPI(None, None, MASTER, LOOPBACK, lambda: ())
    root.putChild(b"admin", api.resource())
    return StubTreq(root)


def _get(stub, headers):
    response = stub.get("http://127.0.0.1:8000/admin/openapi.json", headers=headers)
    stub.flush()
    response = response.result
    body = stub.content(response)
    stub.flush()
    return response, body.result


def _operations(doc):
    return {(method.upper(), path)
            for path, item in doc["paths"].items()
            for method in item if method in METHODS}


def test_served_document_is_the_checked_in_file():
    """When GET /admin/openapi.json is called with the master key, it answers docs/openapi.json byte for byte."""
    response, body = _get(_stub(), {"X-Master-Key": MASTER})
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    assert body == (DOCS / "openapi.json").read_bytes(), REGENERATE
    assert body == rendered()


def test_document_is_behind_the_admin_gates():
    """When the master key is missing or wrong, the document is refused like every admin call."""
    for headers in ({}, {"X-Master-Key": "wrong-key"}):
        response, body = _get(_stub(), headers)
        assert response.code == 403
        assert "paths" not in json.loads(body)


def test_document_is_valid_openapi():
    """When the checked-in document is validated, it is OpenAPI 3.1 without errors."""
    validate(json.loads((DOCS / "openapi.json").read_text()))


def test_every_klein_route_is_documented_and_nothing_else():
    """When the Klein routes and the document's operations are compared, they are the same set."""
    routes = set()
    for rule in AdminAPI.app.url_map.iter_rules():
        # OpenAPI writes <string:key_id> as {key_id}; the app is mounted at /admin.
        path = "/admin" + re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        routes |= {(method, path) for method in rule.methods if method.lower() in METHODS}
    assert routes == _operations(document())


def test_shapes_match_the_admin_answers():
    """When the admin API's JSON shapes are built, their fields are the schemas' properties."""
    record = KeyRecord(id="k1", owner="o", prefix="agw_abcdefgh", services=None,
                       rate_limit=None, created_at=0.0, expires_at=None, revoked_at=None)
    schemas = document()["components"]["schemas"]
    assert set(created_key_json(record, "agw_x", 0.0)) == set(schemas["CreatedKey"]["properties"])
    assert set(record.to_json(0.0)) == set(schemas["Key"]["properties"])
    assert set(key_list_json([record], 0.0)) == set(schemas["KeyList"]["properties"])
    assert set(KEY_FIELDS) == set(schemas["KeyRequest"]["properties"])


def test_admin_api_page_has_a_section_per_operation():
    """When docs/admin-api.md's endpoint headings are read, they are exactly the document's operations."""
    text = (DOCS / "admin-api.md").read_text()
    headings = set(re.findall(r"^### `([A-Z]+) (/admin/\S+)`", text, flags=re.M))
    assert headings == _operations(document())

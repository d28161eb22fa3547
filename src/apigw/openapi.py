"""The admin API as an OpenAPI 3.1 document.

Served at GET /admin/openapi.json and checked in as docs/openapi.json; a
test keeps the two equal and matches the paths against the Klein routes.
After changing the admin API, rewrite the file with

    python -m apigw.openapi > docs/openapi.json
"""

import functools
import json
import sys

from apigw import __version__
from apigw.admin import MAX_EXPIRES_IN_S, MAX_OWNER_CHARS, MAX_RATE_LIMIT


def _ref(name):
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema, description):
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description):
    return _json(_ref("Error"), description)


_NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}

_SCHEMAS = {
    "Error": {
        "type": "object",
        "required": ["error", "request_id"],
        "properties": {
            "error": {"type": "string", "description": "What went wrong, as a sentence."},
            "request_id": {"type": "string", "description": "Also in X-Request-ID."},
        },
    },
    "KeyRequest": {
        "type": "object",
        "required": ["owner"],
        "additionalProperties": False,
        "properties": {
            "owner": {"type": "string", "minLength": 1, "maxLength": MAX_OWNER_CHARS,
                      "description": "Who the key is for; sent upstream as "
                                     "X-Consumer-Username. No control characters."},
            "services": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                         "description": "Configured service names the key may use; "
                                        "leave out to allow every service."},
            "expires_in": {"type": "number", "exclusiveMinimum": 0,
                           "maximum": MAX_EXPIRES_IN_S,
                           "description": "Seconds from now until the key expires; "
                                          "leave out for a key that does not expire."},
            "rate_limit": {"type": "integer", "minimum": 1, "maximum": MAX_RATE_LIMIT,
                           "description": "Requests per rate_period for this key, "
                                          "replacing the service's limit."},
        },
    },
    "CreatedKey": {
        "type": "object",
        "required": ["id", "api_key", "owner", "prefix", "services", "expires_at",
                     "rate_limit", "created_at"],
        "properties": {
            "id": {"type": "string"},
            "api_key": {"type": "string",
                        "description": "The key itself. Shown here once, never again."},
            "owner": {"type": "string"},
            "prefix": {"type": "string", "description": "The key's first characters."},
            "services": {"type": ["array", "null"], "items": {"type": "string"}},
            "expires_at": _NULLABLE_TIME,
            "rate_limit": {"type": ["integer", "null"]},
            "created_at": {"type": "string", "format": "date-time"},
        },
    },
    "Key": {
        "type": "object",
        "description": "A key as stored, without the secret.",
        "required": ["id", "owner", "prefix", "services", "rate_limit", "created_at",
                     "expires_at", "revoked_at", "active"],
        "properties": {
            "id": {"type": "string"},
            "owner": {"type": "string"},
            "prefix": {"type": "string"},
            "services": {"type": ["array", "null"], "items": {"type": "string"},
                         "description": "null: every service."},
            "rate_limit": {"type": ["integer", "null"],
                           "description": "null: the service's limit."},
            "created_at": {"type": "string", "format": "date-time"},
            "expires_at": _NULLABLE_TIME,
            "revoked_at": _NULLABLE_TIME,
            "active": {"type": "boolean",
                       "description": "Neither revoked nor expired."},
        },
    },
    "KeyList": {
        "type": "object",
        "required": ["keys"],
        "properties": {"keys": {"type": "array", "items": _ref("Key")}},
    },
    "Reloaded": {
        "type": "object",
        "required": ["status", "services"],
        "properties": {
            "status": {"const": "reloaded"},
            "services": {"type": "array", "items": {"type": "string"}},
        },
    },
}

_GATES = {
    "403": _error("The caller's address is outside settings.admin_allow, MASTER_KEY "
                  "is not set, or X-Master-Key is missing or wrong."),
}
_STORE_DOWN = {"503": _error("The key store (database) does not answer.")}
_KEY_ID = [{"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}]


def _create(summary):
    return {
        "summary": summary,
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": _ref("KeyRequest")}}},
        "responses": {
            "201": _json(_ref("CreatedKey"), "The key was made."),
            "400": _error("The body is not a JSON object of the fields above, names an "
                          "unknown service, or a value is out of range."),
            **_GATES, **_STORE_DOWN,
        },
    }


def document():
    paths = {
        "/admin/generate_key": {"post": _create("Create an API key (the seed's path).")},
        "/admin/keys": {
            "post": _create("Create an API key."),
            "get": {
                "summary": "List every key, revoked and expired ones too.",
                "responses": {"200": _json(_ref("KeyList"), "The keys, oldest first."),
                              **_GATES, **_STORE_DOWN},
            },
        },
        "/admin/keys/{key_id}": {
            "parameters": _KEY_ID,
            "get": {
                "summary": "One key.",
                "responses": {"200": _json(_ref("Key"), "The key."),
                              "404": _error("No key has this id."),
                              **_GATES, **_STORE_DOWN},
            },
            "delete": {
                "summary": "Revoke a key (it stays listed, inactive).",
                "responses": {"200": _json(_ref("Key"), "The key, now revoked."),
                              "404": _error("No key has this id."),
                              **_GATES, **_STORE_DOWN},
            },
        },
        "/admin/reload": {
            "post": {
                "summary": "Re-read the configuration file, as SIGHUP does.",
                "responses": {
                    "200": _json(_ref("Reloaded"), "The new configuration is in force."),
                    "400": _error("The file is invalid; the old configuration is kept."),
                    **_GATES,
                    "503": _error("This process cannot reload."),
                },
            },
        },
        "/admin/openapi.json": {
            "get": {
                "summary": "This document.",
                "responses": {"200": {"description": "The OpenAPI document.",
                                      "content": {"application/json": {}}},
                              **_GATES},
            },
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "apigw admin API",
            "version": __version__,
            "license": {"name": "MIT", "identifier": "MIT"},
            "description": "Issue, list and revoke API keys and reload the gateway's "
                           "configuration. Every call needs X-Master-Key and an address "
                           "inside settings.admin_allow. Errors are JSON objects with "
                           "`error` and `request_id`.",
        },
        "servers": [{"url": "http://127.0.0.1:8000",
                     "description": "the public listener, or the --admin-port one"}],
        "security": [{"masterKey": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "masterKey": {"type": "apiKey", "in": "header", "name": "X-Master-Key"},
            },
            "schemas": _SCHEMAS,
        },
    }


@functools.lru_cache(maxsize=1)
def rendered():
    """The document as served and as checked in: bytes, one trailing newline."""
    return (json.dumps(document(), indent=2) + "\n").encode("utf-8")


def main():
    sys.stdout.buffer.write(rendered())


if __name__ == "__main__":
    main()

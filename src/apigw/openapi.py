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
    "Status": {
        "type": "object",
        "required": ["generated_at", "window_s", "rate_period_s", "services"],
        "properties": {
            "generated_at": {"type": "string", "format": "date-time"},
            "window_s": {"type": "number",
                         "description": "Seconds the traffic figures cover (up to 300; "
                                        "less just after the start)."},
            "rate_period_s": {"type": "number",
                              "description": "settings.rate_period, the period of every "
                                             "rate_limit."},
            "services": {"type": "array", "items": _ref("ServiceStatus")},
        },
    },
    "ServiceStatus": {
        "type": "object",
        "required": ["name", "auth", "rate_limit", "targets", "traffic"],
        "properties": {
            "name": {"type": "string"},
            "auth": {"type": "boolean"},
            "rate_limit": {"type": ["integer", "null"]},
            "targets": {"type": "array", "items": {
                "type": "object",
                "required": ["url", "breaker"],
                "properties": {
                    "url": {"type": "string"},
                    "breaker": {"enum": ["closed", "open", "half_open"],
                                "description": "With --workers, the highest state among "
                                               "the live workers."},
                },
            }},
            "traffic": {
                "type": "object",
                "description": "From the gateway's own metrics, totals of every worker. "
                               "null while there is nothing to compare yet.",
                "required": ["requests_per_s", "errors_per_s", "error_ratio", "p99_ms",
                             "history"],
                "properties": {
                    "requests_per_s": {"type": ["number", "null"]},
                    "errors_per_s": {"type": ["number", "null"],
                                     "description": "Answers with a 5xx status."},
                    "error_ratio": {"type": ["number", "null"],
                                    "description": "5xx answers / requests; null without "
                                                   "requests."},
                    "p99_ms": {"type": ["number", "null"],
                               "description": "Interpolated from the latency histogram's "
                                              "buckets."},
                    "history": {"type": "array", "items": {"type": "number"},
                                "description": "Requests/s per 10 s interval, oldest first."},
                },
            },
        },
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
                  "is not set, or X-Master-Key is missing or wrong (or, from the admin "
                  "page, the session cookie is not valid or a state change lacks its "
                  "X-CSRF-Token)."),
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
        "/admin/status": {
            "get": {
                "summary": "Services with their targets, breaker states and recent traffic.",
                "responses": {"200": _json(_ref("Status"), "The status now."),
                              **_GATES,
                              "503": _error("This process cannot report a status.")},
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
            "description": "Issue, list and revoke API keys, see the services' state "
                           "and reload the gateway's configuration. Every call needs "
                           "X-Master-Key (or the admin page's session cookie, plus its "
                           "X-CSRF-Token header on calls that change state) and an "
                           "address inside settings.admin_allow. Errors are JSON objects "
                           "with `error` and `request_id`.",
        },
        "servers": [{"url": "http://127.0.0.1:8000",
                     "description": "the public listener, or the --admin-port one"}],
        "security": [{"masterKey": []}, {"pageSession": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "masterKey": {"type": "apiKey", "in": "header", "name": "X-Master-Key"},
                "pageSession": {"type": "apiKey", "in": "cookie", "name": "apigw_admin_session",
                                "description": "Set by the admin page's login "
                                               "(/admin/ui/). Calls other than GET also "
                                               "need the session's X-CSRF-Token header."},
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

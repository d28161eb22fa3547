"""The documentation against the code, both ways: every field, option,
metric and log field the code has is documented with the code's default,
and nothing documented is missing from the code. Also: links stay inside
the repository."""

import re
from pathlib import Path

import attr
import pytest
import yaml

from apigw.config import (
    SERVICE_FIELDS, SETTINGS_FIELDS, Environment, Settings, parse_config,
)
from apigw.logs import ACCESS_FIELDS
from apigw.metrics import Metrics
from apigw.tap import Options

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
UNSET = ("unset", "—")


def tables(path):
    """{section heading: [row dicts]} for every Markdown table of a page."""
    found, heading, header = {}, None, None
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            heading, header = line.lstrip("#").strip(), None
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not set("".join(cells)) <= set("-: "):
                found.setdefault(heading, []).append(dict(zip(header, cells)))
        else:
            header = None
    return found


def names(cell):
    return re.findall(r"`([^`]+)`", cell)


def literal(cell):
    """The default cell's first `code` as a YAML value; None for unset."""
    code = names(cell)
    if not code or cell.startswith(UNSET):
        return None
    return yaml.safe_load(code[0])


CONFIG = tables(DOCS / "configuration.md")


def _service_attribute(service, field):
    return getattr(service, field) if hasattr(service, field) else getattr(service, f"{field}_s")


def _service(settings_yaml=""):
    config = parse_config(f"services:\n  s:\n    url: http://u\n{settings_yaml}", "t", Environment())
    return config.services["s"], config.settings


def test_service_fields_are_the_codes():
    """When the Services table is read, its field names are exactly config.SERVICE_FIELDS."""
    documented = {n for row in CONFIG["Services"] for n in names(row["field"])}
    assert documented == SERVICE_FIELDS


@pytest.mark.parametrize("row", CONFIG["Services"], ids=lambda r: r["field"])
def test_service_default_is_the_codes(row):
    """When a service leaves a field out, it gets the default the table gives."""
    field = names(row["field"])[0]
    assert row["type"] and row["meaning"]
    if field == "url":
        assert row["default"].startswith("—"), "url/urls have no default"
        return
    inherited = re.fullmatch(r"`settings\.(\w+)`", row["default"])
    service, settings = _service()
    if inherited is None:
        assert _service_attribute(service, field) == literal(row["default"])
        return
    # The service follows the setting: change it and look again.
    setting = inherited.group(1)
    attribute = SETTINGS_FIELDS[setting][0]
    changed = (getattr(settings, attribute) or 0) + 3
    service, settings = _service(f"settings:\n  {setting}: {changed}\n")
    assert _service_attribute(service, field) == getattr(settings, attribute) == changed


def test_settings_fields_are_the_codes():
    """When the Settings table is read, its field names are exactly config.SETTINGS_FIELDS."""
    assert [names(row["field"])[0] for row in CONFIG["Settings"]] == list(SETTINGS_FIELDS)


@pytest.mark.parametrize("row", CONFIG["Settings"], ids=lambda r: r["field"])
def test_settings_default_is_the_codes(row):
    """When the table's default is parsed like the file would be, it equals Settings()'s."""
    field = names(row["field"])[0]
    attribute, check = SETTINGS_FIELDS[field]
    assert row["type"] and row["meaning"]
    assert check(literal(row["default"])) == getattr(Settings(), attribute)


def test_environment_variables_and_defaults_are_the_codes():
    """When the Environment table is read, it has every Environment variable with its default."""
    rows = {names(row["variable"])[0]: row for row in CONFIG["Environment"]}
    assert set(rows) == {f.name.upper() for f in attr.fields(Environment)}
    for name, row in rows.items():
        assert literal(row["default"]) == getattr(Environment(), name.lower()), name


def test_command_line_options_and_defaults_are_the_codes():
    """When the Command line table is read, it has every twistd apigw option with its default."""
    rows = {names(row["option"])[0]: row for row in CONFIG["Command line"]}
    options = {f"--{long}": default for long, _, default, _ in Options.optParameters}
    assert set(rows) == set(options)
    for name, default in options.items():
        documented = literal(rows[name]["default"])
        assert (None if documented is None else str(documented)) == default, name


# --- operations.md --------------------------------------------------------------------

OPERATIONS = tables(DOCS / "operations.md")


def test_every_metric_is_documented_and_exists():
    """When the Metrics table is read, its names are exactly what /metrics exports."""
    exported = {m.name for m in Metrics().registry.collect()}
    documented = {names(row["metric"])[0].split("{")[0] for row in OPERATIONS["Metrics"]}
    # prometheus_client reports counters without their _total suffix.
    assert {re.sub(r"_total$", "", n) for n in documented} == exported


def test_every_access_log_field_is_documented():
    """When the access log table is read, its fields are exactly logs.ACCESS_FIELDS."""
    assert [names(row["field"])[0] for row in OPERATIONS["Logs"]] == list(ACCESS_FIELDS)


# --- links ----------------------------------------------------------------------------

PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_stay_in_the_repository_and_resolve(page):
    """When a page links to a file, the file is inside the repository and exists."""
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a URL, not a file of ours
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT), f"{page.name} links outside the repository: {target}"
        assert path.exists(), f"{page.name} links to a missing file: {target}"
    assert "shared/" not in text and "SPEC" not in text


# --- README.md's limits ----------------------------------------------------------------

EDGE_LIMITS = {
    "client_max_line_bytes", "client_max_headers", "client_max_head_bytes",
    "client_header_timeout", "client_body_timeout", "client_send_timeout", "keepalive_timeout",
    "max_connections", "upstream_max_head_bytes", "upstream_max_headers",
    "upstream_max_idle_per_target", "upstream_idle_timeout", "max_body_bytes",
    "websocket_idle_timeout", "timeout",
}


def test_readme_lists_every_edge_limit_with_the_codes_default():
    """When README's security table is read, it has every edge limit, each with the default Settings() has."""
    rows = {names(row["setting"])[0]: row
            for row in tables(ROOT / "README.md")["Security and limits"]}
    assert set(rows) == EDGE_LIMITS
    for field, row in rows.items():
        attribute, check = SETTINGS_FIELDS[field]
        assert check(literal(row["default"])) == getattr(Settings(), attribute), field

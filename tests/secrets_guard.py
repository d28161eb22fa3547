"""No API key or master key in any log line (issue 8, point 3; SPEC section 6).

A pytest plugin, registered by conftest.py for every run (and loadable on its
own with `-p tests.secrets_guard`): a global twisted.logger observer sees
every event of the session, access-log records included even when they go to
a file, and looks for text shaped like an API key or equal to a registered
master key. A session that saw one fails, naming the test, the event's
namespace and format, never the secret.

Subprocess tests cannot be observed that way: they pass what they captured
to `assert_no_secrets`.
"""

import re

import pytest
from twisted.logger import eventAsText, globalLogPublisher

from apigw.keys import KEY_MARK
from apigw.logs import AccessLog

# What apigw.keys.new_raw_key makes, wherever it sits in a line. Shorter
# runs are fine: the display prefix (agw_ + 8 characters) is logged on purpose.
API_KEY = re.compile(re.escape(KEY_MARK) + r"[A-Za-z0-9_-]{43,}")

# Master keys the tests use; a test that sets another calls register_secret.
_MASTER_KEYS = {"supersecret", "from-env", "from-dotenv", "hunter2-master"}
MIN_SECRET_CHARS = 6  # shorter values would match ordinary words


def register_secret(value):
    """Make the whole session fail if `value` (a master key) is ever logged."""
    if len(value) < MIN_SECRET_CHARS:
        raise ValueError(f"a secret to watch for needs {MIN_SECRET_CHARS}+ characters")
    _MASTER_KEYS.add(value)
    return value


def secrets_in(text):
    """What secrets `text` holds, described without repeating them."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    found = []
    keys = set(API_KEY.findall(text))
    if keys:
        found.append(f"{len(keys)} API key(s)")
    masters = [m for m in _MASTER_KEYS if m in text]
    if masters:
        found.append(f"{len(masters)} registered master key(s)")
    return found


def assert_no_secrets(text, where="output"):
    """For what a subprocess printed or wrote: fail if it holds a secret."""
    found = secrets_in(text)
    assert not found, f"{where} holds {' and '.join(found)} (not shown here)"


def event_text(event):
    """The event as a log file would show it, plus every field's value."""
    parts = [eventAsText(event, includeTraceback=True, includeTimestamp=False,
                         includeSystem=True)]
    for name, value in event.items():
        try:
            parts.append(f"{name}={value!r}")
        except Exception:  # a broken __repr__ must not hide the others
            parts.append(f"{name}=<unrepresentable {type(value).__name__}>")
    return "\n".join(parts)


class LogGuard:
    def __init__(self):
        self.findings = {}  # (test id, namespace, format, what) -> events
        self.current = "(outside any test)"

    def __call__(self, event):
        # An observer that raises is removed and its error logged: never.
        try:
            found = secrets_in(event_text(event))
        except Exception as e:
            found = [f"an event the guard could not read ({type(e).__name__})"]
        if found:
            finding = (self.current, event.get("log_namespace"), event.get("log_format"),
                       " and ".join(found))
            self.findings[finding] = self.findings.get(finding, 0) + 1


GUARD = LogGuard()
_original_write = AccessLog._write


def _guarded_write(self, access):
    # With --access-log PATH (or -) the records go to a file through
    # AccessLog._write, which the global publisher never sees: check each
    # record as it is written.
    GUARD({"access": access, "log_namespace": "apigw.access (access log file)"})
    return _original_write(self, access)


def pytest_configure(config):
    globalLogPublisher.addObserver(GUARD)
    AccessLog._write = _guarded_write


def pytest_unconfigure(config):
    globalLogPublisher.removeObserver(GUARD)
    AccessLog._write = _original_write


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    GUARD.current = item.nodeid
    try:
        return (yield)
    finally:
        GUARD.current = "(between tests)"


def pytest_sessionfinish(session, exitstatus):
    if GUARD.findings and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if not GUARD.findings:
        return
    terminalreporter.section("secrets in logs", sep="=", red=True, bold=True)
    terminalreporter.line(
        f"{sum(GUARD.findings.values())} log event(s) held an API key or master key; "
        "the run fails (SPEC section 6):", red=True)
    for (test, namespace, log_format, what), count in list(GUARD.findings.items())[:30]:
        terminalreporter.line(f"  {test}: {what} in namespace={namespace!r} "
                              f"format={redacted(log_format)!r} ({count} event(s))")


def redacted(text):
    """`text` with the secrets masked (a format built by an f-string holds them)."""
    if not isinstance(text, str):
        return text
    text = API_KEY.sub(KEY_MARK + "<redacted>", text)
    for secret in _MASTER_KEYS:
        text = text.replace(secret, "<master key>")
    return text

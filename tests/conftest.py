"""Session-wide test setup: Hypothesis profiles and the secrets guard."""

import os

from hypothesis import HealthCheck, settings

import tests.secrets_guard

# Property tests run in CI on every push: enough examples to find the
# classic mistakes, few enough for seconds per file. HYPOTHESIS_PROFILE=thorough
# digs deeper by hand.
settings.register_profile(
    "apigw-properties", max_examples=200, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", settings.get_profile("apigw-properties"),
                          max_examples=5000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "apigw-properties"))


def pytest_configure(config):
    # A plugin of its own, so that a subprocess pytest can load exactly this
    # guard with -p (see test_secrets.py); its pytest_configure is replayed.
    if not config.pluginmanager.is_registered(tests.secrets_guard):
        config.pluginmanager.register(tests.secrets_guard, "apigw-secrets-guard")

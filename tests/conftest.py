"""Session-wide test setup: Hypothesis profiles."""

import os

from hypothesis import HealthCheck, settings

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

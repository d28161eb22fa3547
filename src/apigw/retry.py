"""Retry policy: which requests may be repeated and how long to wait between tries."""

import random as _random

# Statuses that mean "this target could not serve it", not "the request is wrong".
RETRYABLE_STATUSES = frozenset({502, 503, 504})

IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"})
NON_IDEMPOTENT_RETRYABLE = frozenset({b"POST", b"PATCH"})


def backoff_delay_s(attempt_index, base_s, max_s, random=_random.random):
    """Full jitter: uniform in [0, min(max_s, base_s * 2**attempt_index)).

    attempt_index 0 is the wait before the first retry. Full jitter spreads
    a herd of clients that failed together instead of retrying in lockstep.
    """
    # Cap the exponent: 2**n for a large n is an overflow before min() helps.
    ceiling = min(max_s, base_s * 2 ** min(attempt_index, 64))
    return random() * ceiling


def is_idempotent(method, retry_non_idempotent):
    """Whether a request with this method may be sent again after a failure."""
    method = method.upper()
    if method in IDEMPOTENT_METHODS:
        return True
    return retry_non_idempotent and method in NON_IDEMPOTENT_RETRYABLE

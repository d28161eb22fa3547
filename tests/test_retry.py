import pytest

from apigw.retry import RETRYABLE_STATUSES, backoff_delay_s, is_idempotent


def test_backoff_zero_jitter_waits_nothing():
    """When the jitter draws 0, the wait is 0 whatever the attempt."""
    assert [backoff_delay_s(n, 0.2, 2.0, random=lambda: 0.0) for n in range(5)] == [0.0] * 5


def test_backoff_grows_exponentially_up_to_max():
    """When the jitter draws almost 1, the wait is almost base * 2**n, capped at max."""
    near_one = 0.999999
    delays = [backoff_delay_s(n, 0.2, 2.0, random=lambda: near_one) for n in range(6)]
    expected = [0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    assert delays == pytest.approx([e * near_one for e in expected])
    assert all(d < e for d, e in zip(delays, expected))


def test_backoff_is_full_jitter():
    """When the jitter draws one half, the wait is half the ceiling."""
    assert backoff_delay_s(2, 0.1, 10.0, random=lambda: 0.5) == pytest.approx(0.2)


def test_backoff_huge_attempt_index_is_capped():
    """When the attempt index is very large, the wait is still bounded by max."""
    assert backoff_delay_s(10_000, 0.2, 2.0, random=lambda: 0.999) == pytest.approx(1.998)


def test_backoff_default_random_stays_in_bounds():
    """When using the real random source, every wait lies within [0, ceiling)."""
    for n in range(8):
        ceiling = min(2.0, 0.2 * 2**n)
        for _ in range(50):
            assert 0 <= backoff_delay_s(n, 0.2, 2.0) < ceiling


def test_backoff_zero_base_means_no_wait():
    """When backoff_base is 0, retries follow immediately."""
    assert backoff_delay_s(3, 0.0, 2.0, random=lambda: 0.9) == 0.0


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"get"])
def test_idempotent_methods_retry(method):
    """When the method is idempotent, it may be retried without the flag."""
    assert is_idempotent(method, retry_non_idempotent=False)


@pytest.mark.parametrize("method", [b"POST", b"PATCH"])
def test_post_patch_only_with_flag(method):
    """When the method is POST or PATCH, it is retried only with retry_non_idempotent."""
    assert not is_idempotent(method, retry_non_idempotent=False)
    assert is_idempotent(method, retry_non_idempotent=True)


def test_unknown_methods_never_retried():
    """When the method is unusual (e.g. CONNECT), it is never retried."""
    assert not is_idempotent(b"CONNECT", retry_non_idempotent=True)


def test_retryable_statuses():
    """When the upstream answers 502/503/504 it is retryable; 500 and 4xx are not."""
    assert RETRYABLE_STATUSES == {502, 503, 504}
    assert 500 not in RETRYABLE_STATUSES and 429 not in RETRYABLE_STATUSES

"""A trial's bound: the longer of streaming its bytes over the link and reading its resident
bytes from HBM, and which one; none where the bandwidth that would set it was not measured."""

from __future__ import annotations

import pytest

from autotune.measure.roofline import bound_attrs, resident_bytes, step_bound

GB = 1e9


def test_the_longer_term_sets_the_bound() -> None:
    # 13 GB over a 52 GB/s link (250 ms) against 1 GB from 3,000 GB/s HBM: the link's.
    assert step_bound(13 * GB, 1 * GB, 52.0, 3000.0) == pytest.approx((0.25, "link"))
    # Nothing streamed: HBM alone; 15 GB resident read at 3,000 GB/s is 5 ms.
    assert step_bound(0, 15 * GB, 52.0, 3000.0) == pytest.approx((0.005, "HBM"))
    # 100 MB streamed (2 ms) against 15 GB resident (5 ms): HBM, though it streams.
    assert step_bound(0.1 * GB, 15 * GB, 50.0, 3000.0) == pytest.approx((0.005, "HBM"))


def test_unmeasured_bandwidths_give_no_bound() -> None:
    assert step_bound(13 * GB, 1 * GB, None, 3000.0) is None  # the link that sets it: unknown
    assert step_bound(0, 15 * GB, 52.0, None) is None  # resident only, HBM not measured
    assert step_bound(13 * GB, 1 * GB, 52.0, None) == pytest.approx((0.25, "link"))
    assert bound_attrs({"streamed_bytes_per_step": 10**9, "tpot_s": 0.02}, None, 0, {}) == {}


def test_resident_bytes_are_weights_and_the_kv_cache() -> None:
    plan = {"resident_weights": 3 * 10**9, "kv_cache": 2 * 10**9, "total": 6 * 10**9}
    assert resident_bytes(plan, 2 * 10**9) == 5 * 10**9
    # A replayed plan knows only a total: the applied budget is what stays resident.
    assert resident_bytes({"workspace": 7 * 10**9, "total": 7 * 10**9}, 10**9) == 10**9


def test_fraction_is_the_bound_over_the_measured_step() -> None:
    m = {"streamed_bytes_per_step": 13 * 10**9, "tpot_s": 0.26}
    attrs = bound_attrs(m, {"resident_weights": 0, "kv_cache": 10**9}, 0,
                        {"h2d_gb_s": 52.0, "hbm_gb_s": 3000.0})
    assert attrs == {"bound_tpot_ms": 250.0, "bound_by": "link",
                     "bound_fraction": pytest.approx(0.9615, abs=1e-4),
                     "resident_bytes_per_step": 10**9}

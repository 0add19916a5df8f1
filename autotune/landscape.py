"""Recorded landscapes: a grid of (batch, budget fraction) -> what the configuration did.

A landscape file holds one workload's full grid (batch sizes x budget fractions), each point
measured (throughput, TTFT, TPOT, peak memory, the memory plan's prediction), out of memory,
predicted infeasible, or failed. It is read back by the ``landscape`` engine, which replays it
on CPU in no time, so that searches can be benchmarked and tested without a GPU. Any grid study
becomes one (``autotune export --landscape``, :func:`autotune.results.landscape.from_study`).

Between grid points, figures are interpolated bilinearly in (log2 batch, budget fraction);
a point is out of memory wherever a grid point with non-zero weight is (memory only grows with
batch and budget, so the grid point "beyond" it decides). The maximum of a bilinear cell lies
on its corners, so a landscape's best feasible point without limits is its best grid point.

The format (``schema_version`` 1) is documented in docs/engines.md. This module runs nothing.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autotune import jsonfile
from autotune.errors import SchemaError, UserInputError

SCHEMA_VERSION = 1
KIND = "autotune.landscape"
STATUSES = ("ok", "oom", "infeasible", "error")
FIGURES = ("throughput_tok_s", "ttft_ms", "tpot_ms", "peak_memory_bytes",
           "streamed_bytes_per_step")
_REQUIRED = ("schema_version", "kind", "workload", "total_device_budget", "batches",
             "budget_fractions", "points")
_EPS = 1e-9


@dataclass(frozen=True)
class Point:
    """What the landscape says of one configuration (a grid point or an interpolation)."""

    batch: float
    budget_fraction: float
    status: str  # ok | oom | infeasible | error
    predicted_peak_bytes: int | None
    throughput_tok_s: float | None = None
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    peak_memory_bytes: int | None = None
    streamed_bytes_per_step: int | None = None


class Landscape:
    """A validated landscape file in memory (see the module docstring)."""

    def __init__(self, data: dict[str, Any], path: str | None = None) -> None:
        self.data = validate(data, path or "landscape")
        self.path = path
        self.batches: list[int] = list(data["batches"])
        self.fractions: list[float] = [float(f) for f in data["budget_fractions"]]
        self._xs = [math.log2(b) for b in self.batches]
        self._grid: dict[tuple[int, int], dict[str, Any]] = {}
        for p in data["points"]:
            i = self.batches.index(p["batch"])
            j = _index_of(self.fractions, float(p["budget_fraction"]))
            self._grid[(i, j)] = p

    # -- facts ----------------------------------------------------------------------------

    @property
    def workload(self) -> dict[str, Any]:
        return self.data["workload"]

    @property
    def isl(self) -> int:
        return int(self.workload["isl"])

    @property
    def osl(self) -> int:
        return int(self.workload["osl"])

    @property
    def total_device_budget(self) -> int:
        return int(self.data["total_device_budget"])

    @property
    def available_bytes(self) -> int | None:
        return self.data.get("available_bytes")

    @property
    def calibration(self) -> dict[str, Any]:
        return self.data.get("calibration") or {}

    @property
    def synthetic(self) -> bool:
        return bool(self.data.get("synthetic", False))

    @property
    def name(self) -> str:
        return Path(self.path).stem if self.path else self.workload.get("model", "landscape")

    def grid_points(self) -> list[Point]:
        return [self._point(self._grid[(i, j)]) for i in range(len(self.batches))
                for j in range(len(self.fractions))]

    # -- lookup ---------------------------------------------------------------------------

    def at(self, batch: float, budget_fraction: float) -> Point:
        """The landscape at any point of its grid's range (see the module docstring)."""
        if not self.batches[0] <= batch <= self.batches[-1]:
            raise UserInputError(
                f"batch {batch}: the landscape covers {self.batches[0]}..{self.batches[-1]}; "
                "give --max-batch within it")
        if not self.fractions[0] - _EPS <= budget_fraction <= self.fractions[-1] + _EPS:
            raise UserInputError(
                f"budget fraction {budget_fraction}: the landscape covers "
                f"{self.fractions[0]}..{self.fractions[-1]}")
        i, wx = _cell(self._xs, math.log2(batch))
        j, wy = _cell(self.fractions, budget_fraction)
        corners = []  # (weight, grid point) with non-zero weight
        for di, a in ((0, 1 - wx), (1, wx)):
            for dj, c in ((0, 1 - wy), (1, wy)):
                if a * c > _EPS:
                    corners.append((a * c, self._grid[(i + di, j + dj)]))
        predicted = _blend(corners, "predicted_peak_bytes")
        statuses = {p["status"] for _, p in corners}
        if "error" in statuses:
            return Point(batch, budget_fraction, "error", _int(predicted))
        if statuses & {"oom", "infeasible"}:
            # Out of memory: the grid point beyond decides. Where the recording's plan already
            # said "does not fit", the replayed plan says so too (a worker then skips it, as the
            # recording's did); a measured OOM stays a surprise, as it was on the GPU.
            beyond = [p["predicted_peak_bytes"] for _, p in corners
                      if p["status"] == "infeasible" and p.get("predicted_peak_bytes")]
            if beyond and predicted is not None:
                predicted = max(predicted, min(beyond))
            status = "infeasible" if beyond else "oom"
            return Point(batch, budget_fraction, status, _int(predicted))
        return Point(
            batch, budget_fraction, "ok", _int(predicted),
            throughput_tok_s=_blend(corners, "throughput_tok_s"),
            ttft_ms=_blend(corners, "ttft_ms"),
            tpot_ms=_blend(corners, "tpot_ms"),
            peak_memory_bytes=_int(_blend(corners, "peak_memory_bytes")),
            streamed_bytes_per_step=_int(_blend(corners, "streamed_bytes_per_step")),
        )

    def e2e_s(self, p: Point) -> float:
        assert p.ttft_ms is not None and p.tpot_ms is not None
        return p.ttft_ms / 1e3 + (self.osl - 1) * p.tpot_ms / 1e3

    def meets(self, p: Point, limits: Any) -> bool:
        """Whether a measured point meets latency limits (an object with max_tpot_ms,
        max_ttft_ms, max_latency_s, any of them None)."""
        if p.status != "ok":
            return False
        if limits is None:
            return True
        if limits.max_tpot_ms is not None and p.tpot_ms > limits.max_tpot_ms:
            return False
        if limits.max_ttft_ms is not None and p.ttft_ms > limits.max_ttft_ms:
            return False
        return not (limits.max_latency_s is not None and self.e2e_s(p) > limits.max_latency_s)

    def best(self, limits: Any = None) -> Point | None:
        """The best grid point that ran and meets the limits (the benchmark's reference)."""
        ok = [p for p in self.grid_points() if self.meets(p, limits)]
        return max(ok, key=lambda p: p.throughput_tok_s) if ok else None

    def _point(self, p: dict[str, Any]) -> Point:
        return Point(p["batch"], float(p["budget_fraction"]), p["status"],
                     p.get("predicted_peak_bytes"),
                     **{k: p.get(k) for k in FIGURES})


def _index_of(values: list[float], x: float) -> int:
    for k, v in enumerate(values):
        if abs(v - x) < 1e-6:
            return k
    raise SchemaError(f"budget fraction {x} is not one of the grid's {values}")


def _cell(xs: list[float], x: float) -> tuple[int, float]:
    """The grid interval holding x and x's weight towards its upper end."""
    if len(xs) == 1:
        return 0, 0.0
    i = min(max(bisect.bisect_right(xs, x) - 1, 0), len(xs) - 2)
    w = (x - xs[i]) / (xs[i + 1] - xs[i])
    return i, min(max(w, 0.0), 1.0)


def _blend(corners: list[tuple[float, dict[str, Any]]], key: str) -> float | None:
    values = [(w, p.get(key)) for w, p in corners]
    if any(v is None for _, v in values):
        return None
    total = sum(w for w, _ in values)
    return sum(w * v for w, v in values) / total


def _int(x: float | None) -> int | None:
    return None if x is None else int(round(x))


# ------------------------------------------------------------------------------------------
# Reading, writing, checking


def validate(data: Any, where: str = "landscape") -> dict[str, Any]:
    """Checks a landscape's structure; SchemaError says what is wrong."""
    try:
        return _validate(data, where)
    except (TypeError, ValueError, KeyError, AttributeError) as e:  # a part of the wrong type
        raise SchemaError(f"{where}: malformed ({type(e).__name__}: {e})") from e


def _validate(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise SchemaError(f"{where}: a landscape is a JSON object; got {type(data).__name__}")
    if data.get("kind") != KIND:
        raise SchemaError(f"{where}: not an autotune landscape (kind {data.get('kind')!r})")
    if not _whole(data.get("schema_version"), 0) or data["schema_version"] != SCHEMA_VERSION:
        raise SchemaError(f"{where}: schema_version {data.get('schema_version')!r} is not "
                          f"supported; this autotune reads version {SCHEMA_VERSION}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise SchemaError(f"{where}: lacks {', '.join(missing)}")
    for key, kind in (("workload", dict), ("batches", list), ("budget_fractions", list),
                      ("points", list)):
        if not isinstance(data[key], kind):
            json_kind = "object" if kind is dict else "array"
            raise SchemaError(f"{where}: {key} must be a JSON {json_kind}; got "
                              f"{type(data[key]).__name__}")
    if not all(isinstance(p, dict) for p in data["points"]):
        raise SchemaError(f"{where}: every point must be a JSON object")
    _check_values(data, where)
    batches, fractions = data["batches"], data["budget_fractions"]
    if not batches or batches != sorted(set(batches)):
        raise SchemaError(f"{where}: batches must be increasing positive integers")
    if not fractions or fractions != sorted(set(fractions)) or not (
            0.0 <= fractions[0] and fractions[-1] <= 1.0):
        raise SchemaError(f"{where}: budget_fractions must be increasing, within 0..1")
    seen = set()
    for p in data["points"]:
        if p.get("status") not in STATUSES:
            raise SchemaError(f"{where}: point {p.get('batch')}, {p.get('budget_fraction')}: "
                              f"status must be one of {', '.join(STATUSES)}")
        if p["status"] == "ok" and any(p.get(k) is None for k in FIGURES[:3]):
            raise SchemaError(f"{where}: ok point {p['batch']}, {p['budget_fraction']} lacks "
                              "throughput_tok_s, ttft_ms or tpot_ms")
        if p.get("batch") not in batches:
            raise SchemaError(f"{where}: point batch {p.get('batch')} is not in batches")
        seen.add((p["batch"], _index_of([float(f) for f in fractions],
                                        float(p["budget_fraction"]))))
    expected = len(batches) * len(fractions)
    if len(seen) != expected or len(data["points"]) != expected:
        raise SchemaError(f"{where}: expected one point per grid node ({expected}); got "
                          f"{len(data['points'])} points for {len(seen)} nodes")
    return data


def _whole(v: Any, least: int) -> bool:
    """An integer (JSON's true is not 1) of at least ``least``."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _number(v: Any, least: float, strict: bool = False) -> bool:
    """A finite number (no NaN, no infinity: Python's JSON reads both) of at least ``least``,
    or above it when ``strict``."""
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and (v > least if strict else v >= least))


# What each figure of a point may hold: a time or a throughput is positive, bytes are >= 0.
_POINT_VALUES = {"batch": ("a whole number, 1 or more", lambda v: _whole(v, 1)),
                 "budget_fraction": ("a number from 0 to 1", lambda v: _number(v, 0.0)
                                     and v <= 1.0),
                 "throughput_tok_s": ("a number of tokens/s above 0",
                                      lambda v: _number(v, 0.0, strict=True)),
                 "ttft_ms": ("a time in ms above 0", lambda v: _number(v, 0.0, strict=True)),
                 "tpot_ms": ("a time in ms above 0", lambda v: _number(v, 0.0, strict=True)),
                 "peak_memory_bytes": ("bytes, 0 or more", lambda v: _number(v, 0.0)),
                 "predicted_peak_bytes": ("bytes, 0 or more", lambda v: _number(v, 0.0)),
                 "streamed_bytes_per_step": ("bytes, 0 or more", lambda v: _number(v, 0.0))}


def _check_values(data: dict[str, Any], where: str) -> None:
    """Every value the replay computes with is of its kind and range: a NaN, negative or
    infinite figure would be replayed as a measurement (and steer the search)."""
    def bad(what: str, expected: str, value: Any) -> SchemaError:
        return SchemaError(f"{where}: {what}: expected {expected}; got {value!r}")

    if not _whole(data["total_device_budget"], 1):
        raise bad("total_device_budget", "a whole number of bytes, 1 or more",
                  data["total_device_budget"])
    available = data.get("available_bytes")
    if available is not None and not _whole(available, 1):
        raise bad("available_bytes", "a whole number of bytes, 1 or more (or null)", available)
    workload = data["workload"]
    for key in ("isl", "osl"):
        if not _whole(workload.get(key), 1):
            raise bad(f"workload {key}", "a whole number of tokens, 1 or more",
                      workload.get(key))
    for b in data["batches"]:
        if not _whole(b, 1):
            raise bad("batches", "whole numbers, 1 or more", b)
    for f in data["budget_fractions"]:
        if not _number(f, 0.0) or f > 1.0:
            raise bad("budget_fractions", "numbers from 0 to 1", f)
    for p in data["points"]:
        for key, (expected, ok) in _POINT_VALUES.items():
            value = p.get(key)
            if (value is not None or key in ("batch", "budget_fraction")) and not ok(value):
                raise bad(f"point {p.get('batch')}, {p.get('budget_fraction')}: {key}",
                          expected, value)
    calibration = data.get("calibration") or {}
    if not isinstance(calibration, dict):
        raise bad("calibration", "a JSON object", calibration)
    link = calibration.get("h2d_gb_s")
    if link is not None and not _number(link, 0.0, strict=True):
        raise bad("calibration h2d_gb_s", "a bandwidth in GB/s above 0 (or null)", link)
    rows, times = calibration.get("gemm_rows", []), calibration.get("gemm_s", [])
    if not (isinstance(rows, list) and all(_whole(r, 1) for r in rows)):
        raise bad("calibration gemm_rows", "a list of whole numbers, 1 or more", rows)
    if not (isinstance(times, list) and len(times) == len(rows)
            and all(_number(t, 0.0) for t in times)):
        raise bad("calibration gemm_s", f"{len(rows)} times in s, 0 or more, one per gemm_rows",
                  times)


def read(path: str | Path) -> Landscape:
    """Reads and checks a landscape file."""
    if Path(path).is_dir():
        raise UserInputError(f"--landscape {path}: is a directory; give a landscape file "
                             "(autotune export --landscape FILE writes one)")
    if not Path(path).is_file():
        raise UserInputError(f"cannot read landscape {path}: no such file")
    return Landscape(jsonfile.read(path, "landscape"), str(path))


def write(data: dict[str, Any], path: str | Path) -> Path:
    """Writes atomically (temp file + rename) after checking the data."""
    validate(data, str(path))
    return jsonfile.write_atomic(data, path, indent=1)

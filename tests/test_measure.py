"""measure.py's shortcut: a few decode steps timed and the rest extrapolated, only for engines
whose steps are alike, and always said so."""

from __future__ import annotations

import fakes
import pytest
import torch
from fakes import AnalyticEngine, ModelledClock

from autotune.engines import EngineConfig
from autotune.errors import UserInputError
from autotune.measure import timing
from autotune.measure.timing import measure

OSL = 40


class GrowingSteps(AnalyticEngine):
    """Steps that cost more with the position (no KV cache, as the TensorRT engine)."""

    uniform_decode_steps = False


@pytest.fixture
def clock(monkeypatch) -> ModelledClock:
    modelled = ModelledClock()
    monkeypatch.setattr(timing, "time", modelled)  # what measure() reads
    monkeypatch.setattr(fakes, "time", modelled)  # what the engines sleep
    return modelled


class LinearSteps(AnalyticEngine):
    """Steps whose cost grows in proportion to the position (attention over the filled
    positions of a static cache), and that can be skipped, as the native engine's with
    ``attention=triton``."""

    uniform_decode_steps = False
    linear_decode_steps = True
    SECONDS_PER_POSITION = 2e-4

    def prefill(self, prompt, osl):
        gen = super().prefill(prompt, osl)
        gen.state = prompt.shape[1]  # the position of the next step
        return gen

    def decode(self, gen, steps) -> None:
        for _ in range(steps):
            fakes.time.sleep(self.SECONDS_PER_POSITION * gen.state)
            self.skip(gen, 1)

    def skip(self, gen, steps) -> None:
        gen.state += steps
        gen.tokens = torch.cat([gen.tokens, gen.tokens[:, -1:].expand(-1, steps)], dim=1)


def _engine(cls: type = AnalyticEngine) -> AnalyticEngine:
    engine = cls.load(EngineConfig(model="tiny-llama", device="cpu", dtype="float32",
                                   max_seq_len=8 + OSL))
    engine.device_budget = 0  # every step streams the whole model: ~1 ms, modelled
    return engine


def test_shortcut_times_some_steps_and_extrapolates(clock) -> None:
    engine = _engine()
    full = measure(engine, 2, 8, OSL, repeats=3, warmup=1)
    short = measure(engine, 2, 8, OSL, repeats=3, warmup=1, decode_steps=8, warmup_steps=2)
    assert not full.estimated and full.decode_steps_timed == OSL - 1
    assert short.estimated and short.decode_steps_timed == 8
    assert short.osl == OSL
    # The estimate stands for the whole osl: it agrees with timing every step (a missing
    # extrapolation would be ~5x off).
    assert short.e2e_s == pytest.approx(full.e2e_s, rel=1e-9)
    assert short.throughput_tok_s == pytest.approx(2 * OSL / short.e2e_s)
    assert short.tpot_s == pytest.approx((short.e2e_s - short.ttft_s) / (OSL - 1))


def test_engines_with_growing_steps_are_timed_over_every_step() -> None:
    m = measure(_engine(GrowingSteps), 1, 8, OSL, repeats=1, warmup=0, decode_steps=8)
    assert not m.estimated and m.decode_steps_timed == OSL - 1


def test_steps_growing_linearly_are_timed_in_a_window_at_the_middle(clock) -> None:
    """The window's mean position is the generation's: its estimate agrees with timing every
    step, where a window at the start would be 2.3x too fast here (positions 8-15 against a
    mean of 27). An engine that cannot skip is timed over every step."""
    engine = _engine(LinearSteps)
    full = measure(engine, 1, 8, OSL, repeats=1, warmup=0)
    short = measure(engine, 1, 8, OSL, repeats=3, warmup=1, decode_steps=8, warmup_steps=2)
    assert not full.estimated and short.estimated and short.decode_steps_timed == 8
    assert short.tpot_s == pytest.approx(full.tpot_s, rel=0.02)  # the window: 23.5..30.5
    assert full.tpot_s == pytest.approx(27 * LinearSteps.SECONDS_PER_POSITION)
    cannot_skip = _engine(GrowingSteps)
    cannot_skip.linear_decode_steps = True
    m = measure(cannot_skip, 1, 8, OSL, repeats=1, warmup=0, decode_steps=8)
    assert not m.estimated and m.decode_steps_timed == OSL - 1


def test_more_steps_than_the_osl_is_the_full_measurement() -> None:
    m = measure(_engine(), 1, 8, 5, repeats=1, warmup=0, decode_steps=32)
    assert not m.estimated and m.decode_steps_timed == 4


@pytest.mark.parametrize("kw", [dict(decode_steps=0), dict(warmup_steps=-1),
                                dict(decode_steps=2.5)])
def test_bad_step_counts(kw) -> None:
    with pytest.raises(UserInputError):
        measure(_engine(), 1, 8, OSL, repeats=1, warmup=0, **kw)


def test_bench_refuses_what_its_plan_says_cannot_fit() -> None:
    """Issue 19: `bench --gpu-memory-limit 1` on CPU ran anyway, `--batch 100000
    --gpu-memory-limit 1GiB` ran until killed, and under `ulimit -v` the CPU allocator's
    error was a traceback."""
    from conftest import ANALYTIC

    from autotune.measure.bench import run_bench
    from autotune.measure.trial import is_oom

    common = dict(model="tiny-llama", engine=ANALYTIC, isl=8, osl=4, dtype="float32",
                  device="cpu", repeats=1, warmup=0, budget_fraction=0.0)
    for batch, limit in ((1, 1), (100_000, 2**30)):
        with pytest.raises(UserInputError, match=f"batch {batch} at budget 0 bytes does not "
                           "fit: predicted peak .* exceeds"):
            run_bench(batch=batch, gpu_memory_limit=limit, **common)
    with pytest.raises(UserInputError, match="--batch: expected an integer from 1 to"):
        run_bench(batch=10**7, **common)
    assert run_bench(batch=2, gpu_memory_limit=2**30, **common)["measurement"]["batch"] == 2
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                               "can't allocate memory: you tried to allocate 8 bytes."))


def test_a_measurement_a_stop_spans_is_taken_again(caplog) -> None:
    """A job stopped mid-measurement (Ctrl-Z, then fg) timed the pause too: measured again."""
    import os
    import signal

    from autotune.measure import trial

    class Continued(AnalyticEngine):  # continued (SIGCONT) during its first generation
        prefills = 0

        def prefill(self, prompt, osl):
            Continued.prefills += 1
            if Continued.prefills == 1:
                os.kill(os.getpid(), signal.SIGCONT)
            return super().prefill(prompt, osl)

    before = signal.getsignal(signal.SIGCONT)
    trial.watch_continues()
    try:
        engine = Continued(EngineConfig(model="tiny-llama", engine="analytic", device="cpu",
                                        dtype="float32", max_batch=2, max_seq_len=12))
        outcome = trial.run_trial(engine, trial.TrialRequest(batch=1, budget=0, isl=8, osl=4,
                                                             repeats=1, warmup=0))
    finally:
        signal.signal(signal.SIGCONT, before)
    assert outcome.status == "ok" and Continued.prefills == 2
    assert "stopped while a trial was measured; measuring it again" in caplog.text


def test_the_modelled_clock_option_times_the_model_exactly_and_is_given_back() -> None:
    """``clock=modelled`` (the scale-out test's two studies compare their optima with it)."""
    engine = AnalyticEngine(EngineConfig(model="tiny-llama", device="cpu",
                                         options=(("clock", "modelled"),)))
    engine.device_budget = 0
    try:
        assert timing.time is engine._modelled
        m = measure(engine, 4, 8, OSL, repeats=2, warmup=0)
        step = fakes.UNITS * fakes.UNIT / fakes.LINK_BYTES_PER_S  # streamed > compute here
        assert m.e2e_s == pytest.approx(OSL * step, rel=1e-12)
    finally:
        engine.close()
    assert timing.time is fakes.time


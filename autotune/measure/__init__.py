"""Measuring: the worker process per device, the trial it runs, and the one place that times
generation; the host-memory check before a run and ``autotune bench``. It loads engines from
:mod:`autotune.engines` and chooses nothing."""

"""The study: its options, its sampler and the prior that chooses trials, its trial budget
across processes and hosts, and joining it from another host (``autotune run``, ``autotune
worker``). It asks :mod:`autotune.measure` to run each trial and stores what came back."""

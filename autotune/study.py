"""``autotune.study``, the name the README's Python API imports: the study lives in
:mod:`autotune.tune.study`, and this name is that very module."""

import sys

from autotune.tune import study

sys.modules[__name__] = study

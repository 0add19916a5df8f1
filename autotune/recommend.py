"""``autotune.recommend``, the name the README's Python API imports: the recommendation lives in
:mod:`autotune.results.recommend`, and this name is that very module."""

import sys

from autotune.results import recommend

sys.modules[__name__] = recommend

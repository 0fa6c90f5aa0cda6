"""Console scripts of the demos (``attn-demo``, ``attn-demo-encdec``).

The demos' ``main`` returns its report (a dict, for tests and lessons); a console script's return value is its
exit status, so these wrappers return 0 once the demo has run and checked every token (a mismatch raises).
"""

from __future__ import annotations


def demo() -> int:
    from . import demo as module

    module.main()
    return 0


def demo_encdec() -> int:
    from . import demo_encdec as module

    module.main()
    return 0

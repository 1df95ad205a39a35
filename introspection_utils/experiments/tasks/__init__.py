"""Tasks a yes-bias cannot score, one module each: :mod:`.forced_choice` (name the injected concept among N),
:mod:`.congruence` (the injected concept named in the question vs its most anti-aligned one), :mod:`.strength`
(which of two injections is stronger), and what they share, :mod:`.common`. Notebook 13 and the findings call them.

The names this module once re-exported (``tasks.run_forced_choice``) still resolve for one release, with a warning.
"""

from introspection_utils.core.deprecation import moved

__getattr__ = moved(__name__, *(f"{__name__}.{m}" for m in ("forced_choice", "congruence", "strength", "common")))

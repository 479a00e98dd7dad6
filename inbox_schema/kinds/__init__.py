"""Job kinds: the registry and the built-in kinds (i2v, animate), registered here in the order users see them.

Everything that lists kinds or models derives it from here; see registry.py for what an entry holds.
"""

from inbox_schema.kinds.animate import ANIMATE
from inbox_schema.kinds.i2v import I2V
from inbox_schema.kinds.registry import (
    PLUGINS_ENV,
    InputRole,
    Kind,
    OptionsTable,
    get_kind,
    kind_for_model,
    kinds,
    model_folders,
    model_ids,
    register,
    resolve,
    unregister,
)

register(I2V)
register(ANIMATE)

__all__ = ["ANIMATE", "I2V", "PLUGINS_ENV", "InputRole", "Kind", "OptionsTable", "get_kind", "kind_for_model",
           "kinds", "model_folders", "model_ids", "register", "resolve", "unregister"]

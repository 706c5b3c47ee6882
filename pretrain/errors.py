"""The run configuration's error, below every module that raises it.

:mod:`pretrain.config` assembles the ``objective`` section from the objective registry, so the
modules the objectives import (kernels, models, optim) cannot import :mod:`pretrain.config` without
an import cycle; they raise :class:`ConfigError` from here, and ``pretrain.config`` re-exports it.
"""


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""

"""``torch``, imported the first time one of its attributes is read.

The method classes (``kvq_cli.methods``) answer questions that need no tensor (names, options, labels, the bit
accounting behind ``kvq methods``, ``kvq estimate-memory`` and every option check) beside the tensor code that encodes
and decodes; ``artifact`` checks an output path beside the code that writes tensors. Such modules name torch through
``torch`` here (``from .lazy import torch``), so that importing them does not import torch (seconds on a small
machine): their first tensor operation does.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType


class LazyModule(ModuleType):
    """Stands for the module ``name``. The first attribute read from a module's code imports it and puts the real
    module in that module's namespace in place of this stand-in, so later reads cost what they always do."""

    def __getattr__(self, attr: str):
        module = importlib.import_module(self.__name__)
        namespace = sys._getframe(1).f_globals  # the reader's module
        for key, value in list(namespace.items()):
            if value is self:
                namespace[key] = module
        return getattr(module, attr)


torch = LazyModule("torch")

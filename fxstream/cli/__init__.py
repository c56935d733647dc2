"""The ``fxstream`` command line: ``fxstream plan MODEL ...`` (:mod:`.commands`), its report
(:mod:`.report`) and its text and PNG renderings (:mod:`.render`). Nothing in the library
imports it."""

from .commands import main

__all__ = ["main"]

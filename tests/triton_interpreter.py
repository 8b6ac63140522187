"""Triton's interpreter without its per-helper-call re-patching (a test-suite speed-up only).

A kernel launch in the interpreter (`GridExecutor.__call__`) swaps triton.language's functions for
interpreted ones for the whole grid, and restores them at the end. Every call of a `@triton.jit`
helper from inside the kernel (`InterpretedFunction.__call__`) then swaps them again: it walks the
whole module with `inspect.getmembers` and finds everything swapped already, a few hundred
microseconds each time. lowbit's kernels call their decode helpers per tile, tens of thousands of
times in the kernel tests, so the walk was about a quarter of their time on CPU. Here a helper
whose triton.language modules have been swapped in the running launch skips the walk; anything
else (the launch itself, the first helper reaching another module) goes through Triton's code.
"""
import functools
import inspect
import logging

log = logging.getLogger(__name__)


class _NothingToRestore:
    def restore(self) -> None:
        pass


@functools.cache
def _language_modules(fn) -> frozenset:
    """ids of the triton.language modules in fn's globals (those Triton's _patch_lang swaps)."""
    import triton.language as tl

    return frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))


def skip_repatching_in_helper_calls() -> None:
    """Wrap the interpreter's launch and its _patch_lang (see the module docstring); a Triton
    without them keeps its own behaviour."""
    from triton.runtime import interpreter

    patch_lang, grid_executor = getattr(interpreter, "_patch_lang", None), getattr(interpreter, "GridExecutor", None)
    if patch_lang is None or grid_executor is None:
        log.warning("triton.runtime.interpreter has no _patch_lang / GridExecutor: it keeps re-patching")
        return
    if getattr(patch_lang, "skips_repatching", False):
        return
    launches = []  # per running launch: the ids of the triton.language modules swapped in it so far
    launch = grid_executor.__call__

    def launch_tracked(self, *args, **kwargs):
        launches.append(set())
        try:
            return launch(self, *args, **kwargs)
        finally:
            launches.pop()

    def patch_lang_once_per_launch(fn):
        modules = _language_modules(fn)
        if launches and modules and modules <= launches[-1]:
            return _NothingToRestore()  # a helper inside a launch that swapped its modules already
        if launches:
            # the launch's own swap (restored by the launch when its grid is done), or a helper reaching
            # another module (triton.language.standard's reach triton.language.core), which Triton
            # swaps and leaves swapped: the launch's later helpers in it skip the walk
            launches[-1].update(modules)
        return patch_lang(fn)

    patch_lang_once_per_launch.skips_repatching = True
    interpreter._patch_lang = patch_lang_once_per_launch
    grid_executor.__call__ = launch_tracked

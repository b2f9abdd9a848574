"""Exo's own command with our engine: `exo --inference-engine tinygrad --medusa-enabled [...]`.

The package installs `exo_tinygrad_medusa_exo_hook.pth` into site-packages (setup.py), which runs `install()` at
every interpreter start. `install()` only puts a finder on `sys.meta_path` that looks at one module name,
`exo.main`, and imports nothing itself. When `exo.main` is imported (Exo's `exo` command does that first) and the
command line carries a Medusa flag, the finder wraps Exo's loader: before the module runs, our options come off
`sys.argv` and the patches of exo_patch are applied (exo.main parses `sys.argv` and builds its node and engine at
import time); after it ran, the settings that depend on Exo's parsed flags. Any other process, and Exo started
without a Medusa flag, stay untouched: the patches replace Exo's tinygrad engine, so they are applied only when asked
for. `exo-medusa --inference-engine ...` strips our flags before it imports exo.main, so the hook stays out of its way.

Not covered: `python -m exo.main` (runpy runs the module's code without the loader's exec_module).
"""
from __future__ import annotations

import sys

EXO_MAIN = "exo.main"
# the flags that ask for our engine (exo_patch.exo_options); `--inference-engine medusa` does too
MEDUSA_FLAGS = ("--medusa-enabled", "--medusa", "--medusa-heads", "--medusa-num-heads", "--medusa-num-layers",
                "--medusa-choices")


def wants_medusa(argv: list[str]) -> bool:
    if any(a in MEDUSA_FLAGS or a.split("=", 1)[0] in MEDUSA_FLAGS for a in argv):
        return True
    return any(a == "--inference-engine=medusa" or (a == "--inference-engine" and nxt == "medusa")
               for a, nxt in zip(argv, argv[1:] + [""]))


class _PatchingLoader:
    """Exo's loader for exo.main, with our patches around the module's execution (a loader by protocol: importing
    importlib.abc at every interpreter start would cost more than this whole hook)."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        from .exo_patch import configure_from_exo_args, prepare_exo
        try:
            sys.argv[1:] = prepare_exo(sys.argv[1:])
        except ValueError as e:
            print(f"exo: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        self.loader.exec_module(module)
        try:
            configure_from_exo_args(module)
        except (ValueError, FileNotFoundError) as e:  # e.g. a model we cannot resolve
            print(f"exo: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None


class ExoMainFinder:
    """Answers only for exo.main, once; defers to the other finders for the module itself. It never edits
    sys.meta_path while the import system walks it (that would skip the next finder)."""

    def __init__(self):
        self.done = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != EXO_MAIN or self.done:
            return None
        self.done = True  # one look is enough; also keeps find_spec below from coming back here
        if not wants_medusa(sys.argv[1:]):
            return None
        import importlib.util
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _PatchingLoader(spec.loader)
        return spec


_FINDER = ExoMainFinder()


def install() -> None:
    """Called by the .pth file at interpreter start: idempotent, imports nothing."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)

"""Everything is in setup.cfg except what it cannot say: exo_tinygrad_medusa_exo_hook.pth, which lets Exo's own
`exo --inference-engine tinygrad --medusa-enabled` run our engine (exo_tinygrad_medusa/serving/exo_hook.py), must sit
at the root of the wheel, that is in site-packages, for regular and editable installs alike."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "exo_tinygrad_medusa_exo_hook.pth"


class BuildPyWithPth(build_py):
    """build_py, plus the .pth at the root of the wheel: build_lib for a regular wheel; for an editable one the
    unpacked wheel, which editable_wheel configured as `install`'s install_lib (it packs only what is there)."""

    def run(self):
        super().run()
        self.copy_file(PTH, str(Path(self._pth_root()) / PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        extra = [] if getattr(self, "editable_mode", False) else [str(Path(self.build_lib) / PTH)]
        return [*super().get_outputs(include_bytecode), *extra]

    def _pth_root(self) -> str:
        if getattr(self, "editable_mode", False):
            return self.get_finalized_command("install").install_lib
        return self.build_lib


setup(cmdclass={"build_py": BuildPyWithPth})

"""Everything is in pyproject.toml, except one file setuptools cannot declare: quantize-llm.pth.

It must sit at the root of site-packages, where Python's ``site`` runs its import line at every interpreter
start (``import quantize``: cheap, see quantize/integrations/transformers/autoload.py), so that transformers
loads auto_round checkpoints through this package without the user importing it. build_py copies it next to
the packages: into ``build_lib`` for a wheel, and into the editable wheel for ``pip install -e``, which
setuptools builds from ``install_lib`` (build_lib is not packed in an editable install).
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "quantize-llm.pth"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.copy_file(PTH, os.path.join(root, PTH))

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]

    def get_source_files(self):  # so that an sdist carries it
        return [*super().get_source_files(), PTH]


setup(cmdclass={"build_py": build_py_with_pth})

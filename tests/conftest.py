"""The whole test session runs in a fresh working directory: the scripts' default --out_dir
(out/<method>-<data>, relative) then never touches the repository's own out/, where a user's
runs live (a run there would otherwise make tests fail on "ckpt.pt already exists")."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session", autouse=True)
def scratch_working_directory(tmp_path_factory):
    home = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(home)

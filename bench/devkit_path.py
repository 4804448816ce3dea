"""Makes scripts/ (devkit, kernel_static) importable from the bench scripts. Users run them as plain files with the
Python they have (ComfyUI's own venv, the portable build's python_embeded, a GPU box with no package registry), so
nothing may be installed for them: this module, found beside the script, adds the repository's scripts/ folder to
sys.path. Import it before devkit (isort keeps it there: it sorts with the third-party imports, devkit is
first-party)."""
import os
import sys

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
if SCRIPTS not in sys.path:
    sys.path.append(SCRIPTS)  # appended: nothing in it may shadow an installed package

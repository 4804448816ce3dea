"""A ComfyUI with this pack installed the way users install it: a real folder `custom_nodes/ComfyUI-DeltaConv` (what
`git clone` or ComfyUI-Manager makes), not a link or an extra-paths entry.

    python scripts/devkit/user_install.py SOURCE_COMFYUI DEST   # prints DEST/ComfyUI/custom_nodes/ComfyUI-DeltaConv

The ComfyUI is a copy (its own folders, models included), so the tests never add anything to the source.
"""
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK_FOLDER = "ComfyUI-DeltaConv"  # the README's `git clone ... ComfyUI-DeltaConv`
# Left out of the ComfyUI copy: what a run writes, a venv kept inside it, other packs in its own custom_nodes; and
# the files of models/ and input/ (a user's may hold gigabytes), whose folders are kept.
NOT_COPIED = ("__pycache__", ".git", "output", "temp", "user", "custom_nodes", "venv", ".venv")
FOLDERS_ONLY = ("models", "input")


def pack_files() -> list[str]:
    """The repository's files as a clone has them: tracked and not ignored (uncommitted edits included, so a
    developer tests what they see)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                                capture_output=True, check=True).stdout.decode().split("\0")
        return [f for f in listed if f and os.path.isfile(os.path.join(REPO, f))]  # a deleted file is still listed
    except (OSError, subprocess.CalledProcessError):  # no git (a zip download): all but the ignored folders
        files = []
        for root, dirs, names in os.walk(REPO):
            dirs[:] = [d for d in dirs if d not in (".git", ".venv", ".cache", "__pycache__")]
            files += [os.path.relpath(os.path.join(root, n), REPO) for n in names]
        return files


def _not_copied(source: str):
    def ignore(folder, names):
        top = os.path.relpath(folder, source).split(os.sep)[0]
        files = {n for n in names if os.path.isfile(os.path.join(folder, n))} if top in FOLDERS_ONLY else set()
        return files | {n for n in names if n in NOT_COPIED}
    return ignore


def install(source_comfyui: str, dest: str) -> str:
    """DEST/ComfyUI (a copy of source_comfyui) with the pack in custom_nodes/ComfyUI-DeltaConv; returns the pack."""
    comfy = os.path.join(dest, "ComfyUI")
    shutil.copytree(source_comfyui, comfy, ignore=_not_copied(source_comfyui), symlinks=True)
    pack = os.path.join(comfy, "custom_nodes", PACK_FOLDER)
    for f in pack_files():
        os.makedirs(os.path.dirname(os.path.join(pack, f)), exist_ok=True)
        shutil.copy2(os.path.join(REPO, f), os.path.join(pack, f))
    return pack


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(install(os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])))

"""Test setup: a real ComfyUI (COMFYUI_PATH, else the one this pack is installed in), importable in-process and as a
server."""
import os

import pytest

from devkit.comfy_env import find_comfyui, load_pack, setup_comfy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


def _comfy_path() -> str:
    try:
        return find_comfyui()
    except SystemExit as e:
        pytest.exit(f"{e} To run the tests: bash scripts/test.sh", returncode=2)


COMFYUI_PATH = _comfy_path()
setup_comfy(COMFYUI_PATH, cpu=True)  # these tests never need a GPU
load_pack()  # `import deltaconv_core` in tests is then the very module the pack's nodes use


@pytest.fixture(scope="session")
def comfy_path():
    return COMFYUI_PATH


@pytest.fixture(scope="session")
def pack():
    return load_pack()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny random models that ComfyUI's own detection accepts, written once per session."""
    from devkit.tiny_models import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("comfy_base"))


@pytest.fixture(scope="session")
def load_tiny(pack, tiny_models):
    """Loads a tiny model in-process as a ModelPatcher, with the pack's own version-independent loader."""
    return lambda name: pack.nodes.compat.load_diffusion_model(tiny_models[name])


@pytest.fixture()
def patching(pack):
    return pack.nodes.patching


@pytest.fixture()
def out_dir(tmp_path, monkeypatch):
    """ComfyUI's output folder redirected to a fresh temporary one; returns its deltaconv subfolder."""
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_output_directory", lambda: str(tmp_path))
    return tmp_path / "deltaconv"


@pytest.fixture(scope="session")
def comfy_server(tiny_models):
    """A headless ComfyUI server on loopback with this pack and the test-only nodes loaded."""
    from devkit.comfy_server import ComfyServer

    server = ComfyServer(COMFYUI_PATH, tiny_models, pack_dir=REPO, test_nodes_dir=os.path.join(TESTS, "test_nodes"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def server(comfy_server):
    return comfy_server


@pytest.fixture(scope="session")
def unet_inputs(comfy_server):
    """Old ComfyUI's UNETLoader has no weight_dtype widget; newer ones require it."""
    required = comfy_server.get("/object_info/UNETLoader")["UNETLoader"]["input"]["required"]
    return {"weight_dtype": "default"} if "weight_dtype" in required else {}

"""A real headless ComfyUI server for end-to-end tests: started on loopback, driven over its HTTP API."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

PACK_NAME = "ComfyUI-DeltaConv"
TEST_PACK_NAME = "deltaconv_test_nodes"
MODEL_FOLDERS = {  # folder name → path under the base dir; both old and new ComfyUI folder names
    "unet": "models/unet", "diffusion_models": "models/unet", "vae_approx": "models/vae_approx",
    "vae": "models/vae", "loras": "models/loras", "controlnet": "models/controlnet",
    "checkpoints": "models/checkpoints", "clip": "models/clip", "text_encoders": "models/clip",
    "deltaconv": "models/deltaconv",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyError(RuntimeError):
    pass


class ComfyServer:
    def __init__(self, comfy_path, models: dict, pack_dir: str, test_nodes_dir: str | None = None, cpu=True,
                 extra_flags=(), env=None, name="server", python=sys.executable, own_folders=False):
        """`extra_flags`: more ComfyUI command-line flags; `env`: more environment variables; `name`: of the log
        file in the base folder, so that several servers can share one base; `python`: the interpreter that runs
        main.py; `own_folders`: started as a user starts it, on ComfyUI's own folders (models/, custom_nodes/,
        output/ in comfy_path), with no extra paths and the pack and test nodes already in its custom_nodes."""
        self.comfy_path, self.cpu, self.python, self.own_folders = comfy_path, cpu, python, own_folders
        self.base = models["base"]
        self.pack_dir, self.test_nodes_dir = pack_dir, test_nodes_dir
        self.extra_flags, self.extra_env = list(extra_flags), dict(env or {})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.log_path = os.path.join(self.base, f"{name}.log")

    def _flags(self) -> list[str]:
        with open(os.path.join(self.comfy_path, "comfy", "cli_args.py")) as f:
            known = f.read()
        flags = ["--cpu"] if self.cpu else []
        flags += ["--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch"]
        if self.own_folders:
            return flags
        flags += ["--extra-model-paths-config", self._write_yaml()]
        for flag, folder in (("--output-directory", "output"), ("--input-directory", "input"),
                             ("--temp-directory", "temp")):
            if flag in known:
                os.makedirs(os.path.join(self.base, folder), exist_ok=True)
                flags += [flag, os.path.join(self.base, folder)]
        for flag, value in (("--disable-api-nodes", None), ("--database-url", "sqlite:///:memory:")):
            if flag in known:
                flags += [flag] + ([value] if value else [])
        return flags

    def pack_installed(self) -> bool:
        """Whether the pack already sits in this ComfyUI's own custom_nodes folder, as users install it."""
        custom = os.path.realpath(os.path.join(self.comfy_path, "custom_nodes"))
        return os.path.dirname(os.path.realpath(self.pack_dir)) == custom

    def _write_yaml(self) -> str:
        custom = os.path.join(self.base, "custom_nodes")
        os.makedirs(custom, exist_ok=True)
        links = [(TEST_PACK_NAME, self.test_nodes_dir)]
        if not self.pack_installed():  # else ComfyUI loads it from its own custom_nodes: a link would load it twice
            links.append((PACK_NAME, self.pack_dir))
        for name, target in links:
            link = os.path.join(custom, name)
            if target and not os.path.islink(link):
                os.symlink(target, link)
        lines = ["deltaconv_tests:", f"    base_path: {self.base}", "    custom_nodes: custom_nodes"]
        lines += [f"    {k}: {v}" for k, v in MODEL_FOLDERS.items()]
        path = os.path.join(self.base, "extra_model_paths.yaml")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = 180):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env}
        with open(self.log_path, "w") as log:  # the child keeps its own copy of the handle
            self.proc = subprocess.Popen([self.python, "main.py", *self._flags(), *self.extra_flags],
                                         cwd=self.comfy_path, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                self.get("/object_info/DeltaConvPatch")
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        else:
            self.stop()
            raise ComfyError(f"ComfyUI did not come up in {timeout}s:\n{self.log_text()[-4000:]}")
        text = self.log_text()
        folder = os.path.basename(os.path.realpath(self.pack_dir)) if self.pack_installed() else PACK_NAME
        if "IMPORT FAILED" in text and folder in text.split("IMPORT FAILED")[1][:300]:
            raise ComfyError(f"the pack failed to import:\n{text[-4000:]}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def log_text(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def get(self, route: str):
        with urllib.request.urlopen(self.url + route, timeout=30) as r:
            return json.loads(r.read())

    def post(self, route: str, payload: dict):
        req = urllib.request.Request(self.url + route, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = r.read()
                return json.loads(body) if body else None
        except urllib.error.HTTPError as e:
            raise ComfyError(f"POST {route} → {e.code}: {e.read().decode(errors='replace')}") from e

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})["prompt_id"]

    def ended(self, prompt_id: str, timeout: float = 300) -> dict:
        """The prompt's history entry once it has ended, however it ended (success, error, interrupted)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry:  # history entries appear when a prompt has finished, successfully or not
                return entry
            time.sleep(0.1)
        raise ComfyError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log_text()[-3000:]}")

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        entry = self.ended(prompt_id, timeout)
        if entry.get("status", {}).get("status_str") != "success":
            errors = [m for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
            raise ComfyError(f"prompt failed: {json.dumps(errors)[:3000]}")
        return entry

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """Queue an API-format prompt and return its history entry; raises on validation or execution errors."""
        return self.wait(self.queue(prompt), timeout)

    def outputs(self, prompt: dict) -> dict:
        return self.run(prompt)["outputs"]

    def free(self):
        self.post("/free", {"unload_models": True, "free_memory": True})

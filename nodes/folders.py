"""The `deltaconv` model folder: models/deltaconv plus output/deltaconv, merged with extra_model_paths.yaml."""
import os

import folder_paths

FOLDER = "deltaconv"


def register_folder() -> None:
    # extra_model_paths.yaml is applied before custom nodes load and may already have created the entry.
    existing = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))[0]
    paths = list(existing)
    for default in (os.path.join(folder_paths.models_dir, FOLDER),
                    os.path.join(folder_paths.get_output_directory(), FOLDER)):
        if default not in paths:
            paths.append(default)
    # Pickle formats are listed on purpose: loading them gives a clear refusal instead of a silent omission.
    # .sft (short for .safetensors) is listed by newer ComfyUI; older copies lack it.
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(folder_paths.supported_pt_extensions) | {".sft"})


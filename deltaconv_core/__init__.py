"""Pure-PyTorch core of ComfyUI-DeltaConv (never imports ComfyUI).

Import the modules themselves (`deltaconv_core.weights`, `.students`, ...): the package exports nothing, so
importing one module does not load the rest.
"""

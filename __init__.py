"""wan22-moe as a ComfyUI custom node pack.

ComfyUI imports this file by path under a mangled module name, so everything below is reached
by relative imports (the nodes reach the engine as `..wan22_core`). Importing builds no models.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web/js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]

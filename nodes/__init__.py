"""The ComfyUI nodes of the pack (legacy V1 contract: class names are the API)."""
from .loaders import Wan22MoEModelLoader, Wan22TextEncoderLoader, Wan22VAELoader
from .lora import Wan22LoRA
from .parallel import Wan22MultiGPUConfig
from .sampler import Wan22MoESampler
from .text_encode import Wan22TextEncode
from .video import Wan22SaveVideo, Wan22VAEDecode

NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (
    Wan22TextEncoderLoader, Wan22TextEncode, Wan22MoEModelLoader, Wan22LoRA, Wan22VAELoader,
    Wan22MultiGPUConfig, Wan22MoESampler, Wan22VAEDecode, Wan22SaveVideo,
)}

NODE_DISPLAY_NAME_MAPPINGS = {
    "Wan22TextEncoderLoader": "Wan2.2 Text Encoder Loader (UMT5)",
    "Wan22TextEncode": "Wan2.2 Text Encode",
    "Wan22MoEModelLoader": "Wan2.2 MoE Model Loader (high + low noise)",
    "Wan22LoRA": "Wan2.2 LoRA (high + low noise)",
    "Wan22VAELoader": "Wan2.2 VAE Loader (Wan2.1 VAE)",
    "Wan22MultiGPUConfig": "Wan2.2 Multi-GPU Config",
    "Wan22MoESampler": "Wan2.2 MoE Sampler",
    "Wan22VAEDecode": "Wan2.2 VAE Decode",
    "Wan22SaveVideo": "Wan2.2 Save Video (mp4)",
}

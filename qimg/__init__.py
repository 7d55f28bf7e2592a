"""qimg: image generation and editing with Qwen-Image from the shell."""

__version__ = "0.1.0"

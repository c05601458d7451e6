from .audio import AudioAdapter
from .base import Adapter, AdapterOutput
from .image import ImageAdapter
from .text import TextAdapter

__all__ = ["Adapter", "AdapterOutput", "AudioAdapter", "ImageAdapter", "TextAdapter"]

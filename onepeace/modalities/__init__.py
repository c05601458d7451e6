"""Every modality, one file each, all of the same shape (``{kind}.py`` registers modality ``kind`` on
import): its adapter config (with the released checkpoint format), adapter, preprocessing, collate,
optional fast embed path and file suffixes. ``import onepeace`` imports the bundled ones below; a saved
config naming another bundled kind imports ``onepeace.modalities.{kind}`` by name.

Registration order is the order of :data:`onepeace.registry.MODALITIES` (media first, then text).
"""
from . import image, audio, text, video  # noqa: F401  (each registers itself)

"""Bundled extra modalities, one file each (``{kind}.py`` registers modality ``kind`` on import).

:func:`onepeace.list_modalities` imports them all; a saved config naming a kind imports its file.
"""

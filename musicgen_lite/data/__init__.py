"""Captioned music data: synthetic compositions, corpus melodies, rendering, datasets.

- ``synth``: attributes -> notes -> caption + metadata (``compose``, ``synth_clip``)
- ``corpus``: real melodies from music21's corpus, arranged the same way (``compose_corpus``)
- ``render``: FluidSynth with the General MIDI soundfont, or a built-in synth (``render``)
- ``dataset``: audiocraft-style folders on disk and a torch Dataset (``make_dataset``, ``AudioDataset``)
"""
from .corpus import compose_corpus, list_tunes
from .dataset import AudioDataset, cache_root, make_dataset, read_info, read_manifest, write_manifest
from .render import RenderError, fluidsynth_available, render
from .synth import compose, synth_clip

__all__ = ["AudioDataset", "RenderError", "cache_root", "compose", "compose_corpus", "fluidsynth_available",
           "list_tunes", "make_dataset", "read_info", "read_manifest", "render", "synth_clip", "write_manifest"]

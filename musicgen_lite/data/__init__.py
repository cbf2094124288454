"""Captioned music data: synthetic compositions, corpus melodies, rendering, datasets.

- ``synth``: attributes -> notes -> caption + metadata (``compose``, ``synth_clip``)
- ``corpus``: real melodies from music21's corpus, arranged the same way (``compose_corpus``)
- ``render``: FluidSynth with the General MIDI soundfont, or a built-in synth (``render``)
- ``dataset``: audiocraft-style folders on disk and a torch Dataset (``make_dataset``, ``AudioDataset``),
  and the token cache LM training reads (``build_token_cache``, ``TokenDataset``)
"""
from .corpus import compose_corpus, list_tunes
from .dataset import (AudioDataset, TokenDataset, build_token_cache, cache_root, codec_fingerprint, make_dataset,
                      read_info, read_manifest, write_manifest)
from .render import RenderError, fluidsynth_available, render
from .synth import compose, synth_clip

__all__ = ["AudioDataset", "TokenDataset", "build_token_cache", "codec_fingerprint", "RenderError", "cache_root", "compose", "compose_corpus", "fluidsynth_available",
           "list_tunes", "make_dataset", "read_info", "read_manifest", "render", "synth_clip", "write_manifest"]

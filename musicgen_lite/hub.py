"""Weights in and out: safetensors checkpoints, and porting from transformers.

- :func:`save_checkpoint` / :func:`load_checkpoint`: tensors in ``model.safetensors``, the
  config and anything JSON-able in ``config.json``, both written to a temporary file and
  renamed, so a crash never leaves half a checkpoint. Nothing is ever unpickled.
- :func:`from_transformers`: a transformers model -> ours with the same weights. EnCodec is
  handled here (our module names are transformers' names); MusicGen's decoder and the full
  MusicGen dispatch to :mod:`musicgen_lite.lm` and :mod:`musicgen_lite.generation`.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
KEY_GUIDE_NAME = "key_guide.safetensors"  # a model folder's key guide, beside (not inside) its weights


# --------------------------------------------------------------------------- atomic files

def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes files private; checkpoints are for sharing
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_tensors(path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """Atomically write ``tensors`` (contiguous CPU copies, shared storage untied) as safetensors."""
    from safetensors.torch import save_file

    path = Path(path)
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = None if metadata is None else {k: str(v) for k, v in metadata.items()}
    _atomic_write(path, lambda tmp: save_file(plain, tmp, metadata=meta))
    return path


def load_tensors(path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    return load_file(str(path), device=str(device))


def save_json(path, obj) -> Path:
    path = Path(path)
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default)
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))
    return path


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if torch.is_tensor(o):
        return o.tolist()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


INT8_SCALE_SUFFIX = ".int8_row_scale"
INT8_MIN_NUMEL = 4096  # smaller matrices (and every vector) are stored in fp16


def pack_int8(state: dict[str, torch.Tensor], min_numel: int = INT8_MIN_NUMEL) -> dict[str, torch.Tensor]:
    """A state dict for shipping at about a quarter of its fp32 bytes.

    Every floating matrix with at least ``min_numel`` entries (linear weights, embedding tables)
    becomes int8 with one fp32 scale per row, ``q = round(w / s)``, ``s = max|w_row| / 127``,
    stored under ``name`` and ``name + INT8_SCALE_SUFFIX``: each weight comes back within
    ``s / 2`` of its value. Other floating tensors are stored in fp16, integers as they are.
    Storage only: :func:`unpack_int8` (called by :func:`load_checkpoint`) gives fp32 back, and
    the model computes in fp32 as before (unlike :mod:`musicgen_lite.int8`, which computes in int8).
    """
    out = {}
    for k, v in state.items():
        if k.endswith(INT8_SCALE_SUFFIX):
            raise ValueError(f"{k}: a tensor name may not end with {INT8_SCALE_SUFFIX!r}")
        if v.is_floating_point() and v.dim() == 2 and v.numel() >= min_numel:
            w = v.detach().float()
            scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
            out[k] = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
            out[k + INT8_SCALE_SUFFIX] = scale
        else:
            out[k] = v.to(torch.float16) if v.is_floating_point() else v
    return out


def unpack_int8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo :func:`pack_int8`: int8 matrices with a row scale -> fp32 (``q * s``); the rest unchanged."""
    scaled = [k[:-len(INT8_SCALE_SUFFIX)] for k in state if k.endswith(INT8_SCALE_SUFFIX)]
    if not scaled:
        return state
    out = {k: v for k, v in state.items() if not k.endswith(INT8_SCALE_SUFFIX)}
    for k in scaled:
        if k not in out or out[k].dtype != torch.int8:
            raise ValueError(f"{k}: an int8 row scale without its int8 weights")
        out[k] = out[k].float() * state[k + INT8_SCALE_SUFFIX].float()[:, None]
    return out


def save_checkpoint(path, model: nn.Module | dict, config: dict, extra: dict | None = None,
                    dtype: torch.dtype | str | None = None) -> Path:
    """Write a checkpoint folder ``path``: ``model.safetensors`` + ``config.json``.

    ``model`` is a module or a state dict; ``config`` the dict that rebuilds it; ``extra``
    any JSON-able facts (step, data, metrics). ``dtype`` (e.g. ``torch.float16``) casts the
    floating tensors for shipping; ``"int8"`` stores large matrices as int8 with row scales
    (:func:`pack_int8`; :func:`load_checkpoint` restores fp32). Returns the folder.
    """
    path = Path(path)
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    if isinstance(dtype, str):
        if dtype != "int8":
            raise ValueError(f"dtype must be a torch dtype or 'int8', got {dtype!r}")
        state = pack_int8(state)
    elif dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_tensors(path / WEIGHTS_NAME, state)
    save_json(path / CONFIG_NAME, {"config": config, "extra": extra or {}})
    return path


def load_checkpoint(path, device: str | torch.device = "cpu") -> tuple[dict, dict, dict]:
    """Read a folder written by :func:`save_checkpoint` -> ``(state_dict, config, extra)``
    (int8-packed matrices come back as fp32, see :func:`pack_int8`)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME} (not a musicgen-lite checkpoint)")
    meta = json.loads((path / CONFIG_NAME).read_text())
    return unpack_int8(load_tensors(path / WEIGHTS_NAME, device)), meta.get("config", {}), meta.get("extra", {})


def load_codec(path, device: str | torch.device = "cpu"):
    """A :class:`~musicgen_lite.codec.CompressionModel` from a checkpoint folder, in eval mode, fp32."""
    from .codec import CodecConfig, CompressionModel

    state, config, _ = load_checkpoint(path, device)
    model = CompressionModel(CodecConfig.from_dict(config))
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    for name, module in model.named_modules():  # an inference-only export has no EMA sums: rebuild them
        key = f"{name}.embed_avg"
        if hasattr(module, "embed_avg") and key not in state and f"{name}.embed" in state:
            size = state[f"{name}.cluster_size"]
            total = size.sum()
            smoothed = (size + module.epsilon) / (total + size.numel() * module.epsilon) * total
            state[key] = state[f"{name}.embed"] * smoothed.unsqueeze(1)
    model.load_state_dict(state)
    return model.to(device).eval()


# --------------------------------------------------------------------------- transformers

def from_transformers(model):
    """A transformers model -> the musicgen-lite module holding the same weights.

    - ``EncodecModel`` -> :class:`~musicgen_lite.codec.CompressionModel`
    - ``MusicgenForCausalLM`` -> :func:`musicgen_lite.lm.from_transformers_decoder`
    - ``MusicgenForConditionalGeneration`` / ``MusicgenMelodyForConditionalGeneration`` ->
      :func:`musicgen_lite.generation.from_transformers_musicgen`
    """
    name = type(model).__name__
    if name == "EncodecModel":
        return encodec_from_transformers(model)
    if name in ("MusicgenForCausalLM", "MusicgenMelodyForCausalLM"):
        from .lm import from_transformers_decoder

        return from_transformers_decoder(model)
    if name in ("MusicgenForConditionalGeneration", "MusicgenMelodyForConditionalGeneration"):
        from .generation import from_transformers_musicgen

        return from_transformers_musicgen(model)
    raise TypeError(f"from_transformers: no port for {name} (expected EncodecModel or a Musicgen model)")


def codec_config_from_transformers(hf_config):
    """transformers' ``EncodecConfig`` -> our :class:`~musicgen_lite.codec.CodecConfig`."""
    from .codec import CodecConfig

    c = hf_config
    if c.norm_type != "weight_norm":
        raise NotImplementedError(f"EnCodec with norm_type={c.norm_type!r} (only weight_norm is ported)")
    if c.normalize or c.chunk_length_s is not None:
        raise NotImplementedError("EnCodec with normalize=True or chunk_length_s (the 48 kHz model) is not ported")
    if c.codebook_dim != c.hidden_size:
        raise NotImplementedError("EnCodec with codebook_dim != hidden_size is not ported")
    return CodecConfig(
        sample_rate=c.sampling_rate, channels=c.audio_channels, dimension=c.hidden_size, n_filters=c.num_filters,
        ratios=list(c.upsampling_ratios), n_residual_layers=c.num_residual_layers,
        dilation_base=c.dilation_growth_rate, kernel_size=c.kernel_size, last_kernel_size=c.last_kernel_size,
        residual_kernel_size=c.residual_kernel_size, compress=c.compress, lstm_layers=c.num_lstm_layers,
        causal=c.use_causal_conv, pad_mode=c.pad_mode, true_skip=not c.use_conv_shortcut,
        trim_right_ratio=c.trim_right_ratio, n_q=c.num_quantizers, bins=c.codebook_size)


def _weight_norm_parts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain conv weight -> ``(g, v)`` with ``g * v / |v| == w`` (norm over all dims but 0)."""
    g = w.flatten(1).norm(dim=1).view(-1, *([1] * (w.dim() - 1)))
    return g, w


def encodec_from_transformers(hf_model):
    """transformers ``EncodecModel`` -> :class:`~musicgen_lite.codec.CompressionModel` (eval mode).

    Weight norm arrives as ``weight_g`` / ``weight_v`` (old ``nn.utils.weight_norm``), as
    ``parametrizations.weight.original0/1`` (new), or already folded as ``weight``: all
    three map onto our parametrization. The codebooks load as they are.
    """
    from .codec import CompressionModel

    cfg = codec_config_from_transformers(hf_model.config)
    ours = CompressionModel(cfg)
    expected = ours.state_dict()
    state = {}
    for key, value in hf_model.state_dict().items():
        if key.endswith(".weight_g"):
            state[key[: -len("weight_g")] + "parametrizations.weight.original0"] = value
        elif key.endswith(".weight_v"):
            state[key[: -len("weight_v")] + "parametrizations.weight.original1"] = value
        elif key.endswith("conv.weight") and key not in expected:
            g, v = _weight_norm_parts(value)
            base = key[: -len("weight")] + "parametrizations.weight."
            state[base + "original0"], state[base + "original1"] = g, v
        else:
            state[key] = value
    missing = set(expected) - set(state)
    # EnCodec checkpoints have no `embed_avg` etc. in some exports: keep ours then
    for key in list(missing):
        if ".codebook." in key and not key.endswith(".embed"):
            state[key] = expected[key]
            missing.discard(key)
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        raise ValueError(f"EnCodec port: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    ours.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    for layer in ours.quantizer.layers:
        layer.codebook.inited.fill_(1.0)
    return ours.to(next(hf_model.parameters()).device).eval()


# --------------------------------------------------------------------------- whole models

MUSICGEN_FORMAT = "musicgen-lite/musicgen"
# the frozen pretrained encoders inside a conditioner: rebuilt from their own package, not saved
_FROZEN_PREFIXES = {"t5": "t5.", "minilm": "encoder."}


def melody_spec(melody) -> dict:
    """What rebuilds a :class:`~musicgen_lite.conditioning.MelodyConditioner` (with ``output_dim``):
    ``{"sample_rate", "n_chroma", "radix2_exp", "argmax", "length"}``, JSON-able."""
    import math

    return {"sample_rate": int(melody.sample_rate), "n_chroma": int(melody.n_chroma),
            "radix2_exp": int(round(math.log2(melody.chroma.n_fft))), "argmax": bool(melody.chroma.argmax),
            "length": int(melody.length)}


def default_model_path() -> Path:
    """Where the shipped default text-to-music model lives (``data/checkpoints/musicgen_lite``)."""
    return Path(__file__).resolve().parent.parent / "data" / "checkpoints" / "musicgen_lite"


def save_musicgen(model, path, conditioner: dict | None = None, extra: dict | None = None,
                  dtype: torch.dtype | str | None = None, codec_path: str | None = None) -> Path:
    """Write a :class:`~musicgen_lite.generation.MusicGen` (our codec + LM + text conditioner) to a folder.

    Layout: ``codec/`` (a codec checkpoint), ``model.safetensors`` (``lm.*`` and the
    conditioner's trainable ``conditioner.*`` weights; a frozen T5 or MiniLM is not copied,
    it is reloaded from its own package) and ``config.json`` (the LM config, the pattern, the
    conditioner's ``{"name", "kwargs"}`` as for :func:`~musicgen_lite.conditioning.get_conditioner`,
    and ``extra``). ``dtype`` casts floating tensors (e.g. fp16 for shipping; ``"int8"``:
    :func:`pack_int8`, the codec then in fp16).

    ``codec_path``: instead of a ``codec/`` copy, a path relative to ``path`` of a codec
    checkpoint that holds the same weights (checked), for models shipped beside their codec.

    A model with a key guide (``model.key_guide``) gets ``key_guide.safetensors`` beside the
    weights, never cast (:func:`save_key_guide` adds one to a folder without rewriting them).

    A melody model (``model.melody_conditioner``) also stores its chroma settings
    (``config["melody"]``, :func:`melody_spec`) and its projection (``melody_conditioner.proj.*``;
    the STFT window and chroma filters are rebuilt from the settings, never cast to fp16).
    """
    from .codec import CompressionModel

    path = Path(path)
    if not isinstance(model.codec, CompressionModel):
        raise TypeError("save_musicgen stores musicgen-lite codecs only (a transformers EnCodec has its own format)")
    if model.conditioner is not None and conditioner is None:
        raise ValueError("pass conditioner={'name': 'learned' | 'minilm' | 't5', 'kwargs': {...}} "
                         "so the model can be rebuilt")
    # the codebooks' EMA sums only serve k-means updates: left out, as export_codec(inference_only=True)
    # does (load_codec rebuilds them), so a model folder's codec/ matches the shipped codec file
    codec_state = {k: v for k, v in model.codec.state_dict().items() if not k.endswith("codebook.embed_avg")}
    if codec_path is None:
        save_checkpoint(path / "codec", codec_state, model.codec.config.to_dict(),
                        dtype=torch.float16 if dtype == "int8" else dtype)
    else:
        # path may not exist yet: resolve the relative path by name, not through the file system
        if not _holds_codec(os.path.normpath(path / codec_path), codec_state, model.codec.config.to_dict()):
            raise ValueError(f"codec_path={codec_path!r}: the codec there is not this model's codec")
    state = {f"lm.{k}": v for k, v in model.lm.state_dict().items()}
    if model.conditioner is not None:
        frozen = _FROZEN_PREFIXES.get(conditioner["name"])
        state.update({f"conditioner.{k}": v for k, v in model.conditioner.state_dict().items()
                      if not (frozen and k.startswith(frozen))})
    melody = getattr(model, "melody_conditioner", None)
    if melody is not None:  # its learned weights only: the STFT window and filterbank are rebuilt exactly
        state.update({f"melody_conditioner.{k}": v for k, v in melody.named_parameters()})
    config = {"format": MUSICGEN_FORMAT, "lm": model.lm.config.to_dict(), "pattern": model.pattern.name,
              "conditioner": conditioner, "max_duration": model.max_duration, "extend_stride": model.extend_stride,
              "melody": melody_spec(melody) if melody is not None else None,
              "cfg_coef": model.cfg_coef}
    if getattr(model, "tempo", None) is not None:  # a beat-clock model's tempo predictor (word weights)
        config["tempo"] = model.tempo.to_dict()
    if getattr(model, "mode_predictor", None) is not None:  # the mode of captions that state none
        config["mode_predictor"] = model.mode_predictor.to_dict()
    guide = getattr(model, "key_guide", None)
    if guide is not None:  # the codec as it will load: a copy stored in fp16 hashes differently from the one in memory
        config["key_guide"] = _write_key_guide(path, guide, load_codec(path / "codec") if codec_path is None
                                               else model.codec)
    if codec_path is not None:
        config["codec_path"] = str(codec_path)
    return save_checkpoint(path, state, config, extra, dtype=dtype)


def _write_key_guide(path: Path, guide, codec) -> dict:
    """``path/key_guide.safetensors`` (fp32 chroma, whole-number counts; never cast with the
    weights) -> the ``config["key_guide"]`` entry, which ties it to ``codec``'s codes."""
    from .data.dataset import codec_fingerprint

    save_tensors(path / KEY_GUIDE_NAME, {"chroma": guide.chroma.float(), "counts": guide.counts.round().long()})
    return {**guide.to_config(), "codec": codec_fingerprint(codec)}


def save_key_guide(model_dir, guide) -> Path:
    """Give an existing model folder a :class:`~musicgen_lite.key_guidance.KeyGuide` (or replace
    its guide) without rewriting its weights: ``key_guide.safetensors`` and the ``key_guide``
    entry of its ``config.json``, checked against the folder's codec."""
    model_dir = Path(model_dir)
    meta = json.loads((model_dir / CONFIG_NAME).read_text())
    if meta.get("config", {}).get("format") != MUSICGEN_FORMAT:
        raise ValueError(f"{model_dir}: not a {MUSICGEN_FORMAT} model folder")
    codec = load_codec(musicgen_codec_dir(model_dir))
    if guide.bins != codec.cardinality:
        raise ValueError(f"the key guide knows {guide.bins} tokens, the codec's codebooks have {codec.cardinality}")
    meta["config"]["key_guide"] = _write_key_guide(model_dir, guide, codec)
    save_json(model_dir / CONFIG_NAME, meta)
    return model_dir


def _holds_codec(codec_dir, state: dict[str, torch.Tensor], config: dict) -> bool:
    """Whether the codec checkpoint ``codec_dir`` has this config and these weights, every one of
    them (the decoder too, unlike :func:`~musicgen_lite.data.dataset.codec_fingerprint`, which
    only covers what decides the codes); ``state`` is compared at the stored precision. The
    codebooks' EMA sums (k-means statistics, which an inference export leaves out) do not count."""
    stored, stored_config, _ = load_checkpoint(codec_dir)
    weights = lambda d: {k: v for k, v in d.items() if not k.endswith("codebook.embed_avg")}  # noqa: E731
    stored, state = weights(stored), weights(state)
    return stored_config == config and stored.keys() == state.keys() and all(
        torch.equal(stored[k], v.detach().cpu().to(stored[k].dtype)) for k, v in state.items())


def musicgen_codec_dir(path) -> Path:
    """The codec folder of a model folder: ``path/codec``, or the one its config names (``codec_path``)."""
    path = Path(path)
    meta = json.loads((path / CONFIG_NAME).read_text()) if (path / CONFIG_NAME).is_file() else {}
    return Path(os.path.normpath(path / meta.get("config", {}).get("codec_path", "codec")))


def share_codec(model_dir, codec_dir) -> Path:
    """Replace a model folder's ``codec/`` copy by a reference to ``codec_dir`` (relative, in its
    ``config.json``), after checking that both hold the same codec: saves the copy's bytes where
    several shipped models share one codec. Nothing else in the folder changes."""
    model_dir, codec_dir = Path(model_dir), Path(codec_dir)
    copy_dir = model_dir / "codec"
    own, own_config, _ = load_checkpoint(copy_dir)
    if not _holds_codec(codec_dir, own, own_config):
        raise ValueError(f"{copy_dir} and {codec_dir} do not hold the same codec")
    meta = json.loads((model_dir / CONFIG_NAME).read_text())
    meta["config"]["codec_path"] = os.path.relpath(codec_dir, model_dir)
    save_json(model_dir / CONFIG_NAME, meta)
    for f in copy_dir.iterdir():
        f.unlink()
    copy_dir.rmdir()
    return model_dir


def load_musicgen(path=None, device: str | torch.device = "cpu"):
    """A :class:`~musicgen_lite.generation.MusicGen` from a folder written by :func:`save_musicgen`.

    ``path=None`` loads the shipped default (:func:`default_model_path`). Weights stored in
    fp16 or int8 (:func:`pack_int8`) come back as fp32. The codec is ``path/codec`` or, where
    the config names one (``codec_path``), that folder relative to ``path``. The model is
    returned in eval mode.
    """
    from .conditioning import MelodyConditioner, ModePredictor, TempoPredictor, get_conditioner
    from .generation import DEFAULT_CFG, MusicGen
    from .lm import LMConfig, MusicLM

    path = Path(path) if path is not None else default_model_path()
    if not (path / CONFIG_NAME).is_file():
        hint = (" (no default model is shipped in this checkout yet: train one, see the README's "
                "'Training' section, or pass a model folder)") if path == default_model_path() else ""
        raise FileNotFoundError(f"{path}: not a musicgen-lite model folder (no {CONFIG_NAME}){hint}")
    state, config, _ = load_checkpoint(path, device)
    if config.get("format") != MUSICGEN_FORMAT:
        raise ValueError(f"{path}: config.json is not a {MUSICGEN_FORMAT} model (format={config.get('format')!r})")
    codec = load_codec(musicgen_codec_dir(path), device)
    lm = MusicLM(LMConfig(**{k: v for k, v in config["lm"].items() if k in LMConfig.__dataclass_fields__}))
    lm.load_state_dict({k[3:]: v.float() if v.is_floating_point() else v for k, v in state.items()
                        if k.startswith("lm.")})
    conditioner = None
    spec = config.get("conditioner")
    if spec:
        conditioner = get_conditioner(spec["name"], lm.config.dim, **spec.get("kwargs", {}))
        cond_state = {k[len("conditioner."):]: v.float() if v.is_floating_point() else v
                      for k, v in state.items() if k.startswith("conditioner.")}
        missing, unexpected = conditioner.load_state_dict(cond_state, strict=False)
        frozen = _FROZEN_PREFIXES.get(spec["name"])
        missing = [k for k in missing if not (frozen and k.startswith(frozen))]
        if missing or unexpected:
            raise ValueError(f"{path}: conditioner weights do not match (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    melody = None
    if config.get("melody"):
        melody = MelodyConditioner(output_dim=lm.config.dim, **config["melody"])
        melody_state = {k[len("melody_conditioner."):]: v.float() if v.is_floating_point() else v
                        for k, v in state.items() if k.startswith("melody_conditioner.")}
        missing, unexpected = melody.load_state_dict(melody_state, strict=False)
        missing = [k for k in missing if k in dict(melody.named_parameters())]  # buffers are rebuilt
        if missing or unexpected:
            raise ValueError(f"{path}: melody conditioner weights do not match (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    key_guide = None
    if config.get("key_guide"):
        from .data.dataset import codec_fingerprint
        from .key_guidance import KeyGuide

        spec = config["key_guide"]
        if spec.get("codec") != codec_fingerprint(codec):
            raise ValueError(f"{path}: the key guide was learned from another codec's tokens than this model's codec")
        if not (path / KEY_GUIDE_NAME).is_file():
            raise FileNotFoundError(f"{path}: config.json names a key guide but there is no {KEY_GUIDE_NAME}")
        table = load_tensors(path / KEY_GUIDE_NAME, device)
        key_guide = KeyGuide(table["chroma"].float(), table["counts"].float(), spec["strength"], spec["prior"],
                             spec.get("cap"), spec.get("candidates", 1))
    model = MusicGen(codec, lm, conditioner, config.get("pattern", "delay"), config.get("max_duration", 30.0),
                     config.get("extend_stride", 18.0), melody_conditioner=melody,
                     cfg_coef=config.get("cfg_coef", DEFAULT_CFG),
                     tempo=TempoPredictor.from_dict(config["tempo"]) if config.get("tempo") else None,
                     mode_predictor=ModePredictor.from_dict(config["mode_predictor"]) if config.get("mode_predictor")
                     else None, key_guide=key_guide)
    return model.to(device).eval()


# --------------------------------------------------------------------------- the real MusicGen

PRETRAINED = ("facebook/musicgen-small", "facebook/musicgen-medium", "facebook/musicgen-large",
              "facebook/musicgen-melody", "facebook/musicgen-melody-large")
PARITY_PROMPT = "80s pop track with bassy drums and synth"


_HUB_OPTIONS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")


class HubUnreachableError(OSError):
    """The model hub could not be reached (offline) and no local copy was found."""


def from_pretrained(name_or_path: str, device: str | torch.device = "cpu", check: bool = True,
                    parity_steps: int = 8, **hf_kwargs):
    """Meta's MusicGen in our modules: load with transformers, port every weight, check parity.

    ``name_or_path``: a hub name (``facebook/musicgen-small`` | ``-medium`` | ``-large`` |
    ``facebook/musicgen-melody``) or a local folder written by transformers' ``save_pretrained``
    (with its tokenizer files; the hub repositories ship them). The port is checked on
    :data:`PARITY_PROMPT` (``check=True``): the first step's logits allclose and
    ``parity_steps`` greedy tokens identical to transformers' ``generate``; the result is kept
    in ``model.parity``. Offline, a :class:`HubUnreachableError` says how to use a local copy.
    ``hf_kwargs`` go to transformers' ``from_pretrained`` (e.g. ``revision``).
    """
    from transformers import AutoConfig, AutoTokenizer

    local = Path(str(name_or_path)).expanduser()
    source = str(local) if local.is_dir() else str(name_or_path)
    hub_kwargs = {k: v for k, v in hf_kwargs.items() if k in _HUB_OPTIONS}  # config and tokenizer: hub options only
    if local.is_dir() and not (local / "config.json").is_file():
        raise FileNotFoundError(f"{local}: no transformers config.json (save the model there with save_pretrained)")
    try:
        config = AutoConfig.from_pretrained(source, **hub_kwargs)
    except OSError as e:
        if local.is_dir():
            raise FileNotFoundError(f"{local}: no transformers config.json (save it with save_pretrained)") from e
        raise HubUnreachableError(
            f"could not load {name_or_path!r} from the Hugging Face hub ({type(e).__name__}). Offline? "
            f"On a machine with internet run: MusicgenForConditionalGeneration.from_pretrained({name_or_path!r})"
            ".save_pretrained(DIR) and AutoTokenizer.from_pretrained(...).save_pretrained(DIR), copy DIR here "
            "and pass its path instead.") from e
    if config.model_type == "musicgen_melody":
        from transformers import MusicgenMelodyForConditionalGeneration as cls
    elif config.model_type == "musicgen":
        from transformers import MusicgenForConditionalGeneration as cls
    else:
        raise ValueError(f"{name_or_path}: a {config.model_type!r} model, not MusicGen")
    # on the target device before porting: the port copies onto hf's device, so the CPU never
    # holds two full copies (12 GB for musicgen-medium in fp32, more than a free Colab has)
    hf = cls.from_pretrained(source, **hf_kwargs).to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **hub_kwargs)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{name_or_path}: no tokenizer files next to the model "
                                "(save the tokenizer with save_pretrained into the same folder)") from e
    model = from_transformers(hf).to(device)
    model.conditioner.tokenizer = tokenizer
    model.parity = parity_check(hf, model, tokenizer, steps=parity_steps) if check else None
    return model


@torch.no_grad()
def parity_check(hf, ours, tokenizer, prompt: str = PARITY_PROMPT, steps: int = 8, raise_on_mismatch: bool = True) -> dict:
    """Compare a transformers MusicGen with its port on ``prompt``.

    Returns ``{"max_logit_diff", "greedy_equal", "steps"}``: the largest absolute difference of
    the first decoding step's logits (plain MusicGen; None for melody, whose conditioning the
    comparison would have to rebuild) and whether ``steps`` greedy tokens per codebook are
    identical to transformers' ``generate`` (captured at its codec's decode call).
    """
    inputs = tokenizer([prompt], padding=True, return_tensors="pt").to(hf.device)
    K = ours.lm.config.num_codebooks
    max_diff = None
    if type(hf).__name__ == "MusicgenForConditionalGeneration":
        start = torch.full((K, 1), hf.generation_config.decoder_start_token_id, device=hf.device)
        ref = hf(**inputs, decoder_input_ids=start).logits  # (K, 1, bins)
        cond, mask = ours.condition([prompt])
        mine = ours.lm(torch.full((1, K, 1), ours.lm.config.special, device=ours.device), cond, mask)[0]
        max_diff = float((mine.float() - ref.float().to(mine.device)).abs().max())
    seen = []
    decode = hf.audio_encoder.decode
    hf.audio_encoder.decode = lambda codes, *a, **kw: seen.append(codes[0].clone()) or decode(codes, *a, **kw)
    try:
        hf.generate(**inputs, do_sample=False, guidance_scale=1.0, max_new_tokens=steps + K - 1)
    finally:
        hf.audio_encoder.decode = decode
    codes = ours.generate_codes([prompt], duration=steps / ours.frame_rate, cfg_coef=1.0, top_k=1, progress=False)
    equal = bool(seen) and codes.shape == seen[-1].shape and torch.equal(codes.cpu(), seen[-1].cpu())
    result = {"max_logit_diff": max_diff, "greedy_equal": equal, "steps": steps}
    if raise_on_mismatch and (not equal or (max_diff is not None and max_diff > 1e-3)):
        raise RuntimeError(f"the port of {type(hf).__name__} does not match transformers: {result}")
    return result

"""The inference engine's building blocks: prepared volumes, cached encoders and decoders.

An :class:`Engine` wraps one model and one embedding cache. It turns a raw (K, J, I) volume into a
:class:`PreparedVolume` (preprocessed once per content), and runs the encoder of the zoom-out view and of any
zoom-in window at most once per (content, ROI, window), and each decoder at most once per set of prompts.
"""
from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import torch

from .cache import EmbeddingCache, content_key, shared_cache
from .device import autocast, with_oom_fallback
from .errors import InputError
from .network import SegVol
from .network.factored_decoder import DecoderSide
from .preprocessing import Preprocessed, preprocess
from .prompts import Box
from .windows import WindowGrid

Roi = tuple[int, int, int, int, int, int]


@dataclass
class PreparedVolume:
    """A volume after the official preprocessing, with the key that identifies its content."""

    key: str
    shape: tuple[int, int, int]
    pre: Preprocessed
    image: torch.Tensor  # (K, J, I) float32 crop on the CPU

    @property
    def crop_shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape)  # type: ignore[return-value]


@dataclass
class Timings:
    """Seconds spent per stage of one prediction (encoder runs are counted even when they hit the cache)."""

    values: dict[str, float] = field(default_factory=dict)
    encoder_runs: int = 0
    decoder_runs: int = 0

    def add(self, stage: str, seconds: float) -> None:
        self.values[stage] = self.values.get(stage, 0.0) + seconds


class Engine:
    """Cached SegVol passes on one model; thread-compatible (one prediction at a time per engine)."""

    def __init__(self, model: SegVol, cache: EmbeddingCache | None = None, precision: str = "fp32") -> None:
        self.model = model.eval()
        self.cache = cache if cache is not None else shared_cache()
        self.precision = precision
        self._prepared: dict[str, PreparedVolume] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def window(self) -> tuple[int, int, int]:
        return self.model.config.spatial_size

    def _model_tag(self) -> tuple:
        """Identity of the weights the entries were computed with: a token that stays with the model object (ids
        are reused after a model is freed), plus the storage and in-place version of every tensor, so new weights
        loaded into the same model (or moved to another device) never meet old entries."""
        token = self.model.__dict__.setdefault("_segvolgru_token", uuid.uuid4().hex)
        # a plain walk of the modules' own dicts: modules() and parameters() build names and cost 2-4x as much
        versions, stack = [], [self.model]
        while stack:
            module = stack.pop()
            for tensor in itertools.chain(module._parameters.values(), module._buffers.values()):
                if tensor is not None:
                    versions.append((tensor.data_ptr(), tensor._version))
            stack.extend(m for m in module._modules.values() if m is not None)
        weights = hash(tuple(versions))
        return (token, weights, str(self.device), self.precision)

    def prepare(self, volume: np.ndarray, key: str | None = None) -> PreparedVolume:
        """Preprocess ``volume`` (never modified), reusing the result for identical content."""
        key = key or content_key(volume)
        prepared = self._prepared.get(key)
        if prepared is None:
            pre = preprocess(volume, self.window)
            prepared = PreparedVolume(key, tuple(volume.shape), pre, torch.from_numpy(pre.image))
            # Keep only the latest volume: a crop can be hundreds of MB and sessions keep their own reference.
            self._prepared = {key: prepared}
        return prepared

    def _run(self, fn):
        def to_cpu() -> None:
            self.model.to("cpu")
            self.cache.clear()

        return with_oom_fallback(fn, to_cpu)

    def _encode(self, image: torch.Tensor) -> torch.Tensor:
        def run() -> torch.Tensor:
            with torch.inference_mode(), autocast(self.device, self.precision):
                return self.model.encode(image[None, None].to(self.device, torch.float32)).float()

        return self._run(run)

    def zoom_out_embedding(self, prepared: PreparedVolume, timings: Timings | None = None) -> torch.Tensor:
        key = ("zoom_out", self._model_tag(), prepared.key)
        return self._cached_embedding(key, lambda: torch.from_numpy(prepared.pre.zoom_out), timings)

    def window_embedding(self, prepared: PreparedVolume, roi: Roi, grid: WindowGrid, index: int,
                         padded_image: torch.Tensor, timings: Timings | None = None) -> torch.Tensor:
        key = ("window", self._model_tag(), prepared.key, tuple(roi), grid.starts[index])
        return self._cached_embedding(key, lambda: padded_image[grid.window_slices(index)], timings)

    def _cached_embedding(self, key, image_fn, timings: Timings | None) -> torch.Tensor:
        cached = self.cache.get(key)
        if cached is not None:
            return cached  # type: ignore[return-value]
        start = time.perf_counter()
        embedding = self._encode(image_fn())
        if timings is not None:
            timings.add("encoder_s", time.perf_counter() - start)
            timings.encoder_runs += 1
        self.cache.put(key, embedding)
        return embedding

    def text_embedding(self, text: str | None) -> torch.Tensor | None:
        if text is None:
            return None
        if not self.model.has_text:
            raise InputError(f"text prompt {text!r} given, but this model has no text tower: use a box or clicks, "
                             "or load the official SegVol weights")
        if not text.strip():
            raise InputError("the text prompt is empty: give an organ name such as 'liver', or no text")
        key = ("text", self._model_tag(), text)

        def run() -> torch.Tensor:
            with torch.inference_mode():
                return self.model.embed_text(text)

        return self.cache.get_or_compute(key, lambda: self._run(run))  # type: ignore[return-value]

    def decode(self, embedding: torch.Tensor, embedding_key: tuple, box: Box | None, points: np.ndarray | None,
               labels: np.ndarray | None, text_embedding: torch.Tensor | None, text: str | None,
               timings: Timings | None = None) -> torch.Tensor:
        """Prompts in the embedded image's voxels -> low-resolution logits (1, 1, ...) on the CPU, cached."""
        pts = None if points is None or len(points) == 0 else np.asarray(points, np.int64)
        lab = None if pts is None else np.asarray(labels, np.int64)
        tag = self._model_tag()
        key = ("decoder", tag, embedding_key, box,
               None if pts is None else (pts.tobytes(), lab.tobytes()), text)
        cached = self.cache.get(key)
        if cached is not None:
            return cached  # type: ignore[return-value]
        start = time.perf_counter()
        tags = [tag]

        def run() -> torch.Tensor:
            device = self.device
            # a second run follows an out-of-memory fallback, on weights moved to the CPU: tag them again
            tags.append(tags[-1] if len(tags) == 1 else self._model_tag())
            image_side = self._image_side(embedding, (tags[-1], embedding_key))
            boxes = None if box is None else torch.tensor([box], dtype=torch.float32, device=device)
            point_prompt = None
            if pts is not None:
                point_prompt = (torch.as_tensor(pts, dtype=torch.float32, device=device)[None],
                                torch.as_tensor(lab, dtype=torch.float32, device=device)[None])
            text_emb = None if text_embedding is None else text_embedding.to(device)
            with torch.inference_mode(), autocast(device, self.precision):
                low = self.model.decode(embedding.to(device), boxes, point_prompt, text_emb, image_side)
            return low.float().cpu()

        low_res = self._run(run)
        if timings is not None:
            timings.add("decoder_s", time.perf_counter() - start)
            timings.decoder_runs += 1
        self.cache.put(("decoder", tags[-1]) + key[2:], low_res)
        return low_res

    def _image_side(self, embedding: torch.Tensor, key: tuple) -> DecoderSide:
        """The decoder's prompt-free products of an embedding (37.8 MB per official window, cached as quick to
        recompute) and of the model (9.4 MB): every later prompt on the window runs the factored decoder on them."""
        def run(fn):
            def compute():
                with torch.inference_mode(), autocast(self.device, self.precision):
                    return fn()
            return compute

        tag, embedding_key = key
        # Always the factored path, even when a full cache cannot keep the side: the decoder's rounding must not
        # depend on the cache's state, or replaying a session could differ from the live one.
        window = self.cache.get_or_compute(("decoder_image", tag, embedding_key),
                                           run(lambda: self.model.decoder_image_side(embedding.to(self.device))),
                                           cheap=True)
        shared = self.cache.get_or_compute(("decoder_shared", tag), run(self.model.decoder_shared_side))
        return DecoderSide(window, shared)  # type: ignore[arg-type]

    def upsample(self, low_res: torch.Tensor) -> torch.Tensor:
        """Low-resolution logits -> (K, J, I) logits at the window size (the official trilinear step)."""
        with torch.inference_mode():
            return self.model.upsample(low_res)[0, 0]

"""Training samples from a folder of image/label cases (``segvolgru train --data FOLDER``).

The folder holds what ``segvolgru evaluate`` reads (challenge npz files, ``<case>.nii.gz`` + ``<case>_label.nii.gz``
pairs, ...): cases are found and loaded by :mod:`segvolgru.evaluate`, so both commands accept the same data.
"""
from __future__ import annotations

import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .errors import InputError
from .evaluate import find_cases, load_case

if TYPE_CHECKING:
    from .train import Sample

# Prepared samples are model-sized (1.8 MB at 32x96x96), the raw cases they come from can be hundreds of MB: only
# prepared ones are kept, and only this many, so a large folder does not fill the memory.
DEFAULT_CACHED_CASES = 128
# The third seed word keeps the case draw independent of the step's other draws (train._step_rng uses 7).
_PICK_STREAM = 11
# Failures of one case file that must not end a run over the rest of the folder.
_CASE_ERRORS = (InputError, OSError, ValueError, KeyError, zipfile.BadZipFile)


class FolderSource:
    """``step -> Sample``: a case of ``folder`` drawn from (seed, step) and prepared at ``spatial_size``.

    A case that cannot be read or whose labels hold no foreground (before or after the preprocessing crop) is
    skipped with a warning; the draw then takes the next case of the step's permutation. Whether a case is usable
    depends on the file alone, so every step's sample is a function of (folder, seed, step) and a resumed run sees
    the samples an uninterrupted one would.
    """

    def __init__(self, folder: str | Path, spatial_size: Sequence[int], seed: int,
                 cached_cases: int = DEFAULT_CACHED_CASES) -> None:
        self.folder = Path(folder)
        self.paths = find_cases(self.folder)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.seed = seed
        self.cached_cases = cached_cases
        self.skipped: dict[str, str] = {}
        self._samples: OrderedDict[str, Sample] = OrderedDict()

    @property
    def names(self) -> list[str]:
        return [path.name for path in self.paths]

    def recipe(self) -> dict:
        """What the model file's recipe says about the data (instead of the phantom rule)."""
        return {"folder": str(self.folder.resolve()), "cases": self.names,
                "rule": f"case = first usable of numpy default_rng([seed, step, {_PICK_STREAM}]).permutation("
                        "cases), prepared with segvolgru.train.prepare_sample"}

    def __call__(self, step: int) -> Sample:
        order = np.random.default_rng([self.seed, step, _PICK_STREAM]).permutation(len(self.paths))
        for index in order:
            sample = self._sample(self.paths[index])
            if sample is not None:
                return sample
        reasons = "; ".join(f"{name}: {why}" for name, why in self.skipped.items())
        raise InputError(f"{self.folder} has no usable training case ({reasons}): give cases whose label map "
                         "holds at least one foreground class inside the image's foreground")

    def _sample(self, path: Path) -> Sample | None:
        from .train import prepare_sample  # train imports this module

        if path.name in self._samples:
            self._samples.move_to_end(path.name)
            return self._samples[path.name]
        if path.name in self.skipped:
            return None
        try:
            case = load_case(path)
            if not np.any(case.gts):
                raise InputError("its labels are empty")
            sample = prepare_sample(case.image, case.gts, self.spatial_size)
            if not sample.labels.any():
                raise InputError("no label is left inside the image's foreground crop at the model's input size")
        except _CASE_ERRORS as exc:
            self.skipped[path.name] = str(exc)
            warnings.warn(f"{path}: skipped for training ({exc}); fix or remove the file, or add labels to it",
                          stacklevel=3)
            return None
        self._samples[path.name] = sample
        if len(self._samples) > self.cached_cases:
            self._samples.popitem(last=False)
        return sample

